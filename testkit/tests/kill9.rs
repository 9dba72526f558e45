//! kill -9 of a node: every process is gone on return, and the node restarts and catches up.

use std::path::Path;
use std::time::Duration;

use pgfleet_testkit::{LocalCluster, Node};

/// The postmaster pid of a running node.
fn postmaster_pid(node: &Node) -> u32 {
    let text =
        std::fs::read_to_string(node.data_dir().join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid")
}

fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn count(cluster: &LocalCluster, node: &Node) -> anyhow::Result<i64> {
    let client = cluster.app_client(node).await?;
    Ok(client
        .query_one("SELECT count(*) FROM crash", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_restarts_and_catches_up() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    let primary = cluster.app_client(cluster.primary()).await?;
    primary.batch_execute("CREATE TABLE crash (id int)").await?;
    cluster.wait_all_replayed(Duration::from_secs(10)).await?;

    let pid = postmaster_pid(replica);
    cluster.kill9(replica).await?;
    assert!(!exists(pid), "the killed postmaster is still there");
    assert!(
        cluster.app_client(replica).await.is_err(),
        "a killed node accepts connections"
    );

    // Writes while the replica is down.
    primary
        .batch_execute("INSERT INTO crash SELECT generate_series(1, 500)")
        .await?;

    cluster.start(replica).await?;
    cluster
        .wait_streaming(replica, Duration::from_secs(20))
        .await?;
    cluster.wait_all_replayed(Duration::from_secs(20)).await?;
    assert_eq!(count(&cluster, replica).await?, 500);

    // The primary survives a crash too, and the replica follows it again.
    let pid = postmaster_pid(cluster.primary());
    cluster.kill9(cluster.primary()).await?;
    assert!(!exists(pid), "the killed primary postmaster is still there");
    cluster.start(cluster.primary()).await?;
    let primary = cluster.app_client(cluster.primary()).await?;
    primary
        .batch_execute("INSERT INTO crash SELECT generate_series(1, 500)")
        .await?;
    cluster
        .wait_streaming(replica, Duration::from_secs(20))
        .await?;
    cluster.wait_all_replayed(Duration::from_secs(20)).await?;
    assert_eq!(count(&cluster, replica).await?, 1000);
    Ok(())
}

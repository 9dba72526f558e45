//! kill -9 of a node: every process is dead on return (gone, or a zombie not yet reaped), and the
//! node restarts and catches up.

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

/// Whether `pid` is dead as [`LocalCluster::kill9`] promises: gone from `/proc`, or a zombie
/// (state `Z`) that nothing has reaped yet, which is allowed.
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the command name, which is in parentheses.
        Ok(stat) => stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z')),
    }
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
    assert!(dead(pid), "the killed postmaster is still running");
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
    assert!(dead(pid), "the killed primary postmaster is still running");
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

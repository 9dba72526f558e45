//! stop / start / restart of nodes, and promotion of a replica.

use std::time::Duration;

use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_restart() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);

    cluster.stop(replica).await?;
    assert!(
        cluster.superuser_client(replica).await.is_err(),
        "a stopped node accepts connections"
    );
    assert!(
        cluster.stop(replica).await.is_err(),
        "stopping a stopped node is an error"
    );
    cluster.start(replica).await?;
    cluster
        .wait_streaming(replica, Duration::from_secs(20))
        .await?;

    // Restart the primary: the replica reconnects.
    cluster.restart(cluster.primary()).await?;
    let primary = cluster.app_client(cluster.primary()).await?;
    primary
        .batch_execute("CREATE TABLE after_restart (id int); INSERT INTO after_restart VALUES (1)")
        .await?;
    cluster
        .wait_streaming(replica, Duration::from_secs(20))
        .await?;
    cluster.wait_all_replayed(Duration::from_secs(20)).await?;
    let standby = cluster.app_client(replica).await?;
    let n: i64 = standby
        .query_one("SELECT count(*) FROM after_restart", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);

    assert!(
        cluster.start(replica).await.is_err(),
        "starting a running node is an error"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_ends_recovery() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    cluster.promote(replica).await?;

    let client = cluster.superuser_client(replica).await?;
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(!in_recovery, "promoted replica still in recovery");

    // It takes writes now, as the app role.
    let app = cluster.app_client(replica).await?;
    app.batch_execute("CREATE TABLE promoted (id int); INSERT INTO promoted VALUES (1)")
        .await?;
    Ok(())
}

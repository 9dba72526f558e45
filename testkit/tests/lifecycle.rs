//! stop / start / restart of nodes, and promotion of a replica; builder settings apply to every
//! node and survive restarts.

use std::time::Duration;

use pgfleet_testkit::LocalCluster;

/// Settings given to [`pgfleet_testkit::ClusterBuilder::setting`]: (name, value, what `SHOW`
/// answers). Neither is a default; the second needs quoting in `postgresql.conf`.
const SETTINGS: [(&str, &str, &str); 2] = [
    ("work_mem", "7MB", "7MB"),
    (
        "log_line_prefix",
        r"%m [%p] it's \ quoted ",
        r"%m [%p] it's \ quoted ",
    ),
];

/// Every node, the primary and each replica, shows the builder's settings.
async fn assert_settings_on_every_node(cluster: &LocalCluster) -> anyhow::Result<()> {
    for node in cluster.nodes() {
        let client = cluster.superuser_client(node).await?;
        for (name, _, shown) in SETTINGS {
            let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
            assert_eq!(row.get::<_, String>(0), shown, "{}: {name}", node.name());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_restart() -> anyhow::Result<()> {
    let mut builder = LocalCluster::builder().replicas(1);
    for (name, value, _) in SETTINGS {
        builder = builder.setting(name, value);
    }
    let cluster = builder.start().await?;
    assert_settings_on_every_node(&cluster).await?;
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
    // From postgresql.conf, not just the first start's memory.
    assert_settings_on_every_node(&cluster).await?;
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

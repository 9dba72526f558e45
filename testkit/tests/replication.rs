//! Replication on the shared cluster: writes on the primary reach every replica.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_on_the_primary_becomes_visible_on_every_replica() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let primary = cluster.app_client(cluster.primary()).await?;
    primary
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS replication_probe (id bigint PRIMARY KEY, note text)",
        )
        .await?;
    // Unique per run and per test, as the shared cluster outlives this test.
    let id = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos())?;
    primary
        .execute("INSERT INTO replication_probe VALUES ($1, 'hello')", &[&id])
        .await?;

    assert_eq!(
        cluster.replicas().len(),
        2,
        "the shared cluster has two replicas"
    );
    for replica in cluster.replicas() {
        let client = cluster.app_client(replica).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = client
                .query("SELECT note FROM replication_probe WHERE id = $1", &[&id])
                .await
                .unwrap_or_default();
            if let Some(row) = rows.first() {
                assert_eq!(row.get::<_, String>(0), "hello");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: row not replicated in 10 s",
                replica.name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_streams_to_both_replicas() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let primary = cluster.superuser_client(cluster.primary()).await?;
    let rows = primary
        .query(
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1",
            &[],
        )
        .await?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["replica1", "replica2"]);
    for replica in cluster.replicas() {
        let client = cluster.superuser_client(replica).await?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        assert!(in_recovery, "{} is a standby", replica.name());
    }
    Ok(())
}

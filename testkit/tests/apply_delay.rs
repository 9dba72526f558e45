//! recovery_min_apply_delay holds commits back on a replica until it is reset.

use std::time::{Duration, Instant};

use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_delay_holds_commits_back_until_reset() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    let primary = cluster.app_client(cluster.primary()).await?;
    primary
        .batch_execute("CREATE TABLE delayed (id int)")
        .await?;
    cluster.wait_all_replayed(Duration::from_secs(10)).await?;

    cluster
        .set_apply_delay(replica, Duration::from_secs(3600))
        .await?;
    primary
        .batch_execute("INSERT INTO delayed VALUES (1)")
        .await?;
    let lsn = cluster.current_wal_lsn(cluster.primary()).await?;

    let standby = cluster.superuser_client(replica).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received: bool = standby
            .query_one(
                "SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await?
            .get(0);
        if received {
            break;
        }
        assert!(Instant::now() < deadline, "WAL not received in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count: i64 = standby
        .query_one("SELECT count(*) FROM delayed", &[])
        .await?
        .get(0);
    assert_eq!(count, 0, "the delayed commit is visible");

    cluster.set_apply_delay(replica, Duration::ZERO).await?;
    cluster
        .wait_replayed(replica, &lsn, Duration::from_secs(10))
        .await?;
    let count: i64 = standby
        .query_one("SELECT count(*) FROM delayed", &[])
        .await?
        .get(0);
    assert_eq!(count, 1);
    Ok(())
}

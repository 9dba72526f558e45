//! Paused replay: WAL is received but not applied until replay resumes.

use std::time::{Duration, Instant};

use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_receives_but_does_not_apply_until_resumed() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    let primary = cluster.app_client(cluster.primary()).await?;
    primary
        .batch_execute("CREATE TABLE paused (id int)")
        .await?;
    cluster.wait_all_replayed(Duration::from_secs(10)).await?;

    cluster.pause_replay(replica).await?;
    let standby = cluster.superuser_client(replica).await?;
    let replay_before: String = standby
        .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
        .await?
        .get(0);

    primary
        .batch_execute("INSERT INTO paused SELECT generate_series(1, 1000)")
        .await?;
    // Taken after the INSERT committed, so at or past the end of its commit record. The write
    // position rather than pg_current_wal_insert_lsn(): when a record ends exactly at a page
    // boundary, the insert position points past the next page's header, which the replica's
    // receive position only passes once more WAL is written.
    let primary_lsn = cluster.current_wal_lsn(cluster.primary()).await?;

    // The WAL receiver keeps going: it receives everything up to the INSERT's commit, while the
    // replay position stays where it was paused, before it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = standby
            .query_one(
                "SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn,
                        pg_last_wal_replay_lsn() < $1::text::pg_lsn,
                        pg_last_wal_replay_lsn()::text",
                &[&primary_lsn],
            )
            .await?;
        assert!(
            row.get::<_, bool>(1),
            "replay must stay behind the primary while paused"
        );
        assert_eq!(
            row.get::<_, String>(2),
            replay_before,
            "replay LSN moved while paused"
        );
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not receive the INSERT's WAL (up to {primary_lsn}) in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let count: i64 = standby
        .query_one("SELECT count(*) FROM paused", &[])
        .await?
        .get(0);
    assert_eq!(count, 0, "paused replica shows unreplayed rows");

    cluster.resume_replay(replica).await?;
    cluster
        .wait_replayed(replica, &primary_lsn, Duration::from_secs(10))
        .await?;
    let count: i64 = standby
        .query_one("SELECT count(*) FROM paused", &[])
        .await?
        .get(0);
    assert_eq!(count, 1000);
    Ok(())
}

//! Sessions (DESIGN §3): a session's reads never go back in time while it moves between
//! servers, even when one replica has stopped replaying, and a session reads back its
//! own writes. A writer keeps a counter moving; replica1 pauses replay (stale but still
//! in eventual rotation), replica2 keeps streaming.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgfleet::{Consistency, Fleet, Intent, Role};
use pgfleet_testkit::LocalCluster;

const READS: usize = 500;
const WRITES: i64 = 100;

/// Increments counter 1 until `stop`; counts the increments.
async fn writer(fleet: Fleet, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> anyhow::Result<()> {
    while !stop.load(Ordering::Acquire) {
        let w = fleet.lease(Intent::Write).await?;
        let n = w
            .execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
            .await?;
        anyhow::ensure!(n == 1, "counter row missing");
        done.fetch_add(1, Ordering::Release);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_are_monotonic_and_see_the_sessions_writes() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    // A generous max_lag keeps the paused replica1 in eventual rotation for the whole
    // test, so plain reads do see its stale counter: sessions must not.
    let tables = format!("{}\n[consistency]\nmax_lag = \"120s\"\n", common::FAST);
    let fleet = common::start(common::config(&cluster, &tables, |_| {})).await;
    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute(
            "CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO counter VALUES (1, 0), (2, 0)",
        )
        .await?;
    }
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(writer(fleet.clone(), stop.clone(), done.clone()));

    common::wait_for("50 increments", Duration::from_secs(20), || async {
        done.load(Ordering::Acquire) >= 50
    })
    .await;
    cluster.pause_replay(cluster.replica(0)).await?;
    common::wait_for(
        "the fleet to see replica1 paused",
        Duration::from_secs(10),
        || async { fleet.status().server("replica1").is_some_and(|s| s.paused) },
    )
    .await;
    let at_pause = done.load(Ordering::Acquire);
    common::wait_for("50 more increments", Duration::from_secs(20), || async {
        done.load(Ordering::Acquire) >= at_pause + 50
    })
    .await;

    // Session B, concurrently: writes row 2 and reads it back through the session.
    let session_b = fleet.session();
    let writes_b = tokio::spawn(async move {
        let mut last_counter = 0i64;
        let mut servers = BTreeMap::<String, usize>::new();
        for v in 1..=WRITES {
            {
                let w = session_b.lease(Intent::Write).await?;
                w.execute("UPDATE counter SET n = $1 WHERE id = 2", &[&v])
                    .await?;
            }
            let r = session_b.lease(Intent::read()).await?;
            let rows = r
                .query("SELECT id, n FROM counter ORDER BY id", &[])
                .await?;
            let (counter, mine): (i64, i64) = (rows[0].get(1), rows[1].get(1));
            anyhow::ensure!(
                mine == v,
                "session B wrote {v} and read {mine} back from {} (fallback {})",
                r.server(),
                r.is_fallback()
            );
            anyhow::ensure!(
                counter >= last_counter,
                "session B saw the counter go back from {last_counter} to {counter} on {}",
                r.server()
            );
            last_counter = counter;
            *servers.entry(r.server().to_owned()).or_default() += 1;
        }
        anyhow::Ok(servers)
    });

    // Session A: many reads, interleaved with plain (sessionless) eventual reads that
    // show the hazard is real: the paused replica1 serves them an older counter.
    let session_a = fleet.session();
    let mut seen = Vec::with_capacity(READS);
    let mut servers_a = BTreeMap::<String, usize>::new();
    let mut plain_went_back = 0;
    let mut max_seen = 0i64;
    for i in 0..READS {
        let r = session_a.lease(Intent::read()).await?;
        let n: i64 = r
            .query_one("SELECT n FROM counter WHERE id = 1", &[])
            .await?
            .get(0);
        let server = r.server().to_owned();
        drop(r);
        if let Some(&(prev, ref prev_server)) = seen.last() {
            assert!(
                n >= prev,
                "read {i}: session A's counter went back from {prev} (on {prev_server}) to {n} (on {server})\n{}",
                fleet.status()
            );
        }
        max_seen = max_seen.max(n);
        *servers_a.entry(server.clone()).or_default() += 1;
        seen.push((n, server));

        if i % 10 == 0 {
            let p = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
            let pn: i64 = p
                .query_one("SELECT n FROM counter WHERE id = 1", &[])
                .await?
                .get(0);
            if pn < max_seen {
                assert_eq!(
                    p.role(),
                    Role::Replica,
                    "only a replica can serve an older counter"
                );
                plain_went_back += 1;
            }
        }
    }
    let servers_b = writes_b.await??;

    stop.store(true, Ordering::Release);
    writer.await??;
    cluster.resume_replay(cluster.replica(0)).await?;

    let (first, last) = (seen[0].0, seen[READS - 1].0);
    println!(
        "session A: counter {first} -> {last} over {READS} reads, by server {servers_a:?}; \
         plain eventual reads that went back: {plain_went_back}/{}; session B by server {servers_b:?}; \
         {} increments in all",
        READS / 10,
        done.load(Ordering::Acquire)
    );
    assert!(
        last > first,
        "the counter should have moved during session A's reads"
    );
    assert!(
        servers_a.get("replica2").is_some_and(|&c| c > 0),
        "the streaming replica2 should serve session reads: {servers_a:?}\n{}",
        fleet.status()
    );
    assert!(
        plain_went_back > 0,
        "plain eventual reads should have met the paused replica1's older counter (else this test proves nothing)"
    );
    fleet.shutdown().await;
    Ok(())
}

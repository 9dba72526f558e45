//! DESIGN §3 pitfall 5: a standby killed with `kill -9` right after a bulk write and
//! started again at once may show older data than before its crash, long before any
//! failure is detected (probing is slow here on purpose). It must serve no
//! read-after-token read before a fresh probe of its new incarnation: every such read
//! sees the whole bulk write, whichever server serves it.
//!
//! The iterations that first let the fleet see the replica past the token force the
//! hazard (`examples/chaos/older.rs`: recovery writes no page, and an apply delay set
//! before the kill holds the bulk commit back after the restart) and assert that it
//! happened: the replica's replay right after its start is below the token.

mod common;

#[path = "../examples/chaos/older.rs"]
mod older;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgfleet::{Fleet, Health, Intent, Token};
use pgfleet_testkit::LocalCluster;

const BULK: i64 = 50_000;
const ITERATIONS: usize = 3;
const READ_FOR: Duration = Duration::from_secs(3);
/// How long after the kill a held replay keeps the replica below the token at most; it is
/// released after the reads.
const HOLD: Duration = Duration::from_secs(30);

/// The router's view of replica1 covers `token` (healthy and at or past it).
fn replica_covers(fleet: &Fleet, token: &Token) -> bool {
    fleet
        .status()
        .server("replica1")
        .is_some_and(|s| s.health == Health::Healthy && s.lsn.is_some_and(|l| l >= token.lsn()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_standby_serves_no_stale_read_after_token() -> anyhow::Result<()> {
    common::trace();
    let cluster = older::keep_consistency_early(LocalCluster::builder().replicas(1))
        .start()
        .await?;
    let config = common::config(&cluster, common::FAST, |c| {
        // Failure detection far slower than a kill -9 and restart.
        c.fleet.probe_interval = Duration::from_secs(1);
        c.fleet.failure_threshold = 5;
        c.consistency.ryw_wait = Duration::from_millis(100);
    });
    let fleet = common::start(config).await;
    let table = common::table("older");
    let count_sql = format!("SELECT count(*) FROM {table}");
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int, pad text)"))
        .await?;
    drop(w);
    let replica = cluster.replica(0);

    let mut expected = 0;
    for iteration in 0..ITERATIONS {
        let mut w = fleet.lease(Intent::Write).await?;
        w.execute(
            &format!(
                "INSERT INTO {table} SELECT g, repeat('x', 50) FROM generate_series(1, {BULK}) g"
            ),
            &[],
        )
        .await?;
        let token = w.commit_token().await?;
        let committed_at = Instant::now();
        drop(w);
        expected += BULK;
        // Odd iterations first let the fleet see the replica at the token, so the
        // cached position of the old incarnation would let it serve the token: only
        // noticing the restart (postmaster start time) keeps the reads safe.
        let cached = iteration % 2 == 1;
        let mut held = None;
        if cached {
            common::wait_for(
                "the fleet to see replica1 past the token",
                Duration::from_secs(10),
                || async { replica_covers(&fleet, &token) },
            )
            .await;
            held = Some(older::hold_replay(&cluster, replica, committed_at, HOLD).await?);
        }
        let before_kill = Instant::now();
        cluster.kill9(replica).await?;
        // Start it again and, at the same time, read after the token: reads begin while
        // it is down and go on for READ_FOR after it accepts connections again, so the
        // first connections to the new incarnation come as early as they can.
        let started = OnceLock::<Instant>::new();
        let restart = async {
            cluster.start(replica).await?;
            started.get_or_init(Instant::now);
            // Was the new incarnation older than the token when it started accepting
            // connections? (Asserted where forced, below.)
            older::replay_at_start(&cluster, replica, &token).await
        };
        let read = async {
            let mut served = BTreeMap::<String, usize>::new();
            let (mut reads, mut first_on_replica) = (0usize, None);
            while started.get().is_none_or(|t| t.elapsed() < READ_FOR) {
                let l = fleet
                    .lease(Intent::read_after(&token))
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "iteration {iteration}: read after the token: {e:?}\n{}",
                            fleet.status()
                        )
                    });
                let server = l.server().to_owned();
                let n: i64 = l
                    .query_one(&count_sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("iteration {iteration}: count on {server}: {e:?}"))
                    .get(0);
                assert_eq!(
                    n, expected,
                    "iteration {iteration}: read {reads} after the token on {server} saw {n} rows, not \
                     {expected} ({:?} after the kill)\n{}",
                    before_kill.elapsed(),
                    fleet.status()
                );
                if server == "replica1" && first_on_replica.is_none() {
                    first_on_replica = started.get().map(|t| t.elapsed());
                }
                *served.entry(server).or_default() += 1;
                reads += 1;
            }
            (served, reads, first_on_replica)
        };
        let (restarted, (served, reads, first_on_replica)) = tokio::join!(restart, read);
        let (su, replay) = restarted?;
        let replay_end = older::replay_lsn(&su).await?;
        if held.is_some() {
            older::release_replay(&cluster, replica).await?;
        }
        let restarted_in = started
            .get()
            .map(|t| t.saturating_duration_since(before_kill));
        println!(
            "iteration {iteration} ({}): kill9+start took {restarted_in:?}; {reads} reads after the token, \
             all {expected} rows; served by {served:?}; first on replica1 {first_on_replica:?} after the start; \
             replica replay at start {} vs token {} (older: {}), after the reads {replay_end}; apply delay {held:?}",
            if cached { "replica cached past the token, replay held" } else { "killed right after the write" },
            replay.at_start,
            token.lsn(),
            replay.older(),
        );
        if cached {
            assert!(
                replay.older(),
                "iteration {iteration}: the replica came back at {} with the token at {}: not older, \
                 so the hazard this test is about did not happen",
                replay.at_start,
                token.lsn()
            );
        }

        // The fleet notices the new incarnation: replica1 healthy, at the token, and
        // serving reads after it with all the rows.
        common::wait_for(
            "replica1 back serving reads after the token",
            Duration::from_secs(20),
            || async {
                if !replica_covers(&fleet, &token) {
                    return false;
                }
                match fleet.lease(Intent::read_after(&token)).await {
                    Ok(l) if l.server() == "replica1" => {
                        let n: i64 = l
                            .query_one(&count_sql, &[])
                            .await
                            .expect("count on replica1")
                            .get(0);
                        assert_eq!(n, expected, "iteration {iteration}: replica1 back");
                        true
                    }
                    _ => false,
                }
            },
        )
        .await;
    }
    let status = fleet.status();
    println!("{status}");
    let s = status.server("replica1").expect("replica1 in the status");
    assert_eq!(s.health, Health::Healthy, "{status}");
    assert!(s.streaming, "{status}");
    fleet.shutdown().await;
    Ok(())
}

//! A replica killed with `kill -9` under a steady load of eventual reads: it leaves
//! rotation within the probe budget, no eventual lease fails (checkouts that hit the
//! dead server are retried elsewhere; only queries already running on it may fail), every
//! read returns the right data, and once started again the replica serves reads again.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfleet::{Consistency, Fleet, Health, Intent};
use pgfleet_testkit::LocalCluster;

const ROWS: i64 = 1000;
const READERS: usize = 4;

/// One eventual read attempt, as a reader task saw it.
#[derive(Debug)]
enum Outcome {
    /// The lease itself failed.
    LeaseFailed { at: Instant, error: String },
    /// The lease was granted on `server` at `granted`, but its query failed.
    QueryFailed {
        server: String,
        granted: Instant,
        error: String,
    },
    /// The query returned `count`.
    Read { server: String, count: i64 },
}

/// Leases eventual reads and counts rows until `stop` is set.
async fn reader(fleet: Fleet, table: String, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let sql = format!("SELECT count(*) FROM {table}");
    let mut out = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let lease = match fleet.lease(Intent::Read(Consistency::Eventual)).await {
            Ok(l) => l,
            Err(e) => {
                out.push(Outcome::LeaseFailed {
                    at: Instant::now(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let granted = Instant::now();
        let server = lease.server().to_owned();
        match lease.query_one(&sql, &[]).await {
            Ok(row) => out.push(Outcome::Read {
                server,
                count: row.get(0),
            }),
            Err(e) => {
                let error = match e.as_db_error() {
                    Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                    None => e.to_string(),
                };
                out.push(Outcome::QueryFailed {
                    server,
                    granted,
                    error,
                })
            }
        }
    }
    out
}

fn health_of(fleet: &Fleet, name: &str) -> Health {
    fleet
        .status()
        .server(name)
        .map_or(Health::Starting, |s| s.health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_leaves_rotation_without_failing_leases_and_comes_back() -> anyhow::Result<()>
{
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    let config = common::config(&cluster, common::FAST, |c| {
        c.fleet.probe_interval = Duration::from_millis(50);
        c.fleet.probe_timeout = Duration::from_millis(500);
        c.fleet.failure_threshold = 3;
        c.fleet.lease_timeout = Duration::from_secs(2);
        c.fleet.down_after = Duration::from_secs(1);
        c.fleet.restart.min_backoff = Duration::from_millis(100);
        c.fleet.restart.max_backoff = Duration::from_secs(1);
    });
    let fleet = common::start(config.clone()).await;
    let table = common::table("killed");

    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY); \
         INSERT INTO {table} SELECT g FROM generate_series(1, {ROWS}) g"
    ))
    .await?;
    let expected: i64 = w
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(expected, ROWS);
    drop(w);
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    // Both replicas in rotation before the fault.
    for name in ["replica1", "replica2"] {
        common::wait_for(
            &format!("{name} to serve an eventual read"),
            Duration::from_secs(10),
            || async {
                match fleet.lease(Intent::Read(Consistency::Eventual)).await {
                    Ok(l) => l.server() == name,
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|_| tokio::spawn(reader(fleet.clone(), table.clone(), stop.clone())))
        .collect();
    // Let the load reach every server before the fault.
    common::wait_for(
        "reads on replica1 under load",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("replica1")
                .is_some_and(|s| s.leases > 20)
        },
    )
    .await;

    let replica1 = cluster.replica(0);
    let detect_budget = config.fleet.probe_interval * config.fleet.failure_threshold
        + config.fleet.probe_timeout
        + Duration::from_secs(2);
    let killed_at = Instant::now();
    // Watch the status while kill9 waits for the processes to go.
    let (killed, left) = tokio::join!(cluster.kill9(replica1), async {
        common::wait_for(
            "replica1 to leave rotation",
            detect_budget + Duration::from_secs(10),
            || async { health_of(&fleet, "replica1") != Health::Healthy },
        )
        .await;
        Instant::now()
    });
    killed?;
    let kill_took = killed_at.elapsed();
    let out_of_rotation_at = left;
    let detected = out_of_rotation_at - killed_at;
    println!("replica1 left rotation {detected:?} after kill -9 (budget {detect_budget:?}; kill9 itself took {kill_took:?})");

    // Keep reading on the survivors for a while (several probe rounds and the actor's
    // down_after / restart cycle) before the replica comes back.
    let leases_before = fleet.status().server("replica2").map_or(0, |s| s.leases);
    common::wait_for(
        "reads to go on while replica1 is down",
        Duration::from_secs(20),
        || async {
            fleet
                .status()
                .server("replica2")
                .is_some_and(|s| s.leases > leases_before + 100)
                && out_of_rotation_at.elapsed() > config.fleet.down_after * 2
        },
    )
    .await;
    let status_down = fleet.status();
    assert_ne!(
        status_down.server("replica1").map(|s| s.health),
        Some(Health::Healthy),
        "{status_down}"
    );

    cluster.start(replica1).await?;
    let started_at = Instant::now();
    cluster
        .wait_streaming(replica1, Duration::from_secs(30))
        .await?;
    let streaming_after = started_at.elapsed();
    let back_after = common::wait_for(
        "replica1 to serve eventual reads again",
        Duration::from_secs(20),
        || async {
            match fleet.lease(Intent::Read(Consistency::Eventual)).await {
                Ok(l) if l.server() == "replica1" => {
                    let n: i64 = l
                        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                        .await
                        .expect("count on the returned replica")
                        .get(0);
                    assert_eq!(n, expected, "the returned replica reads the right data");
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    let back_total = started_at.elapsed();
    println!(
        "replica1 streaming {streaming_after:?} after start; serving eventual reads {back_total:?} after start \
         ({back_after:?} after streaming)"
    );
    // Reads keep landing on the returned replica under the same load.
    let leases_back = fleet.status().server("replica1").map_or(0, |s| s.leases);
    common::wait_for(
        "the load to reach replica1 again",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("replica1")
                .is_some_and(|s| s.leases > leases_back + 20)
        },
    )
    .await;

    stop.store(true, Ordering::Release);
    let mut outcomes = Vec::new();
    for r in readers {
        outcomes.extend(r.await?);
    }
    let status = fleet.status();
    println!("{status}");

    let mut reads = std::collections::BTreeMap::<String, usize>::new();
    let (mut lease_errors, mut query_errors) = (Vec::new(), Vec::new());
    for o in &outcomes {
        match o {
            Outcome::Read { server, count } => {
                assert_eq!(
                    *count, expected,
                    "read on {server} returned the wrong row count"
                );
                *reads.entry(server.clone()).or_default() += 1;
            }
            Outcome::LeaseFailed { at, error } => lease_errors.push(format!(
                "{:?} after the kill: {error}",
                at.saturating_duration_since(killed_at)
            )),
            Outcome::QueryFailed {
                server,
                granted,
                error,
            } => query_errors.push((server, *granted, error)),
        }
    }
    println!(
        "reads per server: {reads:?}; lease errors: {}; query errors: {}",
        lease_errors.len(),
        query_errors.len()
    );
    assert!(
        lease_errors.is_empty(),
        "eventual leases failed: {lease_errors:#?}\n{status}"
    );
    for (server, granted, error) in &query_errors {
        println!(
            "query error on {server}, lease granted {:?} after the kill: {error}",
            granted.saturating_duration_since(killed_at)
        );
        assert_eq!(
            *server, "replica1",
            "a query failed on a server that was not killed: {error}"
        );
        assert!(
            *granted <= out_of_rotation_at,
            "a lease on replica1 granted {:?} after it left rotation failed: {error}",
            granted.saturating_duration_since(out_of_rotation_at)
        );
    }
    for name in ["replica1", "replica2"] {
        assert!(
            reads.get(name).copied().unwrap_or(0) > 0,
            "no reads served by {name}: {reads:?}"
        );
    }
    assert!(
        detected <= detect_budget,
        "replica1 left rotation {detected:?} after the kill; budget {detect_budget:?}\n{status}"
    );
    fleet.shutdown().await;
    Ok(())
}

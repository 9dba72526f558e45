//! Reads are spread over replicas by weight: replica1 weight 1, replica2 weight 3 gets
//! 25% / 75% of eventual reads with every strategy, and the primary (read_weight 0) none.
//! Each lease is checked to be on the server it names (`cluster_name` is the node name).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgfleet::{Config, Consistency, Fleet, Intent, Role, Strategy};
use pgfleet_testkit::LocalCluster;

const EVENTUAL: Intent = Intent::Read(Consistency::Eventual);

fn weighted_config(cluster: &LocalCluster, strategy: Strategy) -> Config {
    common::config(cluster, common::FAST, |c| {
        c.fleet.strategy = strategy;
        // 32 concurrent SCRAM connects from a debug build on 2 cores take more than FAST's
        // 1 s; this test is about shares, not timeouts.
        c.fleet.connect_timeout = Duration::from_secs(10);
        c.fleet.lease_timeout = Duration::from_secs(10);
        c.replicas[1].weight = 3;
        for r in &mut c.replicas {
            r.pool_size = 32;
        }
    })
}

/// Percentage of `n` in `total`.
fn pct(n: usize, total: usize) -> f64 {
    100.0 * n as f64 / total as f64
}

/// The lease really is on the server it names, and that server is a standby.
async fn check_lease_server(lease: &pgfleet::Lease) -> anyhow::Result<()> {
    let row = lease
        .query_one(
            "SELECT current_setting('cluster_name'), pg_is_in_recovery(), 1::int4",
            &[],
        )
        .await?;
    let name: String = row.get(0);
    assert_eq!(
        name,
        lease.server(),
        "lease names the server it is connected to"
    );
    assert!(
        row.get::<_, bool>(1),
        "eventual read on a standby, got {}",
        lease.server()
    );
    assert_eq!(row.get::<_, i32>(2), 1);
    Ok(())
}

/// `n` sequential eventual leases; every 50th runs a query. Returns counts per server.
async fn sequential_shares(fleet: &Fleet, n: usize) -> anyhow::Result<HashMap<String, usize>> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..n {
        let lease = fleet.lease(EVENTUAL).await?;
        assert!(
            !lease.is_fallback(),
            "lease {i} fell back:\n{}",
            fleet.status()
        );
        assert_eq!(lease.role(), Role::Replica);
        if i % 50 == 0 {
            check_lease_server(&lease).await?;
        }
        *counts.entry(lease.server().to_string()).or_default() += 1;
    }
    Ok(counts)
}

fn assert_shares(
    what: &str,
    fleet: &Fleet,
    counts: &HashMap<String, usize>,
    total: usize,
    tolerance: f64,
) {
    let get = |name: &str| counts.get(name).copied().unwrap_or(0);
    let (p, r1, r2) = (get("primary"), get("replica1"), get("replica2"));
    println!(
        "{what}: primary {p}, replica1 {r1} ({:.1}%), replica2 {r2} ({:.1}%)",
        pct(r1, total),
        pct(r2, total)
    );
    assert_eq!(
        p + r1 + r2,
        total,
        "{what}: every lease counted: {counts:?}"
    );
    assert_eq!(
        p, 0,
        "{what}: the primary (read_weight 0) serves no eventual reads"
    );
    assert!(
        (pct(r1, total) - 25.0).abs() <= tolerance,
        "{what}: replica1 share {:.1}% not 25 ± {tolerance}",
        pct(r1, total)
    );
    assert!(
        (pct(r2, total) - 75.0).abs() <= tolerance,
        "{what}: replica2 share {:.1}% not 75 ± {tolerance}",
        pct(r2, total)
    );
    // The fleet's own counters agree with what the leases said.
    let status = fleet.status();
    for (name, n) in [("primary", p), ("replica1", r1), ("replica2", r2)] {
        let s = status.server(name).expect("server in status");
        assert_eq!(
            s.leases as usize, n,
            "{what}: status leases of {name}:\n{status}"
        );
        assert_eq!(s.fallbacks, 0, "{what}: no fallbacks on {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_round_robin_and_random_follow_weights() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    const N: usize = 4000;
    for strategy in [Strategy::RoundRobin, Strategy::Random] {
        let fleet = common::start(weighted_config(cluster, strategy)).await;
        // Both replicas in rotation before counting.
        let ready = fleet.clone();
        common::wait_for(
            "both replicas healthy and fresh",
            Duration::from_secs(20),
            || {
                let f = ready.clone();
                async move {
                    let s = f.status();
                    ["replica1", "replica2"].iter().all(|n| {
                        s.server(n).is_some_and(|r| {
                            r.health == pgfleet::Health::Healthy && r.lag_bytes.is_some()
                        })
                    })
                }
            },
        )
        .await;
        let counts = sequential_shares(&fleet, N).await?;
        assert_shares(&format!("{strategy:?}"), &fleet, &counts, N, 5.0);
        if strategy == Strategy::RoundRobin {
            // Smooth weighted round robin is exact over whole cycles.
            assert_eq!(
                counts.get("replica1").copied(),
                Some(N / 4),
                "round robin is exact: {counts:?}"
            );
        }
        fleet.shutdown().await;
    }
    Ok(())
}

/// `total` leases from `TASKS` concurrent tasks, each running a 5 ms query. Counts per server.
async fn concurrent_shares(fleet: &Fleet, total: usize) -> anyhow::Result<HashMap<String, usize>> {
    const TASKS: usize = 32;
    let issued = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (fleet, issued, counts) = (fleet.clone(), issued.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                let lease = fleet.lease(EVENTUAL).await?;
                assert!(!lease.is_fallback(), "fell back:\n{}", fleet.status());
                let row = lease
                    .query_one(
                        "SELECT current_setting('cluster_name'), pg_sleep(0.005)::text",
                        &[],
                    )
                    .await?;
                assert_eq!(
                    row.get::<_, String>(0),
                    lease.server(),
                    "lease is on the server it names"
                );
                *counts
                    .lock()
                    .expect("lock")
                    .entry(lease.server().to_string())
                    .or_default() += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let counts = counts.lock().expect("lock").clone();
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_least_outstanding_follows_weights() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::start(weighted_config(cluster, Strategy::LeastOutstanding)).await;
    // Warm up: open the pools' connections so the measured run is not skewed by connects.
    let warm = concurrent_shares(&fleet, 320).await?;
    let before = fleet.status();
    const TOTAL: usize = 2000;
    let counts = concurrent_shares(&fleet, TOTAL).await?;
    let after = fleet.status();
    let get = |name: &str| counts.get(name).copied().unwrap_or(0);
    let (p, r1, r2) = (get("primary"), get("replica1"), get("replica2"));
    println!(
        "least_outstanding, 32 tasks (after {warm:?} warm-up): primary {p}, replica1 {r1} ({:.1}%), replica2 {r2} ({:.1}%)",
        pct(r1, TOTAL),
        pct(r2, TOTAL)
    );
    assert_eq!(p + r1 + r2, TOTAL, "every lease counted: {counts:?}");
    assert_eq!(p, 0, "the primary (read_weight 0) serves no eventual reads");
    assert!(
        (pct(r1, TOTAL) - 25.0).abs() <= 10.0,
        "replica1 share {:.1}% not 25 ± 10",
        pct(r1, TOTAL)
    );
    assert!(
        (pct(r2, TOTAL) - 75.0).abs() <= 10.0,
        "replica2 share {:.1}% not 75 ± 10",
        pct(r2, TOTAL)
    );
    for (name, n) in [("primary", p), ("replica1", r1), ("replica2", r2)] {
        let (b, a) = (
            before.server(name).expect("in status"),
            after.server(name).expect("in status"),
        );
        assert_eq!(
            (a.leases - b.leases) as usize,
            n,
            "status leases of {name}:\n{after}"
        );
        assert_eq!(a.fallbacks, 0, "no fallbacks on {name}");
    }
    fleet.shutdown().await;
    Ok(())
}

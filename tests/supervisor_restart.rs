//! Supervision: a failed server actor is restarted with growing backoff while reads keep
//! being served by the others; a failed router is replaced, `fleet.router()` resolves the
//! new one, and a message to the old one fails instead of hanging.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgfleet::ractor::call;
use pgfleet::{Consistency, Fleet, Health, Intent, Role, RouterMsg};
use pgfleet_testkit::LocalCluster;

const EVENTUAL: Intent = Intent::Read(Consistency::Eventual);

/// Leases in a loop until `stop`, each running a query; counts successes, panics on a failure.
fn lease_loop(
    fleet: Fleet,
    intent: Intent,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let lease = match fleet.lease(intent).await {
                Ok(l) => l,
                Err(e) => panic!("{intent:?} lease failed: {e}\n{}", fleet.status()),
            };
            let row = match lease
                .query_one(
                    "SELECT current_setting('cluster_name'), pg_is_in_recovery()",
                    &[],
                )
                .await
            {
                Ok(r) => r,
                Err(e) => panic!(
                    "query on {} failed: {e}\n{}",
                    lease.server(),
                    fleet.status()
                ),
            };
            assert_eq!(row.get::<_, String>(0), lease.server());
            assert_eq!(row.get::<_, bool>(1), lease.role() == Role::Replica);
            drop(lease);
            ok.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_server_actor_restarts_with_backoff() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let tables = format!(
        "{}\n[fleet.restart]\nmin_backoff = \"200ms\"\nmax_backoff = \"2s\"\n",
        common::FAST
    );
    let fleet = common::start(common::config(cluster, &tables, |_| {})).await;
    let replica1 = || {
        fleet
            .status()
            .server("replica1")
            .cloned()
            .expect("replica1")
    };
    common::wait_for("replica1 healthy", Duration::from_secs(10), || {
        let h = replica1().health;
        async move { h == Health::Healthy }
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| lease_loop(fleet.clone(), EVENTUAL, stop.clone(), ok.clone()))
        .collect();
    let writer = lease_loop(fleet.clone(), Intent::Write, stop.clone(), ok.clone());

    let mut took = Vec::new();
    for n in 1..=3u32 {
        let before = ok.load(Ordering::Relaxed);
        let t = Instant::now();
        assert!(
            fleet.debug_fail_server("replica1"),
            "restart {n}: the hook reached the actor"
        );
        common::wait_for(&format!("restart {n} seen"), Duration::from_secs(5), || {
            let s = replica1();
            async move { s.restarts >= n }
        })
        .await;
        let s = replica1();
        assert!(
            matches!(s.health, Health::Restarting | Health::Healthy) && s.restarts == n,
            "restart {n}: {s:?}"
        );
        common::wait_for(&format!("replica1 healthy after restart {n}"), Duration::from_secs(10), || {
            let s = replica1();
            async move { s.health == Health::Healthy && s.restarts == n && s.lag_bytes.is_some() }
        })
        .await;
        took.push(t.elapsed());
        // It serves eventual reads again (the lease says so and the query agrees).
        let f = fleet.clone();
        common::wait_for(
            &format!("replica1 serving after restart {n}"),
            Duration::from_secs(10),
            || {
                let f = f.clone();
                async move {
                    let lease = f.lease(EVENTUAL).await.expect("lease");
                    lease.server() == "replica1"
                }
            },
        )
        .await;
        // The other servers kept serving: leases keep completing (on a loaded machine
        // the restart can be quicker than ten of them, so this waits rather than asserts
        // at one instant).
        common::wait_for(
            &format!("leases flowing across restart {n}"),
            Duration::from_secs(10),
            || {
                let done = ok.load(Ordering::Relaxed);
                async move { done > before + 10 }
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in readers.into_iter().chain([writer]) {
        t.await?;
    }
    let status = fleet.status();
    println!(
        "failure to healthy again: {took:?}; {} leases during the restarts\n{status}",
        ok.load(Ordering::Relaxed)
    );
    let r1 = status.server("replica1").expect("replica1");
    assert_eq!(r1.restarts, 3);
    assert!(
        r1.last_error
            .as_deref()
            .is_some_and(|e| e.contains("test-induced")),
        "{:?}",
        r1.last_error
    );
    for other in ["primary", "replica2"] {
        assert_eq!(
            status.server(other).expect("in status").restarts,
            0,
            "{other} untouched"
        );
    }
    // Backoff grows: the third restart (attempt 2) waits 4 × min_backoff = 800 ms with
    // equal jitter, so at least 400 ms; the first waited at most min_backoff (200 ms).
    assert!(
        took[2] >= Duration::from_millis(400),
        "third restart after {:?}",
        took[2]
    );
    assert!(
        took[2] <= Duration::from_secs(2) + Duration::from_secs(3),
        "capped near max_backoff: {took:?}"
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_router_is_replaced() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;

    let router = fleet.router().await?;
    let lease = call!(router, RouterMsg::Lease, Intent::Write)
        .map_err(|e| anyhow::anyhow!("call: {e}"))??;
    assert_eq!(lease.role(), Role::Primary);
    let recovery: bool = lease
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(!recovery, "a write lease from the router is on the primary");
    drop(lease);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let loops = [
        lease_loop(fleet.clone(), Intent::Write, stop.clone(), ok.clone()),
        lease_loop(fleet.clone(), EVENTUAL, stop.clone(), ok.clone()),
    ];

    let old_id = router.get_id();
    let before = ok.load(Ordering::Relaxed);
    assert!(fleet.debug_fail_router());
    let f = fleet.clone();
    common::wait_for("a new router", Duration::from_secs(5), || {
        let f = f.clone();
        async move { f.router().await.is_ok_and(|r| r.get_id() != old_id) }
    })
    .await;
    let new = fleet.router().await?;
    println!("router {old_id} replaced by {}", new.get_id());

    let lease =
        call!(new, RouterMsg::Lease, EVENTUAL).map_err(|e| anyhow::anyhow!("call: {e}"))??;
    let one: i32 = lease.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    drop(lease);

    let old = tokio::time::timeout(Duration::from_secs(2), async {
        call!(router, RouterMsg::Lease, Intent::Write)
    })
    .await
    .map_err(|_| anyhow::anyhow!("a call to the dead router hung"))?;
    assert!(old.is_err(), "the old router answered: {old:?}");

    // The new router keeps the topology current: it hears reports (a write moves the
    // primary's position in the status) and serves read-your-writes waits.
    let mut w = fleet.lease(Intent::Write).await?;
    let table = common::table("router_restart");
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int4); INSERT INTO {table} VALUES (7)"
    ))
    .await?;
    let token = w.commit_token().await?;
    drop(w);
    let f = fleet.clone();
    common::wait_for("status shows the write", Duration::from_secs(5), || {
        let lsn = f.status().server("primary").and_then(|p| p.lsn);
        async move { lsn.is_some_and(|l| l >= token.lsn()) }
    })
    .await;
    let r = call!(new, RouterMsg::Lease, Intent::read_after(&token))
        .map_err(|e| anyhow::anyhow!("call: {e}"))??;
    let v: i32 = r
        .query_one(&format!("SELECT id FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(v, 7, "read after the token on {}", r.server());
    drop(r);

    let f = fleet.clone();
    common::wait_for("leases keep flowing", Duration::from_secs(5), || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > before + 20 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in loops {
        t.await?;
    }
    f.lease(Intent::Write)
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    fleet.shutdown().await;
    Ok(())
}

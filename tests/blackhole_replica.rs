//! A replica that hangs (its network blackholed: no RST, no answer): new leases avoid it
//! as soon as one probe times out (long before `failure_threshold` probes declare it
//! unhealthy); a query already running on it fails in bounded time because pgfleet fails
//! every connection of a server it declares unhealthy; eventual reads fall back to the
//! primary without waiting past `lease_timeout`; once the network passes again the
//! replica returns.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Consistency, Fleet, Health, Intent, Role};
use pgfleet_testkit::LocalCluster;

const ROWS: i64 = 500;

fn health_of(fleet: &Fleet, name: &str) -> Health {
    fleet
        .status()
        .server(name)
        .map_or(Health::Starting, |s| s.health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_replica_fails_its_queries_and_reads_fall_back_in_time() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let config = common::config(&cluster, "", |c| {
        c.fleet.probe_interval = Duration::from_millis(50);
        c.fleet.probe_timeout = Duration::from_millis(300);
        // Unhealthy only after 5 failed probes (~1.75 s): leases must avoid it well before.
        c.fleet.failure_threshold = 5;
        c.fleet.lease_timeout = Duration::from_secs(1);
        c.fleet.tcp_user_timeout = Duration::from_secs(2);
        c.fleet.down_after = Duration::from_secs(5);
    });
    let fleet = common::start(config.clone()).await;
    let table = common::table("blackhole");
    let count_sql = format!("SELECT count(*) FROM {table}");

    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY); \
         INSERT INTO {table} SELECT g FROM generate_series(1, {ROWS}) g"
    ))
    .await?;
    drop(w);
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    common::wait_for("replica1 to serve eventual reads", Duration::from_secs(10), || async {
        matches!(fleet.lease(Intent::Read(Consistency::Eventual)).await, Ok(l) if l.server() == "replica1")
    })
    .await;

    // (a) A long query running on the replica when its network goes silent.
    let lease = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    assert_eq!(lease.server(), "replica1");
    let n: i64 = lease.query_one(&count_sql, &[]).await?.get(0);
    assert_eq!(n, ROWS);
    let hung = tokio::spawn(async move {
        let r = lease.query_one("SELECT pg_sleep(30)", &[]).await;
        (r.map(|_| ()), Instant::now())
    });
    // Make sure it runs on the server before the network goes.
    let su = cluster.superuser_client(cluster.replica(0)).await?;
    common::wait_for("pg_sleep(30) to run on replica1", Duration::from_secs(10), || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) == 1)
        .unwrap_or(false)
    })
    .await;

    let holed_at = Instant::now();
    cluster.replica(0).proxy().blackhole();
    // (a') One probe times out: the replica is suspect and new leases go elsewhere,
    // while it is still `healthy` (failure_threshold not reached).
    common::wait_for(
        "replica1's probe to time out",
        Duration::from_secs(10),
        || async { fleet.status().server("replica1").is_some_and(|s| s.suspect) },
    )
    .await;
    let suspect_after = holed_at.elapsed();
    let health_then = health_of(&fleet, "replica1");
    let suspect_bound =
        config.fleet.probe_interval + config.fleet.probe_timeout + Duration::from_secs(1);
    println!("replica1 suspect {suspect_after:?} after the blackhole (health {health_then})");
    assert!(
        suspect_after < suspect_bound,
        "replica1 took {suspect_after:?} to leave rotation (bound {suspect_bound:?})"
    );
    let lease_bound = config.fleet.lease_timeout + Duration::from_millis(200);
    for i in 0..20 {
        let t = Instant::now();
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        assert!(
            t.elapsed() <= lease_bound,
            "lease {i} took {:?}",
            t.elapsed()
        );
        assert_eq!(l.server(), "primary", "lease {i} while replica1 is suspect");
        let n: i64 = l.query_one(&count_sql, &[]).await?.get(0);
        assert_eq!(n, ROWS, "read {i} while replica1 is suspect");
    }
    let (result, failed_at) = tokio::time::timeout(Duration::from_secs(40), hung).await??;
    let query_failed_after = failed_at - holed_at;
    println!("the running query failed {query_failed_after:?} after the blackhole: {result:?}");
    let err = result.expect_err("a query on a blackholed server cannot succeed");
    assert!(
        err.as_db_error().is_none(),
        "a connection error, not a server error: {err}"
    );
    let query_bound = config.fleet.tcp_user_timeout + Duration::from_secs(2);
    assert!(
        query_failed_after < query_bound,
        "the query hung on the blackholed replica for {query_failed_after:?} (bound {query_bound:?})\n{}",
        fleet.status()
    );

    // (b) Out of rotation: reads fall back to the primary, none waiting past lease_timeout.
    common::wait_for(
        "replica1 to leave rotation",
        Duration::from_secs(20),
        || async { health_of(&fleet, "replica1") != Health::Healthy },
    )
    .await;
    println!(
        "replica1 out of rotation {:?} after the blackhole",
        holed_at.elapsed()
    );
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let t = Instant::now();
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took <= lease_bound,
            "lease {i} took {took:?} (bound {lease_bound:?})"
        );
        assert_eq!(
            (l.server(), l.role(), l.is_fallback()),
            ("primary", Role::Primary, true),
            "lease {i}"
        );
        let n: i64 = l.query_one(&count_sql, &[]).await?.get(0);
        assert_eq!(n, ROWS, "fallback read {i}");
    }
    println!("50 fallback leases while replica1 is blackholed: slowest {slowest:?}");
    let s = fleet.status();
    assert_ne!(
        s.server("replica1").map(|s| s.health),
        Some(Health::Healthy),
        "{s}"
    );

    // (c) The network passes again: replica1 returns to rotation with the right data.
    let passed_at = Instant::now();
    cluster.replica(0).proxy().pass();
    common::wait_for(
        "replica1 to serve eventual reads again",
        Duration::from_secs(30),
        || async {
            match fleet.lease(Intent::Read(Consistency::Eventual)).await {
                Ok(l) if l.server() == "replica1" => {
                    let n: i64 = l
                        .query_one(&count_sql, &[])
                        .await
                        .expect("count on the returned replica")
                        .get(0);
                    assert_eq!(n, ROWS, "read on the returned replica");
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    println!(
        "replica1 serves reads again {:?} after the proxy passes",
        passed_at.elapsed()
    );
    println!("{}", fleet.status());
    fleet.shutdown().await;
    Ok(())
}

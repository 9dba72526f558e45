//! The primary goes down: writes fail with `Error::NoPrimary` within `lease_timeout`, the
//! status says the primary is down, caught-up replicas keep serving eventual reads (their
//! lag is measured against the last primary position seen), and writes work again once
//! the primary is back.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Consistency, Error, Fleet, Health, Intent, Role};
use pgfleet_testkit::LocalCluster;

const ROWS: i64 = 300;

/// Asks for a write lease and expects `NoPrimary`; returns how long that took.
async fn write_fails_with_no_primary(fleet: &Fleet, bound: Duration) -> Duration {
    let t = Instant::now();
    let r = fleet.lease(Intent::Write).await;
    let took = t.elapsed();
    match r {
        Err(Error::NoPrimary { waited, .. }) => {
            assert!(
                waited <= took,
                "waited {waited:?} is more than the call took ({took:?})"
            );
        }
        Err(e) => panic!("expected Error::NoPrimary, got {e:?}\n{}", fleet.status()),
        Ok(l) => panic!(
            "a write lease on {} with the primary stopped\n{}",
            l.server(),
            fleet.status()
        ),
    }
    assert!(took <= bound, "NoPrimary took {took:?} (bound {bound:?})");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_refuses_writes_and_fresh_replicas_keep_reading() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    let config = common::config(&cluster, common::FAST, |c| {
        c.fleet.lease_timeout = Duration::from_secs(1);
    });
    let fleet = common::start(config.clone()).await;
    let table = common::table("primary_down");
    let count_sql = format!("SELECT count(*) FROM {table}");

    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY); \
         INSERT INTO {table} SELECT g FROM generate_series(1, {ROWS}) g"
    ))
    .await?;
    drop(w);
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    // The fleet has seen both replicas caught up with the primary.
    common::wait_for(
        "both replicas at the primary's position",
        Duration::from_secs(10),
        || async {
            let s = fleet.status();
            ["replica1", "replica2"].iter().all(|n| {
                s.server(n)
                    .is_some_and(|r| r.health == Health::Healthy && r.lag_bytes == Some(0))
            })
        },
    )
    .await;

    cluster.stop(cluster.primary()).await?;
    let stopped_at = Instant::now();
    let bound = config.fleet.lease_timeout + Duration::from_millis(500);
    let first = write_fails_with_no_primary(&fleet, bound).await;
    println!("write lease right after the stop: NoPrimary after {first:?}");
    common::wait_for(
        "the status to say the primary is down",
        Duration::from_secs(10),
        || async { fleet.status().primary_down },
    )
    .await;
    println!(
        "status shows primary_down {:?} after the stop",
        stopped_at.elapsed()
    );
    let second = write_fails_with_no_primary(&fleet, bound).await;
    println!("write lease with the primary known down: NoPrimary after {second:?}");
    let status = fleet.status();
    println!("{status}");
    assert!(status.primary_down, "{status}");
    assert_ne!(
        status.server("primary").map(|s| s.health),
        Some(Health::Healthy),
        "{status}"
    );

    // Eventual reads go on, on the caught-up replicas, with all the rows.
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..50 {
        let l = fleet
            .lease(Intent::Read(Consistency::Eventual))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "eventual read {i} with the primary down: {e:?}\n{}",
                    fleet.status()
                )
            });
        assert_eq!(
            (l.role(), l.is_fallback()),
            (Role::Replica, false),
            "read {i} on {}",
            l.server()
        );
        let n: i64 = l.query_one(&count_sql, &[]).await?.get(0);
        assert_eq!(n, ROWS, "read {i} on {}", l.server());
        *served.entry(l.server().to_owned()).or_default() += 1;
    }
    println!("50 eventual reads with the primary down: {served:?}");
    assert!(
        fleet.status().primary_down,
        "the primary stayed down during the reads"
    );

    // The primary comes back: writes work again.
    cluster.start(cluster.primary()).await?;
    let started_at = Instant::now();
    common::wait_for(
        "a write to succeed again",
        Duration::from_secs(30),
        || async {
            match fleet.lease(Intent::Write).await {
                Ok(w) => w
                    .execute(&format!("INSERT INTO {table} VALUES ({})", ROWS + 1), &[])
                    .await
                    .is_ok_and(|n| n == 1),
                Err(_) => false,
            }
        },
    )
    .await;
    println!(
        "writes succeed again {:?} after the primary started",
        started_at.elapsed()
    );
    let r = fleet.lease(Intent::Read(Consistency::Strong)).await?;
    assert_eq!(r.server(), "primary");
    let n: i64 = r.query_one(&count_sql, &[]).await?.get(0);
    assert_eq!(n, ROWS + 1, "exactly the one new row");
    drop(r);
    assert!(!fleet.status().primary_down, "{}", fleet.status());
    fleet.shutdown().await;
    Ok(())
}

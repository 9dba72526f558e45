//! Time lag does not grow while the primary is idle (DESIGN §3 pitfall 4): a replica that
//! has replayed everything stays ~0 behind however long nothing is written, and keeps
//! serving eventual reads under a tight `max_lag`; the first write after the idle spell
//! does not make it look as far behind as the idle spell was long.
//!
//! One test only in this file: it needs the shared cluster's primary to stay idle.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Consistency, Fleet, Intent, Role, Token};
use pgfleet_testkit::LocalCluster;

const EVENTUAL: Intent = Intent::Read(Consistency::Eventual);
const MAX_LAG_SHOWN: Duration = Duration::from_millis(500);

/// Every replica's time lag is known, an upper bound, and at most `MAX_LAG_SHOWN`; an
/// eventual read lands on a replica (no fallback) that is a standby and, when `table` is
/// given, has its first row.
async fn check(
    fleet: &Fleet,
    table: Option<&str>,
    what: &str,
    since: Instant,
) -> anyhow::Result<()> {
    let status = fleet.status();
    for name in ["replica1", "replica2"] {
        let s = status.server(name).expect("replica in status");
        let ok = s.lag.is_some_and(|l| l <= MAX_LAG_SHOWN) && !s.lag_is_lower_bound;
        assert!(
            ok,
            "{what}, {:?} in: {name} shows time lag {:?} (lower bound: {}), more than {MAX_LAG_SHOWN:?}\n{status}",
            since.elapsed(),
            s.lag,
            s.lag_is_lower_bound
        );
    }
    let lease = fleet.lease(EVENTUAL).await?;
    assert!(
        !lease.is_fallback() && lease.role() == Role::Replica,
        "{what}, {:?} in: eventual read fell back to {}\n{}",
        since.elapsed(),
        lease.server(),
        fleet.status()
    );
    let standby: bool = lease
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(standby, "{what}: {} is a standby", lease.server());
    if let Some(table) = table {
        let n: i64 = lease
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .get(0);
        assert!(
            n >= 1,
            "{what}: the replica serving eventual reads has the first row"
        );
    }
    Ok(())
}

async fn write(fleet: &Fleet, table: &str, id: i32) -> anyhow::Result<Token> {
    let mut w = fleet.lease(Intent::Write).await?;
    w.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&id])
        .await?;
    Ok(w.commit_token().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_primary_keeps_replicas_fresh() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let tables = format!("{}[consistency]\nmax_lag = \"1s\"\n", common::FAST);
    let fleet = common::start(common::config(cluster, &tables, |_| {})).await;
    let table = common::table("idle_lag");
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4 PRIMARY KEY)"))
        .await?;
    drop(w);
    let token = write(&fleet, &table, 1).await?;

    // Both replicas have replayed the write and the fleet knows it.
    let f = fleet.clone();
    common::wait_for(
        "replicas replayed the write, lag ~0",
        Duration::from_secs(20),
        || {
            let s = f.status();
            async move {
                ["replica1", "replica2"].iter().all(|n| {
                    s.server(n).is_some_and(|r| {
                        r.lsn.is_some_and(|l| l >= token.lsn())
                            && r.lag.is_some_and(|l| l <= MAX_LAG_SHOWN)
                    })
                })
            }
        },
    )
    .await;

    // Idle for 3 s: the lag stays ~0 and eventual reads keep landing on replicas.
    let idle_from = fleet.status().server("primary").and_then(|p| p.lsn);
    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < Duration::from_secs(3) {
        check(&fleet, Some(&table), "primary idle", start).await?;
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_to = fleet.status().server("primary").and_then(|p| p.lsn);
    println!(
        "idle: {checks} checks, primary {idle_from:?} -> {idle_to:?}\n{}",
        fleet.status()
    );

    // The first write after the idle spell. replica1 takes ~100 ms to replay it (a read
    // there holds a lock the write's replay must wait for, as ordinary standby queries do):
    // it is that much behind, not the 3 s the primary was idle.
    let blocker = cluster.app_client(cluster.replica(0)).await?;
    blocker
        .batch_execute(&format!("BEGIN; SELECT count(*) FROM {table}"))
        .await?;
    let t = Instant::now();
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; INSERT INTO {table} VALUES (2); COMMIT"))
        .await?;
    let token = w.commit_token().await?;
    drop(w);
    let release = tokio::spawn(async move {
        // How long replica1's replay is held up: the fault, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(100)).await;
        blocker.batch_execute("COMMIT").await
    });
    let (mut checks, mut seen_behind, mut max_lag) = (0, 0, Duration::ZERO);
    while t.elapsed() < Duration::from_secs(1) {
        let s = fleet.status();
        let r1 = s.server("replica1").expect("replica1");
        if r1.lsn.is_some_and(|l| l < token.lsn()) {
            // The fleet knows replica1 has not replayed the write yet.
            seen_behind += 1;
            max_lag = max_lag.max(r1.lag.unwrap_or_default());
        }
        // No query on the table here: on replica1 it would queue behind the held-up replay.
        check(&fleet, None, "first write after idle", t).await?;
        checks += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    release.await??;
    println!(
        "after the write: {checks} checks, {seen_behind} with replica1 known behind (largest lag shown {max_lag:?})\n{}",
        fleet.status()
    );
    assert!(
        seen_behind > 0,
        "replica1 was never seen behind the write: the scenario did not happen"
    );

    // And the write reaches the replicas' readers.
    let f = fleet.clone();
    let table2 = table.clone();
    common::wait_for(
        "a replica serves the second row",
        Duration::from_secs(10),
        || {
            let (f, table) = (f.clone(), table2.clone());
            async move {
                let lease = f.lease(Intent::read_after(&token)).await.expect("lease");
                let n: i64 = lease
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await
                    .expect("count")
                    .get(0);
                assert_eq!(
                    n,
                    2,
                    "a read after the token sees the write (on {})",
                    lease.server()
                );
                lease.role() == Role::Replica
            }
        },
    )
    .await;
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(w);
    fleet.shutdown().await;
    Ok(())
}

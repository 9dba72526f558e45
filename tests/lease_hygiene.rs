//! Lease hygiene (DESIGN §3): a read that falls back to the primary cannot write there
//! (and the refusal re-probes the server);
//! a connection released inside an open or failed transaction is never handed to the
//! next lease with that transaction still open; a lease derefs mutably, so
//! `transaction()` works; a session lease released on a broken connection (no upper
//! bound of what it saw) settles to the primary's position, not to less.

mod common;

use std::time::Duration;

use pgfleet::{Consistency, Error, Intent, Role};
use pgfleet_testkit::tokio_postgres::SimpleQueryMessage;
use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_fallback_to_primary_is_read_only() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::start(common::config(cluster, common::FAST, |c| {
        c.replicas.clear()
    }))
    .await;
    let table = common::table("hyg_ro");
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4)"))
        .await?;
    drop(w);

    let r = fleet.lease(Intent::read()).await?;
    assert!(r.is_fallback(), "no replicas: a read falls back");
    assert_eq!((r.role(), r.server()), (Role::Primary, "primary"));
    let probes_before = fleet.status().wait_probes;
    let err = r
        .execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
        .await
        .expect_err("a write under a read lease fails on the primary too");
    let err = r.error(err);
    assert!(
        matches!(&err, Error::ReadOnly { server, .. } if server == "primary"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // The connection is still usable for reads, and nothing was written.
    let n: i64 = r
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    drop(r);
    // A refusal with SQLSTATE 25006 may mean the server's role changed: releasing the
    // lease asks for an immediate probe of it.
    common::wait_for(
        "a re-probe after the read-only refusal",
        Duration::from_secs(5),
        || async { fleet.status().wait_probes > probes_before },
    )
    .await;

    let w = fleet.lease(Intent::Write).await?;
    assert!(!w.is_fallback());
    assert_eq!(
        w.execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
            .await?,
        1
    );
    drop(w);
    let r = fleet.lease(Intent::read()).await?;
    assert!(r.is_fallback());
    let n: i64 = r
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(
        n, 1,
        "the write lease's insert is visible to the fallback read"
    );
    drop(r);
    let status = fleet.status();
    assert!(
        status.server("primary").expect("primary").fallbacks >= 2,
        "{status}"
    );
    fleet
        .lease(Intent::Write)
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    fleet.shutdown().await;
    Ok(())
}

/// The (only) write connection is clean: no transaction open, no rows from the
/// abandoned one. Returns its backend pid.
async fn assert_clean(fleet: &pgfleet::Fleet, table: &str, what: &str) -> anyhow::Result<i32> {
    let mut w = fleet.lease(Intent::Write).await?;
    // Simple protocol: one implicit transaction per statement, so outside a transaction
    // block now() (transaction start) equals statement_timestamp(); inside one it does not.
    let msgs = w
        .simple_query(&format!(
            "SELECT pg_backend_pid(), now() = statement_timestamp(), \
             pg_current_xact_id_if_assigned() IS NULL, (SELECT count(*) FROM {table})"
        ))
        .await
        .map_err(|e| anyhow::anyhow!("{what}: the next lease cannot even query: {e}"))?;
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    let pid: i32 = row.get(0).expect("pid").parse()?;
    assert_eq!(
        row.get(1),
        Some("t"),
        "{what}: the next lease runs inside the old transaction"
    );
    assert_eq!(
        row.get(2),
        Some("t"),
        "{what}: the next lease inherited a transaction id"
    );
    assert_eq!(
        row.get(3),
        Some("0"),
        "{what}: the abandoned insert is visible"
    );
    // It commits normally, and commit_token sees no open transaction.
    assert_eq!(
        w.execute(&format!("INSERT INTO {table} VALUES (100)"), &[])
            .await?,
        1
    );
    let token = w
        .commit_token()
        .await
        .map_err(|e| anyhow::anyhow!("{what}: commit_token: {e}"))?;
    drop(w);
    // The insert was committed: a read after its token sees it.
    let r = fleet.lease(Intent::read_after(&token)).await?;
    let ids: Vec<i32> = r
        .query(&format!("SELECT id FROM {table}"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [100], "{what}: read after the token on {}", r.server());
    drop(r);
    fleet
        .lease(Intent::Write)
        .await?
        .execute(&format!("DELETE FROM {table}"), &[])
        .await?;
    Ok(pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_released_inside_a_transaction_is_cleaned() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::start(common::config(cluster, common::FAST, |c| {
        c.primary.pool_size = 1
    }))
    .await;
    let table = common::table("hyg_tx");
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4)"))
        .await?;
    drop(w);
    let observer = cluster.superuser_client(cluster.primary()).await?;

    // Open transaction, dropped without COMMIT.
    let w = fleet.lease(Intent::Write).await?;
    let pid1: i32 = w.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    w.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await?;
    drop(w);
    let pid2 = assert_clean(&fleet, &table, "released inside BEGIN").await?;
    println!("open transaction: backend {pid1} then {pid2}");
    // Rolled back, not committed: nobody sees the row.
    let n: i64 = observer
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(n, 0);

    // Failed transaction block, dropped.
    let w = fleet.lease(Intent::Write).await?;
    let pid3: i32 = w.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let e = w
        .batch_execute(&format!(
            "BEGIN; INSERT INTO {table} VALUES (2); SELECT 1/0"
        ))
        .await
        .expect_err("division by zero");
    assert_eq!(
        e.code(),
        Some(&pgfleet_testkit::tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    drop(w);
    let pid4 = assert_clean(&fleet, &table, "released in a failed transaction").await?;
    println!("failed transaction: backend {pid3} then {pid4}");

    // The abandoned backends are not left idle in transaction on the server.
    for pid in [pid1, pid3] {
        let state: Option<String> = observer
            .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await?
            .and_then(|r| r.get(0));
        assert!(
            !state
                .as_deref()
                .is_some_and(|s| s.starts_with("idle in transaction")),
            "backend {pid} left {state:?}"
        );
    }
    fleet
        .lease(Intent::Write)
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_transactions_commit_and_roll_back() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let table = common::table("hyg_dm");
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4)"))
        .await?;
    let insert = w
        .prepare(&format!("INSERT INTO {table} VALUES ($1)"))
        .await?;

    let tx = w.transaction().await?;
    tx.execute(&insert, &[&1i32]).await?;
    tx.execute(&insert, &[&2i32]).await?;
    tx.commit().await?;

    let tx = w.transaction().await?;
    tx.execute(&insert, &[&3i32]).await?;
    tx.rollback().await?;

    {
        // Dropped without commit: rolled back.
        let tx = w.transaction().await?;
        tx.execute(&insert, &[&4i32]).await?;
    }
    let token = w.commit_token().await?;
    drop(w);

    let r = fleet.lease(Intent::read_after(&token)).await?;
    let rows = r
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await?;
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1, 2], "committed rows only (read on {})", r.server());
    drop(r);
    let r = fleet.lease(Intent::Write).await?;
    let ids: Vec<i32> = r
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2]);
    r.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(r);
    tokio::time::timeout(Duration::from_secs(10), fleet.shutdown()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_release_on_a_broken_connection_settles_to_the_primary() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let table = common::table("hyg_bound");

    let session = fleet.session();
    let read = session.lease(Intent::Read(Consistency::Eventual)).await?;
    let pid: i32 = read.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let node = cluster
        .nodes()
        .find(|n| n.name() == read.server())
        .expect("the lease's server is a cluster node");
    let su = cluster.superuser_client(node).await?;
    let terminated: bool = su
        // With a timeout: returns once the backend has exited.
        .query_one("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .await?
        .get(0);
    assert!(terminated, "backend {pid} on {} terminated", node.name());
    // Released on a dead connection: the release cannot read what the read saw.
    drop(read);

    // The cluster moves on (a write made elsewhere).
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4)"))
        .await?;
    let after = w.commit_token().await?;
    drop(w);

    // The settled token bounds what the read may have seen by the primary's position,
    // probed after the release: at or past every write acknowledged before.
    let settled = session
        .settled_token()
        .await
        .expect("a bound from a fresh primary probe");
    assert!(
        settled.lsn() >= after.lsn(),
        "settled at {settled}, behind the write at {after}"
    );
    // A request resuming from it reads that write.
    let (resumed, rejected) = fleet.session_from(settled);
    assert!(rejected.is_none(), "{rejected:?}");
    let r = resumed.lease(Intent::read()).await?;
    let n: i64 = r
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(n, 0, "the table exists on {}", r.server());
    drop(r);
    fleet.shutdown().await;
    Ok(())
}

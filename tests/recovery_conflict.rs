//! DESIGN §3 lease hygiene: a query on a standby cancelled by a recovery conflict is a
//! typed, retryable error (and a retry succeeds); `SERIALIZABLE` on a standby is a typed
//! error too. The replica cancels conflicting queries at once
//! (`max_standby_streaming_delay = 0`, `hot_standby_feedback = off`).

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Consistency, Error, Intent, Role};
use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_conflicts_and_serializable_on_a_standby_are_typed_errors() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder()
        .replicas(1)
        .replica_setting("max_standby_streaming_delay", "0")
        .replica_setting("hot_standby_feedback", "off")
        .start()
        .await?;
    let replica = cluster.replica(0);
    let fleet = common::fast_fleet(&cluster).await;
    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL); \
             INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 10) g",
        )
        .await?;
    }
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    let replica_su = cluster.superuser_client(replica).await?;

    // A long query on the replica holds a lock on t ...
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    assert_eq!(r.role(), Role::Replica, "served by {}", r.server());
    assert!(!r.is_fallback());
    let pid: i32 = r.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let started = Instant::now();
    let long = tokio::spawn(async move {
        let res = r.query("SELECT pg_sleep(20), count(*) FROM t", &[]).await;
        let classified = res.map(|rows| rows.len()).map_err(|e| {
            let code = e.code().map(|c| c.code().to_owned());
            let message = e.as_db_error().map(|d| d.message().to_owned());
            (r.error(e), code, message)
        });
        (classified, r.server().to_owned())
    });
    common::wait_for(
        "the long query to run on the replica",
        Duration::from_secs(10),
        || async {
            replica_su
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                 AND query LIKE '%pg_sleep%')",
                &[&pid],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0))
        },
    )
    .await;

    // ... that replaying an ACCESS EXCLUSIVE lock from the primary conflicts with.
    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; COMMIT")
            .await?;
    }
    let (outcome, server) = long.await?;
    let elapsed = started.elapsed();
    match outcome {
        Ok(_) => {
            panic!("the replica query was not cancelled by the recovery conflict (ran {elapsed:?})")
        }
        Err((err, code, message)) => {
            println!("after {elapsed:?}: {err} (SQLSTATE {code:?}: {message:?})");
            assert!(
                matches!(&err, Error::RecoveryConflict { server: s, .. } if *s == server),
                "expected Error::RecoveryConflict on {server}, got {err:?} (SQLSTATE {code:?}, message {message:?})"
            );
            assert!(err.is_retryable(), "a recovery conflict is retryable");
            assert!(
                elapsed < Duration::from_secs(15),
                "cancelled only after {elapsed:?}"
            );
        }
    }

    // Retrying works: the replica serves the same read once the lock is replayed.
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    assert_eq!(r.role(), Role::Replica, "served by {}", r.server());
    let n: i64 = r.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(n, 10);
    drop(r);

    // SERIALIZABLE on a standby.
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    assert_eq!(r.role(), Role::Replica, "served by {}", r.server());
    r.batch_execute("BEGIN").await?;
    let e = r
        .batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .expect_err("SERIALIZABLE must fail on a standby");
    let (code, message) = (
        e.code().map(|c| c.code().to_owned()),
        e.as_db_error().map(|d| d.message().to_owned()),
    );
    let err = r.error(e);
    println!("SERIALIZABLE: {err} (SQLSTATE {code:?}: {message:?})");
    assert!(
        matches!(&err, Error::SerializableOnStandby { server, .. } if server == "replica1"),
        "expected Error::SerializableOnStandby, got {err:?} (SQLSTATE {code:?}, message {message:?})"
    );
    assert!(
        !err.is_retryable(),
        "retrying SERIALIZABLE on a standby cannot succeed"
    );
    drop(r); // released inside a failed transaction: rolled back before reuse

    // The replica keeps serving reads afterwards.
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    let n: i64 = r.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(n, 10);
    drop(r);
    fleet.shutdown().await;
    Ok(())
}

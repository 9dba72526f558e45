//! `fallback = "error"`: reads no replica can serve fail with a typed error that says how
//! far behind the best replica is; `MaxStaleness` bounds the time lag; the wait list is
//! bounded (`max_waiters`).

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Consistency, Error, Intent, Role};
use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_fallback_staleness_bounds_and_waiter_limit() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let tables = format!(
        "{}\n[consistency]\nfallback = \"error\"\nryw_wait = \"1s\"\nmax_lag = \"60s\"",
        common::FAST.trim_end()
    );
    let config = common::config(&cluster, &tables, |c| c.fleet.max_waiters = 1);
    let fleet = common::start(config).await;
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute("CREATE TABLE f(k int PRIMARY KEY, v text)")
        .await?;
    drop(w);

    // Replay paused: a read after a new write cannot be served by the replica.
    cluster.pause_replay(cluster.replica(0)).await?;
    common::wait_for(
        "the fleet to see replay paused",
        Duration::from_secs(5),
        || {
            let s = fleet.status();
            async move { s.server("replica1").is_some_and(|r| r.paused) }
        },
    )
    .await;
    let mut w = fleet.lease(Intent::Write).await?;
    w.execute(
        "INSERT INTO f SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g",
        &[],
    )
    .await?;
    let token = w.commit_token().await?;
    drop(w);
    let started = Instant::now();
    let err = fleet
        .lease(Intent::read_after(&token))
        .await
        .expect_err("no replica has replayed the token and fallback is error");
    match &err {
        Error::NoFreshReplica { behind_bytes, .. } => {
            assert!(behind_bytes.is_some_and(|b| b > 100_000), "{err}");
        }
        other => panic!("expected NoFreshReplica, got {other:?}"),
    }
    assert!(err.is_retryable());
    // Paused replica: the error comes at once, not after ryw_wait.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // Time lag grows on the paused replica while the primary keeps writing.
    let writer = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let w = fleet.lease(Intent::Write).await?;
                w.execute("UPDATE f SET v = $1 WHERE k = 1", &[&format!("{i}")])
                    .await?;
                drop(w);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    common::wait_for(
        "replica1 to lag more than 300ms",
        Duration::from_secs(10),
        || {
            let s = fleet.status();
            async move {
                s.server("replica1")
                    .and_then(|r| r.lag)
                    .is_some_and(|l| l > Duration::from_millis(300))
            }
        },
    )
    .await;
    let err = fleet
        .lease(Intent::Read(Consistency::MaxStaleness(
            Duration::from_millis(200),
        )))
        .await
        .expect_err("the only replica is staler than 200ms");
    assert!(matches!(err, Error::NoFreshReplica { .. }), "{err:?}");
    let ok = fleet
        .lease(Intent::Read(Consistency::MaxStaleness(
            Duration::from_secs(50),
        )))
        .await?;
    assert_eq!(ok.role(), Role::Replica);
    drop(ok);
    writer.await??;

    // max_waiters = 1: with the replica behind by an apply delay (not paused), one read
    // waits at the router and the next is refused at once.
    cluster
        .set_apply_delay(cluster.replica(0), Duration::from_millis(800))
        .await?;
    cluster.resume_replay(cluster.replica(0)).await?;
    common::wait_for(
        "the fleet to see the replica streaming",
        Duration::from_secs(5),
        || {
            let s = fleet.status();
            async move {
                s.server("replica1")
                    .is_some_and(|r| !r.paused && r.streaming)
            }
        },
    )
    .await;
    // On a loaded machine the replica may have replayed a write before its read is
    // asked for (then that read does not wait), or the router may still expect the
    // replica to need longer than ryw_wait (then it refuses at once): the round is tried
    // again once the replica has caught up.
    let mut refused_second = false;
    for round in 0..5 {
        common::wait_for(
            "replica1 to catch up under the apply delay",
            Duration::from_secs(15),
            || {
                let s = fleet.status();
                async move {
                    s.server("replica1").is_some_and(|r| {
                        r.lag_bytes == Some(0)
                            && r.lag.is_some_and(|l| l < Duration::from_millis(900))
                    })
                }
            },
        )
        .await;
        let mut w = fleet.lease(Intent::Write).await?;
        w.execute(
            "UPDATE f SET v = $1 WHERE k = 2",
            &[&format!("last{round}")],
        )
        .await?;
        let token = w.commit_token().await?;
        drop(w);
        let waited_before = fleet.status().ryw_waited;
        let first = {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                fleet
                    .lease(Intent::read_after(&token))
                    .await
                    .map(|l| l.server().to_string())
            })
        };
        common::wait_for(
            "the first read to wait or be answered",
            Duration::from_secs(5),
            || {
                let waited = fleet.status().ryw_waited > waited_before;
                let done = first.is_finished();
                async move { waited || done }
            },
        )
        .await;
        if !first.is_finished() {
            let second = fleet.lease(Intent::read_after(&token)).await;
            assert!(
                matches!(second, Err(Error::TooManyWaiters { waiting: 1 })),
                "{second:?}"
            );
            refused_second = true;
        }
        // The first is served by the replica once it catches up, or refused with a typed error.
        match first.await? {
            Ok(server) => assert_eq!(server, "replica1"),
            Err(e) => assert!(matches!(e, Error::NoFreshReplica { .. }), "{e:?}"),
        }
        if refused_second {
            break;
        }
    }
    assert!(refused_second, "no read waited in 5 rounds");
    cluster
        .set_apply_delay(cluster.replica(0), Duration::ZERO)
        .await?;
    fleet.shutdown().await;
    Ok(())
}

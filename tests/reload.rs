//! `fleet.reload(config)`: new weights, pool sizes, thresholds and added or removed
//! replicas without a restart; servers whose settings did not change keep their open
//! connections; an invalid configuration is rejected whole with the old one in force.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use pgfleet::{Config, Consistency, Error, Fleet, Intent, Lease};
use pgfleet_testkit::LocalCluster;

/// The backend pid of the connection under `lease`.
async fn pid(lease: &Lease) -> anyhow::Result<i32> {
    Ok(lease
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0))
}

/// `cluster`'s config with replica1 only (pool of one, so its connection is identifiable)
/// or with both replicas.
fn config(cluster: &LocalCluster, both: bool, replica1_pool: usize, weight1: u32) -> Config {
    common::config(cluster, common::FAST, |c| {
        if !both {
            c.replicas.truncate(1);
        }
        c.replicas[0].pool_size = replica1_pool;
        c.replicas[0].weight = weight1;
        c.primary.pool_size = 1;
    })
}

/// The servers that served `n` eventual reads.
async fn servers_of_reads(fleet: &Fleet, n: usize) -> anyhow::Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        seen.insert(l.server().to_owned());
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_changes_and_keeps_unchanged_connections() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::start(config(cluster, false, 1, 1)).await;
    let session = fleet.session();

    let replica_pid = pid(&fleet.lease(Intent::Read(Consistency::Eventual)).await?).await?;
    let primary_pid = pid(&fleet.lease(Intent::Write).await?).await?;
    assert_eq!(
        servers_of_reads(&fleet, 20).await?,
        BTreeSet::from(["replica1".to_owned()])
    );

    // Add replica2, grow replica1's pool and change a threshold.
    let mut next = config(cluster, true, 2, 3);
    next.fleet.failure_threshold = 5;
    let report = fleet.reload(next).await?;
    assert_eq!(report.kept, vec!["primary", "replica1"]);
    assert_eq!(report.resized, vec!["replica1"]);
    assert_eq!(report.added, vec!["replica2"]);
    assert!(
        report.removed.is_empty() && report.replaced.is_empty(),
        "{report:?}"
    );

    // Unchanged servers kept their connections.
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    if r.server() == "replica1" {
        assert_eq!(
            pid(&r).await?,
            replica_pid,
            "replica1's connection was kept"
        );
    }
    drop(r);
    assert_eq!(pid(&fleet.lease(Intent::Write).await?).await?, primary_pid);
    // The new replica joins rotation after its first probe.
    common::wait_for("replica2 in rotation", Duration::from_secs(10), || async {
        servers_of_reads(&fleet, 20)
            .await
            .is_ok_and(|s| s.contains("replica2"))
    })
    .await;
    assert_eq!(fleet.status().servers.len(), 3);
    // A session from before the reload keeps working.
    drop(session.lease(Intent::Write).await?);
    drop(session.lease(Intent::read()).await?);

    // An invalid configuration is rejected whole; the old one stays in force.
    let mut bad = config(cluster, false, 1, 1);
    bad.fleet.lease_timeout = Duration::ZERO;
    match fleet.reload(bad).await {
        Err(Error::Config(e)) => assert_eq!(e.key(), Some("fleet.lease_timeout")),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(fleet.status().servers.len(), 3);
    // So is one that adds a cluster.
    let mut more = config(cluster, true, 2, 3);
    more.clusters.insert(
        "tenant".into(),
        pgfleet::ClusterConfig::new(more.primary.clone()),
    );
    assert!(matches!(fleet.reload(more).await, Err(Error::Config(_))));

    // Remove replica2 again: it leaves rotation at once.
    let report = fleet.reload(config(cluster, false, 2, 1)).await?;
    assert_eq!(report.removed, vec!["replica2"]);
    assert_eq!(fleet.status().servers.len(), 2);
    assert_eq!(
        servers_of_reads(&fleet, 20).await?,
        BTreeSet::from(["replica1".to_owned()])
    );

    // A changed URL (another port, here the server's own instead of its proxy) means
    // new connections.
    let mut moved = config(cluster, false, 2, 1);
    moved.replicas[0].url = cluster.replica(0).direct_url().parse()?;
    let report = fleet.reload(moved).await?;
    assert_eq!(report.replaced, vec!["replica1"]);
    common::wait_for(
        "replica1 back in rotation",
        Duration::from_secs(10),
        || async {
            servers_of_reads(&fleet, 5)
                .await
                .is_ok_and(|s| s.contains("replica1"))
        },
    )
    .await;
    let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
    if r.server() == "replica1" {
        assert_ne!(
            pid(&r).await?,
            replica_pid,
            "a new URL opens new connections"
        );
    }
    drop(r);

    assert_eq!(fleet.shutdown().await, 0);
    Ok(())
}

/// A lease waiting when a reload switches generations carries on in the new one: here a
/// write waits for a primary the old configuration cannot reach (wrong port), and the
/// reload that fixes the URL lets it through well before its `lease_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_waiting_during_a_reload_carries_on_in_the_new_generation() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let lease_timeout = Duration::from_secs(15);
    let good = common::config(cluster, common::FAST, |c| {
        c.fleet.lease_timeout = lease_timeout;
    });
    let url = cluster.primary().url();
    let port = format!(":{}/", cluster.primary().proxy_port());
    anyhow::ensure!(url.contains(&port), "{url} has {port}");
    let mut bad = good.clone();
    bad.primary.url = url.replace(&port, ":1/").parse()?;
    let fleet = Fleet::start(bad).await?;

    let waiting = tokio::spawn({
        let fleet = fleet.clone();
        async move {
            let started = std::time::Instant::now();
            let r = fleet.lease(Intent::Write).await;
            (r.map(|l| l.server().to_owned()), started.elapsed())
        }
    });
    // The primary's probe has failed: the write cannot have been granted; it waits.
    common::wait_for(
        "the primary's probe to fail",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("primary")
                .is_some_and(|s| s.last_error.is_some())
        },
    )
    .await;
    assert!(!waiting.is_finished(), "the write did not wait");

    let report = fleet.reload(good).await?;
    assert_eq!(report.replaced, vec!["primary".to_owned()], "{report:?}");
    let (r, took) = tokio::time::timeout(lease_timeout + Duration::from_secs(5), waiting).await??;
    assert_eq!(r?, "primary", "the waiting write, after {took:?}");
    assert!(
        took < lease_timeout,
        "granted after {took:?}: it waited out its lease_timeout in the old generation"
    );
    println!("a write waiting across the reload was granted after {took:?}");
    fleet.shutdown().await;
    Ok(())
}

/// A server's restart timer that fires after a reload removed that server starts
/// nothing, and the supervisor keeps supervising: the timer carries the generation it
/// was set for (it used to index the new, shorter server list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_timer_from_before_a_reload_is_ignored() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let min_backoff = Duration::from_millis(800);
    let with_backoff = |both: bool| {
        let mut c = config(cluster, both, 1, 1);
        c.fleet.restart.min_backoff = min_backoff;
        c
    };
    let fleet = common::start(with_backoff(true)).await;
    assert!(
        fleet.debug_fail_server("replica2"),
        "the hook reached replica2"
    );
    common::wait_for(
        "replica2 to be restarting",
        Duration::from_secs(5),
        || async {
            fleet
                .status()
                .server("replica2")
                .is_some_and(|s| s.health == pgfleet::Health::Restarting)
        },
    )
    .await;
    // replica2 (the last server) goes away while its restart timer runs.
    let report = fleet.reload(with_backoff(false)).await?;
    assert_eq!(report.removed, vec!["replica2".to_owned()], "{report:?}");
    // The timer (at most min_backoff) fires in the new generation and starts nothing.
    common::wait_for(
        "replica2's restart timer to fire and be ignored",
        min_backoff + Duration::from_secs(5),
        || async { fleet.debug_stale_restarts() >= 1 },
    )
    .await;

    // The supervisor is alive and supervising: a failed router is replaced.
    let old = fleet.router().await?.get_id();
    assert!(fleet.debug_fail_router());
    let f = fleet.clone();
    common::wait_for("a new router", Duration::from_secs(5), || {
        let f = f.clone();
        async move { f.router().await.is_ok_and(|r| r.get_id() != old) }
    })
    .await;
    let status = fleet.status();
    assert!(status.server("replica2").is_none(), "{status}");
    let w = fleet.lease(Intent::Write).await?;
    assert_eq!(w.server(), "primary");
    drop(w);
    assert_eq!(
        servers_of_reads(&fleet, 10).await?,
        BTreeSet::from(["replica1".to_owned()])
    );
    fleet.shutdown().await;
    Ok(())
}

/// A reload whose caller stops waiting (a timeout around it) still completes: the
/// handles and the supervisor agree on the new generation, and its servers are
/// supervised (a failed one is restarted). On one thread, so nothing of the reload can
/// run between its first poll and the drop.
#[tokio::test(flavor = "current_thread")]
async fn a_reload_whose_caller_gives_up_still_completes() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::start(config(cluster, true, 1, 1)).await;
    // Polled once, then dropped at its first wait.
    {
        let mut reload = std::pin::pin!(fleet.reload(config(cluster, false, 1, 1)));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(reload.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "the reload finished in one poll: {first:?}"
        );
    }
    common::wait_for(
        "the reload to take effect",
        Duration::from_secs(10),
        || async { fleet.status().server("replica2").is_none() },
    )
    .await;
    common::wait_for("replica1 serving", Duration::from_secs(10), || async {
        servers_of_reads(&fleet, 5)
            .await
            .is_ok_and(|s| s == BTreeSet::from(["replica1".to_owned()]))
    })
    .await;
    assert!(
        fleet.debug_fail_server("replica1"),
        "the hook reached replica1"
    );
    common::wait_for("replica1 restarted", Duration::from_secs(10), || async {
        fleet
            .status()
            .server("replica1")
            .is_some_and(|s| s.restarts >= 1 && s.health == pgfleet::Health::Healthy)
    })
    .await;
    fleet.shutdown().await;
    Ok(())
}

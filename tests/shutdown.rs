//! `Fleet::shutdown`: stops taking leases at once, waits at most `shutdown_timeout` for
//! outstanding leases, says how many were still out, and closes the fleet's connections.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Error, Fleet, Intent, ServerUrl};
use pgfleet_testkit::LocalCluster;

/// A fleet whose connections carry `application_name = app` (to count them on the server).
async fn tagged_fleet(
    cluster: &LocalCluster,
    app: &str,
    shutdown_timeout: Duration,
) -> anyhow::Result<Fleet> {
    Ok(common::start(tagged_config(cluster, app, shutdown_timeout)?).await)
}

/// The config of [`tagged_fleet`].
fn tagged_config(
    cluster: &LocalCluster,
    app: &str,
    shutdown_timeout: Duration,
) -> anyhow::Result<pgfleet::Config> {
    let mut err = None;
    let config = common::config(cluster, common::FAST, |c| {
        c.fleet.shutdown_timeout = shutdown_timeout;
        let tag = |url: String| ServerUrl::parse(&format!("{url}?application_name={app}"));
        match tag(cluster.primary().url()) {
            Ok(u) => c.primary.url = u,
            Err(e) => err = Some(e),
        }
        for (r, node) in c.replicas.iter_mut().zip(cluster.replicas()) {
            match tag(node.url()) {
                Ok(u) => r.url = u,
                Err(e) => err = Some(e),
            }
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    Ok(config)
}

/// Backends on all nodes with this application_name.
async fn backends(cluster: &LocalCluster, app: &str) -> anyhow::Result<i64> {
    let mut n = 0;
    for node in cluster.nodes() {
        let c = cluster.superuser_client(node).await?;
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await?;
        n += row.get::<_, i64>(0);
    }
    Ok(n)
}

fn is_shutting_down<T: std::fmt::Debug>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::ShuttingDown))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_leases_out_gives_up_after_its_timeout() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let app = common::table("shutdown_busy");
    let fleet = tagged_fleet(cluster, &app, Duration::from_secs(1)).await?;

    let w = fleet.lease(Intent::Write).await?;
    let r1 = fleet.lease(Intent::read()).await?;
    let r2 = fleet.lease(Intent::read()).await?;
    for l in [&w, &r1, &r2] {
        let one: i32 = l.query_one("SELECT 1", &[]).await?.get(0);
        assert_eq!(one, 1);
    }
    assert!(
        backends(cluster, &app).await? >= 3,
        "the fleet's connections are visible on the servers"
    );

    let f = fleet.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let left = f.shutdown().await;
        (left, started.elapsed())
    });
    // New leases are refused while it waits for the three outstanding ones.
    let f = fleet.clone();
    common::wait_for(
        "leases refused once shutdown began",
        Duration::from_secs(1),
        || {
            let f = f.clone();
            async move { is_shutting_down(&f.lease(Intent::Write).await) }
        },
    )
    .await;
    let (left, took) = tokio::time::timeout(Duration::from_secs(10), task).await??;
    println!("shutdown with 3 leases out: {left} left, took {took:?}");
    assert_eq!(left, 3, "three leases were still out");
    assert!(
        took >= Duration::from_millis(900),
        "it waited for them ({took:?})"
    );
    assert!(
        took <= Duration::from_secs(2),
        "it gave up after shutdown_timeout = 1s (+1s slack), took {took:?}"
    );

    assert!(is_shutting_down(&fleet.lease(Intent::Write).await));
    assert!(is_shutting_down(&fleet.lease(Intent::read()).await));
    assert!(is_shutting_down(
        &fleet.session().lease(Intent::read()).await
    ));
    assert!(matches!(fleet.router().await, Err(Error::ShuttingDown)));

    // Returning the old leases afterwards is harmless.
    drop(w);
    drop(r1);
    drop(r2);
    assert_eq!(
        fleet.status().servers.iter().map(|s| s.in_use).sum::<u64>(),
        0
    );
    // And every connection of the fleet (pools, probes, the returned leases) is closed.
    common::wait_for(
        "the fleet's backends to disappear",
        Duration::from_secs(10),
        || {
            let app = app.clone();
            async move { backends(cluster, &app).await.expect("count backends") == 0 }
        },
    )
    .await;
    // A second shutdown is a no-op.
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), fleet.shutdown()).await?,
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_is_quick() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let app = common::table("shutdown_idle");
    let fleet = tagged_fleet(cluster, &app, Duration::from_secs(5)).await?;
    let r = fleet.lease(Intent::read()).await?;
    let one: i32 = r.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    drop(r);
    let router = fleet.router().await?;

    let started = Instant::now();
    let left = fleet.shutdown().await;
    let took = started.elapsed();
    println!("idle shutdown: {left} left, took {took:?}");
    assert_eq!(left, 0);
    assert!(
        took < Duration::from_secs(2),
        "nothing to wait for, took {took:?} (shutdown_timeout is 5s)"
    );
    assert!(matches!(fleet.router().await, Err(Error::ShuttingDown)));
    assert!(is_shutting_down(&fleet.lease(Intent::Write).await));
    // The router actor itself is gone: a message to it fails instead of hanging.
    let call = tokio::time::timeout(Duration::from_secs(2), async {
        pgfleet::ractor::call!(router, pgfleet::RouterMsg::Lease, Intent::Write)
    })
    .await?;
    assert!(
        !matches!(call, Ok(Ok(_))),
        "a stopped router grants no lease"
    );
    common::wait_for(
        "the fleet's backends to disappear",
        Duration::from_secs(10),
        || {
            let app = app.clone();
            async move { backends(cluster, &app).await.expect("count backends") == 0 }
        },
    )
    .await;
    Ok(())
}

/// A lease granted before a reload counts in the generation it came from: shutdown
/// still waits for it and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_leases_granted_before_a_reload() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let app = common::table("shutdown_reload");
    let fleet = tagged_fleet(cluster, &app, Duration::from_millis(500)).await?;
    let held = fleet.lease(Intent::Write).await?;
    let mut next = tagged_config(cluster, &app, Duration::from_millis(500))?;
    next.replicas.clear();
    let report = fleet.reload(next).await?;
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert_eq!(
        fleet.status().server("primary").map(|s| s.in_use),
        Some(1),
        "the status counts it"
    );
    let left = fleet.shutdown().await;
    assert_eq!(left, 1, "the lease held across the reload is still out");
    drop(held);
    Ok(())
}

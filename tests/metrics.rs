//! The `metrics` feature: a fleet on a real cluster records the documented metrics
//! (leases by server/intent/outcome, errors, read-your-writes waits, probes, lag, pools,
//! restarts) through whatever recorder the application installed.
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use pgfleet::{Consistency, Intent, Token};
use pgfleet_testkit::LocalCluster;

/// A recorder that keeps every value in memory, keyed `name{label=value,...}` with the
/// labels sorted.
#[derive(Debug, Default)]
struct Memory {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<String, Arc<Samples>>>,
}

#[derive(Debug, Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().expect("samples").push(value);
    }
}

fn key_text(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

fn entry<T: Default>(map: &Mutex<BTreeMap<String, Arc<T>>>, key: &Key) -> Arc<T> {
    map.lock()
        .expect("metrics map")
        .entry(key_text(key))
        .or_default()
        .clone()
}

#[derive(Debug, Clone, Copy)]
struct Installed(&'static Memory);

impl Recorder for Installed {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(entry(&self.0.counters, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(entry(&self.0.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(entry(&self.0.histograms, key))
    }
}

fn memory() -> &'static Memory {
    static M: OnceLock<&'static Memory> = OnceLock::new();
    M.get_or_init(|| {
        let m: &'static Memory = Box::leak(Box::default());
        metrics::set_global_recorder(Installed(m)).expect("first recorder");
        m
    })
}

impl Memory {
    fn counter(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .expect("counters")
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn gauge(&self, key: &str) -> Option<f64> {
        self.gauges
            .lock()
            .expect("gauges")
            .get(key)
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)))
    }

    fn samples(&self, key: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .expect("histograms")
            .get(key)
            .map(|h| h.0.lock().expect("samples").clone())
            .unwrap_or_default()
    }

    fn names(&self) -> Vec<String> {
        let c = self.counters.lock().expect("counters");
        let g = self.gauges.lock().expect("gauges");
        let h = self.histograms.lock().expect("histograms");
        c.keys().chain(g.keys()).chain(h.keys()).cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_records_the_documented_metrics() -> anyhow::Result<()> {
    common::trace();
    let m = memory();
    let cluster = LocalCluster::shared().await?;
    let tables = format!("{}\n[consistency]\nryw_wait = \"100ms\"\n", common::FAST);
    let fleet = common::start(common::config(cluster, &tables, |_| {})).await;
    let t = common::table("metrics");

    // Leases of every intent, each counted on the server that granted it.
    let before = m.counter(
        "pgfleet_leases_total{cluster=default,intent=write,outcome=granted,server=primary}",
    );
    let token = {
        let mut w = fleet.lease(Intent::Write).await?;
        w.batch_execute(&format!(
            "CREATE TABLE {t} (v int); INSERT INTO {t} VALUES (1)"
        ))
        .await?;
        w.commit_token().await?
    };
    assert_eq!(
        m.counter(
            "pgfleet_leases_total{cluster=default,intent=write,outcome=granted,server=primary}"
        ),
        before + 1
    );
    let strong = m.counter(
        "pgfleet_leases_total{cluster=default,intent=strong,outcome=granted,server=primary}",
    );
    drop(fleet.lease(Intent::Read(Consistency::Strong)).await?);
    assert_eq!(
        m.counter(
            "pgfleet_leases_total{cluster=default,intent=strong,outcome=granted,server=primary}"
        ),
        strong + 1
    );
    let eventual = |m: &Memory| {
        ["replica1", "replica2"]
            .iter()
            .map(|s| {
                m.counter(&format!(
                    "pgfleet_leases_total{{cluster=default,intent=eventual,outcome=granted,server={s}}}"
                ))
            })
            .sum::<u64>()
    };
    let e0 = eventual(m);
    for _ in 0..4 {
        drop(fleet.lease(Intent::read()).await?);
    }
    assert_eq!(
        eventual(m),
        e0 + 4,
        "eventual reads counted on the replicas"
    );

    // A refused lease is counted by intent and error kind.
    let bad = Token::new(token.system_id(), token.timeline() + 7, token.lsn());
    let refused = m.counter("pgfleet_lease_errors_total{cluster=default,error=Token,intent=ryw}");
    assert!(fleet.lease(Intent::read_after(&bad)).await.is_err());
    assert_eq!(
        m.counter("pgfleet_lease_errors_total{cluster=default,error=Token,intent=ryw}"),
        refused + 1
    );

    // Probes: counted, timed; lag and health published per server.
    common::wait_for("probe metrics", Duration::from_secs(10), || async {
        m.counter("pgfleet_probes_total{cluster=default,outcome=ok,server=replica1}") > 2
            && m.gauge("pgfleet_replica_lag_bytes{cluster=default,server=replica1}")
                .is_some_and(f64::is_finite)
    })
    .await;
    let probe_times = m.samples("pgfleet_probe_duration_seconds{cluster=default,server=primary}");
    assert!(!probe_times.is_empty());
    assert!(
        probe_times.iter().all(|s| *s >= 0.0 && *s < 5.0),
        "{probe_times:?}"
    );
    assert_eq!(
        m.gauge("pgfleet_server_healthy{cluster=default,server=replica2}"),
        Some(1.0)
    );
    assert_eq!(
        m.gauge("pgfleet_server_is_primary{cluster=default,server=primary}"),
        Some(1.0)
    );
    assert_eq!(
        m.gauge("pgfleet_server_is_primary{cluster=default,server=replica1}"),
        Some(0.0)
    );
    assert!(m
        .gauge("pgfleet_replica_lag_seconds{cluster=default,server=replica2}")
        .is_some_and(|s| s.is_finite() && s >= 0.0));
    // Pool gauges are refreshed with each probe; the write lease above opened a connection.
    common::wait_for("pool gauges", Duration::from_secs(10), || async {
        m.gauge("pgfleet_pool_connections{cluster=default,pool=write,server=primary,state=idle}")
            .is_some_and(|v| v >= 1.0)
    })
    .await;

    // A read-your-writes read no replica can serve (replay paused): one wait, answered
    // by the primary, timed.
    for r in cluster.replicas() {
        cluster.pause_replay(r).await?;
    }
    let result = async {
        common::wait_for("replicas seen paused", Duration::from_secs(10), || async {
            let s = fleet.status();
            ["replica1", "replica2"]
                .iter()
                .all(|n| s.server(n).is_some_and(|x| x.paused))
        })
        .await;
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.execute(&format!("UPDATE {t} SET v = v + 1"), &[]).await?;
            w.commit_token().await?
        };
        let waits = m.counter("pgfleet_ryw_waits_total{cluster=default,outcome=primary}");
        let fallbacks = m.counter(
            "pgfleet_leases_total{cluster=default,intent=ryw,outcome=fallback,server=primary}",
        );
        let r = fleet.lease(Intent::read_after(&token)).await?;
        assert!(r.is_fallback());
        drop(r);
        assert_eq!(
            m.counter("pgfleet_ryw_waits_total{cluster=default,outcome=primary}"),
            waits + 1
        );
        assert_eq!(
            m.counter(
                "pgfleet_leases_total{cluster=default,intent=ryw,outcome=fallback,server=primary}"
            ),
            fallbacks + 1
        );
        assert!(!m
            .samples("pgfleet_ryw_wait_seconds{cluster=default,outcome=primary}")
            .is_empty());
        anyhow::Ok(())
    }
    .await;
    for r in cluster.replicas() {
        cluster.resume_replay(r).await?;
    }
    result?;

    // Restarts of a server actor and of the router.
    let restarts = m.counter("pgfleet_server_restarts_total{cluster=default,server=replica2}");
    assert!(fleet.debug_fail_server("replica2"));
    common::wait_for(
        "server restart counted",
        Duration::from_secs(10),
        || async {
            m.counter("pgfleet_server_restarts_total{cluster=default,server=replica2}") > restarts
        },
    )
    .await;
    let routers = m.counter("pgfleet_actor_restarts_total{actor=router,cluster=default}");
    assert!(fleet.debug_fail_router());
    common::wait_for(
        "router restart counted",
        Duration::from_secs(10),
        || async {
            m.counter("pgfleet_actor_restarts_total{actor=router,cluster=default}") > routers
        },
    )
    .await;

    // Every name the fleet registered is one the README documents.
    let readme = include_str!("../README.md");
    for key in m.names() {
        let name = key.split('{').next().unwrap_or_default();
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not in the README"
        );
    }

    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute(&format!("DROP TABLE {t}")).await?;
    }
    fleet.shutdown().await;
    Ok(())
}

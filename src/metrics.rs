//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! The application installs the exporter it likes (Prometheus, StatsD, ...); pgfleet only
//! records. Without the feature every item here is an empty inline function or a
//! zero-sized handle, so the lease path pays nothing.
//!
//! Per-server handles are registered once, when the fleet starts, and kept in the
//! server's slot: recording on the lease path is an atomic add on a handle, not a
//! registry lookup. Rare events (errors, restarts, read-your-writes waits) record
//! through the macros. Every name and label is listed in the README (Observability).

// Labels and gauge inputs are only read by the real recorder calls.
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

/// What a lease asked for, as the `intent` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntentLabel {
    /// `Intent::Write`.
    Write,
    /// A strong read (or a default read configured as strong).
    Strong,
    /// An eventual read (or a default read).
    Eventual,
    /// A read with a staleness bound.
    Bounded,
    /// A read-your-writes read (a token or a session mark).
    Ryw,
}

impl IntentLabel {
    const ALL: [IntentLabel; 5] = [
        IntentLabel::Write,
        IntentLabel::Strong,
        IntentLabel::Eventual,
        IntentLabel::Bounded,
        IntentLabel::Ryw,
    ];

    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            IntentLabel::Write => "write",
            IntentLabel::Strong => "strong",
            IntentLabel::Eventual => "eventual",
            IntentLabel::Bounded => "bounded",
            IntentLabel::Ryw => "ryw",
        }
    }
}

/// How a read-your-writes wait at the router ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitOutcome {
    /// A replica caught up and served the read.
    Replica,
    /// The read fell back to the primary.
    Primary,
    /// The read was refused (fallback `error`, too many waiters, timeout).
    Refused,
}

impl WaitOutcome {
    const fn as_str(self) -> &'static str {
        match self {
            WaitOutcome::Replica => "replica",
            WaitOutcome::Primary => "primary",
            WaitOutcome::Refused => "refused",
        }
    }
}

/// One server's pool occupancy, as gauges.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PoolGauges {
    /// Read pool: connections leased out.
    pub(crate) read_in_use: usize,
    /// Read pool: connections idle in the pool.
    pub(crate) read_idle: usize,
    /// Write pool: connections leased out.
    pub(crate) write_in_use: usize,
    /// Write pool: connections idle in the pool.
    pub(crate) write_idle: usize,
}

#[cfg(feature = "metrics")]
mod imp {
    use super::{IntentLabel, PoolGauges, WaitOutcome};
    use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
    use std::sync::Arc;
    use std::time::Duration;

    /// One server's registered handles.
    #[derive(Debug)]
    pub(crate) struct ServerMetrics {
        /// `pgfleet_leases_total` by intent (index of `IntentLabel::ALL`), then
        /// `[granted, fallback]`.
        leases: [[Counter; 2]; 5],
        probe_ok: Counter,
        probe_failed: Counter,
        probe_seconds: Histogram,
        lag_bytes: Gauge,
        lag_seconds: Gauge,
        healthy: Gauge,
        primary: Gauge,
        in_flight: Gauge,
        pool: [Gauge; 4],
        restarts: Counter,
    }

    impl ServerMetrics {
        pub(crate) fn new(cluster: &str, server: &Arc<str>) -> Self {
            let (c, s) = (cluster.to_string(), server.to_string());
            let lease = |intent: IntentLabel, outcome: &'static str| counter!("pgfleet_leases_total", "cluster" => c.clone(), "server" => s.clone(), "intent" => intent.as_str(), "outcome" => outcome);
            let leases = IntentLabel::ALL.map(|i| [lease(i, "granted"), lease(i, "fallback")]);
            let pool = |pool: &'static str, state: &'static str| gauge!("pgfleet_pool_connections", "cluster" => c.clone(), "server" => s.clone(), "pool" => pool, "state" => state);
            ServerMetrics {
                leases,
                probe_ok: counter!("pgfleet_probes_total", "cluster" => c.clone(), "server" => s.clone(), "outcome" => "ok"),
                probe_failed: counter!("pgfleet_probes_total", "cluster" => c.clone(), "server" => s.clone(), "outcome" => "error"),
                probe_seconds: histogram!("pgfleet_probe_duration_seconds", "cluster" => c.clone(), "server" => s.clone()),
                lag_bytes: gauge!("pgfleet_replica_lag_bytes", "cluster" => c.clone(), "server" => s.clone()),
                lag_seconds: gauge!("pgfleet_replica_lag_seconds", "cluster" => c.clone(), "server" => s.clone()),
                healthy: gauge!("pgfleet_server_healthy", "cluster" => c.clone(), "server" => s.clone()),
                primary: gauge!("pgfleet_server_is_primary", "cluster" => c.clone(), "server" => s.clone()),
                in_flight: gauge!("pgfleet_leases_in_flight", "cluster" => c.clone(), "server" => s.clone()),
                pool: [
                    pool("read", "in_use"),
                    pool("read", "idle"),
                    pool("write", "in_use"),
                    pool("write", "idle"),
                ],
                restarts: counter!("pgfleet_server_restarts_total", "cluster" => c, "server" => s),
            }
        }

        #[inline]
        pub(crate) fn lease(&self, intent: IntentLabel, fallback: bool) {
            self.leases[intent as usize][usize::from(fallback)].increment(1);
        }

        pub(crate) fn probe(&self, ok: bool, latency: Duration) {
            if ok {
                self.probe_ok.increment(1);
            } else {
                self.probe_failed.increment(1);
            }
            self.probe_seconds.record(latency.as_secs_f64());
        }

        pub(crate) fn view(
            &self,
            healthy: bool,
            primary: bool,
            lag_bytes: Option<u64>,
            lag: Option<Duration>,
        ) {
            self.healthy.set(f64::from(u8::from(healthy)));
            self.primary.set(f64::from(u8::from(primary)));
            // Unknown lag is reported as NaN: absent, not zero.
            self.lag_bytes.set(lag_bytes.map_or(f64::NAN, |b| b as f64));
            self.lag_seconds
                .set(lag.map_or(f64::NAN, |d| d.as_secs_f64()));
        }

        pub(crate) fn pools(&self, p: PoolGauges, in_flight: u64) {
            let v = [p.read_in_use, p.read_idle, p.write_in_use, p.write_idle];
            for (g, v) in self.pool.iter().zip(v) {
                g.set(v as f64);
            }
            self.in_flight.set(in_flight as f64);
        }

        pub(crate) fn restarted(&self) {
            self.restarts.increment(1);
        }
    }

    pub(crate) fn lease_error(cluster: &Arc<str>, intent: IntentLabel, kind: &'static str) {
        counter!("pgfleet_lease_errors_total", "cluster" => cluster.to_string(), "intent" => intent.as_str(), "error" => kind)
            .increment(1);
    }

    pub(crate) fn ryw_wait(cluster: &Arc<str>, outcome: WaitOutcome, waited: Duration) {
        counter!("pgfleet_ryw_waits_total", "cluster" => cluster.to_string(), "outcome" => outcome.as_str()).increment(1);
        histogram!("pgfleet_ryw_wait_seconds", "cluster" => cluster.to_string(), "outcome" => outcome.as_str())
            .record(waited.as_secs_f64());
    }

    pub(crate) fn actor_restarted(cluster: &Arc<str>, actor: &'static str) {
        counter!("pgfleet_actor_restarts_total", "cluster" => cluster.to_string(), "actor" => actor).increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod imp {
    use super::{IntentLabel, PoolGauges, WaitOutcome};
    use std::sync::Arc;
    use std::time::Duration;

    /// Zero-sized without the `metrics` feature.
    #[derive(Debug)]
    pub(crate) struct ServerMetrics;

    impl ServerMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &str, _: &Arc<str>) -> Self {
            ServerMetrics
        }
        #[inline(always)]
        pub(crate) fn lease(&self, _: IntentLabel, _: bool) {}
        #[inline(always)]
        pub(crate) fn probe(&self, _: bool, _: Duration) {}
        #[inline(always)]
        pub(crate) fn view(&self, _: bool, _: bool, _: Option<u64>, _: Option<Duration>) {}
        #[inline(always)]
        pub(crate) fn pools(&self, _: PoolGauges, _: u64) {}
        #[inline(always)]
        pub(crate) fn restarted(&self) {}
    }

    #[inline(always)]
    pub(crate) fn lease_error(_: &Arc<str>, _: IntentLabel, _: &'static str) {}
    #[inline(always)]
    pub(crate) fn ryw_wait(_: &Arc<str>, _: WaitOutcome, _: Duration) {}
    #[inline(always)]
    pub(crate) fn actor_restarted(_: &Arc<str>, _: &'static str) {}
}

pub(crate) use imp::{actor_restarted, lease_error, ryw_wait, ServerMetrics};

/// Whether pool gauges are worth reading (they cost a lock per pool).
pub(crate) const ENABLED: bool = cfg!(feature = "metrics");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_labels_index_their_table() {
        for (i, l) in IntentLabel::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i, "{l:?} indexes the handle table");
        }
        let names: std::collections::BTreeSet<_> =
            IntentLabel::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(names.len(), IntentLabel::ALL.len());
    }

    #[test]
    fn wait_outcomes_are_distinct() {
        let o = [
            WaitOutcome::Replica,
            WaitOutcome::Primary,
            WaitOutcome::Refused,
        ];
        let names: std::collections::BTreeSet<_> = o.iter().map(|w| w.as_str()).collect();
        assert_eq!(names.len(), o.len());
    }
}

//! [`Fleet::reload`]: a new configuration without a restart.
//!
//! Each cluster's state is replaced by a new generation built from the new
//! configuration: new server slots, router, server actors and listener, started by the
//! supervisor before the handles switch to it. A server whose name, URL and connection
//! settings did not change hands its pools (and so its open connections) over to the
//! new generation, resized in place if its `pool_size` changed; its counters carry over.
//! The topology is seeded from the old one by server name, so routing does not pause
//! for the first probes. Leases taken before the switch finish on the old generation
//! and return their connections to the same pools.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ractor::ActorCell;

use crate::config::{Config, ConfigError, DEFAULT_CLUSTER};
use crate::error::Error;
use crate::fleet::{build_shared, Fleet};
use crate::shared::Shared;
use crate::supervisor::SupervisorMsg;
use crate::topology::{smooth_rr_sequence, PrimaryState, Topology};

const TARGET: &str = "pgfleet::reload";

/// What a [`Fleet::reload`] changed, by server name (`cluster/server` for clusters other
/// than the default one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Servers that kept their pools and open connections.
    pub kept: Vec<String>,
    /// Of those, servers whose pools were resized to a new `pool_size`.
    pub resized: Vec<String>,
    /// Servers whose URL or connection settings changed: new pools, old ones closed.
    pub replaced: Vec<String>,
    /// Servers new in this configuration.
    pub added: Vec<String>,
    /// Servers no longer in it (their pools are closed; leases out finish first).
    pub removed: Vec<String>,
}

impl Fleet {
    /// Applies `config` without a restart: weights, pool sizes, thresholds and timeouts,
    /// added and removed replicas (in every cluster). Servers whose URL and connection
    /// settings (`connect_timeout`, `tcp_keepalive`, `tcp_user_timeout`,
    /// `probe_timeout`, `[fleet.tls]`) did not change keep their open connections.
    ///
    /// The new configuration is validated whole first; when it is rejected, the old one
    /// stays in force untouched. Leases already granted are unaffected. LISTEN
    /// subscriptions carry over; each gets
    /// [`ListenEvent::Reconnected`](crate::ListenEvent::Reconnected), since the listener
    /// reconnects. A lease waiting (for a primary, a replica to catch up, or a
    /// connection) while the switch happens carries on in the new generation within its
    /// `lease_timeout`.
    ///
    /// The reload runs to its end in a task of its own: dropping the returned future
    /// (a timeout around it, a `select!`) does not leave the fleet half switched.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid configuration, or one that adds or removes a
    /// `[clusters.NAME]` section (the registry is fixed at start); [`Error::ShuttingDown`];
    /// [`Error::Internal`] if the supervisor is gone.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, Error> {
        config.validate()?;
        let fleet = self.clone();
        tokio::spawn(async move { fleet.reload_now(config).await })
            .await
            .map_err(|e| Error::Internal(format!("reload: {e}")))?
    }

    async fn reload_now(&self, config: Config) -> Result<ReloadReport, Error> {
        let _one_at_a_time = self.reload_lock().await;
        let cells = self.clusters_cells();
        let now: BTreeSet<&str> = cells.iter().map(|c| &*c.name).collect();
        let wanted: BTreeSet<&str> = std::iter::once(DEFAULT_CLUSTER)
            .chain(config.clusters.keys().map(String::as_str))
            .collect();
        if now != wanted {
            return Err(ConfigError::Invalid {
                key: "clusters".into(),
                message: format!(
                    "a reload cannot add or remove clusters (running: {now:?}, new: {wanted:?}); restart the fleet"
                ),
            }
            .into());
        }
        let mut report = ReloadReport::default();
        let mut old_gens = Vec::with_capacity(cells.len());
        let mut built = Vec::with_capacity(cells.len());
        // Every generation is built before anything moves: a rejected reload leaves the
        // running one untouched.
        for cell in &cells {
            let old = cell.current.load_full();
            if old.is_shutting_down() {
                return Err(Error::ShuttingDown);
            }
            let one = config.cluster(&cell.name).ok_or_else(|| {
                Error::Internal(format!("cluster {} vanished from the config", cell.name))
            })?;
            built.push(build_shared(&cell.name, one, Some(&old))?);
            old_gens.push(old);
        }
        let mut new_gens = Vec::with_capacity(cells.len());
        let mut handed = Vec::with_capacity(cells.len());
        for ((cell, old), new) in cells.iter().zip(&old_gens).zip(built) {
            handed.push(hand_over(&cell.name, old, &new, &mut report));
            new_gens.push(Arc::new(new));
        }
        let replaced: Vec<ActorCell> =
            ractor::call!(self.supervisor(), SupervisorMsg::Reload, new_gens.clone()).map_err(
                |e| Error::Internal(format!("reload: the supervisor did not answer: {e}")),
            )?;
        for (((cell, old), new), handed) in cells.iter().zip(&old_gens).zip(new_gens).zip(handed) {
            cell.current.store(new.clone());
            if let Ok(mut retired) = cell.retired.lock() {
                retired.retain(|g| g.strong_count() > 0);
                retired.push(Arc::downgrade(old));
            }
            // Pools handed over now belong to the new generation: unhook them from the
            // old slots before the old actors stop (their post_stop closes what is left).
            for i in handed {
                let o = &old.slots[i];
                o.pools.store(None);
                o.actor.store(None);
            }
            // Leases still waiting in the old generation carry on in the new one.
            old.successor.store(Some(new));
            old.changed.notify_waiters();
        }
        for actor in replaced {
            actor.stop(Some("replaced by a reload".into()));
        }
        tracing::info!(target: TARGET, kept = ?report.kept, resized = ?report.resized, replaced = ?report.replaced, added = ?report.added, removed = ?report.removed, "configuration reloaded");
        Ok(report)
    }
}

/// Moves what carries over from `old` to `new` (pools of unchanged servers, counters,
/// the topology by server name) and records it in `report`. Returns the old slots whose
/// pools went over.
fn hand_over(cluster: &str, old: &Shared, new: &Shared, report: &mut ReloadReport) -> Vec<usize> {
    let label = |name: &str| {
        if cluster == DEFAULT_CLUSTER {
            name.to_owned()
        } else {
            format!("{cluster}/{name}")
        }
    };
    let same_conns = {
        let (a, b) = (&old.config.fleet, &new.config.fleet);
        a.connect_timeout == b.connect_timeout
            && a.tcp_keepalive == b.tcp_keepalive
            && a.tcp_user_timeout == b.tcp_user_timeout
            && a.probe_timeout == b.probe_timeout
            && a.tls == b.tls
    };
    let mut handed = Vec::new();
    for slot in &new.slots {
        let Some(i) = old.slots.iter().position(|o| o.name == slot.name) else {
            report.added.push(label(&slot.name));
            continue;
        };
        let o = &old.slots[i];
        for (from, to) in [
            (&o.leases, &slot.leases),
            (&o.fallbacks, &slot.fallbacks),
            (&o.demand_probes, &slot.demand_probes),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        slot.restarts
            .store(o.restarts.load(Ordering::Acquire), Ordering::Release);
        let pools = o.pools.load_full();
        match pools {
            Some(p) if same_conns && o.url == slot.url => {
                if o.pool_size != slot.pool_size {
                    p.read.resize(slot.pool_size);
                    p.write.resize(slot.pool_size);
                    report.resized.push(label(&slot.name));
                }
                // The old actor must not close them when it stops.
                p.owner.fetch_add(1, Ordering::AcqRel);
                slot.pools.store(Some(p));
                handed.push(i);
                report.kept.push(label(&slot.name));
            }
            _ => report.replaced.push(label(&slot.name)),
        }
    }
    for o in &old.slots {
        if !new.slots.iter().any(|n| n.name == o.name) {
            report.removed.push(label(&o.name));
        }
    }
    new.topology
        .store(Arc::new(seed_topology(&old.topology.load(), old, new)));
    handed
}

/// The new generation's first topology: each server's last known state, matched by
/// name (positions not trusted as fresh until the next probe, as after a router
/// restart), with the new weights.
fn seed_topology(last: &Topology, old: &Shared, new: &Shared) -> Topology {
    let mut t = Topology::initial(
        &new.slots.iter().map(|s| s.weight).collect::<Vec<_>>(),
        new.config.consistency.max_lag_bytes,
        new.config.consistency.max_lag,
    );
    let index_of = |i: usize| {
        old.slots
            .get(i)
            .and_then(|o| new.slots.iter().position(|n| n.name == o.name))
    };
    for (j, slot) in new.slots.iter().enumerate() {
        if let Some(i) = old.slots.iter().position(|o| o.name == slot.name) {
            if let Some(v) = last.servers.get(i) {
                let mut v = v.clone();
                v.fresh = false;
                v.weight = slot.read_weight(v.role);
                t.servers[j] = v;
            }
        }
    }
    t.primary = match last.primary {
        PrimaryState::Known(i) => index_of(i).map_or(PrimaryState::Missing, PrimaryState::Known),
        PrimaryState::SplitBrain(a, b) => match (index_of(a), index_of(b)) {
            (Some(a), Some(b)) => PrimaryState::SplitBrain(a, b),
            (Some(x), None) | (None, Some(x)) => PrimaryState::Known(x),
            (None, None) => PrimaryState::Missing,
        },
        PrimaryState::Missing => PrimaryState::Missing,
    };
    t.weights = t.servers.iter().map(|v| v.weight).collect();
    t.rr_seq = smooth_rr_sequence(&t.weights);
    t.primary_lsn = last.primary_lsn;
    t.system_id = last.system_id;
    t.switches = last.switches.clone();
    t.version = last.version + 1;
    t
}

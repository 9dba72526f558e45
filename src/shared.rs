//! State shared by the `Fleet` handles, the leases and the actors: the published
//! topology, per-server slots (pools, counters) and the current router.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use ractor::ActorRef;
use tokio::sync::Notify;

use crate::config::{Config, ServerUrl};
use crate::conn::{ConnRegistry, NetOptions, Pool, TlsSetup};
use crate::metrics::ServerMetrics;
use crate::router::RouterMsg;
use crate::server::ServerMsg;
use crate::topology::{Role, Topology};

/// One server's two pools: reads run with `default_transaction_read_only = on`, so a
/// write under a read lease fails the same way on the primary as on a replica.
#[derive(Debug)]
pub(crate) struct Pools {
    /// For `Read` leases.
    pub(crate) read: Pool,
    /// For `Write` leases.
    pub(crate) write: Pool,
    /// Every connection both pools opened.
    pub(crate) registry: Arc<ConnRegistry>,
    /// Bumped each time a reload hands the pools to a new generation's actor: an actor
    /// closes them when it stops only if it is still their owner.
    pub(crate) owner: AtomicU64,
}

impl Pools {
    /// The write pool or the read pool.
    pub(crate) fn pick(&self, write: bool) -> &Pool {
        if write {
            &self.write
        } else {
            &self.read
        }
    }

    /// Closes both pools; connections in use are dropped when their leases end.
    pub(crate) fn close(&self) {
        self.read.close();
        self.write.close();
    }
}

/// Per-server state that outlives the server's actor (restarts keep the counters).
#[derive(Debug)]
pub(crate) struct ServerSlot {
    /// The server's configured name.
    pub(crate) name: Arc<str>,
    /// Where it is (no password in Debug).
    pub(crate) url: ServerUrl,
    /// How its connections use TLS.
    pub(crate) tls: TlsSetup,
    /// Pool size from the config.
    pub(crate) pool_size: usize,
    /// Configured read weight in its configured role (replica `weight`, primary
    /// `read_weight`); see [`ServerSlot::read_weight`] for the weight by current role.
    pub(crate) weight: u32,
    /// Read weight while this server is the primary: the cluster's
    /// `primary.read_weight`, whichever server holds the role (after a failover too).
    pub(crate) weight_as_primary: u32,
    /// Read weight while it is a standby: its `weight` for a replica, `replica_weight`
    /// for the configured primary (once it rejoins as a standby after a failover).
    pub(crate) weight_as_replica: u32,
    /// Pools of the current actor incarnation; `None` while it is down.
    pub(crate) pools: ArcSwapOption<Pools>,
    /// `pools.owner` when this slot's actor took them: a reload that hands the pools to
    /// the next generation bumps theirs, and this slot then no longer closes them.
    pub(crate) pools_owner: AtomicU64,
    /// The current actor, for `ProbeNow` from leases.
    pub(crate) actor: ArcSwapOption<ActorRef<ServerMsg>>,
    /// Leases currently held on this server (least-outstanding input, drain on shutdown).
    pub(crate) in_flight: AtomicU64,
    /// Leases granted on this server.
    pub(crate) leases: AtomicU64,
    /// Of those, fallbacks (reads that wanted a replica).
    pub(crate) fallbacks: AtomicU64,
    /// Probes run on request (`ProbeNow`), beyond the timer's.
    pub(crate) demand_probes: AtomicU64,
    /// Times the supervisor restarted its actor.
    pub(crate) restarts: AtomicU32,
    /// Whether the actor is down and waiting for its restart.
    pub(crate) restarting: AtomicBool,
    /// The last error seen (probe or actor failure).
    pub(crate) last_error: Mutex<Option<String>>,
    /// Registered metric handles (zero-sized without the `metrics` feature).
    pub(crate) metrics: ServerMetrics,
}

/// A server's read weights by role (see [`ServerSlot::read_weight`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoleWeights {
    /// Configured as the cluster's `[primary]`.
    pub(crate) configured_primary: bool,
    /// Weight while it is the primary.
    pub(crate) as_primary: u32,
    /// Weight while it is a standby.
    pub(crate) as_replica: u32,
}

impl ServerSlot {
    /// The read weight for the role the server has now: roles move in a failover, and
    /// the weight moves with the role (the configured one while the role is unknown).
    pub(crate) fn read_weight(&self, role: Role) -> u32 {
        match role {
            Role::Primary => self.weight_as_primary,
            Role::Replica => self.weight_as_replica,
            Role::Unknown => self.weight,
        }
    }

    pub(crate) fn new(
        cluster: &str,
        name: &str,
        url: ServerUrl,
        tls: TlsSetup,
        pool_size: usize,
        weights: RoleWeights,
    ) -> Self {
        let name: Arc<str> = name.into();
        ServerSlot {
            metrics: ServerMetrics::new(cluster, &name),
            name,
            url,
            tls,
            pool_size,
            weight: if weights.configured_primary {
                weights.as_primary
            } else {
                weights.as_replica
            },
            weight_as_primary: weights.as_primary,
            weight_as_replica: weights.as_replica,
            pools: ArcSwapOption::empty(),
            actor: ArcSwapOption::empty(),
            in_flight: AtomicU64::new(0),
            leases: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            demand_probes: AtomicU64::new(0),
            restarts: AtomicU32::new(0),
            restarting: AtomicBool::new(false),
            last_error: Mutex::new(None),
            pools_owner: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_error(&self, e: impl Into<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.into());
        }
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Unpublishes the actor `id` and its pools, if they are still the current ones (a
    /// restarted incarnation may already be there), closing the pools. Called from the
    /// actor's `post_stop`, and by the supervisor for a failed actor (ractor runs no
    /// `post_stop` then). Connections still leased finish their work and are dropped.
    /// Pools a reload has handed to the next generation stay open.
    pub(crate) fn retire(&self, id: ractor::ActorId) {
        if self.actor.load().as_ref().is_some_and(|a| a.get_id() == id) {
            self.actor.store(None);
            if let Some(pools) = self.pools.swap(None) {
                if pools.owner.load(Ordering::Acquire) == self.pools_owner.load(Ordering::Acquire) {
                    pools.close();
                }
            }
        }
    }

    /// Asks the server's actor for an immediate probe (no-op while it is down).
    pub(crate) fn probe_now(&self) {
        if let Some(a) = self.actor.load().as_ref() {
            let _ = a.cast(ServerMsg::ProbeNow);
        }
    }
}

/// Fleet-wide counters: read-your-writes, and restart timers a reload outdated.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Read-after-token leases served by a replica.
    pub(crate) ryw_on_replica: AtomicU64,
    /// Read-after-token leases served by the primary (fallback or strong).
    pub(crate) ryw_on_primary: AtomicU64,
    /// Read-after-token leases that had to wait at the router.
    pub(crate) ryw_waited: AtomicU64,
    /// Read-after-token leases refused (error fallback, too many waiters).
    pub(crate) ryw_refused: AtomicU64,
    /// Restart timers that fired after a reload replaced the generation they were
    /// scheduled for, and so started nothing.
    pub(crate) stale_restarts: AtomicU64,
}

/// Everything the handles, leases and actors share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The cluster's name (`default` for the top-level servers).
    pub(crate) cluster: Arc<str>,
    /// The validated configuration of this cluster alone.
    pub(crate) config: Config,
    /// Socket settings derived from it.
    pub(crate) net: NetOptions,
    /// One slot per server: index 0 is the configured primary, then replicas in order.
    pub(crate) slots: Vec<ServerSlot>,
    /// The latest topology, swapped atomically by the router.
    pub(crate) topology: ArcSwap<Topology>,
    /// Woken after every publish, for leases waiting for a primary.
    pub(crate) changed: Notify,
    /// The generation a reload replaced this one with: leases still waiting here
    /// carry on there.
    pub(crate) successor: ArcSwapOption<Shared>,
    /// The current router (changes when the supervisor restarts it).
    pub(crate) router: ArcSwapOption<ActorRef<RouterMsg>>,
    /// LISTEN/NOTIFY subscriptions and the current listener actor: kept here so a
    /// listener restarted by the supervisor finds every subscriber.
    pub(crate) listen: Arc<crate::listener::ListenRegistry>,
    /// Shared round-robin position.
    pub(crate) rr: AtomicUsize,
    /// Set by `shutdown`; no new leases after it.
    pub(crate) shutting_down: AtomicBool,
    /// Woken whenever a lease is released during shutdown.
    pub(crate) drained: Notify,
    /// Read-your-writes counters.
    pub(crate) counters: Counters,
}

impl Shared {
    /// Leases held across all servers.
    pub(crate) fn in_flight(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.in_flight.load(Ordering::Acquire))
            .sum()
    }

    /// An error for a lease that found no primary after `waited`, with what the probes
    /// know of why: the last error of each server not known to be a replica.
    pub(crate) fn no_primary(&self, waited: Duration) -> crate::error::Error {
        let t = self.topology.load();
        let causes: Vec<String> = self
            .slots
            .iter()
            .zip(t.servers.iter())
            .filter(|(_, v)| v.role != Role::Replica)
            .filter_map(|(s, _)| s.last_error().map(|e| format!("{}: {e}", s.name)))
            .collect();
        crate::error::Error::NoPrimary {
            waited,
            cause: (!causes.is_empty()).then(|| causes.join("; ")),
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Publishes a new topology and wakes waiters.
    pub(crate) fn publish(&self, t: Topology) {
        self.topology.store(Arc::new(t));
        self.changed.notify_waiters();
    }

    /// Unpublishes router `id` if it is still the current one, so `fleet.router()` says
    /// "restarting" rather than handing out a dead reference.
    pub(crate) fn retire_router(&self, id: ractor::ActorId) {
        if self
            .router
            .load()
            .as_ref()
            .is_some_and(|r| r.get_id() == id)
        {
            self.router.store(None);
        }
    }

    /// Bound on the release-time and recycle queries.
    pub(crate) fn query_timeout(&self) -> Duration {
        self.config.fleet.probe_timeout
    }
}

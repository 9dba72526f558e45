//! [`Fleet`]: the application's handle. Starts the actor tree and decides leases from
//! the published topology in the caller's task.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use deadpool::managed::{PoolError, TimeoutType, Timeouts};
use ractor::{Actor, ActorRef};
use tokio::sync::Notify;

use crate::config::{Config, DefaultRead, Fallback, UnknownCluster, DEFAULT_CLUSTER};
use crate::conn::{NetOptions, TlsSetup};
use crate::error::Error;
use crate::lease::{Consistency, Intent, Lease};
use crate::metrics::{self, IntentLabel, WaitOutcome};
use crate::router::{RouterMsg, WaitReply, WaitRequest};
use crate::server::ServerMsg;
use crate::session::{Session, SessionInner};
use crate::shared::{Counters, RoleWeights, ServerSlot, Shared};
use crate::status::{ServerStatus, Status};
use crate::supervisor::{Supervisor, SupervisorMsg};
use crate::token::{Token, TokenError};
use crate::topology::{
    place_token, select, MaybeLost, PrimaryState, ReadNeed, Role, Topology, Within,
};
use tracing::Instrument;

const TARGET: &str = "pgfleet::lease";

/// The application's handle to a fleet: cheap to clone, lock-free to lease from.
///
/// The actor tree stops when the last handle is dropped (or on [`Fleet::shutdown`]).
#[derive(Clone)]
pub struct Fleet {
    /// This handle's cluster.
    cell: Arc<ClusterCell>,
    guard: Arc<TreeGuard>,
}

/// One cluster: its name and its current generation of shared state (replaced whole by
/// [`Fleet::reload`]).
#[derive(Debug)]
pub(crate) struct ClusterCell {
    /// The cluster's name.
    pub(crate) name: Box<str>,
    /// The current generation.
    pub(crate) current: ArcSwap<Shared>,
    /// Generations a reload replaced, while something still holds them (leases granted
    /// before the reload count there): `shutdown` drains those leases too.
    pub(crate) retired: std::sync::Mutex<Vec<std::sync::Weak<Shared>>>,
}

impl ClusterCell {
    /// The generations a reload replaced that something still holds.
    fn retired_generations(&self) -> Vec<Arc<Shared>> {
        self.retired.lock().map_or_else(
            |_| Vec::new(),
            |r| r.iter().filter_map(std::sync::Weak::upgrade).collect(),
        )
    }

    /// Leases on server `name` still held in generations a reload replaced.
    fn retired_in_flight(&self, name: &str) -> u64 {
        self.retired_generations()
            .iter()
            .map(|g| {
                g.slots
                    .iter()
                    .filter(|s| *s.name == *name)
                    .map(|s| s.in_flight.load(Ordering::Relaxed))
                    .sum::<u64>()
            })
            .sum()
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field(
                "servers",
                &self
                    .shared()
                    .slots
                    .iter()
                    .map(|s| &*s.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Stops the supervisor when the last `Fleet` handle (of any cluster) goes away; holds
/// the cluster registry.
#[derive(Debug)]
struct TreeGuard {
    supervisor: ActorRef<SupervisorMsg>,
    /// Every cluster, sorted by name.
    clusters: Box<[Arc<ClusterCell>]>,
    /// Index of [`DEFAULT_CLUSTER`] in `clusters`.
    default: usize,
    /// What `Fleet::cluster` does with an unknown name.
    unknown: UnknownCluster,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// One cluster's shared state, its actors not started yet.
pub(crate) fn build_shared(
    cluster: &str,
    config: Config,
    previous: Option<&Shared>,
) -> Result<Shared, Error> {
    // Key paths as the configuration file has them.
    let prefix = Config::cluster_key_prefix(cluster);
    let mut slots = Vec::with_capacity(1 + config.replicas.len());
    let p = &config.primary;
    slots.push(ServerSlot::new(
        cluster,
        &p.name,
        p.url.clone(),
        TlsSetup::new(&config, &format!("{prefix}primary.url"), &p.url)?,
        p.pool_size,
        RoleWeights {
            configured_primary: true,
            as_primary: p.read_weight,
            as_replica: p.replica_weight,
        },
    ));
    for (i, r) in config.replicas.iter().enumerate() {
        slots.push(ServerSlot::new(
            cluster,
            &r.name,
            r.url.clone(),
            TlsSetup::new(&config, &format!("{prefix}replicas[{i}].url"), &r.url)?,
            r.pool_size,
            RoleWeights {
                configured_primary: false,
                as_primary: p.read_weight,
                as_replica: r.weight,
            },
        ));
    }
    let weights: Vec<u32> = slots.iter().map(|s| s.weight).collect();
    let topology = Topology::initial(
        &weights,
        config.consistency.max_lag_bytes,
        config.consistency.max_lag,
    );
    let net = NetOptions {
        connect_timeout: config.fleet.connect_timeout,
        tcp_keepalive: config.fleet.tcp_keepalive,
        tcp_user_timeout: config.fleet.tcp_user_timeout,
    };
    Ok(Shared {
        cluster: cluster.into(),
        config,
        net,
        slots,
        topology: ArcSwap::from_pointee(topology),
        changed: Notify::new(),
        successor: ArcSwapOption::empty(),
        router: ArcSwapOption::empty(),
        // LISTEN subscriptions outlive a reload.
        listen: previous.map_or_else(Arc::default, |p| p.listen.clone()),
        rr: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        drained: Notify::new(),
        counters: Counters::default(),
    })
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        let _ = self
            .supervisor
            .cast(SupervisorMsg::Shutdown(Duration::from_millis(100)));
    }
}

/// How long `shutdown` still waits for the actors to stop when draining leases used up
/// its whole timeout.
const STOP_GRACE: Duration = Duration::from_millis(250);

impl Fleet {
    /// Validates `config`, spawns the supervisor, router and server actors, and returns
    /// at once: servers connect in the background, begin unhealthy, and join rotation on
    /// their first successful probe. Use [`Fleet::wait_ready`] to wait for that, or set
    /// `fleet.start_wait` to make `start` itself wait for every cluster's primary.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid configuration; [`Error::Internal`] if the actor
    /// system cannot start; [`Error::NoPrimary`] when `fleet.start_wait` is set and a
    /// cluster's primary did not answer within it, [`Error::SplitBrain`] when two servers
    /// claim the role meanwhile (the fleet is stopped then). An unreachable server is not
    /// an error otherwise.
    pub async fn start(config: Config) -> Result<Fleet, Error> {
        config.validate()?;
        // The registry is fixed here: sorted by name for lock-free lookups.
        let mut names: Vec<&str> = std::iter::once(DEFAULT_CLUSTER)
            .chain(config.clusters.keys().map(String::as_str))
            .collect();
        names.sort_unstable();
        let mut clusters = Vec::with_capacity(names.len());
        for name in names {
            let one = config.cluster(name).ok_or_else(|| {
                Error::Internal(format!("cluster {name} vanished from the config"))
            })?;
            clusters.push(Arc::new(ClusterCell {
                name: name.into(),
                current: ArcSwap::from_pointee(build_shared(name, one, None)?),
                retired: std::sync::Mutex::default(),
            }));
        }
        let (supervisor, _) = Actor::spawn(
            None,
            Supervisor,
            clusters.iter().map(|c| c.current.load_full()).collect(),
        )
        .await
        .map_err(|e| Error::Internal(format!("starting the supervisor: {e}")))?;
        let default = clusters
            .iter()
            .position(|c| &*c.name == DEFAULT_CLUSTER)
            .ok_or_else(|| Error::Internal("no default cluster".into()))?;
        let fleet = Fleet {
            cell: clusters[default].clone(),
            guard: Arc::new(TreeGuard {
                supervisor,
                clusters: clusters.into(),
                default,
                unknown: config.fleet.unknown_cluster,
                reloading: tokio::sync::Mutex::new(()),
            }),
        };
        let wait = config.fleet.start_wait;
        if !wait.is_zero() {
            fleet.wait_for_primaries(wait).await?;
        }
        Ok(fleet)
    }

    /// `fleet.start_wait`: waits until every cluster has a primary; on timeout stops
    /// the tree and names the first cluster without one.
    async fn wait_for_primaries(&self, wait: Duration) -> Result<(), Error> {
        let started = Instant::now();
        let deadline = started + wait;
        for cell in self.guard.clusters.iter() {
            loop {
                let shared = cell.current.load_full();
                let notified = shared.changed.notified();
                match shared.topology.load().primary {
                    PrimaryState::Known(_) => break,
                    PrimaryState::SplitBrain(a, b) => {
                        // Waiting will not settle it: the fleet never guesses.
                        let e = Error::SplitBrain {
                            first: shared.slots[a].name.to_string(),
                            second: shared.slots[b].name.to_string(),
                        };
                        tracing::warn!(target: TARGET, cluster = %cell.name, error = %e, "split brain at start; stopping");
                        self.shutdown().await;
                        return Err(e);
                    }
                    PrimaryState::Missing => {}
                }
                if tokio::time::timeout_at(deadline.into(), notified)
                    .await
                    .is_err()
                {
                    let e = shared.no_primary(started.elapsed());
                    tracing::warn!(target: TARGET, cluster = %cell.name, error = %e, "no primary within fleet.start_wait; stopping");
                    self.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The handle of cluster `name` (`[clusters.NAME]`; [`DEFAULT_CLUSTER`] is the
    /// top-level `[primary]`): same supervisor, same lifetime, its own servers, router,
    /// topology and listener. A lookup in a registry fixed at start, without locks.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownCluster`] for a name no section has, unless
    /// `fleet.unknown_cluster = "default"`, which returns the default cluster instead.
    pub fn cluster(&self, name: &str) -> Result<Fleet, Error> {
        let g = &self.guard;
        let i = match g.clusters.binary_search_by(|c| (*c.name).cmp(name)) {
            Ok(i) => i,
            Err(_) if g.unknown == UnknownCluster::Default => g.default,
            Err(_) => {
                return Err(Error::UnknownCluster {
                    name: name.to_owned(),
                })
            }
        };
        Ok(Fleet {
            cell: g.clusters[i].clone(),
            guard: g.clone(),
        })
    }

    /// This handle's cluster name ([`DEFAULT_CLUSTER`] for the top-level servers).
    pub fn cluster_name(&self) -> &str {
        &self.cell.name
    }

    /// Every cluster's name, sorted.
    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.guard.clusters.iter().map(|c| &*c.name)
    }

    /// Every cluster of the tree, sorted by name.
    pub(crate) fn clusters_cells(&self) -> Vec<Arc<ClusterCell>> {
        self.guard.clusters.to_vec()
    }

    /// The supervisor of the whole tree.
    pub(crate) fn supervisor(&self) -> ActorRef<SupervisorMsg> {
        self.guard.supervisor.clone()
    }

    /// Held for the whole of a reload.
    pub(crate) async fn reload_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.guard.reloading.lock().await
    }

    /// The cluster's current generation.
    pub(crate) fn shared(&self) -> arc_swap::Guard<Arc<Shared>> {
        self.cell.current.load()
    }

    /// Waits until every server has been probed once (successfully or not) and a
    /// primary is known, or `timeout` passes. Returns whether that happened.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        // Past what an `Instant` can hold (`Duration::MAX`): no deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let shared = self.shared();
            let notified = shared.changed.notified();
            let t = shared.topology.load();
            if t.primary_index().is_some()
                && t.servers
                    .iter()
                    .all(|s| s.health != crate::Health::Starting)
            {
                return true;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Leases a connection for `intent`, decided from the published topology in the
    /// caller's task (no actor round trip unless a read-your-writes read must wait).
    ///
    /// # Errors
    ///
    /// [`Error::NoPrimary`] when a write (or fallback) finds no primary within
    /// `lease_timeout`; [`Error::SplitBrain`]; [`Error::Timeout`] when the pool has no
    /// connection in time; [`Error::NoFreshReplica`] with `fallback = "error"`;
    /// [`Error::TooManyWaiters`]; [`Error::ShuttingDown`].
    pub fn lease(
        &self,
        intent: Intent,
    ) -> impl std::future::Future<Output = Result<Lease, Error>> + Send + '_ {
        // Not an `async fn`: one less layer of future to build and move per lease.
        lease_on(self.cell.current.load_full(), intent, None)
    }

    /// A new session (read-your-writes and monotonic reads across its leases).
    pub fn session(&self) -> Session {
        Session {
            inner: Arc::new(SessionInner::default()),
            cell: self.cell.clone(),
        }
    }

    /// A session resumed from a token a previous request handed out (see
    /// [`Session::token`]). A token of another cluster is ignored with its reason.
    pub fn session_from(&self, token: Token) -> (Session, Option<TokenError>) {
        let s = self.session();
        match self.check_token(&token) {
            Ok(()) => {
                s.observe(token);
                (s, None)
            }
            Err(e) => (s, Some(e)),
        }
    }

    /// Checks that `token` belongs to this cluster.
    ///
    /// # Errors
    ///
    /// [`TokenError::ForeignSystem`] for another system identifier;
    /// [`TokenError::UnknownTimeline`] for a timeline beyond the primary's.
    pub fn check_token(&self, token: &Token) -> Result<(), TokenError> {
        check_token(&self.shared().topology.load(), token)
    }

    /// The current router actor. It changes when the supervisor restarts the router, so
    /// resolve it again after a send fails. Between a router's death and its
    /// replacement this waits for the new one (at most `lease_timeout`).
    ///
    /// # Errors
    ///
    /// [`Error::ShuttingDown`] once the fleet is stopping; [`Error::Timeout`] if no
    /// router is running within `lease_timeout` (the supervisor keeps restarting a
    /// failing router with backoff).
    pub async fn router(&self) -> Result<ActorRef<RouterMsg>, Error> {
        let started = Instant::now();
        let deadline = started + self.shared().config.fleet.lease_timeout;
        loop {
            // Again each round: a reload may have replaced the generation.
            let shared = self.shared();
            let notified = shared.changed.notified();
            if shared.is_shutting_down() {
                return Err(Error::ShuttingDown);
            }
            if let Some(r) = shared.router.load_full() {
                return Ok((*r).clone());
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(Error::Timeout {
                    server: "router".into(),
                    what: "the router actor to restart",
                    after: started.elapsed(),
                });
            }
        }
    }

    /// A snapshot of every server's state, with a `Display` table.
    pub fn status(&self) -> Status {
        let shared = self.shared();
        let t = shared.topology.load();
        let servers = shared
            .slots
            .iter()
            .zip(t.servers.iter())
            .map(|(slot, v)| {
                let pool = slot.pools.load();
                let (size, idle) = pool.as_ref().map_or((0, 0), |p| {
                    let r = p.read.status();
                    let w = p.write.status();
                    (r.size + w.size, r.available + w.available)
                });
                ServerStatus {
                    name: slot.name.to_string(),
                    role: v.role,
                    health: if slot.restarting.load(Ordering::Acquire) {
                        crate::Health::Restarting
                    } else {
                        v.health
                    },
                    lsn: v.lsn,
                    receive_lsn: v.receive_lsn,
                    lag_bytes: v.lag_bytes,
                    lag: v.lag.approx(),
                    lag_is_lower_bound: matches!(v.lag, crate::lag::TimeLag::AtLeast(_)),
                    timeline: v.timeline,
                    paused: v.paused,
                    streaming: v.streaming,
                    weight: v.weight,
                    pool_max: slot.pool_size * 2,
                    pool_open: size,
                    pool_idle: idle,
                    in_use: slot.in_flight.load(Ordering::Relaxed)
                        + self.cell.retired_in_flight(&slot.name),
                    leases: slot.leases.load(Ordering::Relaxed),
                    fallbacks: slot.fallbacks.load(Ordering::Relaxed),
                    restarts: slot.restarts.load(Ordering::Relaxed),
                    last_error: slot.last_error(),
                    probe_latency: v.probe_latency,
                    suspect: v.suspect,
                }
            })
            .collect();
        let c = &shared.counters;
        Status {
            servers,
            primary_down: t.primary_index().is_none(),
            split_brain: matches!(t.primary, PrimaryState::SplitBrain(..)),
            ryw_on_replica: c.ryw_on_replica.load(Ordering::Relaxed),
            ryw_on_primary: c.ryw_on_primary.load(Ordering::Relaxed),
            ryw_waited: c.ryw_waited.load(Ordering::Relaxed),
            wait_probes: shared
                .slots
                .iter()
                .map(|s| s.demand_probes.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Stops taking leases, waits for outstanding ones to be returned, closes the pools
    /// and stops the actor tree — of every cluster, whichever cluster's handle it is
    /// called on — all within `fleet.shutdown_timeout` (plus at most 250 ms for the
    /// actors to stop when draining took all of it). Later leases fail with
    /// [`Error::ShuttingDown`]. Returns how many leases were still out when it gave up
    /// waiting.
    pub async fn shutdown(&self) -> u64 {
        let deadline = Instant::now() + self.shared().config.fleet.shutdown_timeout;
        // A reload in progress finishes first, so the generations flagged here are the
        // ones every handle uses, and none starts after (it would see the flag). Bounded:
        // past the deadline, shutdown goes on regardless.
        let _no_reload = tokio::time::timeout_at(deadline.into(), self.reload_lock()).await;
        // Every cluster's current generation, and those a reload replaced that leases
        // granted before it still hold.
        let generations: Vec<Arc<Shared>> = self
            .guard
            .clusters
            .iter()
            .flat_map(|c| std::iter::once(c.current.load_full()).chain(c.retired_generations()))
            .collect();
        let clusters = || generations.iter();
        for s in clusters() {
            s.shutting_down.store(true, Ordering::Release);
            s.changed.notify_waiters();
        }
        for s in clusters() {
            loop {
                let notified = s.drained.notified();
                if s.in_flight() == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline.into(), notified)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let left = clusters().map(|s| s.in_flight()).sum();
        for slot in clusters().flat_map(|s| s.slots.iter()) {
            if let Some(p) = slot.pools.load().as_ref() {
                p.close();
            }
        }
        let sup = self.guard.supervisor.clone();
        // What is left of the timeout, and a moment even when draining used it all up:
        // most of it for the children, the rest for the supervisor itself.
        let stop_wait = deadline
            .saturating_duration_since(Instant::now())
            .max(STOP_GRACE);
        let _ = sup.cast(SupervisorMsg::Shutdown(stop_wait.mul_f64(0.8)));
        if sup.get_cell().wait(Some(stop_wait)).await.is_err() {
            tracing::warn!(target: TARGET, ?stop_wait, "actors still stopping when shutdown returned");
        }
        left
    }

    /// Test hook: make server `name`'s actor fail as if it crashed.
    #[doc(hidden)]
    pub fn debug_fail_server(&self, name: &str) -> bool {
        self.shared()
            .slots
            .iter()
            .find(|s| &*s.name == name)
            .and_then(|s| s.actor.load_full())
            .map(|a| {
                a.cast(ServerMsg::Fail("test-induced failure".into()))
                    .is_ok()
            })
            .unwrap_or(false)
    }

    /// Test hook: how many server restart timers fired after a reload replaced the
    /// generation they were scheduled for (and so started nothing), as the current
    /// generation counted them.
    #[doc(hidden)]
    pub fn debug_stale_restarts(&self) -> u64 {
        self.shared()
            .counters
            .stale_restarts
            .load(Ordering::Relaxed)
    }

    /// Test hook: make the router fail as if it crashed.
    #[doc(hidden)]
    pub fn debug_fail_router(&self) -> bool {
        match self.shared().router.load_full() {
            Some(r) => {
                r.get_cell().kill();
                true
            }
            None => false,
        }
    }

    /// Subscribes to the notifications (`NOTIFY` / `pg_notify`) sent on `channel`.
    ///
    /// One listener actor holds one connection to the primary (`application_name =
    /// 'pgfleet-listener'`) and LISTENs there once per channel, however many
    /// subscriptions it has. Returns once LISTEN is in effect, so every notification
    /// committed after this returns is delivered. The name is matched exactly (quoted,
    /// case kept), as `pg_notify('Orders', ...)` does; an unquoted `NOTIFY Orders` folds
    /// it to `orders`.
    ///
    /// When the connection is lost (server restart, failover, terminated backend), the
    /// listener reconnects with backoff (`fleet.restart`), LISTENs again to every channel
    /// and then sends [`ListenEvent::Reconnected`](crate::ListenEvent::Reconnected) to every
    /// subscription: notifications sent in between were missed. See
    /// [`Subscription`](crate::Subscription) for slow subscribers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidChannel`] for an empty name, one longer than 63 bytes or one with a
    /// NUL byte; [`Error::NoPrimary`] or [`Error::Timeout`] when LISTEN is not in effect
    /// within `lease_timeout`; [`Error::ShuttingDown`].
    pub async fn listen(&self, channel: &str) -> Result<crate::listener::Subscription, Error> {
        let shared = self.cell.current.load_full();
        crate::listener::subscribe(&shared, channel).await
    }

    /// Test hook: the channels the listener's session LISTENs to, read from the server
    /// (`pg_listening_channels()`), sorted; `None` while it is not connected.
    #[doc(hidden)]
    pub async fn debug_listening_channels(&self) -> Option<Vec<String>> {
        let shared = self.cell.current.load_full();
        crate::listener::server_channels(&shared).await
    }

    /// Test hook: make the listener fail as if it crashed.
    #[doc(hidden)]
    pub fn debug_fail_listener(&self) -> bool {
        crate::listener::fail(&self.shared())
    }
}

/// Whether a token is ours and plausible against the topology.
pub(crate) fn check_token(t: &Topology, token: &Token) -> Result<(), TokenError> {
    if let Some(ours) = t.system_id {
        if ours != token.system_id() {
            return Err(TokenError::ForeignSystem {
                ours,
                theirs: token.system_id(),
            });
        }
    }
    if let Some(p) = t.primary_index() {
        if let Some(current) = t.servers[p].timeline {
            if token.timeline() > current {
                return Err(TokenError::UnknownTimeline {
                    current,
                    theirs: token.timeline(),
                });
            }
        }
    }
    Ok(())
}

/// What a request needs, resolved from the intent and the config.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// The primary's write pool.
    Write,
    /// The primary's read pool (strong read).
    Strong,
    /// A read server, else the fallback.
    Read(ReadNeed),
}

impl Need {
    /// The `intent` metric label.
    fn label(&self) -> IntentLabel {
        match self {
            Need::Write => IntentLabel::Write,
            Need::Strong => IntentLabel::Strong,
            Need::Read(ReadNeed::Eventual) => IntentLabel::Eventual,
            Need::Read(ReadNeed::MaxStaleness(_)) => IntentLabel::Bounded,
            Need::Read(ReadNeed::After(..)) => IntentLabel::Ryw,
        }
    }

    /// The label of an intent not resolved yet (a default read counts as eventual).
    fn label_of(intent: Intent) -> IntentLabel {
        match intent {
            Intent::Write => IntentLabel::Write,
            Intent::Read(Consistency::Strong) => IntentLabel::Strong,
            Intent::Read(Consistency::Default | Consistency::Eventual) => IntentLabel::Eventual,
            Intent::Read(Consistency::MaxStaleness(_)) => IntentLabel::Bounded,
            Intent::Read(Consistency::AfterLsn(_)) => IntentLabel::Ryw,
        }
    }
}

/// The whole lease decision; shared by `Fleet::lease`, sessions and the router's
/// `Lease` message, so all three decide the same way.
pub(crate) async fn lease_on(
    shared: Arc<Shared>,
    intent: Intent,
    session: Option<Arc<SessionInner>>,
) -> Result<Lease, Error> {
    if shared.is_shutting_down() {
        metrics::lease_error(&shared.cluster, Need::label_of(intent), "ShuttingDown");
        return Err(Error::ShuttingDown);
    }
    let start = Instant::now();
    let floor = session.as_ref().and_then(|s| s.mark());
    let (need, ignored_token) = resolve_need(&shared, intent, floor).inspect_err(|e| {
        metrics::lease_error(&shared.cluster, Need::label_of(intent), e.kind());
    })?;
    // The common case, decided from the snapshot with one timer-free checkout, or one
    // wait on the chosen pool when it is busy and nothing else can serve. Its future
    // stays small; everything else lives in `lease_slow`, boxed, off this path.
    let mut excluded: Vec<bool> = Vec::new();
    if let Some((idx, write_pool, role, expected_start)) = decide_now(&shared, &need) {
        let create = shared
            .net
            .connect_timeout
            .min(shared.config.fleet.lease_timeout);
        let usable = |conn: &crate::conn::Pooled| {
            role != Role::Replica || expected_start.is_none_or(|s| s == conn.postmaster_start_us)
        };
        // A connect may take `create`, or what is left of the wait when there is one.
        let timeouts = |wait: Duration| Timeouts {
            wait: Some(wait),
            create: Some(if wait.is_zero() {
                create
            } else {
                create.min(wait.max(Duration::from_millis(1)))
            }),
            recycle: None,
        };
        // The pool call is awaited here, not through `try_checkout`: one future layer
        // less to build and move per lease. The guard lives only for this timer-free call.
        let mut got = {
            let pools = shared.slots[idx].pools.load();
            match pools.as_ref() {
                Some(p) => {
                    p.pick(write_pool)
                        .timeout_get(&timeouts(Duration::ZERO))
                        .await
                }
                None => Err(PoolError::Closed),
            }
        };
        // Busy, and no other server could serve it now: wait for this pool (holding the
        // pools themselves, not a guard, since this may take a while).
        let mut waited = None;
        if matches!(got, Err(PoolError::Timeout(TimeoutType::Wait)))
            && !others_can_serve(&shared, &need, idx)
        {
            if let Some(p) = shared.slots[idx].pools.load_full() {
                let wait = (start + shared.config.fleet.lease_timeout)
                    .saturating_duration_since(Instant::now());
                got = p.pick(write_pool).timeout_get(&timeouts(wait)).await;
                waited = Some(wait);
            }
        }
        match got {
            Ok(conn) if usable(&conn) => {
                return Ok(grant(
                    shared,
                    idx,
                    role,
                    false,
                    need,
                    intent,
                    session,
                    ignored_token,
                    start,
                    conn,
                ));
            }
            // Busy after waiting the whole lease timeout.
            Err(PoolError::Timeout(TimeoutType::Wait)) if waited.is_some() => {
                let e = Error::Timeout {
                    server: shared.slots[idx].name.to_string(),
                    what: "a pooled connection",
                    after: start.elapsed(),
                };
                metrics::lease_error(&shared.cluster, need.label(), e.kind());
                return Err(e);
            }
            // Busy, and another server may serve: the slow path picks again.
            Err(PoolError::Timeout(TimeoutType::Wait)) => {}
            // A restarted server, a failed connect, or an actor being replaced (not an
            // error of the server's, see `CheckoutError::record`).
            other => {
                if let Err(e) = other {
                    pool_error(e, waited.unwrap_or_default()).record(&shared.slots[idx]);
                }
                void(&shared, idx);
                exclude(&mut excluded, idx);
            }
        }
    }
    Box::pin(lease_slow(
        &shared,
        intent,
        need,
        session,
        ignored_token,
        start,
        excluded,
    ))
    .await
}

/// Whether a server other than `idx` could serve `need` right now (a busy pool is then
/// better left to the slow path, which picks again).
fn others_can_serve(shared: &Shared, need: &Need, idx: usize) -> bool {
    match need {
        Need::Write | Need::Strong => false,
        Need::Read(rn) => {
            let t = shared.topology.load();
            (0..t.servers.len()).any(|i| i != idx && t.can_serve(i, rn))
        }
    }
}

/// Resolves the intent against the config and checks its token. `floor` is a session's
/// high-water mark: a session's eventual and bounded reads must also have replayed it
/// (keeping their own lag bound), and its read-after-token reads the later of the two.
fn resolve_need(
    shared: &Shared,
    intent: Intent,
    floor: Option<Token>,
) -> Result<(Need, Option<TokenError>), Error> {
    let cfg = &shared.config;
    let (given, within) = match intent {
        Intent::Write => return Ok((Need::Write, None)),
        Intent::Read(c) => match c {
            Consistency::Strong => return Ok((Need::Strong, None)),
            Consistency::Default if cfg.consistency.default_read == DefaultRead::Strong => {
                return Ok((Need::Strong, None))
            }
            Consistency::Default | Consistency::Eventual => (None, Within::Eventual),
            Consistency::MaxStaleness(d) => (None, Within::Staleness(d)),
            Consistency::AfterLsn(token) => (Some(token), Within::Any),
        },
    };
    if given.is_none() && floor.is_none() {
        return Ok((Need::Read(bound_only(within)), None));
    }
    let topo = shared.topology.load();
    let mut ignored = None;
    let mut ours = |token: Option<Token>| -> Result<Option<Token>, Error> {
        let Some(token) = token else {
            return Ok(None);
        };
        match check_token(&topo, &token) {
            Ok(()) => Ok(Some(token)),
            Err(e @ TokenError::ForeignSystem { .. }) => {
                tracing::debug!(target: TARGET, error = %e, "ignoring token of another cluster");
                ignored = Some(e);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    };
    let given = ours(given)?;
    let floor = ours(floor)?;
    let token = match (given, floor) {
        (Some(t), Some(f)) if t.system_id() == f.system_id() => t.max(f),
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Ok((Need::Read(bound_only(within)), ignored)),
    };
    let placed = place(&topo, &token)?;
    Ok((Need::Read(ReadNeed::After(placed, within)), ignored))
}

/// The read need of a lag bound with no token to follow.
fn bound_only(within: Within) -> ReadNeed {
    match within {
        Within::Staleness(d) => ReadNeed::MaxStaleness(d),
        Within::Any | Within::Eventual => ReadNeed::Eventual,
    }
}

/// Places `token` in the history of `topo`'s primary timeline (see [`place_token`]):
/// rebased onto it, or [`Error::WriteMayBeLost`].
fn place(topo: &Topology, token: &Token) -> Result<Token, Error> {
    place_token(topo.primary_timeline(), &topo.switches, token).map_err(|MaybeLost { current }| {
        Error::WriteMayBeLost {
            token_lsn: token.lsn(),
            token_timeline: token.timeline(),
            current_timeline: current,
        }
    })
}

/// The server the snapshot says serves `need` right now, without waiting: its index,
/// whether to use its write pool, its role, and its last probed postmaster start.
fn decide_now(shared: &Shared, need: &Need) -> Option<(usize, bool, Role, Option<i64>)> {
    let topo = shared.topology.load();
    let (idx, write) = match need {
        Need::Write | Need::Strong => (topo.primary_index()?, matches!(need, Need::Write)),
        Need::Read(rn) => (
            select(
                shared.config.fleet.strategy,
                &topo.weights,
                &topo.rr_seq,
                &shared.rr,
                |i| topo.can_serve(i, rn),
                |i| shared.slots[i].in_flight.load(Ordering::Relaxed),
            )?,
            false,
        ),
    };
    let s = &topo.servers[idx];
    Some((idx, write, s.role, s.postmaster_start_us))
}

/// Books a granted lease: counters, and the guard itself. Inlined so the lease is
/// built where the caller returns it (no copies of the connection on the way).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grant(
    shared: Arc<Shared>,
    idx: usize,
    role: Role,
    fallback: bool,
    need: Need,
    intent: Intent,
    session: Option<Arc<SessionInner>>,
    ignored_token: Option<TokenError>,
    start: Instant,
    conn: crate::conn::Pooled,
) -> Lease {
    let slot = &shared.slots[idx];
    slot.in_flight.fetch_add(1, Ordering::AcqRel);
    slot.leases.fetch_add(1, Ordering::Relaxed);
    slot.metrics.lease(need.label(), fallback);
    tracing::trace!(target: TARGET, server = %slot.name, intent = need.label().as_str(), fallback, "lease granted");
    if fallback {
        slot.fallbacks.fetch_add(1, Ordering::Relaxed);
    }
    if let Need::Read(ReadNeed::After(..)) = need {
        let c = &shared.counters;
        if role == Role::Replica {
            &c.ryw_on_replica
        } else {
            &c.ryw_on_primary
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    Lease {
        conn: Some(conn),
        shared,
        idx,
        role,
        fallback,
        intent,
        session,
        ignored_token,
        waited: start.elapsed(),
    }
}

/// Everything that may wait: for a primary, for a replica to catch up, for a busy pool,
/// and retries on other servers after a failed checkout.
#[allow(clippy::too_many_arguments)]
async fn lease_slow(
    shared: &Arc<Shared>,
    intent: Intent,
    need: Need,
    session: Option<Arc<SessionInner>>,
    ignored_token: Option<TokenError>,
    start: Instant,
    excluded: Vec<bool>,
) -> Result<Lease, Error> {
    let span = tracing::debug_span!(target: TARGET, "lease", intent = need.label().as_str());
    let r = lease_wait(
        shared,
        intent,
        need,
        session,
        ignored_token,
        start,
        excluded,
    )
    .instrument(span)
    .await;
    if let Err(e) = &r {
        metrics::lease_error(&shared.cluster, need.label(), e.kind());
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn lease_wait(
    shared: &Arc<Shared>,
    intent: Intent,
    mut need: Need,
    session: Option<Arc<SessionInner>>,
    ignored_token: Option<TokenError>,
    start: Instant,
    mut excluded: Vec<bool>,
) -> Result<Lease, Error> {
    let deadline = start + shared.config.fleet.lease_timeout;
    let mut waited_for_replica = false;
    let mut verified = false;
    // The generation this lease is decided in; a reload replaces it (see below).
    let mut current = shared.clone();
    loop {
        // A reload replaced the generation while this lease waited: go on in the new
        // one (its topology moves, the old one no longer does), within the same deadline.
        if let Some(next) = current.successor.load_full() {
            current = next;
            excluded.clear();
            waited_for_replica = false;
            continue;
        }
        let shared = &current;
        let cfg = &shared.config;
        if shared.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let topo = shared.topology.load();
        // The token is placed again in this snapshot's history: a promotion while the
        // lease waited (or no primary known when it was first placed) must not let a
        // write of a lost history be read as present, on a replica or on the primary.
        if let Need::Read(ReadNeed::After(token, within)) = need {
            need = Need::Read(ReadNeed::After(place(&topo, &token)?, within));
        }
        let (idx, fallback, write_pool) = match need {
            Need::Write | Need::Strong => {
                match primary_or_wait(shared, &topo, start, deadline).await? {
                    Some(i) => (i, false, matches!(need, Need::Write)),
                    None => continue,
                }
            }
            Need::Read(rn) => {
                let pick = select(
                    cfg.fleet.strategy,
                    &topo.weights,
                    &topo.rr_seq,
                    &shared.rr,
                    |i| !excluded.get(i).copied().unwrap_or(false) && topo.can_serve(i, &rn),
                    |i| shared.slots[i].in_flight.load(Ordering::Relaxed),
                );
                match pick {
                    Some(i) => (i, false, false),
                    None => {
                        let reply = match rn {
                            ReadNeed::After(token, _) if !waited_for_replica => {
                                waited_for_replica = true;
                                let asked = Instant::now();
                                let until = deadline.min(asked + cfg.consistency.ryw_wait);
                                let reply = ask_router(shared, token, until).await;
                                if shared.successor.load().is_some() {
                                    continue;
                                }
                                let outcome = match reply {
                                    WaitReply::Serve(_) => WaitOutcome::Replica,
                                    WaitReply::TooMany(_) => WaitOutcome::Refused,
                                    WaitReply::Fallback { .. }
                                        if cfg.consistency.fallback == Fallback::Error =>
                                    {
                                        WaitOutcome::Refused
                                    }
                                    _ => WaitOutcome::Primary,
                                };
                                metrics::ryw_wait(&shared.cluster, outcome, asked.elapsed());
                                reply
                            }
                            _ => fallback_estimate(&topo, &rn),
                        };
                        match reply {
                            // Decided again from the snapshot the router answered from, or a
                            // newer one: the role and postmaster start checked below must be
                            // those of now, not of before the wait.
                            WaitReply::Serve(_) => continue,
                            WaitReply::TooMany(n) => {
                                shared.counters.ryw_refused.fetch_add(1, Ordering::Relaxed);
                                return Err(Error::TooManyWaiters { waiting: n });
                            }
                            // No replica has it: before refusing or falling back, a
                            // position the primary has not reached either (forged, or from
                            // a lost history) gets a typed error, judged on a fresh primary
                            // probe, rather than a read that pretends to follow it.
                            WaitReply::Fallback { .. }
                                if !verified && matches!(rn, ReadNeed::After(..)) =>
                            {
                                verified = true;
                                if let ReadNeed::After(token, _) = rn {
                                    drop(topo);
                                    crate::verify::verify_position(shared, &token, deadline)
                                        .await?;
                                }
                                continue;
                            }
                            WaitReply::Fallback {
                                behind_bytes,
                                catch_up,
                            } if cfg.consistency.fallback == Fallback::Error => {
                                shared.counters.ryw_refused.fetch_add(1, Ordering::Relaxed);
                                return Err(Error::NoFreshReplica {
                                    behind_bytes,
                                    catch_up,
                                });
                            }
                            _ => match primary_or_wait(shared, &topo, start, deadline).await? {
                                Some(i) => (i, true, false),
                                None => continue,
                            },
                        }
                    }
                }
            }
        };
        let role = topo.servers[idx].role;
        let expected_start = topo.servers[idx].postmaster_start_us;
        drop(topo);
        match checkout(shared, idx, write_pool, deadline).await {
            Ok(conn) => {
                // A connection to a server that restarted since its last probe may show
                // older data than the cached position says (pitfall 5).
                if role == Role::Replica
                    && expected_start.is_some_and(|s| s != conn.postmaster_start_us)
                {
                    void(shared, idx);
                    exclude(&mut excluded, idx);
                    continue;
                }
                return Ok(grant(
                    shared.clone(),
                    idx,
                    role,
                    fallback,
                    need,
                    intent,
                    session,
                    ignored_token,
                    start,
                    conn,
                ));
            }
            Err(CheckoutError::Timeout(after)) => {
                return Err(Error::Timeout {
                    server: shared.slots[idx].name.to_string(),
                    what: "a pooled connection",
                    after,
                })
            }
            Err(e @ (CheckoutError::Failed(_) | CheckoutError::Restarting)) => {
                if let CheckoutError::Failed(why) = &e {
                    tracing::debug!(target: TARGET, server = %shared.slots[idx].name, error = %why, "checkout failed; trying elsewhere");
                }
                e.record(&shared.slots[idx]);
                void(shared, idx);
                exclude(&mut excluded, idx);
                if Instant::now() >= deadline {
                    return Err(match need {
                        Need::Write | Need::Strong => shared.no_primary(start.elapsed()),
                        Need::Read(_) => Error::Timeout {
                            server: "*".into(),
                            what: "a server that accepts connections",
                            after: start.elapsed(),
                        },
                    });
                }
                if matches!(need, Need::Write | Need::Strong) || fallback {
                    // The primary is unreachable; wait for the topology to move.
                    wait_change(
                        shared,
                        None,
                        deadline.min(Instant::now() + cfg.fleet.probe_interval),
                    )
                    .await;
                    excluded.clear();
                }
            }
        }
    }
}

fn exclude(excluded: &mut Vec<bool>, idx: usize) {
    if excluded.len() <= idx {
        excluded.resize(idx + 1, false);
    }
    excluded[idx] = true;
}

fn void(shared: &Shared, idx: usize) {
    if let Some(r) = shared.router.load().as_ref() {
        let _ = r.cast(RouterMsg::Void { idx });
    }
}

/// Waits until the topology is published again (or a reload replaced this generation),
/// at most until `until`. With `seen`, the snapshot the caller decided from, returns at
/// once when a newer one was published since.
async fn wait_change(shared: &Shared, seen: Option<&Topology>, until: Instant) {
    // Registered before the checks: a publish or a reload's wake-up cannot fall between.
    let notified = shared.changed.notified();
    if shared.successor.load().is_some() {
        return;
    }
    if let Some(seen) = seen {
        if !std::ptr::eq(seen, &**shared.topology.load()) {
            return;
        }
    }
    let _ = tokio::time::timeout_at(until.into(), notified).await;
}

/// The primary's index; waits for one (until the deadline) when none is known.
async fn primary_or_wait(
    shared: &Shared,
    topo: &Topology,
    start: Instant,
    deadline: Instant,
) -> Result<Option<usize>, Error> {
    match topo.primary {
        PrimaryState::Known(i) => Ok(Some(i)),
        PrimaryState::SplitBrain(a, b) => Err(Error::SplitBrain {
            first: shared.slots[a].name.to_string(),
            second: shared.slots[b].name.to_string(),
        }),
        PrimaryState::Missing => {
            if Instant::now() >= deadline {
                return Err(shared.no_primary(start.elapsed()));
            }
            wait_change(shared, Some(topo), deadline).await;
            if shared.successor.load().is_some() {
                return Ok(None);
            }
            if Instant::now() >= deadline && shared.topology.load().primary_index().is_none() {
                return Err(shared.no_primary(start.elapsed()));
            }
            Ok(None)
        }
    }
}

fn fallback_estimate(topo: &Topology, need: &ReadNeed) -> WaitReply {
    let target = match need {
        ReadNeed::After(t, _) => Some(t.lsn()),
        _ => topo.primary_lsn,
    };
    let best = topo
        .servers
        .iter()
        .filter(|s| s.role == Role::Replica && s.health == crate::Health::Healthy)
        .filter_map(|s| Some((target?.bytes_since(s.lsn?), s)))
        .min_by_key(|(b, _)| *b);
    match best {
        Some((b, s)) => WaitReply::Fallback {
            behind_bytes: Some(b),
            catch_up: s
                .replay_rate
                .filter(|_| !s.paused)
                .and_then(|r| Duration::try_from_secs_f64(b as f64 / r).ok()),
        },
        None => WaitReply::Fallback {
            behind_bytes: None,
            catch_up: None,
        },
    }
}

/// Asks the router to park the read until a replica replays `token` (or `until`).
async fn ask_router(shared: &Shared, token: Token, until: Instant) -> WaitReply {
    let fallback = WaitReply::Fallback {
        behind_bytes: None,
        catch_up: None,
    };
    // The router may be restarting: resolve it again until the deadline.
    loop {
        // A reload replaced this generation (and stops its router): the caller goes on
        // in the new one.
        if shared.successor.load().is_some() {
            return fallback;
        }
        let Some(router) = shared.router.load_full() else {
            if Instant::now() >= until {
                return fallback;
            }
            wait_change(shared, None, until).await;
            continue;
        };
        let remaining = until.saturating_duration_since(Instant::now());
        let req = WaitRequest {
            token,
            deadline: until,
        };
        // A little slack past the deadline: the router answers at the deadline itself.
        let r = router
            .call(
                |reply| RouterMsg::Wait(req, reply),
                Some(remaining + Duration::from_millis(50)),
            )
            .await;
        match r {
            Ok(ractor::rpc::CallResult::Success(reply)) => return reply,
            Ok(ractor::rpc::CallResult::Timeout) => return fallback,
            _ if Instant::now() < until => {
                // Router died mid-call; its successor may answer.
                wait_change(
                    shared,
                    None,
                    until.min(Instant::now() + Duration::from_millis(20)),
                )
                .await;
            }
            _ => return fallback,
        }
    }
}

enum CheckoutError {
    /// No connection within the wait.
    Timeout(Duration),
    /// The server refused or failed the connect.
    Failed(String),
    /// The server's actor is being replaced (pools closed or not published yet).
    Restarting,
}

async fn checkout(
    shared: &Shared,
    idx: usize,
    write: bool,
    deadline: Instant,
) -> Result<crate::conn::Pooled, CheckoutError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let create = shared
        .net
        .connect_timeout
        .min(remaining.max(Duration::from_millis(1)));
    // A free permit at once (no timer), else wait for one until the deadline.
    match try_checkout(shared, idx, write, Duration::ZERO, create).await {
        Err(CheckoutError::Timeout(_)) if !remaining.is_zero() => {
            try_checkout(shared, idx, write, remaining, create).await
        }
        other => other,
    }
}

/// One pool checkout waiting at most `wait` for a permit (zero: no timer at all).
/// Recycling needs no timer (instant for a clean connection; a rollback bounds itself)
/// and a new connection is bounded by `create`.
async fn try_checkout(
    shared: &Shared,
    idx: usize,
    write: bool,
    wait: Duration,
    create: Duration,
) -> Result<crate::conn::Pooled, CheckoutError> {
    let slot = &shared.slots[idx];
    // The pool handle itself (one reference count), not a guard of the slot: this
    // checkout may wait, and many guards held at once make every load slower.
    let pool = {
        let pools = slot.pools.load();
        let Some(pools) = pools.as_ref() else {
            return Err(CheckoutError::Restarting);
        };
        pools.pick(write).clone()
    };
    let timeouts = Timeouts {
        wait: Some(wait),
        create: Some(create),
        recycle: None,
    };
    pool.timeout_get(&timeouts)
        .await
        .map_err(|e| pool_error(e, wait))
}

/// What a failed checkout means: a busy pool (after waiting `wait`), or a failure.
fn pool_error(e: PoolError<crate::error::ConnectError>, wait: Duration) -> CheckoutError {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => CheckoutError::Timeout(wait),
        PoolError::Timeout(t) => CheckoutError::Failed(format!("{t:?} timed out")),
        PoolError::Backend(e) => CheckoutError::Failed(e.to_string()),
        // Closed by a retiring actor: its replacement is on the way.
        PoolError::Closed => CheckoutError::Restarting,
        e => CheckoutError::Failed(e.to_string()),
    }
}

impl CheckoutError {
    /// Keeps a real failure as the server's last error; a busy pool or a retiring actor
    /// says nothing about the server (and must not hide the failure that retired it).
    fn record(self, slot: &ServerSlot) {
        if let CheckoutError::Failed(why) = self {
            slot.set_error(why);
        }
    }
}

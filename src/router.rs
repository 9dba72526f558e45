//! The router actor: single writer of the topology. It folds server reports into a
//! [`Topology`], publishes it for lock-free reads, and parks read-your-writes leases
//! that no replica can serve yet until one can, or until they must fall back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::Error;
use crate::lag::{LagHistory, ReplayRate, TimeLag};
use crate::lease::{Intent, Lease};
use crate::lsn::Lsn;
use crate::server::ServerReport;
use crate::shared::Shared;
use crate::token::Token;
use crate::topology::{
    select, smooth_rr_sequence, Health, PrimaryState, ReadNeed, Role, Topology, Within,
};

const TARGET: &str = "pgfleet::router";

/// Messages to the router actor.
///
/// Applications send [`RouterMsg::Lease`] (with `ractor::call!`) to get exactly the
/// decision `Fleet::lease` makes; the other variants are the fleet's own.
///
/// ```no_run
/// # async fn f(fleet: pgfleet::Fleet) -> Result<(), Box<dyn std::error::Error>> {
/// use pgfleet::{ractor::call, Intent, RouterMsg};
/// let router = fleet.router().await?;                 // the current router
/// let lease = call!(router, RouterMsg::Lease, Intent::read())??;
/// # drop(lease); Ok(()) }
/// ```
///
/// The router is restarted by the supervisor if it fails (at once the first time, with
/// backoff if it keeps failing); a reference to the old one then fails its calls (never
/// hangs), and `fleet.router()` returns the new one, waiting for it while it starts. A
/// lease waiting at the old router for a replica to catch up is retried at the new one;
/// leases that need no wait are decided from the last published snapshot meanwhile.
#[derive(Debug)]
#[non_exhaustive]
pub enum RouterMsg {
    /// Lease a connection for `Intent`; the reply is what `Fleet::lease` would return.
    Lease(Intent, RpcReplyPort<Result<Lease, Error>>),
    /// A server's probe report.
    #[doc(hidden)]
    Report(Box<ServerReport>),
    /// A server actor failed; it is out of rotation until it reports again.
    #[doc(hidden)]
    ServerDown {
        /// Which server.
        idx: usize,
    },
    /// A lease found a server restarted (new postmaster) or broken: its cached
    /// position is void until a fresh probe.
    #[doc(hidden)]
    Void {
        /// Which server.
        idx: usize,
    },
    /// Park a read until a replica has replayed the token, or decide a fallback.
    #[doc(hidden)]
    Wait(WaitRequest, RpcReplyPort<WaitReply>),
    /// The primary was at this position at this time (from a commit token).
    #[doc(hidden)]
    Committed(Lsn, Instant),
    /// Timer: answer waiters whose deadline passed.
    #[doc(hidden)]
    Expire,
    /// Timer: a scheduled probe of a replica that waiters expect to catch up.
    #[doc(hidden)]
    ProbeDue(usize),
}

/// A read-your-writes read that found no replica ready in the snapshot.
#[derive(Debug, Clone, Copy)]
#[doc(hidden)]
pub struct WaitRequest {
    pub(crate) token: Token,
    pub(crate) deadline: Instant,
}

/// The router's answer to a [`WaitRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum WaitReply {
    /// Server `idx` has replayed the token.
    Serve(usize),
    /// No replica will in time: fall back (how far behind the best one is, and its
    /// estimated catch-up time).
    Fallback {
        behind_bytes: Option<u64>,
        catch_up: Option<Duration>,
    },
    /// Too many waiters already.
    TooMany(usize),
}

#[derive(Debug)]
struct Waiter {
    token: Token,
    arrived: Instant,
    deadline: Instant,
    reply: RpcReplyPort<WaitReply>,
}

#[derive(Debug)]
struct Known {
    view: crate::topology::ServerView,
    /// The incarnation whose reports are current.
    restarts: u32,
    /// Reports from probes started before this are not fresh.
    void_at: Option<Instant>,
    rate: ReplayRate,
    /// When it came back after being down (slow start), if still ramping.
    returned_at: Option<Instant>,
    ever_healthy: bool,
    /// A scheduled `ProbeDue` for this server.
    probe_at: Option<Instant>,
    /// When the router last asked this server for a probe.
    last_request: Option<Instant>,
    /// When the probe behind the last report started.
    last_report_started: Option<Instant>,
    /// The configured read weight.
    weight: u32,
    /// Lower bound of its replay delay at its last report: how long after the primary
    /// writes something this replica replays it. Drives probe scheduling for waiters.
    replay_delay: Duration,
    /// Whether its last probe succeeded (a primary claim from a server whose last probe
    /// failed does not make a split brain).
    last_ok: bool,
    /// Postmaster start of the last probe that showed it in recovery: if it shows up
    /// as a primary with the same postmaster, it was promoted under our eyes and its
    /// `pg_last_wal_replay_lsn()` is the switch point (after a crash restart it would be
    /// the end of crash recovery instead, which is not).
    standby_postmaster: Option<i64>,
}

/// Router actor state.
#[derive(Debug)]
pub(crate) struct RouterState {
    shared: Arc<Shared>,
    servers: Vec<Known>,
    history: LagHistory,
    /// The timeline `history` records positions of; a newer one starts it afresh (the
    /// new primary's positions may be below the old one's lost tail).
    history_timeline: Option<u32>,
    /// Where each timeline began, learned from promoted primaries' probes.
    switches: BTreeMap<u32, Lsn>,
    system_id: Option<u64>,
    waiters: BTreeMap<(Lsn, u64), Waiter>,
    seq: u64,
    version: u64,
    /// Earliest scheduled `Expire`.
    expire_at: Option<Instant>,
}

/// The router actor.
#[derive(Debug)]
pub(crate) struct Router;

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = Arc<Shared>;

    /// Starts from the last published snapshot, so a restarted router keeps serving
    /// what its predecessor knew while fresh reports arrive.
    async fn pre_start(
        &self,
        myself: ActorRef<RouterMsg>,
        shared: Arc<Shared>,
    ) -> Result<RouterState, ActorProcessingErr> {
        let last = shared.topology.load_full();
        let servers = shared
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let mut view = last
                    .servers
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| crate::topology::ServerView::unknown(slot.weight));
                // Positions cached by a dead router are not trusted for fresh reads.
                view.fresh = false;
                Known {
                    ever_healthy: view.health == Health::Healthy,
                    view,
                    restarts: slot.restarts.load(std::sync::atomic::Ordering::Acquire),
                    void_at: None,
                    rate: ReplayRate::default(),
                    returned_at: None,
                    probe_at: None,
                    last_request: None,
                    last_report_started: None,
                    weight: slot.weight,
                    replay_delay: Duration::ZERO,
                    last_ok: false,
                    standby_postmaster: None,
                }
            })
            .collect();
        let window = (shared.config.consistency.max_lag * 4).max(Duration::from_secs(60));
        let mut history = LagHistory::new(window);
        if let Some(l) = last.primary_lsn {
            history.record(l, Instant::now());
        }
        let state = RouterState {
            system_id: last.system_id,
            version: last.version,
            shared: shared.clone(),
            servers,
            history,
            history_timeline: last.primary_timeline(),
            switches: last.switches.iter().copied().collect(),
            waiters: BTreeMap::new(),
            seq: 0,
            expire_at: None,
        };
        shared.router.store(Some(Arc::new(myself)));
        // Wakes `fleet.router()` and read-your-writes leases waiting for a router.
        shared.changed.notify_waiters();
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<RouterMsg>,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        state.shared.retire_router(myself.get_id());
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            RouterMsg::Lease(intent, reply) => {
                let shared = state.shared.clone();
                tokio::spawn(async move {
                    let _ = reply.send(crate::fleet::lease_on(shared, intent, None).await);
                });
            }
            RouterMsg::Report(r) => {
                state.apply_report(*r, now);
                state.publish(now);
                state.service_waiters(&myself, now);
            }
            RouterMsg::ServerDown { idx } => {
                if let Some(k) = state.servers.get_mut(idx) {
                    k.view.health = Health::Restarting;
                    k.view.fresh = false;
                    k.returned_at = None;
                }
                state.publish(now);
                state.service_waiters(&myself, now);
            }
            RouterMsg::Void { idx } => {
                if let Some(k) = state.servers.get_mut(idx) {
                    k.void_at = Some(now);
                    k.view.fresh = false;
                    k.view.suspect = true;
                    state.shared.slots[idx].probe_now();
                }
                state.publish(now);
            }
            RouterMsg::Committed(lsn, at) => {
                state.history.record(lsn, at);
            }
            RouterMsg::Wait(req, reply) => state.wait(&myself, req, reply, now),
            RouterMsg::Expire => {
                state.expire_at = None;
                state.service_waiters(&myself, now);
            }
            RouterMsg::ProbeDue(idx) => {
                if let Some(k) = state.servers.get_mut(idx) {
                    k.probe_at = None;
                }
                state.service_waiters(&myself, now);
            }
        }
        Ok(())
    }
}

impl RouterState {
    fn apply_report(&mut self, r: ServerReport, now: Instant) {
        let Some(k) = self.servers.get_mut(r.idx) else {
            return;
        };
        if r.restarts < k.restarts {
            return; // from an incarnation already replaced
        }
        k.restarts = r.restarts;
        k.last_report_started = Some(r.started);
        let fresh = k.void_at.is_none_or(|v| r.started >= v);
        match r.result {
            Ok(d) => {
                if let (Some(ours), true) = (self.system_id, d.system_id != 0) {
                    if ours != d.system_id {
                        k.view.health = Health::Unhealthy;
                        k.view.fresh = false;
                        self.shared.slots[r.idx].set_error(format!(
                            "system identifier {:x} is not the cluster's {:x}",
                            d.system_id, ours
                        ));
                        return;
                    }
                } else if d.system_id != 0 {
                    self.system_id = Some(d.system_id);
                }
                let was = k.view.health;
                if was != Health::Healthy
                    && k.ever_healthy
                    && !self.shared.config.fleet.slow_start.is_zero()
                {
                    k.returned_at = Some(now);
                }
                k.ever_healthy = true;
                k.view.health = Health::Healthy;
                k.view.role = if d.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                k.view.lsn = d.lsn;
                k.view.receive_lsn = d.receive_lsn;
                k.view.paused = d.paused;
                k.view.streaming = d.streaming;
                k.view.timeline = d.timeline;
                k.view.postmaster_start_us = Some(d.postmaster_start_us);
                k.view.wal_sizes = Some(d.wal_sizes);
                k.view.probe_latency = Some(r.latency);
                k.view.probed_at = Some(r.started);
                if fresh {
                    k.void_at = None;
                }
                k.view.fresh = fresh && d.lsn.is_some();
                // A probe that started before a failed checkout does not clear it.
                k.view.suspect &= !fresh;
                k.last_ok = true;
                if d.in_recovery {
                    k.standby_postmaster = Some(d.postmaster_start_us);
                } else {
                    if let (Some(t), Some(at), true) = (
                        d.timeline,
                        d.timeline_start,
                        k.standby_postmaster == Some(d.postmaster_start_us),
                    ) {
                        self.switches.entry(t).or_insert(at);
                    }
                    if d.timeline > self.history_timeline {
                        // A promotion: the old primary's positions beyond the switch
                        // point are not this history's.
                        if self.history_timeline.is_some() {
                            tracing::info!(target: TARGET, server = %self.shared.slots[r.idx].name, timeline = ?d.timeline, switch_point = ?d.timeline_start, "new timeline");
                            self.history = LagHistory::new(self.history.window());
                        }
                        self.history_timeline = d.timeline;
                    }
                }
                if let Some(l) = d.lsn {
                    if d.in_recovery {
                        k.rate.record(l, r.started);
                        k.replay_delay = self.history.delay_lower_bound(l, r.started);
                    } else {
                        self.history.record(l, r.started);
                    }
                }
                k.view.replay_rate = k.rate.bytes_per_sec();
            }
            Err(_) => {
                k.last_ok = false;
                // Any connection error voids the cached position, and new leases avoid
                // the server until a probe succeeds.
                k.view.fresh = false;
                k.view.suspect = true;
                k.void_at = Some(now);
                if r.unhealthy {
                    k.view.health = Health::Unhealthy;
                    k.returned_at = None;
                }
            }
        }
    }

    fn primary_state(&self) -> PrimaryState {
        let claims = |ok_only: bool| {
            self.servers
                .iter()
                .enumerate()
                .filter(move |(_, k)| {
                    k.view.health == Health::Healthy
                        && k.view.role == Role::Primary
                        && (k.last_ok || !ok_only)
                })
                .map(|(i, _)| i)
        };
        let mut found = claims(false);
        match (found.next(), found.next()) {
            (None, _) => PrimaryState::Missing,
            (Some(a), None) => PrimaryState::Known(a),
            // Two claims: a server whose last probe failed (an old primary dying after
            // a failover) is not a live claim; two live claims are a split brain.
            (Some(a), Some(b)) => {
                let mut live = claims(true);
                match (live.next(), live.next()) {
                    (Some(x), None) => PrimaryState::Known(x),
                    _ => PrimaryState::SplitBrain(a, b),
                }
            }
        }
    }

    /// Builds and publishes the topology.
    fn publish(&mut self, now: Instant) {
        let primary = self.primary_state();
        let primary_up = matches!(primary, PrimaryState::Known(_));
        let newest = self.history.newest();
        let slow_start = self.shared.config.fleet.slow_start;
        let mut weights_changed = false;
        for (k, slot) in self.servers.iter_mut().zip(&self.shared.slots) {
            // The weight follows the role: a promoted replica takes the primary's.
            k.weight = slot.read_weight(k.view.role);
            let v = &mut k.view;
            if v.role == Role::Replica {
                v.lag_bytes = match (newest, v.lsn) {
                    (Some(p), Some(l)) => Some(p.bytes_since(l)),
                    _ => None,
                };
                v.lag = match v.lsn {
                    // Receiver down while the primary is up: it may be arbitrarily behind.
                    Some(_) if primary_up && !v.streaming => TimeLag::Unknown,
                    Some(l) => self.history.lag(l, now),
                    None => TimeLag::Unknown,
                };
            } else {
                v.lag_bytes = Some(0);
                v.lag = TimeLag::AtMost(Duration::ZERO);
            }
            let w = match k.returned_at {
                Some(at) if !slow_start.is_zero() => {
                    let f =
                        now.saturating_duration_since(at).as_secs_f64() / slow_start.as_secs_f64();
                    if f >= 1.0 {
                        k.returned_at = None;
                        k.weight
                    } else {
                        ((f64::from(k.weight) * f).ceil() as u32).clamp(1, k.weight.max(1))
                    }
                }
                _ => k.weight,
            };
            if w != v.weight {
                v.weight = w;
                weights_changed = true;
            }
        }
        for (k, slot) in self.servers.iter().zip(&self.shared.slots) {
            let v = &k.view;
            slot.metrics.view(
                v.health == Health::Healthy,
                v.health == Health::Healthy && v.role == Role::Primary,
                v.lag_bytes,
                v.lag.approx(),
            );
        }
        self.version += 1;
        let last = self.shared.topology.load();
        let rr_seq = if weights_changed {
            smooth_rr_sequence(
                &self
                    .servers
                    .iter()
                    .map(|k| k.view.weight)
                    .collect::<Vec<_>>(),
            )
        } else {
            last.rr_seq.clone()
        };
        let t = Topology {
            weights: self.servers.iter().map(|k| k.view.weight).collect(),
            servers: self.servers.iter().map(|k| k.view.clone()).collect(),
            primary,
            primary_lsn: newest,
            system_id: self.system_id,
            rr_seq,
            max_lag_bytes: self.shared.config.consistency.max_lag_bytes,
            max_lag: self.shared.config.consistency.max_lag,
            version: self.version,
            switches: self.switches.iter().map(|(t, l)| (*t, *l)).collect(),
        };
        self.shared.publish(t);
    }

    /// Whether replica `idx` may still replay `token` (healthy and not suspect, same
    /// timeline, not paused).
    fn candidate(&self, idx: usize, token: &Token) -> bool {
        let Some(k) = self.servers.get(idx) else {
            return false;
        };
        let v = &k.view;
        v.health == Health::Healthy
            && !v.suspect
            && v.role == Role::Replica
            && v.weight > 0
            && v.timeline == Some(token.timeline())
            && !v.paused
            && !matches!(v.lag, TimeLag::Unknown)
    }

    /// When replica `idx` is expected to have replayed a token that arrived at `arrived`.
    fn expected_at(&self, idx: usize, token: &Token, arrived: Instant) -> Instant {
        let k = &self.servers[idx];
        if k.view.fresh && k.view.lsn.is_some_and(|l| l >= token.lsn()) {
            return arrived;
        }
        // Written no later than it was first seen on the primary, or than it arrived.
        let written = self
            .history
            .time_of(token.lsn())
            .map_or(arrived, |t| t.min(arrived));
        written + k.replay_delay
    }

    fn wait(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        req: WaitRequest,
        reply: RpcReplyPort<WaitReply>,
        now: Instant,
    ) {
        let topo = self.shared.topology.load();
        if let Some(i) = self.pick_replica(&topo, &req.token) {
            let _ = reply.send(WaitReply::Serve(i));
            return;
        }
        let max = self.shared.config.fleet.max_waiters;
        if self.waiters.len() >= max {
            let _ = reply.send(WaitReply::TooMany(max));
            return;
        }
        let deadline = req.deadline;
        // A token far past the primary's last reported position is forged or from a lost
        // history (a real one is ahead only by the WAL written since the last probe): no
        // replica will reach it in time, so fall back at once.
        let beyond_primary = topo.primary_lsn.is_some_and(|p| {
            req.token.lsn().bytes_since(p) > self.shared.config.consistency.max_lag_bytes
        });
        if beyond_primary || self.best_candidate(&req.token, now, deadline).is_none() {
            // No replica can catch up in time (paused, too far behind): at once.
            let _ = reply.send(self.fallback_reply(&req.token));
            return;
        }
        self.seq += 1;
        self.shared
            .counters
            .ryw_waited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiters.insert(
            (req.token.lsn(), self.seq),
            Waiter {
                token: req.token,
                arrived: now,
                deadline,
                reply,
            },
        );
        self.schedule_expire(myself, deadline, now);
        self.service_waiters(myself, now);
    }

    /// The replica expected to replay `token` first, and when, if within `deadline`.
    fn best_candidate(
        &self,
        token: &Token,
        arrived: Instant,
        deadline: Instant,
    ) -> Option<(usize, Instant)> {
        (0..self.servers.len())
            .filter(|&i| self.candidate(i, token))
            .map(|i| (i, self.expected_at(i, token, arrived)))
            .filter(|&(_, at)| at <= deadline)
            .min_by_key(|&(_, at)| at)
    }

    /// When replica `idx` should next be probed for a waiter that arrived at `arrived`
    /// and is expected to be replayed there at `expected`; `None` when a probe already
    /// requested after the waiter arrived is still under way (it will answer for it).
    fn probe_time(
        &self,
        idx: usize,
        arrived: Instant,
        expected: Instant,
        now: Instant,
    ) -> Option<Instant> {
        let k = &self.servers[idx];
        if let Some(req) = k.last_request {
            if req >= arrived && k.last_report_started.is_none_or(|s| s < req) {
                return None;
            }
        }
        let mut at = expected.max(now);
        if let Some(s) = k.last_report_started.filter(|&s| s >= arrived) {
            // A probe started after the waiter arrived came back without its token:
            // the estimate was short. Check again after a fraction of the replay delay.
            let step = k
                .replay_delay
                .div_f64(4.0)
                .clamp(Duration::from_millis(1), Duration::from_millis(10));
            at = at.max(s + step);
        }
        Some(at)
    }

    fn pick_replica(&self, topo: &Topology, token: &Token) -> Option<usize> {
        let need = ReadNeed::After(*token, Within::Any);
        select(
            self.shared.config.fleet.strategy,
            &topo.weights,
            &topo.rr_seq,
            &self.shared.rr,
            |i| topo.servers[i].role == Role::Replica && topo.can_serve(i, &need),
            |i| {
                self.shared.slots[i]
                    .in_flight
                    .load(std::sync::atomic::Ordering::Relaxed)
            },
        )
    }

    fn fallback_reply(&self, token: &Token) -> WaitReply {
        // The replica closest to the token.
        let best = self
            .servers
            .iter()
            .filter(|k| k.view.role == Role::Replica && k.view.health == Health::Healthy)
            .filter_map(|k| k.view.lsn.map(|l| (token.lsn().bytes_since(l), k)))
            .min_by_key(|(b, _)| *b);
        match best {
            Some((behind, k)) => WaitReply::Fallback {
                behind_bytes: Some(behind),
                catch_up: if k.view.paused {
                    None
                } else {
                    k.rate.catch_up(behind)
                },
            },
            None => WaitReply::Fallback {
                behind_bytes: None,
                catch_up: None,
            },
        }
    }

    fn schedule_probe(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        idx: usize,
        at: Instant,
        now: Instant,
    ) {
        let k = &mut self.servers[idx];
        if at <= now {
            k.last_request = Some(now);
            self.shared.slots[idx].probe_now();
            return;
        }
        if k.probe_at.is_some_and(|p| p <= at) {
            return;
        }
        k.probe_at = Some(at);
        myself.send_after(at - now, move || RouterMsg::ProbeDue(idx));
    }

    fn schedule_expire(&mut self, myself: &ActorRef<RouterMsg>, deadline: Instant, now: Instant) {
        if self.expire_at.is_some_and(|e| e <= deadline) {
            return;
        }
        self.expire_at = Some(deadline);
        myself.send_after(deadline.saturating_duration_since(now), || {
            RouterMsg::Expire
        });
    }

    /// Answers every waiter a replica can now serve, falls back those that cannot be
    /// served in time, and schedules the next probes for the rest.
    fn service_waiters(&mut self, myself: &ActorRef<RouterMsg>, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        let topo = self.shared.topology.load_full();
        let keys: Vec<(Lsn, u64)> = self.waiters.keys().copied().collect();
        let mut next_probe: Vec<Option<Instant>> = vec![None; self.servers.len()];
        let mut next_expire: Option<Instant> = None;
        for key in keys {
            let Some(w) = self.waiters.get(&key) else {
                continue;
            };
            let token = w.token;
            if let Some(i) = self.pick_replica(&topo, &token) {
                if let Some(w) = self.waiters.remove(&key) {
                    let _ = w.reply.send(WaitReply::Serve(i));
                }
                continue;
            }
            let (arrived, deadline) = (w.arrived, w.deadline);
            let best = self.best_candidate(&token, arrived, deadline);
            let Some((idx, expected)) = best.filter(|_| deadline > now) else {
                let reply = self.fallback_reply(&token);
                if let Some(w) = self.waiters.remove(&key) {
                    let _ = w.reply.send(reply);
                }
                continue;
            };
            if let Some(at) = self.probe_time(idx, arrived, expected, now) {
                let slot = &mut next_probe[idx];
                if slot.is_none_or(|s| at < s) {
                    *slot = Some(at);
                }
            }
            if next_expire.is_none_or(|e| deadline < e) {
                next_expire = Some(deadline);
            }
        }
        for (idx, at) in next_probe.into_iter().enumerate() {
            if let Some(at) = at {
                self.schedule_probe(myself, idx, at, now);
            }
        }
        if let Some(e) = next_expire {
            self.schedule_expire(myself, e, now);
        }
        tracing::trace!(target: TARGET, waiting = self.waiters.len(), "waiters serviced");
    }
}

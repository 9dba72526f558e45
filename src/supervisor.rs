//! The supervisor: one for the whole fleet. For every cluster it spawns the router, one
//! server actor per server and the LISTEN/NOTIFY listener, linked to itself, and
//! restarts whichever fails — servers and listeners after an exponential backoff with
//! jitter (through a timer message, never by sleeping in the supervision handler),
//! routers at once after a first failure and with the same backoff if they keep failing.
//! Restart messages carry the cluster's generation (epoch): one that fires after a
//! reload replaced the generation it was meant for is ignored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::backoff::Backoff;
use crate::listener::Listener;
use crate::router::{Router, RouterMsg};
use crate::server::{Server, ServerArgs};
use crate::shared::Shared;

const TARGET: &str = "pgfleet::supervisor";

/// Messages to the supervisor. `c` is a cluster's index in the supervisor's list;
/// `epoch` the generation of that cluster the message was scheduled for.
#[derive(Debug)]
pub(crate) enum SupervisorMsg {
    /// Backoff elapsed: start server `idx` of cluster `c` again.
    RestartServer { c: usize, idx: usize, epoch: u64 },
    /// Start cluster `c`'s router again.
    RestartRouter { c: usize, epoch: u64 },
    /// Backoff elapsed: start cluster `c`'s LISTEN/NOTIFY listener again.
    RestartListener { c: usize, epoch: u64 },
    /// A reload: start actors for these new generations (one per cluster, in order)
    /// in place of the current ones, and reply with the replaced actors, still running
    /// (the caller stops them once the new generation is published).
    Reload(Vec<Arc<Shared>>, ractor::RpcReplyPort<Vec<ActorCell>>),
    /// Stop every child, wait at most this long for them to stop (their `post_stop`
    /// runs), then stop the supervisor.
    Shutdown(Duration),
}

#[derive(Debug)]
struct Child {
    cell: Option<ActorCell>,
    /// Restarts without a stable period in between.
    backoff: Backoff,
    /// When the current incarnation started.
    started: Instant,
}

impl Child {
    fn new(cell: ActorCell) -> Self {
        Child {
            cell: Some(cell),
            backoff: Backoff::default(),
            started: Instant::now(),
        }
    }

    /// The backoff before restarting this child, which stayed up since `started`.
    fn restart_delay(&mut self, cfg: &crate::config::RestartConfig) -> Duration {
        self.backoff.next_delay(Some(self.started.elapsed()), cfg)
    }

    fn is(&self, id: ractor::ActorId) -> bool {
        self.cell.as_ref().is_some_and(|c| c.get_id() == id)
    }
}

/// One cluster's actors.
#[derive(Debug)]
struct Cluster {
    /// Which generation of the cluster this is: 0 at start, one more per reload.
    epoch: u64,
    shared: Arc<Shared>,
    servers: Vec<Child>,
    /// The router: restarted at once after its first failure (waiting reads need it),
    /// with backoff if it keeps failing.
    router: Child,
    /// The LISTEN/NOTIFY listener (restarted with backoff, like a server).
    listener: Child,
}

/// Supervisor state.
#[derive(Debug)]
pub(crate) struct SupervisorState {
    clusters: Vec<Cluster>,
    stopping: bool,
}

/// The supervisor actor.
#[derive(Debug)]
pub(crate) struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Vec<Arc<Shared>>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        clusters: Vec<Arc<Shared>>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut out = Vec::with_capacity(clusters.len());
        for shared in clusters {
            out.push(spawn_cluster(&myself, shared, 0).await?);
        }
        Ok(SupervisorState {
            clusters: out,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if state.stopping {
            return Ok(());
        }
        match msg {
            SupervisorMsg::RestartServer { c, idx, epoch } => {
                let Some(cluster) = state.clusters.get_mut(c) else {
                    return Ok(());
                };
                // Meant for a generation a reload replaced, or already running.
                if cluster.epoch != epoch {
                    cluster
                        .shared
                        .counters
                        .stale_restarts
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if cluster.servers.get(idx).is_none_or(|s| s.cell.is_some()) {
                    return Ok(());
                }
                let slot = &cluster.shared.slots[idx];
                let restarts = slot.restarts.load(Ordering::Acquire);
                let args = ServerArgs {
                    shared: cluster.shared.clone(),
                    idx,
                    restarts,
                };
                match Actor::spawn_linked(None, Server, args, myself.get_cell()).await {
                    Ok((s, _)) => {
                        slot.restarting.store(false, Ordering::Release);
                        let child = &mut cluster.servers[idx];
                        child.cell = Some(s.get_cell());
                        child.started = Instant::now();
                        tracing::info!(target: TARGET, server = %slot.name, restarts, "server actor restarted");
                    }
                    Err(e) => {
                        // pre_start does no I/O; still, never give up silently.
                        slot.set_error(format!("restart failed: {e}"));
                        schedule_restart(&myself, cluster, c, idx);
                    }
                }
            }
            SupervisorMsg::RestartRouter { c, epoch } => {
                let Some(cluster) = state.clusters.get_mut(c) else {
                    return Ok(());
                };
                if cluster.epoch != epoch || cluster.router.cell.is_some() {
                    return Ok(());
                }
                match Actor::spawn_linked(None, Router, cluster.shared.clone(), myself.get_cell())
                    .await
                {
                    Ok((r, _)) => {
                        cluster.router.cell = Some(r.get_cell());
                        cluster.router.started = Instant::now();
                        crate::metrics::actor_restarted(&cluster.shared.cluster, "router");
                    }
                    Err(e) => {
                        tracing::error!(target: TARGET, error = %e, "router restart failed; retrying");
                        schedule_router_restart(&myself, cluster, c, false);
                    }
                }
            }
            SupervisorMsg::RestartListener { c, epoch } => {
                let Some(cluster) = state.clusters.get_mut(c) else {
                    return Ok(());
                };
                if cluster.epoch != epoch || cluster.listener.cell.is_some() {
                    return Ok(());
                }
                match Actor::spawn_linked(None, Listener, cluster.shared.clone(), myself.get_cell())
                    .await
                {
                    Ok((l, _)) => {
                        cluster.listener.cell = Some(l.get_cell());
                        cluster.listener.started = Instant::now();
                        tracing::info!(target: TARGET, "listener restarted");
                        crate::metrics::actor_restarted(&cluster.shared.cluster, "listener");
                    }
                    Err(e) => {
                        tracing::error!(target: TARGET, error = %e, "listener restart failed; retrying");
                        schedule_listener_restart(&myself, cluster, c);
                    }
                }
            }
            SupervisorMsg::Reload(generations, reply) => {
                let mut replaced = Vec::new();
                for (c, shared) in generations.into_iter().enumerate() {
                    let Some(slot) = state.clusters.get_mut(c) else {
                        continue;
                    };
                    let mut fresh = spawn_cluster(&myself, shared, slot.epoch + 1).await?;
                    std::mem::swap(slot, &mut fresh);
                    replaced.extend(fresh.router.cell.take());
                    replaced.extend(fresh.listener.cell.take());
                    replaced.extend(fresh.servers.iter_mut().filter_map(|s| s.cell.take()));
                }
                let _ = reply.send(replaced);
            }
            SupervisorMsg::Shutdown(wait) => {
                state.stopping = true;
                for cluster in &mut state.clusters {
                    if let Some(r) = cluster.router.cell.take() {
                        r.stop(None);
                    }
                    if let Some(l) = cluster.listener.cell.take() {
                        l.stop(None);
                    }
                    // Ends every subscription stream; no new ones.
                    cluster.shared.listen.close();
                    for s in &mut cluster.servers {
                        if let Some(cell) = s.cell.take() {
                            cell.stop(None);
                        }
                    }
                }
                // A supervisor that stops first kills the children still running, and a
                // killed actor runs no post_stop (its probe would outlive the fleet).
                myself
                    .get_cell()
                    .stop_children_and_wait(None, Some(wait))
                    .await;
                myself.stop(None);
            }
        }
        Ok(())
    }

    /// Overrides ractor's default (which stops the supervisor when any child ends).
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if state.stopping {
            return Ok(());
        }
        let id = cell.get_id();
        for (c, cluster) in state.clusters.iter_mut().enumerate() {
            if cluster.router.is(id) {
                tracing::error!(target: TARGET, reason = %why, "router ended; restarting it");
                cluster.router.cell = None;
                // ractor runs no post_stop for a failed actor.
                cluster.shared.retire_router(id);
                schedule_router_restart(&myself, cluster, c, true);
                return Ok(());
            }
            if cluster.listener.is(id) {
                tracing::error!(target: TARGET, reason = %why, "listener ended; restarting after backoff");
                cluster.listener.cell = None;
                // No post_stop after a failure: unpublish it here.
                cluster.shared.listen.forget_listener(id);
                schedule_listener_restart(&myself, cluster, c);
                return Ok(());
            }
            let Some(idx) = cluster.servers.iter().position(|s| s.is(id)) else {
                continue;
            };
            let slot = &cluster.shared.slots[idx];
            tracing::warn!(target: TARGET, server = %slot.name, reason = %why, "server actor ended; restarting after backoff");
            slot.set_error(why);
            slot.restarting.store(true, Ordering::Release);
            // ractor runs no post_stop for a failed actor.
            slot.retire(id);
            slot.restarts.fetch_add(1, Ordering::AcqRel);
            slot.metrics.restarted();
            cluster.servers[idx].cell = None;
            // Out of rotation at once.
            if let Some(router) = cluster.shared.router.load().as_ref() {
                let _ = router.cast(RouterMsg::ServerDown { idx });
            }
            schedule_restart(&myself, cluster, c, idx);
            return Ok(());
        }
        Ok(())
    }
}

/// Spawns one cluster generation's router, server actors and listener, linked to the
/// supervisor. None of their `pre_start`s does I/O, so an unreachable server cannot
/// make this fail.
async fn spawn_cluster(
    myself: &ActorRef<SupervisorMsg>,
    shared: Arc<Shared>,
    epoch: u64,
) -> Result<Cluster, ActorProcessingErr> {
    // Router first, so the servers' first reports have somewhere to go.
    let (router, _) = Actor::spawn_linked(None, Router, shared.clone(), myself.get_cell()).await?;
    let mut servers = Vec::with_capacity(shared.slots.len());
    for idx in 0..shared.slots.len() {
        let args = ServerArgs {
            shared: shared.clone(),
            idx,
            restarts: shared.slots[idx].restarts.load(Ordering::Acquire),
        };
        let (s, _) = Actor::spawn_linked(None, Server, args, myself.get_cell()).await?;
        servers.push(Child::new(s.get_cell()));
    }
    let (listener, _) =
        Actor::spawn_linked(None, Listener, shared.clone(), myself.get_cell()).await?;
    Ok(Cluster {
        epoch,
        shared,
        servers,
        router: Child::new(router.get_cell()),
        listener: Child::new(listener.get_cell()),
    })
}

fn schedule_restart(myself: &ActorRef<SupervisorMsg>, cluster: &mut Cluster, c: usize, idx: usize) {
    let delay = cluster.servers[idx].restart_delay(&cluster.shared.config.fleet.restart);
    let epoch = cluster.epoch;
    myself.send_after(delay, move || SupervisorMsg::RestartServer {
        c,
        idx,
        epoch,
    });
}

/// `came_up`: the router being replaced ran (it failed); `false` after a failed spawn,
/// which counts as never having come up, so its backoff keeps growing.
fn schedule_router_restart(
    myself: &ActorRef<SupervisorMsg>,
    cluster: &mut Cluster,
    c: usize,
    came_up: bool,
) {
    let cfg = &cluster.shared.config.fleet.restart;
    // Capped at a second: while no router runs the published snapshot is frozen (lags
    // age unseen), so a failing router is retried at least that often.
    let delay = if came_up {
        cluster.router.restart_delay(cfg)
    } else {
        cluster.router.backoff.next_delay(None, cfg)
    }
    .min(Duration::from_secs(1));
    let epoch = cluster.epoch;
    if came_up && cluster.router.backoff.in_a_row() <= 1 {
        let _ = myself.cast(SupervisorMsg::RestartRouter { c, epoch });
    } else {
        myself.send_after(delay, move || SupervisorMsg::RestartRouter { c, epoch });
    }
}

fn schedule_listener_restart(myself: &ActorRef<SupervisorMsg>, cluster: &mut Cluster, c: usize) {
    let delay = cluster
        .listener
        .restart_delay(&cluster.shared.config.fleet.restart);
    let epoch = cluster.epoch;
    myself.send_after(delay, move || SupervisorMsg::RestartListener { c, epoch });
}

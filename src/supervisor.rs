//! The supervisor: spawns the router, one server actor per server and the LISTEN/NOTIFY
//! listener, linked to itself, and restarts whichever fails — servers and the listener
//! after an exponential backoff with jitter (through a timer message, never by sleeping
//! in the supervision handler), the router at once.

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

/// Messages to the supervisor.
#[derive(Debug)]
pub(crate) enum SupervisorMsg {
    /// Backoff elapsed: start server `idx` again.
    RestartServer(usize),
    /// Start the router again.
    RestartRouter,
    /// Backoff elapsed: start the LISTEN/NOTIFY listener again.
    RestartListener,
    /// Stop every child and then the supervisor.
    Shutdown,
}

#[derive(Debug)]
struct Child {
    cell: Option<ActorCell>,
    /// Restarts without a stable period in between.
    backoff: Backoff,
    /// When the current incarnation started.
    started: Instant,
}

/// Supervisor state.
#[derive(Debug)]
pub(crate) struct SupervisorState {
    shared: Arc<Shared>,
    servers: Vec<Child>,
    router: Option<ActorCell>,
    /// The LISTEN/NOTIFY listener (restarted with backoff, like a server).
    listener: Child,
    stopping: bool,
}

/// The supervisor actor.
#[derive(Debug)]
pub(crate) struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        // Router first, so the servers' first reports have somewhere to go.
        let (router, _) =
            Actor::spawn_linked(None, Router, shared.clone(), myself.get_cell()).await?;
        let mut servers = Vec::with_capacity(shared.slots.len());
        for idx in 0..shared.slots.len() {
            let args = ServerArgs {
                shared: shared.clone(),
                idx,
                restarts: 0,
            };
            // Server pre_start does no I/O, so this cannot fail on an unreachable server.
            let (s, _) = Actor::spawn_linked(None, Server, args, myself.get_cell()).await?;
            servers.push(Child {
                cell: Some(s.get_cell()),
                backoff: Backoff::default(),
                started: Instant::now(),
            });
        }
        // Listener pre_start does no I/O either: it connects after start.
        let (listener, _) =
            Actor::spawn_linked(None, Listener, shared.clone(), myself.get_cell()).await?;
        Ok(SupervisorState {
            shared,
            servers,
            router: Some(router.get_cell()),
            listener: Child {
                cell: Some(listener.get_cell()),
                backoff: Backoff::default(),
                started: Instant::now(),
            },
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::RestartServer(idx) if !state.stopping => {
                let slot = &state.shared.slots[idx];
                let restarts = slot.restarts.load(Ordering::Acquire);
                let args = ServerArgs {
                    shared: state.shared.clone(),
                    idx,
                    restarts,
                };
                match Actor::spawn_linked(None, Server, args, myself.get_cell()).await {
                    Ok((s, _)) => {
                        slot.restarting.store(false, Ordering::Release);
                        let child = &mut state.servers[idx];
                        child.cell = Some(s.get_cell());
                        child.started = Instant::now();
                        tracing::info!(target: TARGET, server = %slot.name, restarts, "server actor restarted");
                    }
                    Err(e) => {
                        // pre_start does no I/O; still, never give up silently.
                        slot.set_error(format!("restart failed: {e}"));
                        schedule_restart(&myself, state, idx);
                    }
                }
            }
            SupervisorMsg::RestartRouter if !state.stopping => {
                match Actor::spawn_linked(None, Router, state.shared.clone(), myself.get_cell())
                    .await
                {
                    Ok((r, _)) => {
                        state.router = Some(r.get_cell());
                        crate::metrics::actor_restarted("router");
                    }
                    Err(e) => {
                        tracing::error!(target: TARGET, error = %e, "router restart failed; retrying");
                        myself.send_after(Duration::from_millis(100), || {
                            SupervisorMsg::RestartRouter
                        });
                    }
                }
            }
            SupervisorMsg::RestartListener if !state.stopping => {
                match Actor::spawn_linked(None, Listener, state.shared.clone(), myself.get_cell())
                    .await
                {
                    Ok((l, _)) => {
                        state.listener.cell = Some(l.get_cell());
                        state.listener.started = Instant::now();
                        tracing::info!(target: TARGET, "listener restarted");
                        crate::metrics::actor_restarted("listener");
                    }
                    Err(e) => {
                        tracing::error!(target: TARGET, error = %e, "listener restart failed; retrying");
                        schedule_listener_restart(&myself, state);
                    }
                }
            }
            SupervisorMsg::Shutdown => {
                state.stopping = true;
                if let Some(r) = state.router.take() {
                    r.stop(None);
                }
                if let Some(l) = state.listener.cell.take() {
                    l.stop(None);
                }
                // Ends every subscription stream; no new ones.
                state.shared.listen.close();
                for c in &mut state.servers {
                    if let Some(cell) = c.cell.take() {
                        cell.stop(None);
                    }
                }
                myself.stop(None);
            }
            _ => {}
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
        if state.router.as_ref().is_some_and(|r| r.get_id() == id) {
            tracing::error!(target: TARGET, reason = %why, "router ended; restarting it");
            state.router = None;
            // ractor runs no post_stop for a failed actor.
            state.shared.retire_router(id);
            let _ = myself.cast(SupervisorMsg::RestartRouter);
            return Ok(());
        }
        if state
            .listener
            .cell
            .as_ref()
            .is_some_and(|l| l.get_id() == id)
        {
            tracing::error!(target: TARGET, reason = %why, "listener ended; restarting after backoff");
            state.listener.cell = None;
            // No post_stop after a failure: unpublish it here.
            state.shared.listen.forget_listener(id);
            schedule_listener_restart(&myself, state);
            return Ok(());
        }
        let Some(idx) = state
            .servers
            .iter()
            .position(|c| c.cell.as_ref().is_some_and(|c| c.get_id() == id))
        else {
            return Ok(());
        };
        let slot = &state.shared.slots[idx];
        tracing::warn!(target: TARGET, server = %slot.name, reason = %why, "server actor ended; restarting after backoff");
        slot.set_error(why);
        slot.restarting.store(true, Ordering::Release);
        // ractor runs no post_stop for a failed actor.
        slot.retire(id);
        slot.restarts.fetch_add(1, Ordering::AcqRel);
        slot.metrics.restarted();
        state.servers[idx].cell = None;
        // Out of rotation at once.
        if let Some(router) = state.shared.router.load().as_ref() {
            let _ = router.cast(RouterMsg::ServerDown { idx });
        }
        schedule_restart(&myself, state, idx);
        Ok(())
    }
}

impl Child {
    /// The backoff before restarting this child, which stayed up since `started`.
    fn restart_delay(&mut self, cfg: &crate::config::RestartConfig) -> Duration {
        self.backoff.next_delay(Some(self.started.elapsed()), cfg)
    }
}

fn schedule_restart(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, idx: usize) {
    let delay = state.servers[idx].restart_delay(&state.shared.config.fleet.restart);
    myself.send_after(delay, move || SupervisorMsg::RestartServer(idx));
}

fn schedule_listener_restart(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
    let delay = state
        .listener
        .restart_delay(&state.shared.config.fleet.restart);
    myself.send_after(delay, || SupervisorMsg::RestartListener);
}

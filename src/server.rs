//! The server actor: one per configured server. Owns the server's pools and a
//! dedicated probe connection, probes on a timer and on demand, and reports to the
//! router.
//!
//! The probe needs only the `pg_monitor` role (for `pg_stat_wal_receiver`; every other
//! function it calls is executable by any role): `GRANT pg_monitor TO app;`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tokio_postgres::Statement;

use crate::conn::{self, build_pool, describe, ConnRegistry, PgConn};
use crate::lsn::Lsn;
use crate::router::RouterMsg;
use crate::shared::{Pools, Shared};
use tracing::Instrument;

const TARGET: &str = "pgfleet::server";

/// One probe: role, positions, replication state and identity, in one round trip.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, \
    pg_last_wal_receive_lsn(), \
    CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
    EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'), \
    (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8, \
    (SELECT system_identifier FROM pg_control_system()), \
    CASE WHEN pg_is_in_recovery() THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int4 END, \
    CASE WHEN NOT pg_is_in_recovery() THEN pg_last_wal_replay_lsn() END";

/// Read once per probe connection.
const SIZES_SQL: &str = "SELECT current_setting('wal_block_size')::int8, \
    pg_size_bytes(current_setting('wal_segment_size'))";

/// Messages to a server actor.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerMsg {
    /// Probe timer tick; skipped while a probe is in flight.
    Tick,
    /// Probe now; one probe in flight serves every asker (another follows it at once).
    ProbeNow,
    /// A probe finished (sent by the probe task).
    #[doc(hidden)]
    ProbeDone(Box<ProbeOutcome>),
    /// Test hook: make the actor fail with this message, as a crash would.
    #[doc(hidden)]
    Fail(String),
}

/// What one probe saw.
#[derive(Debug, Clone)]
pub(crate) struct ProbeData {
    /// `pg_is_in_recovery()`.
    pub(crate) in_recovery: bool,
    /// Replay position on a standby, insert position on a primary (page-normalised).
    pub(crate) lsn: Option<Lsn>,
    /// Receive position on a standby.
    pub(crate) receive_lsn: Option<Lsn>,
    /// Replay paused.
    pub(crate) paused: bool,
    /// WAL receiver streaming.
    pub(crate) streaming: bool,
    /// Postmaster start time, µs since the epoch.
    pub(crate) postmaster_start_us: i64,
    /// `pg_control_system().system_identifier`.
    pub(crate) system_id: u64,
    /// Current timeline; `None` on a standby without a WAL receiver.
    pub(crate) timeline: Option<u32>,
    /// `wal_block_size`, `wal_segment_size`.
    pub(crate) wal_sizes: (u64, u64),
    /// On a primary promoted since its postmaster started: where its timeline began
    /// (`pg_last_wal_replay_lsn()` stays at the end of recovery, which is the switch
    /// point). `None` otherwise.
    pub(crate) timeline_start: Option<Lsn>,
}

/// A finished probe, as the task hands it back.
#[derive(Debug)]
#[doc(hidden)]
pub struct ProbeOutcome {
    conn: Option<ProbeConn>,
    started: Instant,
    latency: Duration,
    result: Result<ProbeData, String>,
}

/// What a server reports to the router after each probe.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct ServerReport {
    /// Which server.
    pub(crate) idx: usize,
    /// The actor's incarnation (supervisor restart count).
    pub(crate) restarts: u32,
    /// When the probe started: data older than the last void event is not fresh.
    pub(crate) started: Instant,
    /// Probe round trip.
    pub(crate) latency: Duration,
    /// The data, or why the probe failed.
    pub(crate) result: Result<ProbeData, String>,
    /// Whether `failure_threshold` consecutive probes have failed.
    pub(crate) unhealthy: bool,
}

#[derive(Debug)]
struct ProbeConn {
    conn: PgConn,
    stmt: Statement,
    wal_sizes: (u64, u64),
}

/// Arguments of a server actor.
#[derive(Debug)]
pub(crate) struct ServerArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) idx: usize,
    pub(crate) restarts: u32,
}

/// The actor's state.
#[derive(Debug)]
pub(crate) struct ServerState {
    shared: Arc<Shared>,
    idx: usize,
    restarts: u32,
    probe: Option<ProbeConn>,
    in_flight: bool,
    rerun: bool,
    failures: u32,
    down_since: Option<Instant>,
    ticker: Option<JoinHandle<()>>,
    /// The probe in flight, aborted when the actor stops (so none outlives it).
    probe_task: Option<tokio::task::AbortHandle>,
    pools: Arc<Pools>,
    /// `pools.owner` when this actor took them.
    pools_owner: u64,
}

/// The server actor (unit struct, as ractor actors are).
#[derive(Debug)]
pub(crate) struct Server;

impl Actor for Server {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = ServerArgs;

    /// Fast and infallible for an unreachable server: builds the (lazy) pools and
    /// returns; connecting happens in probes after start.
    async fn pre_start(
        &self,
        myself: ActorRef<ServerMsg>,
        args: ServerArgs,
    ) -> Result<ServerState, ActorProcessingErr> {
        let shared = args.shared;
        let slot = &shared.slots[args.idx];
        let pg = slot.url.pg_config();
        let rollback = shared.query_timeout();
        // A reload hands over the pools of a server whose settings did not change: its
        // connections are kept. A restart after a failure always starts afresh.
        let adopted = slot.pools.load_full();
        let registry = Arc::new(ConnRegistry::default());
        let pools = if let Some(p) = adopted {
            p
        } else {
            Arc::new(Pools {
                read: build_pool(
                    pg,
                    &slot.tls,
                    true,
                    slot.pool_size,
                    shared.net,
                    rollback,
                    registry.clone(),
                )?,
                write: build_pool(
                    pg,
                    &slot.tls,
                    false,
                    slot.pool_size,
                    shared.net,
                    rollback,
                    registry.clone(),
                )?,
                registry,
                owner: std::sync::atomic::AtomicU64::new(0),
            })
        };
        let owner = pools.owner.load(std::sync::atomic::Ordering::Acquire);
        slot.pools_owner
            .store(owner, std::sync::atomic::Ordering::Release);
        slot.pools.store(Some(pools.clone()));
        slot.actor.store(Some(Arc::new(myself)));
        Ok(ServerState {
            shared: shared.clone(),
            idx: args.idx,
            restarts: args.restarts,
            probe: None,
            in_flight: false,
            rerun: false,
            failures: 0,
            down_since: None,
            ticker: None,
            probe_task: None,
            pools,
            pools_owner: owner,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ServerMsg>,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        let interval = state.shared.config.fleet.probe_interval;
        state.ticker = Some(myself.send_interval(interval, || ServerMsg::Tick));
        start_probe(&myself, state);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ServerMsg>,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        if let Some(p) = state.probe_task.take() {
            p.abort();
        }
        state.shared.slots[state.idx].retire(myself.get_id());
        // Pools a reload handed to the next generation stay open.
        if state.pools.owner.load(std::sync::atomic::Ordering::Acquire) == state.pools_owner {
            state.pools.close();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ServerMsg>,
        msg: ServerMsg,
        state: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::Tick => {
                if !state.in_flight {
                    start_probe(&myself, state);
                }
            }
            ServerMsg::ProbeNow => {
                if state.in_flight {
                    state.rerun = true;
                } else {
                    count_demand_probe(state);
                    start_probe(&myself, state);
                }
            }
            ServerMsg::ProbeDone(outcome) => {
                state.in_flight = false;
                on_probe_done(state, *outcome)?;
                if std::mem::take(&mut state.rerun) {
                    count_demand_probe(state);
                    start_probe(&myself, state);
                }
            }
            ServerMsg::Fail(why) => return Err(why.into()),
        }
        Ok(())
    }
}

/// Counts a probe run on request (not on the timer): the cost of read-your-writes waits.
fn count_demand_probe(state: &ServerState) {
    state.shared.slots[state.idx]
        .demand_probes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn start_probe(myself: &ActorRef<ServerMsg>, state: &mut ServerState) {
    state.in_flight = true;
    let conn = state.probe.take();
    let shared = state.shared.clone();
    let idx = state.idx;
    let me = myself.clone();
    let span = tracing::debug_span!(target: TARGET, "probe", server = %shared.slots[idx].name);
    let task = tokio::spawn(
        async move {
            let started = Instant::now();
            let (conn, result) = run_probe(&shared, idx, conn).await;
            let outcome = ProbeOutcome {
                conn,
                started,
                latency: started.elapsed(),
                result,
            };
            // The actor may have stopped meanwhile; then the outcome is simply dropped.
            let _ = me.cast(ServerMsg::ProbeDone(Box::new(outcome)));
        }
        .instrument(span),
    );
    state.probe_task = Some(task.abort_handle());
}

async fn open_probe_conn(shared: &Shared, idx: usize) -> Result<ProbeConn, String> {
    let slot = &shared.slots[idx];
    let conn = conn::connect(slot.url.pg_config(), &slot.tls, &shared.net, None)
        .await
        .map_err(|e| e.to_string())?;
    let setup = async {
        let row = conn.client.query_one(SIZES_SQL, &[]).await?;
        let sizes = (
            row.try_get::<_, i64>(0)? as u64,
            row.try_get::<_, i64>(1)? as u64,
        );
        let stmt = conn.client.prepare(PROBE_SQL).await?;
        Ok::<_, tokio_postgres::Error>((sizes, stmt))
    };
    match tokio::time::timeout(shared.config.fleet.probe_timeout, setup).await {
        Ok(Ok((wal_sizes, stmt))) => Ok(ProbeConn {
            conn,
            stmt,
            wal_sizes,
        }),
        Ok(Err(e)) => Err(format!("probe setup: {}", describe(&e))),
        Err(_) => Err("probe setup timed out".into()),
    }
}

async fn run_probe(
    shared: &Shared,
    idx: usize,
    conn: Option<ProbeConn>,
) -> (Option<ProbeConn>, Result<ProbeData, String>) {
    let pc = match conn {
        Some(c) if !c.conn.client.is_closed() => c,
        // The reconnect is part of the probe: bounded by probe_timeout too, so a hung
        // server fails `failure_threshold` probes in about failure_threshold ×
        // probe_timeout (and its connections are failed then).
        _ => {
            let timeout = shared.config.fleet.probe_timeout;
            match tokio::time::timeout(timeout, open_probe_conn(shared, idx)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return (None, Err(e)),
                Err(_) => {
                    return (
                        None,
                        Err(format!("probe connect timed out after {timeout:?}")),
                    )
                }
            }
        }
    };
    let query = pc.conn.client.query_one(&pc.stmt, &[]);
    match tokio::time::timeout(shared.config.fleet.probe_timeout, query).await {
        Ok(Ok(row)) => {
            let data = parse_probe(&row, pc.wal_sizes, pc.conn.postmaster_start_us);
            match data {
                Ok(d) => (Some(pc), Ok(d)),
                Err(e) => (None, Err(e)),
            }
        }
        Ok(Err(e)) => (None, Err(format!("probe query: {}", describe(&e)))),
        // Dropping the connection: a late reply would stay queued on it.
        Err(_) => (
            None,
            Err(format!(
                "probe timed out after {:?}",
                shared.config.fleet.probe_timeout
            )),
        ),
    }
}

fn parse_probe(
    row: &tokio_postgres::Row,
    wal_sizes: (u64, u64),
    conn_start_us: i64,
) -> Result<ProbeData, String> {
    let bad = |e: tokio_postgres::Error| format!("probe row: {e}");
    let in_recovery: bool = row.try_get(0).map_err(bad)?;
    let mut lsn: Option<Lsn> = row.try_get(1).map_err(bad)?;
    if !in_recovery {
        lsn = lsn.map(|l| l.normalize_page_boundary(wal_sizes.0, wal_sizes.1));
    }
    let start: i64 = row.try_get(5).map_err(bad)?;
    if start != conn_start_us {
        // The server restarted under an open connection: impossible unless the
        // connection is not what we think; treat as a failure so it reconnects.
        return Err("postmaster start time changed on an open connection".into());
    }
    let system_id: i64 = row.try_get(6).map_err(bad)?;
    let timeline: Option<i32> = row.try_get(7).map_err(bad)?;
    Ok(ProbeData {
        in_recovery,
        lsn,
        receive_lsn: row.try_get(2).map_err(bad)?,
        paused: row.try_get(3).map_err(bad)?,
        streaming: row.try_get(4).map_err(bad)?,
        postmaster_start_us: start,
        system_id: system_id as u64,
        timeline: timeline
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0),
        wal_sizes,
        timeline_start: row.try_get(8).map_err(bad)?,
    })
}

fn on_probe_done(state: &mut ServerState, outcome: ProbeOutcome) -> Result<(), ActorProcessingErr> {
    let fleet = &state.shared.config.fleet;
    let slot = &state.shared.slots[state.idx];
    state.probe = outcome.conn;
    slot.metrics.probe(outcome.result.is_ok(), outcome.latency);
    if crate::metrics::ENABLED {
        let (r, w) = (state.pools.read.status(), state.pools.write.status());
        slot.metrics.pools(
            crate::metrics::PoolGauges {
                read_in_use: r.size.saturating_sub(r.available),
                read_idle: r.available,
                write_in_use: w.size.saturating_sub(w.available),
                write_idle: w.available,
            },
            slot.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    match &outcome.result {
        Ok(_) => {
            state.failures = 0;
            state.down_since = None;
        }
        Err(e) => {
            state.failures += 1;
            if state.failures == fleet.failure_threshold {
                // Declared down: fail every connection, leased ones included, so queries
                // hung on a dead or unanswering server end now, not at TCP timeouts.
                let n = state.pools.registry.kill_all();
                tracing::warn!(target: TARGET, server = %slot.name, killed = n, error = %e, "server unhealthy; its connections were failed");
            }
            let since = *state.down_since.get_or_insert(outcome.started);
            slot.set_error(e.clone());
            tracing::debug!(target: TARGET, server = %slot.name, failures = state.failures, error = %e, "probe failed");
            if state.failures >= fleet.failure_threshold && since.elapsed() >= fleet.down_after {
                // Down for good: stop with an error so the supervisor restarts us with
                // fresh pools (after backoff).
                return Err(
                    format!("server {} down for {:?}: {e}", slot.name, since.elapsed()).into(),
                );
            }
        }
    }
    let report = ServerReport {
        idx: state.idx,
        restarts: state.restarts,
        started: outcome.started,
        latency: outcome.latency,
        unhealthy: state.failures >= fleet.failure_threshold,
        result: outcome.result,
    };
    if let Some(router) = state.shared.router.load().as_ref() {
        let _ = router.cast(RouterMsg::Report(Box::new(report)));
    }
    Ok(())
}

//! LISTEN/NOTIFY: the listener actor, which keeps one connection to the primary and
//! LISTENs there for every channel that has a subscriber, and the [`Subscription`]
//! streams it feeds.
//!
//! The subscriptions live in a [`ListenRegistry`] held by the shared state, not in the
//! actor, so a listener restarted by the supervisor finds them all. Notifications are
//! dispatched to subscribers straight from a pump task (never through the actor's
//! mailbox); the actor only manages the connection: connect (in a task that reports
//! back), keep the server's LISTEN set equal to the subscribed channels (through one
//! command task per connection, so LISTEN and UNLISTEN run in the order they were
//! decided), and reconnect with backoff when the connection ends.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::Stream;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::conn::{self, describe, ConnMessage, PgConn};
use crate::error::Error;
use crate::shared::Shared;

const TARGET: &str = "pgfleet::listener";

/// Events buffered per subscription; past that it lags (see [`ListenEvent::Lagged`]).
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Notifications the connection task may queue ahead of the dispatching pump.
const CONN_BUFFER: usize = 1024;

/// `application_name` of the listener's connection, to find it in `pg_stat_activity`.
pub(crate) const APPLICATION_NAME: &str = "pgfleet-listener";

/// PostgreSQL keeps identifiers up to `NAMEDATALEN - 1` bytes and truncates longer ones,
/// so a longer channel would be LISTENed under another name.
const MAX_CHANNEL_BYTES: usize = 63;

/// A notification sent with `NOTIFY channel, 'payload'` or `pg_notify(channel, payload)`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Notification {
    /// The channel it was sent on, exactly as subscribed.
    pub channel: String,
    /// The payload (empty when the sender gave none).
    pub payload: String,
    /// The server process id of the sending session (its `pg_backend_pid()`).
    pub process_id: i32,
}

/// What a [`Subscription`] yields.
///
/// Both [`ListenEvent::Reconnected`] and [`ListenEvent::Lagged`] mean the same to an
/// application: notifications were missed, so re-read whatever state they announce.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenEvent {
    /// A notification on the subscribed channel.
    Notification(Notification),
    /// The listener's connection ended (server restart, failover, terminated backend,
    /// network) or the listener actor was restarted, and is back: LISTEN is in effect
    /// again for every channel, but notifications sent while it was down were missed.
    Reconnected,
    /// This subscription's buffer (1024 events) was full, so `missed` notifications were
    /// dropped for it alone; other subscriptions were unaffected. Delivered where the gap
    /// is: after the events that were already buffered.
    Lagged {
        /// How many notifications this subscription missed.
        missed: u64,
    },
}

/// A stream of [`ListenEvent`]s for one channel, from [`Fleet::listen`](crate::Fleet::listen).
///
/// Read it with [`Subscription::recv`] or as a [`Stream`]. Every subscription has its own
/// buffer of 1024 events; a subscriber that falls further behind gets
/// [`ListenEvent::Lagged`] instead of the notifications it had no room for, and never
/// slows the others down. Dropping it ends the subscription; when the last subscription
/// of a channel is dropped, the listener UNLISTENs the channel. The stream ends (`None`)
/// only when the fleet shuts down.
#[must_use = "a subscription delivers nothing unless it is read"]
pub struct Subscription {
    /// The channel, as subscribed.
    channel: String,
    /// Its key in the registry.
    id: u64,
    /// Events from the dispatcher.
    rx: mpsc::Receiver<ListenEvent>,
    /// Losses not yet reported because the buffer was full.
    gap: Arc<Gap>,
    /// To unregister on drop.
    registry: Arc<ListenRegistry>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("buffered", &self.rx.len())
            .finish()
    }
}

impl Subscription {
    /// The channel this subscription listens to.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the fleet has shut down and every buffered event was
    /// read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<ListenEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<ListenEvent>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => Poll::Ready(Some(ev)),
            // Buffered events all precede a pending gap (the dispatcher sends nothing
            // after a gap it could not report), so report it once they are read.
            Poll::Ready(None) => Poll::Ready(self.gap.take()),
            Poll::Pending => match self.gap.take() {
                Some(ev) => Poll::Ready(Some(ev)),
                None => Poll::Pending,
            },
        }
    }
}

impl Stream for Subscription {
    type Item = ListenEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ListenEvent>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.remove(&self.channel, self.id);
    }
}

/// Losses a subscriber has not been told about yet, because its buffer was full.
#[derive(Debug, Default)]
struct Gap {
    /// Notifications dropped.
    missed: AtomicU64,
    /// A reconnect happened.
    reconnected: AtomicBool,
}

impl Gap {
    /// The oldest pending report, cleared.
    fn take(&self) -> Option<ListenEvent> {
        let missed = self.missed.swap(0, Ordering::AcqRel);
        if missed > 0 {
            return Some(ListenEvent::Lagged { missed });
        }
        self.reconnected
            .swap(false, Ordering::AcqRel)
            .then_some(ListenEvent::Reconnected)
    }
}

/// One subscription as the dispatcher sees it.
#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<ListenEvent>,
    gap: Arc<Gap>,
}

impl Subscriber {
    /// Sends pending gap reports; false if the buffer is still full.
    fn flush(&self) -> bool {
        let missed = self.gap.missed.swap(0, Ordering::AcqRel);
        if missed > 0 {
            if let Err(mpsc::error::TrySendError::Full(_)) =
                self.tx.try_send(ListenEvent::Lagged { missed })
            {
                self.gap.missed.fetch_add(missed, Ordering::AcqRel);
                return false;
            }
        }
        if self.gap.reconnected.swap(false, Ordering::AcqRel) {
            if let Err(mpsc::error::TrySendError::Full(_)) =
                self.tx.try_send(ListenEvent::Reconnected)
            {
                self.gap.reconnected.store(true, Ordering::Release);
                return false;
            }
        }
        true
    }

    /// Delivers `ev` without ever waiting: when the buffer is full it is recorded in
    /// the gap instead. Nothing is sent past an unreported gap, to keep the order.
    fn offer(&self, ev: ListenEvent) {
        let full = !self.flush()
            || matches!(
                self.tx.try_send(ev.clone()),
                Err(mpsc::error::TrySendError::Full(_))
            );
        if full {
            match ev {
                ListenEvent::Reconnected => self.gap.reconnected.store(true, Ordering::Release),
                ListenEvent::Lagged { missed } => {
                    self.gap.missed.fetch_add(missed, Ordering::AcqRel);
                }
                _ => {
                    self.gap.missed.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }
}

/// The subscriptions by channel, and the current listener actor. Outlives listener
/// restarts (it is part of the shared state).
#[derive(Debug, Default)]
pub(crate) struct ListenRegistry {
    /// Subscribers by channel; no entry for a channel without subscribers.
    channels: Mutex<Channels>,
    /// Subscription ids.
    next_id: AtomicU64,
    /// Whether a listener connection was ever up: every later one announces
    /// [`ListenEvent::Reconnected`].
    ever_connected: AtomicBool,
    /// The current listener (changes when the supervisor restarts it).
    listener: ArcSwapOption<ActorRef<ListenerMsg>>,
}

#[derive(Debug, Default)]
struct Channels {
    by_name: HashMap<String, Vec<Subscriber>>,
    /// Set at shutdown: no new subscriptions, and every stream ends.
    closed: bool,
}

impl ListenRegistry {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        // Nothing in the critical sections can panic half-way; the data stays valid.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a subscription for `channel` (validated by the caller).
    fn add(self: &Arc<Self>, channel: &str) -> Result<Subscription, Error> {
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let gap = Arc::new(Gap::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        if g.closed {
            return Err(Error::ShuttingDown);
        }
        g.by_name
            .entry(channel.to_owned())
            .or_default()
            .push(Subscriber {
                id,
                tx,
                gap: gap.clone(),
            });
        drop(g);
        Ok(Subscription {
            channel: channel.to_owned(),
            id,
            rx,
            gap,
            registry: self.clone(),
        })
    }

    /// Unregisters a subscription; tells the listener when its channel has no one left.
    fn remove(&self, channel: &str, id: u64) {
        let mut g = self.lock();
        let Some(subs) = g.by_name.get_mut(channel) else {
            return;
        };
        subs.retain(|s| s.id != id);
        if subs.is_empty() {
            g.by_name.remove(channel);
            drop(g);
            if let Some(l) = self.listener.load().as_ref() {
                let _ = l.cast(ListenerMsg::Sync);
            }
        }
    }

    /// Channels with at least one subscriber.
    fn channels(&self) -> HashSet<String> {
        self.lock().by_name.keys().cloned().collect()
    }

    /// Hands a notification to every subscriber of its channel, without waiting.
    fn dispatch(&self, n: Notification) {
        let g = self.lock();
        if let Some(subs) = g.by_name.get(&n.channel) {
            let ev = ListenEvent::Notification(n);
            for s in subs {
                s.offer(ev.clone());
            }
        }
    }

    /// Tells every subscriber that notifications may have been missed.
    fn announce_reconnected(&self) {
        let g = self.lock();
        for s in g.by_name.values().flatten() {
            s.offer(ListenEvent::Reconnected);
        }
    }

    /// Shutdown: refuses new subscriptions and ends every stream (after its buffered
    /// events).
    pub(crate) fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.by_name.clear();
    }

    /// The current listener actor, if one is running.
    fn listener(&self) -> Option<Arc<ActorRef<ListenerMsg>>> {
        self.listener.load_full()
    }

    /// Unpublishes listener `id` if it is still the current one (it stopped or failed).
    pub(crate) fn forget_listener(&self, id: ractor::ActorId) {
        let current = self.listener.load();
        if current.as_ref().is_some_and(|l| l.get_id() == id) {
            self.listener.store(None);
        }
    }
}

/// Checks that PostgreSQL can LISTEN on `channel` under exactly that name.
fn validate_channel(channel: &str) -> Result<(), Error> {
    let reason = if channel.is_empty() {
        "empty"
    } else if channel.len() > MAX_CHANNEL_BYTES {
        "longer than 63 bytes (PostgreSQL would truncate it)"
    } else if channel.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(Error::InvalidChannel {
        channel: channel.to_owned(),
        reason,
    })
}

/// `channel` as a quoted SQL identifier: case and every character kept.
fn quote_ident(channel: &str) -> String {
    format!("\"{}\"", channel.replace('"', "\"\""))
}

/// One simple-query batch (one round trip) that UNLISTENs and LISTENs the given channels.
fn sync_sql<'a>(
    listen: impl IntoIterator<Item = &'a String>,
    unlisten: impl IntoIterator<Item = &'a String>,
) -> String {
    let mut sql = String::new();
    for c in unlisten {
        sql.push_str("UNLISTEN ");
        sql.push_str(&quote_ident(c));
        sql.push_str(";\n");
    }
    for c in listen {
        sql.push_str("LISTEN ");
        sql.push_str(&quote_ident(c));
        sql.push_str(";\n");
    }
    sql
}

/// `Fleet::listen`: registers a subscription and returns once LISTEN is in effect on
/// the primary for its channel, or fails after `lease_timeout`.
pub(crate) async fn subscribe(shared: &Arc<Shared>, channel: &str) -> Result<Subscription, Error> {
    validate_channel(channel)?;
    if shared.is_shutting_down() {
        return Err(Error::ShuttingDown);
    }
    let start = Instant::now();
    let deadline = start + shared.config.fleet.lease_timeout;
    // Registered first, so it receives everything from the moment LISTEN is in effect.
    let sub = shared.listen.add(channel)?;
    loop {
        if shared.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        if let Some(l) = shared.listen.listener() {
            match l.call(ListenerMsg::Subscribe, Some(remaining)).await {
                Ok(CallResult::Success(())) => return Ok(sub),
                Ok(CallResult::Timeout) => break,
                // The connection or the actor died mid-LISTEN; its successor will do it.
                _ => {}
            }
        }
        // Listener restarting: give the supervisor a moment.
        let pause = remaining.min(Duration::from_millis(20));
        let _ = tokio::time::timeout(pause, shared.changed.notified()).await;
    }
    let waited = start.elapsed();
    drop(sub);
    Err(match shared.topology.load().primary_index() {
        None => shared.no_primary(waited),
        Some(i) => Error::Timeout {
            server: shared.slots[i].name.to_string(),
            what: "LISTEN on the primary",
            after: waited,
        },
    })
}

/// The channels the listener's session is LISTENing to, from the server itself
/// (`pg_listening_channels()`, in order after every LISTEN/UNLISTEN decided so far);
/// `None` while it is not connected. For tests.
pub(crate) async fn server_channels(shared: &Shared) -> Option<Vec<String>> {
    let l = shared.listen.listener()?;
    let timeout = shared.config.fleet.lease_timeout;
    match l.call(ListenerMsg::ServerChannels, Some(timeout)).await {
        Ok(CallResult::Success(mut v)) => {
            v.sort();
            Some(v)
        }
        _ => None,
    }
}

/// Test hook: makes the listener fail as a crash would.
pub(crate) fn fail(shared: &Shared) -> bool {
    shared.listen.listener().is_some_and(|l| {
        l.cast(ListenerMsg::Fail("test-induced failure".into()))
            .is_ok()
    })
}

/// Messages to the listener actor.
#[derive(Debug)]
pub(crate) enum ListenerMsg {
    /// Timer: connect now if disconnected and the backoff has passed.
    Connect,
    /// Timer: follow the primary, retry while waiting for one, reconcile channels.
    Tick,
    /// The connect task succeeded.
    Connected { gen: u64, link: Box<Opened> },
    /// The connect task failed.
    ConnectFailed { gen: u64, why: String },
    /// Connection `gen` ended (its notification stream closed, or a command failed).
    Lost { gen: u64, why: String },
    /// A channel lost its last subscriber: bring the server's LISTEN set up to date.
    Sync,
    /// A subscription was registered: reply once every registered channel is LISTENed.
    Subscribe(RpcReplyPort<()>),
    /// `pg_listening_channels()` on the listener's session (tests).
    ServerChannels(RpcReplyPort<Vec<String>>),
    /// Test hook: fail as a crash would.
    Fail(String),
}

/// A connection the connect task opened.
#[derive(Debug)]
pub(crate) struct Opened {
    conn: PgConn,
    messages: mpsc::Receiver<ConnMessage>,
}

/// Work for the command task, done in order on the connection.
#[derive(Debug)]
enum Cmd {
    /// Run LISTEN/UNLISTEN, then maybe announce a reconnect, then answer.
    Sync {
        listen: Vec<String>,
        unlisten: Vec<String>,
        announce: bool,
        replies: Vec<RpcReplyPort<()>>,
    },
    /// Read `pg_listening_channels()`.
    Channels(RpcReplyPort<Vec<String>>),
}

/// A task aborted when its owner is dropped (also when the actor fails, which skips
/// `post_stop`).
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The listener's connection.
#[derive(Debug)]
enum Link {
    /// None; connect when `retry_at` has passed and a primary is known.
    Idle,
    /// The connect task is running, to server `idx`.
    Connecting {
        gen: u64,
        idx: usize,
        _task: AbortOnDrop,
    },
    /// Connected to server `idx`.
    Up {
        gen: u64,
        idx: usize,
        /// To the command task, which owns the client.
        cmds: mpsc::UnboundedSender<Cmd>,
        _worker: AbortOnDrop,
        _pump: AbortOnDrop,
    },
}

/// The listener actor's state.
#[derive(Debug)]
pub(crate) struct ListenerState {
    shared: Arc<Shared>,
    link: Link,
    /// Connection attempt counter; stale messages from older ones are ignored.
    gen: u64,
    /// Channels LISTENed (or queued to be) on the current connection.
    listening: HashSet<String>,
    /// Subscribe calls that arrived while disconnected.
    waiting: Vec<RpcReplyPort<()>>,
    /// Consecutive failed connections.
    backoff: Backoff,
    /// Earliest next connect.
    retry_at: Instant,
    /// When the current connection came up (resets the backoff once stable).
    up_since: Option<Instant>,
    /// Logged once per wait for a primary.
    waiting_for_primary: bool,
}

/// The listener actor: one per fleet, on the primary.
#[derive(Debug)]
pub(crate) struct Listener;

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = Arc<Shared>;

    /// No I/O: the connection is opened after start, so this never fails.
    async fn pre_start(
        &self,
        myself: ActorRef<ListenerMsg>,
        shared: Arc<Shared>,
    ) -> Result<ListenerState, ActorProcessingErr> {
        shared.listen.listener.store(Some(Arc::new(myself)));
        Ok(ListenerState {
            shared,
            link: Link::Idle,
            gen: 0,
            listening: HashSet::new(),
            waiting: Vec::new(),
            backoff: Backoff::default(),
            retry_at: Instant::now(),
            up_since: None,
            waiting_for_primary: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ListenerMsg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        // Stops by itself when the actor does.
        myself.send_interval(state.shared.config.fleet.probe_interval, || {
            ListenerMsg::Tick
        });
        try_connect(&myself, state);
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ListenerMsg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        state.shared.listen.forget_listener(myself.get_id());
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ListenerMsg>,
        msg: ListenerMsg,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ListenerMsg::Connect => try_connect(&myself, state),
            ListenerMsg::Tick => on_tick(&myself, state),
            ListenerMsg::Connected { gen, link } => on_connected(&myself, state, gen, *link),
            ListenerMsg::ConnectFailed { gen, why } => {
                if matches!(state.link, Link::Connecting { gen: g, .. } if g == gen) {
                    tracing::debug!(target: TARGET, error = %why, "listener connect failed");
                    state.link = Link::Idle;
                    schedule_retry(&myself, state);
                }
            }
            ListenerMsg::Lost { gen, why } => {
                if matches!(state.link, Link::Up { gen: g, .. } if g == gen) {
                    drop_link(&myself, state, &why);
                }
            }
            ListenerMsg::Sync => sync(state, None),
            ListenerMsg::Subscribe(reply) => {
                if matches!(state.link, Link::Up { .. }) {
                    sync(state, Some(reply));
                } else {
                    state.waiting.retain(|r| !r.is_closed());
                    state.waiting.push(reply);
                    try_connect(&myself, state);
                }
            }
            ListenerMsg::ServerChannels(reply) => {
                if let Link::Up { cmds, .. } = &state.link {
                    let _ = cmds.send(Cmd::Channels(reply));
                }
            }
            ListenerMsg::Fail(why) => return Err(why.into()),
        }
        Ok(())
    }
}

/// Starts a connect task if disconnected, the backoff has passed and a primary is known.
fn try_connect(myself: &ActorRef<ListenerMsg>, state: &mut ListenerState) {
    if !matches!(state.link, Link::Idle) || Instant::now() < state.retry_at {
        return;
    }
    let Some(idx) = state.shared.topology.load().primary_index() else {
        if !std::mem::replace(&mut state.waiting_for_primary, true) {
            tracing::debug!(target: TARGET, "listener waiting for a primary");
        }
        return;
    };
    state.waiting_for_primary = false;
    state.gen += 1;
    let gen = state.gen;
    let slot = &state.shared.slots[idx];
    let mut pg = slot.url.pg_config().clone();
    pg.application_name(APPLICATION_NAME);
    // Registered with the server's pool connections, so it is failed with them when the
    // server is declared down (a blackholed socket would otherwise linger until TCP
    // timeouts).
    let pools = slot.pools.load_full();
    let net = state.shared.net;
    let tls = slot.tls.clone();
    let me = myself.clone();
    let task = tokio::spawn(async move {
        let registry = pools.as_ref().map(|p| &*p.registry);
        let msg = match conn::connect_with_messages(&pg, &tls, &net, registry, CONN_BUFFER).await {
            Ok((conn, messages)) => ListenerMsg::Connected {
                gen,
                link: Box::new(Opened { conn, messages }),
            },
            Err(e) => ListenerMsg::ConnectFailed {
                gen,
                why: e.to_string(),
            },
        };
        // The actor may be gone; the connection is then dropped (closed).
        let _ = me.cast(msg);
    });
    state.link = Link::Connecting {
        gen,
        idx,
        _task: AbortOnDrop(task),
    };
}

fn on_tick(myself: &ActorRef<ListenerMsg>, state: &mut ListenerState) {
    match &state.link {
        Link::Up { idx, .. } => {
            // Follow a failover. While no primary is known, keep the connection: if it
            // is dead, its stream ends (or the server's connections are failed) anyway.
            let primary = state.shared.topology.load().primary_index();
            if primary.is_some_and(|p| p != *idx) {
                drop_link(myself, state, "another server became primary");
            } else {
                sync(state, None);
            }
        }
        Link::Idle => try_connect(myself, state),
        Link::Connecting { .. } => {}
    }
}

fn on_connected(
    myself: &ActorRef<ListenerMsg>,
    state: &mut ListenerState,
    gen: u64,
    opened: Opened,
) {
    let idx = match state.link {
        Link::Connecting { gen: g, idx, .. } if g == gen => idx,
        // Stale: dropping it closes the connection.
        _ => return,
    };
    let registry = state.shared.listen.clone();
    let (cmds, rx) = mpsc::unbounded_channel();
    let timeout = state.shared.query_timeout();
    let worker = tokio::spawn(command_task(
        *opened.conn.client,
        rx,
        myself.clone(),
        gen,
        registry.clone(),
        timeout,
    ));
    let pump = tokio::spawn(pump_task(opened.messages, myself.clone(), gen, registry));
    state.listening = state.shared.listen.channels();
    let announce = state
        .shared
        .listen
        .ever_connected
        .swap(true, Ordering::AcqRel);
    let _ = cmds.send(Cmd::Sync {
        listen: state.listening.iter().cloned().collect(),
        unlisten: Vec::new(),
        announce,
        replies: std::mem::take(&mut state.waiting),
    });
    tracing::info!(
        target: TARGET,
        server = %state.shared.slots[idx].name,
        channels = state.listening.len(),
        reconnect = announce,
        "listener connected"
    );
    state.link = Link::Up {
        gen,
        idx,
        cmds,
        _worker: AbortOnDrop(worker),
        _pump: AbortOnDrop(pump),
    };
    state.up_since = Some(Instant::now());
}

/// Drops the connection (its tasks are aborted) and schedules the reconnect.
fn drop_link(myself: &ActorRef<ListenerMsg>, state: &mut ListenerState, why: &str) {
    tracing::warn!(target: TARGET, reason = %why, "listener connection lost; reconnecting");
    state.link = Link::Idle;
    state.listening.clear();
    schedule_retry(myself, state);
}

fn schedule_retry(myself: &ActorRef<ListenerMsg>, state: &mut ListenerState) {
    let up_for = state.up_since.take().map(|t| t.elapsed());
    let delay = state
        .backoff
        .next_delay(up_for, &state.shared.config.fleet.restart);
    state.retry_at = Instant::now() + delay;
    myself.send_after(delay, || ListenerMsg::Connect);
}

/// Brings the server's LISTEN set up to the registry's channels; with `reply`, answers
/// once that (and everything queued before) is done.
fn sync(state: &mut ListenerState, reply: Option<RpcReplyPort<()>>) {
    let Link::Up { cmds, .. } = &state.link else {
        return;
    };
    let desired = state.shared.listen.channels();
    let listen: Vec<String> = desired.difference(&state.listening).cloned().collect();
    let unlisten: Vec<String> = state.listening.difference(&desired).cloned().collect();
    if listen.is_empty() && unlisten.is_empty() && reply.is_none() {
        return;
    }
    state.listening = desired;
    // If the command task is gone, `Lost` is on its way.
    let _ = cmds.send(Cmd::Sync {
        listen,
        unlisten,
        announce: false,
        replies: reply.into_iter().collect(),
    });
}

/// Runs LISTEN/UNLISTEN in the order decided. Any failure ends the connection: the
/// server's LISTEN set is then unknown, and a reconnect re-issues all of it.
async fn command_task(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    me: ActorRef<ListenerMsg>,
    gen: u64,
    registry: Arc<ListenRegistry>,
    timeout: Duration,
) {
    while let Some(cmd) = rx.recv().await {
        let failed = match cmd {
            Cmd::Sync {
                listen,
                unlisten,
                announce,
                replies,
            } => {
                let sql = sync_sql(&listen, &unlisten);
                let done = if sql.is_empty() {
                    Ok(())
                } else {
                    match tokio::time::timeout(timeout, client.batch_execute(&sql)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("LISTEN: {}", describe(&e))),
                        Err(_) => Err(format!("LISTEN timed out after {timeout:?}")),
                    }
                };
                if done.is_ok() {
                    if announce {
                        registry.announce_reconnected();
                    }
                    for r in replies {
                        let _ = r.send(());
                    }
                }
                done.err()
            }
            Cmd::Channels(reply) => {
                let q = client.query("SELECT pg_listening_channels()", &[]);
                match tokio::time::timeout(timeout, q).await {
                    Ok(Ok(rows)) => {
                        let _ = reply.send(rows.iter().filter_map(|r| r.try_get(0).ok()).collect());
                        None
                    }
                    Ok(Err(e)) => Some(format!("pg_listening_channels: {}", describe(&e))),
                    Err(_) => Some(format!("pg_listening_channels timed out after {timeout:?}")),
                }
            }
        };
        if let Some(why) = failed {
            let _ = me.cast(ListenerMsg::Lost { gen, why });
            return;
        }
    }
}

/// Dispatches the connection's notifications; reports when the connection ends.
async fn pump_task(
    mut messages: mpsc::Receiver<ConnMessage>,
    me: ActorRef<ListenerMsg>,
    gen: u64,
    registry: Arc<ListenRegistry>,
) {
    let why = loop {
        match messages.recv().await {
            Some(Ok(n)) => registry.dispatch(Notification {
                channel: n.channel().to_owned(),
                payload: n.payload().to_owned(),
                process_id: n.process_id(),
            }),
            Some(Err(e)) => break e,
            None => break "connection closed".to_owned(),
        };
    };
    let _ = me.cast(ListenerMsg::Lost { gen, why });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(channel: &str, payload: &str) -> Notification {
        Notification {
            channel: channel.into(),
            payload: payload.into(),
            process_id: 7,
        }
    }

    fn payload(ev: Option<ListenEvent>) -> String {
        match ev {
            Some(ListenEvent::Notification(n)) => n.payload,
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    fn next(sub: &mut Subscription) -> Option<ListenEvent> {
        match sub.poll_event(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(ev) => ev,
            Poll::Pending => None,
        }
    }

    #[test]
    fn channel_names_are_checked_and_quoted() {
        assert!(validate_channel("orders").is_ok());
        assert!(validate_channel(&"x".repeat(63)).is_ok());
        for bad in ["", "a\0b"] {
            assert!(matches!(
                validate_channel(bad),
                Err(Error::InvalidChannel { .. })
            ));
        }
        assert!(validate_channel(&"x".repeat(64)).is_err());
        // 21 three-byte characters: 63 bytes is fine, one more is not.
        assert!(validate_channel(&"€".repeat(21)).is_ok());
        assert!(validate_channel(&"€".repeat(22)).is_err());
        assert_eq!(quote_ident(r#"Or"ders x"#), r#""Or""ders x""#);
        let sql = sync_sql(&["b".to_string()], &["a".to_string()]);
        assert_eq!(sql, "UNLISTEN \"a\";\nLISTEN \"b\";\n");
        assert!(sync_sql(&[], &[]).is_empty());
    }

    #[test]
    fn dispatch_reaches_every_subscriber_of_the_channel_only() {
        let reg = Arc::new(ListenRegistry::default());
        let mut a1 = reg.add("a").expect("open");
        let mut a2 = reg.add("a").expect("open");
        let mut b = reg.add("b").expect("open");
        assert_eq!(reg.channels().len(), 2);
        reg.dispatch(note("a", "1"));
        assert_eq!(payload(next(&mut a1)), "1");
        assert_eq!(payload(next(&mut a2)), "1");
        assert_eq!(next(&mut b), None);
        drop(a1);
        assert!(reg.channels().contains("a"), "a2 still listens");
        drop(a2);
        assert!(!reg.channels().contains("a"));
        drop(b);
        assert!(reg.channels().is_empty());
    }

    #[test]
    fn a_full_buffer_becomes_one_lagged_event_in_place() {
        let reg = Arc::new(ListenRegistry::default());
        let mut slow = reg.add("c").expect("open");
        let mut fast = reg.add("c").expect("open");
        let total = SUBSCRIPTION_BUFFER + 10;
        for i in 0..total {
            reg.dispatch(note("c", &i.to_string()));
            // The fast one keeps up and misses nothing.
            assert_eq!(payload(next(&mut fast)), i.to_string());
        }
        reg.announce_reconnected();
        assert_eq!(next(&mut fast), Some(ListenEvent::Reconnected));
        for i in 0..SUBSCRIPTION_BUFFER {
            assert_eq!(payload(next(&mut slow)), i.to_string());
        }
        assert_eq!(next(&mut slow), Some(ListenEvent::Lagged { missed: 10 }));
        assert_eq!(next(&mut slow), Some(ListenEvent::Reconnected));
        assert_eq!(next(&mut slow), None);
        // Delivery resumes once there is room.
        reg.dispatch(note("c", "after"));
        assert_eq!(payload(next(&mut slow)), "after");
    }

    #[test]
    fn a_gap_is_reported_before_later_notifications() {
        let reg = Arc::new(ListenRegistry::default());
        let mut sub = reg.add("d").expect("open");
        for i in 0..SUBSCRIPTION_BUFFER + 1 {
            reg.dispatch(note("d", &i.to_string()));
        }
        // Make room for one, then notify: the gap report takes the slot and the new
        // notification, with no room left, is missed too; nothing jumps the gap.
        assert_eq!(payload(next(&mut sub)), "0");
        reg.dispatch(note("d", "late"));
        for i in 1..SUBSCRIPTION_BUFFER {
            assert_eq!(payload(next(&mut sub)), i.to_string());
        }
        assert_eq!(next(&mut sub), Some(ListenEvent::Lagged { missed: 1 }));
        assert_eq!(next(&mut sub), Some(ListenEvent::Lagged { missed: 1 }));
        assert_eq!(next(&mut sub), None);
    }

    #[test]
    fn close_ends_streams_and_refuses_new_subscriptions() {
        let reg = Arc::new(ListenRegistry::default());
        let mut sub = reg.add("e").expect("open");
        reg.dispatch(note("e", "last"));
        reg.close();
        assert_eq!(payload(next(&mut sub)), "last");
        assert_eq!(
            sub.poll_event(&mut Context::from_waker(std::task::Waker::noop())),
            Poll::Ready(None)
        );
        assert!(matches!(reg.add("e"), Err(Error::ShuttingDown)));
    }
}

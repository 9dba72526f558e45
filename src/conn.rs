//! Connections: the whole connect under one timeout, socket options, and a protocol
//! sniffer that knows each connection's transaction state without a round trip.
//!
//! Why a custom deadpool `Manager` instead of deadpool-postgres or bb8-postgres: both
//! connect through `tokio_postgres::Config::connect`, whose timeout covers only the TCP
//! connect, and neither can tell whether a returned connection is still inside a
//! transaction without a query. Owning the socket lets us (1) run TCP connect, startup and
//! authentication under one `connect_timeout`, (2) set TCP keepalive and
//! `TCP_USER_TIMEOUT`, and (3) watch the server's `ReadyForQuery` messages, which carry
//! the transaction status, so a connection released inside a `BEGIN` is rolled back
//! before reuse at no cost to clean ones. deadpool supplies the rest: bounded waits,
//! create and recycle timeouts, resizing, and status counters.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use crate::config::{Config, ConfigError, ServerTls, ServerUrl, TlsMode};
use crate::error::{ConnectError, Error, READ_ONLY_SQL_TRANSACTION};

/// Tracing target of this module.
const TARGET: &str = "pgfleet::conn";

/// Transaction status from the last `ReadyForQuery`: idle.
const TX_IDLE: u8 = b'I';
/// In a transaction block.
const TX_IN_BLOCK: u8 = b'T';
/// In a failed transaction block.
const TX_FAILED: u8 = b'E';

/// State the sniffer shares with the pool object.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Last transaction status byte (`I`, `T`, `E`); `0` before the first `ReadyForQuery`.
    tx_status: AtomicU8,
    /// Set when the server refused a write as read-only (SQLSTATE 25006): the server's
    /// role may have changed, so its actor should probe at once.
    saw_read_only: AtomicBool,
    /// Set when the server was declared down: the socket fails at its next poll, so a
    /// query hung on a dead or blackholed server ends now instead of at TCP timeouts.
    killed: AtomicBool,
    /// Wakes the connection task so it sees `killed`.
    waker: AtomicWaker,
    /// Replies still owed: one `ReadyForQuery` for the startup and for every simple
    /// `Query` or `Sync` sent. The status above is final only when this is 0: a lease may
    /// end with an error in hand while the server's `ReadyForQuery` is still in flight.
    pending: AtomicI64,
    /// Woken when `pending` drops to 0, or when the stream ends.
    settled: Notify,
    /// The stream ended or failed (EOF, an I/O error, or killed): no `ReadyForQuery`
    /// will come any more, so nothing waits for one.
    closed: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            tx_status: AtomicU8::new(0),
            saw_read_only: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            pending: AtomicI64::new(1),
            settled: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The stream ended or failed: wakes anyone waiting for it to settle.
    fn mark_closed(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.settled.notify_waiters();
        }
    }

    /// Whether the stream ended or failed (the connection is unusable).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether every request sent has had its `ReadyForQuery`.
    pub(crate) fn is_settled(&self) -> bool {
        self.pending.load(Ordering::Acquire) <= 0
    }

    /// Waits (at most `timeout`) until every request sent has had its `ReadyForQuery`;
    /// `false` at once when the stream has ended (a dead server sends none).
    pub(crate) async fn settle(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.settled.notified();
            if self.is_settled() {
                return true;
            }
            if self.is_closed() {
                return false;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.is_settled();
            }
        }
    }

    /// Fails the connection: pending and later I/O on it returns an error.
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
        self.mark_closed();
    }

    fn check_killed(&self, cx: &Context<'_>) -> Option<io::Error> {
        self.waker.register(cx.waker());
        self.killed.load(Ordering::Acquire).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server declared down by pgfleet",
            )
        })
    }

    /// Whether the connection sits idle outside any transaction block.
    pub(crate) fn is_idle(&self) -> bool {
        self.tx_status.load(Ordering::Acquire) == TX_IDLE
    }

    /// Whether a write was refused as read-only since the last call (clears the flag).
    pub(crate) fn take_read_only_refusal(&self) -> bool {
        // A plain load first: the flag is almost never set, and a swap on every release
        // would be a needless read-modify-write.
        self.saw_read_only.load(Ordering::Relaxed)
            && self.saw_read_only.swap(false, Ordering::AcqRel)
    }
}

/// Where the sniffer is inside the server's message stream.
#[derive(Debug)]
enum Frame {
    /// Collecting the 5-byte header (type + length).
    Header { buf: [u8; 5], have: usize },
    /// Inside a message body.
    Body {
        kind: u8,
        remaining: usize,
        /// The first bytes of an `ErrorResponse` body, enough to find its SQLSTATE.
        head: Vec<u8>,
    },
}

/// An `AsyncRead + AsyncWrite` wrapper that parses the framing of backend messages
/// (type byte, 4-byte length) to record `ReadyForQuery` status and SQLSTATE 25006.
///
/// It only counts bytes; the driver still parses everything. Under TLS it wraps the TLS
/// stream (see `tls`), so it always reads the plaintext protocol.
#[derive(Debug)]
pub(crate) struct SniffStream<S> {
    inner: S,
    state: Arc<ConnState>,
    frame: Frame,
    /// Framing of what the client writes, to count the replies owed.
    out: Out,
}

/// Where the sniffer is inside the client's message stream.
#[derive(Debug)]
enum Out {
    /// The startup message: a 4-byte length, no type byte.
    Startup { buf: [u8; 4], have: usize },
    /// Collecting a 5-byte header (type + length).
    Header { buf: [u8; 5], have: usize },
    /// Inside a message body.
    Body { remaining: usize },
}

/// Advances the client-side framing over bytes the socket accepted.
fn observe_out(out: &mut Out, state: &ConnState, mut data: &[u8]) {
    while !data.is_empty() {
        match out {
            Out::Startup { buf, have } => {
                let take = (4 - *have).min(data.len());
                buf[*have..*have + take].copy_from_slice(&data[..take]);
                *have += take;
                data = &data[take..];
                if *have == 4 {
                    let len = u32::from_be_bytes(*buf) as usize;
                    *out = Out::Body {
                        remaining: len.saturating_sub(4),
                    };
                }
            }
            Out::Header { buf, have } => {
                let take = (5 - *have).min(data.len());
                buf[*have..*have + take].copy_from_slice(&data[..take]);
                *have += take;
                data = &data[take..];
                if *have == 5 {
                    if buf[0] == b'Q' || buf[0] == b'S' {
                        state.pending.fetch_add(1, Ordering::AcqRel);
                    }
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    *out = Out::Body {
                        remaining: len.saturating_sub(4),
                    };
                }
            }
            Out::Body { remaining } => {
                let take = (*remaining).min(data.len());
                *remaining -= take;
                data = &data[take..];
            }
        }
        if let Out::Body { remaining: 0 } = out {
            *out = Out::Header {
                buf: [0; 5],
                have: 0,
            };
        }
    }
}

impl<S> SniffStream<S> {
    /// The wrapped stream.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    pub(crate) fn new(inner: S, state: Arc<ConnState>) -> Self {
        SniffStream {
            inner,
            state,
            frame: Frame::Header {
                buf: [0; 5],
                have: 0,
            },
            out: Out::Startup {
                buf: [0; 4],
                have: 0,
            },
        }
    }

    #[cfg(test)]
    fn observe(&mut self, data: &[u8]) {
        observe(&mut self.frame, &self.state, data);
    }
}

/// Advances the framing state over `data`, recording what the connection state needs.
fn observe(frame: &mut Frame, state: &ConnState, mut data: &[u8]) {
    while !data.is_empty() {
        match frame {
            Frame::Header { buf, have } => {
                let take = (5 - *have).min(data.len());
                buf[*have..*have + take].copy_from_slice(&data[..take]);
                *have += take;
                data = &data[take..];
                if *have == 5 {
                    let kind = buf[0];
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    *frame = Frame::Body {
                        kind,
                        remaining: len.saturating_sub(4),
                        head: Vec::new(),
                    };
                    finish_if_empty(frame, state);
                }
            }
            Frame::Body {
                kind,
                remaining,
                head,
            } => {
                let take = (*remaining).min(data.len());
                if *kind == b'Z' && take > 0 {
                    state.tx_status.store(data[0], Ordering::Release);
                    if state.pending.fetch_sub(1, Ordering::AcqRel) <= 1 {
                        state.settled.notify_waiters();
                    }
                } else if *kind == b'E' && head.len() < 256 {
                    let room = 256 - head.len();
                    head.extend_from_slice(&data[..take.min(room)]);
                }
                *remaining -= take;
                data = &data[take..];
                finish_if_empty(frame, state);
            }
        }
    }
}

fn finish_if_empty(frame: &mut Frame, state: &ConnState) {
    if let Frame::Body {
        kind,
        remaining: 0,
        head,
    } = frame
    {
        if *kind == b'E' && sqlstate(head) == Some(READ_ONLY_SQL_TRANSACTION.as_bytes()) {
            state.saw_read_only.store(true, Ordering::Release);
        }
        *frame = Frame::Header {
            buf: [0; 5],
            have: 0,
        };
    }
}

/// The `C` (SQLSTATE) field of an `ErrorResponse` body, if within `body`.
fn sqlstate(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if field == b'C' {
            return Some(&tail[..end]);
        }
        rest = &tail[end + 1..];
    }
    None
}

impl<S: AsyncRead + Unpin> AsyncRead for SniffStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.state.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let room = buf.remaining();
        let SniffStream {
            inner,
            state,
            frame,
            ..
        } = &mut *self;
        let res = Pin::new(inner).poll_read(cx, buf);
        match &res {
            // Nothing read into a buffer with room: end of stream.
            Poll::Ready(Ok(())) if room > 0 && buf.filled().len() == before => state.mark_closed(),
            Poll::Ready(Ok(())) => observe(frame, state, &buf.filled()[before..]),
            Poll::Ready(Err(_)) => state.mark_closed(),
            Poll::Pending => {}
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SniffStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.state.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        let SniffStream {
            inner, state, out, ..
        } = &mut *self;
        let res = Pin::new(inner).poll_write(cx, buf);
        match &res {
            Poll::Ready(Ok(n)) => observe_out(out, state, &buf[..*n]),
            Poll::Ready(Err(_)) => state.mark_closed(),
            Poll::Pending => {}
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = &res {
            self.state.mark_closed();
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP or Unix-domain socket.
#[derive(Debug)]
pub(crate) enum Socket {
    /// TCP, with keepalive and `TCP_USER_TIMEOUT` set.
    Tcp(TcpStream),
    /// A Unix-domain socket (`host=/run/postgresql`).
    Unix(tokio::net::UnixStream),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Socket::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Socket::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Every live connection of one server incarnation, so they can all be failed at once
/// when the server is declared down.
#[derive(Debug, Default)]
pub(crate) struct ConnRegistry {
    conns: Mutex<Vec<Weak<ConnState>>>,
}

impl ConnRegistry {
    fn add(&self, state: &Arc<ConnState>) {
        if let Ok(mut v) = self.conns.lock() {
            v.retain(|w| w.strong_count() > 0);
            v.push(Arc::downgrade(state));
        }
    }

    /// Fails every live connection (pooled and leased). Returns how many.
    pub(crate) fn kill_all(&self) -> usize {
        let Ok(mut v) = self.conns.lock() else {
            return 0;
        };
        let live: Vec<_> = v.drain(..).filter_map(|w| w.upgrade()).collect();
        for c in &live {
            c.kill();
        }
        live.len()
    }
}

/// Socket-level settings from `[fleet]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetOptions {
    /// Bound on the whole connect: TCP, startup, authentication.
    pub(crate) connect_timeout: Duration,
    /// Idle time before TCP keepalive probes.
    pub(crate) tcp_keepalive: Duration,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    pub(crate) tcp_user_timeout: Duration,
}

/// How one server's connections negotiate TLS, resolved from its URL and `[fleet.tls]`
/// once, when the fleet starts (the CA file is read then).
#[derive(Debug, Clone)]
pub(crate) struct TlsSetup {
    /// The settings in effect.
    settings: ServerTls,
    /// The rustls client configuration; `None` when `sslmode=disable`.
    #[cfg(feature = "tls")]
    connector: Option<crate::tls::Connector>,
}

impl TlsSetup {
    /// The setup of the server at key path `key` (`primary.url`, `replicas[0].url`).
    ///
    /// # Errors
    ///
    /// What [`Config::validate`] reports for its TLS settings (an unreadable CA file, a
    /// mode this build cannot honour).
    pub(crate) fn new(config: &Config, key: &str, url: &ServerUrl) -> Result<Self, ConfigError> {
        let settings = config.server_tls(key, url)?;
        #[cfg(feature = "tls")]
        let connector = match settings.mode {
            TlsMode::Disable => None,
            _ => Some(crate::tls::Connector::new(&settings)?),
        };
        Ok(TlsSetup {
            settings,
            #[cfg(feature = "tls")]
            connector,
        })
    }

    /// The `sslmode` in effect.
    pub(crate) fn mode(&self) -> TlsMode {
        self.settings.mode
    }
}

/// An open connection and what we know about it.
#[derive(Debug)]
pub(crate) struct PgConn {
    /// The driver's client. Boxed (once per connection): the client is ~200 bytes and
    /// the pool moves the whole object on every checkout and return.
    pub(crate) client: Box<Client>,
    /// What the sniffer has seen.
    pub(crate) state: Arc<ConnState>,
    /// `pg_postmaster_start_time()` in microseconds since the epoch, read at connect:
    /// a connection made to a restarted server shows it (DESIGN §3 pitfall 5).
    pub(crate) postmaster_start_us: i64,
}

/// Opens the socket to `pg`'s server: its `hostaddr` if given (libpq's rule: the host
/// name then serves only to check the certificate), else its host.
async fn open_socket(pg: &tokio_postgres::Config, net: &NetOptions) -> io::Result<Socket> {
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    if let Some(&addr) = pg.get_hostaddrs().first() {
        return tcp_socket(&[std::net::SocketAddr::new(addr, port)], net).await;
    }
    match pg.get_hosts().first() {
        Some(Host::Tcp(name)) => {
            let addrs: Vec<_> = tokio::net::lookup_host((name.as_str(), port))
                .await?
                .collect();
            tcp_socket(&addrs, net).await
        }
        #[cfg(unix)]
        Some(Host::Unix(dir)) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok(Socket::Unix(tokio::net::UnixStream::connect(path).await?))
        }
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the URL names no host",
        )),
    }
}

/// A TCP connection to the first of `addrs` that accepts, with our socket options.
async fn tcp_socket(addrs: &[std::net::SocketAddr], net: &NetOptions) -> io::Result<Socket> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                let sock = socket2::SockRef::from(&stream);
                sock.set_tcp_keepalive(
                    &socket2::TcpKeepalive::new()
                        .with_time(net.tcp_keepalive)
                        .with_interval(net.tcp_keepalive.min(Duration::from_secs(5))),
                )?;
                sock.set_tcp_user_timeout(Some(net.tcp_user_timeout))?;
                return Ok(Socket::Tcp(stream));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Opens one connection: socket, options, startup and authentication, all under
/// `net.connect_timeout`, then reads the postmaster start time.
pub(crate) async fn connect(
    pg: &tokio_postgres::Config,
    tls: &TlsSetup,
    net: &NetOptions,
    registry: Option<&ConnRegistry>,
) -> Result<PgConn, ConnectError> {
    // Same connect; with the receiver dropped, asynchronous messages are discarded.
    connect_with_messages(pg, tls, net, registry, 1)
        .await
        .map(|(conn, _)| conn)
}

/// A driver error as text without anything from the connection string.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The deadpool manager for one server's pool.
#[derive(Debug)]
pub(crate) struct ConnManager {
    /// Where and as whom to connect (read-only pools carry
    /// `-c default_transaction_read_only=on` in their options).
    pub(crate) pg: tokio_postgres::Config,
    /// TLS settings.
    pub(crate) tls: TlsSetup,
    /// Socket settings.
    pub(crate) net: NetOptions,
    /// Bound on the rollback of a connection released inside a transaction.
    pub(crate) rollback_timeout: Duration,
    /// Where new connections register, to be failed together when the server is down.
    pub(crate) registry: Arc<ConnRegistry>,
}

impl managed::Manager for ConnManager {
    type Type = PgConn;
    type Error = ConnectError;

    async fn create(&self) -> Result<PgConn, ConnectError> {
        // Boxed: the connect future is kilobytes, and inline it would make every
        // checkout future (and every move of it) that large; connects are rare.
        Box::pin(connect(
            &self.pg,
            &self.tls,
            &self.net,
            Some(&self.registry),
        ))
        .await
    }

    async fn recycle(&self, conn: &mut PgConn, _: &Metrics) -> RecycleResult<ConnectError> {
        if conn.client.is_closed() || conn.state.is_closed() {
            return Err(RecycleError::message("connection closed"));
        }
        // A reply still in flight (its ReadyForQuery not read yet): give it a moment; a
        // connection still busy after that (an abandoned long query) is not handed out.
        if !conn.state.is_settled()
            && !conn
                .state
                .settle(self.rollback_timeout.min(Duration::from_millis(50)))
                .await
        {
            return Err(RecycleError::message("connection still busy with a reply"));
        }
        if conn.state.is_idle() {
            return Ok(());
        }
        // Released inside BEGIN (or a failed block): never hand that to the next lease.
        let status = conn.state.tx_status.load(Ordering::Acquire);
        if status == TX_IN_BLOCK || status == TX_FAILED {
            // Boxed for the same reason as `create`: rare, and large inline.
            let rollback = Box::pin(conn.client.batch_execute("ROLLBACK"));
            match tokio::time::timeout(self.rollback_timeout, rollback).await {
                Ok(Ok(())) if conn.state.is_idle() => return Ok(()),
                _ => {
                    return Err(RecycleError::message(
                        "could not roll back open transaction",
                    ))
                }
            }
        }
        Err(RecycleError::message("connection in an unknown state"))
    }
}

/// One server's pool.
pub(crate) type Pool = managed::Pool<ConnManager>;
/// A pooled connection.
pub(crate) type Pooled = managed::Object<ConnManager>;

/// Builds a pool for `pg` (read-only when `read_only`).
pub(crate) fn build_pool(
    pg: &tokio_postgres::Config,
    tls: &TlsSetup,
    read_only: bool,
    size: usize,
    net: NetOptions,
    rollback_timeout: Duration,
    registry: Arc<ConnRegistry>,
) -> Result<Pool, String> {
    let mut pg = pg.clone();
    if read_only {
        let opts = match pg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c default_transaction_read_only=on"),
            _ => "-c default_transaction_read_only=on".to_string(),
        };
        pg.options(opts);
    }
    managed::Pool::builder(ConnManager {
        pg,
        tls: tls.clone(),
        net,
        rollback_timeout,
        registry,
    })
    .max_size(size)
    .runtime(deadpool::Runtime::Tokio1)
    .create_timeout(Some(net.connect_timeout))
    .recycle_timeout(Some(rollback_timeout))
    .build()
    .map_err(|e| e.to_string())
}

/// What [`connect_with_messages`] forwards: a notification, or, as the last item, why
/// the connection ended.
pub(crate) type ConnMessage = Result<tokio_postgres::Notification, String>;

/// Like [`connect`] (the same socket options, sniffer, registry and one
/// `connect_timeout` over the whole connect), but the connection task forwards the
/// server's asynchronous notifications (LISTEN/NOTIFY) to the returned channel instead
/// of dropping them; [`connect`]'s task drives the connection as a plain future, which
/// discards them. Used by the listener actor.
///
/// The channel holds at most `buffer` messages: a reader that falls behind holds back
/// the connection task (and so the socket), never memory, so its reader must not block.
/// If the connection fails, its last item is `Err` with the reason; it then closes. It
/// closes without an error item when the client was dropped and the connection ended
/// cleanly. Once the receiver is dropped, later notifications are discarded and the
/// connection keeps serving its client.
pub(crate) async fn connect_with_messages(
    pg: &tokio_postgres::Config,
    tls: &TlsSetup,
    net: &NetOptions,
    registry: Option<&ConnRegistry>,
    buffer: usize,
) -> Result<(PgConn, tokio::sync::mpsc::Receiver<ConnMessage>), ConnectError> {
    let fut = async {
        let socket = open_socket(pg, net)
            .await
            .map_err(|e| ConnectError::Socket(e.to_string()))?;
        let state = Arc::new(ConnState::new());
        if let Some(r) = registry {
            r.add(&state);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(buffer.max(1));
        let client = startup(pg, tls, socket, &state, tx).await?;
        let row = client
            .query_one(
                "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(|e| ConnectError::FirstQuery(describe(&e)))?;
        let postmaster_start_us: i64 = row
            .try_get(0)
            .map_err(|e| ConnectError::FirstQuery(describe(&e)))?;
        Ok((
            PgConn {
                client: Box::new(client),
                state,
                postmaster_start_us,
            },
            rx,
        ))
    };
    let result = match tokio::time::timeout(net.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(net.connect_timeout)),
    };
    if let Err(e) = &result {
        tracing::debug!(target: TARGET, error = %e, "connect failed");
    }
    result
}

/// TLS as `tls` says, then startup and authentication; spawns the connection task.
///
/// With TLS, pgfleet sends the `SSLRequest` itself (unless `sslnegotiation=direct`) and
/// reads the one-byte answer, so a server without TLS is told apart from a failed
/// handshake, and `prefer` falls back on the same socket. The driver is then told to
/// start TLS at once (direct negotiation) through [`crate::tls`]'s connector, which puts
/// the sniffer above TLS and gives the driver channel binding for SCRAM.
async fn startup(
    pg: &tokio_postgres::Config,
    tls: &TlsSetup,
    socket: Socket,
    state: &Arc<ConnState>,
    tx: tokio::sync::mpsc::Sender<ConnMessage>,
) -> Result<Client, ConnectError> {
    #[cfg(feature = "tls")]
    if let Some(connector) = &tls.connector {
        let mut socket = socket;
        let accepted = tls.settings.direct || crate::tls::request_tls(&mut socket).await?;
        if accepted {
            let mut direct = pg.clone();
            direct
                .ssl_mode(tokio_postgres::config::SslMode::Require)
                .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
            let (client, connection) = direct
                .connect_raw(socket, connector.handshake(state.clone()))
                .await
                .map_err(|e| startup_error(&e))?;
            spawn_connection(connection, tx);
            return Ok(client);
        }
        if tls.mode() != TlsMode::Prefer {
            return Err(crate::error::TlsError::NotSupported { mode: tls.mode() }.into());
        }
        tracing::debug!(target: TARGET, "server does not accept TLS; sslmode=prefer goes on in plaintext");
        return plain_startup(pg, socket, state, tx).await;
    }
    debug_assert!(
        !tls.mode().needs_tls(),
        "validated: TLS modes need the tls feature"
    );
    plain_startup(pg, socket, state, tx).await
}

/// Startup and authentication in plaintext, the sniffer on the socket.
async fn plain_startup(
    pg: &tokio_postgres::Config,
    socket: Socket,
    state: &Arc<ConnState>,
    tx: tokio::sync::mpsc::Sender<ConnMessage>,
) -> Result<Client, ConnectError> {
    let stream = SniffStream::new(socket, state.clone());
    // The URL's `ssl_mode` is `Disable` (pgfleet negotiates TLS), so NoTls is never asked.
    let (client, connection) = pg
        .connect_raw(stream, NoTls)
        .await
        .map_err(|e| startup_error(&e))?;
    spawn_connection(connection, tx);
    Ok(client)
}

/// A startup failure: the connector's typed TLS failure when that is what it was.
fn startup_error(e: &tokio_postgres::Error) -> ConnectError {
    let tls = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<crate::error::TlsError>())
        .cloned();
    match tls {
        Some(t) => ConnectError::Tls(t),
        None => ConnectError::Startup(describe(e)),
    }
}

/// Drives `connection` on its own task, forwarding notifications to `tx` (see
/// [`connect_with_messages`]).
fn spawn_connection<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::Sender<ConnMessage>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            // `poll_message` instead of awaiting the connection: only it hands out
            // the asynchronous messages (notifications, notices).
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if let Some(t) = &tx {
                        if t.send(Ok(n)).await.is_err() {
                            tx = None;
                        }
                    }
                }
                // Notices and anything newer: nothing to forward.
                Some(Ok(_)) => {}
                // Terminal: poll_message must not be called again.
                Some(Err(e)) => {
                    if let Some(t) = tx {
                        let _ = t.send(Err(describe(&e))).await;
                    }
                    return;
                }
                None => return,
            }
        }
    });
}

/// Opens one connection to the server named `server` in `config` exactly as the fleet's
/// pools do (the same socket options, TLS as its `sslmode` and `sslrootcert` say, startup
/// and authentication, all under `fleet.connect_timeout`), runs one query, and closes it.
/// Returns whether the connection was encrypted.
///
/// A fleet keeps retrying a server it cannot connect to and only shows the last error as
/// text in [`Status`](crate::Status); this tells at once, with a typed reason, whether a
/// server can be reached, e.g. before [`Fleet::start`](crate::Fleet::start) or in a
/// health check.
///
/// ```no_run
/// # async fn demo(config: pgfleet::Config) {
/// use pgfleet::{ConnectError, Error, TlsError};
///
/// match pgfleet::check_server(&config, "primary").await {
///     Ok(encrypted) => println!("primary reachable (TLS: {encrypted})"),
///     Err(Error::Connect { source: ConnectError::Tls(TlsError::HostnameMismatch { host, .. }), .. }) => {
///         println!("the primary's certificate does not name {host}")
///     }
///     Err(e) => println!("{e}"),
/// }
/// # }
/// ```
///
/// # Errors
///
/// [`Error::Config`] if `config` is invalid or has no server named `server`;
/// [`Error::Connect`] naming the server, with a [`ConnectError`] that says what failed
/// (the socket, [TLS](ConnectError::Tls), the startup, or the timeout).
pub async fn check_server(config: &Config, server: &str) -> Result<bool, Error> {
    check_cluster_server(config, crate::DEFAULT_CLUSTER, server).await
}

/// As [`check_server`], for the server named `server` in cluster `cluster` of `config`
/// (a `[clusters.NAME]` table, or [`DEFAULT_CLUSTER`](crate::DEFAULT_CLUSTER) for the
/// top-level servers). Configuration errors name the key as written, e.g.
/// `clusters.tenant_a.replicas[0].url`.
///
/// # Errors
///
/// As [`check_server`]; [`Error::Config`] also when there is no cluster `cluster`.
pub async fn check_cluster_server(
    config: &Config,
    cluster: &str,
    server: &str,
) -> Result<bool, Error> {
    config.validate()?;
    let config = &config.cluster(cluster).ok_or_else(|| {
        Error::Config(ConfigError::Invalid {
            key: "cluster".to_owned(),
            message: format!("no cluster is named `{cluster}`"),
        })
    })?;
    let prefix = Config::cluster_key_prefix(cluster);
    let (key, url) = std::iter::once((format!("{prefix}primary.url"), &config.primary))
        .filter(|(_, p)| p.name == server)
        .map(|(k, p)| (k, &p.url))
        .chain(
            config
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| r.name == server)
                .map(|(i, r)| (format!("{prefix}replicas[{i}].url"), &r.url)),
        )
        .next()
        .ok_or_else(|| {
            Error::Config(ConfigError::Invalid {
                key: "server".to_owned(),
                message: format!("no server is named `{server}`"),
            })
        })?;
    let tls = TlsSetup::new(config, &key, url)?;
    let net = NetOptions {
        connect_timeout: config.fleet.connect_timeout,
        tcp_keepalive: config.fleet.tcp_keepalive,
        tcp_user_timeout: config.fleet.tcp_user_timeout,
    };
    let failed = |source| Error::Connect {
        server: server.to_owned(),
        source,
    };
    let conn = connect(url.pg_config(), &tls, &net, None)
        .await
        .map_err(failed)?;
    let row = tokio::time::timeout(
        config.fleet.probe_timeout,
        conn.client.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        ),
    )
    .await
    .map_err(|_| failed(ConnectError::Timeout(config.fleet.probe_timeout)))?
    .map_err(|e| failed(ConnectError::FirstQuery(describe(&e))))?;
    row.try_get(0)
        .map_err(|e| failed(ConnectError::FirstQuery(describe(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn sniffer() -> SniffStream<()> {
        SniffStream::new((), Arc::new(ConnState::new()))
    }

    /// A server that goes away while a reply is owed: `settle` must not wait for a
    /// `ReadyForQuery` that will never come (a session's next read waited on it).
    #[tokio::test]
    async fn end_of_stream_settles_nothing_and_wakes_waiters_at_once() {
        use tokio::io::AsyncReadExt;
        let (client_end, server_end) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::new());
        let mut s = SniffStream::new(client_end, state.clone());
        assert!(!state.is_settled(), "the startup's reply is owed");
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.settle(Duration::from_secs(30)).await }
        });
        drop(server_end);
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).await.expect("EOF reads as 0 bytes"), 0);
        assert!(state.is_closed());
        let settled = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("settle returned at the end of the stream, not at its timeout")
            .expect("task");
        assert!(!settled, "nothing settled it");
        assert!(
            !state.settle(Duration::from_secs(30)).await,
            "and at once afterwards"
        );
    }

    #[test]
    fn killing_a_connection_closes_it() {
        let state = ConnState::new();
        assert!(!state.is_closed());
        state.kill();
        assert!(state.is_closed());
    }

    #[test]
    fn tracks_ready_for_query_across_split_reads() {
        let mut stream = msg(b'C', b"SELECT 1\0");
        stream.extend(msg(b'Z', b"T"));
        stream.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'x']));
        stream.extend(msg(b'Z', b"I"));
        // Feed it in every possible two-way split and byte by byte.
        for split in 0..stream.len() {
            let mut s = sniffer();
            s.observe(&stream[..split]);
            s.observe(&stream[split..]);
            assert!(s.state.is_idle(), "split at {split}");
        }
        let mut s = sniffer();
        for (i, b) in stream.iter().enumerate() {
            s.observe(std::slice::from_ref(b));
            if i == 14 + 5 {
                // Right after the 'T' status byte.
                assert_eq!(s.state.tx_status.load(Ordering::Acquire), TX_IN_BLOCK);
            }
        }
        assert!(s.state.is_idle());
    }

    #[test]
    fn spots_read_only_refusals_only() {
        let err = |code: &str| {
            let mut body = b"SERROR\0".to_vec();
            body.push(b'C');
            body.extend_from_slice(code.as_bytes());
            body.push(0);
            body.extend_from_slice(b"Mcannot execute INSERT in a read-only transaction\0\0");
            msg(b'E', &body)
        };
        let mut s = sniffer();
        s.observe(&err("42P01"));
        assert!(!s.state.take_read_only_refusal());
        let data = err("25006");
        s.observe(&data[..7]);
        s.observe(&data[7..]);
        assert!(s.state.take_read_only_refusal());
        assert!(!s.state.take_read_only_refusal(), "the flag clears");
    }

    #[test]
    fn counts_replies_owed_until_ready_for_query() {
        let mut s = sniffer();
        let mut out = Out::Startup {
            buf: [0; 4],
            have: 0,
        };
        // Startup message (length 8 + 4 bytes of version), owed one ReadyForQuery.
        observe_out(&mut out, &s.state, &[0, 0, 0, 8, 0, 3, 0, 0]);
        assert!(!s.state.is_settled());
        s.observe(&msg(b'Z', b"I"));
        assert!(s.state.is_settled());
        // Extended protocol: Parse, Bind, Execute, Sync, written in odd pieces.
        let mut w = msg(b'P', b"\0SELECT 1\0\0\0");
        w.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        w.extend(msg(b'E', b"\0\0\0\0\0"));
        w.extend(msg(b'S', b""));
        w.extend(msg(b'Q', b"SELECT 2\0"));
        for chunk in w.chunks(3) {
            observe_out(&mut out, &s.state, chunk);
        }
        s.observe(&msg(b'Z', b"E"));
        assert!(!s.state.is_settled(), "one reply still owed");
        s.observe(&msg(b'Z', b"I"));
        assert!(s.state.is_settled());
    }

    #[test]
    fn sqlstate_parser_handles_truncation() {
        assert_eq!(sqlstate(b"SERROR\0C25006\0\0"), Some(&b"25006"[..]));
        assert_eq!(sqlstate(b"SERROR\0C250"), None);
        assert_eq!(sqlstate(b""), None);
        assert_eq!(sqlstate(b"\0"), None);
    }
}

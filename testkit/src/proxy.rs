//! The per-node TCP proxy that injects network faults: blackhole, reset, delay.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::Error;

/// What a [`Proxy`] does with traffic. Set with [`Proxy::pass`], [`Proxy::blackhole`],
/// [`Proxy::reset`] and [`Proxy::delay`]; read with [`Proxy::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Forward everything unchanged (the default).
    #[default]
    Pass,
    /// A hung server: new connections are accepted but never answered, and existing connections
    /// stop forwarding in both directions (bytes are read and discarded; the sockets stay open).
    Blackhole,
    /// A dead server: existing connections are closed at once, and so is every new one, with an
    /// RST where possible (`SO_LINGER` 0).
    Reset,
    /// A slow network: each forwarded chunk, in either direction, waits this long first.
    Delay(Duration),
}

/// A TCP proxy in front of one node: `127.0.0.1:proxy_port` → `127.0.0.1:port`.
///
/// Every client URL of the testkit ([`Node::url`](crate::Node::url)) goes through it, so tests can
/// fail the network between the application and one server without touching the server itself
/// (replication traffic goes direct and is unaffected).
///
/// The proxy's tasks run on the cluster's own background runtime, so they outlive the runtime of
/// any single `#[tokio::test]`. The mode is shared by all connections; a change applies to
/// connections already open as well as to new ones.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    port: u16,
    /// Where the node listens.
    upstream: u16,
    /// The mode, watched by the accept loop and every connection task (they end when it drops).
    mode: watch::Sender<ProxyMode>,
}

impl Proxy {
    /// Binds a free loopback port and starts forwarding to `upstream` on `runtime`.
    pub(crate) fn start(runtime: &Handle, upstream: u16) -> Result<Self, Error> {
        let what = "binding a proxy port on 127.0.0.1";
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::io(what, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(what, e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io(what, e))?
            .port();
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).map_err(|e| Error::io(what, e))?
        };
        let (mode, rx) = watch::channel(ProxyMode::Pass);
        runtime.spawn(accept_loop(listener, upstream, rx));
        Ok(Self {
            port,
            upstream,
            mode,
        })
    }

    /// Normal forwarding (the default). Connections that lost bytes to a blackhole stay silent:
    /// their protocol stream is broken; they end when the client closes them or on [`reset`](Self::reset).
    pub fn pass(&self) {
        self.set(ProxyMode::Pass);
    }

    /// Hangs the server as seen by clients: see [`ProxyMode::Blackhole`].
    pub fn blackhole(&self) {
        self.set(ProxyMode::Blackhole);
    }

    /// Closes existing and new connections at once: see [`ProxyMode::Reset`]. Stays in force until
    /// [`pass`](Self::pass).
    pub fn reset(&self) {
        self.set(ProxyMode::Reset);
    }

    /// Adds `d` of latency to each forwarded chunk in both directions. `Duration::ZERO` is [`pass`](Self::pass).
    pub fn delay(&self, d: Duration) {
        self.set(if d.is_zero() {
            ProxyMode::Pass
        } else {
            ProxyMode::Delay(d)
        });
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's own port the proxy forwards to.
    pub fn upstream_port(&self) -> u16 {
        self.upstream
    }

    /// Publishes a mode to the accept loop and every connection.
    fn set(&self, mode: ProxyMode) {
        tracing::debug!(target: "pgfleet_testkit::proxy", port = self.port, ?mode, "proxy mode");
        self.mode.send_replace(mode);
    }
}

/// Accepts until the [`Proxy`] is dropped.
async fn accept_loop(listener: TcpListener, upstream: u16, mut mode: watch::Receiver<ProxyMode>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(connection(client, upstream, mode.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: back off briefly instead of spinning.
                    tracing::warn!(target: "pgfleet_testkit::proxy", "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = mode.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// Closes `stream` with an RST rather than a FIN.
fn rst(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One client connection, for its whole life.
async fn connection(client: TcpStream, upstream: u16, mut mode: watch::Receiver<ProxyMode>) {
    let current = *mode.borrow_and_update();
    let server = match current {
        ProxyMode::Reset => return rst(client),
        // Accept, and never answer: no upstream connection at all.
        ProxyMode::Blackhole => None,
        ProxyMode::Pass | ProxyMode::Delay(_) => {
            match TcpStream::connect(("127.0.0.1", upstream)).await {
                Ok(server) => {
                    let _ = server.set_nodelay(true);
                    Some(server)
                }
                // The node is down: tell the client as a dead server would.
                Err(_) => return rst(client),
            }
        }
    };
    if let Err(e) = pump(client, server, mode).await {
        tracing::trace!(target: "pgfleet_testkit::proxy", "connection ended: {e}");
    }
}

/// What woke the pump.
#[derive(Debug)]
enum Event {
    /// Bytes (or EOF) from the client.
    Client(io::Result<usize>),
    /// Bytes (or EOF) from the server.
    Server(io::Result<usize>),
    /// The mode changed; `false` when the proxy is gone.
    Mode(bool),
}

/// Reads from `stream` if there is one; pending forever otherwise.
async fn read_opt(stream: Option<&mut TcpStream>, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Copies both ways, applying the mode to every chunk. `server` is `None` for a connection
/// accepted while black-holed.
async fn pump(
    mut client: TcpStream,
    mut server: Option<TcpStream>,
    mut mode: watch::Receiver<ProxyMode>,
) -> io::Result<()> {
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    // Once bytes were swallowed the stream is corrupt: never forward again.
    let mut broken = server.is_none();
    let (mut client_eof, mut server_eof) = (false, false);
    loop {
        let event = tokio::select! {
            r = client.read(&mut from_client), if !client_eof => Event::Client(r),
            r = read_opt(server.as_mut(), &mut from_server), if !server_eof => Event::Server(r),
            r = mode.changed() => Event::Mode(r.is_ok()),
        };
        let current = *mode.borrow_and_update();
        if current == ProxyMode::Reset {
            rst(client);
            if let Some(server) = server {
                rst(server);
            }
            return Ok(());
        }
        let forward = |n: usize| -> Option<Duration> {
            match current {
                _ if n == 0 => None,
                ProxyMode::Pass => Some(Duration::ZERO),
                ProxyMode::Delay(d) => Some(d),
                ProxyMode::Blackhole | ProxyMode::Reset => None,
            }
        };
        match event {
            Event::Mode(true) => {}
            Event::Mode(false) => return Ok(()),
            Event::Client(r) => {
                let n = r?;
                if n == 0 {
                    client_eof = true;
                    if let Some(s) = server.as_mut() {
                        let _ = s.shutdown().await;
                    }
                } else if let (false, Some(delay), Some(s)) = (broken, forward(n), server.as_mut())
                {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    s.write_all(&from_client[..n]).await?;
                } else {
                    broken = true;
                }
            }
            Event::Server(r) => {
                let n = r?;
                if n == 0 {
                    server_eof = true;
                    let _ = client.shutdown().await;
                } else if let (false, Some(delay)) = (broken, forward(n)) {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    client.write_all(&from_server[..n]).await?;
                } else {
                    broken = true;
                }
            }
        }
        if client_eof && (server_eof || server.is_none()) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy in front of an echo server, on a background runtime like the cluster's.
    struct Rig {
        rt: tokio::runtime::Runtime,
        proxy: Proxy,
    }

    fn rig() -> Rig {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let echo = {
            let _e = rt.enter();
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            TcpListener::from_std(l).expect("listener")
        };
        let upstream = echo.local_addr().expect("addr").port();
        rt.spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start(rt.handle(), upstream).expect("proxy");
        Rig { rt, proxy }
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_blackholes_and_resets() {
        let Rig { rt, proxy } = rig();
        let port = proxy.port();
        let mut a = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        assert_eq!(roundtrip(&mut a, b"hello").await.expect("echo"), b"hello");

        proxy.blackhole();
        assert_eq!(proxy.mode(), ProxyMode::Blackhole);
        // Existing connection: bytes vanish.
        let hung = tokio::time::timeout(Duration::from_millis(200), roundtrip(&mut a, b"x")).await;
        assert!(hung.is_err(), "black-holed connection answered");
        // New connection: accepted, never answered.
        let mut b = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("accepted");
        let hung = tokio::time::timeout(Duration::from_millis(200), roundtrip(&mut b, b"y")).await;
        assert!(hung.is_err(), "black-holed new connection answered");

        proxy.pass();
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        assert_eq!(roundtrip(&mut c, b"again").await.expect("echo"), b"again");

        proxy.reset();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("reset closes promptly");
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "reset connection still open: {r:?}"
        );
        // The reset may land before the client's connect completes (the
        // kernel reports ECONNRESET from connect) or after it (the first
        // read fails): either way no byte comes back.
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let mut d = TcpStream::connect(("127.0.0.1", port)).await?;
            roundtrip(&mut d, b"z").await
        })
        .await
        .expect("reset closes new connections promptly");
        assert!(r.is_err(), "reset proxy answered: {r:?}");

        proxy.delay(Duration::from_millis(100));
        let mut e = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let t = std::time::Instant::now();
        assert_eq!(roundtrip(&mut e, b"slow").await.expect("echo"), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "two delayed chunks"
        );
        drop(proxy);
        rt.shutdown_background();
    }
}

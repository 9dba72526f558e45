//! [`LocalCluster`] and its [`ClusterBuilder`]: starting, describing and tearing down a cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{oneshot, OnceCell};
use tokio_postgres::{Client, NoTls};

use crate::bins::{self, PgBins, RunAs};
use crate::node::{SUPERUSER, SUPERUSER_PASSWORD};
use crate::process::{self, Watchdog};
use crate::slots::{self, Slot};
use crate::template;
use crate::tls::{self, TlsFiles};
use crate::{Error, Node, Proxy};

/// The most replicas a cluster may have.
pub const MAX_REPLICAS: usize = 4;

/// How long startup waits for each replica to stream.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a start is retried with a new port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// How long teardown gives an immediate shutdown before SIGKILL.
const TEARDOWN_GRACE: Duration = Duration::from_secs(10);

/// Settings of every node, before the builder's own (which override them).
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("hot_standby", "on"),
    ("shared_buffers", "32MB"),
    ("max_connections", "200"),
    ("wal_keep_size", "256MB"),
    ("hot_standby_feedback", "on"),
    ("log_min_messages", "warning"),
    ("logging_collector", "off"),
    // A replica whose primary went away retries after this (default 5 s): tests restart primaries.
    ("wal_retrieve_retry_interval", "200ms"),
];

/// A real, local, replicated PostgreSQL cluster: one primary and 0 to [`MAX_REPLICAS`] streaming
/// replicas, each behind its own fault-injecting [`Proxy`].
///
/// Start one with [`LocalCluster::builder`], or share one per test binary with
/// [`LocalCluster::shared`]. Dropping it (also while a test panics) stops every server, removes
/// its files and frees its concurrency slot; see the crate docs for the guarantees.
#[derive(Debug)]
pub struct LocalCluster {
    /// The primary first, then the replicas in order. Dropped before `cleanup`, which ends the proxies.
    nodes: Vec<Node>,
    /// How to run the PostgreSQL programs.
    pub(crate) ctx: Ctx,
    /// The certificates, when started with TLS.
    tls: Option<TlsFiles>,
    /// Stops everything on drop.
    _cleanup: Cleanup,
}

/// What the fault operations need to run PostgreSQL programs.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The binaries.
    pub(crate) bins: PgBins,
    /// The OS user to run them as, when we are root.
    pub(crate) run_as: Option<RunAs>,
    /// The cluster dir (also the unix socket dir).
    pub(crate) dir: PathBuf,
}

impl Ctx {
    /// A command for one of the PostgreSQL programs.
    pub(crate) fn command(&self, program: &str) -> tokio::process::Command {
        bins::command(&self.bins.bin(program), self.run_as, &self.dir)
    }

    /// `pg_ctl start -w` on `data_dir`, logging to `log`.
    pub(crate) async fn pg_ctl_start(
        &self,
        name: &str,
        data_dir: &Path,
        log: &Path,
    ) -> Result<(), Error> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("start")
            .arg("-w")
            .args(["-t", "60"])
            .arg("-D")
            .arg(data_dir)
            .arg("-l")
            .arg(log);
        bins::run(cmd, &format!("{name}: pg_ctl start"), Some(log)).await?;
        Ok(())
    }
}

/// Builds a [`LocalCluster`]: `LocalCluster::builder().replicas(1).setting("work_mem", "8MB").start().await?`.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .start().await"]
pub struct ClusterBuilder {
    /// How many replicas.
    replicas: usize,
    /// `postgresql.conf` overrides on every node.
    settings: Vec<(String, String)>,
    /// `postgresql.conf` overrides on replicas only.
    replica_settings: Vec<(String, String)>,
    /// Run `initdb` instead of copying the shared template (a system identifier of its own).
    own_system_id: bool,
    /// Whether the servers accept TLS.
    tls: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            replicas: 2,
            settings: Vec::new(),
            replica_settings: Vec::new(),
            own_system_id: false,
            tls: false,
        }
    }
}

impl ClusterBuilder {
    /// How many streaming replicas, 0 to [`MAX_REPLICAS`]. Default: 2. More is an error at
    /// [`start`](Self::start).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// A `postgresql.conf` setting on every node, after (so overriding) the testkit's defaults:
    /// `fsync=off`, `full_page_writes=off`, `wal_level=replica`, `max_wal_senders=10`,
    /// `hot_standby=on`, `shared_buffers=32MB`, `max_connections=200`, `wal_keep_size=256MB`,
    /// `hot_standby_feedback=on`, `log_min_messages=warning`, `wal_retrieve_retry_interval=200ms`
    /// (replicas reconnect quickly to a restarted primary). The value is quoted for you.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Whether the servers accept TLS: a fresh CA ([`LocalCluster::ca_cert_path`]) signs a
    /// certificate for `localhost` and `127.0.0.1` that every node serves (`ssl = on`);
    /// plaintext connections are still accepted. Default: false.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// A `postgresql.conf` setting on replicas only (after [`setting`](Self::setting)s).
    pub fn replica_setting(mut self, name: &str, value: &str) -> Self {
        self.replica_settings
            .push((name.to_owned(), value.to_owned()));
        self
    }

    /// Gives the cluster a system identifier of its own: runs `initdb` for it instead of
    /// copying the data-dir template every other cluster on this machine is cloned from
    /// (those share one identifier). For tests that tell clusters apart by identifier,
    /// e.g. a token of one cluster shown to another. Costs a few seconds. Default: off.
    pub fn own_system_id(mut self, yes: bool) -> Self {
        self.own_system_id = yes;
        self
    }

    /// Starts the cluster and returns once every replica streams from the primary.
    ///
    /// Waits first for a free cluster slot (see the crate docs on the concurrency bound).
    ///
    /// # Errors
    ///
    /// [`Error::TooManyReplicas`], [`Error::InvalidSetting`], [`Error::BinariesNotFound`],
    /// [`Error::NoPostgresUser`], [`Error::InvalidEnv`] before anything starts;
    /// [`Error::NoSlot`] after 5 minutes without a free slot; [`Error::Command`] (with the server log's
    /// tail), [`Error::Postgres`], [`Error::Timeout`] or [`Error::Io`] if a step fails, after which
    /// whatever was started is stopped and removed.
    pub async fn start(self) -> Result<LocalCluster, Error> {
        if self.replicas > MAX_REPLICAS {
            return Err(Error::TooManyReplicas {
                requested: self.replicas,
                max: MAX_REPLICAS,
            });
        }
        for (name, value) in self.settings.iter().chain(&self.replica_settings) {
            conf_line(name, value)?;
        }
        let bins = PgBins::find()?;
        let run_as = RunAs::detect()?;
        let slot = slots::acquire().await?;

        let dir = tempfile::Builder::new()
            .prefix("pgfleet-testkit-")
            .tempdir()
            .map_err(|e| Error::io("creating the cluster temp dir", e))?
            .keep();
        let mut cleanup = Cleanup {
            dir: dir.clone(),
            watchdog: None,
            background: None,
            slot: Some(slot),
        };
        cleanup.watchdog = Some(Watchdog::spawn(&dir)?);
        // Private: the unix socket in it trusts local connections as any role.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod 700 {}", dir.display()), e))?;
        if let Some(u) = run_as {
            u.chown(&dir)?;
        }
        let background = Background::start()?;
        let runtime = background.handle.clone();
        cleanup.background = Some(background);
        let tls = match self.tls {
            true => Some(tls::generate(&dir, run_as)?),
            false => None,
        };
        let ctx = Ctx { bins, run_as, dir };
        tracing::info!(
            target: "pgfleet_testkit::cluster",
            dir = %ctx.dir.display(),
            replicas = self.replicas,
            slot = cleanup.slot.as_ref().map(Slot::index),
            "starting a local cluster"
        );

        let mut nodes = Vec::with_capacity(self.replicas + 1);
        let primary = self.start_primary(&ctx, &runtime, tls.as_ref()).await?;
        // Concurrently: each pg_basebackup is mostly file-system work in the kernel.
        let replicas = futures_util::future::try_join_all(
            (1..=self.replicas).map(|i| self.start_replica(&ctx, &runtime, &primary, i)),
        )
        .await;
        nodes.push(primary);
        nodes.extend(replicas?);
        let cluster = LocalCluster {
            nodes,
            ctx,
            tls,
            _cleanup: cleanup,
        };
        for replica in cluster.replicas() {
            cluster.wait_streaming(replica, STREAMING_TIMEOUT).await?;
        }
        tracing::info!(target: "pgfleet_testkit::cluster", dir = %cluster.ctx.dir.display(), "local cluster ready");
        Ok(cluster)
    }

    /// Create (from the template), configure and start the primary.
    async fn start_primary(
        &self,
        ctx: &Ctx,
        runtime: &Handle,
        tls: Option<&TlsFiles>,
    ) -> Result<Node, Error> {
        let name = "primary";
        let data_dir = ctx.dir.join(name);
        let log = ctx.dir.join(format!("{name}.log"));
        template::primary_data_dir(ctx, &data_dir, self.own_system_id).await?;

        let mut conf = String::new();
        for (k, v) in BASE_SETTINGS {
            conf.push_str(&conf_line(k, v)?);
        }
        conf.push_str(&conf_line(
            "unix_socket_directories",
            &ctx.dir.to_string_lossy(),
        )?);
        conf.push_str(&conf_line("cluster_name", name)?);
        // Into this cluster's copy only (the template stays plain); replicas inherit it
        // through pg_basebackup, which copies postgresql.conf.
        for (k, v) in tls.map(TlsFiles::settings).into_iter().flatten() {
            conf.push_str(&conf_line(k, &v)?);
        }
        for (k, v) in &self.settings {
            conf.push_str(&conf_line(k, v)?);
        }
        append_conf(&data_dir, &conf)?;
        let port = start_on_free_port(ctx, name, &data_dir, &log).await?;
        Ok(Node::new(
            name.to_owned(),
            port,
            Proxy::start(runtime, port)?,
            data_dir,
            log,
        ))
    }

    /// pg_basebackup from the primary, configure and start replica number `i` (1-based).
    async fn start_replica(
        &self,
        ctx: &Ctx,
        runtime: &Handle,
        primary: &Node,
        i: usize,
    ) -> Result<Node, Error> {
        let name = format!("replica{i}");
        let data_dir = ctx.dir.join(&name);
        let log = ctx.dir.join(format!("{name}.log"));
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} application_name={name}",
            primary.port()
        );
        let mut backup = ctx.command("pg_basebackup");
        backup
            .arg("-D")
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-d"])
            .arg(&conninfo)
            // Not on the command line, where `ps` shows it; -R still writes it to primary_conninfo.
            .env("PGPASSWORD", SUPERUSER_PASSWORD);
        bins::run(backup, &format!("{name}: pg_basebackup"), None).await?;

        let mut conf = String::new();
        conf.push_str(&conf_line("cluster_name", &name)?);
        for (k, v) in &self.replica_settings {
            conf.push_str(&conf_line(k, v)?);
        }
        append_conf(&data_dir, &conf)?;
        let port = start_on_free_port(ctx, &name, &data_dir, &log).await?;
        Ok(Node::new(
            name,
            port,
            Proxy::start(runtime, port)?,
            data_dir,
            log,
        ))
    }
}

/// Picks a free port, writes it to the node's config and starts the node; retries with another
/// port when another process took the chosen one in between.
async fn start_on_free_port(
    ctx: &Ctx,
    name: &str,
    data_dir: &Path,
    log: &Path,
) -> Result<u16, Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        append_conf(data_dir, &conf_line("port", &port.to_string())?)?;
        let log_len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        match ctx.pg_ctl_start(name, data_dir, log).await {
            Ok(()) => return Ok(port),
            Err(e)
                if attempt < PORT_ATTEMPTS
                    && log_since(log, log_len).contains("Address already in use") =>
            {
                tracing::info!(target: "pgfleet_testkit::cluster", "{name}: port {port} taken meanwhile, retrying: {e}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// What was appended to `log` after byte `from`.
fn log_since(log: &Path, from: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// A free loopback port: bind port 0, read it, release it.
pub(crate) fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("finding a free port on 127.0.0.1", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port on 127.0.0.1", e))
}

/// One `postgresql.conf` line, the value single-quoted.
fn conf_line(name: &str, value: &str) -> Result<String, Error> {
    let bad = |reason| Error::InvalidSetting {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Err(bad("names are made of ASCII letters, digits, '_' and '.'"));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(bad("values cannot hold line breaks or NUL"));
    }
    let quoted = value.replace('\\', "\\\\").replace('\'', "''");
    Ok(format!("{name} = '{quoted}'\n"))
}

/// `s` as a TOML basic string, quoted: a temp dir's path may hold `"` or `\`.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Appends to `<data_dir>/postgresql.conf` (later lines win).
fn append_conf(data_dir: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    let path = data_dir.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    f.write_all(format!("\n# pgfleet-testkit\n{text}").as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Connects with `url`, spawning the connection task on the caller's runtime.
pub(crate) async fn connect(url: &str, node: &str, what: &str) -> Result<Client, Error> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| Error::pg(node, what, e))?;
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::pg(node, what, e))?;
    let node = node.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "pgfleet_testkit::cluster", "{node}: connection closed: {e}");
        }
    });
    Ok(client)
}

impl LocalCluster {
    /// A builder with the defaults: 2 replicas, no extra settings.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A cluster shared by all tests of one test binary: started once, lazily, by the first caller
    /// (primary + 2 replicas, default settings), and never dropped. Its servers and files are removed
    /// by the cleanup watchdog when the test process exits. It holds one cluster slot for the
    /// life of the process.
    ///
    /// Tests that break their cluster (stop, kill, promote, pause replay, proxy faults...) must not
    /// use it; they start their own with [`builder`](Self::builder).
    ///
    /// # Errors
    ///
    /// As [`ClusterBuilder::start`]; a failed start is retried by the next caller.
    pub async fn shared() -> Result<&'static LocalCluster, Error> {
        static SHARED: OnceCell<LocalCluster> = OnceCell::const_new();
        SHARED.get_or_try_init(|| Self::builder().start()).await
    }

    /// The primary (as started; after [`promote`](Self::promote) it is still the node named "primary").
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// Replica `i`, 0-based (`replica(0)` is "replica1").
    ///
    /// # Panics
    ///
    /// If there is no such replica.
    pub fn replica(&self, i: usize) -> &Node {
        &self.replicas()[i]
    }

    /// All replicas, in order.
    pub fn replicas(&self) -> &[Node] {
        &self.nodes[1..]
    }

    /// Every node, the primary first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// The CA certificate (PEM) that signed the servers' certificate, for clients'
    /// `sslrootcert`; `None` unless started with [`ClusterBuilder::tls`].
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_cert.as_path())
    }

    /// The cluster's temp dir: data dirs, server logs and unix sockets.
    pub fn dir(&self) -> &Path {
        &self.ctx.dir
    }

    /// A complete pgfleet TOML config for this cluster, every URL through the nodes' proxies;
    /// everything else (the `[fleet]` and `[consistency]` tables) is left to pgfleet's defaults:
    ///
    /// ```toml
    /// [primary]
    /// name = "primary"
    /// url = "postgres://pgfleet_app:PASSWORD@127.0.0.1:PROXYPORT/app"
    ///
    /// [[replicas]]
    /// name = "replica1"
    /// url = "postgres://pgfleet_app:PASSWORD@127.0.0.1:PROXYPORT/app"
    /// weight = 1
    /// ```
    pub fn pgfleet_toml(&self) -> String {
        self.pgfleet_toml_with("")
    }

    /// [`pgfleet_toml`](Self::pgfleet_toml) with `tables` (e.g. `"[fleet]\nprobe_interval = \"50ms\""`)
    /// placed first, so callers can set what they need without parsing the TOML.
    pub fn pgfleet_toml_with(&self, tables: &str) -> String {
        let mut s = String::new();
        if !tables.trim().is_empty() {
            s.push_str(tables.trim_end());
            s.push_str("\n\n");
        }
        let p = self.primary();
        let _ = writeln!(
            s,
            "[primary]\nname = \"{}\"\nurl = \"{}\"",
            p.name(),
            p.url()
        );
        for r in self.replicas() {
            let _ = writeln!(
                s,
                "\n[[replicas]]\nname = \"{}\"\nurl = \"{}\"\nweight = 1",
                r.name(),
                r.url()
            );
        }
        s
    }

    /// [`pgfleet_toml`](Self::pgfleet_toml) with TLS for a cluster started with
    /// [`ClusterBuilder::tls`]: a `[fleet.tls]` table first, so every server is verified
    /// against the cluster's CA (the certificate holds the URLs' `127.0.0.1`):
    ///
    /// ```toml
    /// [fleet.tls]
    /// sslmode = "verify-full"
    /// sslrootcert = "/tmp/.../tls/ca.crt"
    ///
    /// [primary]
    /// ...
    /// ```
    ///
    /// `None` for a cluster without TLS.
    pub fn pgfleet_tls_toml(&self) -> Option<String> {
        let ca = self.ca_cert_path()?;
        Some(self.pgfleet_toml_with(&format!(
            "[fleet.tls]\nsslmode = \"verify-full\"\nsslrootcert = {}",
            toml_string(&ca.to_string_lossy())
        )))
    }

    /// A superuser connection straight to `node` (no proxy), to the `app` database. Its connection
    /// task is spawned on the caller's runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`] if the connection fails.
    pub async fn superuser_client(&self, node: &Node) -> Result<Client, Error> {
        connect(
            &node.superuser_url(),
            node.name(),
            "connecting as superuser",
        )
        .await
    }

    /// An application-role connection to `node` through its proxy ([`Node::url`]), so proxy
    /// faults apply. Its connection task is spawned on the caller's runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`] if the connection fails (10 s connect timeout).
    pub async fn app_client(&self, node: &Node) -> Result<Client, Error> {
        connect(
            &node.url(),
            node.name(),
            "connecting as the app role via the proxy",
        )
        .await
    }
}

/// Tears a cluster down: servers, files, watchdog, background runtime, slot (in that order).
#[derive(Debug)]
struct Cleanup {
    /// The cluster dir.
    dir: PathBuf,
    /// Removes everything if this process dies without running `Drop`.
    watchdog: Option<Watchdog>,
    /// The runtime of the proxies.
    background: Option<Background>,
    /// The concurrency slot, released last.
    slot: Option<Slot>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        process::teardown(&self.dir, TEARDOWN_GRACE);
        drop(self.watchdog.take());
        drop(self.background.take());
        drop(self.slot.take());
        tracing::debug!(target: "pgfleet_testkit::cluster", dir = %self.dir.display(), "local cluster removed");
    }
}

/// A current-thread runtime on its own thread, for the proxies: it must outlive the runtime of
/// whichever `#[tokio::test]` started the cluster (the shared cluster serves many of them).
#[derive(Debug)]
struct Background {
    /// Where to spawn.
    handle: Handle,
    /// Ends the runtime (dropping every task) when sent or dropped.
    stop: Option<oneshot::Sender<()>>,
    /// The runtime's thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the thread and its runtime.
    fn start() -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("building the proxy runtime", e))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pgfleet-testkit-proxy".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| Error::io("spawning the proxy thread", e))?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_lines_are_quoted() {
        assert_eq!(
            conf_line("work_mem", "8MB").expect("ok"),
            "work_mem = '8MB'\n"
        );
        assert_eq!(
            conf_line("application_name", r"it's a\b").expect("ok"),
            "application_name = 'it''s a\\\\b'\n"
        );
        assert!(conf_line("bad name", "x").is_err());
        assert!(conf_line("x", "a\nb").is_err());
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("/tmp/x/ca.crt"), r#""/tmp/x/ca.crt""#);
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("a\nb\u{7f}"), r#""a\u000Ab\u007F""#);
    }

    #[tokio::test]
    async fn too_many_replicas_is_an_error() {
        let err = LocalCluster::builder()
            .replicas(MAX_REPLICAS + 1)
            .start()
            .await
            .expect_err("too many");
        assert!(
            matches!(
                err,
                Error::TooManyReplicas {
                    requested: 5,
                    max: 4
                }
            ),
            "{err}"
        );
    }
}

//! Configuration: the TOML file, its defaults, and its validation.
//!
//! One [`Config`] describes one cluster: a `[fleet]` table of timings and
//! policies, a `[consistency]` table for read routing, one `[primary]` and any
//! number of `[[replicas]]`, and an `[http]` table for session tokens over HTTP
//! ([`HttpConfig`]). Every table and every key except the servers'
//! `url` (and a replica's `name`) has a default, so the smallest valid file is
//!
//! ```toml
//! [primary]
//! url = "postgres://app@10.0.0.1:5432/app"
//! ```
//!
//! `config.example.toml` at the repository root lists every key with its
//! default. Durations are humantime strings (`"250ms"`, `"5s"`, `"1m 30s"`).
//!
//! Loading is two steps: serde turns the TOML into typed structs (unknown keys
//! are errors, with the key path and line), then [`Config::validate`] checks
//! what the types cannot (ranges, unique names, orderings between keys).
//! Passwords never appear in `Debug`, `Display`, serialized output or errors:
//! [`ServerUrl`] keeps only a redacted copy of its text for display.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::http::HttpConfig;

/// Longest accepted server name: PostgreSQL's identifier limit, so a name can
/// also serve as an `application_name` suffix or a metric label.
const MAX_NAME_LEN: usize = 63;
/// Largest accepted `pool_size`: a bound against typos, far above what one
/// PostgreSQL server serves well (its own default `max_connections` is 100).
const MAX_POOL_SIZE: usize = 10_000;
/// Largest accepted `weight` / `read_weight`, so weight sums never overflow.
const MAX_WEIGHT: u32 = 10_000;
/// Longest accepted duration: longer values are surely typos, and this keeps
/// `Instant + duration` arithmetic elsewhere in the crate far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A whole pgfleet configuration: one primary, its replicas, and the policies
/// that route leases between them.
///
/// Build it from TOML with [`Config::from_path`] or [`Config::from_toml_str`],
/// or in code with [`Config::new`] and then [`Config::validate`].
///
/// `Debug` and `Serialize` show server URLs with their passwords replaced by
/// `***`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[fleet]`: timeouts, health checking, balancing, restarts.
    /// Default: every key at its own default (see [`FleetConfig`]).
    #[serde(default)]
    pub fleet: FleetConfig,
    /// `[consistency]`: which reads replicas may serve, and the fallback.
    /// Default: every key at its own default (see [`ConsistencyConfig`]).
    #[serde(default)]
    pub consistency: ConsistencyConfig,
    /// `[primary]`: the server that takes writes. Required (at least its `url`).
    pub primary: PrimaryConfig,
    /// `[[replicas]]`: the streaming replicas that serve reads.
    /// Default: none (every lease goes to the primary).
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// `[clusters.NAME]`: more clusters served by the same fleet (one per tenant, say),
    /// each with its own `primary` and `replicas`; `[fleet]` and `[consistency]` apply
    /// to every cluster. The top-level `[primary]`/`[[replicas]]` is the cluster named
    /// [`DEFAULT_CLUSTER`]. Reach the others with [`crate::Fleet::cluster`].
    /// Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// `[http]`: session tokens over HTTP (cookie, header, signing keys), used by the
    /// `axum` feature's layer and accepted by every build.
    /// Default: every key at its own default (see [`HttpConfig`]).
    #[serde(default)]
    pub http: HttpConfig,
}

/// The name of the cluster the top-level `[primary]` and `[[replicas]]` describe.
pub const DEFAULT_CLUSTER: &str = "default";

/// `[clusters.NAME]`: one more cluster's servers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `[clusters.NAME.primary]`: as the top-level `[primary]`. Required.
    pub primary: PrimaryConfig,
    /// `[[clusters.NAME.replicas]]`: as the top-level `[[replicas]]`. Default: none.
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
}

impl ClusterConfig {
    /// A cluster with this primary and no replicas.
    pub fn new(primary: PrimaryConfig) -> Self {
        ClusterConfig {
            primary,
            replicas: Vec::new(),
        }
    }
}

/// What [`crate::Fleet::cluster`] does with a name no `[clusters.NAME]` section has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UnknownCluster {
    /// `Error::UnknownCluster`. The default.
    #[default]
    Error,
    /// The default cluster (the top-level `[primary]`).
    Default,
}

/// `[fleet]`: timeouts, health checking, load balancing and restarts.
///
/// Every key is optional; [`FleetConfig::default`] holds the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Longest a lease may wait for a connection (pool checkout included)
    /// before it fails. Default: `2s`.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
    /// Time between two health probes of one server; a tick is skipped while
    /// a probe is still in flight. Default: `250ms`.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Longest one probe may take before it counts as failed (its connection
    /// is then dropped). At most `down_after`. Default: `1s`.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Bound on the whole connect: TCP, TLS, startup and authentication.
    /// Default: `2s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle time on a connection before TCP keepalive probes start; at least
    /// `1s` (the kernel counts it in whole seconds). Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before
    /// the kernel drops the connection, so a query hung on a dead server fails
    /// in bounded time. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// Consecutive failed probes after which a server is reported unhealthy
    /// and leaves rotation. At least 1. Default: `3`.
    pub failure_threshold: u32,
    /// A server unreachable this long makes its actor stop with an error, so
    /// the supervisor restarts it with a fresh pool. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub down_after: Duration,
    /// How reads are spread over eligible replicas. Default:
    /// `"least_outstanding"`.
    pub strategy: Strategy,
    /// Backoff of the supervisor's server restarts. Default:
    /// `{ min_backoff = "100ms", max_backoff = "10s", stable_after = "30s" }`.
    pub restart: RestartConfig,
    /// Window over which a returning server ramps its weight up linearly
    /// instead of taking its full share at once; `"0s"` turns slow start off
    /// (the one duration that may be zero). Default: `0s`.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// Bound on read-your-writes leases parked waiting for a replica to catch
    /// up; over it a lease fails fast. At least 1. Default: `1024`.
    pub max_waiters: usize,
    /// Longest a shutdown waits for leases to return and actors to stop
    /// before it stops them anyway. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long `Fleet::start` waits for every cluster's primary to answer a probe
    /// before it returns; past it, start stops what it started and fails with
    /// `Error::NoPrimary` (naming why the primary could not be reached). `"0s"` (the
    /// default) returns at once: unreachable servers are reported unhealthy and leases
    /// wait for a primary within `lease_timeout` instead.
    #[serde(with = "humantime_serde")]
    pub start_wait: Duration,
    /// What `fleet.cluster(name)` does with a name no `[clusters.NAME]` section has:
    /// `"error"` (`Error::UnknownCluster`) or `"default"` (the top-level cluster).
    /// Default: `"error"`.
    pub unknown_cluster: UnknownCluster,
    /// `[fleet.tls]`: TLS for every server whose URL does not say otherwise.
    /// Default: `{ sslmode = "prefer" }` (see [`TlsConfig`]).
    pub tls: TlsConfig,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            lease_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            tcp_keepalive: Duration::from_secs(10),
            tcp_user_timeout: Duration::from_secs(10),
            failure_threshold: 3,
            down_after: Duration::from_secs(5),
            strategy: Strategy::default(),
            restart: RestartConfig::default(),
            slow_start: Duration::ZERO,
            max_waiters: 1024,
            shutdown_timeout: Duration::from_secs(5),
            start_wait: Duration::ZERO,
            unknown_cluster: UnknownCluster::Error,
            tls: TlsConfig::default(),
        }
    }
}

/// `[fleet.restart]`: exponential backoff (with jitter) between restarts of a
/// failed server actor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// First delay before restarting a failed server; at most `max_backoff`.
    /// Default: `100ms`.
    #[serde(with = "humantime_serde")]
    pub min_backoff: Duration,
    /// Cap on the delay between restarts. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A server that stayed up this long has its backoff reset to
    /// `min_backoff`. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            stable_after: Duration::from_secs(30),
        }
    }
}

/// `[fleet.tls]`: TLS to the servers, for every server whose URL does not set
/// its own `sslmode` / `sslrootcert` query parameters (a URL's own parameters
/// win, key by key).
///
/// The keys and values are libpq's, so a setting reads the same here and in a
/// URL (`postgres://app@db1/app?sslmode=verify-full&sslrootcert=/etc/ca.pem`).
/// TLS needs pgfleet's `tls` feature; without it, any `sslmode` that needs TLS
/// (and any `sslrootcert`) is a configuration error, never a plaintext connection.
/// TLS is never used over a Unix socket (PostgreSQL does not offer it there).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Whether and how to use TLS; see [`TlsMode`]. Default: `"prefer"`
    /// (libpq's default).
    pub sslmode: TlsMode,
    /// A PEM file of the CA certificates that sign the servers' certificates.
    /// Required by `verify-ca` and `verify-full`; given with `require` or
    /// `prefer`, the chain is verified too (as libpq does). Read when the config
    /// is validated and when the fleet starts. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            sslmode: TlsMode::Prefer,
            sslrootcert: None,
        }
    }
}

/// `sslmode`: whether and how a connection uses TLS, as in libpq.
///
/// | mode | encrypted | chain checked | host name checked |
/// |---|---|---|---|
/// | `disable` | never | | |
/// | `prefer` | if the server accepts TLS | only with `sslrootcert` | |
/// | `require` | always | only with `sslrootcert` | |
/// | `verify-ca` | always | yes | |
/// | `verify-full` | always | yes | yes |
///
/// libpq's `allow` is not supported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// `"disable"`: plaintext only.
    Disable,
    /// `"prefer"`: TLS if the server accepts it, else plaintext (without the `tls`
    /// feature: plaintext). The default.
    #[default]
    Prefer,
    /// `"require"`: TLS or no connection; the certificate is not verified unless
    /// `sslrootcert` is given.
    Require,
    /// `"verify-ca"`: TLS with a certificate signed by a CA in `sslrootcert`; the host
    /// name is not checked.
    VerifyCa,
    /// `"verify-full"`: as `verify-ca`, and the certificate must name the host the
    /// URL connects to.
    VerifyFull,
}

impl TlsMode {
    /// The libpq spelling: `"disable"`, `"prefer"`, `"require"`, `"verify-ca"`,
    /// `"verify-full"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection in this mode must be encrypted.
    pub fn needs_tls(self) -> bool {
        matches!(
            self,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull
        )
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TlsMode {
    type Err = ConfigError;

    /// Parses libpq's spelling.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] (key `sslmode`) for anything else, `allow` included.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_sslmode(s).map_err(|e| invalid("sslmode", e))
    }
}

fn parse_sslmode(s: &str) -> Result<TlsMode, String> {
    Ok(match s {
        "disable" => TlsMode::Disable,
        "prefer" => TlsMode::Prefer,
        "require" => TlsMode::Require,
        "verify-ca" => TlsMode::VerifyCa,
        "verify-full" => TlsMode::VerifyFull,
        "allow" => {
            return Err(
                "invalid value for option `sslmode`: `allow` is not supported; use `prefer` or `disable`"
                    .to_owned(),
            )
        }
        _ => {
            return Err(
                "invalid value for option `sslmode`: expected disable, prefer, require, verify-ca or verify-full"
                    .to_owned(),
            )
        }
    })
}

/// TLS settings of one server, resolved from its URL and `[fleet.tls]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerTls {
    /// The mode in effect (`Disable` on a Unix socket).
    pub(crate) mode: TlsMode,
    /// The CA file; `None` when not given or when `mode` is `Disable`.
    pub(crate) root_cert: Option<PathBuf>,
    /// `sslnegotiation=direct`: TLS from the first byte, no `SSLRequest`.
    pub(crate) direct: bool,
    /// The name the certificate is checked against (the URL's host, else its hostaddr).
    pub(crate) server_name: String,
    /// Key path of the setting that set `root_cert`, for errors.
    pub(crate) root_cert_key: String,
    /// Key path of the server's URL, for errors.
    pub(crate) url_key: String,
}

/// `[consistency]`: which replicas may serve which reads, and what happens when
/// none can.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyConfig {
    /// Consistency of a read that does not ask for one. Default: `"eventual"`.
    pub default_read: DefaultRead,
    /// Replay lag in bytes beyond which a replica serves no eventual reads.
    /// Default: `16777216` (16 MiB).
    pub max_lag_bytes: u64,
    /// Replay lag in time beyond which a replica serves no eventual reads.
    /// Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    /// Longest a read-your-writes lease waits for a replica to replay the
    /// write before it falls back; at most `fleet.lease_timeout`.
    /// Default: `100ms`.
    #[serde(with = "humantime_serde")]
    pub ryw_wait: Duration,
    /// What a read gets when no replica qualifies. Default: `"primary"`.
    pub fallback: Fallback,
}

impl Default for ConsistencyConfig {
    fn default() -> Self {
        Self {
            default_read: DefaultRead::default(),
            max_lag_bytes: 16 * 1024 * 1024,
            max_lag: Duration::from_secs(5),
            ryw_wait: Duration::from_millis(100),
            fallback: Fallback::default(),
        }
    }
}

/// `[primary]`: the server that takes writes and strong reads.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct PrimaryConfig {
    /// Name in leases, status and logs; unique among all servers,
    /// `[A-Za-z0-9_-]`, at most 63 characters. Default: `"primary"`.
    #[serde(default = "default_primary_name")]
    pub name: String,
    /// Connection URL. Required; see [`ServerUrl`] for the accepted forms.
    pub url: ServerUrl,
    /// Maximum pooled connections to this server, 1..=10000. Default: `16`.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Share of eventual reads the primary takes next to the replicas'
    /// weights; `0` means reads reach it only as a fallback. Default: `0`.
    #[serde(default)]
    pub read_weight: u32,
    /// Read weight of this server while it runs as a standby, after a failover
    /// promoted another one. Weights follow roles: whichever server is the primary
    /// takes `read_weight`. Default: `1`.
    #[serde(default = "default_weight")]
    pub replica_weight: u32,
}

impl PrimaryConfig {
    /// A primary named `"primary"` with every other key at its default.
    pub fn new(url: ServerUrl) -> Self {
        Self {
            name: default_primary_name(),
            url,
            pool_size: default_pool_size(),
            read_weight: 0,
            replica_weight: default_weight(),
        }
    }
}

/// One `[[replicas]]` entry: a streaming replica that serves reads.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Name in leases, status and logs; unique among all servers,
    /// `[A-Za-z0-9_-]`, at most 63 characters. Required.
    pub name: String,
    /// Connection URL. Required; see [`ServerUrl`] for the accepted forms.
    pub url: ServerUrl,
    /// Maximum pooled connections to this server, 1..=10000. Default: `16`.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Relative share of reads, 0..=10000; `0` keeps the replica out of
    /// rotation. At least one replica needs a weight above 0. Applies while the
    /// server is a standby: promoted, it takes `primary.read_weight`. Default: `1`.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl ReplicaConfig {
    /// A replica with weight 1 and the default pool size.
    pub fn new(name: impl Into<String>, url: ServerUrl) -> Self {
        Self {
            name: name.into(),
            url,
            pool_size: default_pool_size(),
            weight: default_weight(),
        }
    }
}

fn default_primary_name() -> String {
    "primary".to_owned()
}

fn default_pool_size() -> usize {
    16
}

fn default_weight() -> u32 {
    1
}

/// How reads are spread over the eligible replicas (`fleet.strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// `"least_outstanding"`: the replica with the fewest leases in flight,
    /// weighted. The default.
    #[default]
    LeastOutstanding,
    /// `"round_robin"`: smooth weighted round robin.
    RoundRobin,
    /// `"random"`: a random replica, with probability proportional to weight.
    Random,
}

/// Consistency of a read that does not ask for one (`consistency.default_read`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum DefaultRead {
    /// `"eventual"`: any healthy replica within `max_lag_bytes` and `max_lag`.
    /// The default.
    #[default]
    Eventual,
    /// `"strong"`: the primary.
    Strong,
}

/// What a read gets when no replica qualifies (`consistency.fallback`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// `"primary"`: the primary serves it, on a read-only connection. The
    /// default.
    #[default]
    Primary,
    /// `"error"`: a typed error saying how far behind the best replica is.
    Error,
}

impl Config {
    /// A configuration with this primary, no replicas, and every other key at
    /// its default. Call [`Config::validate`] after changing fields.
    pub fn new(primary: PrimaryConfig) -> Self {
        Self {
            fleet: FleetConfig::default(),
            consistency: ConsistencyConfig::default(),
            primary,
            replicas: Vec::new(),
            clusters: BTreeMap::new(),
            http: HttpConfig::default(),
        }
    }

    /// The single-cluster configuration of cluster `name` ([`DEFAULT_CLUSTER`] for the
    /// top-level servers): its servers, with this configuration's `[fleet]` and
    /// `[consistency]`. `None` for a name no section has.
    pub fn cluster(&self, name: &str) -> Option<Config> {
        let mut one = Config {
            clusters: BTreeMap::new(),
            ..self.clone()
        };
        if name != DEFAULT_CLUSTER {
            let c = self.clusters.get(name)?;
            one.primary = c.primary.clone();
            one.replicas = c.replicas.clone();
        }
        Some(one)
    }

    /// What key paths of cluster `name`'s servers start with: nothing for the
    /// top-level cluster, `clusters.NAME.` for the others.
    pub(crate) fn cluster_key_prefix(name: &str) -> String {
        if name == DEFAULT_CLUSTER {
            String::new()
        } else {
            format!("clusters.{name}.")
        }
    }

    /// Reads, parses and validates the TOML file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`] if the file cannot be read (or is not UTF-8), and
    /// every error of [`Config::from_toml_str`].
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates a TOML document.
    ///
    /// ```
    /// let config = pgfleet::Config::from_toml_str(
    ///     r#"
    ///     [primary]
    ///     url = "postgres://app@10.0.0.1:5432/app"
    ///     "#,
    /// )?;
    /// assert_eq!(config.primary.pool_size, 16);
    /// # Ok::<(), pgfleet::ConfigError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// - [`ConfigError::Syntax`]: malformed TOML, an unknown key, a missing
    ///   required key, or a value of the wrong type or form (including a bad
    ///   URL or duration), with its key path, line and column;
    /// - [`ConfigError::MissingEnv`]: a URL's password or a signing key comes from an unset
    ///   environment variable;
    /// - [`ConfigError::Invalid`]: anything [`Config::validate`] rejects.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|e| syntax_error(text, None, &e))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            syntax_error(text, Some(path), e.inner())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything the types alone do not: ranges, unique names, and
    /// orderings between keys. [`Config::from_toml_str`] and
    /// [`Config::from_path`] call it; call it yourself on a configuration
    /// built or changed in code.
    ///
    /// # Errors
    ///
    /// The first problem found, as [`ConfigError::Invalid`] naming its key
    /// (e.g. `replicas[1].weight`), or [`ConfigError::MissingEnv`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.fleet.validate()?;
        self.consistency.validate(&self.fleet)?;
        self.http.validate()?;

        validate_servers(self, "", &self.primary, &self.replicas)?;
        for (name, c) in &self.clusters {
            let key = format!("clusters.{name}");
            if name.is_empty() || name == DEFAULT_CLUSTER || !name.chars().all(is_name_char) {
                return Err(invalid(
                    key,
                    format!(
                        "cluster names are letters, digits, `_` and `-`, and `{DEFAULT_CLUSTER}` \
                         is the top-level cluster's"
                    ),
                ));
            }
            validate_servers(self, &format!("{key}."), &c.primary, &c.replicas)?;
        }
        Ok(())
    }
}

/// Checks one cluster's servers; keys are prefixed with `prefix` (`""` or `clusters.NAME.`).
/// `config` supplies the `[fleet.tls]` defaults.
fn validate_servers(
    config: &Config,
    prefix: &str,
    primary: &PrimaryConfig,
    replicas: &[ReplicaConfig],
) -> Result<(), ConfigError> {
    check_name(&format!("{prefix}primary.name"), &primary.name)?;
    check_url(&format!("{prefix}primary.url"), &primary.url)?;
    config.server_tls(&format!("{prefix}primary.url"), &primary.url)?;
    check_pool_size(&format!("{prefix}primary.pool_size"), primary.pool_size)?;
    check_weight(&format!("{prefix}primary.read_weight"), primary.read_weight)?;
    check_weight(
        &format!("{prefix}primary.replica_weight"),
        primary.replica_weight,
    )?;

    for (i, replica) in replicas.iter().enumerate() {
        let key = |field: &str| format!("{prefix}replicas[{i}].{field}");
        check_name(&key("name"), &replica.name)?;
        let mut earlier =
            std::iter::once(&primary.name).chain(replicas[..i].iter().map(|r| &r.name));
        if let Some(j) = earlier.position(|name| *name == replica.name) {
            let other_key = match j {
                0 => format!("{prefix}primary.name"),
                j => format!("{prefix}replicas[{}].name", j - 1),
            };
            return Err(invalid(
                key("name"),
                format!(
                    "server name `{}` is already used by {other_key}; names must be unique",
                    replica.name
                ),
            ));
        }
        check_url(&key("url"), &replica.url)?;
        config.server_tls(&key("url"), &replica.url)?;
        check_pool_size(&key("pool_size"), replica.pool_size)?;
        check_weight(&key("weight"), replica.weight)?;
    }

    if !replicas.is_empty() && replicas.iter().all(|r| r.weight == 0) {
        return Err(invalid(
            format!("{prefix}replicas[*].weight"),
            "every replica has weight 0, so none would serve reads; give at least one a weight above 0",
        ));
    }
    Ok(())
}

impl Config {
    /// The TLS settings of the server whose URL is `url` (at key path `key`): its
    /// URL's `sslmode` / `sslrootcert`, else `[fleet.tls]`'s. Checks that the build
    /// can honour them and that the CA file reads as PEM certificates.
    pub(crate) fn server_tls(&self, key: &str, url: &ServerUrl) -> Result<ServerTls, ConfigError> {
        let fleet = &self.fleet.tls;
        let (mode, mode_key) = match url.sslmode {
            Some(mode) => (mode, key.to_owned()),
            None => (fleet.sslmode, "fleet.tls.sslmode".to_owned()),
        };
        let (root_cert, root_cert_key) = match (&url.sslrootcert, &fleet.sslrootcert) {
            (Some(path), _) => (Some(path.clone()), key.to_owned()),
            (None, Some(path)) => (Some(path.clone()), "fleet.tls.sslrootcert".to_owned()),
            (None, None) => (None, String::new()),
        };
        let direct =
            url.config.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Direct;
        let uses_tls = mode != TlsMode::Disable;

        if !cfg!(feature = "tls") {
            if mode.needs_tls() {
                return Err(ConfigError::TlsNotBuilt {
                    key: mode_key,
                    setting: format!("sslmode={mode}"),
                });
            }
            if uses_tls && root_cert.is_some() {
                return Err(ConfigError::TlsNotBuilt {
                    key: root_cert_key,
                    setting: "sslrootcert".to_owned(),
                });
            }
        }
        if matches!(mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && root_cert.is_none() {
            return Err(invalid(
                mode_key,
                format!(
                    "sslmode={mode} needs sslrootcert (a PEM file of the CA certificates that sign the server's certificate), in the URL or in [fleet.tls]"
                ),
            ));
        }
        if direct && mode == TlsMode::Prefer {
            return Err(invalid(
                key,
                "sslnegotiation=direct needs sslmode=require or stronger (as in libpq, `prefer` cannot fall back to plaintext from it)",
            ));
        }
        if let Some(path) = root_cert.as_deref().filter(|_| uses_tls) {
            if path.as_os_str() == "system" {
                return Err(invalid(
                    root_cert_key,
                    "sslrootcert=system (the operating system's trust store) is not supported; give a CA file",
                ));
            }
            #[cfg(feature = "tls")]
            crate::tls::read_roots(path).map_err(|reason| ConfigError::CaFile {
                key: root_cert_key.clone(),
                path: path.to_owned(),
                reason,
            })?;
        }
        // PostgreSQL offers no TLS on a Unix socket (libpq ignores sslmode there too).
        let mode = if url.unix_socket {
            TlsMode::Disable
        } else {
            mode
        };
        // Checked here, not first at start: a host no certificate can name.
        #[cfg(feature = "tls")]
        if mode != TlsMode::Disable {
            crate::tls::server_name(key, &url.tls_name)?;
        }
        Ok(ServerTls {
            mode,
            root_cert: root_cert.filter(|_| mode != TlsMode::Disable),
            direct,
            server_name: url.tls_name.clone(),
            root_cert_key,
            url_key: key.to_owned(),
        })
    }
}

impl FleetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("fleet.lease_timeout", self.lease_timeout),
            ("fleet.probe_interval", self.probe_interval),
            ("fleet.probe_timeout", self.probe_timeout),
            ("fleet.connect_timeout", self.connect_timeout),
            ("fleet.tcp_keepalive", self.tcp_keepalive),
            ("fleet.tcp_user_timeout", self.tcp_user_timeout),
            ("fleet.down_after", self.down_after),
            ("fleet.restart.min_backoff", self.restart.min_backoff),
            ("fleet.restart.max_backoff", self.restart.max_backoff),
            ("fleet.restart.stable_after", self.restart.stable_after),
            ("fleet.shutdown_timeout", self.shutdown_timeout),
        ];
        for (key, value) in positive {
            check_duration(key, value, false)?;
        }
        check_duration("fleet.slow_start", self.slow_start, true)?;
        check_duration("fleet.start_wait", self.start_wait, true)?;

        if self.tcp_keepalive < Duration::from_secs(1) {
            return Err(invalid(
                "fleet.tcp_keepalive",
                "must be at least 1s (the kernel counts keepalive idle time in whole seconds)",
            ));
        }
        if self.failure_threshold == 0 {
            return Err(invalid("fleet.failure_threshold", "must be at least 1"));
        }
        if self.max_waiters == 0 {
            return Err(invalid("fleet.max_waiters", "must be at least 1"));
        }
        if self.restart.min_backoff > self.restart.max_backoff {
            return Err(invalid(
                "fleet.restart.min_backoff",
                format!(
                    "{} is more than fleet.restart.max_backoff ({})",
                    fmt_duration(self.restart.min_backoff),
                    fmt_duration(self.restart.max_backoff)
                ),
            ));
        }
        if self.probe_timeout > self.down_after {
            return Err(invalid(
                "fleet.probe_timeout",
                format!(
                    "{} is more than fleet.down_after ({}): a single slow probe would outlast the time a server may be down",
                    fmt_duration(self.probe_timeout),
                    fmt_duration(self.down_after)
                ),
            ));
        }
        Ok(())
    }
}

impl ConsistencyConfig {
    fn validate(&self, fleet: &FleetConfig) -> Result<(), ConfigError> {
        check_duration("consistency.max_lag", self.max_lag, false)?;
        check_duration("consistency.ryw_wait", self.ryw_wait, false)?;
        if self.ryw_wait > fleet.lease_timeout {
            return Err(invalid(
                "consistency.ryw_wait",
                format!(
                    "{} is more than fleet.lease_timeout ({}): the lease would time out before it falls back",
                    fmt_duration(self.ryw_wait),
                    fmt_duration(fleet.lease_timeout)
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub(crate) fn check_duration(key: &str, value: Duration, zero_ok: bool) -> Result<(), ConfigError> {
    if value.is_zero() && !zero_ok {
        return Err(invalid(key, "must be more than 0s"));
    }
    if value > MAX_DURATION {
        return Err(invalid(
            key,
            format!(
                "{} is more than the maximum of {}",
                fmt_duration(value),
                fmt_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(())
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    check_identifier(
        key,
        name,
        MAX_NAME_LEN,
        is_name_char,
        "letters A-Z a-z, digits, `_` and `-`",
    )
}

/// What server and cluster names are made of.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A non-empty name of at most `max_len` bytes, every character `allowed`
/// (`described` in the error).
pub(crate) fn check_identifier(
    key: &str,
    name: &str,
    max_len: usize,
    allowed: fn(char) -> bool,
    described: &str,
) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if name.len() > max_len {
        return Err(invalid(
            key,
            format!("is {} bytes long; at most {max_len} allowed", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(invalid(
            key,
            format!(
                "`{}` contains {c:?}; only {described} are allowed",
                name.escape_debug()
            ),
        ));
    }
    Ok(())
}

fn check_pool_size(key: &str, size: usize) -> Result<(), ConfigError> {
    if size == 0 || size > MAX_POOL_SIZE {
        return Err(invalid(
            key,
            format!("is {size}; must be between 1 and {MAX_POOL_SIZE}"),
        ));
    }
    Ok(())
}

fn check_weight(key: &str, weight: u32) -> Result<(), ConfigError> {
    if weight > MAX_WEIGHT {
        return Err(invalid(
            key,
            format!("is {weight}; must be between 0 and {MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

fn check_url(key: &str, url: &ServerUrl) -> Result<(), ConfigError> {
    match &url.missing_env {
        Some(var) => Err(ConfigError::MissingEnv {
            key: key.to_owned(),
            var: var.clone(),
        }),
        None => Ok(()),
    }
}

/// An error loading or validating a [`Config`].
///
/// No variant ever contains a password: URLs in messages are redacted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown or missing key, or a value of the wrong type
    /// or form.
    #[error("{}", fmt_syntax(key.as_deref(), message, *line, *column))]
    Syntax {
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// Key path of the offending value (e.g. `replicas[1].weight`), when
        /// the document parsed as TOML.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value that parsed but is not allowed (see [`Config::validate`]).
    #[error("{key}: {message}")]
    Invalid {
        /// Key path of the offending value, e.g. `fleet.probe_interval`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A URL's password or an HTTP signing key (`http.keys`) comes from an environment
    /// variable that is not set.
    #[error("{key}: the secret comes from environment variable `{var}`, which is not set")]
    MissingEnv {
        /// Key path of the URL, e.g. `replicas[0].url`.
        key: String,
        /// Name of the unset variable.
        var: String,
    },
    /// The configuration asks for TLS, but pgfleet was built without the `tls` feature.
    #[error("{key}: {setting} needs TLS, but pgfleet was built without the tls feature")]
    TlsNotBuilt {
        /// Key path of the setting: a URL (e.g. `primary.url`) or `fleet.tls.sslmode`.
        key: String,
        /// The setting, e.g. `sslmode=verify-full` or `sslrootcert`.
        setting: String,
    },
    /// The CA file (`sslrootcert`) cannot be read or holds no PEM certificate.
    #[error("{key}: sslrootcert {}: {reason}", path.display())]
    CaFile {
        /// Key path of the setting: a URL (e.g. `replicas[0].url`) or
        /// `fleet.tls.sslrootcert`.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    /// Key path the error is about (e.g. `replicas[1].weight`), when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Syntax { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. }
            | ConfigError::MissingEnv { key, .. }
            | ConfigError::TlsNotBuilt { key, .. }
            | ConfigError::CaFile { key, .. } => Some(key),
        }
    }
}

fn fmt_syntax(key: Option<&str>, message: &str, line: usize, column: usize) -> String {
    match key {
        Some(key) => format!("{key}: {message} (line {line}, column {column})"),
        None => format!("invalid TOML: {message} (line {line}, column {column})"),
    }
}

/// Turns a toml error (with the serde key path, if any) into
/// [`ConfigError::Syntax`]. Only the error's message and span are used: its
/// `Display` quotes the offending source line, which may hold a password.
fn syntax_error(text: &str, path: Option<String>, error: &toml::de::Error) -> ConfigError {
    let (line, column) = error
        .span()
        .map_or((1, 1), |span| line_column(text, span.start));
    // serde_path_to_error prints the root path as ".".
    let mut key = path.filter(|p| p != ".");
    let mut message = toml_words(&redact_text(error.message()));
    // A value under `http.keys` may be a signing key: serde quotes a wrongly typed
    // string (`keys = "secret"`), so say only what was expected.
    // The key's own messages (a mistyped `${NAME}`) hold no value and are kept.
    if key.as_deref().is_some_and(|k| k.starts_with("http.keys"))
        && !crate::http::KEY_MESSAGES.contains(&error.message())
    {
        message = "expected an array of key strings (the value is not shown)".to_owned();
    }
    // "missing field `url`" at `replicas[1]`: report the missing key itself.
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        key = Some(match key {
            Some(parent) => format!("{parent}.{field}"),
            None => field.to_owned(),
        });
        message = "required key is missing".to_owned();
    }
    ConfigError::Syntax {
        line,
        column,
        key,
        message,
    }
}

/// Rewrites serde's type names in TOML's words: `map` is a table, `sequence`
/// an array, and `struct FleetConfig` is a table too.
fn toml_words(message: &str) -> String {
    let mut out = message
        .replace("invalid type: map,", "invalid type: table,")
        .replace("expected a sequence", "expected an array");
    if let Some(i) = out.find("expected struct ") {
        let name_end = out[i + 16..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .map_or(out.len(), |j| i + 16 + j);
        out.replace_range(i..name_end, "expected a table");
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Redacts passwords from free text (error messages that may quote a value):
/// the password of every `scheme://user:password@` and every `password=value`.
fn redact_text(text: &str) -> String {
    redact_password_params(&redact_userinfo(text))
}

/// Appends `user:***@` for URL credentials `user:password` (or `user@` without one).
fn push_redacted_credentials(out: &mut String, creds: &str) {
    match creds.find(':') {
        Some(colon) => {
            out.push_str(&creds[..=colon]);
            out.push_str("***");
        }
        None => out.push_str(creds),
    }
    out.push('@');
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // Like tokio-postgres, the credentials end at the first `@`.
        match tail.find('@') {
            Some(at) => {
                push_redacted_credentials(&mut out, &tail[..at]);
                rest = &tail[at + 1..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

fn redact_password_params(text: &str) -> String {
    const NEEDLE: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = find_ascii_case_insensitive(rest, NEEDLE) {
        let (head, tail) = rest.split_at(i + NEEDLE.len());
        out.push_str(head);
        out.push_str("***");
        let end = if let Some(quoted) = tail.strip_prefix('\'') {
            // A quoted key=value value: up to the closing quote.
            quoted.find('\'').map_or(tail.len(), |j| j + 2)
        } else {
            tail.find(|c: char| c.is_whitespace() || matches!(c, '&' | '"' | '\'' | '`'))
                .unwrap_or(tail.len())
        };
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn find_ascii_case_insensitive(haystack: &str, needle: &str) -> Option<usize> {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    h.windows(n.len()).position(|w| w.eq_ignore_ascii_case(n))
}

/// The connection URL of one PostgreSQL server.
///
/// Accepted forms are those of [`tokio_postgres::Config`]: a URL
/// (`postgres://user:password@host:5432/dbname?sslmode=prefer`, or
/// `postgresql://`) or libpq's `key=value` form (`host=h user=u dbname=d`).
/// pgfleet reads two parameters itself, as libpq does: `sslmode` (`disable`,
/// `prefer`, `require`, `verify-ca`, `verify-full`; see [`TlsMode`]) and
/// `sslrootcert` (a CA file); when absent, `[fleet.tls]` applies. With `hostaddr`,
/// the connection goes to that address and `verify-full` checks the certificate
/// against the host name.
/// It must name exactly one host and a user. The host is a TCP host name or
/// address, or (on Unix) a socket directory starting with `/`, e.g.
/// `postgres://app@%2Fvar%2Frun%2Fpostgresql/app`.
///
/// **Passwords from the environment:** when the whole password is
/// `${NAME}` (e.g. `postgres://app:${PGFLEET_PASSWORD}@10.0.0.1/app`, or
/// `password=${NAME}` in the query or key=value form), it is read from the
/// environment variable `NAME` when the URL is parsed. `NAME` is
/// `[A-Za-z_][A-Za-z0-9_]*`; a password that is literally `${...}` cannot be
/// written.
///
/// `Display`, `Debug` and `Serialize` show the URL as written with the
/// password replaced by `***` (see [`ServerUrl::redacted`]);
/// [`ServerUrl::pg_config`] holds the real one.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The parsed connection settings, password included.
    config: tokio_postgres::Config,
    /// The text as written, password replaced by `***`.
    redacted: String,
    /// TCP host, host address, or Unix socket directory.
    host: String,
    /// Whether `host` is a Unix socket directory.
    unix_socket: bool,
    /// Port (5432 unless given).
    port: u16,
    /// User name (required, so stored unwrapped).
    user: String,
    /// Environment variable named by a `${NAME}` password that was unset when
    /// this URL was parsed; [`Config::validate`] reports it with its key.
    missing_env: Option<String>,
    /// The `sslmode` parameter, if given (else `[fleet.tls]` decides).
    sslmode: Option<TlsMode>,
    /// The `sslrootcert` parameter, if given (else `[fleet.tls]` decides).
    sslrootcert: Option<PathBuf>,
    /// The name a server certificate must hold under `verify-full`: the host, or the
    /// `hostaddr` when no host is given (as libpq).
    tls_name: String,
}

impl ServerUrl {
    /// Parses and checks a connection URL, reading a `${NAME}` password from
    /// the environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] (key `url`) if it does not parse, names no
    /// host or several, or no user; [`ConfigError::MissingEnv`] (key `url`)
    /// if its `${NAME}` password variable is not set. The message never
    /// contains the input.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let url = Self::parse_inner(s).map_err(|e| invalid("url", e.to_string()))?;
        check_url("url", &url)?;
        Ok(url)
    }

    /// The connection settings to connect with, password included.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The host: a name or address for TCP, or the socket directory (starting
    /// with `/`) when [`ServerUrl::is_unix_socket`].
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether [`ServerUrl::host`] is a Unix socket directory rather than a
    /// TCP host.
    pub fn is_unix_socket(&self) -> bool {
        self.unix_socket
    }

    /// The port (for a Unix socket, the number in the socket's file name).
    /// Default: 5432.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database name, if given (PostgreSQL defaults it to the user name).
    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The `sslmode` query parameter (or `key=value` pair), if given; when it is
    /// not, `fleet.tls.sslmode` applies.
    pub fn sslmode(&self) -> Option<TlsMode> {
        self.sslmode
    }

    /// The `sslrootcert` query parameter (or `key=value` pair), if given; when it is
    /// not, `fleet.tls.sslrootcert` applies.
    pub fn sslrootcert(&self) -> Option<&Path> {
        self.sslrootcert.as_deref()
    }

    /// The URL as written, with the password (if any) replaced by `***`:
    /// `postgres://app:***@10.0.0.1:5432/app`. Safe to log.
    pub fn redacted(&self) -> String {
        self.redacted.clone()
    }

    fn parse_inner(raw: &str) -> Result<Self, UrlError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        let url_prefix = ["postgres://", "postgresql://"]
            .into_iter()
            .find(|p| raw.starts_with(p));
        if url_prefix.is_none() {
            if let Some((scheme, _)) = raw.split_once("://") {
                if !scheme.contains(|c: char| c.is_whitespace() || c == '=') {
                    let shown = scheme.len() <= 16
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
                    return Err(UrlError::Scheme(shown.then(|| scheme.to_owned())));
                }
            }
            if !raw.contains('=') {
                return Err(UrlError::NotAUrl);
            }
        }

        if let Some(prefix) = url_prefix {
            check_url_at_signs(&raw[prefix.len()..])?;
        }
        // pgfleet negotiates TLS itself: its parameters never reach tokio-postgres.
        let (rest, tls) = match url_prefix {
            Some(prefix) => take_tls_params_url(raw, prefix.len())?,
            None => take_tls_params_kv(raw),
        };
        let sslmode = tls
            .sslmode
            .as_deref()
            .map(parse_sslmode)
            .transpose()
            .map_err(UrlError::Parse)?;
        let sslrootcert = match tls.sslrootcert {
            Some(path) if path.is_empty() => {
                return Err(UrlError::Parse("`sslrootcert` is empty".to_owned()))
            }
            other => other.map(PathBuf::from),
        };
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| UrlError::Parse(describe(&e)))?;
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);

        let tls_name = match (config.get_hosts(), config.get_hostaddrs()) {
            ([tokio_postgres::config::Host::Tcp(name)], _) => name.clone(),
            (_, [addr]) => addr.to_string(),
            _ => String::new(),
        };
        let (host, unix_socket) = match (config.get_hosts(), config.get_hostaddrs()) {
            ([host], [] | [_]) => match host {
                tokio_postgres::config::Host::Tcp(name) => (name.clone(), false),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(dir) => {
                    (dir.to_string_lossy().into_owned(), true)
                }
            },
            ([], [addr]) => (addr.to_string(), false),
            ([], []) => return Err(UrlError::NoHost),
            (hosts, addrs) => return Err(UrlError::Hosts(hosts.len().max(addrs.len()))),
        };
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let port = match config.get_ports() {
            [] => 5432,
            [0] => return Err(UrlError::PortZero),
            [port] => *port,
            ports => return Err(UrlError::Hosts(ports.len())),
        };
        let user = match config.get_user() {
            Some(user) if !user.is_empty() => user.to_owned(),
            _ => return Err(UrlError::NoUser),
        };

        let mut missing_env = None;
        if let Some(var) = config.get_password().and_then(env_reference) {
            let var = var.to_owned();
            match std::env::var(&var) {
                Ok(password) => {
                    config.password(password);
                }
                Err(std::env::VarError::NotPresent) => missing_env = Some(var),
                Err(std::env::VarError::NotUnicode(_)) => return Err(UrlError::EnvNotUnicode(var)),
            }
        } else if config
            .get_password()
            .is_some_and(|p| p.starts_with(b"${") && p.ends_with(b"}"))
        {
            return Err(UrlError::EnvName);
        }

        let redacted = match url_prefix {
            Some(prefix) => redact_url(raw, prefix.len()),
            None => redact_key_value(raw),
        };
        Ok(Self {
            config,
            redacted,
            host,
            unix_socket,
            port,
            user,
            missing_env,
            sslmode,
            sslrootcert,
            tls_name,
        })
    }
}

/// The credentials of a URL end at its first `@` (as tokio-postgres reads it), so an
/// unencoded `@` elsewhere makes part of a password the host, or a query-string password
/// the user name: both would then be shown as if they were not secret. `rest` is the URL
/// after its scheme.
fn check_url_at_signs(rest: &str) -> Result<(), UrlError> {
    let Some((credentials, after)) = rest.split_once('@') else {
        return Ok(());
    };
    // Credentials that run past the host into the path or the query: an `@` after the
    // host (libpq does not read a `/` as part of the credentials either).
    if credentials.contains('/') || credentials.to_ascii_lowercase().contains("password=") {
        return Err(UrlError::UnencodedAt);
    }
    // A second `@` before the path or query: an `@` in the password.
    let host = after.split(['/', '?', '#']).next().unwrap_or_default();
    if host.contains('@') {
        return Err(UrlError::UnencodedAt);
    }
    Ok(())
}

/// `NAME` if `password` is exactly `${NAME}` with a valid variable name.
pub(crate) fn env_reference(password: &[u8]) -> Option<&str> {
    let name = password.strip_prefix(b"${")?.strip_suffix(b"}")?;
    let name = std::str::from_utf8(name).ok()?;
    is_env_name(name).then_some(name)
}

/// Whether `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a URL was rejected. Messages never quote the input, which may hold a
/// password.
#[derive(Debug)]
enum UrlError {
    Empty,
    NotAUrl,
    Scheme(Option<String>),
    Parse(String),
    NoHost,
    Hosts(usize),
    PortZero,
    NoUser,
    EnvName,
    EnvNotUnicode(String),
    UnencodedAt,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FORM: &str = "expected postgres://user@host:port/dbname";
        match self {
            UrlError::Empty => write!(f, "empty connection URL; {FORM}"),
            UrlError::NotAUrl => write!(f, "not a connection URL; {FORM}"),
            UrlError::Scheme(Some(scheme)) => write!(
                f,
                "unsupported URL scheme `{scheme}`; use postgres:// or postgresql://"
            ),
            UrlError::Scheme(None) => write!(
                f,
                "unsupported URL scheme; use postgres:// or postgresql://"
            ),
            UrlError::Parse(detail) => write!(f, "invalid connection URL: {detail}"),
            UrlError::NoHost => write!(f, "the connection URL names no host; {FORM}"),
            UrlError::Hosts(n) => write!(
                f,
                "the connection URL names {n} hosts; exactly one is allowed (list each server as its own entry)"
            ),
            UrlError::PortZero => write!(f, "the connection URL has port 0"),
            UrlError::NoUser => write!(f, "the connection URL names no user; {FORM}"),
            UrlError::EnvName => write!(
                f,
                "the password looks like `${{NAME}}` but NAME is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
            ),
            UrlError::EnvNotUnicode(var) => write!(
                f,
                "the password comes from environment variable `{var}`, which is not valid UTF-8"
            ),
            UrlError::UnencodedAt => write!(
                f,
                "the text before the first `@` is not `user:password`: percent-encode an `@` in the user, the password or a query parameter as `%40`, and a `/` in the user or password as `%2F`"
            ),
        }
    }
}

/// Describes a tokio-postgres parse error without the input. Its messages
/// name problems and option keys, never values, but an unknown "option" is
/// user text, so only names that look like option names are shown.
fn describe(error: &tokio_postgres::Error) -> String {
    let Some(detail) = std::error::Error::source(error).map(ToString::to_string) else {
        return "malformed connection string".to_owned();
    };
    if detail.starts_with("invalid value for option `")
        || detail == "unterminated parameter"
        || detail == "unexpected EOF"
        || detail == "unterminated quoted connection parameter value"
    {
        return detail;
    }
    if let Some(name) = detail
        .strip_prefix("unknown option `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let plausible = name.len() <= 32
            && !name.is_empty()
            && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        return if plausible {
            format!("unknown option `{name}`")
        } else {
            "unknown option".to_owned()
        };
    }
    if detail.starts_with("unexpected character") {
        return "malformed key=value pair (expected `key=value`)".to_owned();
    }
    "malformed connection string (bad percent-encoding?)".to_owned()
}

/// Redacts a URL-form connection string the way tokio-postgres reads it: the
/// credentials run to the first `@`, the password from their first `:`; query
/// keys run to `=`, values to `&`.
fn redact_url(raw: &str, prefix_len: usize) -> String {
    let (prefix, rest) = raw.split_at(prefix_len);
    let mut out = String::with_capacity(raw.len());
    out.push_str(prefix);
    let after_creds = match rest.find('@') {
        Some(at) => {
            push_redacted_credentials(&mut out, &rest[..at]);
            &rest[at + 1..]
        }
        None => rest,
    };
    let Some(q) = after_creds.find('?') else {
        out.push_str(after_creds);
        return out;
    };
    out.push_str(&after_creds[..=q]);
    let mut params = &after_creds[q + 1..];
    while !params.is_empty() {
        let Some(eq) = params.find('=') else {
            out.push_str(params);
            break;
        };
        let key = &params[..eq];
        out.push_str(&params[..=eq]);
        let value_end = params[eq + 1..]
            .find('&')
            .map_or(params.len(), |a| eq + 1 + a);
        if percent_decode(key).as_deref() == Some("password") {
            out.push_str("***");
        } else {
            out.push_str(&params[eq + 1..value_end]);
        }
        out.push_str(&params[value_end..(value_end + 1).min(params.len())]);
        params = &params[(value_end + 1).min(params.len())..];
    }
    out
}

/// Percent-decodes `s`; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Redacts a libpq `key=value` connection string, tokenized as tokio-postgres
/// does: keywords run to whitespace or `=`, values are `'quoted'` or run to
/// whitespace, and `\` escapes the next character in both.
fn redact_key_value(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut copied = 0;
    for pair in kv_pairs(raw) {
        if pair.key == "password" {
            out.push_str(&raw[copied..pair.value.start]);
            out.push_str("***");
            copied = pair.value.end.max(pair.value.start);
        }
    }
    out.push_str(&raw[copied..]);
    out
}

/// One `key=value` pair of a libpq connection string, as byte ranges of it.
#[derive(Debug)]
struct KvPair<'a> {
    /// The keyword.
    key: &'a str,
    /// From the keyword's first byte to past the value (and its closing quote).
    span: std::ops::Range<usize>,
    /// The value as written, between its quotes if quoted (escapes not undone).
    value: std::ops::Range<usize>,
}

/// The `key=value` pairs of a libpq connection string, tokenized as tokio-postgres
/// does: keywords run to whitespace or `=`, values are `'quoted'` or run to
/// whitespace, and `\` escapes the next character in both. Stops at the first
/// malformed pair (tokio-postgres rejects the string anyway).
fn kv_pairs(raw: &str) -> Vec<KvPair<'_>> {
    let mut pairs = Vec::new();
    let mut chars = raw.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(key_start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = raw.len();
        while let Some(&(i, c)) = chars.peek() {
            if c.is_whitespace() || c == '=' {
                key_end = i;
                break;
            }
            chars.next();
        }
        let key = &raw[key_start..key_end];
        skip_ws(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            break;
        }
        skip_ws(&mut chars);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let value_start = chars.peek().map_or(raw.len(), |&(i, _)| i);
        let mut value_end = raw.len();
        while let Some(&(i, c)) = chars.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                value_end = i;
                break;
            }
            chars.next();
            if c == '\\' {
                chars.next();
            }
        }
        if quoted {
            chars.next();
        }
        let end = chars.peek().map_or(raw.len(), |&(i, _)| i);
        pairs.push(KvPair {
            key,
            span: key_start..end,
            value: value_start..value_end.max(value_start),
        });
    }
    pairs
}

/// The TLS parameters of a connection string, which pgfleet handles itself
/// (tokio-postgres knows neither `verify-*` modes nor `sslrootcert`).
#[derive(Debug, Default)]
struct TlsParams {
    /// `sslmode`, as written.
    sslmode: Option<String>,
    /// `sslrootcert`, decoded.
    sslrootcert: Option<String>,
}

/// Whether pgfleet, not tokio-postgres, reads this connection parameter.
fn is_tls_param(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// Splits the TLS parameters off a URL-form connection string (`prefix_len`: the
/// scheme's length): returns the string without them, and their values. The
/// credentials run to the first `@` and the query starts at the next `?`, as in
/// [`redact_url`].
fn take_tls_params_url(raw: &str, prefix_len: usize) -> Result<(String, TlsParams), UrlError> {
    let rest = &raw[prefix_len..];
    let query_from = match rest.find('@') {
        Some(at) => rest[at..].find('?').map(|q| prefix_len + at + q),
        None => rest.find('?').map(|q| prefix_len + q),
    };
    let Some(q) = query_from else {
        return Ok((raw.to_owned(), TlsParams::default()));
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in raw[q + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key).as_deref() {
            Some(name) if is_tls_param(name) => {
                let value = percent_decode(value).ok_or_else(|| {
                    UrlError::Parse(format!("malformed percent-encoding in `{name}`"))
                })?;
                if name == "sslmode" {
                    params.sslmode = Some(value);
                } else {
                    params.sslrootcert = Some(value);
                }
            }
            _ => kept.push(pair),
        }
    }
    let mut out = raw[..q].to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok((out, params))
}

/// Like [`take_tls_params_url`] for libpq's `key=value` form.
fn take_tls_params_kv(raw: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut out = String::with_capacity(raw.len());
    let mut copied = 0;
    for pair in kv_pairs(raw) {
        if !is_tls_param(pair.key) {
            continue;
        }
        let mut value = String::new();
        let mut chars = raw[pair.value.clone()].chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                c => value.push(c),
            }
        }
        if pair.key == "sslmode" {
            params.sslmode = Some(value);
        } else {
            params.sslrootcert = Some(value);
        }
        out.push_str(&raw[copied..pair.span.start]);
        copied = pair.span.end;
    }
    out.push_str(&raw[copied..]);
    (out, params)
}

impl fmt::Display for ServerUrl {
    /// Writes [`ServerUrl::redacted`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServerUrl").field(&self.redacted).finish()
    }
}

impl FromStr for ServerUrl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for ServerUrl {
    /// Parses like [`ServerUrl::parse`], except that an unset `${NAME}`
    /// password variable is left for [`Config::validate`] to report with the
    /// URL's key path.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        ServerUrl::parse_inner(&raw).map_err(serde::de::Error::custom)
    }
}

impl Serialize for ServerUrl {
    /// Serializes the redacted form: a serialized config never holds a
    /// password.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_types_can_cross_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Config>();
        assert_send_sync::<ServerUrl>();
        assert_send_sync::<ConfigError>();
    }

    #[test]
    fn line_column_is_one_based_and_counts_chars() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // After the two-byte `é`.
        assert_eq!(line_column(text, 9), (2, 3));
        // Inside `é`, and past the end: clamped, no panic.
        assert_eq!(line_column(text, 8), (2, 2));
        assert_eq!(line_column(text, 1000), (3, 1));
        assert_eq!(line_column("", 5), (1, 1));
    }

    #[test]
    fn redacts_url_password_and_password_param() {
        let cases = [
            (
                "postgres://app:s3cret@h:5432/db",
                "postgres://app:***@h:5432/db",
            ),
            ("postgres://app@h/db", "postgres://app@h/db"),
            ("postgres://app:@h/db", "postgres://app:***@h/db"),
            ("postgresql://a:p:w/x@h", "postgresql://a:***@h"),
            (
                "postgres://app@h/db?sslmode=prefer&password=s3cret&application_name=x",
                "postgres://app@h/db?sslmode=prefer&password=***&application_name=x",
            ),
            (
                "postgres://app@h/db?pass%77ord=s3cret",
                "postgres://app@h/db?pass%77ord=***",
            ),
            ("postgres://h?password=", "postgres://h?password=***"),
        ];
        for (raw, want) in cases {
            let prefix = if raw.starts_with("postgresql") {
                13
            } else {
                11
            };
            assert_eq!(redact_url(raw, prefix), want, "{raw}");
        }
    }

    #[test]
    fn redacts_key_value_password() {
        let cases = [
            (
                "host=h user=u password=s3cret",
                "host=h user=u password=***",
            ),
            ("password = 's3 c\\'ret' host=h", "password = '***' host=h"),
            ("host=h password=a\\ b user=u", "host=h password=*** user=u"),
            ("host=h user=u", "host=h user=u"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_key_value(raw), want, "{raw}");
        }
    }

    #[test]
    fn redacts_free_text() {
        assert_eq!(
            redact_text(r#"invalid type: string "postgres://u:pw@h/d", expected u32"#),
            r#"invalid type: string "***", expected u32"#.replace("***", "postgres://u:***@h/d")
        );
        assert_eq!(
            redact_text("x host=h Password=pw y"),
            "x host=h Password=*** y"
        );
        assert_eq!(redact_text("password='a b' c"), "password=*** c");
        assert_eq!(redact_text("no secrets here"), "no secrets here");
    }

    #[test]
    fn serde_words_become_toml_words() {
        assert_eq!(
            toml_words("invalid type: integer `3`, expected struct FleetConfig"),
            "invalid type: integer `3`, expected a table"
        );
        assert_eq!(
            toml_words("invalid type: map, expected a sequence"),
            "invalid type: table, expected an array"
        );
        assert_eq!(toml_words("expected struct "), "expected a table");
    }

    #[test]
    fn env_reference_needs_a_valid_name() {
        assert_eq!(
            env_reference(b"${PGFLEET_PASSWORD}"),
            Some("PGFLEET_PASSWORD")
        );
        assert_eq!(env_reference(b"${_x1}"), Some("_x1"));
        assert_eq!(env_reference(b"${}"), None);
        assert_eq!(env_reference(b"${1X}"), None);
        assert_eq!(env_reference(b"${A B}"), None);
        assert_eq!(env_reference(b"$A"), None);
        assert_eq!(env_reference(b"plain"), None);
    }

    #[test]
    fn server_url_accessors() -> Result<(), ConfigError> {
        let url = ServerUrl::parse("postgres://app:pw@10.0.0.2:6432/appdb")?;
        assert_eq!(url.host(), "10.0.0.2");
        assert!(!url.is_unix_socket());
        assert_eq!(url.port(), 6432);
        assert_eq!(url.user(), "app");
        assert_eq!(url.dbname(), Some("appdb"));
        assert_eq!(url.pg_config().get_password(), Some(&b"pw"[..]));
        assert_eq!(url.to_string(), "postgres://app:***@10.0.0.2:6432/appdb");
        assert_eq!(
            format!("{url:?}"),
            r#"ServerUrl("postgres://app:***@10.0.0.2:6432/appdb")"#
        );

        let url = ServerUrl::parse("postgresql://app@db.example/")?;
        assert_eq!((url.port(), url.dbname()), (5432, None));

        // Encoded, an `@` is part of the password; after the host, part of a value.
        let url = ServerUrl::parse("postgres://app:p%40ss@db.example/app?application_name=a@b")?;
        assert_eq!(url.host(), "db.example");
        assert_eq!(url.pg_config().get_password(), Some(&b"p@ss"[..]));
        assert_eq!(
            url.redacted(),
            "postgres://app:***@db.example/app?application_name=a@b"
        );

        let url = ServerUrl::parse("host=db user=u password=pw port=7000")?;
        assert_eq!((url.host(), url.port()), ("db", 7000));
        assert_eq!(url.redacted(), "host=db user=u password=*** port=7000");
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn server_url_unix_socket() -> Result<(), ConfigError> {
        let url = ServerUrl::parse("postgres://app@%2Fvar%2Frun%2Fpostgresql/app")?;
        assert!(url.is_unix_socket());
        assert_eq!(url.host(), "/var/run/postgresql");
        Ok(())
    }

    #[test]
    fn server_url_rejections_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("localhost:5432", "not a connection URL"),
            ("mysql://u:pw@h/db", "scheme `mysql`"),
            ("postgres://u:pw@h1,h2/db", "2 hosts"),
            ("postgres://u:pw@/db", "no host"),
            ("postgres://h/db", "no user"),
            ("postgres://u:pw@h/db?sslmode=sometimes", "`sslmode`"),
            ("postgres://u:pw@h/db?bogus=1", "unknown option `bogus`"),
            ("postgres://u:pw@h/db?Secret99=1", "unknown option"),
            ("postgres://u:pw@h:0/db", "port 0"),
            (
                "postgres://u:${1BAD}@h/db",
                "not a valid environment variable name",
            ),
            // An unencoded `@` would make a password fragment the host, or a query-string
            // password the user name.
            ("postgres://app:pw@Secret99@h/db", "`%40`"),
            ("postgres://h/db?user=app&password=pw@Secret99", "`%40`"),
            ("postgres://h/db?user=app&password=Secret99@h2", "`%40`"),
            ("postgres://h?user=app&PASSWORD=pw@Secret99", "`%40`"),
        ];
        for (raw, want) in cases {
            let err = match ServerUrl::parse(raw) {
                Ok(url) => panic!("{raw} parsed as {url:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.starts_with("url: "), "{err}");
            assert!(err.contains(want), "{raw}: {err}");
            assert!(!err.contains("pw@") && !err.contains("Secret99"), "{err}");
        }
    }

    #[test]
    fn sslmode_parses_libpq_spellings_only() {
        for mode in [
            TlsMode::Disable,
            TlsMode::Prefer,
            TlsMode::Require,
            TlsMode::VerifyCa,
            TlsMode::VerifyFull,
        ] {
            assert_eq!(mode.as_str().parse::<TlsMode>().ok(), Some(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(TlsMode::default(), TlsMode::Prefer);
        for bad in ["allow", "VERIFY-FULL", "verify_full", "", "on"] {
            let err = bad.parse::<TlsMode>().err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.starts_with("sslmode: ")),
                "{bad}: {err:?}"
            );
        }
        assert!(!TlsMode::Prefer.needs_tls() && TlsMode::Require.needs_tls());
    }

    #[test]
    fn tls_parameters_are_taken_from_both_url_forms() -> Result<(), ConfigError> {
        let url = ServerUrl::parse(
            "postgres://app:p?w@h:5433/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        )?;
        assert_eq!(url.sslmode(), Some(TlsMode::VerifyFull));
        assert_eq!(url.sslrootcert(), Some(Path::new("/etc/ca dir/ca.pem")));
        assert_eq!(url.pg_config().get_application_name(), Some("x"));
        assert_eq!(url.pg_config().get_password(), Some(&b"p?w"[..]));
        assert_eq!(url.tls_name, "h");
        // Shown as written (the password aside).
        assert!(url
            .redacted()
            .ends_with("sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem"));

        let url = ServerUrl::parse("postgres://app@h/db?sslmode=require")?;
        assert_eq!(
            (url.sslmode(), url.sslrootcert()),
            (Some(TlsMode::Require), None)
        );
        let url = ServerUrl::parse("postgres://app@h/db")?;
        assert_eq!((url.sslmode(), url.sslrootcert()), (None, None));

        let url = ServerUrl::parse(
            r"host=h user=u sslmode = verify-ca sslrootcert='/a b/c\'d.pem' dbname=d",
        )?;
        assert_eq!(url.sslmode(), Some(TlsMode::VerifyCa));
        assert_eq!(url.sslrootcert(), Some(Path::new("/a b/c'd.pem")));
        assert_eq!(url.dbname(), Some("d"));

        // hostaddr: the certificate is checked against the host name.
        let url = ServerUrl::parse("postgres://u@db.example/d?hostaddr=127.0.0.1")?;
        assert_eq!(url.tls_name, "db.example");
        let url = ServerUrl::parse("hostaddr=127.0.0.1 user=u")?;
        assert_eq!(url.tls_name, "127.0.0.1");

        for (raw, want) in [
            ("postgres://u@h/d?sslmode=allow", "`allow` is not supported"),
            ("postgres://u@h/d?sslmode=verify", "`sslmode`"),
            ("postgres://u@h/d?sslrootcert=", "`sslrootcert` is empty"),
            (
                "postgres://u@h/d?sslrootcert=%zz",
                "percent-encoding in `sslrootcert`",
            ),
            ("host=h user=u sslmode=sometimes", "`sslmode`"),
        ] {
            let err = ServerUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(want)),
                "{raw}: {err:?}"
            );
        }
        Ok(())
    }

    fn tls_config(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text)
    }

    #[test]
    fn url_tls_settings_override_fleet_tls() -> Result<(), ConfigError> {
        let config = tls_config(
            "[fleet.tls]\nsslmode = \"disable\"\n[primary]\nurl = \"postgres://a@h/d?sslmode=prefer\"\n[[replicas]]\nname = \"r\"\nurl = \"postgres://a@h2/d\"\n",
        )?;
        assert_eq!(config.fleet.tls.sslmode, TlsMode::Disable);
        let primary = config.server_tls("primary.url", &config.primary.url)?;
        assert_eq!(primary.mode, TlsMode::Prefer);
        let replica = config.server_tls("replicas[0].url", &config.replicas[0].url)?;
        assert_eq!(replica.mode, TlsMode::Disable);
        // A Unix socket never uses TLS.
        let config = tls_config("[primary]\nurl = \"postgres://a@%2Ftmp/d\"\n")?;
        let unix = config.server_tls("primary.url", &config.primary.url)?;
        assert_eq!(unix.mode, TlsMode::Disable);
        // Unknown keys in [fleet.tls] are errors.
        let err =
            tls_config("[fleet.tls]\nsslcert = \"x\"\n[primary]\nurl = \"postgres://a@h/d\"\n")
                .err()
                .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("fleet.tls.sslcert: unknown field `sslcert`")),
            "{err:?}"
        );
        Ok(())
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_without_the_feature_is_a_config_error() {
        let cases = [
            (
                "[fleet.tls]\nsslmode = \"verify-full\"\n[primary]\nurl = \"postgres://a@h/d\"\n",
                "fleet.tls.sslmode",
                "sslmode=verify-full",
            ),
            (
                "[primary]\nurl = \"postgres://a@h/d?sslmode=require\"\n",
                "primary.url",
                "sslmode=require",
            ),
            (
                "[fleet.tls]\nsslrootcert = \"/ca.pem\"\n[primary]\nurl = \"postgres://a@h/d\"\n",
                "fleet.tls.sslrootcert",
                "sslrootcert",
            ),
            (
                "[primary]\nurl = \"postgres://a@h/d\"\n[[replicas]]\nname = \"r\"\nurl = \"postgres://a@h/d?sslmode=verify-ca&sslrootcert=/x\"\n",
                "replicas[0].url",
                "sslmode=verify-ca",
            ),
        ];
        for (text, key, setting) in cases {
            match tls_config(text) {
                Err(e @ ConfigError::TlsNotBuilt { .. }) => {
                    assert_eq!(e.key(), Some(key));
                    let shown = e.to_string();
                    assert!(shown.contains(setting), "{shown}");
                    assert!(shown.contains("built without the tls feature"), "{shown}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // prefer (the default) and disable are plaintext and need nothing.
        assert!(tls_config("[primary]\nurl = \"postgres://a@h/d?sslmode=prefer\"\n").is_ok());
        assert!(tls_config(
            "[fleet.tls]\nsslmode = \"disable\"\n[primary]\nurl = \"postgres://a@h/d\"\n"
        )
        .is_ok());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_settings_are_checked() {
        let missing = std::env::temp_dir().join("pgfleet-no-such-ca.pem");
        let text = format!(
            "[fleet.tls]\nsslrootcert = \"{}\"\n[primary]\nurl = \"postgres://a@h/d\"\n",
            missing.display()
        );
        match tls_config(&text) {
            Err(ConfigError::CaFile { key, path, reason }) => {
                assert_eq!(key, "fleet.tls.sslrootcert");
                assert_eq!(path, missing);
                assert!(reason.contains("No such file"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let text = format!(
            "[primary]\nurl = \"postgres://a@h/d?sslmode=verify-ca&sslrootcert={}\"\n",
            missing.display()
        );
        let err = tls_config(&text).err();
        assert_eq!(err.as_ref().and_then(ConfigError::key), Some("primary.url"));
        assert!(err.is_some_and(|e| e.to_string().contains(&missing.display().to_string())),);
        // verify-* need a CA; a CA is not read when TLS is off.
        let err = tls_config("[primary]\nurl = \"postgres://a@h/d?sslmode=verify-full\"\n")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(
                |e| e.starts_with("primary.url: sslmode=verify-full needs sslrootcert")
            ),
            "{err:?}"
        );
        let text = format!(
            "[fleet.tls]\nsslmode = \"disable\"\nsslrootcert = \"{}\"\n[primary]\nurl = \"postgres://a@h/d\"\n",
            missing.display()
        );
        assert!(tls_config(&text).is_ok());
        let err = tls_config(
            "[primary]\nurl = \"postgres://a@h/d?sslmode=prefer&sslnegotiation=direct\"\n",
        )
        .err()
        .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("sslnegotiation=direct")));
    }

    #[test]
    fn defaults_validate() -> Result<(), ConfigError> {
        let url = ServerUrl::parse("postgres://app@h/app")?;
        let mut config = Config::new(PrimaryConfig::new(url.clone()));
        config.validate()?;
        config.replicas.push(ReplicaConfig::new("r1", url));
        config.validate()?;
        config.fleet.slow_start = Duration::ZERO;
        config.fleet.lease_timeout = Duration::ZERO;
        let err = config.validate().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("fleet.lease_timeout: must be more than 0s")
        );
        Ok(())
    }
}

//! pgfleet manages an application's connections to one PostgreSQL primary and its
//! streaming replicas: writes and strong reads go to the primary, reads are spread over
//! healthy replicas by weight, and a read that must see an earlier write goes to a
//! replica only once it has *replayed* that write.
//!
//! # Layout
//!
//! The crate's modules (their public types are re-exported at the root):
//!
//! - `config`: [`Config`] from TOML, validation, secrets kept out of `Debug`.
//! - `lsn`: [`Lsn`], the WAL position type (`pg_lsn`).
//! - `token`: [`Token`], a write's (system id, timeline, LSN), with a stable text form.
//! - `topology`: the published snapshot and the pure selection strategies.
//! - `lag`: time lag from primary position history, replay rates.
//! - `backoff`: restart delays.
//! - `conn`: connecting under one timeout, socket options, the transaction-state sniffer,
//!   and the deadpool manager; [`check_server`].
//! - `tls` (feature `tls`): rustls under the sniffer, certificate verification by
//!   `sslmode`, typed [`TlsError`]s.
//! - `server`: the server actor (pool owner, prober).
//! - `router`: the router actor (topology writer, read-your-writes waits).
//! - `supervisor`: one for every cluster's actors; restarts failed ones with backoff.
//! - `fleet`: [`Fleet`], the handle (one per cluster), and the lease decision.
//! - `reload`: [`Fleet::reload`], a new configuration without a restart.
//! - `metrics`: the `metrics` feature's handles (no-ops without it).
//! - `lease`: [`Lease`], [`Intent`], [`Consistency`].
//! - `session`: [`Session`].
//! - `verify`: [`Fleet::verify_token`], a token judged against a fresh primary position.
//! - `http`: read-your-writes across HTTP requests: [`HttpConfig`] (the `[http]` table,
//!   every build) and, with the feature `axum`, `SessionLayer` (a tower layer carrying
//!   the session token, HMAC-signed, in a cookie or header) and `TokenSigner`.
//! - `listener`: the LISTEN/NOTIFY listener actor, [`Subscription`], [`ListenEvent`],
//!   [`Notification`].
//! - `status`: [`Status`].
//! - `error`: [`Error`].
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), pgfleet::Error> {
//! use pgfleet::{Config, Fleet, Intent};
//!
//! let config = Config::from_path("pgfleet.toml")?;
//! let fleet = Fleet::start(config).await?;
//!
//! let mut w = fleet.lease(Intent::Write).await?;
//! w.execute("INSERT INTO users(name) VALUES ($1)", &[&"alice"]).await.map_err(|e| w.error(e))?;
//! let token = w.commit_token().await?;          // the write's WAL position
//! drop(w);
//!
//! let r = fleet.lease(Intent::read_after(&token)).await?;  // a replica that replayed it, or the primary
//! let n: i64 = r.query_one("SELECT count(*) FROM users", &[]).await.map_err(|e| r.error(e))?.get(0);
//! # let _ = n; Ok(()) }
//! ```
//!
//! # Consistency
//!
//! | request | served by |
//! |---|---|
//! | [`Intent::Write`] | the primary; none within `lease_timeout`: [`Error::NoPrimary`] |
//! | [`Consistency::Strong`] | the primary |
//! | [`Consistency::Eventual`] | a healthy replica within `max_lag_bytes` and `max_lag`; else the fallback |
//! | [`Consistency::MaxStaleness`] | a healthy replica whose time lag is at most the bound; else the fallback |
//! | [`Consistency::AfterLsn`] | a healthy replica that has replayed the token; else wait up to `ryw_wait`; else the fallback (a token the primary has not reached either: [`TokenError::AheadOfPrimary`]) |
//!
//! The fallback is the primary (`fallback = "primary"`, the default), on a connection
//! with `default_transaction_read_only = on` so a write under a read lease fails there
//! as it would on a replica; or an error ([`Error::NoFreshReplica`]) that says how far
//! behind the best replica is. When no replica can catch up in time (all paused, or
//! expected to take longer than `ryw_wait`) the fallback happens at once.
//!
//! A [`Session`] carries a high-water mark so its reads see its own writes and never go
//! back in time when they move between replicas.
//!
//! # Features
//!
//! All off by default: `tls` (rustls to the servers, `sslmode` / `sslrootcert`),
//! `axum` (the `SessionLayer`: read-your-writes across HTTP requests with signed
//! tokens), `metrics` (counters, gauges and histograms through the `metrics` facade),
//! `cli` (the `pgfleet` binary). The README documents each.
//!
//! # The actor tree
//!
//! ```text
//! Fleet (Clone handle) ── Supervisor
//!                           ├── Router            (one per cluster)
//!                           ├── Server "primary"  (one per configured server)
//!                           ├── Server "replica1" ...
//!                           └── Listener          (LISTEN/NOTIFY, on the primary)
//! ```
//!
//! Each server actor owns its server's pools and a dedicated probe connection; it probes
//! every `probe_interval` and reports role, positions and health to the router. The
//! router publishes an immutable topology snapshot that every lease
//! reads without locks, and parks read-your-writes reads that no replica can serve yet.
//! The supervisor restarts failed server actors with exponential backoff and jitter.
//!
//! # LISTEN/NOTIFY
//!
//! [`Fleet::listen`] subscribes to a channel and returns a [`Subscription`], a stream of
//! [`ListenEvent`]s. One listener actor keeps one connection to the current primary and
//! LISTENs there once per channel, however many subscriptions share it; the last
//! subscription dropped UNLISTENs it. When that connection is lost (a restart, a
//! failover, a terminated backend) the listener reconnects with backoff, LISTENs again
//! and sends [`ListenEvent::Reconnected`] to every subscription, because notifications
//! sent meanwhile were missed; a subscription whose buffer (1024 events) is full gets
//! [`ListenEvent::Lagged`] instead of what did not fit. Both mean: re-read the state.
//!
//! ```no_run
//! # async fn demo(fleet: pgfleet::Fleet) -> Result<(), pgfleet::Error> {
//! use pgfleet::ListenEvent;
//!
//! let mut orders = fleet.listen("orders").await?;
//! while let Some(event) = orders.recv().await {
//!     match event {
//!         ListenEvent::Notification(n) => println!("order {}", n.payload),
//!         _ => println!("notifications may have been missed; reload"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # The pool
//!
//! Pools are deadpool's managed pool with our own manager rather than deadpool-postgres
//! or bb8-postgres: both connect through `tokio_postgres::Config::connect`, which bounds
//! only the TCP connect and cannot tell whether a returned connection is inside a
//! transaction. Owning the socket lets the whole connect (TCP, startup, auth) run under
//! `connect_timeout`, sets TCP keepalive and `TCP_USER_TIMEOUT`, and reads each
//! connection's transaction status from the protocol stream, so a connection released
//! inside `BEGIN` is rolled back before reuse at no cost to the others.
//!
//! # TLS
//!
//! With the `tls` feature, connections use TLS (rustls) as libpq's `sslmode` and
//! `sslrootcert` say, per server in its URL (`?sslmode=verify-full&sslrootcert=/etc/ca.pem`)
//! or for every server in `[fleet.tls]`; see [`TlsConfig`] and [`TlsMode`]. The
//! transaction-state sniffer reads the plaintext protocol above TLS. Without the feature,
//! a configuration that needs TLS is rejected ([`ConfigError::TlsNotBuilt`]).
//! [`check_server`] opens one connection the way the pools do and returns a typed
//! [`ConnectError`] (such as a certificate that names another host) when it fails.
//!
//! # Privileges
//!
//! The probe needs only membership in `pg_monitor` (for `pg_stat_wal_receiver`):
//! `GRANT pg_monitor TO app;`. The test suite connects as such a non-superuser role.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backoff;
mod config;
mod conn;
mod error;
mod fleet;
mod http;
mod lag;
mod lease;
mod listener;
mod lsn;
mod metrics;
mod reload;
mod router;
mod server;
mod session;
mod shared;
mod status;
mod supervisor;
#[cfg(feature = "tls")]
mod tls;
mod token;
mod topology;
mod verify;

pub use self::http::{HttpConfig, SameSite, TokenKey};
#[cfg(feature = "axum")]
pub use self::http::{
    MissingSession, RejectedTokens, SessionFuture, SessionLayer, SessionService, SignedTokenError,
    TokenSigner,
};
pub use config::{
    ClusterConfig, Config, ConfigError, ConsistencyConfig, DefaultRead, Fallback, FleetConfig,
    PrimaryConfig, ReplicaConfig, RestartConfig, ServerUrl, Strategy, TlsConfig, TlsMode,
    UnknownCluster, DEFAULT_CLUSTER,
};
pub use conn::{check_cluster_server, check_server};
pub use error::{ConnectError, Error, TlsError};
pub use fleet::Fleet;
pub use lease::{Consistency, Intent, Lease};
pub use listener::{ListenEvent, Notification, Subscription};
pub use lsn::{Lsn, LsnParseError};
pub use reload::ReloadReport;
pub use router::RouterMsg;
pub use server::ServerMsg;
pub use session::Session;
pub use status::{ServerStatus, Status};
pub use token::{Token, TokenError};
pub use topology::{Health, Role};

/// Re-exported so applications can `call!` the router without depending on ractor
/// themselves.
pub use ractor;

/// Internals exposed for benchmarks only; not part of the API.
#[doc(hidden)]
pub mod __bench {
    pub use crate::topology::select;
}

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

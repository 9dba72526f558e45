//! [`Error`]: everything a lease, a session or the fleet can fail with.

use std::time::Duration;

use crate::config::{ConfigError, TlsMode};
use crate::lsn::Lsn;
use crate::token::TokenError;

/// SQLSTATE of "cannot execute ... in a read-only transaction".
pub(crate) const READ_ONLY_SQL_TRANSACTION: &str = "25006";

/// An error from pgfleet.
///
/// Every variant names the server, key or position involved; none carries a password.
/// [`Error::is_retryable`] tells whether the same request may succeed if sent again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No server is a healthy primary right now (writes and strong reads need one).
    #[error(
        "no primary available after waiting {waited:?}{}",
        match cause { Some(c) => format!(" ({c})"), None => String::new() }
    )]
    NoPrimary {
        /// How long the lease waited for one.
        waited: Duration,
        /// Why, as far as the probes know: the last error of each server that is not a
        /// replica (e.g. `primary: connect refused`). Never a password.
        cause: Option<String>,
    },
    /// Two servers both claim to be the primary; writes are refused rather than guessed.
    #[error("split brain: servers {first} and {second} both claim to be primary; writes refused")]
    SplitBrain {
        /// One server that claims primary.
        first: String,
        /// The other.
        second: String,
    },
    /// A lease or connect did not finish in time.
    #[error("timed out after {after:?} waiting for {what} on server {server}")]
    Timeout {
        /// The server concerned (`"*"` when no single server was).
        server: String,
        /// What was being waited for (`"a pooled connection"`, `"connect"`, ...).
        what: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// No replica is fresh enough for the read and the fallback policy is `error`.
    #[error(
        "no replica fresh enough for the read: the best is {}{}",
        match behind_bytes { Some(b) => format!("{b} bytes behind"), None => "of unknown lag".to_string() },
        match catch_up { Some(d) => format!(", expected to catch up in about {d:?}"), None => String::new() }
    )]
    NoFreshReplica {
        /// How far the best replica is behind what the read needs, in bytes of WAL.
        behind_bytes: Option<u64>,
        /// Estimated time for that replica to catch up, when its replay rate is known.
        catch_up: Option<Duration>,
    },
    /// Too many read-your-writes leases are already waiting for replicas to catch up.
    #[error(
        "{waiting} read-your-writes leases already waiting (fleet.max_waiters); request refused"
    )]
    TooManyWaiters {
        /// The bound that was reached.
        waiting: usize,
    },
    /// A query on a standby was cancelled because it conflicted with WAL replay. Retryable.
    #[error("query on server {server} cancelled by a recovery conflict (retryable)")]
    RecoveryConflict {
        /// The standby that cancelled it.
        server: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// `SERIALIZABLE` was asked of a standby, which cannot provide it.
    #[error("SERIALIZABLE transactions are not available on standby {server}; use a strong read")]
    SerializableOnStandby {
        /// The standby concerned.
        server: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A write (or a write inside a read lease) hit a read-only server or transaction.
    #[error("server {server} refused a write: read-only transaction (SQLSTATE 25006)")]
    ReadOnly {
        /// The server concerned.
        server: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The token names a write above the point where the current timeline branched off:
    /// that write may not exist on the new primary. Never served as a stale read.
    #[error("token {token_lsn} on timeline {token_timeline} is past the switch to timeline {current_timeline}; that write may be lost")]
    WriteMayBeLost {
        /// The token's position.
        token_lsn: Lsn,
        /// The token's timeline.
        token_timeline: u32,
        /// The cluster's current timeline.
        current_timeline: u32,
    },
    /// `commit_token` was called inside a transaction that has written: no committed
    /// position exists yet.
    #[error("commit_token called inside an open transaction that has written; COMMIT first")]
    OpenTransaction,
    /// A token could not be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The fleet is shutting down (or was shut down); no new leases.
    #[error("the fleet is shutting down")]
    ShuttingDown,
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A connection to a server could not be opened (see [`check_server`](crate::check_server)).
    #[error("connecting to server {server}: {source}")]
    Connect {
        /// The server concerned.
        server: String,
        /// What failed (never the password).
        #[source]
        source: ConnectError,
    },
    /// An error from PostgreSQL or the driver.
    #[error("postgres error on server {server}: {source}")]
    Postgres {
        /// The server concerned (`"?"` when unknown, e.g. converted with `?` from a bare error).
        server: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A LISTEN channel name PostgreSQL cannot hold as given (see [`Fleet::listen`](crate::Fleet::listen)).
    #[error("invalid LISTEN channel {channel:?}: {reason}")]
    InvalidChannel {
        /// The name as given.
        channel: String,
        /// What is wrong with it (empty, longer than 63 bytes, contains a NUL byte).
        reason: &'static str,
    },
    /// `fleet.cluster(name)` for a name no `[clusters.NAME]` section has (and
    /// `fleet.unknown_cluster = "error"`).
    #[error("no cluster named {name:?} in the configuration")]
    UnknownCluster {
        /// The name asked for.
        name: String,
    },
    /// The actor system failed in a way that should not happen (a bug); the message says where.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a connection to a server could not be opened. Never contains a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The socket could not be opened: the name did not resolve, the connection was
    /// refused or unreachable, or the socket options could not be set.
    #[error("socket: {0}")]
    Socket(String),
    /// TLS could not be set up: the server refused it, or its certificate failed
    /// verification.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The startup or authentication failed (a wrong password, an unknown database, a
    /// protocol error).
    #[error("startup: {0}")]
    Startup(String),
    /// The first query on the new connection failed.
    #[error("first query: {0}")]
    FirstQuery(String),
    /// The whole connect (TCP, TLS, startup, authentication) took longer than
    /// `fleet.connect_timeout`.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

/// Why TLS to a server failed (feature `tls`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The server answered the TLS request with "no": it runs with `ssl = off`.
    #[error("the server does not accept TLS connections, and sslmode={mode} needs TLS")]
    NotSupported {
        /// The `sslmode` that asked for TLS.
        mode: TlsMode,
    },
    /// The certificate is trusted, but names another host (`sslmode=verify-full`).
    #[error(
        "the server certificate is not valid for host `{host}` (it names {})",
        fmt_names(presented)
    )]
    HostnameMismatch {
        /// The host name (or address) the certificate was checked against.
        host: String,
        /// The names and addresses the certificate holds, when known.
        presented: Vec<String>,
    },
    /// The certificate chain did not verify against `sslrootcert`: signed by another CA,
    /// expired, not yet valid, or malformed.
    #[error("the server certificate is not trusted: {reason}")]
    UntrustedCertificate {
        /// What was wrong with it.
        reason: String,
    },
    /// The TLS handshake failed for another reason (no common protocol version or cipher
    /// suite, a TLS alert from the server, a connection closed mid-handshake).
    #[error("handshake failed: {reason}")]
    Handshake {
        /// What failed.
        reason: String,
    },
}

fn fmt_names(names: &[String]) -> String {
    if names.is_empty() {
        "no host names".to_owned()
    } else {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Error {
    /// Whether sending the same request again may succeed: timeouts, recovery conflicts,
    /// a missing primary (a failover may be in progress), no fresh replica, too many waiters
    /// and connection failures other than TLS ones (a certificate does not fix itself).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { source, .. } => !matches!(source, ConnectError::Tls(_)),
            _ => matches!(
                self,
                Error::NoPrimary { .. }
                    | Error::Timeout { .. }
                    | Error::NoFreshReplica { .. }
                    | Error::TooManyWaiters { .. }
                    | Error::RecoveryConflict { .. }
            ),
        }
    }

    /// A short, stable name for the variant (`"NoPrimary"`, `"Timeout"`, ...), for logs,
    /// counters and metric labels. Carries no server names, positions or messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoPrimary { .. } => "NoPrimary",
            Error::SplitBrain { .. } => "SplitBrain",
            Error::Timeout { .. } => "Timeout",
            Error::NoFreshReplica { .. } => "NoFreshReplica",
            Error::TooManyWaiters { .. } => "TooManyWaiters",
            Error::RecoveryConflict { .. } => "RecoveryConflict",
            Error::SerializableOnStandby { .. } => "SerializableOnStandby",
            Error::ReadOnly { .. } => "ReadOnly",
            Error::WriteMayBeLost { .. } => "WriteMayBeLost",
            Error::OpenTransaction => "OpenTransaction",
            Error::Token(_) => "Token",
            Error::ShuttingDown => "ShuttingDown",
            Error::Config(_) => "Config",
            Error::Connect { .. } => "Connect",
            Error::Postgres { .. } => "Postgres",
            Error::InvalidChannel { .. } => "InvalidChannel",
            Error::UnknownCluster { .. } => "UnknownCluster",
            Error::Internal(_) => "Internal",
        }
    }

    /// The SQLSTATE of the server error behind this one, if there is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::RecoveryConflict { source, .. }
            | Error::SerializableOnStandby { source, .. }
            | Error::ReadOnly { source, .. }
            | Error::Postgres { source, .. } => source.as_db_error().map(|d| d.code().code()),
            _ => None,
        }
    }

    /// Classifies a driver error from a query run on `server`: recovery conflicts,
    /// `SERIALIZABLE` on a standby and read-only refusals get their own variants.
    ///
    /// Without the server's role, a recovery conflict is told from a plain
    /// serialization failure by its message, which depends on the server's
    /// `lc_messages`; [`Lease::error`](crate::Lease::error) knows the role and does not
    /// need the message.
    pub fn from_postgres(server: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::classify(server.into(), None, source)
    }

    /// As [`Error::from_postgres`], for a query run on a server in `role`.
    pub(crate) fn classify(
        server: String,
        role: Option<crate::Role>,
        source: tokio_postgres::Error,
    ) -> Error {
        let Some(db) = source.as_db_error() else {
            return Error::Postgres { server, source };
        };
        let code = db.code().code();
        let message = db.message();
        if code == READ_ONLY_SQL_TRANSACTION {
            return Error::ReadOnly { server, source };
        }
        // Recovery conflicts are reported as 40001 (or 40P01 for buffer-pin deadlocks).
        // A standby runs no writes, so there these codes mean nothing else; elsewhere
        // (role unknown) the English wording tells them from a plain serialization
        // failure. 57P04 is the conflict with a dropped database.
        let conflict_code = code == "40001" || code == "40P01";
        let on_standby = role == Some(crate::Role::Replica);
        if (conflict_code && (on_standby || message.contains("conflict with recovery")))
            || (on_standby && code == "57P04")
        {
            return Error::RecoveryConflict { server, source };
        }
        if code == "0A000" && message.contains("serializable") && message.contains("hot standby") {
            return Error::SerializableOnStandby { server, source };
        }
        Error::Postgres { server, source }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(source: tokio_postgres::Error) -> Self {
        Error::from_postgres("?", source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_is_the_variant_name_and_carries_no_detail() {
        let errors = [
            Error::NoPrimary {
                waited: Duration::from_secs(1),
                cause: None,
            },
            Error::SplitBrain {
                first: "a".into(),
                second: "b".into(),
            },
            Error::Timeout {
                server: "replica1".into(),
                what: "connect",
                after: Duration::from_secs(1),
            },
            Error::NoFreshReplica {
                behind_bytes: Some(1),
                catch_up: None,
            },
            Error::TooManyWaiters { waiting: 3 },
            Error::WriteMayBeLost {
                token_lsn: Lsn(5),
                token_timeline: 1,
                current_timeline: 2,
            },
            Error::OpenTransaction,
            Error::Token(TokenError::Malformed { reason: "x" }),
            Error::ShuttingDown,
            Error::Connect {
                server: "primary".into(),
                source: ConnectError::Socket("refused".into()),
            },
            Error::InvalidChannel {
                channel: String::new(),
                reason: "empty",
            },
            Error::UnknownCluster { name: "x".into() },
            Error::Internal("bug".into()),
        ];
        for e in &errors {
            let debug = format!("{e:?}");
            let variant = debug.split([' ', '{', '(']).next().unwrap_or_default();
            assert_eq!(e.kind(), variant, "{debug}");
            assert_eq!(e.sqlstate(), None);
        }
    }
}

//! The one public error type of the testkit.

use std::time::Duration;

/// Everything that can go wrong while starting, driving or faulting a [`LocalCluster`].
///
/// Each variant says what the testkit was doing and, where it applies, on which node.
///
/// [`LocalCluster`]: crate::LocalCluster
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `initdb`/`pg_ctl`/`pg_basebackup` were found in `PG_BIN`, `/usr/lib/postgresql/*/bin` or `PATH`.
    #[error(
        "PostgreSQL server binaries not found: install them (apt-get install postgresql) or set PG_BIN \
         to the directory holding initdb, pg_ctl and pg_basebackup ({detail})"
    )]
    BinariesNotFound {
        /// Where the testkit looked and what was missing.
        detail: String,
    },

    /// The testkit runs as root, so the servers must run as the `postgres` OS user, which does not exist.
    #[error(
        "running as root, and initdb refuses root, but there is no `postgres` OS user to run the servers as \
         ({detail}); create it (useradd postgres) or run the tests as a non-root user"
    )]
    NoPostgresUser {
        /// Why the user could not be found.
        detail: String,
    },

    /// [`ClusterBuilder::replicas`](crate::ClusterBuilder::replicas) asked for more replicas than supported.
    #[error("{requested} replicas requested, at most {max} are supported")]
    TooManyReplicas {
        /// The number asked for.
        requested: usize,
        /// The most the testkit starts.
        max: usize,
    },

    /// A setting passed to the builder cannot be written to `postgresql.conf`.
    #[error("invalid setting {name:?}: {reason}")]
    InvalidSetting {
        /// The setting's name.
        name: String,
        /// What is wrong with the name or the value.
        reason: &'static str,
    },

    /// An environment variable read by the testkit holds an unusable value.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        reason: &'static str,
    },

    /// No cluster slot became free in time: other clusters (in this process or others) held
    /// them all.
    #[error(
        "no cluster slot free after {waited:?}: {max} clusters already run on this machine \
         (the shared cluster of each running test binary holds one for the process's life; \
         raise PGFLEET_TESTKIT_MAX_CLUSTERS if the machine can take more)"
    )]
    NoSlot {
        /// How long the start waited.
        waited: Duration,
        /// The bound in force.
        max: usize,
    },

    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the testkit was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A PostgreSQL command-line program (initdb, pg_ctl, pg_basebackup) exited unsuccessfully.
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        /// Which program did what, on which node.
        what: String,
        /// The exit status.
        status: String,
        /// Its stdout and stderr, and the tail of the node's server log where there is one.
        output: String,
    },

    /// A query or connection to a node failed.
    #[error("{node}: {what}: {source}")]
    Postgres {
        /// The node's name.
        node: String,
        /// What the testkit was doing.
        what: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A condition polled by the testkit did not become true in time.
    #[error("{node}: timed out after {after:?} waiting for {what}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// The node's name.
        node: String,
        /// The awaited condition.
        what: String,
        /// How long the testkit waited.
        after: Duration,
        /// The last error seen while polling, if any.
        last_error: Option<String>,
    },

    /// The node is not in the state the operation needs (e.g. `kill9` on a stopped node).
    #[error("{node}: {what}")]
    State {
        /// The node's name.
        node: String,
        /// What is wrong.
        what: String,
    },

    /// The certificates of a TLS cluster could not be generated.
    #[error("generating TLS certificates: {0}")]
    Tls(String),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Postgres`] with context.
    pub(crate) fn pg(node: &str, what: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Postgres {
            node: node.to_owned(),
            what: what.into(),
            source,
        }
    }
}

//! One server of a [`LocalCluster`](crate::LocalCluster): its ports, URLs, files and proxy.

use std::path::{Path, PathBuf};

use crate::Proxy;

/// The application role every client URL of the testkit uses: `LOGIN`, not a superuser, member of
/// `pg_monitor`, owner of [`APP_DATABASE`].
pub const APP_USER: &str = "pgfleet_app";

/// The password of [`APP_USER`]. Fixed, so URLs are predictable; the servers listen on loopback only.
pub const APP_PASSWORD: &str = "pgfleet_app_pw";

/// The database the application role owns.
pub const APP_DATABASE: &str = "app";

/// The superuser (made by `initdb -U`), also used for replication.
pub const SUPERUSER: &str = "postgres";

/// The password of [`SUPERUSER`] over TCP (the unix socket in the cluster dir trusts local users).
pub const SUPERUSER_PASSWORD: &str = "pgfleet_super_pw";

/// A node of a cluster: the primary or a replica.
///
/// A `Node` is a description (ports, URLs, files); the operations on it (stop, kill9, promote, ...)
/// are methods of [`LocalCluster`](crate::LocalCluster) that take the node.
#[derive(Debug)]
pub struct Node {
    /// "primary", "replica1", ...
    name: String,
    /// The server's own port on 127.0.0.1.
    port: u16,
    /// The TCP proxy in front of it.
    proxy: Proxy,
    /// Its data directory (`PGDATA`).
    data_dir: PathBuf,
    /// Where `pg_ctl -l` sends its server log.
    log_file: PathBuf,
}

impl Node {
    /// Assembles a node.
    pub(crate) fn new(
        name: String,
        port: u16,
        proxy: Proxy,
        data_dir: PathBuf,
        log_file: PathBuf,
    ) -> Self {
        Self {
            name,
            port,
            proxy,
            data_dir,
            log_file,
        }
    }

    /// `"primary"`, `"replica1"`, `"replica2"`, ... (also its `cluster_name`, so replicas show up
    /// under that `application_name` in the primary's `pg_stat_replication`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The application role's URL **through the node's proxy**:
    /// `postgres://pgfleet_app:PASSWORD@127.0.0.1:PROXYPORT/app`. Proxy faults apply to it.
    pub fn url(&self) -> String {
        format!(
            "postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{APP_DATABASE}",
            self.proxy.port()
        )
    }

    /// The application role's URL straight to the server port (no proxy, no network faults).
    pub fn direct_url(&self) -> String {
        format!(
            "postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{APP_DATABASE}",
            self.port
        )
    }

    /// The superuser's URL, direct over TCP, to the `app` database.
    pub fn superuser_url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{APP_DATABASE}",
            self.port
        )
    }

    /// The server's own port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy's port on 127.0.0.1 (the one in [`url`](Self::url)).
    pub fn proxy_port(&self) -> u16 {
        self.proxy.port()
    }

    /// The proxy in front of this node, to inject network faults.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`pg_ctl -l`), handy when a test fails.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::bins::log_tail(&self.log_file, lines)
    }
}

//! A real, local, replicated PostgreSQL cluster for tests, with fault injection.
//!
//! `pgfleet-testkit` starts a primary and up to four streaming replicas from the PostgreSQL server
//! binaries on the machine, each on its own loopback port behind its own TCP [`Proxy`], and lets a
//! test break them: pause or delay WAL replay, stop / restart / `kill -9` / start a node, promote a
//! replica, and blackhole, reset or slow down the network in front of any node. It is what
//! pgfleet's own integration tests run against, and it is meant for pgfleet users' tests too.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use pgfleet_testkit::LocalCluster;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // A cluster of its own, because this test breaks it.
//! let cluster = LocalCluster::builder().replicas(1).start().await?;
//! let primary = cluster.app_client(cluster.primary()).await?;
//! primary.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await?;
//!
//! let replica = cluster.replica(0);
//! cluster.wait_all_replayed(Duration::from_secs(10)).await?;
//! cluster.kill9(replica).await?;
//! cluster.start(replica).await?;
//! cluster.wait_streaming(replica, Duration::from_secs(10)).await?;
//!
//! replica.proxy().blackhole(); // a hung server, as clients see it
//! let config = cluster.pgfleet_toml(); // feed this to pgfleet
//! # drop(config);
//! # Ok(()) }
//! ```
//!
//! Tests that do not break anything share one cluster per test binary:
//! `let cluster = LocalCluster::shared().await?;`.
//!
//! From a shell, `cargo run -p pgfleet-testkit -- up --replicas 2` starts a cluster, prints its
//! pgfleet config and runs until Ctrl-C.
//!
//! # What the machine needs
//!
//! PostgreSQL server binaries (`initdb`, `pg_ctl`, `pg_basebackup`, `postgres`), version 15 or
//! newer: from `PG_BIN` if set and not empty (it must then hold them all), else the highest
//! version, compared numerically, under `/usr/lib/postgresql/*/bin` (Debian's `apt-get install
//! postgresql`), else the first directory on `PATH` holding them all. Without them every start
//! fails with [`Error::BinariesNotFound`], which says where it looked. Each cluster takes a temp dir under [`std::env::temp_dir`]
//! (`pgfleet-testkit-XXXXXX`) and about 50 MB of memory per node.
//!
//! The primary's initial data dir (after `initdb` and the creation of the roles and database
//! below) is built once per machine and user into `<temp_dir>/pgfleet-testkit-template-<uid>/`
//! (about 60 MB, rebuilt when the PostgreSQL binaries change) and copied for each cluster, which
//! saves a couple of seconds per cluster. Set [`PGFLEET_TESTKIT_NO_TEMPLATE`](NO_TEMPLATE_ENV)`=1`
//! to run `initdb` for every cluster instead.
//!
//! # Users, roles and authentication
//!
//! `initdb` refuses to run as root, so when the tests run as root the testkit runs every server
//! program as the `postgres` OS user (looked up in `/etc/passwd`; [`Error::NoPostgresUser`] if
//! missing) and hands it the cluster dir. As any other user it runs them as that user.
//!
//! Local (unix socket, in the private cluster dir) connections are trusted; TCP connections need a
//! password (SCRAM). The superuser [`SUPERUSER`] has password [`SUPERUSER_PASSWORD`] and is also
//! the replication user. Clients use the application role [`APP_USER`] / [`APP_PASSWORD`], which is
//! not a superuser but is a member of `pg_monitor`, and owns the database [`APP_DATABASE`] — as a
//! production application would connect.
//!
//! # TLS
//!
//! `LocalCluster::builder().tls(true)` generates a CA and a server certificate for
//! [`SERVER_CERT_NAMES`] (`localhost`, `127.0.0.1`) into the cluster dir, and every node runs
//! with `ssl = on` and that certificate (the key file is mode 0600 and owned by the servers' OS
//! user, as PostgreSQL requires); replicas stream from the primary over TLS too. Clients trust
//! [`LocalCluster::ca_cert_path`]. The settings go into each cluster's own `postgresql.conf`,
//! never into the cached data dir template, which stays the same for TLS and plain clusters.
//!
//! # Cleanup guarantees
//!
//! Dropping a [`LocalCluster`] — normally or while a test panics — shuts every server down
//! immediately (SIGQUIT, as `pg_ctl stop -m immediate`, SIGKILL after 10 s), removes the temp dir
//! and frees the cluster's slot. Each cluster also has a small watchdog process (`sh`) that waits
//! for the test process to end, however it ends (normal exit, abort, SIGKILL), and then does the
//! same; that is how the never-dropped [`LocalCluster::shared`] cluster is cleaned up, shortly
//! after the test binary exits. Both signal only a process whose command line names one of the
//! cluster's data dirs: after a [`LocalCluster::kill9`] without a restart, the pid left in
//! `postmaster.pid` may belong to an unrelated process by then.
//!
//! # How many clusters at once
//!
//! Tests run in parallel, several test binaries may run at once, and every node is a full server.
//! At most [`DEFAULT_MAX_CLUSTERS`] (3) clusters run at the same time on the machine; more wait in
//! [`ClusterBuilder::start`] for a slot. The bound is a process-wide semaphore plus `flock`ed slot
//! files in `<temp_dir>/pgfleet-testkit-slots/` shared by all processes.
//! [`PGFLEET_TESTKIT_MAX_CLUSTERS`](MAX_CLUSTERS_ENV) overrides it. The shared cluster holds its
//! slot for the life of the process, so a test binary that uses both it and clusters of its own
//! needs a bound of at least 2. A start that finds no free slot within 5 minutes fails with
//! [`Error::NoSlot`] rather than hang.
//!
//! # Layout
//!
//! - `cluster`: [`LocalCluster`], [`ClusterBuilder`], startup, teardown, config output.
//! - `faults`: the node operations (pause/resume replay, apply delay, stop, restart, kill9, start,
//!   promote) and the waits (streaming, replayed).
//! - `node`: [`Node`], a node's ports, URLs and files, and the role constants.
//! - `proxy`: [`Proxy`] and [`ProxyMode`], the fault-injecting TCP proxy.
//! - `slots`: the concurrency bound.
//! - `template`: the cached initial data dir of primaries (initdb, roles, database).
//! - `tls`: the CA and server certificate of TLS clusters.
//! - `bins`, `process`: finding and running PostgreSQL programs; `/proc`, signals, the watchdog.
//! - `error`: [`Error`].

pub mod bare;
mod bins;
mod cluster;
mod error;
mod faults;
mod node;
mod process;
mod proxy;
mod slots;
mod template;
mod tls;

pub use cluster::{ClusterBuilder, LocalCluster, MAX_REPLICAS};
pub use error::Error;
pub use node::{Node, APP_DATABASE, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD};
pub use proxy::{Proxy, ProxyMode};
pub use slots::{DEFAULT_MAX_CLUSTERS, MAX_CLUSTERS_ENV};
pub use template::NO_TEMPLATE_ENV;
pub use tls::SERVER_CERT_NAMES;

/// Re-exported so users' tests name the same driver version as the clients the testkit returns.
pub use tokio_postgres;

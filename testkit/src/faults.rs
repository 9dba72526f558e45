//! Fault injection and waiting: the node operations of [`LocalCluster`].

use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::bins;
use crate::cluster::connect;
use crate::process::{children_of, postmaster_pid, running_postmaster, ProcId};
use crate::{Error, LocalCluster, Node};

/// How long the fault operations wait for their effect before [`Error::Timeout`].
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Between two polls of a condition.
const POLL: Duration = Duration::from_millis(20);

/// After SIGKILL of a postmaster, how long its children get to notice and exit on their own.
const CHILD_GRACE: Duration = Duration::from_millis(500);

/// Polls a condition on one node, reconnecting as superuser whenever the connection fails.
struct Probe<'a> {
    /// The node.
    node: &'a Node,
    /// The awaited condition, for the timeout error.
    what: String,
    /// When to give up.
    deadline: Instant,
    /// The timeout, for the error.
    timeout: Duration,
    /// The current connection, if any.
    client: Option<Client>,
    /// The last error seen, for the timeout error.
    last_error: Option<String>,
}

impl<'a> Probe<'a> {
    /// Starts polling `what` on `node` for at most `timeout`.
    fn new(node: &'a Node, what: impl Into<String>, timeout: Duration) -> Self {
        Self {
            node,
            what: what.into(),
            deadline: Instant::now() + timeout,
            timeout,
            client: None,
            last_error: None,
        }
    }

    /// One attempt at `sql`; `None` (noted for the timeout error) on any failure.
    async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Option<Row> {
        if self.client.is_none() {
            match connect(
                &self.node.superuser_url(),
                self.node.name(),
                "connecting as superuser",
            )
            .await
            {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    self.last_error = Some(e.to_string());
                    return None;
                }
            }
        }
        let client = self.client.as_ref()?;
        match client.query_one(sql, params).await {
            Ok(row) => Some(row),
            Err(e) => {
                self.last_error = Some(e.to_string());
                if client.is_closed() {
                    self.client = None;
                }
                None
            }
        }
    }

    /// Sleeps one poll interval, or fails with [`Error::Timeout`] past the deadline.
    async fn tick(&mut self) -> Result<(), Error> {
        if Instant::now() >= self.deadline {
            return Err(Error::Timeout {
                node: self.node.name().to_owned(),
                what: std::mem::take(&mut self.what),
                after: self.timeout,
                last_error: self.last_error.take(),
            });
        }
        tokio::time::sleep(POLL).await;
        Ok(())
    }

    /// Polls `sql` (one boolean column) until it is true.
    async fn until_true(mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), Error> {
        loop {
            if let Some(row) = self.query_one(sql, params).await {
                match row.try_get::<_, Option<bool>>(0) {
                    Ok(Some(true)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => self.last_error = Some(e.to_string()),
                }
            }
            self.tick().await?;
        }
    }
}

impl LocalCluster {
    /// Runs one statement as superuser on `node`.
    async fn exec(&self, node: &Node, sql: &str) -> Result<(), Error> {
        let client = self.superuser_client(node).await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|e| Error::pg(node.name(), sql, e))
    }

    /// Pauses WAL replay on `replica` (`pg_wal_replay_pause()`) and waits until
    /// `pg_get_wal_replay_pause_state()` is `'paused'`. WAL keeps arriving; it is not applied.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`] (e.g. the node is not in recovery), [`Error::Timeout`] after 60 s.
    pub async fn pause_replay(&self, replica: &Node) -> Result<(), Error> {
        self.exec(replica, "SELECT pg_wal_replay_pause()").await?;
        Probe::new(replica, "replay to pause", OP_TIMEOUT)
            .until_true("SELECT pg_get_wal_replay_pause_state() = 'paused'", &[])
            .await
    }

    /// Resumes WAL replay on `replica` (`pg_wal_replay_resume()`).
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn resume_replay(&self, replica: &Node) -> Result<(), Error> {
        self.exec(replica, "SELECT pg_wal_replay_resume()").await
    }

    /// Sets `recovery_min_apply_delay` on `replica` (`ALTER SYSTEM` + `pg_reload_conf()`), rounded
    /// to milliseconds; `Duration::ZERO` resets it. Returns once the server has loaded the new value.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`], [`Error::Timeout`] after 60 s.
    pub async fn set_apply_delay(&self, replica: &Node, d: Duration) -> Result<(), Error> {
        let ms = d.as_millis();
        let sql = if ms == 0 {
            "ALTER SYSTEM RESET recovery_min_apply_delay".to_owned()
        } else {
            format!("ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'")
        };
        self.exec(replica, &sql).await?;
        self.exec(replica, "SELECT pg_reload_conf()").await?;
        // New backends read the reloaded file only after the postmaster has processed SIGHUP.
        let expected = ms.to_string();
        Probe::new(
            replica,
            format!("recovery_min_apply_delay = {ms}ms to load"),
            OP_TIMEOUT,
        )
        .until_true(
            "SELECT setting = $1 FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            &[&expected],
        )
        .await
    }

    /// Stops `node` with `pg_ctl stop -m fast` and waits for it to be down.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] (e.g. the node is not running).
    pub async fn stop(&self, node: &Node) -> Result<(), Error> {
        let mut cmd = self.ctx.command("pg_ctl");
        cmd.args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(node.data_dir());
        bins::run(
            cmd,
            &format!("{}: pg_ctl stop", node.name()),
            Some(node.log_file()),
        )
        .await?;
        Ok(())
    }

    /// Restarts `node` with `pg_ctl restart -m fast` and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// [`Error::Command`] with the server log's tail.
    pub async fn restart(&self, node: &Node) -> Result<(), Error> {
        let mut cmd = self.ctx.command("pg_ctl");
        cmd.args(["restart", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(node.data_dir())
            .arg("-l")
            .arg(node.log_file());
        bins::run(
            cmd,
            &format!("{}: pg_ctl restart", node.name()),
            Some(node.log_file()),
        )
        .await?;
        Ok(())
    }

    /// Crashes `node`: SIGKILL to its postmaster (SIGSTOPped first, so that no child is forked
    /// behind our back while we list its children), then waits until the postmaster and all its
    /// children are dead (children that do not exit on their own within 500 ms of noticing the
    /// dead postmaster get SIGKILL too). "Dead" means gone from `/proc` or a zombie (state `Z`)
    /// awaiting its reaper: on return, `/proc/<pid>` may still exist for a moment, or for good
    /// where nothing reaps orphans. The postmaster is the pid in `postmaster.pid`, and only if
    /// its command line names the node's data dir (never a process that reused a stale pid).
    /// [`start`](Self::start) works afterwards (crash recovery runs).
    ///
    /// # Errors
    ///
    /// [`Error::State`] if the node is not running, [`Error::Timeout`] if the processes do not
    /// disappear within 60 s.
    pub async fn kill9(&self, node: &Node) -> Result<(), Error> {
        let postmaster = running_postmaster(node.data_dir()).ok_or_else(|| Error::State {
            node: node.name().to_owned(),
            what: "kill9: the node is not running (no live postmaster of its data dir in postmaster.pid)"
                .to_owned(),
        })?;
        // Freeze it first, so it forks no child after we list them: a backend we missed would
        // keep the old shared memory attached, and the next start would refuse to run.
        postmaster.signal(Signal::STOP);
        let frozen_by = Instant::now() + Duration::from_secs(2);
        while !postmaster.is_stopped() && postmaster.is_running() && Instant::now() < frozen_by {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let children = children_of(postmaster.pid);
        tracing::debug!(
            target: "pgfleet_testkit::faults",
            node = node.name(), pid = postmaster.pid, children = children.len(), "SIGKILL postmaster"
        );
        postmaster.signal(Signal::KILL);
        let killed_at = Instant::now();
        let deadline = killed_at + OP_TIMEOUT;
        loop {
            // A zombie counts as dead: it has released its memory (so the old shared memory
            // segment is detached) and only waits for a reaper, which in a container may never
            // come. `start` removes the stale lock files a zombie pid would otherwise keep valid.
            let live_children: Vec<&ProcId> = children.iter().filter(|c| c.is_running()).collect();
            if !postmaster.is_running() && live_children.is_empty() {
                return Ok(());
            }
            if killed_at.elapsed() >= CHILD_GRACE {
                for c in &live_children {
                    c.signal(Signal::KILL);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    node: node.name().to_owned(),
                    what: "the killed postmaster and its children to disappear".to_owned(),
                    after: OP_TIMEOUT,
                    last_error: None,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts a stopped or killed `node` with `pg_ctl start -w`. After [`kill9`](Self::kill9) a stale
    /// `postmaster.pid` (and socket lock file) is removed first, but only once its pid is really dead.
    ///
    /// # Errors
    ///
    /// [`Error::State`] if the node is running, [`Error::Command`] with the server log's tail.
    pub async fn start(&self, node: &Node) -> Result<(), Error> {
        // Running, and really this node's postmaster (not a reused pid).
        if let Some(p) = running_postmaster(node.data_dir()) {
            return Err(Error::State {
                node: node.name().to_owned(),
                what: format!("start: already running (postmaster pid {})", p.pid),
            });
        }
        if postmaster_pid(node.data_dir()).is_some() {
            // Dead: a zombie still answers kill(pid, 0), so postgres would refuse these
            // files; a gone pid could be reused by then. Either way they are stale.
            for f in [
                node.data_dir().join("postmaster.pid"),
                self.ctx.dir.join(format!(".s.PGSQL.{}.lock", node.port())),
            ] {
                match std::fs::remove_file(&f) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("removing stale {}", f.display()), e)),
                }
            }
        }
        self.ctx
            .pg_ctl_start(node.name(), node.data_dir(), node.log_file())
            .await
    }

    /// Promotes `replica` with `pg_ctl promote -w` and waits until `pg_is_in_recovery()` is false.
    ///
    /// # Errors
    ///
    /// [`Error::Command`], [`Error::Timeout`] after 60 s.
    pub async fn promote(&self, replica: &Node) -> Result<(), Error> {
        let mut cmd = self.ctx.command("pg_ctl");
        cmd.args(["promote", "-w", "-t", "60", "-D"])
            .arg(replica.data_dir());
        bins::run(
            cmd,
            &format!("{}: pg_ctl promote", replica.name()),
            Some(replica.log_file()),
        )
        .await?;
        Probe::new(
            replica,
            "promotion (pg_is_in_recovery() = false)",
            OP_TIMEOUT,
        )
        .until_true("SELECT NOT pg_is_in_recovery()", &[])
        .await
    }

    /// Waits until `replica`'s WAL receiver streams (`pg_stat_wal_receiver.status = 'streaming'`).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`].
    pub async fn wait_streaming(&self, replica: &Node, timeout: Duration) -> Result<(), Error> {
        Probe::new(replica, "the WAL receiver to stream", timeout)
            .until_true(
                "SELECT coalesce(bool_or(status = 'streaming'), false) FROM pg_stat_wal_receiver",
                &[],
            )
            .await
    }

    /// Waits until `replica` has replayed WAL up to `lsn_text` (e.g. `"0/3000148"`), compared by the
    /// server: `pg_last_wal_replay_lsn() >= $1::pg_lsn`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] (also when `lsn_text` is not an LSN; the timeout error then says so).
    pub async fn wait_replayed(
        &self,
        replica: &Node,
        lsn_text: &str,
        timeout: Duration,
    ) -> Result<(), Error> {
        Probe::new(replica, format!("replay to reach {lsn_text}"), timeout)
            .until_true(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn_text],
            )
            .await
    }

    /// `node`'s current WAL write position (`pg_current_wal_lsn()`, so `node` must be a primary)
    /// as text, e.g. `"0/3000148"`, for [`wait_replayed`](Self::wait_replayed).
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn current_wal_lsn(&self, node: &Node) -> Result<String, Error> {
        let client = self.superuser_client(node).await?;
        let sql = "SELECT pg_current_wal_lsn()::text";
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| Error::pg(node.name(), sql, e))?;
        row.try_get(0).map_err(|e| Error::pg(node.name(), sql, e))
    }

    /// Waits until every replica has replayed the primary's current WAL position.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`], [`Error::Timeout`].
    pub async fn wait_all_replayed(&self, timeout: Duration) -> Result<(), Error> {
        let lsn = self.current_wal_lsn(self.primary()).await?;
        for replica in self.replicas() {
            self.wait_replayed(replica, &lsn, timeout).await?;
        }
        Ok(())
    }
}

//! Making a restarted standby come back older than it was (DESIGN §3 pitfall 5) on purpose,
//! not by luck. Shared by the chaos checker (scenario `standby_older`) and
//! `tests/restarted_standby_older.rs`.
//!
//! A standby killed with `kill -9` replays its WAL again from its last restartpoint when it
//! is started, and opens for connections once it is consistent: at its minRecoveryPoint,
//! which any data page written during recovery advances to the replay position of that
//! moment. It comes back older than it was only if it opens before replaying past a write
//! it had already shown. Two things make that certain:
//!
//! - [`keep_consistency_early`]: recovery writes no data page (no background writer, no
//!   timed restartpoint), so minRecoveryPoint stays behind the write;
//! - [`hold_replay`]: an apply delay, set just before the kill, that holds the write's
//!   commit record back once the restarted standby is consistent (PostgreSQL applies no
//!   delay before consistency, so the standby still opens). [`release_replay`] lets it go.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::{Duration, Instant};

use pgfleet::{Lsn, Token};
use pgfleet_testkit::tokio_postgres::Client;
use pgfleet_testkit::{ClusterBuilder, LocalCluster, Node};

/// Replica settings that keep minRecoveryPoint where the last start left it: the
/// background writer writes no page (`bgwriter_lru_maxpages = 0`) and no timed
/// restartpoint runs (`checkpoint_timeout = 1d`). Backends evict no dirty page as long as
/// the data fits in `shared_buffers` (32 MB), and no restartpoint is requested before
/// `max_wal_size` (1 GB) of WAL: far more than a test writes.
pub fn keep_consistency_early(b: ClusterBuilder) -> ClusterBuilder {
    b.replica_setting("bgwriter_lru_maxpages", "0")
        .replica_setting("checkpoint_timeout", "1d")
}

/// Sets `recovery_min_apply_delay` on `replica` so that a commit made at `committed_at` is
/// applied no earlier than `hold` from now (the delay counts from the commit's timestamp).
/// Returns the delay set. Call it before the kill: the setting survives the restart.
///
/// # Errors
///
/// The testkit's, if the setting cannot be changed.
pub async fn hold_replay(
    cluster: &LocalCluster,
    replica: &Node,
    committed_at: Instant,
    hold: Duration,
) -> anyhow::Result<Duration> {
    let delay = committed_at.elapsed() + hold;
    cluster.set_apply_delay(replica, delay).await?;
    Ok(delay)
}

/// Removes the apply delay [`hold_replay`] set: replay resumes at once.
///
/// # Errors
///
/// The testkit's, if the setting cannot be changed.
pub async fn release_replay(cluster: &LocalCluster, replica: &Node) -> anyhow::Result<()> {
    cluster.set_apply_delay(replica, Duration::ZERO).await?;
    Ok(())
}

/// The replay LSN of the standby `client` is connected to.
///
/// # Errors
///
/// The query's.
pub async fn replay_lsn(client: &Client) -> anyhow::Result<Lsn> {
    Ok(client
        .query_one("SELECT pg_last_wal_replay_lsn()", &[])
        .await?
        .try_get(0)?)
}

/// Where a restarted standby's replay stood against a write token.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    /// Right after it accepted connections again.
    pub at_start: Lsn,
    /// The token of the write it had shown before the kill.
    pub token: Lsn,
}

impl Replay {
    /// It came back older than the write: the hazard happened.
    pub fn older(&self) -> bool {
        self.at_start < self.token
    }
}

/// Reads the replay LSN of `replica` (just started) and compares it with `token`.
///
/// # Errors
///
/// Connecting or querying fails.
pub async fn replay_at_start(
    cluster: &LocalCluster,
    replica: &Node,
    token: &Token,
) -> anyhow::Result<(Client, Replay)> {
    let su = cluster.superuser_client(replica).await?;
    let at_start = replay_lsn(&su).await?;
    Ok((
        su,
        Replay {
            at_start,
            token: token.lsn(),
        },
    ))
}

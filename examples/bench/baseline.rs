//! The read-your-writes policies pgfleet replaces, written as faithful baselines on bare
//! deadpool pools (no pgfleet code): each takes its own write token and does its own LSN
//! checks.
//!
//! - **poll** (the Go `ds` library): after the write, check every replica's replay LSN
//!   every 50 ms for up to 300 ms and read on the first one that has the write, else on
//!   the primary;
//! - **pick-one** (the Go LSN resolver): the balancer picks one replica (round robin), it
//!   is checked once; read there if it has the write, else on the primary;
//! - **time window** (Rails-style stickiness): a session reads on the primary for 2 s
//!   after its last write, on a replica (round robin, no check) otherwise.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tokio_postgres::types::Type;

/// Poll: the interval between two rounds of checks.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Poll: how long it keeps checking before it gives up and reads on the primary.
const POLL_FOR: Duration = Duration::from_millis(300);
/// Time window: how long a session sticks to the primary after a write.
const WINDOW: Duration = Duration::from_secs(2);

/// One LSN check, one round trip on the candidate connection itself (which is then used
/// for the read when it passes).
const CHECK_SQL: &str = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";
/// The baselines' write token: the insert position after COMMIT, on the write connection.
const TOKEN_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

pub(crate) use pgfleet_testkit::bare::BarePool;
pub(crate) type BareConn = deadpool::managed::Object<pgfleet_testkit::bare::BareManager>;

/// A bare pool of `size` connections to `url`.
pub(crate) fn pool(url: &str, size: usize) -> Result<BarePool> {
    pgfleet_testkit::bare::bare_pool(url, size).map_err(|e| anyhow!("building a bare pool: {e}"))
}

/// A connection from a bare pool.
pub(crate) async fn get(pool: &BarePool) -> Result<BareConn> {
    pool.get().await.map_err(|e| anyhow!("bare pool: {e}"))
}

/// Opens every connection of `pool` (holds `size` of them at once).
pub(crate) async fn warm(pool: &BarePool, size: usize) -> Result<()> {
    let held = futures_util::future::join_all((0..size).map(|_| get(pool))).await;
    for c in held {
        drop(c?);
    }
    Ok(())
}

/// The baseline policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    Poll,
    PickOne,
    Window,
}

impl Policy {
    pub(crate) const ALL: [Policy; 3] = [Policy::Poll, Policy::PickOne, Policy::Window];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Policy::Poll => "poll",
            Policy::PickOne => "pick-one",
            Policy::Window => "time window",
        }
    }
}

/// A connection for a read, and how it was found.
pub(crate) struct Acquired {
    pub(crate) conn: BareConn,
    /// The replica (index into `replicas`) it is on; `None` for the primary.
    pub(crate) replica: Option<usize>,
    /// LSN checks sent to replicas for this read.
    pub(crate) checks: u32,
}

/// Bare pools on every server, as an application without pgfleet would have them.
pub(crate) struct Baseline {
    /// Writes.
    pub(crate) primary: BarePool,
    /// Reads that go to the primary (pgfleet also keeps a separate read pool there).
    pub(crate) primary_read: BarePool,
    pub(crate) replicas: Vec<BarePool>,
    /// The balancer's round-robin counter.
    rr: AtomicUsize,
}

impl Baseline {
    pub(crate) fn new(primary: BarePool, primary_read: BarePool, replicas: Vec<BarePool>) -> Self {
        Baseline {
            primary,
            primary_read,
            replicas,
            rr: AtomicUsize::new(0),
        }
    }

    /// Updates row `k`; returns the new value and the write token (the insert LSN after
    /// commit, taken on the same connection, outside any transaction).
    pub(crate) async fn write(&self, k: i32) -> Result<(i64, String)> {
        let c = get(&self.primary).await?;
        let v: i64 = c
            .query_typed_one(crate::WRITE_SQL, &[(&k, Type::INT4)])
            .await?
            .try_get(0)?;
        let lsn: String = c.query_typed_one(TOKEN_SQL, &[]).await?.try_get(0)?;
        Ok((v, lsn))
    }

    /// A connection for a read after the write at `lsn`, made at `last_write`.
    pub(crate) async fn acquire(
        &self,
        policy: Policy,
        lsn: &str,
        last_write: Instant,
    ) -> Result<Acquired> {
        let start = Instant::now();
        let n = self.replicas.len();
        let mut checks = 0;
        match policy {
            Policy::Poll => {
                // Start the rounds at a rotating replica so the load spreads.
                let first = self.rr.fetch_add(1, Ordering::Relaxed);
                let mut round = 0;
                loop {
                    for j in 0..n {
                        let i = (first + j) % n;
                        let c = get(&self.replicas[i]).await?;
                        checks += 1;
                        if replayed(&c, lsn).await? {
                            return Ok(Acquired {
                                conn: c,
                                replica: Some(i),
                                checks,
                            });
                        }
                    }
                    round += 1;
                    let next = start + POLL_EVERY * round;
                    if next > start + POLL_FOR {
                        break;
                    }
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            Policy::PickOne => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % n;
                let c = get(&self.replicas[i]).await?;
                checks += 1;
                if replayed(&c, lsn).await? {
                    return Ok(Acquired {
                        conn: c,
                        replica: Some(i),
                        checks,
                    });
                }
            }
            Policy::Window => {
                if last_write.elapsed() >= WINDOW {
                    let i = self.rr.fetch_add(1, Ordering::Relaxed) % n;
                    return Ok(Acquired {
                        conn: get(&self.replicas[i]).await?,
                        replica: Some(i),
                        checks,
                    });
                }
            }
        }
        Ok(Acquired {
            conn: get(&self.primary_read).await?,
            replica: None,
            checks,
        })
    }
}

/// Whether the server behind `c` has replayed `lsn`.
async fn replayed(c: &tokio_postgres::Client, lsn: &str) -> Result<bool> {
    let row = c.query_typed_one(CHECK_SQL, &[(&lsn, Type::TEXT)]).await?;
    Ok(row.try_get::<_, Option<bool>>(0)?.unwrap_or(false))
}

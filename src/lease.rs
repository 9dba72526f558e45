//! [`Lease`]: a pooled connection on the server the router chose, returned on drop.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::conn::{describe, Pooled};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::router::RouterMsg;
use crate::session::SessionInner;
use crate::shared::Shared;
use crate::token::{Token, TokenError};
use crate::topology::Role;

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Intent {
    /// Writes (and anything else) on the primary.
    Write,
    /// Reads with the given consistency.
    Read(Consistency),
}

impl Intent {
    /// A read with the configured default consistency (`consistency.default_read`).
    pub const fn read() -> Intent {
        Intent::Read(Consistency::Default)
    }

    /// A read that must see the write behind `token` (read-your-writes).
    pub const fn read_after(token: &Token) -> Intent {
        Intent::Read(Consistency::AfterLsn(*token))
    }
}

/// How fresh a read must be. See the crate docs for the full table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Consistency {
    /// `consistency.default_read` from the config (eventual unless set to strong).
    Default,
    /// On the primary: sees every committed write.
    Strong,
    /// A healthy replica within `max_lag_bytes` and `max_lag`, else the fallback.
    Eventual,
    /// A healthy replica whose time lag is at most this, else the fallback.
    MaxStaleness(Duration),
    /// A replica that has replayed the token's position; waits up to `ryw_wait` for one,
    /// else the fallback.
    AfterLsn(Token),
}

/// A connection leased from the fleet.
///
/// Derefs (mutably) to a [`tokio_postgres::Client`], so queries, prepared statements
/// and transactions work as usual. Dropping it returns the connection to its server's
/// pool; a connection released inside an open transaction is rolled back before any
/// other lease gets it.
#[must_use = "a lease holds a pooled connection until dropped"]
pub struct Lease {
    pub(crate) conn: Option<Pooled>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) idx: usize,
    pub(crate) role: Role,
    pub(crate) fallback: bool,
    pub(crate) intent: Intent,
    pub(crate) session: Option<Arc<SessionInner>>,
    pub(crate) ignored_token: Option<TokenError>,
    pub(crate) waited: Duration,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("server", &self.server())
            .field("role", &self.role)
            .field("fallback", &self.fallback)
            .field("intent", &self.intent)
            .finish()
    }
}

impl Lease {
    /// The name of the server serving this lease.
    pub fn server(&self) -> &str {
        &self.shared.slots[self.idx].name
    }

    /// The server's role when the lease was granted.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether a read that wanted a replica was served by the primary instead.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// What the lease was asked for.
    pub fn intent(&self) -> Intent {
        self.intent
    }

    /// A token the read carried that was not ours (another cluster) and so was ignored.
    pub fn ignored_token(&self) -> Option<&TokenError> {
        self.ignored_token.as_ref()
    }

    /// How long the lease took to grant: routing, waiting for a replica to catch up, and
    /// the pool checkout — which includes opening a connection when the pool has no idle
    /// one (tens of milliseconds with SCRAM authentication).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The client. Same as deref.
    pub fn client(&self) -> &Client {
        self
    }

    /// Classifies an error from a query run on this lease (recovery conflicts, read-only
    /// refusals, `SERIALIZABLE` on a standby get their own variants).
    pub fn error(&self, e: tokio_postgres::Error) -> Error {
        Error::classify(self.server().to_owned(), Some(self.role()), e)
    }

    /// The position of everything this connection has committed so far: take it after
    /// `COMMIT` (or after an autocommit statement) and pass it to
    /// [`Intent::read_after`] to read the write back from a replica.
    ///
    /// It is `pg_current_wal_insert_lsn()` read on this connection after the commit
    /// (never the flush position, which can be behind the commit with
    /// `synchronous_commit = off`), normalised down to a page boundary when it points just
    /// past a page header. In a session lease it also advances the session.
    ///
    /// # Errors
    ///
    /// [`Error::OpenTransaction`] inside a transaction that has written (nothing is
    /// committed yet); [`Error::ReadOnly`] on a standby; [`Error::Postgres`] if the query
    /// fails.
    pub async fn commit_token(&mut self) -> Result<Token, Error> {
        const SQL: &str = "SELECT l, pg_current_xact_id_if_assigned() IS NOT NULL, \
            ('x' || substr(pg_walfile_name(l), 1, 8))::bit(32)::int8, \
            current_setting('wal_block_size'), pg_size_bytes(current_setting('wal_segment_size')), \
            (SELECT system_identifier FROM pg_control_system()) \
            FROM pg_current_wal_insert_lsn() AS l";
        let sent = Instant::now();
        let msgs = self
            .client()
            .simple_query(SQL)
            .await
            .map_err(|e| self.error(e))?;
        let row = msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| Error::Internal("commit_token query returned no row".into()))?;
        let field = |i: usize| row.get(i).unwrap_or_default();
        if field(1) == "t" {
            return Err(Error::OpenTransaction);
        }
        let bad = |what: &str| Error::Internal(format!("commit_token: bad {what} from server"));
        let lsn: Lsn = field(0).parse().map_err(|_| bad("LSN"))?;
        let timeline: u32 = field(2).parse().map_err(|_| bad("timeline"))?;
        let block: u64 = field(3).parse().map_err(|_| bad("wal_block_size"))?;
        let segment: u64 = field(4).parse().map_err(|_| bad("wal_segment_size"))?;
        let system_id = field(5)
            .parse::<i64>()
            .map_err(|_| bad("system identifier"))? as u64;
        let lsn = lsn.normalize_page_boundary(block, segment);
        let token = Token::new(system_id, timeline, lsn);
        if let Some(r) = self.shared.router.load().as_ref() {
            let _ = r.cast(RouterMsg::Committed(lsn, sent));
        }
        if let Some(s) = &self.session {
            s.advance(token);
        }
        Ok(token)
    }
}

impl Deref for Lease {
    type Target = Client;

    fn deref(&self) -> &Client {
        match &self.conn {
            Some(c) => &c.client,
            // The connection is only taken in Drop.
            None => unreachable!("lease used after release"),
        }
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Client {
        match &mut self.conn {
            Some(c) => &mut c.client,
            None => unreachable!("lease used after release"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = &self.shared.slots[self.idx];
        if let Some(c) = &self.conn {
            if c.state.take_read_only_refusal() {
                // A write hit a read-only server: its role may have changed.
                slot.probe_now();
            }
        }
        if let Some(session) = self.session.take() {
            if let Some(conn) = self.conn.take() {
                session.release_started();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let shared = self.shared.clone();
                        let idx = self.idx;
                        rt.spawn(async move {
                            let seen = upper_bound(&shared, idx, conn).await;
                            session.release_finished(seen);
                            finish_release(&shared, idx);
                        });
                        return;
                    }
                    Err(_) => session.release_finished(None),
                }
            }
        }
        // Back to the pool, dropped in place (the connection is not moved on the way).
        self.conn = None;
        finish_release(&self.shared, self.idx);
    }
}

fn finish_release(shared: &Shared, idx: usize) {
    shared.slots[idx].in_flight.fetch_sub(1, Ordering::AcqRel);
    if shared.is_shutting_down() {
        shared.drained.notify_waiters();
    }
}

/// An upper bound of what the released lease may have seen: the server's replay (or
/// insert) position read on the same connection after its last query.
async fn upper_bound(shared: &Shared, idx: usize, conn: Pooled) -> Option<Token> {
    const SQL: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
        ELSE pg_current_wal_insert_lsn() END";
    let work = async {
        // The last reply's ReadyForQuery may still be in flight.
        conn.state.settle(shared.query_timeout()).await;
        if conn.state.is_closed() {
            // The server went away: it owes no reply, and nothing can be read here.
            return Ok(Vec::new());
        }
        if !conn.state.is_idle() {
            conn.client.batch_execute("ROLLBACK").await?;
        }
        conn.client.simple_query(SQL).await
    };
    let msgs = match tokio::time::timeout(shared.query_timeout(), work).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::debug!(target: "pgfleet::session", error = %describe(&e), "release position query failed");
            return None;
        }
        Err(_) => return None,
    };
    let text = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })?;
    let mut lsn: Lsn = text.parse().ok()?;
    let topo = shared.topology.load();
    let view = topo.servers.get(idx)?;
    if let Some((block, segment)) = view.wal_sizes {
        // A primary idle on a page boundary: replicas stop at the boundary (pitfall 3).
        lsn = lsn.normalize_page_boundary(block, segment);
    }
    let timeline = view
        .timeline
        .or_else(|| topo.primary_index().and_then(|p| topo.servers[p].timeline))?;
    Some(Token::new(topo.system_id?, timeline, lsn))
}

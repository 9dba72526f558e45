//! [`Session`]: read-your-writes and monotonic reads for one logical user or request
//! chain, by carrying a high-water mark between leases.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::error::Error;
use crate::fleet::ClusterCell;
use crate::lease::{Consistency, Intent, Lease};
use crate::token::Token;

/// Tracks what a session has written and seen, so its reads never go back in time.
///
/// Its high-water mark is the max of its own commit tokens and an **upper bound** of what
/// each of its reads may have seen: the server's replay position read on the same
/// connection after the lease's last query (at release). Every read through the session
/// is then served by a server that has replayed at least that mark (or by the primary).
/// The router's cached position at lease time is only a lower bound and is never used.
///
/// Releasing a session lease costs one short query on its connection, run after the
/// lease is dropped; the session's next lease waits for it.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
    /// The cluster; each lease uses its current generation.
    pub(crate) cell: Arc<ClusterCell>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token())
            .finish()
    }
}

#[derive(Debug, Default)]
pub(crate) struct SessionInner {
    /// The high-water mark.
    mark: Mutex<Option<Token>>,
    /// Releases still reading their upper bound.
    pending: AtomicUsize,
    /// Woken when a release finishes.
    released: Notify,
    /// Set when a release could not read its bound: the next read goes to the primary.
    unknown: AtomicBool,
}

impl SessionInner {
    /// Raises the mark to at least `t`.
    pub(crate) fn advance(&self, t: Token) {
        if let Ok(mut m) = self.mark.lock() {
            *m = Some(match *m {
                Some(old) if old.system_id() == t.system_id() => old.max(t),
                _ => t,
            });
        }
    }

    pub(crate) fn release_started(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn release_finished(&self, seen: Option<Token>) {
        match seen {
            Some(t) => self.advance(t),
            None => self.unknown.store(true, Ordering::Release),
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.released.notify_waiters();
    }

    pub(crate) fn mark(&self) -> Option<Token> {
        self.mark.lock().ok().and_then(|m| *m)
    }
}

impl Session {
    /// The session's high-water mark: hand it to a later request (a cookie, a header)
    /// and resume with [`crate::Fleet::session_from`].
    pub fn token(&self) -> Option<Token> {
        self.inner.mark()
    }

    /// The high-water mark once every lease released so far has reported what it may
    /// have seen (each release reads its server's position on its connection, after the
    /// lease is dropped); waits at most `fleet.lease_timeout` for those. This, not
    /// [`Session::token`], is the token to hand to a later request.
    ///
    /// When a release could not read its bound (its connection broke), the mark alone
    /// would understate what the session saw, and a later request resuming from it could
    /// read back in time. The bound is then the primary's position from a fresh probe
    /// (no replica has replayed past it), waited for at most twice `fleet.probe_timeout`;
    /// without one (no primary), the mark is returned as it is and this session's next
    /// read still goes to the primary.
    pub async fn settled_token(&self) -> Option<Token> {
        self.wait_released().await;
        // Taken, not read: a release failing meanwhile sets it again.
        if self.inner.unknown.swap(false, Ordering::AcqRel) {
            let shared = self.cell.current.load_full();
            let deadline = Instant::now() + shared.config.fleet.probe_timeout * 2;
            match crate::verify::fresh_primary_bound(&shared, deadline).await {
                Some(bound) => self.inner.advance(bound),
                None => self.inner.unknown.store(true, Ordering::Release),
            }
        }
        self.token()
    }

    /// Waits (at most `lease_timeout`) until no release is still reading its upper
    /// bound; on timeout, the next read goes to the primary.
    async fn wait_released(&self) {
        let deadline = Instant::now() + self.cell.current.load().config.fleet.lease_timeout;
        loop {
            let notified = self.inner.released.notified();
            if self.inner.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                self.inner.unknown.store(true, Ordering::Release);
                return;
            }
        }
    }

    /// Raises the mark to include `token` (a write made elsewhere that this session must see).
    pub fn observe(&self, token: Token) {
        self.inner.advance(token);
    }

    /// Leases a connection for `intent` within this session: reads see the session's
    /// writes and never go back in time; writes advance the mark when released.
    ///
    /// A read is served by a server that has replayed the mark (for `AfterLsn`, the later
    /// of the mark and the token given) and still keeps its own bound: an `Eventual` read
    /// goes to a replica within `max_lag_bytes` and `max_lag` that has replayed the mark,
    /// a `MaxStaleness(d)` read to one within `d`, else to the fallback. `Default` follows
    /// `consistency.default_read`; `Strong` reads and writes go to the primary as usual.
    ///
    /// # Errors
    ///
    /// As [`crate::Fleet::lease`].
    pub async fn lease(&self, intent: Intent) -> Result<Lease, Error> {
        let shared = self.cell.current.load_full();
        // The previous lease's upper bound must be in the mark before routing.
        self.wait_released().await;
        // The mark joins the read's own need in `lease_on`: an eventual or bounded read
        // keeps its lag bound and must also have replayed the mark. Without a known
        // bound (a release could not read one), the next read goes to the primary.
        let intent = match intent {
            Intent::Read(c)
                if c != Consistency::Strong && self.inner.unknown.swap(false, Ordering::AcqRel) =>
            {
                Intent::Read(Consistency::Strong)
            }
            other => other,
        };
        crate::fleet::lease_on(shared, intent, Some(self.inner.clone())).await
    }
}

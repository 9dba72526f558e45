//! [`Fleet::verify_token`]: is a token one this cluster may have issued, judged against a
//! fresh primary position rather than the cached one.
//!
//! The published topology's primary position moves with probes and with this fleet's
//! own commit tokens, so it lags every write made elsewhere (another application
//! instance, another fleet, a plain client) and every session upper bound read on the
//! primary at release. A token ahead of it is therefore not judged forged until the
//! primary has been probed again.

use std::sync::Arc;
use std::time::Instant;

use crate::fleet::{check_token, Fleet};
use crate::lsn::Lsn;
use crate::shared::Shared;
use crate::token::{Token, TokenError};
use crate::topology::Topology;

const TARGET: &str = "pgfleet::verify";

/// What the topology says about a token's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judgement {
    /// At or behind the primary's position, or on an earlier timeline (whose switch
    /// point the lease path checks).
    Reached,
    /// Ahead of the primary `idx`'s known position `primary`.
    Ahead { idx: usize, primary: Lsn },
    /// No primary position is known (starting up, primary down): nothing to judge by.
    Unknown,
}

/// Judges `token` (already checked for system id and timeline) against `t`.
fn judge(t: &Topology, token: &Token) -> Judgement {
    let Some(idx) = t.primary_index() else {
        return Judgement::Unknown;
    };
    let Some(view) = t.servers.get(idx) else {
        return Judgement::Unknown;
    };
    if view.timeline.is_some_and(|tl| token.timeline() < tl) {
        return Judgement::Reached;
    }
    // The freshest of the probe's position and the commits this fleet recorded.
    let Some(primary) = view.lsn.max(t.primary_lsn) else {
        return Judgement::Unknown;
    };
    // A token taken just past a page header names the same position as the boundary
    // the primary's (normalised) probe reports.
    let theirs = match view.wal_sizes {
        Some((block, segment)) => token.lsn().normalize_page_boundary(block, segment),
        None => token.lsn(),
    };
    if theirs <= primary {
        Judgement::Reached
    } else {
        Judgement::Ahead { idx, primary }
    }
}

impl Fleet {
    /// Checks that `token` is one this cluster may have issued: its system identifier
    /// and timeline (as [`Fleet::check_token`]), and that its position is not ahead of
    /// the primary's.
    ///
    /// The cached primary position lags writes made outside this fleet, so a token ahead
    /// of it triggers a fresh probe of the primary, and this waits (on topology
    /// publications, not by sleeping) until the primary's position reaches the token, at
    /// most twice `fleet.probe_timeout` (a probe already in flight, then the fresh one).
    /// Only a token still ahead of a primary probe that started after this call is
    /// refused. When no primary position is known at all (starting up, primary down), or
    /// no fresh probe answers in time, the position cannot be judged and the token is
    /// accepted: reads carrying it are still served only by a server that has replayed
    /// it, or by the fallback.
    ///
    /// # Errors
    ///
    /// [`TokenError::ForeignSystem`], [`TokenError::UnknownTimeline`] as
    /// [`Fleet::check_token`]; [`TokenError::AheadOfPrimary`] for a position the primary
    /// has not reached.
    pub async fn verify_token(&self, token: &Token) -> Result<(), TokenError> {
        self.check_token(token)?;
        let shared = self.shared();
        let deadline = Instant::now() + shared.config.fleet.probe_timeout * 2;
        verify_position(&shared, token, deadline).await
    }
}

/// The position half of [`Fleet::verify_token`]: `Err` only when a primary probe that
/// started after this call still shows `token` ahead of the primary. Waits at most until
/// `deadline`; with no such probe by then (a slow or hung primary), the position cannot
/// be judged and the token passes. The lease path calls it, with the lease's deadline,
/// before a read carrying `token` falls back to the primary, so a forged position gets
/// a typed error instead of a read that pretends to follow it.
pub(crate) async fn verify_position(
    shared: &Arc<Shared>,
    token: &Token,
    deadline: Instant,
) -> Result<(), TokenError> {
    let idx = match judge(&shared.topology.load(), token) {
        Judgement::Reached | Judgement::Unknown => return Ok(()),
        Judgement::Ahead { idx, .. } => idx,
    };
    let began = Instant::now();
    if let Some(slot) = shared.slots.get(idx) {
        slot.probe_now();
    }
    loop {
        let notified = shared.changed.notified();
        let topology = shared.topology.load();
        check_token(&topology, token)?;
        match judge(&topology, token) {
            Judgement::Reached | Judgement::Unknown => {
                tracing::debug!(target: TARGET, %token, "token ahead of the cached primary position confirmed by a fresh probe");
                return Ok(());
            }
            Judgement::Ahead { idx, primary } => {
                let fresh = topology
                    .servers
                    .get(idx)
                    .and_then(|v| v.probed_at)
                    .is_some_and(|at| at >= began);
                if fresh {
                    tracing::debug!(target: TARGET, %token, %primary, "token ahead of the primary after a fresh probe");
                    return Err(TokenError::AheadOfPrimary {
                        primary,
                        theirs: token.lsn(),
                    });
                }
            }
        }
        drop(topology);
        if tokio::time::timeout_at(deadline.into(), notified)
            .await
            .is_err()
        {
            tracing::debug!(target: TARGET, %token, "no fresh primary probe in time: the token's position cannot be judged");
            return Ok(());
        }
    }
}

/// A fresh upper bound of everything any server of the cluster has shown so far: the
/// primary's position from a probe that started after this call (a replica's replay
/// position never passes its primary's). `None` when there is no primary, or no such
/// probe answers by `deadline`.
pub(crate) async fn fresh_primary_bound(shared: &Arc<Shared>, deadline: Instant) -> Option<Token> {
    let began = Instant::now();
    let idx = shared.topology.load().primary_index()?;
    shared.slots.get(idx)?.probe_now();
    loop {
        let notified = shared.changed.notified();
        {
            let topology = shared.topology.load();
            // The primary the probe was asked of, still primary, probed since `began`.
            if topology.primary_index() != Some(idx) {
                return None;
            }
            let view = topology.servers.get(idx)?;
            if view.probed_at.is_some_and(|at| at >= began) {
                return Some(Token::new(topology.system_id?, view.timeline?, view.lsn?));
            }
        }
        tokio::time::timeout_at(deadline.into(), notified)
            .await
            .ok()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{PrimaryState, Role};
    use std::time::Duration;

    fn topo(primary_lsn: Option<u64>, view_lsn: Option<u64>, timeline: u32) -> Topology {
        let mut t = Topology::initial(&[0, 1], 1 << 24, Duration::from_secs(5));
        t.primary = PrimaryState::Known(0);
        t.primary_lsn = primary_lsn.map(Lsn);
        t.system_id = Some(7);
        let v = &mut t.servers[0];
        v.role = Role::Primary;
        v.lsn = view_lsn.map(Lsn);
        v.timeline = Some(timeline);
        v.wal_sizes = Some((8192, 16 << 20));
        t
    }

    #[test]
    fn at_or_behind_is_reached_ahead_is_not() {
        let t = topo(Some(1000), Some(900), 2);
        assert_eq!(judge(&t, &Token::new(7, 2, Lsn(1000))), Judgement::Reached);
        assert_eq!(judge(&t, &Token::new(7, 2, Lsn(10))), Judgement::Reached);
        assert_eq!(
            judge(&t, &Token::new(7, 2, Lsn(1001))),
            Judgement::Ahead {
                idx: 0,
                primary: Lsn(1000)
            }
        );
        // The probe's position counts when it is the fresher one.
        let t = topo(Some(900), Some(1000), 2);
        assert_eq!(judge(&t, &Token::new(7, 2, Lsn(1000))), Judgement::Reached);
    }

    #[test]
    fn earlier_timeline_is_left_to_the_lease_path() {
        let t = topo(Some(1000), Some(1000), 2);
        assert_eq!(judge(&t, &Token::new(7, 1, Lsn(5000))), Judgement::Reached);
    }

    #[test]
    fn page_header_offset_is_the_boundary() {
        // Primary idle at a page boundary; a token 24 bytes past it is the same position.
        let boundary = 3 * 8192;
        let t = topo(Some(boundary), Some(boundary), 1);
        assert_eq!(
            judge(&t, &Token::new(7, 1, Lsn(boundary + 24))),
            Judgement::Reached
        );
    }

    #[test]
    fn no_primary_position_is_unknown() {
        let mut t = topo(None, None, 1);
        assert_eq!(judge(&t, &Token::new(7, 1, Lsn(1))), Judgement::Unknown);
        t.primary = PrimaryState::Missing;
        t.primary_lsn = Some(Lsn(1 << 40));
        assert_eq!(judge(&t, &Token::new(7, 1, Lsn(1))), Judgement::Unknown);
    }
}

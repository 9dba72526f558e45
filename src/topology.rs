//! The published topology snapshot and the pure routing logic over it: which servers
//! may serve a request, and which one of them to pick.
//!
//! The router actor builds a [`Topology`] after every change and swaps it into an
//! `ArcSwap`; every lease reads it without locks. Nothing here does I/O.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::Strategy;
use crate::lag::TimeLag;
use crate::lsn::Lsn;
use crate::token::Token;

/// The role a server plays, as its last probe showed (`pg_is_in_recovery()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// A hot standby replaying the primary's WAL.
    Replica,
    /// Not probed successfully yet.
    Unknown,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        })
    }
}

/// A server's health as the fleet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Its actor started and has not completed a probe yet.
    Starting,
    /// The last probe succeeded.
    Healthy,
    /// `failure_threshold` probes in a row failed; out of rotation.
    Unhealthy,
    /// Its actor failed and the supervisor will restart it after a backoff.
    Restarting,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Restarting => "restarting",
        })
    }
}

/// What the fleet knows about one server at one moment.
#[derive(Debug, Clone)]
pub(crate) struct ServerView {
    /// Role from the last probe.
    pub(crate) role: Role,
    /// Health from probes and supervision.
    pub(crate) health: Health,
    /// Replay position (standby) or insert position (primary) from a probe taken after
    /// the last event that voided it (restart, connection error); `None` while void.
    pub(crate) lsn: Option<Lsn>,
    /// Whether `lsn` comes from a probe started after the last void event (restart seen
    /// by a lease, connection error). Read-after-write and bounded-staleness reads need it.
    pub(crate) fresh: bool,
    /// The last probe failed (timed out, connection refused or lost) or a lease's
    /// checkout on it failed, and no probe has succeeded since: the server is still
    /// `Healthy` until `failure_threshold`, but new leases go elsewhere when they can,
    /// so a hung server stops taking leases after one `probe_timeout`, not after
    /// `failure_threshold` of them.
    pub(crate) suspect: bool,
    /// WAL received (standby), for display only: never used for routing.
    pub(crate) receive_lsn: Option<Lsn>,
    /// Bytes behind the primary (primary − replica), when both are known.
    pub(crate) lag_bytes: Option<u64>,
    /// Time behind the primary.
    pub(crate) lag: TimeLag,
    /// Timeline the server is on; unknown (standby without a WAL receiver) serves no
    /// read-after-write.
    pub(crate) timeline: Option<u32>,
    /// Whether WAL replay is paused.
    pub(crate) paused: bool,
    /// Whether the WAL receiver is streaming (standby).
    pub(crate) streaming: bool,
    /// `pg_postmaster_start_time()` (µs since epoch) of the probed server.
    pub(crate) postmaster_start_us: Option<i64>,
    /// Read weight in effect (slow start applied; 0 = not in read rotation).
    pub(crate) weight: u32,
    /// Round trip of the last probe.
    pub(crate) probe_latency: Option<Duration>,
    /// When the probe behind the last successful report started (a report from a probe
    /// started after some moment is news from after it).
    pub(crate) probed_at: Option<Instant>,
    /// Estimated replay rate, bytes per second (for catch-up estimates).
    pub(crate) replay_rate: Option<f64>,
    /// `wal_block_size` and `wal_segment_size`, for token normalisation.
    pub(crate) wal_sizes: Option<(u64, u64)>,
}

impl ServerView {
    /// A server nothing is known about yet.
    pub(crate) fn unknown(weight: u32) -> Self {
        ServerView {
            role: Role::Unknown,
            health: Health::Starting,
            lsn: None,
            fresh: false,
            suspect: false,
            receive_lsn: None,
            lag_bytes: None,
            lag: TimeLag::Unknown,
            timeline: None,
            paused: false,
            streaming: false,
            postmaster_start_us: None,
            weight,
            probe_latency: None,
            probed_at: None,
            replay_rate: None,
            wal_sizes: None,
        }
    }

    fn healthy(&self) -> bool {
        self.health == Health::Healthy
    }
}

/// Which server is the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrimaryState {
    /// Exactly one healthy server claims primary.
    Known(usize),
    /// None does.
    Missing,
    /// Two (or more) do: writes are refused.
    SplitBrain(usize, usize),
}

/// An immutable view of the whole cluster, published by the router.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    /// One view per configured server, in configuration order (primary entry first).
    pub(crate) servers: Vec<ServerView>,
    /// Who is primary.
    pub(crate) primary: PrimaryState,
    /// Last primary position seen (kept while the primary is unreachable).
    pub(crate) primary_lsn: Option<Lsn>,
    /// The cluster's system identifier, once a probe read it.
    pub(crate) system_id: Option<u64>,
    /// Read weight in effect per server (the selection function's input).
    pub(crate) weights: Vec<u32>,
    /// Smooth weighted round-robin order over servers with a read weight.
    pub(crate) rr_seq: Vec<u16>,
    /// Bytes of lag beyond which a replica serves no eventual reads.
    pub(crate) max_lag_bytes: u64,
    /// Time lag beyond which a replica serves no eventual reads.
    pub(crate) max_lag: Duration,
    /// Bumped on every publish.
    pub(crate) version: u64,
    /// Where each timeline began, as far as the fleet saw promotions: `(timeline,
    /// switch point)`, ascending.
    pub(crate) switches: Vec<(u32, Lsn)>,
}

/// What a read needs from the server that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadNeed {
    /// Within `max_lag_bytes` and `max_lag`.
    Eventual,
    /// Time lag at most this.
    MaxStaleness(Duration),
    /// Has replayed the token, and is as fresh as `Within` asks besides (a session's
    /// eventual or bounded read keeps its bound on top of the session's mark).
    After(Token, Within),
}

/// The lag bound a read-after-token keeps besides the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Within {
    /// None: the token alone (an explicit `AfterLsn` read).
    Any,
    /// `max_lag_bytes` and `max_lag`, as an eventual read.
    Eventual,
    /// Time lag at most this, as a bounded-staleness read.
    Staleness(Duration),
}

impl Topology {
    /// An empty topology for `weights.len()` servers.
    pub(crate) fn initial(weights: &[u32], max_lag_bytes: u64, max_lag: Duration) -> Self {
        Topology {
            servers: weights.iter().map(|&w| ServerView::unknown(w)).collect(),
            weights: weights.to_vec(),
            primary: PrimaryState::Missing,
            primary_lsn: None,
            system_id: None,
            rr_seq: smooth_rr_sequence(weights),
            max_lag_bytes,
            max_lag,
            version: 0,
            switches: Vec::new(),
        }
    }

    /// Whether server `i` may serve a read that needs `need` (fallback aside).
    pub(crate) fn can_serve(&self, i: usize, need: &ReadNeed) -> bool {
        let Some(s) = self.servers.get(i) else {
            return false;
        };
        if !s.healthy() || s.weight == 0 || s.suspect {
            return false;
        }
        match s.role {
            // A primary in read rotation is always fresh, but a token from another
            // timeline must still be checked against the timeline.
            Role::Primary => match need {
                ReadNeed::After(t, _) => {
                    self.primary == PrimaryState::Known(i) && s.timeline == Some(t.timeline())
                }
                _ => self.primary == PrimaryState::Known(i),
            },
            Role::Replica => match need {
                ReadNeed::Eventual => self.lag_within(s, Within::Eventual),
                ReadNeed::MaxStaleness(d) => s.fresh && s.lsn.is_some() && s.lag.within(*d),
                ReadNeed::After(t, within) => {
                    s.fresh
                        && s.timeline == Some(t.timeline())
                        && s.lsn.is_some_and(|l| l >= t.lsn())
                        && self.lag_within(s, *within)
                }
            },
            Role::Unknown => false,
        }
    }

    /// Whether replica view `s` is as fresh as `within` asks.
    fn lag_within(&self, s: &ServerView, within: Within) -> bool {
        match within {
            Within::Any => true,
            Within::Eventual => {
                s.lag_bytes.is_some_and(|b| b <= self.max_lag_bytes) && s.lag.within(self.max_lag)
            }
            Within::Staleness(d) => s.lag.within(d),
        }
    }

    /// The primary's current timeline, when a primary is known and probed.
    pub(crate) fn primary_timeline(&self) -> Option<u32> {
        self.primary_index().and_then(|p| self.servers[p].timeline)
    }

    /// The primary's index, if exactly one is known.
    pub(crate) fn primary_index(&self) -> Option<usize> {
        match self.primary {
            PrimaryState::Known(i) => Some(i),
            _ => None,
        }
    }
}

/// A token from an earlier timeline whose write may not be in the current history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaybeLost {
    /// The primary's timeline.
    pub(crate) current: u32,
}

/// Places `token` in the history of the primary's timeline `current` (DESIGN §3).
///
/// A token of the current timeline (or when no primary timeline is known) is used as
/// is. A token of an earlier timeline `t` names a write the current history holds only
/// if it is at or below the point where timeline `t + 1` branched off `t`; it is then
/// rebased onto the current timeline (LSNs continue across a switch, so a server on the
/// current timeline that replayed its position has the write). Above that point, or
/// when the fleet never saw that switch point, the write may be lost: never guessed.
pub(crate) fn place_token(
    current: Option<u32>,
    switches: &[(u32, Lsn)],
    token: &Token,
) -> Result<Token, MaybeLost> {
    let Some(current) = current else {
        return Ok(*token);
    };
    if token.timeline() >= current {
        return Ok(*token);
    }
    let branched = switches
        .iter()
        .find(|(t, _)| *t == token.timeline() + 1)
        .map(|(_, at)| *at);
    match branched {
        Some(at) if token.lsn() <= at => Ok(Token::new(token.system_id(), current, token.lsn())),
        _ => Err(MaybeLost { current }),
    }
}

/// Picks one server among those `eligible` says yes to, by `strategy`.
///
/// `weights[i]` is server i's read weight, `load(i)` its leases in flight, `rr_seq` the
/// smooth round-robin order and `rr` the shared round-robin counter. Allocation-free.
pub fn select(
    strategy: Strategy,
    weights: &[u32],
    rr_seq: &[u16],
    rr: &AtomicUsize,
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    match strategy {
        Strategy::RoundRobin if !rr_seq.is_empty() => {
            let start = rr.fetch_add(1, Ordering::Relaxed);
            (0..rr_seq.len())
                .map(|k| rr_seq[(start + k) % rr_seq.len()] as usize)
                .find(|&i| weights.get(i).is_some_and(|&w| w > 0) && eligible(i))
        }
        Strategy::LeastOutstanding => least_outstanding(weights, eligible, load),
        _ => weighted_random(weights, eligible),
    }
}

fn weighted_random(weights: &[u32], eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = (0..weights.len())
        .filter(|&i| weights[i] > 0 && eligible(i))
        .map(|i| u64::from(weights[i]))
        .sum();
    if total == 0 {
        return None;
    }
    let mut pick = fastrand::u64(..total);
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 || !eligible(i) {
            continue;
        }
        if pick < u64::from(w) {
            return Some(i);
        }
        pick -= u64::from(w);
    }
    None
}

/// Least `load / weight`; ties broken at random in proportion to weight, so an idle
/// fleet still spreads sequential leases by weight.
fn least_outstanding(
    weights: &[u32],
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    let mut best: Option<(usize, u64, u32)> = None;
    let mut tie_weight: u64 = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 || !eligible(i) {
            continue;
        }
        let l = load(i);
        match best {
            None => {
                best = Some((i, l, w));
                tie_weight = u64::from(w);
            }
            Some((_, bl, bw)) => {
                // l / w  vs  bl / bw, exactly.
                let lhs = u128::from(l) * u128::from(bw);
                let rhs = u128::from(bl) * u128::from(w);
                if lhs < rhs {
                    best = Some((i, l, w));
                    tie_weight = u64::from(w);
                } else if lhs == rhs {
                    tie_weight += u64::from(w);
                    if fastrand::u64(..tie_weight) < u64::from(w) {
                        best = Some((i, l, w));
                    }
                }
            }
        }
    }
    best.map(|b| b.0)
}

/// The smooth weighted round-robin order (as in nginx) for `weights`, reduced by their
/// greatest common divisor and scaled to at most 1024 entries.
pub(crate) fn smooth_rr_sequence(weights: &[u32]) -> Vec<u16> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w)));
    if g == 0 || weights.len() > usize::from(u16::MAX) {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x) / g).collect();
    let total: u64 = w.iter().sum();
    const CAP: u64 = 1024;
    if total > CAP {
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = (*x * CAP / total).max(1);
        }
    }
    let total: i64 = w.iter().map(|&x| x as i64).sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u16);
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(strategy: Strategy, weights: &[u32], n: usize) -> Vec<usize> {
        let seq = smooth_rr_sequence(weights);
        let rr = AtomicUsize::new(0);
        let mut counts = vec![0; weights.len()];
        for _ in 0..n {
            let i = select(strategy, weights, &seq, &rr, |_| true, |_| 0).expect("a pick");
            counts[i] += 1;
        }
        counts
    }

    /// A healthy, caught-up, fresh replica at index 1 behind a known primary at 0.
    fn served_replica() -> Topology {
        let mut t = Topology::initial(&[0, 1], 1 << 24, Duration::from_secs(5));
        t.primary = PrimaryState::Known(0);
        let r = &mut t.servers[1];
        r.role = Role::Replica;
        r.health = Health::Healthy;
        r.lsn = Some(Lsn(100));
        r.fresh = true;
        r.timeline = Some(1);
        r.lag_bytes = Some(0);
        r.lag = TimeLag::AtMost(Duration::ZERO);
        t
    }

    #[test]
    fn a_suspect_replica_serves_no_read() {
        let token = Token::new(1, 1, Lsn(50));
        let needs = [
            ReadNeed::Eventual,
            ReadNeed::MaxStaleness(Duration::from_secs(1)),
            ReadNeed::After(token, Within::Any),
            ReadNeed::After(token, Within::Eventual),
        ];
        let mut t = served_replica();
        assert!(needs.iter().all(|n| t.can_serve(1, n)));
        t.servers[1].suspect = true;
        assert!(needs.iter().all(|n| !t.can_serve(1, n)));
    }

    #[test]
    fn a_read_after_a_token_keeps_its_lag_bound() {
        let token = Token::new(1, 1, Lsn(50));
        let mut t = served_replica();
        // Past the token, but 6 s and 32 MiB behind the primary (the bounds: 5 s, 16 MiB).
        t.servers[1].lag = TimeLag::AtMost(Duration::from_secs(6));
        t.servers[1].lag_bytes = Some(32 << 20);
        assert!(t.can_serve(1, &ReadNeed::After(token, Within::Any)));
        assert!(!t.can_serve(1, &ReadNeed::After(token, Within::Eventual)));
        let staleness = |d| ReadNeed::After(token, Within::Staleness(Duration::from_secs(d)));
        assert!(!t.can_serve(1, &staleness(1)));
        assert!(t.can_serve(1, &staleness(7)));
        // Within bounds but short of the token: no.
        t.servers[1].lag_bytes = Some(0);
        t.servers[1].lag = TimeLag::AtMost(Duration::ZERO);
        let later = Token::new(1, 1, Lsn(101));
        assert!(!t.can_serve(1, &ReadNeed::After(later, Within::Eventual)));
        assert!(t.can_serve(1, &ReadNeed::After(token, Within::Eventual)));
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        assert_eq!(
            share(Strategy::RoundRobin, &[0, 1, 3], 4000),
            vec![0, 1000, 3000]
        );
        let seq = smooth_rr_sequence(&[5, 1, 1]);
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0], "smooth, not bursty");
    }

    #[test]
    fn random_and_idle_least_outstanding_follow_weights() {
        for s in [Strategy::Random, Strategy::LeastOutstanding] {
            let c = share(s, &[0, 1, 3], 20_000);
            assert_eq!(c[0], 0);
            let p = c[1] as f64 / 20_000.0;
            assert!((0.22..0.28).contains(&p), "{s:?}: {c:?}");
        }
    }

    #[test]
    fn least_outstanding_prefers_least_loaded_per_weight() {
        let rr = AtomicUsize::new(0);
        let loads = [10u64, 3, 5];
        let pick = select(
            Strategy::LeastOutstanding,
            &[1, 1, 2],
            &[],
            &rr,
            |_| true,
            |i| loads[i],
        );
        // 10/1, 3/1, 5/2 = 2.5: the weighted one wins.
        assert_eq!(pick, Some(2));
    }

    #[test]
    fn no_eligible_server_is_none() {
        let rr = AtomicUsize::new(0);
        for s in [
            Strategy::RoundRobin,
            Strategy::Random,
            Strategy::LeastOutstanding,
        ] {
            assert_eq!(select(s, &[1, 1], &[0, 1], &rr, |_| false, |_| 0), None);
            assert_eq!(select(s, &[0, 0], &[], &rr, |_| true, |_| 0), None);
        }
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let rr = AtomicUsize::new(0);
        let seq = smooth_rr_sequence(&[1, 1, 1]);
        for _ in 0..10 {
            let p = select(
                Strategy::RoundRobin,
                &[1, 1, 1],
                &seq,
                &rr,
                |i| i != 1,
                |_| 0,
            );
            assert!(matches!(p, Some(0) | Some(2)));
        }
    }

    #[test]
    fn sequence_is_bounded_for_huge_weights() {
        let seq = smooth_rr_sequence(&[u32::MAX, 1, 7]);
        assert!(seq.len() <= 1030);
        assert!(seq.contains(&1) && seq.contains(&2));
    }

    #[test]
    fn tokens_are_placed_in_the_current_history() {
        let sys = 7;
        let t = |tli, lsn| Token::new(sys, tli, Lsn(lsn));
        let switches = [(2, Lsn(1000)), (3, Lsn(5000))];
        // Same timeline, or no primary known: as is.
        assert_eq!(place_token(Some(2), &switches, &t(2, 9999)), Ok(t(2, 9999)));
        assert_eq!(place_token(None, &switches, &t(1, 9999)), Ok(t(1, 9999)));
        // At or below the branch point: rebased onto the current timeline.
        assert_eq!(place_token(Some(2), &switches, &t(1, 1000)), Ok(t(2, 1000)));
        assert_eq!(place_token(Some(3), &switches, &t(1, 10)), Ok(t(3, 10)));
        assert_eq!(place_token(Some(3), &switches, &t(2, 5000)), Ok(t(3, 5000)));
        // Above it: the write may be lost.
        assert_eq!(
            place_token(Some(2), &switches, &t(1, 1001)),
            Err(MaybeLost { current: 2 })
        );
        assert_eq!(
            place_token(Some(3), &switches, &t(2, 5001)),
            Err(MaybeLost { current: 3 })
        );
        // A switch the fleet never saw: never guessed.
        assert_eq!(
            place_token(Some(5), &switches, &t(4, 1)),
            Err(MaybeLost { current: 5 })
        );
    }

    proptest::proptest! {
        #[test]
        fn placed_tokens_are_on_the_current_timeline_or_refused(
            tli in 1u32..6, current in 1u32..6, lsn in 0u64..10_000, at in 0u64..10_000,
        ) {
            let switches = [(tli + 1, Lsn(at))];
            let token = Token::new(1, tli, Lsn(lsn));
            match place_token(Some(current), &switches, &token) {
                Ok(p) => {
                    proptest::prop_assert_eq!(p.lsn(), token.lsn());
                    proptest::prop_assert!(p.timeline() == current.max(tli));
                    proptest::prop_assert!(tli >= current || lsn <= at);
                }
                Err(MaybeLost { current: c }) => {
                    proptest::prop_assert_eq!(c, current);
                    proptest::prop_assert!(tli < current && lsn > at);
                }
            }
        }
    }
}

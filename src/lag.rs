//! Lag arithmetic: time lag from a history of primary positions (DESIGN §3 pitfall 4),
//! replay rates and catch-up estimates. Pure functions over plain data.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Most samples kept; older ones are thinned out past this.
const MAX_SAMPLES: usize = 4096;

/// A short history of (primary position, time it was seen) samples.
///
/// Time lag is *not* `now() - pg_last_xact_replay_timestamp()`, which grows on an idle
/// primary. Instead: a replica is at least as fresh as the newest primary sample whose
/// position it has replayed, so `lag = now - time(newest sample with lsn <= replay)`, and a
/// replica at or past the newest sample is 0 behind.
#[derive(Debug, Clone)]
pub(crate) struct LagHistory {
    /// Samples in increasing LSN and time order: (position, first seen, last seen).
    /// The primary was at exactly that position from `first` to at least `last`.
    samples: VecDeque<(Lsn, Instant, Instant)>,
    /// How far back samples are kept.
    window: Duration,
}

/// A replica's time lag, as known from the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeLag {
    /// At most this far behind.
    AtMost(Duration),
    /// Behind every sample kept: at least this far behind.
    AtLeast(Duration),
    /// No primary position has been seen yet.
    Unknown,
}

impl TimeLag {
    /// The lag as a duration when it is known to be within `d`.
    pub(crate) fn within(self, d: Duration) -> bool {
        matches!(self, TimeLag::AtMost(l) if l <= d)
    }

    /// A usable figure for display and estimates (the bound either way).
    pub(crate) fn approx(self) -> Option<Duration> {
        match self {
            TimeLag::AtMost(d) | TimeLag::AtLeast(d) => Some(d),
            TimeLag::Unknown => None,
        }
    }
}

impl LagHistory {
    /// How long samples are kept.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// An empty history keeping samples for `window`.
    pub(crate) fn new(window: Duration) -> Self {
        LagHistory {
            samples: VecDeque::new(),
            window,
        }
    }

    /// The newest primary position seen.
    pub(crate) fn newest(&self) -> Option<Lsn> {
        self.samples.back().map(|s| s.0)
    }

    /// Records that the primary was at `lsn` at `at`. A new position starts a sample; the
    /// same position again moves that sample's "last seen" time (what bounds the lag of a
    /// replica there), while its "first seen" time (when a write there happened at the
    /// latest) stays.
    pub(crate) fn record(&mut self, lsn: Lsn, at: Instant) {
        if let Some(back) = self.samples.back_mut() {
            let (last, _, last_seen) = *back;
            if lsn < last {
                return;
            }
            if lsn == last {
                // Still there: a replica at this position is fresh as of now, however
                // long the primary has been idle (pitfall 4).
                back.2 = last_seen.max(at);
                return;
            }
            if at < last_seen {
                // A sample taken earlier but delivered later: its time is still a valid
                // upper bound for the write, but keep order by clamping.
                self.samples.push_back((lsn, last_seen, last_seen));
                self.trim(last_seen);
                return;
            }
        }
        self.samples.push_back((lsn, at, at));
        self.trim(at);
    }

    fn trim(&mut self, now: Instant) {
        // Keep at least one sample older than the window so lags up to the window stay
        // bounded above rather than "at least".
        while self.samples.len() > 2 {
            let second = self.samples[1].2;
            if now.saturating_duration_since(second) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        if self.samples.len() > MAX_SAMPLES {
            // Thin out the older half: keep every other sample.
            let keep: VecDeque<_> = self
                .samples
                .iter()
                .enumerate()
                .filter(|(i, _)| *i >= MAX_SAMPLES / 2 || i % 2 == 0)
                .map(|(_, s)| *s)
                .collect();
            self.samples = keep;
        }
    }

    /// Time lag of a replica that has replayed `replay`, as of `now`.
    pub(crate) fn lag(&self, replay: Lsn, now: Instant) -> TimeLag {
        let Some(&(newest, _, _)) = self.samples.back() else {
            return TimeLag::Unknown;
        };
        if replay >= newest {
            return TimeLag::AtMost(Duration::ZERO);
        }
        // Newest sample with lsn <= replay: samples are sorted by LSN.
        let idx = self.samples.partition_point(|s| s.0 <= replay);
        if idx == 0 {
            let oldest = self.samples[0].1;
            return TimeLag::AtLeast(now.saturating_duration_since(oldest));
        }
        // The primary was last seen at a position the replica has replayed at `.2`:
        // everything it lacks was written after that.
        TimeLag::AtMost(now.saturating_duration_since(self.samples[idx - 1].2))
    }

    /// A lower bound of how long a replica that had replayed `replay` at `at` takes to
    /// replay what the primary writes: the primary was already past `replay` at the time
    /// of the first sample above it, and the replica had not caught up by `at`.
    pub(crate) fn delay_lower_bound(&self, replay: Lsn, at: Instant) -> Duration {
        let idx = self.samples.partition_point(|s| s.0 <= replay);
        self.samples
            .get(idx)
            .map_or(Duration::ZERO, |s| at.saturating_duration_since(s.1))
    }

    /// When the primary was first seen at or past `lsn` (the write's time, bounded above).
    pub(crate) fn time_of(&self, lsn: Lsn) -> Option<Instant> {
        let idx = self.samples.partition_point(|s| s.0 < lsn);
        self.samples.get(idx).map(|s| s.1)
    }
}

/// A replica's replay progress, to estimate how fast it catches up.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplayRate {
    /// First and latest (replay position, time) of the current measurement window.
    first: Option<(Lsn, Instant)>,
    last: Option<(Lsn, Instant)>,
}

impl ReplayRate {
    /// Records a probe's replay position.
    pub(crate) fn record(&mut self, lsn: Lsn, at: Instant) {
        match self.first {
            Some((f, f_at))
                if lsn >= f && at.saturating_duration_since(f_at) < Duration::from_secs(10) => {}
            _ => self.first = Some((lsn, at)),
        }
        self.last = Some((lsn, at));
    }

    /// Bytes per second replayed over the window, when measurable and positive.
    pub(crate) fn bytes_per_sec(&self) -> Option<f64> {
        let ((f, f_at), (l, l_at)) = (self.first?, self.last?);
        let secs = l_at.saturating_duration_since(f_at).as_secs_f64();
        let bytes = l.bytes_since(f) as f64;
        (secs > 0.05 && bytes > 0.0).then(|| bytes / secs)
    }

    /// Estimated time to replay `behind` more bytes.
    pub(crate) fn catch_up(&self, behind: u64) -> Option<Duration> {
        let rate = self.bytes_per_sec()?;
        Duration::try_from_secs_f64(behind as f64 / rate).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn idle_primary_does_not_grow_lag() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(100), t0);
        // The primary stays at 100 for a long time: no new samples.
        h.record(Lsn(100), t0 + ms(10_000));
        assert_eq!(
            h.lag(Lsn(100), t0 + ms(20_000)),
            TimeLag::AtMost(Duration::ZERO)
        );
    }

    #[test]
    fn first_write_after_idle_is_not_lag() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(100), t0);
        // Probes keep seeing 100 for 10 s, then a write moves the primary to 200.
        h.record(Lsn(100), t0 + ms(10_000));
        h.record(Lsn(200), t0 + ms(10_050));
        // A replica still at 100 is ~100 ms behind, not 10 s.
        assert_eq!(h.lag(Lsn(100), t0 + ms(10_100)), TimeLag::AtMost(ms(100)));
        // The write's time is still when 200 was first seen.
        assert_eq!(h.time_of(Lsn(150)), Some(t0 + ms(10_050)));
        assert_eq!(h.delay_lower_bound(Lsn(100), t0 + ms(10_060)), ms(10));
    }

    #[test]
    fn lag_is_time_of_newest_sample_replayed() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(100), t0);
        h.record(Lsn(200), t0 + ms(100));
        h.record(Lsn(300), t0 + ms(200));
        let now = t0 + ms(250);
        assert_eq!(h.lag(Lsn(250), now), TimeLag::AtMost(ms(150)));
        assert_eq!(h.lag(Lsn(200), now), TimeLag::AtMost(ms(150)));
        assert_eq!(h.lag(Lsn(199), now), TimeLag::AtMost(ms(250)));
        assert_eq!(h.lag(Lsn(300), now), TimeLag::AtMost(Duration::ZERO));
        assert_eq!(h.lag(Lsn(50), now), TimeLag::AtLeast(ms(250)));
        assert_eq!(LagHistory::new(ms(1)).lag(Lsn(1), now), TimeLag::Unknown);
    }

    #[test]
    fn lag_is_primary_minus_replica_never_reverse() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(1000), t0);
        // A replica reporting ahead of the last primary sample is not "negative" lag.
        assert_eq!(
            h.lag(Lsn(5000), t0 + ms(5)),
            TimeLag::AtMost(Duration::ZERO)
        );
        assert!(!h.lag(Lsn(10), t0 + ms(6000)).within(ms(5000)));
    }

    #[test]
    fn delay_lower_bound_ignores_an_idle_past() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(100), t0);
        // Idle for 10 s, then a write at 200 seen at t0 + 10 s.
        h.record(Lsn(200), t0 + ms(10_000));
        // Probed 20 ms after the write, still at 100: at least 20 ms of delay, not 10 s.
        assert_eq!(h.delay_lower_bound(Lsn(100), t0 + ms(10_020)), ms(20));
        assert_eq!(
            h.delay_lower_bound(Lsn(200), t0 + ms(10_020)),
            Duration::ZERO
        );
    }

    #[test]
    fn time_of_finds_first_sample_at_or_past() {
        let t0 = Instant::now();
        let mut h = LagHistory::new(Duration::from_secs(60));
        h.record(Lsn(100), t0);
        h.record(Lsn(200), t0 + ms(100));
        assert_eq!(h.time_of(Lsn(150)), Some(t0 + ms(100)));
        assert_eq!(h.time_of(Lsn(100)), Some(t0));
        assert_eq!(h.time_of(Lsn(201)), None);
    }

    #[test]
    fn replay_rate_estimates_catch_up() {
        let t0 = Instant::now();
        let mut r = ReplayRate::default();
        assert_eq!(r.catch_up(100), None);
        r.record(Lsn(0), t0);
        r.record(Lsn(1000), t0 + ms(1000));
        assert_eq!(r.catch_up(500), Some(ms(500)));
        // A paused replica: no progress, no estimate.
        let mut p = ReplayRate::default();
        p.record(Lsn(10), t0);
        p.record(Lsn(10), t0 + ms(1000));
        assert_eq!(p.catch_up(1), None);
    }

    proptest! {
        #[test]
        fn lag_is_monotonic_in_replay(
            steps in proptest::collection::vec((1u64..10_000, 0u64..500), 1..200),
            a in any::<u64>(), b in any::<u64>(),
        ) {
            let t0 = Instant::now();
            let mut h = LagHistory::new(Duration::from_secs(3600));
            let (mut lsn, mut t) = (0u64, t0);
            for (dl, dt) in steps {
                lsn += dl;
                t += ms(dt);
                h.record(Lsn(lsn), t);
            }
            let now = t + ms(1);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            // A replica further ahead is never reported as more behind.
            let (l_lo, l_hi) = (h.lag(Lsn(lo % (lsn + 10)), now), h.lag(Lsn(hi % (lsn + 10)), now));
            if (lo % (lsn + 10)) <= (hi % (lsn + 10)) {
                prop_assert!(l_hi.approx().unwrap_or_default() <= l_lo.approx().unwrap_or_default());
            }
        }
    }
}

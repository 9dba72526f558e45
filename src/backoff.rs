//! Restart backoff: exponential with jitter, bounded, reset after a stable period.

use std::time::Duration;

use crate::config::RestartConfig;

/// Restart bookkeeping for one supervised thing (a server actor, the listener's
/// connection): consecutive restarts without a stable period in between.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempts: u32,
}

impl Backoff {
    /// The delay before the next restart of something that stayed up `up_for` (`None`:
    /// it never came up). A stable period (`stable_after`) resets the exponent.
    pub(crate) fn next_delay(&mut self, up_for: Option<Duration>, cfg: &RestartConfig) -> Duration {
        if up_for.is_some_and(|d| d >= cfg.stable_after) {
            self.attempts = 0;
        }
        let delay = restart_delay(
            self.attempts,
            cfg.min_backoff,
            cfg.max_backoff,
            fastrand::f64(),
        );
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    /// Restarts in a row so far (the one just scheduled included); 1 right after a
    /// stable period.
    pub(crate) fn in_a_row(&self) -> u32 {
        self.attempts
    }
}

/// The delay before restart number `attempt` (0-based) of a failed server actor.
///
/// `min * 2^attempt`, capped at `max`, with "equal jitter": half of it fixed and half
/// drawn from `unit` (a number in `[0, 1)`), so restarts of many servers spread out
/// while each delay stays within `[d/2, d]` of the exponential curve and never exceeds `max`.
pub(crate) fn restart_delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let base = min
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
        .max(min.min(max));
    let half = base / 2;
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    half + half.mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn grows_then_caps() {
        assert_eq!(restart_delay(0, MIN, MAX, 1.0), MIN);
        assert_eq!(restart_delay(1, MIN, MAX, 1.0), MIN * 2);
        assert_eq!(restart_delay(3, MIN, MAX, 1.0), MIN * 8);
        assert_eq!(restart_delay(20, MIN, MAX, 1.0), MAX);
        assert_eq!(restart_delay(u32::MAX, MIN, MAX, 1.0), MAX);
        assert_eq!(restart_delay(3, MIN, MAX, 0.0), MIN * 4);
    }

    #[test]
    fn backoff_grows_and_resets_after_a_stable_period() {
        let cfg = RestartConfig::default();
        let mut b = Backoff::default();
        let short = Some(Duration::from_millis(1));
        let first = b.next_delay(None, &cfg);
        let _ = b.next_delay(short, &cfg);
        let third = b.next_delay(short, &cfg);
        assert!(
            first <= cfg.min_backoff && third >= cfg.min_backoff * 2,
            "{first:?} {third:?}"
        );
        // Up long enough: back to the first step.
        let reset = b.next_delay(Some(cfg.stable_after), &cfg);
        assert!(reset <= cfg.min_backoff, "{reset:?}");
    }

    proptest! {
        #[test]
        fn stays_in_bounds(attempt in any::<u32>(), unit in any::<f64>(), min_ms in 1u64..10_000, extra in 0u64..100_000) {
            let min = Duration::from_millis(min_ms);
            let max = min + Duration::from_millis(extra);
            let d = restart_delay(attempt, min, max, unit);
            prop_assert!(d <= max);
            prop_assert!(d >= min / 2);
        }

        #[test]
        fn never_shrinks_with_attempts(attempt in 0u32..40) {
            prop_assert!(restart_delay(attempt + 1, MIN, MAX, 0.5) >= restart_delay(attempt, MIN, MAX, 0.5));
        }
    }
}

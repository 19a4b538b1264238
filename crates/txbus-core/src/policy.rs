//! How failed deliveries are retried: attempts, timeout and backoff.

use std::time::Duration;

/// Delay before each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    cap: Duration,
    jitter: f64,
}

impl Backoff {
    /// Doubles from `base` on every retry, capped at 5 minutes, with 20 % jitter.
    pub fn exponential(base: Duration) -> Self {
        Self {
            base,
            factor: 2.0,
            cap: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
    /// The same delay every time, no jitter.
    pub fn fixed(delay: Duration) -> Self {
        Self {
            base: delay,
            factor: 1.0,
            cap: delay,
            jitter: 0.0,
        }
    }
    /// Retries at once.
    pub fn none() -> Self {
        Self::fixed(Duration::ZERO)
    }
    /// Caps the delay.
    pub fn max(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }
    /// The growth factor per retry (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self
    }
    /// Randomly shortens each delay by up to this fraction (0.0 – 1.0), so that retries of many
    /// deliveries that failed together spread out.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The delay before retry number `retry` (1 for the first retry), before jitter.
    pub fn nominal(&self, retry: u32) -> Duration {
        let exp = self
            .factor
            .powi(i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX));
        let secs = self.base.as_secs_f64() * exp;
        let cap = self.cap.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before retry number `retry`, with jitter applied.
    pub fn delay(&self, retry: u32) -> Duration {
        let nominal = self.nominal(retry);
        if self.jitter == 0.0 {
            return nominal;
        }
        nominal.mul_f64(1.0 - self.jitter * fastrand::f64())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1))
    }
}

/// The policy of a handler: timeout per attempt, retries, backoff and concurrency.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Longest one attempt may run; past it the attempt is cancelled and counts as a transient failure.
    pub timeout: Duration,
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// Delay before each retry.
    pub backoff: Backoff,
    /// Most attempts of this handler running at once.
    pub concurrency: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_retries: 3,
            backoff: Backoff::default(),
            concurrency: 64,
        }
    }
}

/// Per-handler changes to the bus-wide policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyOverride {
    /// Overrides [`Policy::timeout`].
    pub timeout: Option<Duration>,
    /// Overrides [`Policy::max_retries`].
    pub max_retries: Option<u32>,
    /// Overrides [`Policy::backoff`].
    pub backoff: Option<Backoff>,
    /// Overrides [`Policy::concurrency`].
    pub concurrency: Option<usize>,
}

impl PolicyOverride {
    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Sets the retries.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = Some(retries);
        self
    }
    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    /// Sets the concurrency.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }
    pub(crate) fn apply(&self, base: &Policy) -> Policy {
        Policy {
            timeout: self.timeout.unwrap_or(base.timeout),
            max_retries: self.max_retries.unwrap_or(base.max_retries),
            backoff: self.backoff.unwrap_or(base.backoff),
            concurrency: self.concurrency.unwrap_or(base.concurrency),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_and_caps() {
        let b = Backoff::exponential(Duration::from_millis(100)).max(Duration::from_secs(1));
        assert_eq!(b.nominal(1), Duration::from_millis(100));
        assert_eq!(b.nominal(2), Duration::from_millis(200));
        assert_eq!(b.nominal(4), Duration::from_millis(800));
        assert_eq!(b.nominal(5), Duration::from_secs(1));
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff::exponential(Duration::from_millis(1000)).jitter(0.5);
        for retry in 1..6 {
            for _ in 0..200 {
                let d = b.delay(retry);
                let n = b.nominal(retry);
                assert!(d <= n && d >= n.mul_f64(0.5), "{d:?} vs {n:?}");
            }
        }
    }

    #[test]
    fn fixed_and_none() {
        assert_eq!(
            Backoff::fixed(Duration::from_millis(7)).delay(9),
            Duration::from_millis(7)
        );
        assert_eq!(Backoff::none().delay(3), Duration::ZERO);
    }
}

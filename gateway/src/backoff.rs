//! Exponential backoff: one type for every retry loop of the gateway (the
//! tunnel's redial, the config client's reconnect, a failing accept), each
//! with its own bounds and jitter.
//!
//! The step after the n-th consecutive failure (counted from 0) is
//! `min * 2^n`, at most `max`. With [`Jitter::Equal`] the pause is drawn
//! uniformly from `[step/2, step]`, so that many gateways restarted
//! together do not redial in step; with [`Jitter::None`] it is the step.
//!
//! A pure value: it owns no clock and no task. Callers sleep, and decide
//! what counts as a failure and when an episode ends ([`Backoff::reset`]).

use std::time::Duration;

use rand::Rng;

/// How a pause is drawn from its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the step.
    None,
    /// Uniformly in `[step/2, step]`.
    Equal,
}

/// Exponential backoff between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: Jitter,
    /// Consecutive failures so far in this episode.
    attempt: u32,
}

impl Backoff {
    /// A backoff whose first pause is (at most) `min` and whose pauses
    /// never exceed `max`.
    pub fn new(min: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff {
            min,
            max,
            jitter,
            attempt: 0,
        }
    }

    /// The step after `attempt` earlier consecutive failures, before jitter:
    /// `min * 2^attempt`, at most `max`.
    pub fn step(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The pause after `attempt` earlier consecutive failures, for a caller
    /// that keeps its own count.
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self.step(attempt);
        match self.jitter {
            Jitter::None => step,
            Jitter::Equal => {
                let half = step / 2;
                half + rand::rng().random_range(Duration::ZERO..=step - half)
            }
        }
    }

    /// Records a failure; returns how long to wait before trying again.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Ends an episode of failures: the next pause is the first again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures recorded by [`Backoff::next_delay`] since the last
    /// reset.
    pub fn failures(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max, Jitter::Equal);
        let mut ceiling = min;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(b.step(b.failures()), max);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn without_jitter_the_pauses_are_the_steps() {
        let (min, max) = (Duration::from_millis(5), Duration::from_secs(1));
        let mut b = Backoff::new(min, max, Jitter::None);
        let pauses: Vec<_> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn huge_attempt_counts_saturate_at_the_cap() {
        let b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Jitter::None,
        );
        for attempt in [16, 31, 32, 1_000, u32::MAX] {
            assert_eq!(b.step(attempt), Duration::from_secs(5), "attempt {attempt}");
        }
        let from_zero = Backoff::new(Duration::ZERO, Duration::from_secs(5), Jitter::Equal);
        assert_eq!(from_zero.delay(u32::MAX), Duration::ZERO);
    }
}

//! Reconnect delays: exponential with jitter, so that a thousand agents
//! cut off by a coordinator restart do not all come back in the same second.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt. `jitter` in [0, 1) picks a point in
    /// the upper half of the current window: never zero, never above `max`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let window = self
            .initial
            .saturating_mul(2u32.saturating_pow(self.attempt.min(31)))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = jitter.clamp(0.0, 1.0);
        window.mul_f64(0.5 + 0.5 * jitter)
    }

    /// After a session that worked, start again from the smallest window.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_doubles_and_caps() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|_| backoff.next_delay(1.0).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(0.0), Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn delay_stays_within_half_window_and_max(attempts in 0usize..80, jitter in 0.0f64..1.0) {
            let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
            let mut delay = Duration::ZERO;
            for _ in 0..=attempts {
                delay = backoff.next_delay(jitter);
            }
            prop_assert!(delay >= Duration::from_millis(125));
            prop_assert!(delay <= Duration::from_secs(30));
        }
    }
}

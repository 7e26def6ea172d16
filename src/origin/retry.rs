//! The retry budget: retries may add at most `budget` × the origin requests of the last ten
//! seconds, plus `min_per_second`, so that during an outage retries cannot double the load on
//! origins that are already failing (the budget idea of Finagle and Linkerd).
//!
//! Ten one-second slots under a mutex: it is touched once per origin request (never on a
//! cache hit), and a crate would add more than these few lines.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::config::Retries;

const SLOTS: usize = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Whole seconds since the budget's epoch that this slot counts.
    second: u64,
    requests: u64,
    retries: u64,
}

/// Counts origin requests and retries over a sliding ten-second window.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u64,
    epoch: Instant,
    slots: Mutex<[Slot; SLOTS]>,
}

impl RetryBudget {
    pub fn new(config: &Retries) -> RetryBudget {
        RetryBudget {
            ratio: config.budget,
            min_per_second: u64::from(config.min_per_second),
            epoch: Instant::now(),
            slots: Mutex::new([Slot::default(); SLOTS]),
        }
    }

    fn with_slot<T>(&self, now: Instant, f: impl FnOnce(&mut [Slot; SLOTS], usize) -> T) -> T {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let i = (second % SLOTS as u64) as usize;
        if slots[i].second != second {
            slots[i] = Slot {
                second,
                requests: 0,
                retries: 0,
            };
        }
        f(&mut slots, i)
    }

    /// Counts a first attempt to an origin.
    pub fn request(&self, now: Instant) {
        self.with_slot(now, |slots, i| slots[i].requests += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        self.with_slot(now, |slots, i| {
            let current = slots[i].second;
            let (mut requests, mut retries, mut seconds) = (0u64, 0u64, 0u64);
            for s in slots.iter() {
                if s.second + (SLOTS as u64) > current && s.second <= current {
                    requests += s.requests;
                    retries += s.retries;
                }
            }
            // The window only spans the seconds the budget has existed.
            seconds += (current + 1).min(SLOTS as u64);
            let allowed = self.min_per_second * seconds + (self.ratio * requests as f64) as u64;
            if retries < allowed {
                slots[i].retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_the_ratio_plus_the_floor() {
        let b = RetryBudget::new(&Retries {
            budget: 0.2,
            min_per_second: 1,
        });
        let now = Instant::now();
        let mut granted = 0;
        for _ in 0..100 {
            b.request(now);
            if b.try_retry(now) {
                granted += 1;
            }
        }
        // One second old: 1 from the floor plus 20% of 100.
        assert_eq!(granted, 21);
        // Ten seconds later the old requests no longer count.
        let later = now + Duration::from_secs(10);
        let mut granted = 0;
        for _ in 0..10 {
            if b.try_retry(later) {
                granted += 1;
            }
        }
        assert_eq!(granted, 10, "only the floor: 1 per second over the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_budget_without_floor_never_retries() {
        let b = RetryBudget::new(&Retries {
            budget: 0.0,
            min_per_second: 0,
        });
        let now = Instant::now();
        b.request(now);
        assert!(!b.try_retry(now));
    }
}

//! Per-origin state: request and error counts, requests in flight, the peak-EWMA latency,
//! passive ejection (the run of failures, ejections so far and the back-off's end) and what
//! active checks say (rise/fall counts, checks run, the last result).
//!
//! Written by the proxy for each origin request ([`OriginStates::success`],
//! [`OriginStates::failure`], the [`InFlight`] guard) and by `health` for each check
//! ([`OriginStates::check_result`]); read by `select` through a cheap [`View`] and by `/origins`
//! and `/metrics` through a [`Snapshot`] taken by value. The fields are private, so these are
//! the only ways in or out. Deciding *which* origin to use is `select`'s, not this module's;
//! nothing here sends a request or reads the clock after construction: `now` is a parameter.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::telemetry::metrics::{Histogram, HistogramSnapshot};

/// Decay of the latency average: old samples weigh 1/e after this long.
const DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures that eject an origin.
pub const EJECT_AFTER: u32 = 5;
/// First ejection; doubled on each repeat, capped.
const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(300);

/// A peak-sensitive exponentially weighted moving average of time to first byte: a slower
/// sample raises it at once, faster samples bring it down gradually.
#[derive(Debug, Clone, Copy, Default)]
struct PeakEwma {
    /// Microseconds; zero until the first sample.
    value: f64,
    stamp: Option<Instant>,
}

impl PeakEwma {
    fn observe(&mut self, sample: Duration, now: Instant) {
        let s = sample.as_secs_f64() * 1e6;
        match self.stamp {
            None => self.value = s,
            Some(_) if s > self.value => self.value = s,
            Some(t) => {
                let elapsed = now.saturating_duration_since(t).as_secs_f64();
                let w = (-elapsed / DECAY.as_secs_f64()).exp();
                self.value = self.value * w + s * (1.0 - w);
            }
        }
        self.stamp = Some(now);
    }

    /// Microseconds (zero before any sample), decayed by the time since the last sample: an
    /// origin that has not been chosen for a while looks cheaper and gets probed again, so a
    /// recovered or newly fast origin is noticed.
    fn get(&self, now: Instant) -> f64 {
        match self.stamp {
            None => 0.0,
            Some(t) => {
                let elapsed = now.saturating_duration_since(t).as_secs_f64();
                self.value * (-elapsed / DECAY.as_secs_f64()).exp()
            }
        }
    }
}

/// What active health checks say about an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

/// The outcome of one active check, kept for `GET /origins`.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub at: Instant,
    pub passed: bool,
    pub status: Option<StatusCode>,
    /// Time to the response head (or to the failure).
    pub latency: Duration,
    pub error: Option<String>,
}

/// Active-check bookkeeping of one origin (touched once per check, never per request).
#[derive(Debug, Default)]
struct Checks {
    passes: u32,
    failures: u32,
    total: u64,
    last: Option<CheckResult>,
}

/// Live state of one origin.
#[derive(Debug, Default)]
struct OriginState {
    ewma: Mutex<PeakEwma>,
    /// Set by active checks after `fall` failures, cleared after `rise` passes.
    down: AtomicBool,
    checks: Mutex<Checks>,
    /// Changed only by [`InFlight`].
    inflight: AtomicU32,
    /// Failures in a row since the last success or ejection.
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the table's epoch until which the origin is ejected; zero once an
    /// answer after the back-off (or a check bringing the origin up) has cleared it.
    ejected_until: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    /// Time to each attempt's response head or failure.
    durations: Histogram,
}

impl OriginState {
    /// Current latency estimate in microseconds.
    fn latency_us(&self, now: Instant) -> f64 {
        self.ewma.lock().map(|e| e.get(now)).unwrap_or(0.0)
    }
}

/// What `select` reads of one origin to choose: a few loads and one uncontended lock.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Neither down by its checks nor ejected at the view's instant.
    pub up: bool,
    /// Peak-EWMA time to first byte in microseconds, decayed to the view's instant (zero
    /// before any sample).
    pub latency_us: f64,
    /// Requests waiting for the origin's response head.
    pub in_flight: u32,
}

/// One origin's state at one instant, as `GET /origins` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Taken out of rotation by its active checks.
    pub down: bool,
    /// Taken out of rotation by passive detection, for a back-off that has not run out.
    pub ejected: bool,
    /// Peak-EWMA time to first byte in microseconds, decayed to the snapshot's instant (zero
    /// before any sample).
    pub latency_us: f64,
    /// Requests waiting for the origin's response head.
    pub in_flight: u32,
    /// Requests answered or failed.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Times passive detection ejected the origin.
    pub ejections: u32,
    /// Active checks run so far.
    pub checks: u64,
    /// The last active check's result.
    pub last_check: Option<CheckResult>,
    /// Time to each attempt's response head or failure.
    pub durations: HistogramSnapshot,
}

impl Snapshot {
    /// True when the origin is neither down by its checks nor ejected.
    pub fn in_rotation(&self) -> bool {
        !self.down && !self.ejected
    }
}

/// An origin's in-flight count, raised while a request waits for it and lowered on drop (so
/// a request whose future is dropped mid-wait gives its count back).
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight<'a>(Option<&'a OriginState>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The state of every configured origin, by index. An index past the end is ignored by the
/// writers and reads as `None`.
#[derive(Debug)]
pub struct OriginStates {
    /// Shared, so that a configuration reload carries an origin's state to the new table.
    origins: Vec<Arc<OriginState>>,
    /// The instant `ejected_until` counts from (it is kept in an atomic as milliseconds).
    epoch: Instant,
}

impl OriginStates {
    /// State for `count` origins: up, no latency sample, nothing counted.
    pub fn new(count: usize) -> OriginStates {
        OriginStates {
            origins: (0..count).map(|_| Arc::default()).collect(),
            epoch: Instant::now(),
        }
    }

    /// A table for a new configuration's `count` origins: origin `i` keeps the state of this
    /// table's origin `carry(i)` (latency, health, ejection, counts), the others start anew.
    /// The epoch is kept, so carried ejections end when they would have.
    pub fn carried(&self, count: usize, carry: impl Fn(usize) -> Option<usize>) -> OriginStates {
        OriginStates {
            origins: (0..count)
                .map(|i| {
                    carry(i)
                        .and_then(|j| self.origins.get(j).cloned())
                        .unwrap_or_default()
                })
                .collect(),
            epoch: self.epoch,
        }
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// What selection needs of `origin` at `now`.
    pub fn view(&self, origin: usize, now: Instant) -> Option<View> {
        let s = self.origins.get(origin)?;
        Some(View {
            up: !s.down.load(Ordering::Relaxed)
                && s.ejected_until.load(Ordering::Relaxed) <= self.now_ms(now),
            latency_us: s.latency_us(now),
            in_flight: s.inflight.load(Ordering::Relaxed),
        })
    }

    /// Origin `origin`'s state at `now`.
    pub fn snapshot(&self, origin: usize, now: Instant) -> Option<Snapshot> {
        let s = self.origins.get(origin)?;
        let (checks, last_check) = s
            .checks
            .lock()
            .map(|c| (c.total, c.last.clone()))
            .unwrap_or((0, None));
        Some(Snapshot {
            down: s.down.load(Ordering::Relaxed),
            ejected: s.ejected_until.load(Ordering::Relaxed) > self.now_ms(now),
            latency_us: s.latency_us(now),
            in_flight: s.inflight.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            ejections: s.ejections.load(Ordering::Relaxed),
            checks,
            last_check,
            durations: s.durations.snapshot(),
        })
    }

    /// Records how long one attempt on `origin` took to its response head or failure
    /// (`edgecache_origin_request_duration_seconds`).
    pub fn took(&self, origin: usize, elapsed: Duration) {
        if let Some(s) = self.origins.get(origin) {
            s.durations.observe(elapsed);
        }
    }

    /// Counts a request to `origin` as in flight until the guard is dropped.
    pub fn enter(&self, origin: usize) -> InFlight<'_> {
        let s = self.origins.get(origin).map(|s| &**s);
        if let Some(s) = s {
            s.inflight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(s)
    }

    /// Records a response head from `origin` after `latency`. Returns true when this is the
    /// first answer after an ejection ran out (the origin is back in rotation).
    pub fn success(&self, origin: usize, latency: Duration, now: Instant) -> bool {
        let Some(s) = self.origins.get(origin) else {
            return false;
        };
        s.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = s.ewma.lock() {
            e.observe(latency, now);
        }
        s.failures.store(0, Ordering::Relaxed);
        // An ejection that ran out is cleared by the first answer after it, once.
        let until = s.ejected_until.load(Ordering::Relaxed);
        until != 0
            && until <= self.now_ms(now)
            && s.ejected_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records a failure (connect error, reset, timeout, or a status the operator counts);
    /// ejects after a run of [`EJECT_AFTER`], for 5 s doubled on each later ejection up to
    /// 300 s. Returns the ejection's length when this failure ejected the origin.
    pub fn failure(&self, origin: usize, now: Instant) -> Option<Duration> {
        let s = self.origins.get(origin)?;
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.errors.fetch_add(1, Ordering::Relaxed);
        let n = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER {
            return None;
        }
        s.failures.store(0, Ordering::Relaxed);
        let times = s.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = EJECT_BASE.saturating_mul(1 << times).min(EJECT_MAX);
        s.ejected_until
            .store(self.now_ms(now + backoff), Ordering::Relaxed);
        Some(backoff)
    }

    /// Records an active check. An answered check feeds the latency average; `fall` failures
    /// in a row mark the origin down and `rise` passes in a row mark it up again (which also
    /// ends a passive ejection). Returns the change, if any.
    pub fn check_result(
        &self,
        origin: usize,
        result: CheckResult,
        rise: u32,
        fall: u32,
    ) -> Option<Health> {
        let s = self.origins.get(origin)?;
        if result.status.is_some() {
            if let Ok(mut e) = s.ewma.lock() {
                e.observe(result.latency, result.at);
            }
        }
        let mut c = s.checks.lock().ok()?;
        c.total += 1;
        let passed = result.passed;
        c.last = Some(result);
        let down = s.down.load(Ordering::Relaxed);
        if passed {
            c.passes = c.passes.saturating_add(1);
            c.failures = 0;
            if down && c.passes >= rise {
                s.down.store(false, Ordering::Relaxed);
                s.failures.store(0, Ordering::Relaxed);
                s.ejected_until.store(0, Ordering::Relaxed);
                return Some(Health::Up);
            }
        } else {
            c.failures = c.failures.saturating_add(1);
            c.passes = 0;
            if !down && c.failures >= fall {
                s.down.store(true, Ordering::Relaxed);
                return Some(Health::Down);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_rises_at_once_and_decays_gradually() {
        let mut e = PeakEwma::default();
        let t = Instant::now();
        e.observe(Duration::from_millis(5), t);
        let at = t + Duration::from_millis(10);
        e.observe(Duration::from_millis(40), at);
        assert_eq!(e.get(at).round(), 40_000.0, "a slow sample counts at once");
        let at = t + Duration::from_secs(1);
        e.observe(Duration::from_millis(5), at);
        assert!(
            e.get(at) > 30_000.0,
            "one fast sample a second later barely lowers it: {}",
            e.get(at)
        );
        let at = t + Duration::from_secs(60);
        e.observe(Duration::from_millis(5), at);
        assert!(
            e.get(at) < 6_000.0,
            "a minute later the fast samples dominate: {}",
            e.get(at)
        );
        let later = e.get(at + Duration::from_secs(30));
        assert!(later < e.get(at) / 10.0, "unsampled, it decays toward zero");
    }
}

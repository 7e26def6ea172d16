//! Choosing an origin for a miss: among the route's pools in preference order, the first pool
//! with a healthy origin is used (or the next one when its best latency is over
//! `spill_latency`); inside it, power of two choices on a peak-EWMA latency cost weighted by
//! in-flight requests and `weight`. Origins that fail repeatedly are ejected for a back-off
//! that grows on repeat; one success after it brings them back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Decay of the latency average: old samples weigh 1/e after this long.
const DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures that eject an origin.
pub const EJECT_AFTER: u32 = 5;
/// First ejection; doubled on each repeat, capped.
const EJECT_BASE: Duration = Duration::from_secs(5);
const EJECT_MAX: Duration = Duration::from_secs(300);
/// Costs closer than this are treated as equal (hysteresis against flapping).
const TIE: f64 = 0.05;

/// A peak-sensitive exponentially weighted moving average of time to first byte: a slower
/// sample raises it at once, faster samples bring it down gradually.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    /// Microseconds; zero until the first sample.
    value: f64,
    stamp: Option<Instant>,
}

impl PeakEwma {
    pub const fn new() -> PeakEwma {
        PeakEwma {
            value: 0.0,
            stamp: None,
        }
    }

    pub fn observe(&mut self, sample: Duration, now: Instant) {
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
    pub fn get(&self, now: Instant) -> f64 {
        match self.stamp {
            None => 0.0,
            Some(t) => {
                let elapsed = now.saturating_duration_since(t).as_secs_f64();
                self.value * (-elapsed / DECAY.as_secs_f64()).exp()
            }
        }
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

/// What active health checks say about an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

/// Active-check bookkeeping of one origin (touched once per check, never per request).
#[derive(Debug, Default)]
struct Checks {
    passes: u32,
    failures: u32,
    total: u64,
    last: Option<super::health::CheckResult>,
}

/// Live state of one origin, updated by every request to it. Read from outside through
/// [`Selector::snapshot`]; the in-flight count is changed only by [`InFlight`].
#[derive(Debug, Default)]
pub struct OriginStats {
    ewma: Mutex<PeakEwma>,
    /// Set by active checks after `fall` failures, cleared after `rise` passes.
    down: AtomicBool,
    checks: Mutex<Checks>,
    inflight: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the selector's epoch until which the origin is ejected.
    ejected_until: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

impl OriginStats {
    /// Current latency estimate in microseconds.
    fn latency_us(&self, now: Instant) -> f64 {
        self.ewma.lock().map(|e| e.get(now)).unwrap_or(0.0)
    }
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
    pub last_check: Option<super::health::CheckResult>,
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
pub struct InFlight<'a>(Option<&'a OriginStats>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.0 {
            s.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A pool as the selector sees it.
#[derive(Debug, Clone)]
pub struct PoolView<'a> {
    pub origins: &'a [usize],
    pub spill_latency: Option<Duration>,
}

/// The selector: per-origin state and a cheap pseudo-random source for two choices.
#[derive(Debug)]
pub struct Selector {
    stats: Vec<OriginStats>,
    weights: Vec<u32>,
    epoch: Instant,
    seed: AtomicU64,
}

impl Selector {
    pub fn new(weights: Vec<u32>) -> Selector {
        let stats = weights.iter().map(|_| OriginStats::default()).collect();
        let seed =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Selector {
            stats,
            weights,
            epoch: Instant::now(),
            seed: AtomicU64::new(seed | 1),
        }
    }

    /// Origin `origin`'s state at `now`; `None` for an index past the configured origins.
    pub fn snapshot(&self, origin: usize, now: Instant) -> Option<Snapshot> {
        let s = self.stats.get(origin)?;
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
        })
    }

    /// Counts a request to `origin` as in flight until the guard is dropped.
    pub fn enter(&self, origin: usize) -> InFlight<'_> {
        let s = self.stats.get(origin);
        if let Some(s) = s {
            s.inflight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(s)
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// True when the origin is neither marked down by its checks nor ejected at `now`.
    pub fn is_up(&self, origin: usize, now: Instant) -> bool {
        self.stats.get(origin).is_some_and(|s| {
            !s.down.load(Ordering::Relaxed)
                && s.ejected_until.load(Ordering::Relaxed) <= self.now_ms(now)
        })
    }

    /// Records an active check. An answered check feeds the latency average; `fall` failures
    /// in a row mark the origin down and `rise` passes in a row mark it up again (which also
    /// ends a passive ejection). Returns the change, if any.
    pub fn check_result(
        &self,
        origin: usize,
        result: super::health::CheckResult,
        rise: u32,
        fall: u32,
    ) -> Option<Health> {
        let s = self.stats.get(origin)?;
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

    fn random(&self) -> u64 {
        // xorshift64*: quality is ample for picking two of a few origins.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn cost(&self, origin: usize, now: Instant) -> f64 {
        let s = &self.stats[origin];
        let lat = s.latency_us(now).max(1.0);
        let inflight = f64::from(s.inflight.load(Ordering::Relaxed)) + 1.0;
        lat * inflight / f64::from(self.weights[origin].max(1))
    }

    fn weighted_pick(&self, candidates: &[usize]) -> usize {
        let total: u64 = candidates
            .iter()
            .map(|&o| u64::from(self.weights[o].max(1)))
            .sum();
        let mut r = self.random() % total.max(1);
        for &o in candidates {
            let w = u64::from(self.weights[o].max(1));
            if r < w {
                return o;
            }
            r -= w;
        }
        candidates[0]
    }

    /// Origins to try, best first: the chosen origin of the first usable pool, then the rest
    /// of that pool by cost, then the following pools. Never empty while any pool has origins:
    /// when everything is ejected, the first pool is tried anyway.
    pub fn candidates(&self, pools: &[PoolView<'_>], now: Instant) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let mut first_done = false;
        for (i, pool) in pools.iter().enumerate() {
            let mut up: Vec<usize> = pool
                .origins
                .iter()
                .copied()
                .filter(|&o| self.is_up(o, now))
                .collect();
            if up.is_empty() {
                continue;
            }
            let more_pools = i + 1 < pools.len();
            if let (Some(limit), true) = (pool.spill_latency, more_pools) {
                let best = up
                    .iter()
                    .map(|&o| self.stats[o].latency_us(now))
                    .fold(f64::INFINITY, f64::min);
                if best > limit.as_secs_f64() * 1e6 && best.is_finite() {
                    // Over its spill latency: keep it only as a fallback.
                    up.sort_by(|&a, &b| self.cost(a, now).total_cmp(&self.cost(b, now)));
                    push_unique(&mut out, up);
                    continue;
                }
            }
            if !first_done {
                first_done = true;
                let a = self.weighted_pick(&up);
                let others: Vec<usize> = up.iter().copied().filter(|&o| o != a).collect();
                let chosen = if others.is_empty() {
                    a
                } else {
                    let b = self.weighted_pick(&others);
                    let (ca, cb) = (self.cost(a, now), self.cost(b, now));
                    if cb < ca * (1.0 - TIE) {
                        b
                    } else if ca < cb * (1.0 - TIE) {
                        a
                    } else if self.weights[b] > self.weights[a] {
                        b
                    } else {
                        a.min(b)
                    }
                };
                let mut rest: Vec<usize> = up.iter().copied().filter(|&o| o != chosen).collect();
                rest.sort_by(|&x, &y| self.cost(x, now).total_cmp(&self.cost(y, now)));
                let fallback_first = !out.is_empty();
                let mut front = vec![chosen];
                front.extend(rest);
                if fallback_first {
                    // Spilled pools came before: the healthy pool goes first.
                    let spilled = std::mem::take(&mut out);
                    out = front;
                    push_unique(&mut out, spilled);
                } else {
                    out.extend(front);
                }
            } else {
                up.sort_by(|&x, &y| self.cost(x, now).total_cmp(&self.cost(y, now)));
                push_unique(&mut out, up);
            }
        }
        if out.is_empty() {
            if let Some(p) = pools.first() {
                out.extend(p.origins.iter().copied());
            }
        }
        out
    }

    /// Records a response head from `origin` after `latency`. Returns true when this is the
    /// first answer after an ejection ran out (the origin is back in rotation).
    pub fn success(&self, origin: usize, latency: Duration, now: Instant) -> bool {
        let Some(s) = self.stats.get(origin) else {
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
    /// ejects after a run of [`EJECT_AFTER`]. Returns the ejection's length when this failure
    /// ejected the origin.
    pub fn failure(&self, origin: usize, now: Instant) -> Option<Duration> {
        let s = self.stats.get(origin)?;
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
}

fn push_unique(out: &mut Vec<usize>, items: Vec<usize>) {
    for o in items {
        if !out.contains(&o) {
            out.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(p: &[&[usize]]) -> Vec<Vec<usize>> {
        p.iter().map(|x| x.to_vec()).collect()
    }

    fn views(p: &[Vec<usize>]) -> Vec<PoolView<'_>> {
        p.iter()
            .map(|o| PoolView {
                origins: o,
                spill_latency: None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_rises_at_once_and_decays_gradually() {
        let mut e = PeakEwma::new();
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

    #[tokio::test(start_paused = true)]
    async fn the_faster_origin_wins_and_ties_do_not_flap() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        s.success(0, Duration::from_millis(40), now);
        s.success(1, Duration::from_millis(5), now);
        let p = pools(&[&[0, 1]]);
        for _ in 0..50 {
            assert_eq!(s.candidates(&views(&p), now), vec![1, 0]);
        }
        let t = Selector::new(vec![1, 1]);
        t.success(0, Duration::from_millis(10), now);
        t.success(1, Duration::from_micros(10_200), now);
        let firsts: std::collections::HashSet<usize> =
            (0..50).map(|_| t.candidates(&views(&p), now)[0]).collect();
        assert_eq!(firsts.len(), 1, "within 5% the choice is stable");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_eject_and_the_next_pool_serves() {
        let s = Selector::new(vec![1, 1, 1]);
        let now = Instant::now();
        let p = pools(&[&[0, 1], &[2]]);
        for _ in 0..EJECT_AFTER {
            s.failure(0, now);
            s.failure(1, now);
        }
        assert!(!s.is_up(0, now) && !s.is_up(1, now));
        assert_eq!(s.candidates(&views(&p), now), vec![2]);
        let later = now + EJECT_BASE + Duration::from_millis(1);
        assert!(s.is_up(0, later), "back after the back-off");
        // A second ejection lasts twice as long.
        for _ in 0..EJECT_AFTER {
            s.failure(0, later);
        }
        assert!(!s.is_up(0, later + EJECT_BASE + Duration::from_millis(1)));
        assert!(s.is_up(0, later + EJECT_BASE * 2 + Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn everything_down_still_tries_the_first_pool() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        for _ in 0..EJECT_AFTER {
            s.failure(0, now);
            s.failure(1, now);
        }
        assert_eq!(s.candidates(&views(&pools(&[&[0], &[1]])), now), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn spill_latency_moves_traffic_to_the_next_pool() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        s.success(0, Duration::from_millis(200), now);
        s.success(1, Duration::from_millis(20), now);
        let a = [0usize];
        let b = [1usize];
        let v = vec![
            PoolView {
                origins: &a,
                spill_latency: Some(Duration::from_millis(100)),
            },
            PoolView {
                origins: &b,
                spill_latency: None,
            },
        ];
        assert_eq!(s.candidates(&v, now), vec![1, 0]);
    }
}

//! Choosing an origin for a miss: among the route's pools in preference order, the first pool
//! with a healthy origin is used (or the next one when its best latency is over
//! `spill_latency`); inside it, power of two choices on a peak-EWMA latency cost weighted by
//! in-flight requests and `weight`. Origins down by their checks or ejected after failures
//! (see `state`) are skipped.
//!
//! Reads each origin's [`View`] from `state` and writes nothing there; pure apart from those
//! atomics and its own random seed: `now` is a parameter. Entry type: [`Selector`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::state::{OriginStates, View};

/// Costs closer than this are treated as equal (hysteresis against flapping).
const TIE: f64 = 0.05;

/// A pool as the selector sees it.
#[derive(Debug, Clone)]
pub struct PoolView<'a> {
    pub origins: &'a [usize],
    pub spill_latency: Option<Duration>,
}

/// An origin in rotation, with its cost at the pick's instant.
#[derive(Debug, Clone, Copy)]
struct Up {
    origin: usize,
    cost: f64,
}

/// The selector: the origins' weights, a cheap pseudo-random source for two choices, and the
/// origins' state, which it reads on every pick and lends out (to the proxy and `health`,
/// which write it, and to `/origins` and `/metrics`) through [`Selector::state`].
#[derive(Debug)]
pub struct Selector {
    state: OriginStates,
    weights: Vec<u32>,
    seed: AtomicU64,
}

impl Selector {
    pub fn new(weights: Vec<u32>) -> Selector {
        let state = OriginStates::new(weights.len());
        Selector::with_state(weights, state)
    }

    /// A selector over `state` (carried from an earlier configuration, see
    /// [`OriginStates::carried`]), one weight per origin in it.
    pub fn with_state(weights: Vec<u32>, state: OriginStates) -> Selector {
        let seed =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Selector {
            state,
            weights,
            seed: AtomicU64::new(seed | 1),
        }
    }

    /// Every origin's state, by the same index as the weights.
    pub fn state(&self) -> &OriginStates {
        &self.state
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

    fn cost(&self, origin: usize, view: &View) -> f64 {
        let lat = view.latency_us.max(1.0);
        let inflight = f64::from(view.in_flight) + 1.0;
        lat * inflight / f64::from(self.weights[origin].max(1))
    }

    fn weighted_pick(&self, candidates: &[Up]) -> Up {
        let total: u64 = candidates
            .iter()
            .map(|c| u64::from(self.weights[c.origin].max(1)))
            .sum();
        let mut r = self.random() % total.max(1);
        for &c in candidates {
            let w = u64::from(self.weights[c.origin].max(1));
            if r < w {
                return c;
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
            // Each origin's view is read once per pick: costs compared while sorting stay
            // consistent with each other.
            let mut best = f64::INFINITY;
            let mut up: Vec<Up> = Vec::with_capacity(pool.origins.len());
            for &origin in pool.origins {
                let Some(view) = self.state.view(origin, now).filter(|v| v.up) else {
                    continue;
                };
                best = best.min(view.latency_us);
                up.push(Up {
                    origin,
                    cost: self.cost(origin, &view),
                });
            }
            if up.is_empty() {
                continue;
            }
            let more_pools = i + 1 < pools.len();
            if let (Some(limit), true) = (pool.spill_latency, more_pools) {
                if best > limit.as_secs_f64() * 1e6 && best.is_finite() {
                    // Over its spill latency: keep it only as a fallback.
                    by_cost(&mut up);
                    push_unique(&mut out, up.iter().map(|c| c.origin));
                    continue;
                }
            }
            if !first_done {
                first_done = true;
                let a = self.weighted_pick(&up);
                let others: Vec<Up> = up
                    .iter()
                    .copied()
                    .filter(|c| c.origin != a.origin)
                    .collect();
                let chosen = if others.is_empty() {
                    a.origin
                } else {
                    let b = self.weighted_pick(&others);
                    let (ca, cb) = (a.cost, b.cost);
                    if cb < ca * (1.0 - TIE) {
                        b.origin
                    } else if ca < cb * (1.0 - TIE) {
                        a.origin
                    } else if self.weights[b.origin] > self.weights[a.origin] {
                        b.origin
                    } else {
                        a.origin.min(b.origin)
                    }
                };
                let mut rest: Vec<Up> = up.into_iter().filter(|c| c.origin != chosen).collect();
                by_cost(&mut rest);
                let fallback_first = !out.is_empty();
                let mut front = vec![chosen];
                front.extend(rest.iter().map(|c| c.origin));
                if fallback_first {
                    // Spilled pools came before: the healthy pool goes first.
                    let spilled = std::mem::take(&mut out);
                    out = front;
                    push_unique(&mut out, spilled);
                } else {
                    out.extend(front);
                }
            } else {
                by_cost(&mut up);
                push_unique(&mut out, up.iter().map(|c| c.origin));
            }
        }
        if out.is_empty() {
            if let Some(p) = pools.first() {
                out.extend(p.origins.iter().copied());
            }
        }
        out
    }
}

fn by_cost(up: &mut [Up]) {
    up.sort_by(|x, y| x.cost.total_cmp(&y.cost));
}

fn push_unique(out: &mut Vec<usize>, items: impl IntoIterator<Item = usize>) {
    for o in items {
        if !out.contains(&o) {
            out.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::EJECT_AFTER;
    use super::*;

    fn up(s: &Selector, origin: usize, now: Instant) -> bool {
        s.state().view(origin, now).is_some_and(|v| v.up)
    }

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
    async fn the_faster_origin_wins_and_ties_do_not_flap() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        s.state().success(0, Duration::from_millis(40), now);
        s.state().success(1, Duration::from_millis(5), now);
        let p = pools(&[&[0, 1]]);
        for _ in 0..50 {
            assert_eq!(s.candidates(&views(&p), now), vec![1, 0]);
        }
        let t = Selector::new(vec![1, 1]);
        t.state().success(0, Duration::from_millis(10), now);
        t.state().success(1, Duration::from_micros(10_200), now);
        let firsts: std::collections::HashSet<usize> =
            (0..50).map(|_| t.candidates(&views(&p), now)[0]).collect();
        assert_eq!(firsts.len(), 1, "within 5% the choice is stable");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_eject_and_the_next_pool_serves() {
        let s = Selector::new(vec![1, 1, 1]);
        let now = Instant::now();
        let p = pools(&[&[0, 1], &[2]]);
        let mut back_off = None;
        for _ in 0..EJECT_AFTER {
            back_off = s.state().failure(0, now);
            s.state().failure(1, now);
        }
        let back_off = back_off.expect("a run of EJECT_AFTER failures ejects");
        assert_eq!(back_off, Duration::from_secs(5));
        assert!(!up(&s, 0, now) && !up(&s, 1, now));
        assert_eq!(s.candidates(&views(&p), now), vec![2]);
        let later = now + back_off + Duration::from_millis(1);
        assert!(up(&s, 0, later), "back after the back-off");
        // A second ejection lasts twice as long.
        for _ in 0..EJECT_AFTER {
            s.state().failure(0, later);
        }
        assert!(!up(&s, 0, later + back_off + Duration::from_millis(1)));
        assert!(up(&s, 0, later + back_off * 2 + Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn everything_down_still_tries_the_first_pool() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        for _ in 0..EJECT_AFTER {
            s.state().failure(0, now);
            s.state().failure(1, now);
        }
        assert_eq!(s.candidates(&views(&pools(&[&[0], &[1]])), now), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn spill_latency_moves_traffic_to_the_next_pool() {
        let s = Selector::new(vec![1, 1]);
        let now = Instant::now();
        s.state().success(0, Duration::from_millis(200), now);
        s.state().success(1, Duration::from_millis(20), now);
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

//! Request rates: a token bucket per client address and one per site; a request past either
//! is answered 429 Too Many Requests with `Retry-After`, counted as the result `limited`.
//!
//! Owns the buckets and the 429; not the connection cap per client (`server::limit`, counted
//! by socket before any request exists). Entry type: [`Limits`], asked once per request by
//! `Proxy::serve` once the site is known.
//!
//! Off unless `server.rate_per_client` or a site's `limits.rate` is set; then [`Limits::check`]
//! is one test of a flag: no clock read, no map lookup, no address resolved.
//!
//! The client is the one `geo::Locator::client` resolves (through trusted proxies), as for
//! geo routes and PURGE. The client's bucket is taken first: a client over its own rate
//! spends nothing of its site's, so one client cannot use up a site's rate by itself.
//!
//! Each bucket is a GCRA kept in one `AtomicU64` (the time its next request is due, in
//! nanoseconds since the limiter started), as `cache::store`'s variant budget is; taking
//! one is a compare-and-swap, no lock. Written here rather than taken from `governor`,
//! which implements the same algorithm: with only its `std` feature it brings seven more
//! crates (a second `hashbrown` among them) and keys its buckets in one mutex-guarded map
//! for all workers, or in `dashmap` with another feature; and it bounds that map only by
//! `retain_recent` sweeps, so between sweeps a client spraying addresses grows it freely.
//! Here the per-client buckets live in a moka cache (already the store's map): at most
//! [`CLIENTS`] addresses, admitted by frequency (TinyLFU), so addresses seen once each do
//! not push out the bucket of a client that keeps asking; and an address quiet for as long
//! as its bucket takes to fill is dropped, which loses nothing (a full bucket and a new one
//! are the same). A dropped bucket starts full again: under pressure the limiter can forget
//! a client, never refuse one wrongly.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use moka::sync::Cache;
use tokio::time::Instant;

use super::error::ProxyError;
use super::{respond, Answer, Outcome_};
use crate::config::{Config, Rate};
use crate::geo::Locator;
use crate::telemetry::CacheResult;

/// Client addresses whose buckets are kept at most (each an `Arc<AtomicU64>` and moka's
/// entry around it). Past it, addresses seen rarely go first.
const CLIENTS: u64 = 65_536;

/// One rate as GCRA parameters, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Between two requests at the sustained rate.
    interval: u64,
    /// How far ahead of now the due time may run: the burst less one request.
    tolerance: u64,
}

impl Gcra {
    fn new(rate: &Rate) -> Gcra {
        let interval = u64::try_from(rate.interval().as_nanos()).unwrap_or(u64::MAX);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.burst.saturating_sub(1))),
        }
    }

    /// Takes one request's allowance from the bucket whose due time is `due` at `now`
    /// (nanoseconds since the limiter started). `Err` holds how long until one is back.
    fn take(&self, due: &AtomicU64, now: u64) -> Result<(), u64> {
        let mut seen = due.load(Ordering::Relaxed);
        loop {
            let from = seen.max(now);
            let ahead = from - now;
            if ahead > self.tolerance {
                return Err(ahead - self.tolerance);
            }
            match due.compare_exchange_weak(
                seen,
                from.saturating_add(self.interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => seen = current,
            }
        }
    }

    /// How long an untouched bucket takes to be full again, whatever was taken from it.
    fn refill(&self) -> Duration {
        Duration::from_nanos(self.tolerance.saturating_add(self.interval))
    }
}

/// Which bucket refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Client,
    Site,
}

/// The request-rate limits of every site and client.
pub(super) struct Limits {
    /// Any limit configured; `check` looks at nothing else when false.
    on: bool,
    epoch: Instant,
    clients: Option<(Gcra, Cache<IpAddr, Arc<AtomicU64>>)>,
    /// By site index; `None` for a site without a rate.
    sites: Box<[Option<(Gcra, AtomicU64)>]>,
}

impl Limits {
    pub(super) fn new(config: &Config) -> Limits {
        let clients = config.server.rate_per_client.as_ref().map(|r| {
            let gcra = Gcra::new(r);
            (gcra, buckets(&gcra, CLIENTS))
        });
        let sites: Box<[_]> = config
            .sites
            .iter()
            .map(|s| s.rate.as_ref().map(|r| (Gcra::new(r), AtomicU64::new(0))))
            .collect();
        Limits {
            on: clients.is_some() || sites.iter().any(Option::is_some),
            epoch: Instant::now(),
            clients,
            sites,
        }
    }

    /// The answer for a request to site `site` that arrived from `peer` with `headers` when
    /// it is over a limit; `None` to serve it.
    #[inline]
    pub(super) fn check(
        &self,
        site: usize,
        peer: IpAddr,
        headers: &HeaderMap,
        locator: &Locator,
    ) -> Option<Answer> {
        if !self.on {
            return None;
        }
        self.check_on(site, || locator.client(peer, headers))
    }

    /// [`Limits::check`] when some limit is configured; `client` names the client (after
    /// trusted proxies), asked only when a per-client rate is set.
    #[cold]
    #[inline(never)]
    fn check_on(&self, site: usize, client: impl FnOnce() -> IpAddr) -> Option<Answer> {
        let client = self.clients.is_some().then(client);
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let (over, wait) = self.take(site, client, now).err()?;
        tracing::debug!(client = ?client, site, ?over, wait_ns = wait, "request rate limited");
        Some(too_many(over, wait))
    }

    /// Takes one request's allowance for `client` (when clients are limited) and `site` at
    /// `now`, nanoseconds since `epoch`; `Err` says which bucket was empty and for how long.
    fn take(&self, site: usize, client: Option<IpAddr>, now: u64) -> Result<(), (Over, u64)> {
        if let (Some((gcra, buckets)), Some(client)) = (&self.clients, client) {
            let due = buckets.get_with(client, Arc::default);
            gcra.take(&due, now).map_err(|w| (Over::Client, w))?;
        }
        if let Some(Some((gcra, due))) = self.sites.get(site) {
            gcra.take(due, now).map_err(|w| (Over::Site, w))?;
        }
        Ok(())
    }
}

/// The per-client buckets: at most `capacity`, each dropped once it would be full again.
fn buckets(gcra: &Gcra, capacity: u64) -> Cache<IpAddr, Arc<AtomicU64>> {
    Cache::builder()
        .max_capacity(capacity)
        .time_to_idle(gcra.refill())
        .build()
}

/// 429 with `Retry-After` in whole seconds, rounded up (RFC 9110 §10.2.3 has no fractions),
/// so a client that waits as told finds its allowance back.
fn too_many(over: Over, wait_ns: u64) -> Answer {
    let mut resp = respond::error(match over {
        Over::Client => ProxyError::ClientRate,
        Over::Site => ProxyError::SiteRate,
    });
    let seconds = wait_ns.div_ceil(1_000_000_000).max(1);
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds));
    (resp, Outcome_::local(CacheResult::Limited))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Site;

    const SECOND: u64 = 1_000_000_000;

    fn rate(count: u32, period_s: u64, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(period_s),
            burst,
        }
    }

    /// Takes from one bucket at each time in `at` (seconds); `expected` holds `Ok` or the
    /// wait in seconds.
    fn check(r: Rate, at: &[f64], expected: &[Result<(), f64>]) {
        let gcra = Gcra::new(&r);
        let due = AtomicU64::new(0);
        let got: Vec<Result<(), f64>> = at
            .iter()
            .map(|t| {
                gcra.take(&due, (t * SECOND as f64) as u64)
                    .map_err(|w| w as f64 / SECOND as f64)
            })
            .collect();
        assert_eq!(got, expected, "{r:?} at {at:?}");
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        // 2/s, burst 4: four at once, then one every half second.
        check(
            rate(2, 1, 4),
            &[10.0, 10.0, 10.0, 10.0, 10.0, 10.5, 10.5, 11.0],
            &[
                Ok(()),
                Ok(()),
                Ok(()),
                Ok(()),
                Err(0.5),
                Ok(()),
                Err(0.5),
                Ok(()),
            ],
        );
        // Burst 1: strictly spaced.
        check(
            rate(1, 1, 1),
            &[0.0, 0.25, 1.0, 1.5, 2.0],
            &[Ok(()), Err(0.75), Ok(()), Err(0.5), Ok(())],
        );
    }

    #[test]
    fn refused_requests_take_nothing() {
        // Hammering an empty bucket does not push its next allowance further away.
        check(
            rate(2, 60, 2),
            &[0.0, 0.0, 1.0, 2.0, 3.0, 30.0],
            &[Ok(()), Ok(()), Err(29.0), Err(28.0), Err(27.0), Ok(())],
        );
    }

    #[test]
    fn a_quiet_bucket_is_full_again_after_its_refill_time() {
        let r = rate(2, 60, 2);
        let gcra = Gcra::new(&r);
        assert_eq!(gcra.refill(), Duration::from_secs(60));
        // Emptied at 0; a minute later as good as new: the burst again.
        check(
            r,
            &[0.0, 0.0, 60.0, 60.0, 60.0],
            &[Ok(()), Ok(()), Ok(()), Ok(()), Err(30.0)],
        );
    }

    #[test]
    fn the_slowest_rate_and_largest_burst_do_not_overflow() {
        let gcra = Gcra::new(&rate(1, 3600, 1_000_000));
        assert_eq!(gcra.tolerance, 3600 * SECOND * 999_999);
        let due = AtomicU64::new(0);
        for _ in 0..1000 {
            assert_eq!(gcra.take(&due, 0), Ok(()));
        }
        let far = u64::MAX - 1;
        assert_eq!(gcra.take(&AtomicU64::new(far), far), Ok(()));
        assert!(gcra.take(&AtomicU64::new(u64::MAX), 0).is_err());
    }

    fn limits(per_client: Option<Rate>, site_rates: &[Option<Rate>]) -> Limits {
        let mut config = Config::from_toml(
            "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"a\"]\norigin = \"a\"\n",
            "t.toml",
            std::path::Path::new("."),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        config.server.rate_per_client = per_client;
        config.sites = site_rates
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut s = Site::new(vec![format!("s{i}.test")], 0);
                s.rate = *r;
                s
            })
            .collect();
        Limits::new(&config)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn off_unless_configured() {
        assert!(!limits(None, &[None, None]).on);
        assert!(limits(None, &[None, Some(rate(1, 1, 1))]).on);
        assert!(limits(Some(rate(1, 1, 1)), &[None]).on);
        let l = limits(None, &[None]);
        let answer = l.check(
            0,
            "192.0.2.1".parse().expect("ip"),
            &HeaderMap::new(),
            &Locator::default(),
        );
        assert!(answer.is_none());
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let l = limits(Some(rate(2, 60, 2)), &[None]);
        let (a, b) = (ip("192.0.2.1"), ip("2001:db8::1"));
        assert_eq!(l.take(0, a, 0), Ok(()));
        assert_eq!(l.take(0, a, 0), Ok(()));
        assert_eq!(l.take(0, a, SECOND), Err((Over::Client, 29 * SECOND)));
        assert_eq!(l.take(0, b, SECOND), Ok(()));
        assert_eq!(l.take(0, b, SECOND), Ok(()));
        assert!(l.take(0, b, SECOND).is_err());
    }

    #[test]
    fn a_site_limits_its_clients_together_and_only_itself() {
        let l = limits(None, &[Some(rate(2, 60, 2)), None]);
        assert_eq!(l.take(0, ip("192.0.2.1"), 0), Ok(()));
        assert_eq!(l.take(0, ip("192.0.2.2"), 0), Ok(()));
        assert_eq!(
            l.take(0, ip("192.0.2.3"), 0),
            Err((Over::Site, 30 * SECOND))
        );
        assert_eq!(l.take(1, ip("192.0.2.3"), 0), Ok(()), "the other site");
    }

    #[test]
    fn a_client_over_its_rate_spends_nothing_of_its_sites() {
        let l = limits(Some(rate(1, 60, 1)), &[Some(rate(3, 60, 3))]);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert_eq!(l.take(0, a, 0), Ok(()));
        for _ in 0..10 {
            assert_eq!(l.take(0, a, 0).map_err(|e| e.0), Err(Over::Client));
        }
        assert_eq!(l.take(0, b, 0), Ok(()), "the site still has room");
    }

    #[test]
    fn sprayed_addresses_are_bounded_and_do_not_free_a_busy_client() {
        let gcra = Gcra::new(&rate(5, 3600, 5));
        let buckets = buckets(&gcra, 1000);
        let busy: IpAddr = "192.0.2.1".parse().expect("ip");
        let take = |ip: IpAddr| gcra.take(&buckets.get_with(ip, Arc::default), 0);
        for _ in 0..5 {
            assert_eq!(take(busy), Ok(()));
        }
        for _ in 0..20 {
            assert!(take(busy).is_err());
        }
        // Addresses seen once each, while the busy client goes on asking.
        for i in 0..20_000u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(take(ip), Ok(()));
            if i % 10 == 0 {
                assert!(
                    take(busy).is_err(),
                    "the busy client's bucket was kept ({i})"
                );
            }
        }
        buckets.run_pending_tasks();
        assert!(buckets.entry_count() <= 1000, "{}", buckets.entry_count());
    }

    #[test]
    fn the_answer_is_429_with_whole_seconds_rounded_up() {
        let check = |wait_ns: u64, expected: &str| {
            let (resp, outcome) = too_many(Over::Client, wait_ns);
            assert_eq!(resp.status(), http::StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                resp.headers().get(RETRY_AFTER).map(|v| v.as_bytes()),
                Some(expected.as_bytes()),
                "{wait_ns} ns"
            );
            assert!(!resp.headers().contains_key("cache-status"));
            assert_eq!(outcome.cache, CacheResult::Limited);
        };
        check(1, "1");
        check(SECOND, "1");
        check(SECOND + 1, "2");
        check(30 * SECOND - 5, "30");
        check(0, "1");
    }
}

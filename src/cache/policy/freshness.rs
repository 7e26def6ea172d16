//! Freshness and age (RFC 9111 §4.2): the explicit lifetime a response carries, its corrected
//! initial and current age, and how a stored response may serve a request ([`reuse`]: fresh,
//! stale but accepted, stale-while-revalidate per RFC 5861, or revalidate first).

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};

use super::directives::DELTA_MAX;
use super::{http_date, CacheControl};

/// The explicit freshness lifetime for a shared cache: `s-maxage`, else `max-age`, else
/// `Expires` minus `Date` (§4.2.1). An invalid `Expires` means already stale (zero).
pub fn freshness_lifetime(
    headers: &HeaderMap,
    cc: &CacheControl,
    response_time: SystemTime,
) -> Option<Duration> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(s));
    }
    let mut all = headers.get_all(header::EXPIRES).iter();
    let expires = all.next()?;
    let Some(expires) = http_date(expires).filter(|_| all.next().is_none()) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// RFC 9111 §4.2.3: the corrected initial age of a response received at `response_time` for a
/// request sent at `request_time`. The current age is this plus the time since `response_time`.
pub fn corrected_initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let date = headers.get(header::DATE).and_then(http_date);
    let apparent_age = date
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(DELTA_MAX)))
        .unwrap_or(Duration::ZERO);
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value + response_delay)
}

/// Current age: corrected initial age plus resident time (§4.2.3).
pub fn current_age(initial_age: Duration, response_time: SystemTime, now: SystemTime) -> Duration {
    initial_age + now.duration_since(response_time).unwrap_or(Duration::ZERO)
}

/// What a stored response can do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh and acceptable: answer from the cache.
    Fresh,
    /// Stale, but the client accepts it (`max-stale`).
    StaleAccepted,
    /// Stale within `stale-while-revalidate`: answer now, refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first (stale, `no-cache`, or the client asked).
    Revalidate,
}

/// The stored facts a reuse decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct StoredFacts {
    pub age: Duration,
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub always_revalidate: bool,
    pub must_revalidate: bool,
}

/// Decides how a stored response may serve a request (RFC 9111 §4, RFC 5861). `forced` is a
/// client `no-cache` / `max-age=0` that the site honours by revalidating.
pub fn reuse(stored: &StoredFacts, req: &CacheControl, forced: bool) -> Reuse {
    if forced || stored.always_revalidate {
        return Reuse::Revalidate;
    }
    let age = stored.age.as_secs();
    if stored.age < stored.lifetime {
        let too_old = req.max_age.is_some_and(|m| age > m);
        let left = stored.lifetime.saturating_sub(stored.age).as_secs();
        let not_fresh_enough = req.min_fresh.is_some_and(|m| left < m);
        return if too_old || not_fresh_enough {
            Reuse::Revalidate
        } else {
            Reuse::Fresh
        };
    }
    if stored.must_revalidate {
        return Reuse::Revalidate;
    }
    let staleness = stored.age - stored.lifetime;
    if req.max_stale.is_some_and(|m| staleness.as_secs() <= m)
        && req.max_age.is_none_or(|m| age <= m)
    {
        return Reuse::StaleAccepted;
    }
    if staleness <= stored.stale_while_revalidate
        && req.max_age.is_none()
        && req.min_fresh.is_none()
    {
        return Reuse::StaleWhileRevalidate;
    }
    Reuse::Revalidate
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{cc, headers, t};
    use super::*;

    fn facts(age: u64, lifetime: u64, swr: u64, must: bool) -> StoredFacts {
        StoredFacts {
            age: Duration::from_secs(age),
            lifetime: Duration::from_secs(lifetime),
            stale_while_revalidate: Duration::from_secs(swr),
            always_revalidate: false,
            must_revalidate: must,
        }
    }

    #[test]
    fn reuse_decisions() {
        let none = CacheControl::default();
        assert_eq!(reuse(&facts(5, 10, 0, false), &none, false), Reuse::Fresh);
        assert_eq!(
            reuse(&facts(5, 10, 0, false), &none, true),
            Reuse::Revalidate
        );
        assert_eq!(
            reuse(&facts(15, 10, 10, false), &none, false),
            Reuse::StaleWhileRevalidate
        );
        assert_eq!(
            reuse(&facts(25, 10, 10, false), &none, false),
            Reuse::Revalidate
        );
        assert_eq!(
            reuse(&facts(15, 10, 10, true), &none, false),
            Reuse::Revalidate
        );
        assert_eq!(
            reuse(&facts(15, 10, 0, false), &cc("max-stale=10"), false),
            Reuse::StaleAccepted
        );
        assert_eq!(
            reuse(&facts(15, 10, 0, false), &cc("max-stale"), false),
            Reuse::StaleAccepted
        );
        assert_eq!(
            reuse(&facts(15, 10, 0, true), &cc("max-stale"), false),
            Reuse::Revalidate
        );
        assert_eq!(
            reuse(&facts(5, 10, 0, false), &cc("max-age=3"), false),
            Reuse::Revalidate
        );
        assert_eq!(
            reuse(&facts(5, 10, 0, false), &cc("min-fresh=6"), false),
            Reuse::Revalidate
        );
    }

    #[test]
    fn age_calculation_section_4_2_3() {
        // Date 10 s before the response arrived; Age header 3; request took 2 s.
        let h = headers(&[("date", "Mon, 12 Jan 1970 13:46:30 GMT"), ("age", "3")]);
        let got = corrected_initial_age(&h, t(999_998), t(1_000_000));
        assert_eq!(got, Duration::from_secs(10), "apparent age wins");
        let h = headers(&[("date", "Mon, 12 Jan 1970 13:46:40 GMT"), ("age", "30")]);
        let got = corrected_initial_age(&h, t(999_998), t(1_000_000));
        assert_eq!(got, Duration::from_secs(32), "age + response delay wins");
        assert_eq!(
            current_age(got, t(1_000_000), t(1_000_005)),
            Duration::from_secs(37)
        );
    }
}

//! Whether a shared cache may store a response (RFC 9111 §3) and how it may use it
//! ([`storable`] → [`StoreDecision`]): lifetime from the directives, `Expires`, the status
//! code's heuristic (§4.2.2) or a site rule; RFC 5861 stale windows; fields to strip. A
//! refusal is a [`NoStoreReason`], reported in `Cache-Status` and metrics.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

use super::{freshness_lifetime, http_date, response_directives, CacheControl};

/// Why a response was not stored, reported in `Cache-Status` `detail=` and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    /// The request method is not GET (or HEAD fetched as GET).
    Method,
    /// The request said `Cache-Control: no-store`.
    RequestNoStore,
    /// The status code is not final, or is a partial or not-modified response.
    Status,
    NoStore,
    Private,
    SetCookie,
    /// The request carried `Authorization` and the response did not allow sharing it.
    Authorization,
    /// `Vary: *` can never be matched.
    VaryStar,
    /// No freshness and nothing to revalidate with.
    NotFresh,
    /// Larger than `cache.max_object_size`.
    TooLarge,
    /// The origin's transfer did not complete.
    Aborted,
    /// A site rule says not to cache this path.
    Bypass,
    /// This URL was recently uncacheable; requests go straight to the origin for a while.
    HitForMiss,
    /// A new `Vary` variant of a URL that has gained new variants faster than the store allows
    /// (`cache::store`): served, not stored, so junk values cannot push out popular variants.
    VariantRate,
}

impl NoStoreReason {
    /// Every reason, for precomputing header values.
    pub const ALL: [NoStoreReason; 14] = [
        NoStoreReason::Method,
        NoStoreReason::RequestNoStore,
        NoStoreReason::Status,
        NoStoreReason::NoStore,
        NoStoreReason::Private,
        NoStoreReason::SetCookie,
        NoStoreReason::Authorization,
        NoStoreReason::VaryStar,
        NoStoreReason::NotFresh,
        NoStoreReason::TooLarge,
        NoStoreReason::Aborted,
        NoStoreReason::Bypass,
        NoStoreReason::HitForMiss,
        NoStoreReason::VariantRate,
    ];

    /// The token used in `Cache-Status: ...; detail=`.
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Method => "method",
            NoStoreReason::RequestNoStore => "request-no-store",
            NoStoreReason::Status => "status",
            NoStoreReason::NoStore => "no-store",
            NoStoreReason::Private => "private",
            NoStoreReason::SetCookie => "set-cookie",
            NoStoreReason::Authorization => "authorization",
            NoStoreReason::VaryStar => "vary-star",
            NoStoreReason::NotFresh => "not-fresh",
            NoStoreReason::TooLarge => "too-large",
            NoStoreReason::Aborted => "aborted",
            NoStoreReason::Bypass => "bypass",
            NoStoreReason::HitForMiss => "hit-for-miss",
            NoStoreReason::VariantRate => "variant-rate",
        }
    }
}

/// What the store needs to know about a request, taken once per request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub has_authorization: bool,
    pub cache_control: &'a CacheControl,
}

/// A site's (and matching rule's) settings that shape storage decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Fraction of `Date - Last-Modified` used as heuristic lifetime (RFC 9111 §4.2.2).
    pub heuristic_fraction: f64,
    /// Cap on heuristic lifetime.
    pub heuristic_max: Duration,
    /// Store responses that set cookies (the stored copy never carries `Set-Cookie`).
    pub store_set_cookie: bool,
    /// Grace when the origin gives no `stale-while-revalidate`.
    pub default_stale_while_revalidate: Duration,
    /// Grace when the origin gives no `stale-if-error`.
    pub default_stale_if_error: Duration,
    /// How long a response is kept past its freshness: for revalidation (when it has a
    /// validator) and for clients that accept stale (`max-stale`).
    pub keep: Duration,
    /// Rule: lifetime that replaces the origin's.
    pub force_ttl: Option<Duration>,
    pub min_ttl: Option<Duration>,
    pub max_ttl: Option<Duration>,
    /// Rule: stale windows that replace the origin's and the defaults.
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// Rule: lifetimes for given status codes (e.g. cache 404 for 30 s).
    pub status_ttl: Vec<(u16, Duration)>,
    /// The targeted field this cache obeys first (`cache.cache_control_field`).
    pub cache_control_field: http::HeaderName,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heuristic_fraction: 0.1,
            heuristic_max: Duration::from_secs(86_400),
            store_set_cookie: false,
            default_stale_while_revalidate: Duration::ZERO,
            default_stale_if_error: Duration::ZERO,
            keep: Duration::from_secs(600),
            force_ttl: None,
            min_ttl: None,
            max_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            status_ttl: Vec::new(),
            cache_control_field: super::EDGECACHE_CACHE_CONTROL.clone(),
        }
    }
}

/// How a response may be stored and reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDecision {
    /// Freshness lifetime (§4.2.1), possibly zero when a validator makes storing worthwhile.
    pub lifetime: Duration,
    /// Stale windows (RFC 5861), zero when stale use is forbidden.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// `no-cache`: revalidate before every use.
    pub always_revalidate: bool,
    /// `must-revalidate` / `proxy-revalidate`: never used stale.
    pub must_revalidate: bool,
    /// `s-maxage` was given: for a shared cache it carries `proxy-revalidate`'s meaning
    /// (RFC 9111 §5.2.2.10), so the response is not served stale when the origin cannot be
    /// reached (explicit RFC 5861 windows still apply).
    pub shared_max_age: bool,
    /// How long past staleness to keep the response for revalidation.
    pub keep: Duration,
    /// Header fields not to store (`private="…"`, `no-cache="…"`, opted-in `Set-Cookie`).
    pub strip: Vec<Box<str>>,
}

impl StoreDecision {
    /// Fresh for `lifetime`, then gone: no stale use, no revalidation duties, nothing
    /// stripped (what a plain `max-age` response gets).
    pub fn fresh_for(lifetime: Duration) -> StoreDecision {
        StoreDecision {
            lifetime,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            always_revalidate: false,
            must_revalidate: false,
            shared_max_age: false,
            keep: Duration::ZERO,
            strip: Vec::new(),
        }
    }

    /// How long the store should keep the response after it arrived.
    pub fn retention(&self) -> Duration {
        self.lifetime
            + self
                .stale_while_revalidate
                .max(self.stale_if_error)
                .max(self.keep)
    }
}

/// Status codes whose caching rules this cache implements (for `must-understand`): those of
/// RFC 9110 (the heuristically cacheable ones, and the redirects and errors it stores only
/// with explicit freshness).
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status)
        || matches!(
            status.as_u16(),
            302 | 303
                | 307
                | 400
                | 403
                | 406
                | 409
                | 412
                | 413
                | 415
                | 416
                | 422
                | 500
                | 502
                | 503
                | 504
        )
}

/// Status codes a cache may give a heuristic lifetime (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a shared cache may store a response (RFC 9111 §3) and how it may reuse it.
pub fn storable(
    req: RequestFacts<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    settings: &Settings,
    response_time: SystemTime,
) -> Result<StoreDecision, NoStoreReason> {
    if req.method != Method::GET {
        return Err(NoStoreReason::Method);
    }
    if req.cache_control.no_store {
        return Err(NoStoreReason::RequestNoStore);
    }
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NoStoreReason::Status);
    }
    let (cc, targeted) = response_directives(headers, &settings.cache_control_field);
    // §5.2.2.3: with `must-understand`, a status code whose caching rules this cache knows is
    // stored by them despite `no-store` (sent for caches that do not know the directive); any
    // other is not stored.
    if cc.must_understand && !understood(status) {
        return Err(NoStoreReason::Status);
    }
    if cc.no_store && !cc.must_understand {
        return Err(NoStoreReason::NoStore);
    }
    if cc.private {
        return Err(NoStoreReason::Private);
    }
    // §3.5: a shared cache reuses responses to authenticated requests only when told it may.
    if req.has_authorization && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NoStoreReason::Authorization);
    }
    let mut strip: Vec<Box<str>> = cc.private_fields.clone();
    strip.extend(cc.no_cache_fields.iter().cloned());
    if headers.contains_key(header::SET_COOKIE) {
        if !settings.store_set_cookie {
            return Err(NoStoreReason::SetCookie);
        }
        strip.push("set-cookie".into());
    }
    if vary_has_star(headers) {
        return Err(NoStoreReason::VaryStar);
    }
    let explicit = if targeted {
        cc.s_maxage.or(cc.max_age).map(Duration::from_secs)
    } else {
        freshness_lifetime(headers, &cc, response_time)
    };
    let rule_status = settings
        .status_ttl
        .iter()
        .find(|(s, _)| *s == status.as_u16())
        .map(|(_, d)| *d);
    let mut lifetime = match (settings.force_ttl.or(rule_status), explicit) {
        (Some(forced), _) => forced,
        (None, Some(l)) => l,
        (None, None) if heuristically_cacheable(status) || cc.public => {
            heuristic_lifetime(headers, settings, response_time)
        }
        (None, None) => return Err(NoStoreReason::NotFresh),
    };
    if settings.force_ttl.is_none() && rule_status.is_none() {
        if let Some(min) = settings.min_ttl {
            lifetime = lifetime.max(min);
        }
        if let Some(max) = settings.max_ttl {
            lifetime = lifetime.min(max);
        }
    }
    let must_revalidate = cc.must_revalidate || cc.proxy_revalidate;
    let always_revalidate = cc.no_cache;
    let has_validator =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    // Site defaults are implicit permission to serve stale; `s-maxage` withdraws it (§5.2.2.10),
    // an explicit RFC 5861 directive does not.
    let implicit_ok = cc.s_maxage.is_none();
    let window = |explicit: Option<u64>, default: Duration, rule: Option<Duration>| {
        if must_revalidate || always_revalidate {
            return Duration::ZERO;
        }
        rule.or(explicit.map(Duration::from_secs))
            .unwrap_or(if implicit_ok { default } else { Duration::ZERO })
    };
    let swr = window(
        cc.stale_while_revalidate,
        settings.default_stale_while_revalidate,
        settings.stale_while_revalidate,
    );
    let sie = window(
        cc.stale_if_error,
        settings.default_stale_if_error,
        settings.stale_if_error,
    );
    let keep = settings.keep;
    // Stale on arrival with nothing to revalidate with and no stale window: no use.
    if lifetime.is_zero() && !has_validator && swr.is_zero() && sie.is_zero() {
        return Err(NoStoreReason::NotFresh);
    }
    Ok(StoreDecision {
        lifetime,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        always_revalidate,
        must_revalidate,
        shared_max_age: cc.s_maxage.is_some(),
        keep,
        strip,
    })
}

/// RFC 9111 §4.2.2: a fraction of the time since `Last-Modified`, capped; zero without it.
fn heuristic_lifetime(
    headers: &HeaderMap,
    settings: &Settings,
    response_time: SystemTime,
) -> Duration {
    let Some(lm) = headers.get(header::LAST_MODIFIED).and_then(http_date) else {
        return Duration::ZERO;
    };
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    let since = date.duration_since(lm).unwrap_or(Duration::ZERO);
    since
        .mul_f64(settings.heuristic_fraction.clamp(0.0, 1.0))
        .min(settings.heuristic_max)
}

/// True if any `Vary` field line lists `*`.
pub fn vary_has_star(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim() == "*")
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{headers, t};
    use super::*;

    fn decide(
        req_auth: bool,
        status: u16,
        hdrs: &[(&str, &str)],
        settings: &Settings,
    ) -> Result<StoreDecision, NoStoreReason> {
        let h = headers(hdrs);
        let req_cc = CacheControl::default();
        let req = RequestFacts {
            method: &Method::GET,
            has_authorization: req_auth,
            cache_control: &req_cc,
        };
        storable(
            req,
            StatusCode::from_u16(status).expect("status"),
            &h,
            settings,
            t(1_000_000),
        )
    }

    /// Checks the lifetime (in seconds) or the refusal, with default settings and no keep.
    fn check(
        req_auth: bool,
        status: u16,
        hdrs: &[(&str, &str)],
        expected: Result<u64, NoStoreReason>,
    ) {
        let settings = Settings {
            keep: Duration::ZERO,
            ..Settings::default()
        };
        let got = decide(req_auth, status, hdrs, &settings);
        assert_eq!(got.map(|d| d.lifetime.as_secs()), expected, "{hdrs:?}");
    }

    #[test]
    fn s_maxage_over_max_age_over_expires() {
        check(
            false,
            200,
            &[("cache-control", "max-age=10, s-maxage=20")],
            Ok(20),
        );
        check(
            false,
            200,
            &[
                ("cache-control", "max-age=10"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ],
            Ok(10),
        );
        check(
            false,
            200,
            &[
                ("date", "Mon, 12 Jan 1970 13:46:40 GMT"),
                ("expires", "Mon, 12 Jan 1970 13:47:40 GMT"),
            ],
            Ok(60),
        );
    }

    #[test]
    fn invalid_expires_is_stale() {
        check(
            false,
            200,
            &[("expires", "0")],
            Err(NoStoreReason::NotFresh),
        );
    }

    #[test]
    fn refusals() {
        check(
            false,
            200,
            &[("cache-control", "no-store, max-age=60")],
            Err(NoStoreReason::NoStore),
        );
        check(
            false,
            200,
            &[("cache-control", "private, max-age=60")],
            Err(NoStoreReason::Private),
        );
        check(
            false,
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            Err(NoStoreReason::SetCookie),
        );
        check(
            false,
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept, *")],
            Err(NoStoreReason::VaryStar),
        );
        check(
            false,
            206,
            &[("cache-control", "max-age=60")],
            Err(NoStoreReason::Status),
        );
        check(false, 200, &[], Err(NoStoreReason::NotFresh));
        check(false, 302, &[], Err(NoStoreReason::NotFresh));
    }

    #[test]
    fn targeted_fields_override_cache_control_rfc_9213() {
        check(
            false,
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=30"),
            ],
            Ok(30),
        );
        check(
            false,
            200,
            &[
                ("cache-control", "max-age=5"),
                ("surrogate-control", "max-age=300"),
            ],
            Ok(300),
        );
        check(
            false,
            200,
            &[
                ("cache-control", "max-age=5"),
                ("cdn-cache-control", "max-age=7"),
                ("surrogate-control", "max-age=300"),
            ],
            Ok(7),
        );
        // Expires is ignored when a targeted field applies.
        check(
            false,
            200,
            &[
                ("cdn-cache-control", "public"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ],
            Err(NoStoreReason::NotFresh),
        );
    }

    #[test]
    fn heuristic_freshness_section_4_2_2() {
        // Last modified 1000 s before Date: 10% is 100 s.
        let lm = httpdate::fmt_http_date(t(999_000));
        let date = httpdate::fmt_http_date(t(1_000_000));
        check(
            false,
            200,
            &[("last-modified", &lm), ("date", &date)],
            Ok(100),
        );
        check(
            false,
            404,
            &[("last-modified", &lm), ("date", &date)],
            Ok(100),
        );
        check(
            false,
            302,
            &[("last-modified", &lm), ("date", &date)],
            Err(NoStoreReason::NotFresh),
        );
        check(
            false,
            302,
            &[
                ("last-modified", &lm),
                ("date", &date),
                ("cache-control", "public"),
            ],
            Ok(100),
        );
        let capped = Settings {
            heuristic_max: Duration::from_secs(30),
            keep: Duration::ZERO,
            ..Settings::default()
        };
        let d = decide(
            false,
            200,
            &[("last-modified", &lm), ("date", &date)],
            &capped,
        )
        .expect("stored");
        assert_eq!(d.lifetime, Duration::from_secs(30));
    }

    #[test]
    fn validators_make_zero_lifetime_worth_storing() {
        let d = decide(
            false,
            200,
            &[("cache-control", "max-age=0"), ("etag", "\"a\"")],
            &Settings::default(),
        )
        .expect("stored");
        assert_eq!(d.lifetime, Duration::ZERO);
        assert_eq!(d.keep, Settings::default().keep);
        check(
            false,
            200,
            &[("cache-control", "max-age=0")],
            Err(NoStoreReason::NotFresh),
        );
    }

    #[test]
    fn no_cache_and_qualified_private_are_stored_with_conditions() {
        let d = decide(
            false,
            200,
            &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
            &Settings::default(),
        )
        .expect("stored");
        assert!(d.always_revalidate);
        let d = decide(
            false,
            200,
            &[(
                "cache-control",
                "private=\"x-user\", no-cache=\"x-debug\", max-age=60",
            )],
            &Settings::default(),
        )
        .expect("stored");
        assert_eq!(d.strip, vec![Box::from("x-user"), Box::from("x-debug")]);
        assert!(!d.always_revalidate);
    }

    #[test]
    fn stale_windows_rfc_5861_and_grace() {
        let grace = Settings {
            default_stale_while_revalidate: Duration::from_secs(10),
            default_stale_if_error: Duration::from_secs(100),
            ..Settings::default()
        };
        let d = decide(false, 200, &[("cache-control", "max-age=60")], &grace).expect("stored");
        assert_eq!(
            (
                d.stale_while_revalidate.as_secs(),
                d.stale_if_error.as_secs()
            ),
            (10, 100)
        );
        let d = decide(
            false,
            200,
            &[("cache-control", "max-age=60, stale-while-revalidate=5")],
            &grace,
        )
        .expect("stored");
        assert_eq!(d.stale_while_revalidate.as_secs(), 5);
        let d = decide(
            false,
            200,
            &[(
                "cache-control",
                "max-age=60, must-revalidate, stale-if-error=5",
            )],
            &grace,
        )
        .expect("stored");
        assert_eq!(
            (
                d.stale_while_revalidate.as_secs(),
                d.stale_if_error.as_secs()
            ),
            (0, 0)
        );
        assert!(d.must_revalidate);
        let d = decide(false, 200, &[("cache-control", "s-maxage=60")], &grace).expect("stored");
        assert_eq!(
            d.stale_if_error.as_secs(),
            0,
            "s-maxage withdraws implicit grace"
        );
        let d = decide(
            false,
            200,
            &[("cache-control", "s-maxage=60, stale-if-error=30")],
            &grace,
        )
        .expect("stored");
        assert_eq!(d.stale_if_error.as_secs(), 30, "explicit permission stands");
    }

    #[test]
    fn rules_force_and_clamp_ttl() {
        let force = Settings {
            force_ttl: Some(Duration::from_secs(5)),
            ..Settings::default()
        };
        assert_eq!(
            decide(false, 200, &[("cache-control", "max-age=600")], &force)
                .map(|d| d.lifetime.as_secs()),
            Ok(5)
        );
        let clamp = Settings {
            min_ttl: Some(Duration::from_secs(60)),
            max_ttl: Some(Duration::from_secs(120)),
            ..Settings::default()
        };
        assert_eq!(
            decide(false, 200, &[("cache-control", "max-age=10")], &clamp)
                .map(|d| d.lifetime.as_secs()),
            Ok(60)
        );
        assert_eq!(
            decide(false, 200, &[("cache-control", "max-age=600")], &clamp)
                .map(|d| d.lifetime.as_secs()),
            Ok(120)
        );
        let s404 = Settings {
            status_ttl: vec![(404, Duration::from_secs(30))],
            keep: Duration::ZERO,
            ..Settings::default()
        };
        assert_eq!(
            decide(false, 404, &[], &s404).map(|d| d.lifetime.as_secs()),
            Ok(30)
        );
    }

    #[test]
    fn authorization_needs_permission() {
        check(
            true,
            200,
            &[("cache-control", "max-age=60")],
            Err(NoStoreReason::Authorization),
        );
        check(
            true,
            200,
            &[("cache-control", "public, max-age=60")],
            Ok(60),
        );
        check(true, 200, &[("cache-control", "s-maxage=60")], Ok(60));
    }
}

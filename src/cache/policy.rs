//! RFC 9111 decisions, as pure functions: may this response be stored, for how long is it
//! fresh, how old is it. No I/O and no clock: `now` is always a parameter.
//!
//! Written here rather than taken from `http-cache-semantics`: that crate models a private or
//! shared browser-style cache over its own request/response types, while we need the decisions
//! split so the hit path can reuse values computed at store time (lifetime, corrected initial
//! age) without re-parsing headers per hit, and reasons for not storing as an enum for
//! `Cache-Status` and metrics.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// Parsed `Cache-Control` directives (request or response). Unknown directives are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    /// Unqualified `no-cache`: store, but revalidate before every use.
    pub no_cache: bool,
    /// `no-cache="field, ..."`: those fields are not stored; the rest is reusable.
    pub no_cache_fields: Vec<Box<str>>,
    /// Unqualified `private`: a shared cache does not store the response.
    pub private: bool,
    /// `private="field, ..."`: a shared cache stores the response without those fields.
    pub private_fields: Vec<Box<str>>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// RFC 9111 §1.2.2: delta-seconds greater than 2^31 are taken as 2^31.
const DELTA_MAX: u64 = 1 << 31;

impl CacheControl {
    /// Parses every `Cache-Control` field line of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> CacheControl {
        Self::parse_values(headers.get_all(header::CACHE_CONTROL).iter())
    }

    /// Parses directive lists; when a directive repeats, its first occurrence wins (§4.2.1).
    pub fn parse_values<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in values {
            let Ok(text) = value.to_str() else { continue };
            for (name, arg) in Directives::new(text) {
                let seconds = || -> Option<u64> {
                    let a = arg?;
                    if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                        // An invalid delta is treated as zero: the response is stale (§4.2.1).
                        return Some(0);
                    }
                    Some(a.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
                };
                let set = |slot: &mut Option<u64>| {
                    if slot.is_none() {
                        *slot = seconds();
                    }
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => match arg {
                        Some(fields) => cc.no_cache_fields.extend(field_list(fields)),
                        None => cc.no_cache = true,
                    },
                    "private" => match arg {
                        Some(fields) => cc.private_fields.extend(field_list(fields)),
                        None => cc.private = true,
                    },
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "max-age" => set(&mut cc.max_age),
                    "s-maxage" => set(&mut cc.s_maxage),
                    // `max-stale` without a value accepts any staleness.
                    "max-stale" if cc.max_stale.is_none() => {
                        cc.max_stale = if arg.is_none() {
                            Some(u64::MAX)
                        } else {
                            seconds()
                        };
                    }
                    "min-fresh" => set(&mut cc.min_fresh),
                    "stale-while-revalidate" => set(&mut cc.stale_while_revalidate),
                    "stale-if-error" => set(&mut cc.stale_if_error),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits a qualified directive's field list (`"set-cookie, x-a"`) into lowercase names.
fn field_list(text: &str) -> impl Iterator<Item = Box<str>> + '_ {
    text.split(',')
        .map(|f| f.trim())
        .filter(|f| !f.is_empty())
        .map(|f| f.to_ascii_lowercase().into_boxed_str())
}

/// Iterates `name[=value]` pairs of a directive list, honouring quoted strings.
struct Directives<'a> {
    rest: &'a str,
}

impl<'a> Directives<'a> {
    fn new(text: &'a str) -> Self {
        Directives { rest: text }
    }
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest.trim_start_matches([',', ' ', '\t']);
            if s.is_empty() {
                return None;
            }
            let name_end = s.find(['=', ',']).unwrap_or(s.len());
            let name = s[..name_end].trim();
            if s[name_end..].starts_with('=') {
                let after = s[name_end + 1..].trim_start();
                if let Some(quoted) = after.strip_prefix('"') {
                    // Quoted string: find the closing quote, skipping escaped characters.
                    let bytes = quoted.as_bytes();
                    let mut i = 0;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    let end = i.min(quoted.len());
                    let value = &quoted[..end];
                    let tail = quoted.get(end + 1..).unwrap_or("");
                    self.rest = tail.find(',').map(|i| &tail[i..]).unwrap_or("");
                    if name.is_empty() {
                        continue;
                    }
                    return Some((name, Some(value)));
                }
                let end = after.find(',').unwrap_or(after.len());
                let value = after[..end].trim();
                self.rest = &after[end..];
                if name.is_empty() {
                    continue;
                }
                return Some((name, Some(value)));
            }
            self.rest = &s[name_end..];
            if name.is_empty() {
                continue;
            }
            return Some((name, None));
        }
    }
}

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

/// Status codes a cache may give a heuristic lifetime (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Fields for this cache only (not forwarded to clients), as names built at compile time:
/// looking a field up by `&str` parses the name on every call.
pub static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");
pub static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// The directives this cache obeys: `CDN-Cache-Control` (RFC 9213), else `Surrogate-Control`,
/// else `Cache-Control`. When a targeted field is used, `Cache-Control` and `Expires` are
/// ignored; the boolean says so.
pub fn response_directives(headers: &HeaderMap) -> (CacheControl, bool) {
    for name in [&CDN_CACHE_CONTROL, &SURROGATE_CONTROL] {
        if headers
            .get(name)
            .is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
        {
            let cc = CacheControl::parse_values(headers.get_all(name).iter());
            if cc != CacheControl::default() {
                return (cc, true);
            }
        }
    }
    (CacheControl::from_headers(headers), false)
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
    let (cc, targeted) = response_directives(headers);
    if cc.no_store {
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

/// The result of evaluating a client's preconditions against a stored response
/// (RFC 9110 §13.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Send the response (and honour `Range` if any).
    Proceed,
    /// Send the response, but ignore `Range` (`If-Range` did not match).
    IgnoreRange,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates `If-Match`, `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since` and
/// `If-Range` of a GET/HEAD request against the stored response's headers.
pub fn evaluate_preconditions(request: &HeaderMap, stored: &HeaderMap) -> Precondition {
    // Most requests carry no precondition: nothing stored needs parsing for them. One pass
    // over the request's few names (a byte comparison each for standard names) costs less
    // than a hash probe per conditional field.
    let conditional = request.keys().any(|n| {
        n == header::IF_MATCH
            || n == header::IF_NONE_MATCH
            || n == header::IF_MODIFIED_SINCE
            || n == header::IF_UNMODIFIED_SINCE
            || n == header::IF_RANGE
    });
    if !conditional {
        return Precondition::Proceed;
    }
    let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
    let last_modified = stored.get(header::LAST_MODIFIED).and_then(http_date);
    // `*` holds for any current representation (RFC 9110 §13.1.1, §13.1.2): the stored one,
    // with or without an ETag.
    if let Some(im) = joined(request, header::IF_MATCH) {
        if !(im.trim() == "*" || etag.is_some_and(|e| list_matches(&im, e, true))) {
            return Precondition::Failed;
        }
    } else if let Some(ius) = request.get(header::IF_UNMODIFIED_SINCE).and_then(http_date) {
        // Ignored when there is no Last-Modified to compare (RFC 9110 §13.1.4).
        if last_modified.is_some_and(|lm| lm > ius) {
            return Precondition::Failed;
        }
    }
    if let Some(inm) = joined(request, header::IF_NONE_MATCH) {
        if inm.trim() == "*" || etag.is_some_and(|e| list_matches(&inm, e, false)) {
            return Precondition::NotModified;
        }
    } else if let Some(ims) = request.get(header::IF_MODIFIED_SINCE).and_then(http_date) {
        if last_modified.is_some_and(|lm| lm <= ims) {
            return Precondition::NotModified;
        }
    }
    if request.contains_key(header::RANGE) {
        if let Some(ir) = request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
            let ir = ir.trim();
            let ok = if ir.starts_with('"') || ir.starts_with("W/") {
                // A strong comparison: weak tags never match If-Range.
                etag.is_some_and(|e| !e.starts_with("W/") && !ir.starts_with("W/") && e == ir)
            } else {
                httpdate::parse_http_date(ir)
                    .ok()
                    .is_some_and(|d| last_modified == Some(d))
            };
            if !ok {
                return Precondition::IgnoreRange;
            }
        }
    }
    Precondition::Proceed
}

fn joined(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v.to_str().ok()?;
        match &mut out {
            Some(o) => {
                o.push(',');
                o.push_str(s);
            }
            None => out = Some(s.to_owned()),
        }
    }
    out
}

/// True when `etag` is in the entity-tag `list` (or the list is `*`). Weak comparison ignores
/// the `W/` prefix; strong comparison fails on any weak tag.
pub fn list_matches(list: &str, etag: &str, strong: bool) -> bool {
    let list = list.trim();
    if list == "*" {
        return !etag.is_empty();
    }
    if etag.is_empty() || (strong && etag.starts_with("W/")) {
        return false;
    }
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let mine = opaque(etag);
    split_etags(list).any(|t| !(strong && t.starts_with("W/")) && opaque(t) == mine)
}

/// Splits an entity-tag list, honouring commas inside quotes.
fn split_etags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let s = rest.trim_start_matches([',', ' ', '\t']);
        if s.is_empty() {
            return None;
        }
        let start_quote = s.find('"')?;
        let end = s[start_quote + 1..]
            .find('"')
            .map(|i| start_quote + 1 + i + 1)
            .unwrap_or(s.len());
        rest = &s[end..];
        Some(s[..end].trim())
    })
}

/// Header fields a 304 carries from the stored response (RFC 9110 §15.4.5).
pub const NOT_MODIFIED_FIELDS: [header::HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
];

/// Updates stored headers from a 304 (RFC 9111 §3.2, §4.3.4): every field of the 304 replaces
/// the stored one, except `Content-Length` and fields the stored body depends on.
pub fn refresh_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let mut replaced: Vec<&header::HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_RANGE
        {
            continue;
        }
        if !replaced.contains(&name) {
            stored.remove(name);
            replaced.push(name);
        }
        stored.append(name.clone(), value.clone());
    }
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

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
const IMF_FIXDATE_LEN: usize = 29;

thread_local! {
    /// The last IMF-fixdate parsed on this thread and its time. An origin's `Date` is the same
    /// text for every response within a second, and each miss reads it twice (freshness and
    /// age); comparing 29 bytes is a tenth of parsing them. Same text, same time: the memo
    /// cannot change an answer.
    static LAST_FIXDATE: std::cell::Cell<Option<([u8; IMF_FIXDATE_LEN], SystemTime)>> =
        const { std::cell::Cell::new(None) };
}

/// Parses an HTTP-date (IMF-fixdate, RFC 850 or asctime).
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    let bytes = value.as_bytes();
    let fixed = <[u8; IMF_FIXDATE_LEN]>::try_from(bytes).ok();
    if let (Some(text), Some((last, time))) = (fixed, LAST_FIXDATE.get()) {
        if text == last {
            return Some(time);
        }
    }
    let time = httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()?;
    if let Some(text) = fixed {
        LAST_FIXDATE.set(Some((text, time)));
    }
    Some(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse_the_same_when_the_last_one_is_remembered() {
        let a = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
        let b = HeaderValue::from_static("Mon, 07 Nov 1994 08:49:37 GMT");
        let rfc850 = HeaderValue::from_static("Sunday, 06-Nov-94 08:49:37 GMT");
        let bad = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 XYZ");
        let ta = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let tb = ta + Duration::from_secs(86_400);
        for _ in 0..2 {
            assert_eq!(http_date(&a), Some(ta));
            assert_eq!(http_date(&a), Some(ta));
            assert_eq!(http_date(&b), Some(tb));
            assert_eq!(http_date(&rfc850), Some(ta));
            assert_eq!(http_date(&bad), None);
            assert_eq!(http_date(&b), Some(tb));
        }
    }

    fn cc(text: &str) -> CacheControl {
        CacheControl::parse_values(std::iter::once(
            &HeaderValue::from_str(text).expect("value"),
        ))
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

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
    fn directives_parse() {
        let c = cc(
            "public, max-age=60, s-maxage=\"120\", no-cache=\"set-cookie, foo\", stale-if-error=5",
        );
        assert!(c.public && !c.no_cache);
        assert_eq!(
            c.no_cache_fields,
            vec![Box::from("set-cookie"), Box::from("foo")]
        );
        assert_eq!(
            (c.max_age, c.s_maxage, c.stale_if_error),
            (Some(60), Some(120), Some(5))
        );
        let c = cc("MAX-AGE=10,max-age=20");
        assert_eq!(c.max_age, Some(10), "first occurrence wins");
        let c = cc("max-age=abc");
        assert_eq!(c.max_age, Some(0), "invalid delta is stale");
        let c = cc("max-age=99999999999999999999");
        assert_eq!(c.max_age, Some(DELTA_MAX));
        let c = cc("max-stale");
        assert_eq!(c.max_stale, Some(u64::MAX));
        let c = cc(",,  no-store ,");
        assert!(c.no_store);
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

    fn pre(req: &[(&str, &str)], stored: &[(&str, &str)]) -> Precondition {
        evaluate_preconditions(&headers(req), &headers(stored))
    }

    #[test]
    fn preconditions_rfc_9110_section_13() {
        let stored = [
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT"),
        ];
        assert_eq!(
            pre(&[("if-none-match", "\"v1\"")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "W/\"v1\"")], &stored),
            Precondition::NotModified,
            "weak comparison"
        );
        assert_eq!(
            pre(&[("if-none-match", "\"x\", \"v1\"")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "*")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "\"x\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::NotModified
        );
        assert_eq!(
            pre(
                &[("if-modified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[
                    ("if-none-match", "\"x\""),
                    ("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")
                ],
                &stored
            ),
            Precondition::Proceed,
            "If-None-Match takes precedence"
        );
        assert_eq!(pre(&[("if-match", "\"x\"")], &stored), Precondition::Failed);
        assert_eq!(
            pre(&[("if-match", "\"v1\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::Failed
        );
        assert_eq!(
            pre(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(&[("range", "bytes=0-1"), ("if-range", "\"v0\"")], &stored),
            Precondition::IgnoreRange
        );
        assert_eq!(
            pre(
                &[
                    ("range", "bytes=0-1"),
                    ("if-range", "Tue, 03 Nov 2026 10:00:00 GMT")
                ],
                &stored
            ),
            Precondition::Proceed
        );
        let weak = [("etag", "W/\"v1\"")];
        assert_eq!(
            pre(&[("if-match", "W/\"v1\"")], &weak),
            Precondition::Failed,
            "If-Match is strong"
        );
    }

    /// Found by the property `preconditions_follow_rfc_9110_section_13_2_2`: a stored response
    /// without Last-Modified answered If-Unmodified-Since with 412.
    #[test]
    fn if_unmodified_since_without_last_modified_is_ignored_rfc_9110_section_13_1_4() {
        let since = [("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT")];
        assert_eq!(pre(&since, &[("etag", "\"v1\"")]), Precondition::Proceed);
        assert_eq!(pre(&since, &[]), Precondition::Proceed);
    }

    /// Found by the same property: `*` needed a stored ETag, so a GET with `If-Match: *`
    /// got 412 and one with `If-None-Match: *` got 200 from a response stored without one.
    #[test]
    fn star_matches_a_stored_response_without_an_etag_rfc_9110_section_13_1_1() {
        assert_eq!(pre(&[("if-match", "*")], &[]), Precondition::Proceed);
        assert_eq!(
            pre(&[("if-none-match", "*")], &[]),
            Precondition::NotModified
        );
        let dated = [("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")];
        assert_eq!(pre(&[("if-match", "*")], &dated), Precondition::Proceed);
        assert_eq!(pre(&[("if-match", "\"v1\"")], &dated), Precondition::Failed);
        assert_eq!(
            pre(&[("if-none-match", " * ")], &dated),
            Precondition::NotModified
        );
    }

    #[test]
    fn refresh_from_304_section_3_2() {
        let mut stored = headers(&[
            ("cache-control", "max-age=10"),
            ("content-length", "5"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        refresh_headers(
            &mut stored,
            &headers(&[
                ("cache-control", "max-age=99"),
                ("content-length", "0"),
                ("x-a", "3"),
            ]),
        );
        assert_eq!(stored["cache-control"], "max-age=99");
        assert_eq!(stored["content-length"], "5");
        assert_eq!(stored.get_all("x-a").iter().count(), 1);
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

/// Properties of the parsers and of precondition evaluation over generated input.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// Every directive this parser knows; anything else is ignored.
    const KNOWN: [&str; 13] = [
        "no-store",
        "no-cache",
        "private",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "only-if-cached",
        "max-age",
        "s-maxage",
        "max-stale",
        "min-fresh",
        "stale-while-revalidate",
        "stale-if-error",
    ];

    fn parse(text: &str) -> CacheControl {
        match HeaderValue::from_str(text) {
            Ok(v) => CacheControl::parse_values(std::iter::once(&v)),
            Err(e) => panic!("{text:?} is a field value: {e}"),
        }
    }

    /// A known directive as `(name, argument)`: no argument, delta-seconds (sometimes
    /// invalid or past 2^31), or a quoted field list.
    fn known() -> impl Strategy<Value = (String, Option<String>)> {
        let arg = prop_oneof![
            Just(None),
            (0u64..100_000).prop_map(|n| Some(n.to_string())),
            Just(Some("99999999999999999999".to_owned())),
            Just(Some("-1".to_owned())),
            "[a-z-]{1,8}(, ?[a-z-]{1,8}){0,2}".prop_map(|f| Some(format!("\"{f}\""))),
        ];
        (proptest::sample::select(&KNOWN[..]), arg).prop_map(|(n, a)| (n.to_owned(), a))
    }

    /// A directive this parser does not know, with any argument the grammar allows:
    /// a token, or a quoted string holding commas, `=`, escaped quotes and known names.
    fn unknown() -> impl Strategy<Value = String> {
        let name = "[a-z][a-z0-9-]{0,10}".prop_filter("unknown", |n| {
            !KNOWN.iter().any(|k| k.eq_ignore_ascii_case(n))
        });
        let arg = prop_oneof![
            Just(String::new()),
            "=[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,8}",
            "(max-age=1|no-store|, |=|\\\\\"|[ a-z]){0,6}".prop_map(|q| format!("=\"{q}\"")),
        ];
        (name, arg).prop_map(|(n, a)| format!("{n}{a}"))
    }

    fn joined(list: &[(String, Option<String>)]) -> Vec<String> {
        list.iter()
            .map(|(n, a)| match a {
                Some(a) => format!("{n}={a}"),
                None => n.clone(),
            })
            .collect()
    }

    /// Optional whitespace (RFC 9110 §5.6.3 OWS: spaces and tabs).
    fn ows() -> impl Strategy<Value = String> {
        "[ \t]{0,3}"
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn cache_control_never_panics_on_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            text in any::<String>(),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                for name in [&header::CACHE_CONTROL, &CDN_CACHE_CONTROL, &SURROGATE_CONTROL] {
                    h.append(name, v.clone());
                }
            }
            let _ = CacheControl::from_headers(&h);
            let _ = response_directives(&h);
            // The directive splitter on any text, not only what a field value may hold: it
            // ends, and yields no more items than there are bytes.
            prop_assert!(Directives::new(&text).count() <= text.len());
        }

        /// RFC 9111 §5.2: directive names are case-insensitive; RFC 9110 §5.6.1: a list may
        /// have whitespace around its commas and empty elements.
        #[test]
        fn cache_control_ignores_case_and_whitespace_around_commas(
            list in proptest::collection::vec(known(), 1..6),
            upper in proptest::collection::vec(any::<bool>(), 64),
            spaces in proptest::collection::vec((ows(), ows(), 0usize..2), 6),
        ) {
            let plain = joined(&list).join(",");
            let mut varied = String::new();
            for (i, d) in joined(&list).iter().enumerate() {
                let (before, after, empty) = &spaces[i];
                if i > 0 {
                    varied.push_str(before);
                    varied.push_str(&",".repeat(1 + empty));
                    varied.push_str(after);
                }
                let (name, arg) = d
                    .split_once('=')
                    .map_or((d.as_str(), None), |(n, a)| (n, Some(a)));
                let cased = name.chars().zip(&upper);
                varied.extend(cased.map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c }));
                if let Some(a) = arg {
                    varied.push('=');
                    varied.push_str(a);
                }
            }
            prop_assert_eq!(parse(&varied), parse(&plain), "{:?} vs {:?}", varied, plain);
        }

        /// RFC 9111 §5.2.3: a cache ignores directives it does not know, in every field it
        /// reads directives from, and one with a quoted argument hides nothing after it.
        #[test]
        fn unknown_directives_are_ignored(
            list in proptest::collection::vec(known(), 0..5),
            extra in proptest::collection::vec((unknown(), 0usize..6), 1..4),
        ) {
            let plain = joined(&list);
            let mut with = plain.clone();
            for (u, at) in &extra {
                with.insert((*at).min(with.len()), u.clone());
            }
            let (plain, with) = (plain.join(", "), with.join(", "));
            prop_assert_eq!(parse(&with), parse(&plain), "{:?}", with);
            for name in [&CDN_CACHE_CONTROL, &SURROGATE_CONTROL, &header::CACHE_CONTROL] {
                let fields = |v: &str| {
                    let mut h = HeaderMap::new();
                    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=7"));
                    if let Ok(v) = HeaderValue::from_str(v) {
                        h.insert(name, v);
                    }
                    response_directives(&h)
                };
                prop_assert_eq!(fields(&with), fields(&plain), "{}: {:?}", name, with);
            }
        }
    }

    /// An entity tag from a small alphabet, so that lists often hold the stored one.
    #[derive(Debug, Clone, PartialEq)]
    struct Tag {
        weak: bool,
        opaque: String,
    }

    impl Tag {
        fn text(&self) -> String {
            format!("{}\"{}\"", if self.weak { "W/" } else { "" }, self.opaque)
        }
    }

    fn tag() -> impl Strategy<Value = Tag> {
        (any::<bool>(), "[ab,]{0,2}").prop_map(|(weak, opaque)| Tag { weak, opaque })
    }

    /// `*`, or a list of tags sent on one line or one line per tag.
    #[derive(Debug, Clone)]
    enum Tags {
        Any,
        List(Vec<Tag>, bool),
    }

    fn tags() -> impl Strategy<Value = Tags> {
        prop_oneof![
            1 => Just(Tags::Any),
            4 => (proptest::collection::vec(tag(), 1..4), any::<bool>())
                .prop_map(|(t, lines)| Tags::List(t, lines)),
        ]
    }

    /// A date `n` seconds after a base, or a value that is no HTTP-date.
    fn date() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![1 => Just(None), 4 => (0u64..3).prop_map(Some)]
    }

    const BASE: u64 = 1_790_000_000;

    fn date_text(d: Option<u64>) -> String {
        match d {
            Some(n) => {
                httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(BASE + n))
            }
            None => "yesterday".to_owned(),
        }
    }

    #[derive(Debug, Clone)]
    enum IfRange {
        Tag(Tag),
        Date(Option<u64>),
    }

    /// A stored response's validators and a GET's preconditions.
    #[derive(Debug, Clone)]
    struct Case {
        etag: Option<Tag>,
        last_modified: Option<u64>,
        if_match: Option<Tags>,
        if_none_match: Option<Tags>,
        if_modified_since: Option<Option<u64>>,
        if_unmodified_since: Option<Option<u64>>,
        range: bool,
        if_range: Option<IfRange>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            proptest::option::of(tag()),
            proptest::option::of(0u64..3),
            proptest::option::of(tags()),
            proptest::option::of(tags()),
            proptest::option::of(date()),
            proptest::option::of(date()),
            any::<bool>(),
            proptest::option::of(prop_oneof![
                tag().prop_map(IfRange::Tag),
                date().prop_map(IfRange::Date),
            ]),
        )
            .prop_map(
                |(etag, last_modified, if_match, if_none_match, ims, ius, range, if_range)| Case {
                    etag,
                    last_modified,
                    if_match,
                    if_none_match,
                    if_modified_since: ims,
                    if_unmodified_since: ius,
                    range,
                    if_range,
                },
            )
    }

    impl Case {
        fn evaluate(&self) -> Precondition {
            let mut stored = HeaderMap::new();
            let value =
                |s: String| HeaderValue::from_str(&s).expect("generated values are visible ASCII");
            if let Some(e) = &self.etag {
                stored.insert(header::ETAG, value(e.text()));
            }
            if let Some(lm) = self.last_modified {
                stored.insert(header::LAST_MODIFIED, value(date_text(Some(lm))));
            }
            let mut req = HeaderMap::new();
            for (name, tags) in [
                (header::IF_MATCH, &self.if_match),
                (header::IF_NONE_MATCH, &self.if_none_match),
            ] {
                match tags {
                    None => {}
                    Some(Tags::Any) => {
                        req.append(name, HeaderValue::from_static("*"));
                    }
                    Some(Tags::List(list, false)) => {
                        let line = list.iter().map(Tag::text).collect::<Vec<_>>().join(", ");
                        req.append(name, value(line));
                    }
                    Some(Tags::List(list, true)) => {
                        for t in list {
                            req.append(name.clone(), value(t.text()));
                        }
                    }
                }
            }
            for (name, d) in [
                (header::IF_MODIFIED_SINCE, self.if_modified_since),
                (header::IF_UNMODIFIED_SINCE, self.if_unmodified_since),
            ] {
                if let Some(d) = d {
                    req.insert(name, value(date_text(d)));
                }
            }
            if self.range {
                req.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
            }
            match &self.if_range {
                Some(IfRange::Tag(t)) => {
                    req.insert(header::IF_RANGE, value(t.text()));
                }
                Some(IfRange::Date(d)) => {
                    req.insert(header::IF_RANGE, value(date_text(*d)));
                }
                None => {}
            }
            evaluate_preconditions(&req, &stored)
        }

        /// RFC 9110 §13.2.2's order, read off the RFC, for a GET that found this stored
        /// response (a current representation, so `*` matches it, §13.1.1, §13.1.2).
        fn expected(&self) -> Precondition {
            let strong_match = |t: &Tag| {
                self.etag
                    .as_ref()
                    .is_some_and(|e| !e.weak && !t.weak && e.opaque == t.opaque)
            };
            let weak_match = |t: &Tag| self.etag.as_ref().is_some_and(|e| e.opaque == t.opaque);
            // 1. If-Match; 2. without it, If-Unmodified-Since, ignored when it is no date or
            // there is no Last-Modified to compare (§13.1.4).
            match (&self.if_match, self.if_unmodified_since) {
                (Some(Tags::Any), _) => {}
                (Some(Tags::List(list, _)), _) => {
                    if !list.iter().any(strong_match) {
                        return Precondition::Failed;
                    }
                }
                (None, Some(Some(since))) => {
                    if self.last_modified.is_some_and(|lm| lm > since) {
                        return Precondition::Failed;
                    }
                }
                (None, _) => {}
            }
            // 3. If-None-Match; 4. without it, If-Modified-Since (§13.1.3: ignored when no date).
            match (&self.if_none_match, self.if_modified_since) {
                (Some(Tags::Any), _) => return Precondition::NotModified,
                (Some(Tags::List(list, _)), _) => {
                    if list.iter().any(weak_match) {
                        return Precondition::NotModified;
                    }
                }
                (None, Some(Some(since))) => {
                    if self.last_modified.is_some_and(|lm| lm <= since) {
                        return Precondition::NotModified;
                    }
                }
                (None, _) => {}
            }
            // 5. If-Range, only with Range (§13.1.5): a strong match of the tag, or the date
            // exactly the stored Last-Modified.
            let range_holds = match &self.if_range {
                _ if !self.range => true,
                None => true,
                Some(IfRange::Tag(t)) => strong_match(t),
                Some(IfRange::Date(d)) => d.is_some() && *d == self.last_modified,
            };
            if range_holds {
                Precondition::Proceed
            } else {
                Precondition::IgnoreRange
            }
        }
    }

    /// Field values of any bytes a field may hold, under the names that matter here.
    fn fields(names: &'static [&'static str]) -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec(
            (
                proptest::sample::select(names),
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            0..8,
        )
        .prop_map(|list| {
            let mut h = HeaderMap::new();
            for (name, bytes) in list {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    h.append(HeaderName::from_static(name), v);
                }
            }
            h
        })
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn preconditions_never_panic_on_any_bytes(
            request in fields(&[
                "if-match",
                "if-none-match",
                "if-modified-since",
                "if-unmodified-since",
                "if-range",
                "range",
            ]),
            stored in fields(&["etag", "last-modified"]),
        ) {
            let _ = evaluate_preconditions(&request, &stored);
        }

        #[test]
        fn preconditions_follow_rfc_9110_section_13_2_2(c in case()) {
            prop_assert_eq!(c.evaluate(), c.expected(), "{:?}", c);
        }

        /// §13.1.2: `If-None-Match: *` is false when there is a current representation,
        /// and a GET then gets 304, whatever If-Modified-Since or If-Range say.
        #[test]
        fn if_none_match_star_with_a_stored_etag_is_not_modified(
            mut c in case(),
            etag in tag(),
        ) {
            c.etag = Some(etag);
            c.if_none_match = Some(Tags::Any);
            c.if_match = None;
            c.if_unmodified_since = None;
            prop_assert_eq!(c.evaluate(), Precondition::NotModified);
        }

        /// §13.2.2: If-Match is evaluated first; when it fails, the answer is 412 whatever
        /// If-None-Match (which would say 304) and the date fields say.
        #[test]
        fn a_failing_if_match_wins_over_if_none_match(
            mut c in case(),
            list in proptest::collection::vec(tag(), 1..4),
        ) {
            let stored = c.etag.clone();
            let list: Vec<Tag> = list
                .into_iter()
                .filter(|t| {
                    !stored.as_ref().is_some_and(|e| !e.weak && !t.weak && e.opaque == t.opaque)
                })
                .collect();
            prop_assume!(!list.is_empty());
            c.if_match = Some(Tags::List(list, false));
            c.if_none_match = Some(c.if_none_match.clone().unwrap_or(Tags::Any));
            prop_assert_eq!(c.evaluate(), Precondition::Failed);
        }
    }
}

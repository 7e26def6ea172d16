//! RFC 9111 decisions, as pure functions: may this response be stored, for how long is it
//! fresh, how old is it. No I/O and no clock: `now` is always a parameter.
//!
//! Written here rather than taken from `http-cache-semantics`: that crate models a private or
//! shared browser-style cache over its own request/response types, while we need the decisions
//! split so the hit path can reuse values computed at store time (lifetime, corrected initial
//! age) without re-parsing headers per hit, and reasons for not storing as an enum for
//! `Cache-Status` and metrics.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

/// Parsed `Cache-Control` directives (request or response). Unknown directives are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
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
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
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
    /// The request method is not GET.
    Method,
    /// The request said `Cache-Control: no-store`.
    RequestNoStore,
    /// The status code is not final or is a partial or not-modified response.
    Status,
    NoStore,
    Private,
    NoCache,
    SetCookie,
    /// The request carried `Authorization` and the response did not allow sharing it.
    Authorization,
    /// `Vary: *` can never be matched.
    VaryStar,
    /// No explicit freshness lifetime, or a lifetime of zero.
    NotFresh,
    /// Larger than `cache.max_object_size`.
    TooLarge,
    /// The origin's transfer did not complete.
    Aborted,
}

impl NoStoreReason {
    /// The token used in `Cache-Status: ...; detail=`.
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Method => "method",
            NoStoreReason::RequestNoStore => "request-no-store",
            NoStoreReason::Status => "status",
            NoStoreReason::NoStore => "no-store",
            NoStoreReason::Private => "private",
            NoStoreReason::NoCache => "no-cache",
            NoStoreReason::SetCookie => "set-cookie",
            NoStoreReason::Authorization => "authorization",
            NoStoreReason::VaryStar => "vary-star",
            NoStoreReason::NotFresh => "not-fresh",
            NoStoreReason::TooLarge => "too-large",
            NoStoreReason::Aborted => "aborted",
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

/// Decides whether a response may be stored by a shared cache (RFC 9111 §3) and, if so,
/// returns its freshness lifetime (§4.2.1).
pub fn storable(
    req: RequestFacts<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &CacheControl,
    response_time: SystemTime,
) -> Result<Duration, NoStoreReason> {
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
    if cc.no_store {
        return Err(NoStoreReason::NoStore);
    }
    if cc.private {
        return Err(NoStoreReason::Private);
    }
    if cc.no_cache {
        return Err(NoStoreReason::NoCache);
    }
    // §3.5: a shared cache reuses responses to authenticated requests only when told it may.
    if req.has_authorization && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NoStoreReason::Authorization);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NoStoreReason::SetCookie);
    }
    if vary_has_star(headers) {
        return Err(NoStoreReason::VaryStar);
    }
    match freshness_lifetime(headers, cc, response_time) {
        Some(lifetime) if !lifetime.is_zero() => Ok(lifetime),
        _ => Err(NoStoreReason::NotFresh),
    }
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
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
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

/// True if any `Vary` field line lists `*`.
pub fn vary_has_star(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim() == "*")
}

/// Parses an HTTP-date (IMF-fixdate, RFC 850 or asctime).
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn check(
        req_auth: bool,
        status: u16,
        hdrs: &[(&str, &str)],
        expected: Result<u64, NoStoreReason>,
    ) {
        let h = headers(hdrs);
        let rcc = CacheControl::from_headers(&h);
        let req_cc = CacheControl::default();
        let req = RequestFacts {
            method: &Method::GET,
            has_authorization: req_auth,
            cache_control: &req_cc,
        };
        let got = storable(
            req,
            StatusCode::from_u16(status).expect("status"),
            &h,
            &rcc,
            t(1_000_000),
        );
        assert_eq!(got.map(|d| d.as_secs()), expected, "{hdrs:?}");
    }

    #[test]
    fn directives_parse() {
        let c = cc(
            "public, max-age=60, s-maxage=\"120\", no-cache=\"set-cookie, foo\", stale-if-error=5",
        );
        assert!(c.public && c.no_cache);
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

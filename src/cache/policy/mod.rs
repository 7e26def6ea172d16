//! RFC 9111 decisions, as pure functions: may this response be stored, for how long is it
//! fresh, how old is it. No I/O and no clock: `now` is always a parameter.
//!
//! Written here rather than taken from `http-cache-semantics`: that crate models a private or
//! shared browser-style cache over its own request/response types, while we need the decisions
//! split so the hit path can reuse values computed at store time (lifetime, corrected initial
//! age) without re-parsing headers per hit, and reasons for not storing as an enum for
//! `Cache-Status` and metrics.
//!
//! One file per concern, everything public re-exported here: `directives` (`Cache-Control`
//! and the targeted fields of RFC 9213), `storable` (may a response be stored, and how: RFC
//! 9111 §3, heuristics, RFC 5861 windows, site rules), `freshness` (explicit lifetime, age,
//! and how a stored response may serve a request), `validation` (a client's preconditions
//! against a stored response, RFC 9110 §13; a 304's header refresh) and `date` (HTTP-dates).

mod date;
mod directives;
mod freshness;
mod storable;
mod validation;

pub use date::http_date;
pub use directives::{
    response_directives, targeted, CacheControl, CACHE_TAG, CDN_CACHE_CONTROL,
    EDGECACHE_CACHE_CONTROL, SURROGATE_CONTROL, SURROGATE_KEY,
};
pub use freshness::{
    corrected_initial_age, current_age, freshness_lifetime, reuse, Reuse, StoredFacts,
};
pub use storable::{
    heuristically_cacheable, storable, vary_has_star, NoStoreReason, RequestFacts, Settings,
    StoreDecision,
};
pub use validation::{
    evaluate_preconditions, list_matches, refresh_headers, Precondition, NOT_MODIFIED_FIELDS,
};

/// Helpers shared by the tests of every file here.
#[cfg(test)]
mod fixtures {
    use std::time::{Duration, SystemTime};

    use http::header::{HeaderMap, HeaderValue};

    use super::CacheControl;

    pub(super) fn cc(text: &str) -> CacheControl {
        CacheControl::parse_values(std::iter::once(
            &HeaderValue::from_str(text).expect("value"),
        ))
    }

    pub(super) fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    pub(super) fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }
}

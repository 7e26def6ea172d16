//! A stored response: headers prepared for clients at store time, body as shared `Bytes`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::key::{OwnedKey, VaryKey};
use super::policy::{self, StoreDecision, StoredFacts};
use crate::compress::{self, Coding};

/// RFC 9211 `Cache-Status`.
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// One stored response (one `Vary` variant of a URL). Immutable once stored except for the
/// soft-purge mark and the store's use mark; a refresh stores a new entry sharing the same
/// body.
#[derive(Debug)]
pub struct Entry {
    pub key: OwnedKey,
    pub vary: VaryKey,
    pub status: StatusCode,
    /// Response headers ready for a client: hop-by-hop and stripped fields removed, `Via`
    /// added, `Content-Length` exact, and `Age` and `Cache-Status` present with placeholder
    /// values that every answer replaces. With both fields already in the map, a hit's clone
    /// takes them over in place: no growth of the cloned map, no rehash (see [`prepare`]).
    pub headers: HeaderMap,
    /// `Cache-Status` as the origin sent it (caches behind us), members joined by ", ":
    /// every answer puts ours after it (RFC 9211 §2: caches preserve the existing value).
    pub upstream_status: Option<HeaderValue>,
    /// The whole body, shared by every client that reads it.
    pub body: Bytes,
    /// The body encoded once at fill time (`compress`), in the site's order of preference,
    /// each with its own prepared headers; empty when the response was not compressed.
    pub forms: Box<[Form]>,
    /// The codings of `forms`, in the same order: what a hit negotiates over.
    pub codings: Box<[Coding]>,
    /// The origin's own content coding, when a client that does not accept it is sent the
    /// body decoded (`compress::Plan::Decode`).
    pub decodable: Option<Coding>,
    /// When the response arrived (RFC 9111 `response_time`).
    pub response_time: SystemTime,
    /// Corrected initial age (§4.2.3).
    pub initial_age: Duration,
    /// Lifetime, stale windows and revalidation duties decided at store time.
    pub decision: StoreDecision,
    /// Purge tags from `Surrogate-Key` / `Cache-Tag`.
    pub tags: Box<[Box<str>]>,
    /// Seconds since the epoch of a soft purge; 0 when not purged.
    purged_at: AtomicU64,
    /// The store's use mark: the version of this URL's variant list that last answered from
    /// the entry (0: never), which is what decides the variant that goes when the list is full.
    used: AtomicU64,
}

/// One encoded form of a stored body.
#[derive(Debug)]
pub struct Form {
    pub coding: Coding,
    /// The identity headers with this form's `Content-Encoding`, length and weak `ETag`.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Entry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: OwnedKey,
        vary: VaryKey,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        response_time: SystemTime,
        initial_age: Duration,
        decision: StoreDecision,
        tags: Box<[Box<str>]>,
    ) -> Entry {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let upstream_status = upstream_status(&headers);
        let headers = prepare(headers);
        Entry {
            key,
            vary,
            status,
            headers,
            upstream_status,
            body,
            forms: Box::new([]),
            codings: Box::new([]),
            decodable: None,
            response_time,
            initial_age,
            decision,
            tags,
            purged_at: AtomicU64::new(0),
            used: AtomicU64::new(0),
        }
    }

    /// The entry with encoded `forms` of its body: each gets the identity headers with its
    /// `Content-Encoding`, its `Content-Length` and a weak `ETag` (the identity headers say
    /// `Vary: Accept-Encoding` already).
    pub fn with_forms(mut self, forms: impl IntoIterator<Item = (Coding, Bytes)>) -> Entry {
        let forms: Vec<Form> = forms
            .into_iter()
            .map(|(coding, body)| {
                let mut headers = self.headers.clone();
                headers.insert(header::CONTENT_ENCODING, coding.header_value());
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                // Ranges are cut from the identity body only: an encoded form offers none
                // (a client resuming one would splice identity bytes into it).
                headers.remove(header::ACCEPT_RANGES);
                if let Some(etag) = headers.get(header::ETAG) {
                    let weak = compress::weak_etag(etag);
                    headers.insert(header::ETAG, weak);
                }
                Form {
                    coding,
                    headers,
                    body,
                }
            })
            .collect();
        self.codings = forms.iter().map(|f| f.coding).collect();
        self.forms = forms.into_boxed_slice();
        self
    }

    /// The entry marked as in `coding`, decoded for clients that do not accept it.
    pub fn with_decodable(mut self, coding: Option<Coding>) -> Entry {
        self.decodable = coding;
        self
    }

    /// A copy refreshed by a 304: new headers, times and decision, the same body bytes.
    pub fn refreshed(
        &self,
        headers: HeaderMap,
        response_time: SystemTime,
        initial_age: Duration,
        decision: StoreDecision,
    ) -> Entry {
        let mut e = Entry::new(
            self.key.clone(),
            self.vary.clone(),
            self.status,
            headers,
            self.body.clone(),
            response_time,
            initial_age,
            decision,
            self.tags.clone(),
        );
        // A 304 without the origin's own `Cache-Status` (the merged map holds only our
        // placeholder) leaves the chain as it was.
        if e.upstream_status.is_none() {
            e.upstream_status = self.upstream_status.clone();
        }
        // The encoded forms are the same bytes, under the refreshed headers, which still
        // say the answer depends on `Accept-Encoding` (a 304's own `Vary` replaced ours).
        if !self.forms.is_empty() || self.decodable.is_some() {
            compress::add_vary(&mut e.headers);
        }
        e.with_forms(self.forms.iter().map(|f| (f.coding, f.body.clone())))
            .with_decodable(self.decodable)
    }

    /// Bytes this entry costs the store: body, header names and values, and a fixed overhead
    /// for the entry, its key and the map's bookkeeping.
    pub fn weight(&self) -> u32 {
        // Measured (examples/memory_footprint.rs): about 1.7 KiB per stored object beyond its
        // body and header bytes, for the entry, its Arc, the variant list and moka's node.
        const OVERHEAD: usize = 1536;
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 16).sum();
        // Every stored form counts: its body, and its headers (a copy of the identity's
        // bar three values, counted as a fixed part of theirs).
        let forms: usize = self
            .forms
            .iter()
            .map(|f| f.body.len() + headers / 4 + 256)
            .sum();
        let total = self.body.len()
            + forms
            + headers
            + tags
            + self.key.host.len()
            + self.key.path_and_query.len()
            + OVERHEAD;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Current age at `now` (§4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        policy::current_age(self.initial_age, self.response_time, now)
    }

    /// The lifetime, shortened to the age at a soft purge if there was one.
    pub fn lifetime(&self) -> Duration {
        let purged = self.purged_at.load(Ordering::Relaxed);
        if purged == 0 {
            return self.decision.lifetime;
        }
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(purged);
        self.decision.lifetime.min(self.age(at))
    }

    /// True while the entry is fresh at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.age(now) < self.lifetime()
    }

    /// How long the entry has been stale at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.lifetime())
    }

    /// The facts a reuse decision needs.
    pub fn facts(&self, now: SystemTime) -> StoredFacts {
        StoredFacts {
            age: self.age(now),
            lifetime: self.lifetime(),
            stale_while_revalidate: self.decision.stale_while_revalidate,
            always_revalidate: self.decision.always_revalidate,
            must_revalidate: self.decision.must_revalidate,
        }
    }

    /// True when the entry may stand in for an origin error at `now` (RFC 5861 §4).
    pub fn usable_if_error(&self, now: SystemTime) -> bool {
        !self.decision.must_revalidate && self.staleness(now) <= self.decision.stale_if_error
    }

    /// True when the entry may be served stale because no origin can be reached
    /// (RFC 9111 §4.2.4): not when it must be revalidated (`must-revalidate`,
    /// `proxy-revalidate`, `no-cache`).
    pub fn usable_when_disconnected(&self) -> bool {
        !self.decision.must_revalidate
            && !self.decision.always_revalidate
            && !self.decision.shared_max_age
    }

    /// Where the body is kept: `"mapped"` in a sealed memory file (`cache::mapped`, sent
    /// with sendfile), else `"heap"`.
    pub fn storage(&self) -> &'static str {
        #[cfg(target_os = "linux")]
        if super::mapped::find(&self.body).is_some() {
            return "mapped";
        }
        "heap"
    }

    /// True when a conditional request can validate this entry.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// How long the store should keep the entry from `now`.
    pub fn time_to_live(&self, now: SystemTime) -> Duration {
        self.decision.retention().saturating_sub(self.age(now))
    }

    /// The store's use mark (see [`Entry::mark_used`]); 0 when never used.
    pub(crate) fn last_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Records a use under `mark`, which only grows. On the hit path: one load, and a plain
    /// store only when the mark moved, so a popular entry's cache line is not written by
    /// every hit (no read-modify-write; a lost race between two marks costs nothing that
    /// matters: both are recent).
    pub(crate) fn mark_used(&self, mark: u64) {
        if self.used.load(Ordering::Relaxed) < mark {
            self.used.store(mark, Ordering::Relaxed);
        }
    }

    /// Marks the entry stale now, keeping it for stale-if-error and revalidation.
    pub fn soft_purge(&self, now: SystemTime) {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
            .max(1);
        let _ = self
            .purged_at
            .compare_exchange(0, secs, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The `Cache-Status` members a response arrived with, in order, as one value; `None`
/// when it had none (or only the placeholder of a stored map).
pub fn upstream_status(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut joined: Option<Vec<u8>> = None;
    for v in headers.get_all(&CACHE_STATUS) {
        let v = v.as_bytes();
        if v.is_empty() || v == PLACEHOLDER_STATUS.as_bytes() {
            continue;
        }
        match &mut joined {
            Some(j) => {
                j.extend_from_slice(b", ");
                j.extend_from_slice(v);
            }
            None => joined = Some(v.to_vec()),
        }
    }
    joined.and_then(|j| HeaderValue::from_bytes(&j).ok())
}

/// The stored map's `Cache-Status` value until an answer sets the real one.
const PLACEHOLDER_STATUS: &str = "edgecache";

/// The stored form of response headers, made in place from the origin's map.
///
/// Values are copied into one buffer of their own, each value a slice of it. Values parsed
/// by hyper are slices of the connection's read buffer, which usually holds the start of the
/// body too; keeping those slices in a long-lived entry would pin the whole buffer (measured:
/// about 20 KiB per 16 KiB object) for as long as the object is stored. One buffer rather
/// than a copy per value is one allocation instead of a dozen, and the values are already
/// shared, so a hit's clone only counts a reference (a value copied into its own `Vec`
/// allocates again the first time it is cloned). Names are owned by `HeaderName` already
/// (the parser copies custom names), so they are kept. The values are swapped in place: the
/// map's entries and index stay as the parser built them, with no second map to hash into
/// and no first one to drop (measured: a fifth of a small miss's store cost).
///
/// `Age` and `Cache-Status` are set to placeholders (an origin's own `Age` is replaced, as
/// every answer from the cache does anyway; its `Cache-Status` is kept apart, in
/// [`Entry::upstream_status`]). `HeaderMap::clone` keeps exactly the
/// entries it has, so adding these two per hit made every clone grow its entry vector (and,
/// past three quarters of its index table, rehash); replacing a value never does.
fn prepare(mut headers: HeaderMap) -> HeaderMap {
    headers.remove(header::AGE);
    headers.remove(&CACHE_STATUS);
    let total = headers.values().map(|v| v.len()).sum();
    let mut buf = BytesMut::with_capacity(total);
    for v in headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let values = buf.freeze();
    let mut at = 0;
    for value in headers.values_mut() {
        let end = at + value.len();
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(values.slice(at..end)) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
        at = end;
    }
    headers.insert(header::AGE, HeaderValue::from_static("0"));
    headers.insert(
        CACHE_STATUS.clone(),
        HeaderValue::from_static(PLACEHOLDER_STATUS),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::KeyParts;

    fn entry(headers: HeaderMap) -> Entry {
        let parts = KeyParts {
            https: false,
            host: "a.test",
            path_and_query: "/x",
        };
        let decision = StoreDecision::fresh_for(Duration::from_secs(60));
        Entry::new(
            OwnedKey::new(&parts),
            VaryKey::default(),
            StatusCode::OK,
            headers,
            Bytes::from_static(b"hello"),
            SystemTime::now(),
            Duration::ZERO,
            decision,
            Box::new([]),
        )
    }

    #[test]
    fn stored_headers_hold_one_age_and_one_cache_status_to_replace() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::AGE, HeaderValue::from_static("50"));
        h.append(&CACHE_STATUS, HeaderValue::from_static("upstream; hit"));
        h.append(&CACHE_STATUS, HeaderValue::from_static("other; fwd=miss"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let e = entry(h);
        assert_eq!(e.headers.get_all(header::AGE).iter().count(), 1);
        assert_eq!(e.headers.get_all(&CACHE_STATUS).iter().count(), 1);
        assert_eq!(
            e.upstream_status.as_ref().map(|v| v.as_bytes()),
            Some(&b"upstream; hit, other; fwd=miss"[..]),
            "the caches behind us, kept in order"
        );
        assert_eq!(
            e.headers[header::CONTENT_LENGTH],
            "5",
            "length is the stored body's"
        );
        assert_eq!(e.headers[header::CONTENT_TYPE], "text/plain");

        // What a hit does: the clone keeps its size when both values are replaced.
        let mut hit = e.headers.clone();
        let len = hit.len();
        hit.insert(header::AGE, HeaderValue::from(7u64));
        hit.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static("edgecache; hit"),
        );
        assert_eq!(hit.len(), len);
        assert_eq!(hit[header::AGE], "7");
        assert_eq!(hit[&CACHE_STATUS], "edgecache; hit");
    }

    #[test]
    fn a_refresh_keeps_the_placeholders_single() {
        let e = entry(HeaderMap::new());
        let r = e.refreshed(
            e.headers.clone(),
            SystemTime::now(),
            Duration::ZERO,
            e.decision.clone(),
        );
        assert_eq!(r.headers.get_all(header::AGE).iter().count(), 1);
        assert_eq!(r.headers.get_all(&CACHE_STATUS).iter().count(), 1);
        assert_eq!(r.body, e.body);
        assert_eq!(
            r.upstream_status, None,
            "the placeholder is not an upstream cache"
        );

        let mut h = HeaderMap::new();
        h.insert(&CACHE_STATUS, HeaderValue::from_static("shield; hit"));
        let e = entry(h);
        let r = e.refreshed(
            e.headers.clone(),
            SystemTime::now(),
            Duration::ZERO,
            e.decision.clone(),
        );
        assert_eq!(
            r.upstream_status, e.upstream_status,
            "kept over a 304 without one"
        );
    }
}

//! Seeing inside the cache: `GET /cache?url=...` lists the stored variants of one URL;
//! `GET /cache/stats` counts what the store holds, its hit ratio and why objects left it.

use std::time::SystemTime;

use http::{header, StatusCode};
use serde_json::json;

use super::AdminState;
use crate::cache::Entry;
use crate::telemetry::CacheResult;

/// Hosts listed by `/cache/stats`, most bytes first.
const TOP_HOSTS: usize = 10;

/// `GET /cache?url=URL`: every stored variant of the URL, both schemes, keyed as requests for
/// it are (the host lowercased, the query as its site keys it). Everything after `url=` is
/// the URL, percent-decoded, so both an encoded and a plain URL work (a plain one may carry
/// its own query). 200 with the variants, 404 with none stored, 400 for no or a bad URL.
pub(super) fn variants(state: &AdminState, query: Option<&str>) -> (StatusCode, String) {
    let Some(raw) = query.and_then(|q| q.strip_prefix("url=")) else {
        return bad("give the URL to look up: /cache?url=https://host/path");
    };
    let Ok(url) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return bad("the URL is not UTF-8 once percent-decoded");
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return bad(&format!("not a URL: {url}: {e}")),
    };
    let Some(host) = uri.host() else {
        return bad(&format!("the URL names no host: {url}"));
    };
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let proxy = state.proxy.load();
    let (host, pq) = proxy.key_of(host, pq);
    let now = SystemTime::now();
    let found = proxy.store().variants(&host, &pq);
    let list: Vec<serde_json::Value> = found
        .iter()
        .map(|e| variant_json(proxy.store().hash(&e.key.parts()), e, now))
        .collect();
    let status = if list.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    let doc = json!({
        "url": url,
        "host": host,
        "path": pq,
        "variants": list,
    });
    (status, pretty(&doc))
}

/// One stored variant: its key (the URL as stored, the hash it is stored under, the request
/// values it varies on), size, age and freshness left (negative: stale by that much),
/// validators, tags and where its body lives.
fn variant_json(hash: u64, e: &Entry, now: SystemTime) -> serde_json::Value {
    let age = e.age(now).as_secs_f64();
    let lifetime = e.lifetime().as_secs_f64();
    let vary: serde_json::Map<String, serde_json::Value> = e
        .vary
        .fields()
        .map(|(name, value)| (name.to_owned(), json!(value)))
        .collect();
    let text = |name: header::HeaderName| {
        e.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    json!({
        "key": e.key.url(),
        "hash": format!("{hash:016x}"),
        "vary": vary,
        "key_extra": e.vary.extra(),
        "status": e.status.as_u16(),
        "size": e.body.len(),
        "weight": e.weight(),
        "stored_at": httpdate::fmt_http_date(e.response_time),
        "age_seconds": round(age),
        "lifetime_seconds": round(lifetime),
        "freshness_left_seconds": round(lifetime - age),
        "etag": text(header::ETAG),
        "last_modified": text(header::LAST_MODIFIED),
        "tags": e.tags,
        "storage": e.storage(),
        "content_encoding": text(header::CONTENT_ENCODING),
        // The encoded forms made at fill time (`compress`), each with its size.
        "encodings": e
            .forms
            .iter()
            .map(|f| json!({ "encoding": f.coding.name(), "size": f.body.len() }))
            .collect::<Vec<_>>(),
    })
}

/// `GET /cache/stats`: what the store holds (walked: objects, variants, bytes, the top hosts
/// by bytes), its capacity, requests served from it against those fetched for it, and the
/// objects removed since start by cause.
pub(super) fn stats(state: &AdminState) -> String {
    let proxy = state.proxy.load();
    let store = proxy.store();
    // Pending maintenance first, so counts and removals agree with what the walk sees.
    let removals = store.removals();
    let summary = store.summary(TOP_HOSTS);
    let m = &state.metrics;
    let n = |r: CacheResult| m.requests_with(r);
    let hits = n(CacheResult::Hit) + n(CacheResult::Stale) + n(CacheResult::Revalidated);
    let misses = n(CacheResult::Miss) + n(CacheResult::Collapsed);
    let ratio = if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    };
    let hosts: Vec<serde_json::Value> = summary
        .top_hosts
        .iter()
        .map(|(host, bytes, objects)| json!({ "host": host, "bytes": bytes, "objects": objects }))
        .collect();
    let doc = json!({
        "objects": summary.objects,
        "variants": summary.variants,
        "bytes": summary.bytes,
        "capacity": store.capacity(),
        "hits": hits,
        "misses": misses,
        "hit_ratio": (ratio * 10_000.0).round() / 10_000.0,
        "requests": CacheResult::ALL
            .iter()
            .map(|&r| (r.as_str().to_owned(), json!(n(r))))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
        "evictions": {
            "size": removals.size,
            "expired": removals.expired,
            "explicit": removals.explicit,
            "replaced": removals.replaced,
        },
        "top_hosts": hosts,
    });
    pretty(&doc)
}

/// Seconds to the millisecond.
fn round(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

fn bad(message: &str) -> (StatusCode, String) {
    (
        StatusCode::BAD_REQUEST,
        pretty(&json!({ "error": message })),
    )
}

fn pretty(doc: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

//! The storage decision made on every miss: parse `Cache-Control`, decide storability and
//! lifetime, compute the corrected initial age. Informs whether the policy needs caching of
//! parsed directives or is cheap enough to run per response.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgecache::cache::policy::{self, CacheControl, RequestFacts};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use std::time::SystemTime;

fn bench(c: &mut Criterion) {
    let mut h = HeaderMap::new();
    h.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=3600, s-maxage=600, stale-while-revalidate=30"),
    );
    h.insert(
        "date",
        HeaderValue::from_static("Wed, 25 Nov 2026 16:00:00 GMT"),
    );
    h.insert("etag", HeaderValue::from_static("\"abc\""));
    h.insert("age", HeaderValue::from_static("12"));
    c.bench_function("cache_control_parse", |b| {
        b.iter(|| CacheControl::from_headers(black_box(&h)))
    });
    let req_cc = CacheControl::default();
    let settings = policy::Settings::default();
    let now = SystemTime::now();
    c.bench_function("storable_decision", |b| {
        b.iter(|| {
            let facts = RequestFacts {
                method: &Method::GET,
                has_authorization: false,
                cache_control: &req_cc,
            };
            black_box(policy::storable(
                facts,
                StatusCode::OK,
                black_box(&h),
                &settings,
                now,
            ))
        })
    });
    c.bench_function("corrected_initial_age", |b| {
        b.iter(|| policy::corrected_initial_age(black_box(&h), now, now))
    });
}

fn bench_reuse(c: &mut Criterion) {
    let stored = policy::StoredFacts {
        age: std::time::Duration::from_secs(30),
        lifetime: std::time::Duration::from_secs(60),
        stale_while_revalidate: std::time::Duration::from_secs(10),
        always_revalidate: false,
        must_revalidate: false,
    };
    let req = CacheControl::default();
    c.bench_function("reuse_decision", |b| {
        b.iter(|| policy::reuse(black_box(&stored), black_box(&req), false))
    });
}

criterion_group!(benches, bench, bench_reuse);
criterion_main!(benches);

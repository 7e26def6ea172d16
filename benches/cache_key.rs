//! Cache key building and store lookup: the first work of every request. Informs whether the
//! primary key can stay a borrowed-parts hash (no allocation) and what a moka hit costs.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgecache::cache::policy::StoreDecision;
use edgecache::cache::{Entry, KeyParts, OwnedKey, Store, VaryKey};
use http::{HeaderMap, StatusCode};
use std::time::{Duration, SystemTime};

fn bench(c: &mut Criterion) {
    let store = Store::new(256 << 20);
    let parts = KeyParts {
        https: true,
        host: "static.example.com",
        path_and_query: "/assets/app.3f9a1c.js?v=12",
    };
    c.bench_function("key_hash", |b| b.iter(|| store.hash(black_box(&parts))));

    for i in 0..10_000u32 {
        let path = format!("/assets/file-{i}.js");
        let p = KeyParts {
            path_and_query: &path,
            ..parts
        };
        store.insert(
            store.hash(&p),
            Entry::new(
                OwnedKey::new(&p),
                VaryKey::default(),
                StatusCode::OK,
                HeaderMap::new(),
                bytes::Bytes::from_static(b"x"),
                SystemTime::now(),
                Duration::ZERO,
                StoreDecision::fresh_for(Duration::from_secs(3600)),
                Box::new([]),
            ),
        );
    }
    let hit = KeyParts {
        path_and_query: "/assets/file-4242.js",
        ..parts
    };
    let req = HeaderMap::new();
    c.bench_function("store_lookup_hit", |b| {
        b.iter(|| {
            let h = store.hash(black_box(&hit));
            black_box(store.get(h, &hit, None, &req))
        })
    });
    let miss = KeyParts {
        path_and_query: "/assets/nope.js",
        ..parts
    };
    c.bench_function("store_lookup_miss", |b| {
        b.iter(|| {
            let h = store.hash(black_box(&miss));
            black_box(store.get(h, &miss, None, &req))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Origin choice and client location, done on every miss. Informs whether power-of-two-choices
//! over 16 origins and the CIDR/header lookups stay well under a microsecond.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgecache::geo::Locator;
use edgecache::origin::select::{PoolView, Selector};
use http::{HeaderMap, HeaderName, HeaderValue};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let selector = Selector::new(vec![1; 16]);
    let now = tokio::time::Instant::now();
    for o in 0..16 {
        selector.success(o, Duration::from_millis(5 + o as u64), now);
    }
    let a: Vec<usize> = (0..8).collect();
    let b: Vec<usize> = (8..16).collect();
    let pools = [
        PoolView {
            origins: &a,
            spill_latency: None,
        },
        PoolView {
            origins: &b,
            spill_latency: None,
        },
    ];
    c.bench_function("origin_pick_16", |bch| {
        bch.iter(|| black_box(selector.candidates(black_box(&pools), now)))
    });

    let networks = (0..256u32)
        .map(|i| {
            (
                format!("10.{}.0.0/16", i % 256).parse().expect("net"),
                *b"DE",
            )
        })
        .collect();
    let locator = Locator::new(
        networks,
        Some(HeaderName::from_static("cf-ipcountry")),
        vec!["127.0.0.1/32".parse().expect("net")],
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_static("203.0.113.9, 10.200.1.1"),
    );
    headers.insert("cf-ipcountry", HeaderValue::from_static("FR"));
    let peer = "127.0.0.1".parse().expect("ip");
    c.bench_function("geo_locate_trusted_peer", |bch| {
        bch.iter(|| black_box(locator.locate(black_box(peer), black_box(&headers))))
    });
    let direct = "198.51.100.7".parse().expect("ip");
    let empty = HeaderMap::new();
    c.bench_function("geo_locate_direct_256_networks", |bch| {
        bch.iter(|| black_box(locator.locate(black_box(direct), &empty)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

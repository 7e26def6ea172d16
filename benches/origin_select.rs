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
        selector
            .state()
            .success(o, Duration::from_millis(5 + o as u64), now);
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
        None,
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

    // A GeoIP2-shaped country database with 20,000 networks, as a real one is looked up.
    let mut writer = mmdb_writer::Writer::new("GeoIP2-Country");
    for i in 0..20_000u32 {
        let net: ipnet::IpNet = format!("{}.{}.{}.0/24", 1 + i / 65_536, (i / 256) % 256, i % 256)
            .parse()
            .expect("net");
        let country = if i % 2 == 0 { "DE" } else { "US" };
        let continent = if i % 2 == 0 { "EU" } else { "NA" };
        writer
            .insert_value(
                net,
                mmdb_writer::Value::map([
                    (
                        "country",
                        mmdb_writer::Value::map([("iso_code", mmdb_writer::Value::from(country))]),
                    ),
                    (
                        "continent",
                        mmdb_writer::Value::map([("code", mmdb_writer::Value::from(continent))]),
                    ),
                ]),
            )
            .expect("insert");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("country.mmdb");
    std::fs::write(&path, writer.to_bytes().expect("mmdb")).expect("write");
    let db = std::sync::Arc::new(edgecache::geo::Database::open(&path).expect("open"));
    let locator = Locator::new(Vec::new(), None, Vec::new(), Some(db));
    let client = "1.2.3.4".parse().expect("ip");
    c.bench_function("geo_locate_mmdb_20k_networks", |bch| {
        bch.iter(|| black_box(locator.locate(black_box(client), &empty)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

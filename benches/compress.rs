//! Compression (`edgecache::compress`): what a fill pays once to encode an object in each
//! coding at the default levels (and how many bytes each saves, printed before the runs), and
//! what a hit pays to choose a stored form from a browser's `Accept-Encoding`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgecache::compress::{encode, negotiate, Coding, Levels};
use http::{header, HeaderMap, HeaderValue};

/// A stylesheet of about `n` bytes (the same text as tests/it/compression.rs and the load
/// benchmark's `16k.css`).
fn css(n: usize) -> Vec<u8> {
    let mut out = String::with_capacity(n + 64);
    let mut i = 0;
    while out.len() < n {
        out.push_str(&format!(
            ".rule-{i} {{ margin: {}px; color: #{:06x}; }}\n",
            i % 17,
            (i * 7919) % 0xffffff
        ));
        i += 1;
    }
    out.truncate(n);
    out.into_bytes()
}

fn bench(c: &mut Criterion) {
    let levels = Levels::default();
    for (name, size) in [("16k", 16 << 10), ("256k", 256 << 10)] {
        let body = css(size);
        for coding in Coding::PRODUCED {
            let n = encode(coding, &levels, &body).map_or(0, |e| e.len());
            println!(
                "css {name}: {} {} -> {n} bytes ({:.1}% saved)",
                coding.name(),
                body.len(),
                100.0 * (1.0 - n as f64 / body.len() as f64)
            );
            c.bench_function(&format!("encode_{}_{name}", coding.name()), |b| {
                b.iter(|| encode(coding, &levels, black_box(&body)))
            });
        }
    }
    let mut request = HeaderMap::new();
    request.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip, deflate, br, zstd"),
    );
    let forms = Coding::PRODUCED;
    c.bench_function("negotiate_browser", |b| {
        b.iter(|| negotiate(black_box(&request), black_box(&forms)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

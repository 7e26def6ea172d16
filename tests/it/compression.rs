//! Compression at the edge: compressible objects encoded once at fill time and every hit
//! sent the client's best accepted form (RFC 9110 §12.5.3), decoded for clients that do not
//! accept the origin's coding, uncacheable responses compressed as they stream, ranges from
//! the identity form, weak validators for encoded forms, purge and size bounds over every
//! form; and a seeded mix of clients checked against an oracle.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

/// A stylesheet of about `n` bytes: compressible as real CSS is.
fn css(n: usize) -> Bytes {
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
    Bytes::from(out)
}

/// `body` decoded from `coding` (`None`: identity) with the codec crates themselves.
fn decode(coding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("br");
        }
        Some("zstd") => out = zstd::decode_all(body).expect("zstd"),
        Some(other) => panic!("unexpected coding {other}"),
    }
    out
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, body).expect("write");
    e.finish().expect("gzip")
}

async fn get_with(node: &TestNode, path: &str, headers: &[(&str, &str)]) -> Got {
    send(node.http, request("GET", "site.test", path, headers)).await
}

fn coding(r: &Got) -> Option<&str> {
    r.header("content-encoding")
}

fn varies_on_accept_encoding(r: &Got) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|f| f.trim().eq_ignore_ascii_case("accept-encoding"))
}

#[tokio::test]
async fn a_text_object_is_compressed_once_and_each_client_gets_its_best_accepted_form() {
    let origin = TestOrigin::start().await;
    let body = css(16 * 1024);
    origin.route(
        "/app.css",
        Route::bytes(body.clone())
            .header("content-type", "text/css")
            .header("cache-control", "max-age=600")
            .header("etag", "\"v1\""),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;

    let cases: [(&str, Option<&str>); 12] = [
        ("gzip, deflate, br, zstd", Some("br")),
        ("br", Some("br")),
        ("gzip", Some("gzip")),
        ("zstd", Some("zstd")),
        ("GZIP;q=0.8, zstd;q=0.9", Some("zstd")),
        ("br;q=0.1, gzip;q=0.9", Some("gzip")),
        ("gzip;q=0.2, identity;q=0", Some("gzip")),
        ("gzip;q=0.5, identity", None),
        ("*", Some("br")),
        ("*;q=0.5, br;q=0", Some("zstd")),
        ("identity", None),
        ("deflate", None),
    ];
    for (accept, want) in cases {
        let r = get_with(&node, "/app.css", &[("accept-encoding", accept)]).await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(coding(&r), want, "Accept-Encoding: {accept}");
        assert_eq!(decode(coding(&r), &r.body), body, "{accept}");
        assert!(varies_on_accept_encoding(&r), "{accept}: {:?}", r.headers);
        let len: usize = r
            .header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        assert_eq!(len, r.body.len(), "{accept}");
        let etag = r.header("etag").unwrap_or("");
        if want.is_some() {
            assert!(
                r.header("accept-ranges").is_none(),
                "ranges come from identity: an encoded form offers none"
            );
            assert_eq!(etag, "W/\"v1\"", "an encoded form's validator is weak");
            assert!(
                r.body.len() < body.len() / 3,
                "{accept}: {} bytes",
                r.body.len()
            );
        } else {
            assert_eq!(etag, "\"v1\"", "identity keeps the origin's");
        }
    }
    let plain = get(node.http, "site.test", "/app.css").await;
    assert_eq!(coding(&plain), None, "no Accept-Encoding: identity");
    assert_eq!(plain.body, body);
    assert_eq!(origin.count("/app.css"), 1, "one fetch for every form");
    let hit = get_with(&node, "/app.css", &[("accept-encoding", "br")]).await;
    assert!(
        hit.header("cache-status")
            .is_some_and(|c| c.contains("hit")),
        "{:?}",
        hit.headers
    );
}

#[tokio::test]
async fn conditional_and_range_requests_work_on_compressed_objects() {
    let origin = TestOrigin::start().await;
    let body = css(20 * 1024);
    origin.route(
        "/c.css",
        Route::bytes(body.clone())
            .header("content-type", "text/css")
            .header("cache-control", "max-age=600")
            .header("etag", "\"v7\""),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let br = [("accept-encoding", "br")];
    let first = get_with(&node, "/c.css", &br).await;
    assert_eq!(coding(&first), Some("br"));

    // If-None-Match compares weakly (RFC 9110 §13.1.2): either validator revalidates.
    for tag in ["W/\"v7\"", "\"v7\""] {
        let r = get_with(
            &node,
            "/c.css",
            &[("accept-encoding", "br"), ("if-none-match", tag)],
        )
        .await;
        assert_eq!(r.status, 304, "If-None-Match: {tag}");
        assert_eq!(r.header("etag"), Some("W/\"v7\""));
        assert!(r.body.is_empty());
    }
    // If-Match compares strongly: a weak tag never matches.
    let r = get_with(
        &node,
        "/c.css",
        &[("accept-encoding", "gzip"), ("if-match", "W/\"v7\"")],
    )
    .await;
    assert_eq!(r.status, 412);

    // A range is cut from the identity body, whatever the client accepts.
    let r = get_with(
        &node,
        "/c.css",
        &[("accept-encoding", "br, gzip"), ("range", "bytes=100-199")],
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(coding(&r), None);
    assert_eq!(r.body, body.slice(100..200));
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 100-199/{}", body.len()).as_str())
    );
    assert_eq!(origin.count("/c.css"), 1);
}

#[tokio::test]
async fn what_is_not_compressed() {
    let origin = TestOrigin::start().await;
    let text = css(8 * 1024);
    let cases = [
        ("/image", "image/png", "max-age=600", text.clone()),
        ("/small", "text/css", "max-age=600", css(600)),
        (
            "/no-transform",
            "text/css",
            "max-age=600, no-transform",
            text.clone(),
        ),
        ("/untyped", "", "max-age=600", text.clone()),
    ];
    for (path, ct, cc, body) in &cases {
        let mut r = Route::bytes(body.clone()).header("cache-control", cc);
        if !ct.is_empty() {
            r = r.header("content-type", ct);
        }
        origin.route(path, r);
    }
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for (path, _, _, body) in &cases {
        for _ in 0..2 {
            let r = get_with(&node, path, &[("accept-encoding", "gzip, br, zstd")]).await;
            assert_eq!(coding(&r), None, "{path}");
            assert_eq!(&r.body, body, "{path}");
        }
        assert_eq!(origin.count(path), 1, "{path}");
    }

    // A site with compression off sends identity.
    let origin2 = TestOrigin::start().await;
    origin2.route(
        "/app.css",
        Route::bytes(text.clone())
            .header("content-type", "text/css")
            .header("cache-control", "max-age=600"),
    );
    let off = format!(
        "{}[sites.compression]\nenabled = false\n",
        site(&origin2, "site.test", "")
    );
    let node = TestNode::start("", &off).await;
    for _ in 0..2 {
        let r = get_with(&node, "/app.css", &[("accept-encoding", "gzip, br")]).await;
        assert_eq!(coding(&r), None);
        assert_eq!(r.body, text);
        assert!(!varies_on_accept_encoding(&r));
    }
}

#[tokio::test]
async fn the_sites_encodings_types_and_minimum_are_followed() {
    let origin = TestOrigin::start().await;
    let text = css(4 * 1024);
    for path in ["/a.css", "/data.bin"] {
        let ct = if path.ends_with(".css") {
            "text/css"
        } else {
            "application/x-custom"
        };
        origin.route(
            path,
            Route::bytes(text.clone())
                .header("content-type", ct)
                .header("cache-control", "max-age=600"),
        );
    }
    let body = format!(
        "{}[sites.compression]\nencodings = [\"gzip\"]\ntypes = [\"application/x-custom\"]\n\
         min_size = \"2KiB\"\nlevels = {{ gzip = 9 }}\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    let all = [("accept-encoding", "br, zstd, gzip")];
    let custom = get_with(&node, "/data.bin", &all).await;
    assert_eq!(coding(&custom), Some("gzip"), "only gzip is produced");
    assert_eq!(decode(Some("gzip"), &custom.body), text);
    let css = get_with(&node, "/a.css", &all).await;
    assert_eq!(coding(&css), None, "text/css is not in this site's types");
}

#[tokio::test]
async fn a_client_that_does_not_accept_the_origins_coding_gets_it_decoded() {
    let origin = TestOrigin::start().await;
    let text = css(30 * 1024);
    let gz = Bytes::from(gzip(&text));
    origin.route(
        "/pre.js",
        Route::bytes(gz.clone())
            .header("content-type", "application/javascript")
            .header("content-encoding", "gzip")
            .header("cache-control", "max-age=600")
            .header("etag", "\"g1\""),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let zipped = get_with(&node, "/pre.js", &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(coding(&zipped), Some("gzip"));
    assert_eq!(zipped.body, gz, "the origin's bytes as they came");
    for headers in [
        &[][..],
        &[("accept-encoding", "br")][..],
        &[("accept-encoding", "gzip;q=0")][..],
    ] {
        let r = get_with(&node, "/pre.js", headers).await;
        assert_eq!(r.status, 200, "{headers:?}");
        assert_eq!(coding(&r), None, "{headers:?}");
        assert_eq!(r.body, text, "{headers:?}: decoded");
        assert_eq!(r.header("etag"), Some("W/\"g1\""));
        assert!(varies_on_accept_encoding(&r));
    }
    assert_eq!(origin.count("/pre.js"), 1);
}

#[tokio::test]
async fn uncacheable_responses_are_compressed_as_they_stream_or_passed_per_setting() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/feed",
        Route::ok("")
            .generated(4096, 40, false, Duration::ZERO)
            .header("content-type", "application/json")
            .header("cache-control", "no-store"),
    );
    let node = node_for(&origin, "").await;
    let plain = get(node.http, "site.test", "/feed").await;
    assert_eq!(coding(&plain), None);
    let expected = plain.body.clone();
    assert_eq!(expected.len(), 4096 * 40);
    for accept in ["gzip", "br", "zstd"] {
        let r = get_with(&node, "/feed", &[("accept-encoding", accept)]).await;
        assert_eq!(coding(&r), Some(accept));
        assert!(r.header("content-length").is_none());
        assert_eq!(decode(Some(accept), &r.body), expected, "{accept}");
    }
    let head = send(
        node.http,
        request("HEAD", "site.test", "/feed", &[("accept-encoding", "gzip")]),
    )
    .await;
    assert_eq!(head.header("content-encoding"), Some("gzip"));

    let passing = node_for(&origin, "[sites.compression]\nstream = false\n").await;
    let r = get_with(&passing, "/feed", &[("accept-encoding", "gzip")]).await;
    assert_eq!(coding(&r), None);
    assert_eq!(r.body, expected);
}

async fn node_for(origin: &TestOrigin, extra: &str) -> TestNode {
    TestNode::start("", &format!("{}{extra}", site(origin, "site.test", ""))).await
}

#[tokio::test]
async fn a_large_object_streamed_through_its_fill_is_stored_with_its_forms() {
    let origin = TestOrigin::start().await;
    let body = css(600 * 1024);
    origin.route(
        "/big.js",
        Route::bytes(body.clone())
            .header("content-type", "text/javascript")
            .header("cache-control", "max-age=600"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let first = get_with(&node, "/big.js", &[("accept-encoding", "br")]).await;
    assert_eq!(
        coding(&first),
        None,
        "the fill's readers get it as it arrives"
    );
    assert_eq!(first.body, body);
    assert!(varies_on_accept_encoding(&first));
    for accept in ["br", "gzip", "zstd"] {
        let r = get_with(&node, "/big.js", &[("accept-encoding", accept)]).await;
        assert_eq!(coding(&r), Some(accept));
        assert_eq!(decode(Some(accept), &r.body), body);
    }
    assert_eq!(origin.count("/big.js"), 1);
}

#[tokio::test]
async fn purge_inspection_and_the_size_bound_count_every_form() {
    let origin = TestOrigin::start().await;
    let body = css(12 * 1024);
    for path in ["/p.css", "/tight.css"] {
        origin.route(
            path,
            Route::bytes(body.clone())
                .header("content-type", "text/css")
                .header("cache-control", "max-age=600")
                .header("surrogate-key", "styles"),
        );
    }
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\npurge_allow = [\"127.0.0.1/32\"]\n{}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &config).await;
    let r = get_with(&node, "/p.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(coding(&r), Some("gzip"));
    let listing = admin_get(&node, "/cache?url=http://site.test/p.css").await;
    let json = listing.split("\r\n\r\n").nth(1).unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(json).expect("json");
    let variant = &doc["variants"][0];
    let names: Vec<&str> = variant["encodings"]
        .as_array()
        .expect("encodings")
        .iter()
        .filter_map(|e| e["encoding"].as_str())
        .collect();
    assert_eq!(names, ["br", "zstd", "gzip"], "{listing}");
    assert!(variant["weight"].as_u64().unwrap_or(0) > body.len() as u64 + 3000);

    // A purge removes the object with every form.
    let purge = send(node.http, request("PURGE", "site.test", "/p.css", &[])).await;
    assert!(purge.status.is_success(), "{:?}", purge.status);
    for accept in ["gzip", "br"] {
        let r = get_with(&node, "/p.css", &[("accept-encoding", accept)]).await;
        assert_eq!(decode(coding(&r), &r.body), body);
    }
    assert_eq!(
        origin.count("/p.css"),
        2,
        "fetched again once after the purge"
    );

    // max_object_size bounds the identity body and its forms together.
    let tight = format!(
        "[cache]\nmax_object_size = {}\n{}",
        body.len() + 100,
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &tight).await;
    for _ in 0..2 {
        let r = get_with(&node, "/tight.css", &[("accept-encoding", "gzip")]).await;
        assert_eq!(coding(&r), None, "no room for a form");
        assert_eq!(r.body, body);
    }
    assert_eq!(origin.count("/tight.css"), 1, "stored all the same");
}

/// A seeded mix: clients with random `Accept-Encoding` values over compressible,
/// incompressible, origin-gzipped and uncacheable objects, at once. Oracle: every body
/// decodes to the origin's bytes, the coding sent is one the client accepts (or none), a
/// client accepting br at q=1 gets br for a compressible object once stored, and each
/// cacheable object is fetched once.
#[tokio::test]
async fn a_seeded_mix_of_clients_each_gets_what_it_accepts() {
    let seed: u64 = std::env::var("EDGECACHE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let origin = TestOrigin::start().await;
    let mut objects: Vec<(String, Bytes, bool)> = Vec::new(); // path, identity bytes, cacheable
    for i in 0..6 {
        let path = format!("/s{i}.css");
        let body = css(2048 + (i * 5000));
        origin.route(
            &path,
            Route::bytes(body.clone())
                .header("content-type", "text/css")
                .header("cache-control", "max-age=600"),
        );
        objects.push((path, body, true));
    }
    let noise: Vec<u8> = (0..9000).map(|_| next() as u8).collect();
    origin.route(
        "/noise.txt",
        Route::bytes(Bytes::from(noise.clone()))
            .header("content-type", "text/plain")
            .header("cache-control", "max-age=600"),
    );
    objects.push(("/noise.txt".into(), Bytes::from(noise), true));
    let text = css(7000);
    origin.route(
        "/gz.js",
        Route::bytes(Bytes::from(gzip(&text)))
            .header("content-type", "text/javascript")
            .header("content-encoding", "gzip")
            .header("cache-control", "max-age=600"),
    );
    objects.push(("/gz.js".into(), text, true));
    let live = css(5000);
    origin.route(
        "/live.json",
        Route::bytes(live.clone())
            .header("content-type", "application/json")
            .header("cache-control", "private"),
    );
    objects.push(("/live.json".into(), live, false));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;

    let accepts = [
        "",
        "gzip",
        "br",
        "zstd",
        "gzip, deflate, br, zstd",
        "gzip;q=0.5, br;q=0.4",
        "identity",
        "*;q=0",
        "br;q=0, *",
        "zstd;q=0.1, identity;q=0",
        "x-gzip",
    ];
    let mut tasks = Vec::new();
    for _ in 0..160 {
        let (path, body, _) = objects[(next() % objects.len() as u64) as usize].clone();
        let accept = accepts[(next() % accepts.len() as u64) as usize];
        let addr = node.http;
        tasks.push(tokio::spawn(async move {
            let mut h: Vec<(&str, &str)> = Vec::new();
            if !accept.is_empty() {
                h.push(("accept-encoding", accept));
            }
            let r = send(addr, request("GET", "site.test", &path, &h)).await;
            (path, body, accept, r)
        }));
    }
    for t in tasks {
        let (path, body, accept, r) = t.await.expect("task");
        assert_eq!(r.status, 200, "{path} {accept}");
        let c = coding(&r).map(str::to_owned);
        assert_eq!(
            decode(c.as_deref(), &r.body),
            body,
            "{path} [{accept}] seed {seed}"
        );
        if let Some(c) = &c {
            assert!(
                acceptable(accept, c),
                "{path}: sent {c} for [{accept}] seed {seed}"
            );
        }
    }
    // Once stored, a br client gets br for every compressible object.
    for (path, body, cacheable) in &objects {
        let r = get_with(&node, path, &[("accept-encoding", "br")]).await;
        let want = match path.as_str() {
            "/noise.txt" => None,
            "/gz.js" => Some("gzip"),
            _ => Some("br"),
        };
        if *cacheable && path != "/gz.js" {
            assert_eq!(coding(&r), want, "{path}");
        }
        if path == "/gz.js" {
            assert_eq!(coding(&r), None, "br only: decoded");
        }
        assert_eq!(decode(coding(&r), &r.body), *body, "{path}");
        if *cacheable {
            assert_eq!(origin.count(path), 1, "{path} fetched once, seed {seed}");
        }
    }
}

/// The oracle's reading of `Accept-Encoding`: `coding` is acceptable when listed by name
/// (or as `x-gzip`) with a q other than 0, or, when not listed, under a `*` with q other
/// than 0.
fn acceptable(accept: &str, coding: &str) -> bool {
    let mut star = None;
    for item in accept.split(',') {
        let mut p = item.split(';');
        let name = p.next().unwrap_or("").trim().to_ascii_lowercase();
        let zero = p.any(|q| q.trim() == "q=0");
        if name == coding || (coding == "gzip" && name == "x-gzip") {
            return !zero;
        }
        if name == "*" {
            star = Some(!zero);
        }
    }
    star.unwrap_or(false)
}

/// A revalidation's 304 brings its own `Vary` (here `Origin`, as CORS origins send): the
/// forms served after it still say they depend on `Accept-Encoding`.
#[tokio::test]
async fn a_revalidated_object_keeps_its_forms_and_vary() {
    let origin = TestOrigin::start().await;
    let body = css(9000);
    origin.route(
        "/r.css",
        Route::bytes(body.clone())
            .header("content-type", "text/css")
            .header("cache-control", "max-age=0")
            .header("etag", "\"r1\"")
            .header("vary", "Origin"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for round in 0..3 {
        let r = get_with(&node, "/r.css", &[("accept-encoding", "br")]).await;
        assert_eq!(coding(&r), Some("br"), "round {round}");
        assert_eq!(decode(Some("br"), &r.body), body);
        assert!(
            varies_on_accept_encoding(&r),
            "round {round}: {:?}",
            r.headers
        );
    }
    assert!(origin.not_modified() >= 1, "revalidated with 304s");
}

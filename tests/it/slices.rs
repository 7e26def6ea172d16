//! Large files in slices (`[[sites.rules]] slice = "4MiB"`): the origin is asked for the
//! slices a client's range touches, each once however many clients want it, bytes joined
//! from slices match the origin's file, a validator change between slices is caught, a
//! purge removes every slice, and memory stays within the store's bound.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::*;

const MIB: usize = 1 << 20;

/// `n` bytes of a seeded xorshift stream: a file whose every slice differs.
fn file(n: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    Bytes::from(out)
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// A GET whose body may be cut: the head, and the body or the error that ended it.
async fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, http::HeaderMap, Result<Bytes, String>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "site.test", path, headers))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    (parts.status, parts.headers, body)
}

fn config(origin: &TestOrigin, memory: &str, slice: &str) -> String {
    format!(
        "[cache]\nmemory = \"{memory}\"\nmax_object_size = \"8MiB\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\npurge_allow = [\"127.0.0.1/32\"]\n\
         {}[[sites.rules]]\nprefix = \"/media/\"\nslice = \"{slice}\"\n",
        site(origin, "site.test", "")
    )
}

#[tokio::test]
async fn ten_clients_seeking_into_a_64_mib_file_cost_the_origin_the_slices_they_touch() {
    let seed: u64 = std::env::var("EDGECACHE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x51ce_5eed);
    let body = file(64 * MIB, seed);
    let origin = TestOrigin::start().await;
    origin.route(
        "/media/film.mp4",
        Route::bytes(body.clone())
            .ranged()
            .header("content-type", "video/mp4")
            .header("cache-control", "max-age=3600")
            .header("etag", "\"film-1\""),
    );
    let node = TestNode::start("", &config(&origin, "256MiB", "4MiB")).await;
    const SLICE: u64 = 4 << 20;

    // Ten clients at once, each with a random range (some across slice boundaries).
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ranges = Vec::new();
    for _ in 0..10 {
        let a = next() % (64 * MIB as u64);
        let len = 1 + next() % (6 * MIB as u64);
        ranges.push((a, (a + len - 1).min(64 * MIB as u64 - 1)));
    }
    let mut tasks = Vec::new();
    for &(a, b) in &ranges {
        let addr = node.http;
        tasks.push(tokio::spawn(async move {
            let r = format!("bytes={a}-{b}");
            fetch(addr, "/media/film.mp4", &[("range", &r)]).await
        }));
    }
    for (t, &(a, b)) in tasks.into_iter().zip(&ranges) {
        let (status, headers, got) = t.await.expect("task");
        assert_eq!(status, 206, "{a}-{b}");
        assert_eq!(
            headers.get("content-range").and_then(|v| v.to_str().ok()),
            Some(format!("bytes {a}-{b}/{}", 64 * MIB).as_str())
        );
        assert_eq!(
            headers.get("etag").and_then(|v| v.to_str().ok()),
            Some("\"film-1\"")
        );
        let got = got.expect("whole body");
        assert_eq!(
            sha256(&got),
            sha256(&body[a as usize..=b as usize]),
            "{a}-{b} seed {seed}"
        );
    }
    let touched: std::collections::BTreeSet<u64> = ranges
        .iter()
        .flat_map(|&(a, b)| a / SLICE..=b / SLICE)
        .collect();
    let mut asked = origin.ranges("/media/film.mp4");
    asked.sort_unstable();
    let want: Vec<(u64, u64)> = touched
        .iter()
        .map(|&i| (i * SLICE, i * SLICE + SLICE - 1))
        .collect();
    assert_eq!(
        asked, want,
        "each touched slice once, nothing else (seed {seed})"
    );

    // The whole file now: the slices not yet fetched, once each; bytes match the origin's.
    let (status, headers, got) = fetch(node.http, "/media/film.mp4", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-length").and_then(|v| v.to_str().ok()),
        Some((64 * MIB).to_string().as_str())
    );
    assert_eq!(sha256(&got.expect("body")), sha256(&body));
    let mut asked = origin.ranges("/media/film.mp4");
    asked.sort_unstable();
    let all: Vec<(u64, u64)> = (0..16)
        .map(|i| (i * SLICE, i * SLICE + SLICE - 1))
        .collect();
    assert_eq!(asked, all, "every slice fetched once in all");
    assert!(
        origin
            .last_headers("/media/film.mp4")
            .get("accept-encoding")
            .is_none(),
        "slices are asked for as bytes of one representation"
    );

    // And again: all hits.
    let (_, headers, got) = fetch(node.http, "/media/film.mp4", &[("range", "bytes=10-20")]).await;
    assert_eq!(&got.expect("body")[..], &body[10..=20]);
    assert!(
        headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.contains("hit")),
        "{headers:?}"
    );
    assert_eq!(origin.ranges("/media/film.mp4").len(), 16);
}

#[tokio::test]
async fn memory_stays_within_the_stores_bound() {
    let body = file(48 * MIB, 7);
    let origin = TestOrigin::start().await;
    origin.route(
        "/media/big.bin",
        Route::bytes(body.clone())
            .ranged()
            .header("cache-control", "max-age=3600"),
    );
    // A store of 16 MiB: a third of the file. Whole-file reads still come out right.
    let node = TestNode::start("", &config(&origin, "16MiB", "2MiB")).await;
    for _ in 0..2 {
        let (status, _, got) = fetch(node.http, "/media/big.bin", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(sha256(&got.expect("body")), sha256(&body));
    }
    let stats = admin_get(&node, "/cache/stats").await;
    let json = stats.split("\r\n\r\n").nth(1).unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(json).expect("json");
    let bytes = doc["bytes"].as_u64().expect("bytes");
    assert!(bytes <= 16 * MIB as u64, "{bytes} bytes stored: {json}");
    assert!(bytes > 0);
}

#[tokio::test]
async fn a_validator_change_between_slices_is_caught_and_the_new_file_served_whole() {
    let old = file(300 * 1024, 1);
    let new = file(300 * 1024, 2);
    let origin = TestOrigin::start().await;
    let route = |b: &Bytes, tag: &str| {
        Route::bytes(b.clone())
            .ranged()
            .header("cache-control", "max-age=3600")
            .header("etag", tag)
    };
    origin.route("/media/doc.pdf", route(&old, "\"one\""));
    let node = TestNode::start("", &config(&origin, "64MiB", "64KiB")).await;
    // The first slice is stored from the old file.
    let (status, _, got) = fetch(node.http, "/media/doc.pdf", &[("range", "bytes=0-99")]).await;
    assert_eq!(status, 206);
    assert_eq!(&got.expect("body")[..], &old[..100]);

    // The file changes at the origin. A whole read joins the old first slice with new ones:
    // the response is cut, never a mix of two files.
    origin.route("/media/doc.pdf", route(&new, "\"two\""));
    let (status, headers, got) = fetch(node.http, "/media/doc.pdf", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("etag").and_then(|v| v.to_str().ok()),
        Some("\"one\"")
    );
    assert!(
        got.is_err(),
        "a response mixing two versions must not complete"
    );

    // The old slices were purged: the next read is the new file, whole and consistent.
    let (status, headers, got) = fetch(node.http, "/media/doc.pdf", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("etag").and_then(|v| v.to_str().ok()),
        Some("\"two\"")
    );
    assert_eq!(sha256(&got.expect("body")), sha256(&new));
}

#[tokio::test]
async fn a_purge_removes_every_slice() {
    let body = file(256 * 1024, 3);
    let origin = TestOrigin::start().await;
    origin.route(
        "/media/a.iso",
        Route::bytes(body.clone())
            .ranged()
            .header("cache-control", "max-age=3600")
            .header("surrogate-key", "isos"),
    );
    let node = TestNode::start("", &config(&origin, "64MiB", "64KiB")).await;
    let whole = |node: &TestNode| {
        let addr = node.http;
        async move { fetch(addr, "/media/a.iso", &[]).await }
    };
    assert_eq!(sha256(&whole(&node).await.2.expect("body")), sha256(&body));
    assert_eq!(origin.ranges("/media/a.iso").len(), 4);
    assert!(whole(&node).await.2.is_ok());
    assert_eq!(
        origin.ranges("/media/a.iso").len(),
        4,
        "stored: no new fetch"
    );

    let r = send(
        node.http,
        request("PURGE", "site.test", "/media/a.iso", &[]),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"{\"purged\":4}\n", "every slice counted");
    assert_eq!(sha256(&whole(&node).await.2.expect("body")), sha256(&body));
    assert_eq!(
        origin.ranges("/media/a.iso").len(),
        8,
        "every slice fetched again"
    );

    // By tag, through the admin API, too.
    let admin = node.node().admin_addr().expect("admin");
    let req = "POST /purge HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\
               Content-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n\
               {\"tag\":\"isos\"}\n";
    let (reply, _) = raw(admin, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        reply.contains("\"purged\": 4") || reply.contains("\"purged\":4"),
        "{reply}"
    );
    assert!(whole(&node).await.2.is_ok());
    assert_eq!(origin.ranges("/media/a.iso").len(), 12);
}

#[tokio::test]
async fn ranges_conditionals_and_heads_are_answered_from_slices() {
    let body = file(200 * 1024, 4);
    let origin = TestOrigin::start().await;
    origin.route(
        "/media/s.bin",
        Route::bytes(body.clone())
            .ranged()
            .header("cache-control", "max-age=3600")
            .header("etag", "\"s1\"")
            .header("content-type", "application/octet-stream"),
    );
    let node = TestNode::start("", &config(&origin, "64MiB", "64KiB")).await;
    let len = body.len();

    let (status, h, got) = fetch(node.http, "/media/s.bin", &[("range", "bytes=-100")]).await;
    assert_eq!(status, 206);
    assert_eq!(&got.expect("body")[..], &body[len - 100..]);
    assert_eq!(
        h.get("content-range").and_then(|v| v.to_str().ok()),
        Some(format!("bytes {}-{}/{len}", len - 100, len - 1).as_str())
    );

    let (status, _, got) =
        fetch(node.http, "/media/s.bin", &[("range", "bytes=65000-70000")]).await;
    assert_eq!(status, 206, "across a slice boundary");
    assert_eq!(&got.expect("body")[..], &body[65000..=70000]);

    let (status, _, got) = fetch(node.http, "/media/s.bin", &[("range", "bytes=0-1,5-9")]).await;
    assert_eq!(status, 200, "several ranges: the whole file");
    assert_eq!(sha256(&got.expect("body")), sha256(&body));

    let (status, h, _) = fetch(
        node.http,
        "/media/s.bin",
        &[("range", &format!("bytes={}-", len + 5))],
    )
    .await;
    assert_eq!(status, 416);
    assert_eq!(
        h.get("content-range").and_then(|v| v.to_str().ok()),
        Some(format!("bytes */{len}").as_str())
    );

    let (status, h, got) = fetch(
        node.http,
        "/media/s.bin",
        &[("range", "bytes=999999999-,0-9")],
    )
    .await;
    assert_eq!(status, 206, "the satisfiable one of two ranges");
    assert_eq!(&got.expect("body")[..], &body[..10]);
    assert_eq!(
        h.get("content-range").and_then(|v| v.to_str().ok()),
        Some(format!("bytes 0-9/{len}").as_str())
    );

    let (status, _, got) = fetch(node.http, "/media/s.bin", &[("if-none-match", "\"s1\"")]).await;
    assert_eq!(status, 304);
    assert!(got.expect("body").is_empty());
    let (status, _, _) = fetch(node.http, "/media/s.bin", &[("if-match", "\"other\"")]).await;
    assert_eq!(status, 412);
    let (status, _, got) = fetch(
        node.http,
        "/media/s.bin",
        &[("range", "bytes=0-9"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!(status, 200, "If-Range that does not match: the whole file");
    assert_eq!(got.expect("body").len(), len);

    let head = send(node.http, request("HEAD", "site.test", "/media/s.bin", &[])).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(len.to_string().as_str())
    );
    assert!(head.body.is_empty());
    let mut asked = origin.ranges("/media/s.bin");
    asked.sort_unstable();
    asked.dedup();
    assert_eq!(asked.len(), 4, "four slices, each fetched once: {asked:?}");
    assert_eq!(origin.ranges("/media/s.bin").len(), 4);
}

#[tokio::test]
async fn an_origin_that_does_not_do_ranges_is_passed_through() {
    let body = file(100 * 1024, 5);
    let origin = TestOrigin::start().await;
    origin.route(
        "/media/plain.bin",
        Route::bytes(body.clone()).header("cache-control", "max-age=3600"),
    );
    let node = TestNode::start("", &config(&origin, "64MiB", "64KiB")).await;
    let (status, h, got) = fetch(node.http, "/media/plain.bin", &[("range", "bytes=10-19")]).await;
    assert_eq!(status, 200, "the origin's whole answer, as it came");
    assert_eq!(sha256(&got.expect("body")), sha256(&body));
    assert!(h
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("not-sliced")));
    let missing = fetch(node.http, "/media/none.bin", &[]).await;
    assert_eq!(missing.0, 404, "an origin's error is passed on");

    // An empty file has no byte to cut: the origin's 416 means an empty 200.
    origin.route(
        "/media/empty.txt",
        Route::bytes(Bytes::new())
            .ranged()
            .header("cache-control", "max-age=3600"),
    );
    let (status, h, got) = fetch(node.http, "/media/empty.txt", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("content-length").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    assert!(got.expect("body").is_empty());
}

#[tokio::test]
async fn slice_sizes_are_checked() {
    let origin = TestOrigin::start().await;
    for (slice, message) in [
        ("4KiB", "must be from 64KiB to 1GiB"),
        ("16MiB", "is larger than cache.max_object_size"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[server]\nhttp = [\"127.0.0.1:0\"]\n{}",
            config(&origin, "64MiB", slice)
        );
        let err = match edgecache::Config::from_toml(&text, "t.toml", dir.path()) {
            Ok(_) => panic!("slice = {slice} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("rules[0].slice") && err.contains(message),
            "{err}"
        );
    }
}

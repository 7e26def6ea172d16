//! Large stored bodies kept in memory files and sent with sendfile on plain HTTP/1.1: the bytes
//! a client gets are the origin's, whole, in ranges, to slow readers, on kept-alive
//! connections, and over TLS and HTTP/2, where the same body is read as memory.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

/// A body where every offset is told apart from its neighbours, so a shifted or repeated
/// block cannot pass for the real one.
fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| ((i * 7 + i / 251) % 256) as u8)
        .collect::<Vec<u8>>()
        .into()
}

const BIG: usize = (1 << 20) + 12_345;

async fn node_with_big(cache_extra: &str) -> (TestOrigin, TestNode, Bytes) {
    let origin = TestOrigin::start().await;
    let body = pattern(BIG);
    origin.route(
        "/big",
        Route::bytes(body.clone()).header("cache-control", "max-age=600"),
    );
    origin.route(
        "/small",
        Route::bytes(pattern(10_000)).header("cache-control", "max-age=600"),
    );
    let cfg = format!(
        "[cache]\n{cache_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n{}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &cfg).await;
    (origin, node, body)
}

/// Reads one HTTP/1.1 response with a Content-Length from `s`: (head, body).
async fn read_response(s: &mut TcpStream, pace: Option<Duration>) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; if pace.is_some() { 4096 } else { 65536 }];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "closed before the head ended");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = buf.split_off(head_end);
    while body.len() < len {
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
        let want = (len - body.len()).min(chunk.len());
        let n = s.read(&mut chunk[..want]).await.expect("read body");
        assert!(n > 0, "closed after {} of {len} body bytes", body.len());
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len, "no bytes past the body");
    (head, body)
}

#[tokio::test]
async fn large_hits_are_sent_from_the_memory_file_byte_for_byte() {
    let (origin, node, body) = node_with_big("").await;
    let miss = get(node.http, "site.test", "/big").await;
    assert_eq!(
        miss.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
    assert!(miss.body == body, "the miss carries the origin's bytes");

    let before = node.node().metrics().sendfile_bytes();
    let hit = get(node.http, "site.test", "/big").await;
    assert_eq!(hit.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(hit.header("content-length"), Some(BIG.to_string().as_str()));
    assert!(hit.body == body, "the hit carries the origin's bytes");
    let sent = node.node().metrics().sendfile_bytes() - before;
    // All but at most a tail under 32 KiB (written the ordinary way) left through sendfile.
    assert!(
        sent as usize >= BIG - (32 << 10) && sent as usize <= BIG,
        "{sent} of {BIG} bytes from the file"
    );

    // Small objects stay on the heap: nothing from a file.
    get(node.http, "site.test", "/small").await;
    let before = node.node().metrics().sendfile_bytes();
    let small = get(node.http, "site.test", "/small").await;
    assert_eq!(small.header("cache-status"), Some("edgecache; hit"));
    assert!(small.body == pattern(10_000));
    assert_eq!(node.node().metrics().sendfile_bytes(), before);
    assert_eq!(origin.count("/big"), 1);

    // What an operator scrapes: the bytes sent from files, and the stored body among the
    // memory files (a process-wide gauge: at least this node's one).
    let admin = node.node().admin_addr().expect("admin listener");
    let (text, _) = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(
        value("edgecache_sendfile_bytes_total"),
        node.node().metrics().sendfile_bytes()
    );
    assert!(value("edgecache_memory_file_objects") >= 1);
    assert!(value("edgecache_memory_file_bytes") >= BIG as u64);
    value("edgecache_memory_file_fallbacks_total");
}

#[tokio::test]
async fn ranges_of_a_large_object_are_the_right_bytes() {
    let (origin, node, body) = node_with_big("").await;
    get(node.http, "site.test", "/big").await;
    let before = node.node().metrics().sendfile_bytes();
    let part = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/big",
            &[("range", "bytes=100001-900000")],
        ),
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 100001-900000/{BIG}").as_str())
    );
    assert!(part.body == body.slice(100_001..900_001));
    assert!(node.node().metrics().sendfile_bytes() - before >= 800_000 - (32 << 10));
    // A suffix range that ends at the object's last byte.
    let tail = send(
        node.http,
        request("GET", "site.test", "/big", &[("range", "bytes=-70000")]),
    )
    .await;
    assert_eq!(tail.status, 206);
    assert!(tail.body == body.slice(BIG - 70_000..));
    assert_eq!(origin.count("/big"), 1);
}

#[tokio::test]
async fn a_slow_reader_on_a_kept_alive_connection_gets_every_byte_of_each_response() {
    let (_origin, node, body) = node_with_big("").await;
    get(node.http, "site.test", "/big").await;
    // A small receive window, read in small pieces with pauses: the server's sends stop and
    // resume many times, partway through the file.
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(16 << 10).expect("rcvbuf");
    let mut s = sock.connect(node.http).await.expect("connect");
    let req = b"GET /big HTTP/1.1\r\nHost: site.test\r\n\r\n";
    for round in 0..2 {
        s.write_all(req).await.expect("write");
        let pace = (round == 0).then_some(Duration::from_millis(1));
        let (head, got) = read_response(&mut s, pace).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("edgecache; hit"), "{head}");
        assert!(
            got == body[..],
            "response {round} differs from the origin's bytes"
        );
    }
    // Then a small response on the same connection: the framing after a sent file is intact.
    s.write_all(b"GET /small HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write");
    let (head, got) = read_response(&mut s, None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(got == pattern(10_000)[..]);
}

#[tokio::test]
async fn clients_that_leave_mid_file_do_not_disturb_the_node_or_the_stored_body() {
    let (origin, node, body) = node_with_big("").await;
    get(node.http, "site.test", "/big").await;
    for _ in 0..5 {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(16 << 10).expect("rcvbuf");
        let mut s = sock.connect(node.http).await.expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nHost: site.test\r\n\r\n")
            .await
            .expect("write");
        let mut some = vec![0u8; 8192];
        let n = s.read(&mut some).await.expect("read");
        assert!(n > 0);
        // Gone with most of the body unsent: a reset, as a client killed mid-download.
        s.set_zero_linger().expect("linger");
        drop(s);
    }
    // The node still serves the whole body, from the cache, to the next client.
    let hit = get(node.http, "site.test", "/big").await;
    assert_eq!(hit.header("cache-status"), Some("edgecache; hit"));
    assert!(hit.body == body);
    assert_eq!(origin.count("/big"), 1);
    // Every connection that left is closed on the node's side.
    let node_ref = node.node();
    assert!(
        eventually(Duration::from_secs(10), || node_ref.open_connections() == 0).await,
        "connections left open: {}",
        node_ref.open_connections()
    );
}

#[tokio::test]
async fn with_sendfile_off_large_bodies_stay_on_the_heap_and_are_served_the_same() {
    let (_origin, node, body) = node_with_big("sendfile = false").await;
    get(node.http, "site.test", "/big").await;
    let hit = get(node.http, "site.test", "/big").await;
    assert_eq!(hit.header("cache-status"), Some("edgecache; hit"));
    assert!(hit.body == body);
    assert_eq!(node.node().metrics().sendfile_bytes(), 0);
}

#[tokio::test]
async fn the_same_stored_body_is_read_as_memory_over_http2() {
    let (origin, node, body) = node_with_big("sendfile_min_size = \"256KiB\"").await;
    get(node.http, "site.test", "/big").await;
    let before = node.node().metrics().sendfile_bytes();
    let got = h2c_concurrent(node.http, 1, 3, "http://site.test/big").await;
    for g in &got {
        assert_eq!(g.status, 200);
        assert_eq!(g.header("cache-status"), Some("edgecache; hit"));
        assert!(g.body == body, "HTTP/2 hit differs from the origin's bytes");
    }
    // HTTP/2 DATA frames are at most 16 KiB: written from the mapping as memory.
    assert_eq!(node.node().metrics().sendfile_bytes(), before);
    assert_eq!(origin.count("/big"), 1);
}

#[tokio::test]
async fn a_large_stored_body_is_served_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = make_cert(dir.path(), "site", &["site.test"]);
    assert!(cert.cert_path.exists() && cert.key_path.exists());
    let origin = TestOrigin::start().await;
    let body = pattern(BIG);
    origin.route(
        "/big",
        Route::bytes(body.clone()).header("cache-control", "max-age=600"),
    );
    let cfg = format!(
        "[[tls.certificates]]\nhosts = [\"site.test\"]\ncert = \"site.crt\"\nkey = \"site.key\"\n{}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start_in(dir, true, "", &cfg).await;
    let https = node.https.expect("https listener");
    let roots = [cert.der.clone()];
    let miss = tls_get(https, "site.test", &roots, false, "/big").await;
    assert!(miss.body == body);
    for h2 in [false, true] {
        let hit = tls_get(https, "site.test", &roots, h2, "/big").await;
        assert_eq!(hit.header("cache-status"), Some("edgecache; hit"));
        assert!(
            hit.body == body,
            "TLS hit (h2: {h2}) differs from the origin's bytes"
        );
    }
    // TLS encrypts in user memory: nothing goes through sendfile.
    assert_eq!(node.node().metrics().sendfile_bytes(), 0);
    assert_eq!(origin.count("/big"), 1);
}

#[tokio::test]
async fn a_too_small_sendfile_threshold_is_a_clear_config_error() {
    let text = "[server]\nhttp = [\"127.0.0.1:0\"]\n[cache]\nsendfile_min_size = \"16KiB\"\n";
    let Err(err) = edgecache::Config::from_toml(text, "edge.toml", std::path::Path::new("."))
    else {
        panic!("a 1 KiB threshold was accepted");
    };
    let msg = err.to_string();
    assert!(msg.contains("edge.toml"), "{msg}");
    assert!(msg.contains("cache.sendfile_min_size"), "{msg}");
    assert!(msg.contains("at least 32KiB"), "{msg}");
}

//! Routing, forwarding, header hygiene, limits and origin failures.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test]
async fn unknown_host_is_refused_and_reaches_no_origin() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/",
        Route::ok("hello").header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;

    let r = get(node.http, "evil.test", "/").await;
    assert_eq!(r.status, 421);
    // Absolute-form naming a foreign host, with our Host header: still refused.
    let (text, _) = raw(
        node.http,
        b"GET http://evil.test/ HTTP/1.1\r\nHost: site.test\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 421"), "{text}");
    // No Host at all.
    let (text, closed) = raw(node.http, b"GET / HTTP/1.1\r\n\r\n", Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
    assert_eq!(origin.total(), 0, "nothing may reach the origin");

    let r = get(node.http, "SITE.test:8080", "/").await;
    assert_eq!(r.status, 200, "host match ignores case and port");
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn wildcard_and_catch_all_sites() {
    let a = TestOrigin::start().await;
    a.route("/", Route::ok("wild"));
    let b = TestOrigin::start().await;
    b.route("/", Route::ok("any"));
    let body = format!(
        "[[origins]]\nname = \"a\"\nurl = \"{}\"\n[[origins]]\nname = \"b\"\nurl = \"{}\"\n\
         [[sites]]\nhosts = [\"*.example.test\"]\norigin = \"a\"\n[[sites]]\nhosts = [\"*\"]\norigin = \"b\"\n",
        a.url(),
        b.url()
    );
    let node = TestNode::start("", &body).await;
    assert_eq!(
        &get(node.http, "img.example.test", "/").await.body[..],
        b"wild"
    );
    assert_eq!(&get(node.http, "other.test", "/").await.body[..], b"any");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/h",
        Route::ok("x")
            .header("connection", "x-origin-hop")
            .header("x-origin-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "kept"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let req = request(
        "GET",
        "site.test",
        "/h",
        &[
            ("connection", "x-client-hop"),
            ("x-client-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
        ],
    );
    let r = send(node.http, req).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-origin-hop").is_none());
    assert!(r.header("keep-alive").is_none());
    assert!(r.header("proxy-authenticate").is_none());
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
    assert!(r.header("via").is_some_and(|v| v.contains("edgecache")));

    let seen = origin.last_headers("/h");
    for h in [
        "x-client-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(seen.get(h).is_none(), "{h} reached the origin");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["host"], "site.test");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "site.test");
    assert_eq!(seen["via"], "1.1 edgecache");
}

#[tokio::test]
async fn client_forwarding_headers_cannot_steer_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route("/f", Route::ok("x"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let req = request(
        "GET",
        "site.test",
        "/f",
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.test"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6;host=evil.test"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
        ],
    );
    assert_eq!(send(node.http, req).await.status, 200);
    let seen = origin.last_headers("/f");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], "site.test");
    assert_eq!(seen["x-forwarded-proto"], "http");
    for h in [
        "forwarded",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
    ] {
        assert!(seen.get(h).is_none(), "{h} reached the origin");
    }
}

#[tokio::test]
async fn trusted_proxy_forwarding_headers_are_kept_and_extended() {
    let origin = TestOrigin::start().await;
    origin.route("/f", Route::ok("x"));
    let node = TestNode::start(
        "trusted_proxies = [\"127.0.0.0/8\"]",
        &site(&origin, "site.test", ""),
    )
    .await;
    let req = request(
        "GET",
        "site.test",
        "/f",
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ],
    );
    assert_eq!(send(node.http, req).await.status, 200);
    let seen = origin.last_headers("/f");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn origin_down_gives_502() {
    let origin = TestOrigin::start().await;
    let body =
        site(&origin, "site.test", "").replace(&origin.url(), &format!("http://{}", closed_port()));
    let node = TestNode::start("", &body).await;
    let r = get(node.http, "site.test", "/").await;
    assert_eq!(r.status, 502);
    assert!(String::from_utf8_lossy(&r.body).contains("could not be reached"));
}

#[tokio::test]
async fn slow_origin_gives_504_within_the_timeout() {
    let origin = TestOrigin::start().await;
    origin.route("/slow", Route::ok("late").delay(Duration::from_secs(10)));
    let node = TestNode::start("", &site(&origin, "site.test", "timeout = \"300ms\"")).await;
    let start = Instant::now();
    let r = get(node.http, "site.test", "/slow").await;
    assert_eq!(r.status, 504);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "answered before the origin did"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("in time"));
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let origin = TestOrigin::start().await;
    let node = TestNode::start(
        "max_header_bytes = \"16KiB\"",
        &site(&origin, "site.test", ""),
    )
    .await;
    let big = "a".repeat(40 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: site.test\r\nX-Big: {big}\r\n\r\n");
    let (text, closed) = raw(node.http, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(closed);
    assert_eq!(origin.total(), 0);
}

#[tokio::test]
async fn ambiguous_framing_gets_400_and_a_closed_connection() {
    let origin = TestOrigin::start().await;
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    // Content-Length with Transfer-Encoding: hyper drops the length and frames by the chunked
    // encoding (RFC 9112 §6.1 allows this) and closes the connection after the response, so
    // the request smuggled behind the body is never read.
    let smuggle = b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n";
    let (text, closed) = raw(node.http, smuggle, Duration::from_secs(5)).await;
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "no second response: {text}"
    );
    assert!(closed);
    // Transfer-Encoding that is not chunked cannot be framed at all.
    let (text, closed) = raw(
        node.http,
        b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
    let (text, closed) = raw(
        node.http,
        b"POST / HTTP/1.1\r\nHost: site.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
    let (text, closed) = raw(
        node.http,
        b"POST / HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "bad chunking: {text}");
    assert!(closed);
    assert_eq!(origin.count("/smuggled"), 0);
    assert_eq!(
        origin.total(),
        1,
        "only the first, well-framed POST reached the origin"
    );
    let (text, closed) = raw(
        node.http,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("x"));
    let node = TestNode::start("idle_timeout = \"300ms\"", &site(&origin, "site.test", "")).await;
    let (text, closed) = raw(
        node.http,
        b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(closed, "the idle connection was closed by the server");
}

#[tokio::test]
async fn slow_header_reads_are_cut() {
    let origin = TestOrigin::start().await;
    let node = TestNode::start(
        "header_read_timeout = \"300ms\"",
        &site(&origin, "site.test", ""),
    )
    .await;
    // Half a request head, then silence.
    let (_, closed) = raw(
        node.http,
        b"GET / HTTP/1.1\r\nHost: si",
        Duration::from_secs(10),
    )
    .await;
    assert!(closed);
    assert_eq!(origin.total(), 0);
}

#[tokio::test]
async fn request_bodies_stream_to_the_origin() {
    let origin = TestOrigin::start().await;
    origin.route("/upload", Route::ok("got it"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let body = "z".repeat(100_000);
    let req = format!("POST /upload HTTP/1.1\r\nHost: site.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let (text, _) = raw(node.http, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("got it"));
    assert_eq!(origin.last_headers("/upload")["content-length"], "100000");
}

/// One GET over HTTP/2 with prior knowledge on `io`.
async fn h2c_get<I>(io: I, uri: &str) -> Got
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(uri)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    read(sender.send_request(req).await.expect("response")).await
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_plain_port() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("over h2c"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let stream = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect");
    let r = h2c_get(stream, "http://site.test/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(&r.body[..], b"over h2c");
}

/// A stream whose first write sends at most `first` bytes and then holds further writes back
/// for `pause`, so the peer receives the start of what we send on its own.
struct SplitFirstWrite {
    inner: tokio::net::TcpStream,
    first: Option<usize>,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    delay: Duration,
}

impl tokio::io::AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(first) = self.first.take() {
            let n = buf.len().min(first);
            let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
            let delay = self.delay;
            self.pause = Some(Box::pin(tokio::time::sleep(delay)));
            return res;
        }
        if let Some(p) = self.pause.as_mut() {
            if std::future::Future::poll(p.as_mut(), cx).is_pending() {
                return std::task::Poll::Pending;
            }
            self.pause = None;
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn h2c_preface_arriving_in_pieces_is_still_http2() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("split preface"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let stream = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    // "PRI *" alone first: the node must wait for the rest instead of taking it for HTTP/1.
    let io = SplitFirstWrite {
        inner: stream,
        first: Some(5),
        pause: None,
        delay: Duration::from_millis(200),
    };
    let r = h2c_get(io, "http://site.test/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(&r.body[..], b"split preface");
    assert_eq!(origin.count("/"), 1);
}

#[tokio::test]
async fn a_stalled_h2c_preface_is_cut_at_the_header_timeout() {
    let origin = TestOrigin::start().await;
    let node = TestNode::start(
        "header_read_timeout = \"300ms\"",
        &site(&origin, "site.test", ""),
    )
    .await;
    let started = Instant::now();
    let (text, closed) = raw(node.http, b"PRI * HTTP/2", Duration::from_secs(10)).await;
    assert!(closed, "the connection was closed");
    assert!(text.is_empty(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(origin.total(), 0);
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_download() {
    let origin = TestOrigin::start().await;
    // 20 chunks of 64 KiB, 50 ms apart: about a second of transfer.
    origin.route(
        "/dl",
        Route::ok("").generated(64 << 10, 20, true, Duration::from_millis(50)),
    );
    let mut node =
        TestNode::start("shutdown_grace = \"20s\"", &site(&origin, "site.test", "")).await;
    let addr = node.http;
    let download = tokio::spawn(async move { get(addr, "site.test", "/dl").await });
    assert!(eventually(Duration::from_secs(5), || origin.count("/dl") == 1).await);
    let n = node.node.take().expect("node");
    let shutdown = tokio::spawn(n.shutdown());
    // New connections are refused once the listeners are closed.
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            addr
        )
        .is_err())
        .await,
        "listener still accepting"
    );
    let r = download.await.expect("download task");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body.len(),
        20 * (64 << 10),
        "the in-flight download completed"
    );
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown returned")
        .expect("join");
}

#[tokio::test]
async fn rapid_reset_flood_ends_in_goaway() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("x").delay(Duration::from_millis(200)));
    let node = TestNode::start(
        "h2_max_pending_resets = 20",
        &site(&origin, "site.test", ""),
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    // One ordinary exchange first, so the server's SETTINGS (stream limit) are in force and
    // only the reset defence can end the connection.
    let mut client = client.ready().await.expect("ready");
    let (resp, _) = client
        .send_request(
            http::Request::builder()
                .uri("http://site.test/")
                .body(())
                .expect("request"),
            true,
        )
        .expect("send");
    assert_eq!(resp.await.expect("response").status(), 200);
    // Keep a handle so the connection can only end because the server ended it.
    let keep = client.clone();
    let mut opened = 0;
    // Open streams and reset them at once, as CVE-2023-44487 attackers do. Bounded loop.
    for _ in 0..5_000 {
        let ready = tokio::time::timeout(Duration::from_secs(5), client.ready()).await;
        client = match ready {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let req = http::Request::builder()
            .uri("http://site.test/")
            .body(())
            .expect("request");
        match client.send_request(req, true) {
            Ok((_resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
    }
    // The server ends the connection with GOAWAY while our client handle is still alive.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn_task).await;
    let result =
        ended.unwrap_or_else(|_| panic!("connection still open after {opened} reset streams"));
    let err = result
        .expect("join")
        .expect_err("the server closed the connection with an error");
    assert!(err.is_go_away(), "{err:?}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    drop(keep);
}

#[tokio::test]
async fn connection_count_is_bounded() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("x"));
    let node = TestNode::start(
        "max_connections = 2\nidle_timeout = \"60s\"",
        &site(&origin, "site.test", ""),
    )
    .await;
    // Two clients hold the only two slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = tokio::net::TcpStream::connect(node.http)
            .await
            .expect("connect");
        held.push(s);
    }
    assert!(
        eventually(Duration::from_secs(5), || node.node().open_connections()
            == 2)
        .await
    );
    // A third is not served while they are open.
    let (text, _) = raw(
        node.http,
        b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(text.is_empty(), "served beyond the limit: {text}");
    drop(held);
    let (text, _) = raw(
        node.http,
        b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

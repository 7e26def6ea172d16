//! `server.send_timeout` (issue 19): a client that stops reading is disconnected once it has
//! taken no byte for `send_timeout`, over plain HTTP/1.1 (from memory and with sendfile),
//! TLS and HTTP/2, and so stops holding back the other readers of a fill; a slow reader that
//! keeps taking bytes is left alone.
//!
//! The kernel buffers about 4 MiB for a client that reads nothing (its send buffer grows to
//! `net.ipv4.tcp_wmem`'s maximum however small the client's window), so the objects here are
//! well past that, and every "disconnected" is checked by the client finding the body cut
//! short: on a machine that buffered a whole object the tests fail rather than pass unseen.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

/// Generated bodies come in chunks of this size, each `i % 251` for i in 0..CHUNK.
const CHUNK: usize = 64 << 10;
/// Stored: under the nodes' `max_object_size` (20 MiB).
const STORED: usize = 16 << 20;
/// Past `max_object_size`. With its length announced, it is passed through (the origin's
/// connection held by the client's pace); without, the fill is abandoned once it grows past
/// the limit and is kept to within 1 MiB of its slowest reader.
const HUGE: usize = 24 << 20;

/// `len` bytes in `CHUNK`s, storable, with a Content-Length.
fn generated(len: usize) -> Route {
    Route::ok("")
        .generated(CHUNK, len / CHUNK, true, Duration::ZERO)
        .header("cache-control", "max-age=600")
}

/// The same without a Content-Length (chunked): a body past `max_object_size` becomes an
/// abandoned fill that collapsed clients share.
fn growing(len: usize) -> Route {
    Route::ok("")
        .generated(CHUNK, len / CHUNK, false, Duration::ZERO)
        .header("cache-control", "max-age=600")
}

/// True when `body` is `len` bytes of what `generated` sends.
fn is_generated(body: &[u8], len: usize) -> bool {
    body.len() == len
        && body
            .chunks(CHUNK)
            .all(|c| c.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8))
}

/// An origin with `/stored`, `/huge` and `/growing`, and a node with `send_timeout = "1s"`. The idle
/// timeout is long, so only the send timeout can close a connection within the tests'
/// deadlines.
async fn setup(https: bool) -> (TestOrigin, TestNode, Option<TestCert>) {
    let origin = TestOrigin::start().await;
    origin.route("/stored", generated(STORED));
    origin.route("/huge", generated(HUGE));
    origin.route("/growing", growing(HUGE));
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, tls) = if https {
        let cert = make_cert(dir.path(), "site", &["site.test"]);
        let tls = "[[tls.certificates]]\nhosts = [\"site.test\"]\ncert = \"site.crt\"\nkey = \"site.key\"\n";
        (Some(cert), tls)
    } else {
        (None, "")
    };
    let cfg = format!(
        "[cache]\nmax_object_size = \"20MiB\"\n{tls}{}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start_in(
        dir,
        https,
        "send_timeout = \"1s\"\nidle_timeout = \"60s\"",
        &cfg,
    )
    .await;
    (origin, node, cert)
}

/// A TCP connection with a small receive buffer.
async fn small_window(addr: std::net::SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(16 << 10).expect("rcvbuf");
    sock.connect(addr).await.expect("connect")
}

/// Waits for the node to have exactly `n` connections open.
async fn open_connections(node: &TestNode, n: usize, limit: Duration) -> bool {
    let node = node.node();
    eventually(limit, || node.open_connections() == n).await
}

/// Reads what is left on a connection until the node's close (EOF or reset); the byte count.
async fn read_to_close(mut s: impl AsyncRead + Unpin) -> usize {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the connection is still open after {total} bytes"),
        }
    }
}

/// Sends `GET path` on `s` and never reads; returns once the node has dropped the
/// connection (asserting it does within 15 s), with the bytes the client could still read.
async fn stall_until_dropped<S>(node: &TestNode, mut s: S, path: &str) -> usize
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    assert!(
        open_connections(node, 1, Duration::from_secs(5)).await,
        "the connection was accepted"
    );
    assert!(
        open_connections(node, 0, Duration::from_secs(15)).await,
        "{path}: the node still holds a client that stopped reading"
    );
    read_to_close(s).await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_send_timeout() {
    let (origin, node, _) = setup(false).await;

    // Past max_object_size: passed through, and an abandoned fill. Then a miss of an object
    // that is stored.
    for (path, len) in [("/huge", HUGE), ("/growing", HUGE), ("/stored", STORED)] {
        let got = stall_until_dropped(&node, small_window(node.http).await, path).await;
        assert!(got < len, "{path}: the whole body was sent ({got} bytes)");
    }

    // A hit from a memory file, sent with sendfile: its writes count and its refusals are seen.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let g = get(node.http, "site.test", "/stored").await;
        assert!(is_generated(&g.body, STORED));
        if g.header("cache-status") == Some("edgecache; hit") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/stored was never stored"
        );
    }
    let before = node.node().metrics().sendfile_bytes();
    let got = stall_until_dropped(&node, small_window(node.http).await, "/stored").await;
    assert!(got < STORED, "the whole hit was sent ({got} bytes)");
    assert!(
        node.node().metrics().sendfile_bytes() > before,
        "the hit was sent with sendfile"
    );
    assert_eq!(origin.count("/huge"), 1);
    assert_eq!(origin.count("/growing"), 1);
}

#[tokio::test]
async fn over_tls_a_client_that_stops_reading_is_disconnected() {
    let (_origin, node, cert) = setup(true).await;
    let roots = [cert.expect("certificate").der];
    let https = node.https.expect("https listener");
    for path in ["/growing", "/stored"] {
        let tcp = small_window(https).await;
        let tls = tls_handshake(tcp, "site.test", &roots, &[b"http/1.1"]).await;
        let got = stall_until_dropped(&node, tls, path).await;
        assert!(got < HUGE.min(STORED), "{path}: the whole body was sent");
    }
}

/// Opens an HTTP/2 connection (prior knowledge) with the given windows and asks for `path`;
/// returns the response once its head is in, and the connection, not polled any more.
async fn h2_get(
    node: &TestNode,
    window: u32,
    path: &str,
) -> (
    http::Response<h2::RecvStream>,
    h2::client::Connection<TcpStream, Bytes>,
) {
    let tcp = small_window(node.http).await;
    let (client, mut conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let req = http::Request::builder()
        .uri(format!("http://site.test{path}"))
        .body(())
        .expect("request");
    let exchange = async move {
        let mut client = client.ready().await.expect("ready");
        let (resp, _) = client.send_request(req, true).expect("send");
        resp.await.expect("response head")
    };
    let resp = tokio::select! {
        resp = exchange => resp,
        res = &mut conn => panic!("the connection ended before the response: {res:?}"),
    };
    assert_eq!(resp.status(), 200);
    (resp, conn)
}

/// Reads an HTTP/2 response body, granting window as it goes, until it ends or fails.
async fn h2_read(resp: http::Response<h2::RecvStream>) -> usize {
    let mut body = resp.into_body();
    let mut total = 0;
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        total += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    total
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_its_socket_is_disconnected() {
    let (_origin, node, _) = setup(false).await;
    // Windows larger than the body: only the socket stops the node.
    let (resp, conn) = h2_get(&node, 1 << 30, "/growing").await;
    assert!(
        open_connections(&node, 0, Duration::from_secs(15)).await,
        "the node still holds an HTTP/2 client that stopped reading"
    );
    tokio::spawn(conn);
    let got = tokio::time::timeout(Duration::from_secs(10), h2_read(resp))
        .await
        .expect("the body ends once the connection is gone");
    assert!(got < HUGE, "the whole body was sent");
}

#[tokio::test]
async fn an_http2_client_that_grants_no_window_is_disconnected() {
    let (_origin, node, _) = setup(false).await;
    // The client keeps reading its socket (and would answer pings), but never gives back
    // window: the connection's 64 KiB are spent and the node's response stops with no
    // write refused.
    let (resp, conn) = h2_get(&node, 65_535, "/growing").await;
    let conn = tokio::spawn(conn);
    assert!(
        open_connections(&node, 0, Duration::from_secs(15)).await,
        "the node still holds an HTTP/2 client that grants no window"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the client's connection ended");
    drop(resp);
}

#[tokio::test]
async fn a_stalled_reader_holds_back_a_shared_fill_for_no_longer_than_send_timeout() {
    let (origin, node, _) = setup(false).await;
    // The head comes late, so both clients join the same fill before its first byte.
    origin.route("/shared", growing(HUGE).delay(Duration::from_secs(1)));
    let mut stalled = small_window(node.http).await;
    stalled
        .write_all(b"GET /shared HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write request");
    assert!(
        eventually(Duration::from_secs(5), || origin.count("/shared") == 1).await,
        "the stalled client's request reached the origin"
    );
    // Past max_object_size the fill waits for its slowest reader (1 MiB window), which is
    // the stalled client until the node drops it.
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        get(node.http, "site.test", "/shared"),
    )
    .await
    .expect("the second reader got the whole body while the stalled one was connected");
    assert_eq!(got.status, 200);
    assert!(is_generated(&got.body, HUGE), "{} bytes", got.body.len());
    assert_eq!(origin.count("/shared"), 1, "both clients read one fill");
    assert!(
        open_connections(&node, 0, Duration::from_secs(15)).await,
        "the stalled client was disconnected"
    );
    let cut = read_to_close(stalled).await;
    assert!(cut < HUGE, "the stalled client was sent the whole body");
}

#[tokio::test]
async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut_off() {
    let origin = TestOrigin::start().await;
    const SLOW: usize = 24 << 20;
    origin.route("/slow", generated(SLOW));
    let node = TestNode::start("send_timeout = \"1s\"", &site(&origin, "site.test", "")).await;
    let stored = get(node.http, "site.test", "/slow").await;
    assert!(is_generated(&stored.body, SLOW));
    let before = node.node().metrics().sendfile_bytes();

    // The node sees a reader progress when the kernel lets it write again, which it does
    // once a third of the socket's send buffer (grown to 4 MiB here) has drained: so a
    // reader that takes 1 MiB every 200 ms is one the node can see taking bytes several
    // times per send_timeout. The transfer lasts seconds, the node's writes refused most
    // of the time.
    let mut s = TcpStream::connect(node.http).await.expect("connect");
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write request");
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "closed before the head ended");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    assert!(head.contains("edgecache; hit"), "{head}");
    let mut body = buf.split_off(head_end);
    while body.len() < SLOW {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let want = (SLOW - body.len()).min(chunk.len());
        let read = s.read_exact(&mut chunk[..want]).await;
        assert!(
            read.is_ok(),
            "cut off after {} of {SLOW} bytes: {read:?}",
            body.len()
        );
        body.extend_from_slice(&chunk[..want]);
    }
    assert!(is_generated(&body, SLOW), "the slow reader got the object");
    assert!(node.node().metrics().sendfile_bytes() > before);
    assert_eq!(node.node().open_connections(), 1, "its connection is kept");
}

#[tokio::test]
async fn a_connection_still_open_when_shutdown_grace_ends_is_dropped() {
    let origin = TestOrigin::start().await;
    // An answer that would take far longer than the grace (and than the test).
    origin.route("/late", Route::ok("late").delay(Duration::from_secs(120)));
    let mut node = TestNode::start(
        "shutdown_grace = \"1s\"",
        &site(&origin, "site.test", "timeout = \"300s\""),
    )
    .await;
    let mut s = TcpStream::connect(node.http).await.expect("connect");
    s.write_all(b"GET /late HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write request");
    assert!(eventually(Duration::from_secs(5), || origin.count("/late") == 1).await);
    let n = node.node.take().expect("node");
    tokio::time::timeout(Duration::from_secs(10), n.shutdown())
        .await
        .expect("shutdown returned");
    // The node's side is gone (not left running after the node stopped): the client sees
    // the connection end, without an answer.
    let got = read_to_close(s).await;
    assert_eq!(got, 0, "no answer was sent");
}

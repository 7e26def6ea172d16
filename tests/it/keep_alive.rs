//! Keep-alive and request heads (issue 13): a kept-alive HTTP/1.1 connection waits for its
//! next request for `idle_timeout` (nginx's `keepalive_timeout`), not `header_read_timeout`;
//! `header_read_timeout` runs from a head's first byte, and for a connection's first request
//! from its start (nginx's `client_header_timeout`). Plain and over TLS.
//!
//! The nodes run `header_read_timeout = "1s"`. Slow heads are trickled a byte every 200 ms, so
//! bytes keep moving and only the head's timeout can close the connection before the whole
//! head is in.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A kept-alive connection is left idle this long between requests: twice
/// `header_read_timeout`, well under `idle_timeout`.
const PAUSE: Duration = Duration::from_secs(2);

/// Trickled a byte every 200 ms, this head takes about 13 s: more than ten times
/// `header_read_timeout`.
const SLOW_HEAD: &[u8] =
    b"GET /kept HTTP/1.1\r\nHost: site.test\r\nUser-Agent: one byte at a time\r\n\r\n";

/// An origin answering `/kept` (not storable, so each request reaches it) and a node with
/// `header_read_timeout = "1s"` and the given `idle_timeout`, with an HTTPS listener.
async fn setup(idle: &str) -> (TestOrigin, TestNode, TestCert) {
    let origin = TestOrigin::start().await;
    origin.route(
        "/kept",
        Route::ok("kept").header("cache-control", "no-store"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = make_cert(dir.path(), "site", &["site.test"]);
    let cfg = format!(
        "[[tls.certificates]]\nhosts = [\"site.test\"]\ncert = \"site.crt\"\nkey = \"site.key\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
        site(&origin, "site.test", "")
    );
    let server = format!("header_read_timeout = \"1s\"\nidle_timeout = \"{idle}\"");
    let node = TestNode::start_in(dir, true, &server, &cfg).await;
    (origin, node, cert)
}

async fn tls(node: &TestNode, cert: &TestCert) -> tokio_rustls::client::TlsStream<TcpStream> {
    let https = node.https.expect("https listener");
    tls_connect(
        https,
        "site.test",
        std::slice::from_ref(&cert.der),
        &[b"http/1.1"],
    )
    .await
}

/// Two requests on one connection with `PAUSE` between them; then the connection, left idle,
/// is closed by the node within `idle_timeout` (5 s) and generous slack.
async fn kept_alive_across_a_pause<I>(io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    let mut conn = tokio::spawn(conn);
    for n in 1..=2 {
        if n == 2 {
            tokio::time::sleep(PAUSE).await;
        }
        let resp = sender
            .send_request(request("GET", "site.test", "/kept", &[]))
            .await
            .unwrap_or_else(|e| panic!("request {n} on the kept-alive connection: {e}"));
        let got = read(resp).await;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"kept");
    }
    let closed = tokio::time::timeout(Duration::from_secs(20), &mut conn).await;
    assert!(
        closed.is_ok(),
        "the node kept a connection idle past idle_timeout"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_idle_past_header_read_timeout_serves_its_next_request() {
    let (origin, node, cert) = setup("5s").await;
    kept_alive_across_a_pause(TcpStream::connect(node.http).await.expect("connect")).await;
    assert_eq!(origin.count("/kept"), 2);
    kept_alive_across_a_pause(tls(&node, &cert).await).await;
    assert_eq!(origin.count("/kept"), 4);
    let n = node.node();
    assert!(eventually(Duration::from_secs(5), || n.open_connections() == 0).await);
}

/// Reads one answer to a GET of `/kept` (its body ends the response), failing if the
/// connection closes first.
async fn read_answer(rd: &mut (impl AsyncRead + Unpin)) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n\r\nkept") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

/// Sends `SLOW_HEAD` a byte every 200 ms; true when the node closed the connection before the
/// whole head was in (after a request and a `PAUSE`, twice, when `kept_alive`).
async fn slow_head_is_cut<S>(s: S, kept_alive: bool) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(s);
    if kept_alive {
        for _ in 0..2 {
            wr.write_all(b"GET /kept HTTP/1.1\r\nHost: site.test\r\n\r\n")
                .await
                .expect("write");
            read_answer(&mut rd).await;
            tokio::time::sleep(PAUSE).await;
        }
    }
    let closed = async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let trickle = async {
        for b in SLOW_HEAD {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    tokio::select! {
        () = closed => true,
        cut = trickle => cut,
    }
}

#[tokio::test]
async fn a_head_not_complete_within_header_read_timeout_is_cut() {
    let (origin, node, cert) = setup("5s").await;
    let plain = || async { TcpStream::connect(node.http).await.expect("connect") };
    assert!(
        slow_head_is_cut(plain().await, false).await,
        "first request, plain"
    );
    assert!(
        slow_head_is_cut(tls(&node, &cert).await, false).await,
        "first request, TLS"
    );
    assert_eq!(origin.count("/kept"), 0);
    // After an idle pause on a kept-alive connection the head still gets only
    // header_read_timeout from its first byte.
    assert!(
        slow_head_is_cut(plain().await, true).await,
        "kept alive, plain"
    );
    assert!(
        slow_head_is_cut(tls(&node, &cert).await, true).await,
        "kept alive, TLS"
    );
    assert_eq!(origin.count("/kept"), 4, "only the whole heads were served");
}

/// Waits for the node to close `s` (EOF or an error); false if it is still open after 20 s.
async fn closed_by_node(mut s: impl AsyncRead + Unpin) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_header_read_timeout() {
    // idle_timeout is far past the 20 s the test waits: only header_read_timeout can close
    // these. As nginx's client_header_timeout, it bounds the wait for a first request.
    let (origin, node, cert) = setup("120s").await;
    let https = node.https.expect("https listener");
    let plain = TcpStream::connect(node.http).await.expect("connect");
    assert!(closed_by_node(plain).await, "plain, nothing sent");
    let no_handshake = TcpStream::connect(https).await.expect("connect");
    assert!(closed_by_node(no_handshake).await, "no TLS handshake");
    assert!(
        closed_by_node(tls(&node, &cert).await).await,
        "TLS handshake, then nothing"
    );
    assert_eq!(origin.total(), 0);
}

/// Reads until `n` answers to GETs of `/kept` are in (each body ends one), failing if the
/// connection closes first.
async fn read_answers(rd: &mut (impl AsyncRead + Unpin), n: usize) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let count = |got: &[u8]| got.windows(8).filter(|w| w == b"\r\n\r\nkept").count();
    while count(&got) < n {
        let read = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
            .await
            .expect("answers within 10 s")
            .expect("read");
        assert!(
            read > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..read]);
    }
    assert_eq!(count(&got), n, "{}", String::from_utf8_lossy(&got));
    assert_eq!(
        got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count(),
        n,
        "{}",
        String::from_utf8_lossy(&got)
    );
}

async fn parked(node: &TestNode, n: u64) -> bool {
    until(Duration::from_secs(10), || async {
        metric(node, "edgecache_parked_connections").await == n
    })
    .await
}

/// One connection, idle between its requests long enough to be parked each time (hyper's
/// connection closed, the stream kept with no buffers): it then serves a request, two
/// pipelined in one write, and a pipelined head whose second half comes after a park.
async fn parks_and_serves<S>(node: &TestNode, s: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const GET: &[u8] = b"GET /kept HTTP/1.1\r\nHost: site.test\r\n\r\n";
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(GET).await.expect("write");
    read_answers(&mut rd, 1).await;
    assert!(parked(node, 1).await, "the idle connection was not parked");
    wr.write_all(GET).await.expect("write");
    read_answers(&mut rd, 1).await;
    assert!(parked(node, 1).await);
    wr.write_all(&[GET, GET].concat()).await.expect("write");
    read_answers(&mut rd, 2).await;
    assert!(parked(node, 1).await);
    // A whole head and half of the next in one write: hyper reads both and answers the
    // first; the tick that parks the connection finds hyper holding the half, which goes to
    // the next hyper connection at once. The rest comes after more than a tick.
    let (half, rest) = GET.split_at(20);
    wr.write_all(&[GET, half].concat()).await.expect("write");
    read_answers(&mut rd, 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    wr.write_all(rest).await.expect("write");
    read_answers(&mut rd, 1).await;
    assert!(parked(node, 1).await);
    drop((rd, wr));
    assert!(
        parked(node, 0).await,
        "a closed parked connection still counted"
    );
}

/// Issue 18: idle kept-alive connections give back hyper's buffers within a second or two
/// (`edgecache_parked_connections`) and serve whatever comes next as before, plain and over
/// TLS, every request reaching the origin once.
#[tokio::test]
async fn idle_connections_are_parked_and_serve_what_comes_next() {
    let (origin, node, cert) = setup("60s").await;
    parks_and_serves(&node, TcpStream::connect(node.http).await.expect("connect")).await;
    assert_eq!(origin.count("/kept"), 6);
    parks_and_serves(&node, tls(&node, &cert).await).await;
    assert_eq!(origin.count("/kept"), 12);
}

/// A parked connection is still closed at `idle_timeout`, counted from its last byte.
#[tokio::test]
async fn parked_connections_close_at_idle_timeout() {
    let (_origin, node, _cert) = setup("3s").await;
    let mut s = TcpStream::connect(node.http).await.expect("connect");
    s.write_all(b"GET /kept HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .expect("write");
    read_answers(&mut s, 1).await;
    assert!(parked(&node, 1).await);
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("closed within 20 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the node sent bytes to an idle connection");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(parked(&node, 0).await);
}

//! Issue 13, a client must not be able to harm other clients: request rates per client
//! address and per site (429 with Retry-After), and a cap on connections per client address.
//! Rates are per minute, so no bucket refills while a test runs.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use edgecache::telemetry::CacheResult;

use crate::support::*;

async fn cached_origin() -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("p").header("cache-control", "max-age=600"));
    origin
}

/// A GET for `/p` on `host` from the client `client` names, through the trusted proxy
/// 127.0.0.1 (`None`: from 127.0.0.1 itself).
async fn get_as(node: &TestNode, host: &str, client: Option<&str>) -> Got {
    let headers: Vec<(&str, &str)> = client.map(|c| ("x-forwarded-for", c)).into_iter().collect();
    send(node.http, request("GET", host, "/p", &headers)).await
}

/// A 429 from a limit: `Retry-After` in whole seconds, at most `max`, and no `Cache-Status`.
fn assert_limited(r: &Got, max: u64) {
    assert_eq!(r.status, 429, "{r:?}");
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in seconds: {r:?}"));
    assert!((1..=max).contains(&after), "Retry-After {after}");
    assert!(r.header("cache-status").is_none(), "{r:?}");
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_while_other_clients_are_served() {
    let origin = cached_origin().await;
    let node = TestNode::start(
        "trusted_proxies = [\"127.0.0.1\"]\nrate_per_client = \"2/min\"\n",
        &site(&origin, "site.test", ""),
    )
    .await;
    let a = Some("198.51.100.1");
    assert_eq!(get_as(&node, "site.test", a).await.status, 200);
    assert_eq!(get_as(&node, "site.test", a).await.status, 200, "a hit");
    // Two per minute, the burst spent: the next is due in at most 30 s.
    let r = get_as(&node, "site.test", a).await;
    assert_limited(&r, 30);
    assert_limited(&get_as(&node, "site.test", a).await, 30);

    let r = get_as(&node, "site.test", Some("198.51.100.2")).await;
    assert_eq!(r.status, 200, "another client, named by the trusted proxy");
    let r = get_as(&node, "site.test", None).await;
    assert_eq!(r.status, 200, "the proxy's own requests are its own client");
    assert_eq!(origin.count("/p"), 1, "limited requests reach nothing");
    assert_eq!(node.node().metrics().requests_with(CacheResult::Limited), 2);
}

#[tokio::test]
async fn a_site_rate_applies_across_clients_and_to_that_site_only() {
    let origin = cached_origin().await;
    let body = format!(
        "{}limits = {{ rate = \"2/min\" }}\n[[sites]]\nhosts = [\"other.test\"]\norigin = \"o\"\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("trusted_proxies = [\"127.0.0.1\"]\n", &body).await;
    assert_eq!(
        get_as(&node, "site.test", Some("198.51.100.1"))
            .await
            .status,
        200
    );
    assert_eq!(
        get_as(&node, "site.test", Some("198.51.100.2"))
            .await
            .status,
        200
    );
    assert_limited(&get_as(&node, "site.test", Some("198.51.100.3")).await, 30);
    assert_eq!(
        get_as(&node, "other.test", Some("198.51.100.3"))
            .await
            .status,
        200,
        "the other site has no limit"
    );
    assert_eq!(node.node().metrics().requests_with(CacheResult::Limited), 1);
}

/// A keep-alive HTTP/1.1 connection to `addr`, and its first answer for `/p`.
async fn connection(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    assert_eq!(ask(&mut sender).await, 200);
    sender
}

async fn ask(sender: &mut SendRequest<Empty<Bytes>>) -> u16 {
    let req = Request::get("/p")
        .header("host", "site.test")
        .body(Empty::new())
        .expect("request");
    read(sender.send_request(req).await.expect("response"))
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn limits_are_off_by_default() {
    let origin = cached_origin().await;
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(connection(node.http).await);
    }
    for c in &mut conns {
        for _ in 0..10 {
            assert_eq!(ask(c).await, 200);
        }
    }
    assert_eq!(node.node().metrics().requests_with(CacheResult::Limited), 0);
    assert_eq!(node.node().metrics().connections_refused(), 0);
}

/// A GET for `/p` on a new connection: what came back before the server closed it or 5 s
/// passed. A write that fails (the connection already reset) counts as nothing back.
async fn try_get(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    if s.write_all(b"GET /p HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    // One small answer: enough once its body is in.
                    if out.ends_with(b"\r\n\r\np") {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn connections_past_the_cap_per_client_are_closed_unanswered() {
    let origin = cached_origin().await;
    let node = TestNode::start(
        "max_connections_per_client = 2\n",
        &site(&origin, "site.test", ""),
    )
    .await;
    let mut first = connection(node.http).await;
    let mut second = connection(node.http).await;
    let answer = try_get(node.http).await;
    assert!(answer.is_empty(), "third connection: {answer:?}");
    assert_eq!(node.node().metrics().connections_refused(), 1);
    assert_eq!(ask(&mut first).await, 200, "the first two are still served");
    assert_eq!(ask(&mut second).await, 200);

    // A closed connection gives its place back.
    drop(first);
    let served = async {
        loop {
            if try_get(node.http).await.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("a connection is served once the first one closed");
    assert_eq!(ask(&mut second).await, 200);
}

#[tokio::test]
async fn trusted_proxies_are_not_capped() {
    let origin = cached_origin().await;
    let node = TestNode::start(
        "trusted_proxies = [\"127.0.0.1\"]\nmax_connections_per_client = 1\n",
        &site(&origin, "site.test", ""),
    )
    .await;
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(connection(node.http).await);
    }
    assert_eq!(node.node().metrics().connections_refused(), 0);
}

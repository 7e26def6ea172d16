//! The admin listener: the data listeners' timeouts and a connection limit.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A node with one site and `[admin]` on an ephemeral port with `admin_extra` lines.
async fn node_with_admin(server_extra: &str, admin_extra: &str) -> (TestOrigin, TestNode) {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("x"));
    let body = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start(server_extra, &body).await;
    (origin, node)
}

fn admin_addr(node: &TestNode) -> SocketAddr {
    node.node().admin_addr().expect("admin listener configured")
}

#[tokio::test]
async fn admin_closes_a_half_sent_request_within_header_read_timeout() {
    let (_origin, node) = node_with_admin("header_read_timeout = \"300ms\"", "token = \"t\"").await;
    // Half a request head, then silence: the connection is closed by the server well before
    // the deadline (before this fix it stayed open for ever).
    let (_, closed) = raw(
        admin_addr(&node),
        b"GET /metrics HTTP/1.1\r\nHost: a",
        Duration::from_secs(10),
    )
    .await;
    assert!(closed, "the half-sent request's connection was closed");
    // Nothing sent at all is cut too.
    let (_, closed) = raw(admin_addr(&node), b"", Duration::from_secs(10)).await;
    assert!(closed, "the silent connection was closed");
}

#[tokio::test]
async fn admin_connections_beyond_the_limit_wait() {
    let (_origin, node) = node_with_admin("", "token = \"t\"\nmax_connections = 1").await;
    let admin = admin_addr(&node);
    // One keep-alive client holds the only slot, proven by an answer on it.
    let mut held = TcpStream::connect(admin).await.expect("connect");
    held.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // A second client's request is not answered while it holds the slot...
    let mut queued = TcpStream::connect(admin).await.expect("connect");
    queued
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let early = tokio::time::timeout(Duration::from_millis(500), queued.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "answered beyond the limit: {early:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    // ...and is once the slot is free.
    drop(held);
    let mut text = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), queued.read_to_end(&mut text))
        .await
        .expect("answered once the slot was free")
        .expect("read");
    assert!(text.starts_with(b"HTTP/1.1 200"), "{text:?}");
}

//! The admin listener: the data listeners' timeouts and a connection limit, the bearer token
//! in front of everything but the probes, `/readyz` during a drain, and `token_env` checks.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// One GET on the admin listener with an optional `Authorization` value; the status code and
/// the whole response text.
async fn admin_get(admin: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n");
    let (text, _) = raw(admin, req.as_bytes(), Duration::from_secs(5)).await;
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no response: {text:?}"));
    (status, text)
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
async fn admin_metrics_and_origins_need_the_bearer_token() {
    let (_origin, node) = node_with_admin("", "token = \"s3cret\"").await;
    for path in ["/metrics", "/origins"] {
        let (status, text) = admin_get(admin_addr(&node), path, None).await;
        assert_eq!(status, 401, "{path} without a token: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret!",
            "Bearer ",
            "Basic s3cret",
            "s3cret",
        ] {
            let (status, text) = admin_get(admin_addr(&node), path, Some(wrong)).await;
            assert_eq!(status, 401, "{path} with {wrong:?}: {text}");
        }
        // The scheme is case-insensitive (RFC 9110 §11.1).
        for good in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
            let (status, text) = admin_get(admin_addr(&node), path, Some(good)).await;
            assert_eq!(status, 200, "{path} with {good:?}: {text}");
        }
    }
    let (_, text) = admin_get(admin_addr(&node), "/metrics", Some("bearer s3cret")).await;
    assert!(text.contains("edgecache_requests_total"), "{text}");
    // An unknown path is not told apart from a known one without the token.
    assert_eq!(admin_get(admin_addr(&node), "/nothing", None).await.0, 401);
    assert_eq!(
        admin_get(admin_addr(&node), "/nothing", Some("Bearer s3cret"))
            .await
            .0,
        404
    );
    // The probes stay open.
    assert_eq!(admin_get(admin_addr(&node), "/healthz", None).await.0, 200);
    assert_eq!(admin_get(admin_addr(&node), "/readyz", None).await.0, 200);
}

#[tokio::test]
async fn public_metrics_opens_metrics_alone() {
    let (_origin, node) = node_with_admin("", "token = \"t\"\npublic_metrics = true").await;
    let (status, text) = admin_get(admin_addr(&node), "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("edgecache_requests_total"), "{text}");
    assert_eq!(admin_get(admin_addr(&node), "/origins", None).await.0, 401);
    assert_eq!(
        admin_get(admin_addr(&node), "/origins", Some("Bearer t"))
            .await
            .0,
        200
    );
    let purge = "POST /purge HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
                 Content-Length: 12\r\nConnection: close\r\n\r\n{\"all\":true}";
    let (text, _) = raw(admin_addr(&node), purge.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}

/// Without any token (none in the file, `EDGECACHE_ADMIN_TOKEN` unset) only the probes and,
/// when public, the metrics answer.
#[tokio::test]
async fn admin_without_a_token_answers_only_the_probes() {
    let (_origin, node) = node_with_admin("", "").await;
    assert_eq!(admin_get(admin_addr(&node), "/healthz", None).await.0, 200);
    assert_eq!(admin_get(admin_addr(&node), "/readyz", None).await.0, 200);
    for path in ["/metrics", "/origins"] {
        assert_eq!(
            admin_get(admin_addr(&node), path, None).await.0,
            403,
            "{path}"
        );
        assert_eq!(
            admin_get(admin_addr(&node), path, Some("Bearer x")).await.0,
            403,
            "{path}"
        );
    }
}

#[tokio::test]
async fn readyz_answers_503_while_the_node_drains() {
    let (origin, mut node) = node_with_admin("shutdown_grace = \"30s\"", "token = \"t\"").await;
    // A download that takes about two seconds keeps the drain going.
    origin.route(
        "/dl",
        Route::ok("").generated(1024, 40, true, Duration::from_millis(50)),
    );
    let admin = admin_addr(&node);
    assert_eq!(admin_get(admin, "/readyz", None).await.0, 200);
    let http = node.http;
    let download = tokio::spawn(async move { get(http, "site.test", "/dl").await });
    assert!(eventually(Duration::from_secs(5), || origin.count("/dl") == 1).await);
    let running = node.node.take().expect("node running");
    let shutdown = tokio::spawn(running.shutdown());

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let (status, _) = admin_get(admin, "/readyz", None).await;
        seen.push(status);
        if status == 503 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.last(), Some(&503), "answers while draining: {seen:?}");
    // The metrics can still be scraped while the node drains.
    assert_eq!(admin_get(admin, "/metrics", Some("Bearer t")).await.0, 200);
    let r = download.await.expect("download");
    assert_eq!(r.body.len(), 40 * 1024, "the in-flight download finished");
    shutdown.await.expect("shutdown");
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

const BASE: &str = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n\
                    [[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n";

#[test]
fn a_token_env_naming_a_missing_variable_is_a_config_error() {
    let text = format!("{BASE}[admin]\ntoken_env = \"EDGECACHE_TEST_NO_SUCH_TOKEN_VARIABLE\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let err = match edgecache::Config::from_toml(&text, "test.toml", dir.path()) {
        Ok(_) => panic!("a token_env naming a missing variable was accepted"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        "test.toml:8:13: admin.token_env: environment variable \
         EDGECACHE_TEST_NO_SUCH_TOKEN_VARIABLE is not set"
    );
}

/// `edgecache check` with `token_env = "EDGECACHE_TEST_TOKEN"` and the variable as given.
fn check_with_token_env(value: Option<&str>) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        format!("{BASE}[admin]\ntoken_env = \"EDGECACHE_TEST_TOKEN\"\n"),
    )
    .expect("write");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgecache"));
    cmd.args(["check", "--config"]).arg(&path);
    match value {
        Some(v) => cmd.env("EDGECACHE_TEST_TOKEN", v),
        None => cmd.env_remove("EDGECACHE_TEST_TOKEN"),
    };
    let out = cmd.output().expect("run check");
    let mut out = out;
    out.stderr = String::from_utf8_lossy(&out.stderr)
        .replace(&path.display().to_string(), "admin.toml")
        .into_bytes();
    out
}

#[test]
fn check_refuses_a_token_env_variable_that_is_missing_or_empty() {
    for (value, what) in [(None, "is not set"), (Some(""), "is empty")] {
        let out = check_with_token_env(value);
        assert!(!out.status.success(), "{value:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "admin.toml:8:13: admin.token_env: environment variable EDGECACHE_TEST_TOKEN {what}"
            )),
            "{err}"
        );
    }
    let out = check_with_token_env(Some("s3cret"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(
            "admin: 127.0.0.1:9090 (healthz, readyz; metrics, origins, purge with the token), \
             at most 64 connections"
        ),
        "{summary}"
    );
}

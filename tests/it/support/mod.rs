//! Test support: a real origin, a real node, real TLS, and small clients.

pub mod dns;
pub mod etcd;
pub mod origin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgecache::{Config, Node};
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use dns::TestDns;
pub use origin::{echo_body, Route, TestOrigin};

/// A certificate made for a test, written to files in `dir`.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn make_cert(dir: &std::path::Path, file: &str, names: &[&str]) -> TestCert {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("generate certificate");
    let cert_pem = c.cert.pem();
    let key_pem = c.key_pair.serialize_pem();
    let cert_path = dir.join(format!("{file}.crt"));
    let key_path = dir.join(format!("{file}.key"));
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, &key_pem).expect("write key");
    TestCert {
        der: c.cert.der().clone(),
        cert_pem,
        key_pem,
        cert_path,
        key_path,
    }
}

/// edgecache started in-process from TOML text; `{origin}` in the text is not special: tests
/// format their own. Listeners are on 127.0.0.1:0 unless the text says otherwise.
pub struct TestNode {
    pub node: Option<Node>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node; `body` is the config after `[server]`'s listener lines.
    pub async fn start(server_extra: &str, body: &str) -> TestNode {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            false,
            server_extra,
            body,
        )
        .await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        https: bool,
        server_extra: &str,
        body: &str,
    ) -> TestNode {
        let https_line = if https {
            "https = [\"127.0.0.1:0\"]\n"
        } else {
            ""
        };
        let text =
            format!("[server]\nhttp = [\"127.0.0.1:0\"]\n{https_line}{server_extra}\n{body}");
        let config = Config::from_toml(&text, "test.toml", dir.path())
            .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let node = edgecache::start(config).await.expect("start node");
        TestNode {
            http: node.http_addrs()[0],
            https: node.https_addrs().first().copied(),
            node: Some(node),
            dir,
        }
    }

    /// Starts a node whose one plain listener is `listen` (such as `[::ffff:127.0.0.1]:0`).
    pub async fn start_listening(listen: &str, server_extra: &str, body: &str) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("[server]\nhttp = [\"{listen}\"]\n{server_extra}\n{body}");
        let config = Config::from_toml(&text, "test.toml", dir.path())
            .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let node = edgecache::start(config).await.expect("start node");
        TestNode {
            http: node.http_addrs()[0],
            https: None,
            node: Some(node),
            dir,
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node running")
    }
}

/// A simple one-origin, one-site configuration body for `host`.
pub fn site(origin: &TestOrigin, host: &str, extra_origin: &str) -> String {
    format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\n{extra_origin}\n[[sites]]\nhosts = [\"{host}\"]\norigin = \"o\"\n",
        origin.url()
    )
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request over a new plain HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    send(addr, request("GET", host, path, &[])).await
}

pub fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Request<Empty<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new()).expect("request")
}

pub async fn send(addr: SocketAddr, req: Request<Empty<Bytes>>) -> Got {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    read(resp).await
}

/// `streams` concurrent GETs for `uri` on each of `connections` HTTP/2 connections (prior
/// knowledge) to `addr`; the answers in the order the streams were opened.
pub async fn h2c_concurrent(
    addr: SocketAddr,
    connections: usize,
    streams: usize,
    uri: &'static str,
) -> Vec<Got> {
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        for _ in 0..streams {
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::builder()
                    .uri(uri)
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                read(sender.send_request(req).await.expect("response")).await
            }));
        }
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("stream task"));
    }
    out
}

pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// A TLS client connection with the given SNI name and ALPN list, trusting `roots`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tls_handshake(tcp, sni, roots, alpn).await
}

/// A TLS client handshake on a connected `tcp` (for sockets set up by the test).
pub async fn tls_handshake(
    tcp: TcpStream,
    sni: &str,
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    connector
        .connect(ServerName::try_from(sni.to_owned()).expect("sni"), tcp)
        .await
        .expect("TLS handshake")
}

/// One GET over TLS; HTTP/2 when `h2`, else HTTP/1.1.
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    h2: bool,
    path: &str,
) -> Got {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_connect(addr, sni, roots, alpn).await;
    if h2 {
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(format!("https://{sni}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        read(sender.send_request(req).await.expect("response")).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        read(
            sender
                .send_request(request("GET", sni, path, &[]))
                .await
                .expect("response"),
        )
        .await
    }
}

/// Writes raw bytes and reads until the server closes or `wait` passes. Returns what was read
/// and whether the server closed the connection.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 8192];
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Polls `check` (async) until it holds or `limit` passes.
pub async fn until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// A port on 127.0.0.1 with nothing listening (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// A MaxMind-format database written now: GeoIP2's nested schema (`country.iso_code`,
/// `continent.code`) or the flat `country_code` of ip-location-db. Written beside `path` and
/// renamed into place, as an operator's update would be.
pub fn write_mmdb(path: &std::path::Path, flat: bool, entries: &[(&str, &str, &str)]) {
    use mmdb_writer::Value;
    let mut w = mmdb_writer::Writer::new(if flat {
        "geo-whois-asn-country"
    } else {
        "GeoIP2-Country"
    });
    for (net, country, continent) in entries {
        let value = if flat {
            Value::map([("country_code", Value::from(*country))])
        } else {
            Value::map([
                ("country", Value::map([("iso_code", Value::from(*country))])),
                ("continent", Value::map([("code", Value::from(*continent))])),
            ])
        };
        w.insert_value(net.parse::<ipnet::IpNet>().expect("net"), value)
            .expect("insert");
    }
    let part = path.with_extension("part");
    std::fs::write(&part, w.to_bytes().expect("mmdb")).expect("write mmdb");
    std::fs::rename(&part, path).expect("rename mmdb");
}

/// Two origins answering `/where` with `eu` and `us` (not storable), for routing tests.
pub async fn regional_origins() -> (TestOrigin, TestOrigin) {
    let eu = TestOrigin::start().await;
    eu.route(
        "/where",
        Route::ok("eu").header("cache-control", "no-store"),
    );
    let us = TestOrigin::start().await;
    us.route(
        "/where",
        Route::ok("us").header("cache-control", "no-store"),
    );
    (eu, us)
}

/// `GET path` on the node's admin listener with the tests' admin token (`token = "t"`); the
/// whole response as text.
pub async fn admin_get(node: &TestNode, path: &str) -> String {
    let admin = node.node().admin_addr().expect("admin listener configured");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n"
    );
    raw(admin, req.as_bytes(), Duration::from_secs(5)).await.0
}

/// A series' value from the admin listener's `/metrics` (`name` with its labels); panics
/// when the node does not export it.
pub async fn metric(node: &TestNode, name: &str) -> u64 {
    let text = admin_get(node, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// One origin's entry in the admin listener's `GET /origins`.
pub async fn origin_state(node: &TestNode, name: &str) -> serde_json::Value {
    let text = admin_get(node, "/origins").await;
    let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let list: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text}"));
    list.as_array()
        .and_then(|a| a.iter().find(|o| o["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} not listed in {list}"))
}

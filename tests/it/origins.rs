//! The origin side: HTTPS origins verified against a configured CA, client certificates
//! (mTLS), and per-origin connection limits.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::*;

/// A test certificate authority and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA");
        Ca { cert, key }
    }

    /// A leaf for `names` with `usage`; returns (cert PEM, key PEM, cert DER, key DER).
    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (
        String,
        String,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    ) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.pem(), key.serialize_pem(), cert.der().clone(), key_der)
    }
}

/// An HTTPS origin for `localhost` signed by `server_ca`; with `client_ca`, it demands a
/// client certificate signed by that CA.
async fn https_origin(server_ca: &Ca, client_ca: Option<&Ca>) -> TestOrigin {
    let (_, _, cert, key) = server_ca.issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert.der().clone()).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(vec![cert], key)
        .expect("server cert");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let origin = TestOrigin::start_tls(Arc::new(config)).await;
    origin.route(
        "/secure",
        Route::ok("over tls").header("cache-control", "no-store"),
    );
    origin
}

fn https_site(origin: &TestOrigin, extra: &str) -> String {
    format!(
        "[[origins]]\nname = \"tls\"\nurl = \"https://localhost:{}\"\nca = \"ca.pem\"\n{extra}\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"tls\"\n",
        origin.addr.port()
    )
}

#[tokio::test]
async fn an_https_origin_is_verified_against_the_configured_ca() {
    let ca = Ca::new("edgecache test server CA");
    let origin = https_origin(&ca, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca");
    let node = TestNode::start_in(dir, false, "", &https_site(&origin, "")).await;
    let r = get(node.http, "site.test", "/secure").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"over tls");

    // Signed by another CA: not trusted, nothing forwarded.
    let other = Ca::new("someone else");
    let origin = https_origin(&other, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).expect("write ca");
    let node = TestNode::start_in(dir, false, "", &https_site(&origin, "")).await;
    assert_eq!(get(node.http, "site.test", "/secure").await.status, 502);
    assert_eq!(
        origin.total(),
        0,
        "no request over an unverified connection"
    );
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_an_origin_that_demands_one() {
    let server_ca = Ca::new("edgecache test server CA");
    let client_ca = Ca::new("edgecache test client CA");
    let origin = https_origin(&server_ca, Some(&client_ca)).await;

    // Without a client certificate the origin refuses the handshake.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), server_ca.cert.pem()).expect("write ca");
    let node = TestNode::start_in(dir, false, "", &https_site(&origin, "")).await;
    assert_eq!(get(node.http, "site.test", "/secure").await.status, 502);
    assert_eq!(origin.total(), 0);
    assert!(origin.tls_failures() >= 1);

    // With one signed by the CA it trusts, requests go through.
    let (cert_pem, key_pem, _, _) =
        client_ca.issue(&["edge.test"], ExtendedKeyUsagePurpose::ClientAuth);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), server_ca.cert.pem()).expect("write ca");
    std::fs::write(dir.path().join("client.pem"), cert_pem).expect("write");
    std::fs::write(dir.path().join("client.key"), key_pem).expect("write");
    let node = TestNode::start_in(
        dir,
        false,
        "",
        &https_site(
            &origin,
            "client_cert = \"client.pem\"\nclient_key = \"client.key\"",
        ),
    )
    .await;
    let r = get(node.http, "site.test", "/secure").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"over tls");
    assert_eq!(origin.count("/secure"), 1);
}

#[tokio::test]
async fn an_origin_never_gets_more_connections_than_its_limit() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow",
        Route::ok("slow")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(150)),
    );
    let body = format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\nmax_connections = 2\nconnect_timeout = \"5s\"\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n",
        origin.url()
    );
    let node = TestNode::start("", &body).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = node.http;
        tasks.push(tokio::spawn(async move {
            get(addr, "site.test", &format!("/slow?{i}")).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200, "queued requests are answered");
    }
    assert_eq!(origin.total(), 8);
    assert!(
        origin.max_open() <= 2,
        "at most 2 connections at once, saw {}",
        origin.max_open()
    );
    assert!(origin.max_open() >= 1);

    // A request that cannot get a connection within connect_timeout gets 503, and the busy
    // origin is not counted as failing.
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow",
        Route::ok("slow")
            .header("cache-control", "no-store")
            .delay(Duration::from_secs(2)),
    );
    let body = format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\nmax_connections = 1\nconnect_timeout = \"100ms\"\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n",
        origin.url()
    );
    let node = TestNode::start("", &body).await;
    let addr = node.http;
    let first = tokio::spawn(async move { get(addr, "site.test", "/slow?a").await.status });
    assert!(eventually(Duration::from_secs(5), || origin.total() == 1).await);
    let r = get(node.http, "site.test", "/slow?b").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(first.await.expect("task"), 200);
    assert_eq!(origin.total(), 1);
}

#[tokio::test]
async fn collapsed_requests_at_a_connection_limit_are_told_what_their_leader_was_told() {
    // The leader of a fill that cannot get a connection answers 503 "at its connection
    // limit"; its followers receive the same error, not a status rebuilt as "failed to answer".
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow",
        Route::ok("slow")
            .header("cache-control", "no-store")
            .delay(Duration::from_secs(3)),
    );
    origin.route(
        "/page",
        Route::ok("page").header("cache-control", "max-age=60"),
    );
    let body = format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\nmax_connections = 1\nconnect_timeout = \"500ms\"\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n",
        origin.url()
    );
    let node = TestNode::start("", &body).await;
    let addr = node.http;
    let first = tokio::spawn(async move { get(addr, "site.test", "/slow").await.status });
    assert!(eventually(Duration::from_secs(5), || origin.total() == 1).await);
    let waiting: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(addr, "site.test", "/page").await }))
        .collect();
    for w in waiting {
        let r = w.await.expect("task");
        assert_eq!(r.status, 503);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            "edgecache: every origin is at its connection limit\n"
        );
    }
    assert_eq!(first.await.expect("task"), 200);
    assert_eq!(origin.count("/page"), 0, "nothing reached the origin");
}

/// Two origins on the same port of 127.0.0.2 and 127.0.0.3, as two addresses of one name.
async fn twin_origins() -> (TestOrigin, TestOrigin) {
    for _ in 0..50 {
        let Ok(a) = std::net::TcpListener::bind("127.0.0.2:0") else {
            continue;
        };
        let port = a.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.3", port)).is_err() {
            continue;
        }
        drop(a);
        let a = TestOrigin::start_on(SocketAddr::from(([127, 0, 0, 2], port))).await;
        let b = TestOrigin::start_on(SocketAddr::from(([127, 0, 0, 3], port))).await;
        // Every answer closes its connection, so each request connects (and resolves) anew.
        a.route(
            "/who",
            Route::ok("a")
                .header("cache-control", "no-store")
                .header("connection", "close"),
        );
        b.route(
            "/who",
            Route::ok("b")
                .header("cache-control", "no-store")
                .header("connection", "close"),
        );
        return (a, b);
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn named_origin(dns: &TestDns, port: u16) -> String {
    format!(
        "[dns]\nservers = [\"{}\"]\nmin_ttl = \"0s\"\n\
         [[origins]]\nname = \"named\"\nurl = \"http://origin.edgecache.test:{port}\"\nhost_header = \"site.test\"\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"named\"\n",
        dns.addr
    )
}

#[tokio::test]
async fn an_origin_name_is_resolved_again_when_its_ttl_runs_out() {
    let (a, b) = twin_origins().await;
    let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 2)], 1).await;
    let node = TestNode::start("", &named_origin(&dns, a.addr.port())).await;
    for _ in 0..5 {
        let r = get(node.http, "site.test", "/who").await;
        assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"a"[..]));
    }
    assert_eq!(b.total(), 0);
    let asked = dns.queries();
    assert!(
        (1..5).contains(&asked),
        "answers are cached for their TTL: {asked} queries for 5 connections"
    );
    // The record changes; once the 1 s TTL has passed, new connections go to the new address
    // without a restart (the old origin is still up).
    dns.set(&[Ipv4Addr::new(127, 0, 0, 3)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut moved = false;
    while Instant::now() < deadline {
        let r = get(node.http, "site.test", "/who").await;
        assert_eq!(r.status, 200);
        if &r.body[..] == b"b" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "traffic followed the new address");
    assert!(dns.queries() > asked, "the name was asked again");

    // A name with both addresses: both are used.
    dns.set(&[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)]);
    let (a0, b0) = (a.total(), b.total());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && (a.total() < a0 + 5 || b.total() < b0 + 5) {
        assert_eq!(get(node.http, "site.test", "/who").await.status, 200);
    }
    assert!(
        a.total() >= a0 + 5 && b.total() >= b0 + 5,
        "both addresses take connections: a +{}, b +{}",
        a.total() - a0,
        b.total() - b0
    );
}

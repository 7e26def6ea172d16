//! HTTPS listeners: HTTP/1.1 and HTTP/2 by ALPN, certificates by SNI.

use crate::support::*;

async fn tls_node(origin: &TestOrigin) -> (TestNode, TestCert, TestCert) {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make_cert(dir.path(), "a", &["a.test"]);
    let b = make_cert(dir.path(), "b", &["*.b.test"]);
    let body = format!(
        "[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"a.crt\"\nkey = \"a.key\"\n\
         [[tls.certificates]]\nhosts = [\"*.b.test\"]\ncert = \"b.crt\"\nkey = \"b.key\"\n\
         [[origins]]\nname = \"o\"\nurl = \"{}\"\n[[sites]]\nhosts = [\"a.test\", \"*.b.test\"]\norigin = \"o\"\n",
        origin.url()
    );
    let node = TestNode::start_in(dir, true, "", &body).await;
    (node, a, b)
}

#[tokio::test]
async fn http1_and_http2_over_tls() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/x",
        Route::ok("secure bytes").header("cache-control", "max-age=60"),
    );
    let (node, a, _) = tls_node(&origin).await;
    let addr = node.https.expect("https listener");
    let r1 = tls_get(addr, "a.test", std::slice::from_ref(&a.der), false, "/x").await;
    assert_eq!(r1.status, 200);
    assert_eq!(r1.version, http::Version::HTTP_11);
    assert_eq!(&r1.body[..], b"secure bytes");
    let r2 = tls_get(addr, "a.test", std::slice::from_ref(&a.der), true, "/x").await;
    assert_eq!(r2.status, 200);
    assert_eq!(r2.version, http::Version::HTTP_2);
    assert_eq!(&r2.body[..], b"secure bytes");
    assert_eq!(r2.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(origin.count("/x"), 1);
    assert_eq!(origin.last_headers("/x")["x-forwarded-proto"], "https");
    // HTTP and HTTPS objects are keyed apart (scheme is part of the key).
    get(node.http, "a.test", "/x").await;
    assert_eq!(origin.count("/x"), 2);
}

#[tokio::test]
async fn sni_picks_the_right_certificate() {
    let origin = TestOrigin::start().await;
    let (node, a, b) = tls_node(&origin).await;
    let addr = node.https.expect("https listener");
    let roots = [a.der.clone(), b.der.clone()];
    let served = |sni: &'static str| {
        let roots = roots.clone();
        async move {
            let tls = tls_connect(addr, sni, &roots, &[b"http/1.1"]).await;
            tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone()
        }
    };
    assert_eq!(served("a.test").await, a.der);
    assert_eq!(served("img.b.test").await, b.der, "wildcard");
    // A name no certificate covers gets the default (first) certificate, which the client
    // then rejects for the name: the handshake proves which certificate was sent.
    let mut store = rustls::RootCertStore::empty();
    store.add(a.der.clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let err = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("other.test").expect("name"),
            tcp,
        )
        .await
        .expect_err("the default certificate does not cover other.test");
    assert!(
        err.to_string().contains("not valid for name")
            || err.to_string().contains("NotValidForName"),
        "{err}"
    );
}

#[tokio::test]
async fn tls12_clients_are_served() {
    let origin = TestOrigin::start().await;
    origin.route("/x", Route::ok("ok"));
    let (node, a, _) = tls_node(&origin).await;
    let addr = node.https.expect("https listener");
    let mut store = rustls::RootCertStore::empty();
    store.add(a.der.clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("a.test").expect("name"),
            tcp,
        )
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let r = read(
        sender
            .send_request(request("GET", "a.test", "/x", &[]))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(&r.body[..], b"ok");
}

//! `edgecache demo`: a small built-in sample origin and a configuration that puts edgecache in
//! front of it, so a newcomer sees caching work with no setup.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{Certificate, Config};

/// The sample origin's content, built once.
struct Assets {
    html: Bytes,
    css: Bytes,
    image: Bytes,
    requests: AtomicU64,
}

const HTML: &str = "<!doctype html>\n<html><head><title>edgecache demo</title>\
<link rel=\"stylesheet\" href=\"/style.css\"></head>\n<body><h1>Served through edgecache</h1>\
<p>Request this page twice: the second answer comes from memory \
(<code>Cache-Status: edgecache; hit</code>).</p><img src=\"/hero.jpg\"></body></html>\n";

const CSS: &str = "body { font-family: sans-serif; margin: 3em; }\nh1 { color: #c40; }\n";

/// Starts the sample origin on `addr` (use port 0 for any) and returns its bound address.
pub async fn start_sample_origin(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    // 2 MiB of deterministic bytes stand in for an image-sized asset.
    let mut image = Vec::with_capacity(2 << 20);
    let mut x: u32 = 0x9E37_79B9;
    while image.len() < 2 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image.extend_from_slice(&x.to_le_bytes());
    }
    let assets = Arc::new(Assets {
        html: Bytes::from_static(HTML.as_bytes()),
        css: Bytes::from_static(CSS.as_bytes()),
        image: Bytes::from(image),
        requests: AtomicU64::new(0),
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let assets = assets.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let assets = assets.clone();
                    async move { Ok::<_, Infallible>(sample_response(&assets, &req)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn sample_response(assets: &Assets, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let n = assets.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let (status, ctype, cc, etag, body) = match req.uri().path() {
        "/" | "/index.html" => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            "public, max-age=60",
            Some("\"page-v1\""),
            assets.html.clone(),
        ),
        "/style.css" => (
            StatusCode::OK,
            "text/css",
            "public, max-age=3600",
            Some("\"css-v1\""),
            assets.css.clone(),
        ),
        "/hero.jpg" => (
            StatusCode::OK,
            "image/jpeg",
            "public, max-age=86400",
            Some("\"hero-v1\""),
            assets.image.clone(),
        ),
        "/api/time" => (
            StatusCode::OK,
            "application/json",
            "no-store",
            None,
            Bytes::from(format!("{{\"time\":\"{date}\",\"origin_requests\":{n}}}\n")),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "public, max-age=10",
            None,
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cc));
    if let Some(e) = etag {
        h.insert(header::ETAG, HeaderValue::from_static(e));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Tue, 03 Nov 2026 10:00:00 GMT"),
        );
    }
    if let Ok(d) = HeaderValue::from_str(&date) {
        h.insert(header::DATE, d);
    }
    if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
        h.insert("x-origin-request-count", v);
    }
    resp
}

/// The demo configuration: edgecache on `http` and `https` in front of the sample origin, with
/// a self-signed certificate for `localhost` and `127.0.0.1` made now.
pub fn config(http: SocketAddr, https: SocketAddr, origin: SocketAddr) -> Result<Config, String> {
    let text = format!(
        "[server]\nhttp = [\"{http}\"]\nhttps = [\"{https}\"]\nshutdown_grace = \"2s\"\n\n\
         [cache]\nmemory = \"64MiB\"\nmax_object_size = \"8MiB\"\n\n\
         [[origins]]\nname = \"sample\"\nurl = \"http://{origin}\"\n\n\
         [[sites]]\nhosts = [\"127.0.0.1\", \"localhost\", \"[::1]\"]\norigin = \"sample\"\n"
    );
    // The certificate is attached after parsing, so the text names no files.
    let without_https = text.replace(&format!("https = [\"{https}\"]\n"), "");
    let mut config =
        Config::from_toml(&without_https, "<demo>", Path::new(".")).map_err(|e| e.to_string())?;
    config.server.https = vec![https];
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| format!("generate demo certificate: {e}"))?;
    let c = Certificate::from_pem(
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        cert.cert.pem().as_bytes(),
        cert.key_pair.serialize_pem().as_bytes(),
        "generated at start (self-signed)",
    )?;
    config.tls.certificates.push(c);
    Ok(config)
}

/// The lines printed for a newcomer once the demo is up.
pub fn instructions(http: SocketAddr, https: SocketAddr, origin: SocketAddr) -> String {
    format!(
        "\nedgecache demo is running\n  \
         sample origin   http://{origin}\n  \
         edgecache       http://{http}  and  https://{https} (self-signed certificate)\n\n\
         Try it (the first request is a miss, the second a hit from memory):\n\n  \
         curl -s -o /dev/null -D - http://{http}/style.css\n  \
         curl -s -o /dev/null -D - http://{http}/style.css\n\n  \
         curl -s -o /dev/null -D - http://{http}/hero.jpg          # 2 MiB image, cached\n  \
         curl -s http://{http}/api/time                         # no-store: reaches the origin every time\n  \
         curl -sk --http2 -o /dev/null -D - https://{https}/     # HTTP/2 over TLS\n\n\
         Watch the Cache-Status and Age headers. Press Ctrl-C to stop.\n"
    )
}

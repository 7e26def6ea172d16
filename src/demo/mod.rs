//! `edgecache demo`: a small built-in sample origin and a configuration that puts edgecache in
//! front of it, so a newcomer sees caching work with no setup.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

use crate::config::Config;

mod png;

/// The sample origin's content, built once.
struct Assets {
    html: Bytes,
    css: Bytes,
    script: Bytes,
    image: Bytes,
    requests: AtomicU64,
}

const HTML: &str = "<!doctype html>\n<html><head><title>edgecache demo</title>\
<link rel=\"stylesheet\" href=\"/style.css\"></head>\n<body><h1>Served through edgecache</h1>\
<p>Request this page twice: the second answer comes from memory \
(<code>Cache-Status: edgecache; hit</code>).</p>\
<img src=\"/hero.png\" width=\"1024\" height=\"683\" alt=\"a generated landscape, 2 MiB\">\
</body></html>\n";

const CSS: &str = "body { font-family: sans-serif; margin: 3em; }\nh1 { color: #c40; }\n";

/// A 20 KiB script, as text compresses: what the demo shows compression with (`/app.js`).
fn script() -> String {
    let mut out = String::from("// edgecache demo: a script big enough to be worth compressing\n");
    let mut i = 0;
    while out.len() < 20 * 1024 {
        out.push_str(&format!(
            "export const item{i} = {{ id: {i}, name: \"item {i}\", price: {}.{:02} }};\n",
            i * 3 % 97,
            i * 7 % 100
        ));
        i += 1;
    }
    out
}

/// Starts the sample origin on `addr` (use port 0 for any) and returns its bound address.
pub async fn start_sample_origin(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let image = hero_png();
    let assets = Arc::new(Assets {
        html: Bytes::from_static(HTML.as_bytes()),
        css: Bytes::from_static(CSS.as_bytes()),
        script: Bytes::from(script()),
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

/// The demo page's picture's size in pixels: about 2 MiB as an RGB PNG.
pub const HERO_SIZE: (u32, u32) = (1024, 683);

/// The demo page's picture, drawn now: a landscape at dusk (sky, sun, two ranges of hills)
/// with a little deterministic grain, as a PNG of about 2 MiB (`png`: stored, uncompressed
/// blocks), so the page shows an image-sized object that every browser renders.
pub fn hero_png() -> Vec<u8> {
    let (w, h) = HERO_SIZE;
    let (wf, hf) = (w as f32, h as f32);
    // The ridge lines, once per column.
    let ridge = |x: f32, base: f32, a: f32, b: f32| {
        base + a * (x / 97.0).sin() + b * (x / 41.0 + 1.3).sin() + 0.4 * b * (x / 13.0).sin()
    };
    let far: Vec<f32> = (0..w)
        .map(|x| ridge(x as f32, hf * 0.58, 28.0, 9.0))
        .collect();
    let near: Vec<f32> = (0..w)
        .map(|x| ridge(x as f32 + 400.0, hf * 0.72, 36.0, 6.0))
        .collect();
    let (sun_x, sun_y, sun_r) = (wf * 0.68, hf * 0.5, 64.0f32);
    let mix = |a: [f32; 3], b: [f32; 3], t: f32| {
        let t = t.clamp(0.0, 1.0);
        [
            a[0] + (b[0] - a[0]) * t,
            a[1] + (b[1] - a[1]) * t,
            a[2] + (b[2] - a[2]) * t,
        ]
    };
    let mut grain: u32 = 0x9E37_79B9;
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        let yf = y as f32;
        for x in 0..w as usize {
            let xf = x as f32;
            let c = if yf >= near[x] {
                // Near hills: green, darker downhill.
                mix(
                    [64.0, 120.0, 52.0],
                    [14.0, 40.0, 20.0],
                    (yf - near[x]) / (hf - near[x]),
                )
            } else if yf >= far[x] {
                // Far hills: hazy violet, lighter near the ridge.
                mix(
                    [120.0, 96.0, 140.0],
                    [70.0, 60.0, 105.0],
                    (yf - far[x]) / 90.0,
                )
            } else {
                // Sky: deep blue above to orange at the horizon, the sun and its glow.
                let sky = mix([22.0, 36.0, 96.0], [250.0, 158.0, 86.0], yf / far[x]);
                let d = ((xf - sun_x).powi(2) + (yf - sun_y).powi(2)).sqrt();
                if d < sun_r {
                    [255.0, 236.0, 170.0]
                } else {
                    mix([255.0, 200.0, 120.0], sky, (d - sun_r) / 180.0)
                }
            };
            // A grain of +-4 per channel (xorshift32), as a photograph has.
            grain ^= grain << 13;
            grain ^= grain >> 17;
            grain ^= grain << 5;
            for (i, v) in c.into_iter().enumerate() {
                let n = ((grain >> (8 * i)) & 7) as f32 - 3.5;
                rgb.push((v + n).clamp(0.0, 255.0) as u8);
            }
        }
    }
    png::encode_rgb(w, h, &rgb).expect("the picture is width * height pixels of 3 bytes")
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
        "/app.js" => (
            StatusCode::OK,
            "text/javascript",
            "public, max-age=3600",
            Some("\"js-v1\""),
            assets.script.clone(),
        ),
        "/hero.png" => (
            StatusCode::OK,
            "image/png",
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

/// Why the demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generate the demo certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("generate the admin token: no random bytes from the system")]
    Random,
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::Error),
}

/// Where the demo listens, and what its admin listener accepts.
pub struct Setup {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub origin: SocketAddr,
    /// The admin bearer token, made at start ([`token`]).
    pub token: String,
}

/// A random admin token for one run: 32 hexadecimal digits (128 bits from the system's
/// generator, through `ring`, which TLS already uses).
pub fn token() -> Result<String, Error> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the demo configuration into `dir` (`edgecache.toml`, and a self-signed certificate
/// for `localhost` and `127.0.0.1` made now) and loads it. The configuration is a file so
/// that the demo reloads like any node: edit it, then SIGHUP or `POST /reload`. The token is
/// in the file, so the directory should be private to the user (`main` makes it 0700).
pub fn write_config(dir: &Path, setup: &Setup) -> Result<(Config, PathBuf), Error> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let cert = rcgen::generate_simple_self_signed(names)?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| Error::Write { path, source })
    };
    write("demo.crt", &cert.cert.pem())?;
    write("demo.key", &cert.key_pair.serialize_pem())?;
    let Setup {
        http,
        https,
        admin,
        origin,
        token,
    } = setup;
    let text = format!(
        "# The demo's configuration, written at start and removed at exit. Edit it and reload\n\
         # (kill -HUP, or POST /reload on the admin listener); config/edgecache.toml documents\n\
         # every key.\n\n\
         [server]\nhttp = [\"{http}\"]\nhttps = [\"{https}\"]\nshutdown_grace = \"2s\"\n\n\
         [[tls.certificates]]\nhosts = [\"localhost\", \"127.0.0.1\"]\n\
         cert = \"demo.crt\"\nkey = \"demo.key\"\n\n\
         [cache]\nmemory = \"64MiB\"\nmax_object_size = \"8MiB\"\n\n\
         [[origins]]\nname = \"sample\"\nurl = \"http://{origin}\"\n\n\
         [[sites]]\nhosts = [\"127.0.0.1\", \"localhost\", \"[::1]\"]\norigin = \"sample\"\n\n\
         [admin]\nlisten = \"{admin}\"\ntoken = \"{token}\"\n"
    );
    let path = dir.join("edgecache.toml");
    write("edgecache.toml", &text)?;
    let config = Config::load(&path)?;
    Ok((config, path))
}

/// `addr` as a client on this machine reaches it: a wildcard address (the demo in a
/// container listens on 0.0.0.0) becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// The lines printed for a newcomer once the demo is up: the bound addresses (in `setup`),
/// `curl` lines for the visitor's side and the operator's (the admin listener, with the
/// token), and where the configuration file is.
pub fn instructions(setup: &Setup, config: &Path) -> String {
    let (http, https, admin) = (
        reachable(setup.http),
        reachable(setup.https),
        reachable(setup.admin),
    );
    let (origin, token) = (setup.origin, &setup.token);
    let auth = format!("-H 'Authorization: Bearer {token}'");
    format!(
        "\nedgecache demo is running\n  \
         sample origin   http://{origin}\n  \
         edgecache       http://{http}  and  https://{https} (self-signed certificate)\n  \
         admin           http://{admin}  token {token} (made for this run)\n  \
         configuration   {config}\n\n\
         Try it (the first request is a miss, the second a hit from memory):\n\n  \
         curl -s -o /dev/null -D - http://{http}/style.css\n  \
         curl -s -o /dev/null -D - http://{http}/style.css\n\n  \
         curl -s -o /dev/null -D - http://{http}/hero.png          # 2 MiB image, cached\n  \
         curl -s --compressed -o /dev/null -D - http://{http}/app.js   # 20 KiB script, compressed once, sent as br or gzip\n  \
         curl -s http://{http}/api/time                         # no-store: reaches the origin every time\n  \
         curl -sk --http2 -o /dev/null -D - https://{https}/     # HTTP/2 over TLS\n\n\
         Open https://localhost:{https_port}/ in a browser (accept the certificate) and load it twice.\n\n\
         The operator's side, on the admin listener:\n\n  \
         curl -s {auth} http://{admin}/metrics          # Prometheus text\n  \
         curl -s {auth} http://{admin}/origins          # origin health and latency (JSON)\n  \
         curl -s -X POST {auth} -d '{{\"url\":\"http://{http}/style.css\"}}' http://{admin}/purge\n  \
         curl -s -X POST {auth} http://{admin}/reload   # after editing the configuration\n\n\
         Watch the Cache-Status and Age headers. Press Ctrl-C to stop.\n",
        config = config.display(),
        https_port = https.port(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hero_picture_is_about_2_mib() {
        let png = super::hero_png();
        assert!((2_000_000..2_200_000).contains(&png.len()), "{}", png.len());
        assert_eq!(png, super::hero_png(), "drawn the same every time");
    }
}

//! `edgecache demo` through the real binary: the page's picture is a PNG a browser can
//! decode, and the operator's `curl` lines it prints work as printed, with the token it made.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

/// A running `edgecache demo` and what it printed, killed on drop.
struct Demo {
    child: Child,
    printed: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the demo on ephemeral ports and reads its instructions up to the last line.
fn start_demo() -> Demo {
    let mut child = Command::new(BIN)
        .args(["demo", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn edgecache demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let last = line.contains("Press Ctrl-C");
            lines.push(line);
            if last {
                let _ = tx.send(std::mem::take(&mut lines));
            }
        }
    });
    let printed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo printed its instructions");
    Demo { child, printed }
}

impl Demo {
    /// The printed `curl` lines, each split into words as a shell would (single quotes),
    /// the trailing `# comment` dropped.
    fn curls(&self) -> Vec<Vec<String>> {
        self.printed
            .iter()
            .filter(|l| l.trim_start().starts_with("curl "))
            .map(|l| shell_words(l.split("   #").next().unwrap_or(l)))
            .collect()
    }

    /// The edgecache plain-HTTP address, from the first `curl` line.
    fn http(&self) -> SocketAddr {
        let url = self.curls()[0].last().cloned().expect("url");
        authority(&url).parse().expect("address")
    }

    /// The `curl` line for the admin path `path`.
    fn admin_line(&self, path: &str) -> Vec<String> {
        self.curls()
            .into_iter()
            .find(|w| w.last().is_some_and(|u| u.ends_with(path)))
            .unwrap_or_else(|| panic!("no curl line for {path}: {:?}", self.printed))
    }
}

/// Splits a line into words: blanks separate, single quotes group (enough for what the demo
/// prints).
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// `host:port` of an `http://host:port/path` URL.
fn authority(url: &str) -> &str {
    let rest = url.strip_prefix("http://").expect("http URL");
    rest.split('/').next().expect("authority")
}

/// Runs a printed `curl` line (`-X`, `-H`, `-d` and the URL) as an HTTP/1.1 request; returns
/// the status and body.
async fn run_curl(words: &[String]) -> (u16, String) {
    assert_eq!(words[0], "curl");
    let (mut method, mut headers, mut body) = ("GET".to_owned(), Vec::new(), String::new());
    let mut url = None;
    let mut it = words[1..].iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "-s" => {}
            "-X" => method = it.next().expect("method").clone(),
            "-H" => headers.push(it.next().expect("header").clone()),
            "-d" => {
                body = it.next().expect("body").clone();
                if method == "GET" {
                    method = "POST".to_owned();
                }
            }
            other if other.starts_with("http://") => url = Some(other.to_owned()),
            other => panic!("unexpected curl argument {other}"),
        }
    }
    let url = url.expect("a URL");
    let host = authority(&url);
    let path = &url[url.find(host).expect("host") + host.len()..];
    let mut req = http::Request::builder()
        .method(method.as_str())
        .uri(path)
        .header("host", host);
    for h in &headers {
        let (k, v) = h.split_once(':').expect("name: value");
        req = req.header(k.trim(), v.trim());
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// CRC-32 (PNG §5.3), written again here so the check does not trust the encoder's own.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Decodes what a PNG decoder needs from `png`: the signature, the chunks with their CRCs,
/// the IHDR fields, and the zlib stream of the IDAT chunks (stored or not: only stored blocks
/// are inflated here, anything else fails the test). Returns (width, height, bit depth,
/// colour type, inflated scanline bytes).
fn decode_png(png: &[u8]) -> (u32, u32, u8, u8, Vec<u8>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let (mut at, mut ihdr, mut idat, mut end) = (8, None, Vec::new(), false);
    while at < png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes")) as usize;
        let kind = &png[at + 4..at + 8];
        let data = &png[at + 8..at + 8 + len];
        let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().expect("crc"));
        assert_eq!(crc32(&png[at + 4..at + 8 + len]), crc, "CRC of {kind:?}");
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => end = true,
            _ => {}
        }
        at += 12 + len;
    }
    assert!(end, "IEND last");
    let ihdr = ihdr.expect("IHDR");
    let w = u32::from_be_bytes(ihdr[0..4].try_into().expect("width"));
    let h = u32::from_be_bytes(ihdr[4..8].try_into().expect("height"));
    // zlib: CMF/FLG check, then deflate blocks, then Adler-32.
    assert_eq!(
        u16::from_be_bytes([idat[0], idat[1]]) % 31,
        0,
        "zlib header"
    );
    assert_eq!(idat[0] & 0x0f, 8, "deflate");
    let (mut i, mut raw) = (2, Vec::new());
    loop {
        let head = idat[i];
        assert_eq!(head & 0b110, 0, "a stored block");
        let len = u16::from_le_bytes([idat[i + 1], idat[i + 2]]);
        let nlen = u16::from_le_bytes([idat[i + 3], idat[i + 4]]);
        assert_eq!(len, !nlen, "LEN and NLEN agree");
        raw.extend_from_slice(&idat[i + 5..i + 5 + len as usize]);
        i += 5 + len as usize;
        if head & 1 == 1 {
            break;
        }
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    assert_eq!(&idat[i..], &((b << 16) | a).to_be_bytes(), "Adler-32");
    (w, h, ihdr[8], ihdr[9], raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_a_png_that_decodes_and_is_then_a_hit() {
    let demo = start_demo();
    let http = demo.http();
    let page = get(http, "localhost", "/").await;
    assert!(
        String::from_utf8_lossy(&page.body).contains("<img src=\"/hero.png\""),
        "the page shows the picture"
    );

    let r = get(http, "localhost", "/hero.png").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert!(r.body.len() > 2_000_000, "{} bytes", r.body.len());
    let (w, h, depth, colour, raw) = decode_png(&r.body);
    assert_eq!((w, h, depth, colour), (1024, 683, 8, 2), "8-bit RGB");
    assert_eq!(raw.len(), (h * (1 + 3 * w)) as usize, "every scanline");
    assert!(
        raw.chunks(1 + 3 * w as usize).all(|line| line[0] <= 4),
        "each scanline starts with a filter type"
    );

    let again = get(http, "localhost", "/hero.png").await;
    assert_eq!(again.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(again.body, r.body);

    // The script the demo prints a `curl --compressed` line for: compressed once, br to a
    // client that takes it, the same text as the identity form.
    let plain = get(http, "localhost", "/app.js").await;
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.body.len() > 20_000);
    let br = send(
        http,
        request(
            "GET",
            "localhost",
            "/app.js",
            &[("accept-encoding", "gzip, br")],
        ),
    )
    .await;
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.header("cache-status"), Some("edgecache; hit"));
    assert!(br.body.len() < plain.body.len() / 5);
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut brotli::Decompressor::new(&br.body[..], 4096),
        &mut text,
    )
    .expect("br");
    assert_eq!(text, plain.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_admin_curl_lines_that_work_with_its_token() {
    let mut demo = start_demo();
    let admin = demo
        .printed
        .iter()
        .find(|l| l.trim_start().starts_with("admin "))
        .expect("an admin line")
        .clone();
    let token = admin
        .split("token ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("the token is printed");
    assert_eq!(token.len(), 32, "{admin}");
    let config = demo
        .printed
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("configuration"))
        .map(|p| std::path::PathBuf::from(p.trim()))
        .expect("the configuration's path is printed");
    assert!(config.exists(), "{}", config.display());

    // As the printed curl lines ask for it (the purge line names this URL).
    let http = demo.http();
    get(http, "127.0.0.1", "/style.css").await;
    let hit = get(http, "127.0.0.1", "/style.css").await;
    assert_eq!(hit.header("cache-status"), Some("edgecache; hit"));

    let metrics = demo.admin_line("/metrics");
    assert!(metrics.iter().any(|w| w.ends_with(token)), "{metrics:?}");
    let (status, text) = run_curl(&metrics).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("edgecache_requests_total"), "{text}");

    let (status, text) = run_curl(&demo.admin_line("/origins")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"name\": \"sample\""), "{text}");

    let (status, text) = run_curl(&demo.admin_line("/purge")).await;
    assert_eq!(
        (status, text.trim()),
        (200, "{\"purged\":1,\"soft\":false}")
    );
    let after = get(http, "127.0.0.1", "/style.css").await;
    assert_eq!(
        after.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored"),
        "purged, so fetched again"
    );

    let (status, text) = run_curl(&demo.admin_line("/reload")).await;
    assert_eq!(status, 200, "{text}");

    // The token is needed: the same line without it is refused.
    let mut without = demo.admin_line("/metrics");
    without.retain(|w| !w.contains("Bearer") && w != "-H");
    assert_eq!(run_curl(&without).await.0, 401);

    // SIGTERM: the demo exits and removes its configuration (it holds the token).
    let status = Command::new("kill")
        .args(["-TERM", &demo.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let child = &mut demo.child;
    assert!(
        eventually(
            Duration::from_secs(20),
            || matches!(child.try_wait(), Ok(Some(s)) if s.success())
        )
        .await,
        "the demo exits cleanly"
    );
    assert!(!config.exists(), "{} removed", config.display());
}

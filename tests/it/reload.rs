//! Configuration reload (`POST /reload`, SIGHUP): a new file swapped in while clients keep
//! coming, the cache kept, origin state carried by name and URL, a bad file refused whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::support::*;

/// What the test changes between reloads.
#[derive(Clone, Default)]
struct Knobs {
    /// `b.test` served (by origin `a`).
    b_site: bool,
    /// Origin `c`'s URL: the first or the second test origin.
    c_on_second: bool,
    /// A rule on `a.test` that bypasses the cache for `/api/`.
    bypass_api: bool,
    /// Which of the two certificates `a.test` is served with.
    second_cert: bool,
}

struct Setup {
    first: TestOrigin,
    second: TestOrigin,
    certs: [TestCert; 2],
    path: PathBuf,
}

impl Setup {
    fn text(&self, k: &Knobs) -> String {
        let cert = &self.certs[usize::from(k.second_cert)];
        let c_url = if k.c_on_second {
            self.second.url()
        } else {
            self.first.url()
        };
        let mut t = format!(
            "[server]\nhttp = [\"127.0.0.1:0\"]\nhttps = [\"127.0.0.1:0\"]\n\
             [[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"{}\"\nkey = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n\
             [[origins]]\nname = \"a\"\nurl = \"{}\"\n\
             [[origins]]\nname = \"c\"\nurl = \"{c_url}\"\n\
             [[sites]]\nhosts = [\"a.test\"]\norigin = \"a\"\n",
            cert.cert_path.display(),
            cert.key_path.display(),
            self.first.url(),
        );
        if k.bypass_api {
            t.push_str("[[sites.rules]]\nprefix = \"/api/\"\nbypass = true\n");
        }
        t.push_str("[[sites]]\nhosts = [\"c.test\"]\norigin = \"c\"\n");
        if k.b_site {
            t.push_str("[[sites]]\nhosts = [\"b.test\"]\norigin = \"a\"\n");
        }
        t
    }

    fn write(&self, k: &Knobs) {
        std::fs::write(&self.path, self.text(k)).expect("write config");
    }
}

async fn setup(dir: &Path) -> Setup {
    let first = TestOrigin::start().await;
    let second = TestOrigin::start().await;
    first.route(
        "/obj",
        Route::ok("object").header("cache-control", "max-age=600"),
    );
    first.route(
        "/api/x",
        Route::ok("api").header("cache-control", "max-age=600"),
    );
    first.route(
        "/who",
        Route::ok("first").header("cache-control", "no-store"),
    );
    second.route(
        "/who",
        Route::ok("second").header("cache-control", "no-store"),
    );
    Setup {
        first,
        second,
        certs: [
            make_cert(dir, "one", &["a.test"]),
            make_cert(dir, "two", &["a.test"]),
        ],
        path: dir.join("edgecache.toml"),
    }
}

async fn start(s: &Setup, dir: tempfile::TempDir) -> TestNode {
    let config = edgecache::Config::load(&s.path).expect("config");
    let node = edgecache::start(config).await.expect("start");
    TestNode {
        http: node.http_addrs()[0],
        https: node.https_addrs().first().copied(),
        node: Some(node),
        dir,
    }
}

/// `POST /reload` on the admin listener: status line and body.
async fn post_reload(node: &TestNode) -> String {
    let admin = node.node().admin_addr().expect("admin");
    let req = "POST /reload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\
               Content-Length: 0\r\nConnection: close\r\n\r\n";
    raw(admin, req.as_bytes(), Duration::from_secs(10)).await.0
}

/// The certificate a new TLS handshake for `a.test` gets.
async fn served_cert(s: &Setup, addr: SocketAddr) -> usize {
    let roots = [s.certs[0].der.clone(), s.certs[1].der.clone()];
    let tls = tls_connect(addr, "a.test", &roots, &[b"http/1.1"]).await;
    let der = tls.get_ref().1.peer_certificates().expect("peer certs")[0].clone();
    s.certs
        .iter()
        .position(|c| c.der == der)
        .expect("one of ours")
}

/// Checks that every knob is what `k` says, each with one request.
async fn assert_knobs(s: &Setup, node: &TestNode, k: &Knobs, step: usize) {
    let b = get(node.http, "b.test", "/who").await;
    if k.b_site {
        assert_eq!(
            (b.status.as_u16(), &b.body[..]),
            (200, &b"first"[..]),
            "step {step}"
        );
    } else {
        assert_eq!(b.status, 421, "step {step}: b.test not served");
    }
    let c = get(node.http, "c.test", "/who").await;
    let want: &[u8] = if k.c_on_second { b"second" } else { b"first" };
    assert_eq!(&c.body[..], want, "step {step}: origin c's URL");
    let api = get(node.http, "a.test", "/api/x").await;
    let status = api.header("cache-status").unwrap_or_default().to_owned();
    assert_eq!(
        status.contains("fwd=bypass"),
        k.bypass_api,
        "step {step}: {status}"
    );
    let https = node.https.expect("https");
    assert_eq!(
        served_cert(s, https).await,
        usize::from(k.second_cert),
        "step {step}: certificate"
    );
}

/// Clients that never stop during the reloads: one keeps a connection alive, one opens a new
/// connection per request. Each request must get the stored object.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn one_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<(), String> {
    let resp = sender
        .send_request(request("GET", "a.test", "/obj", &[]))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != 200 || &body[..] != b"object" {
        return Err(format!("{status} {body:?}"));
    }
    Ok(())
}

async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

fn load(addr: SocketAddr) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for keep_alive in [true, false] {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut kept = None;
            // Bounded: at most this many requests, whatever happens.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let sender = match kept.take() {
                    Some(s) => Ok(s),
                    None => connect(addr).await,
                };
                let outcome = match sender {
                    Ok(mut s) => {
                        let r = one_request(&mut s).await;
                        if keep_alive && r.is_ok() {
                            kept = Some(s);
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed during reloads: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    Load {
        stop,
        done,
        failed,
        tasks,
    }
}

#[tokio::test]
async fn ten_reloads_under_load_change_what_they_say_and_keep_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let mut k = Knobs::default();
    s.write(&k);
    let node = start(&s, dir).await;
    // Stored before any reload: every later request for it must be a hit.
    let first = get(node.http, "a.test", "/obj").await;
    assert_eq!(first.status, 200);
    let warm = get(node.http, "a.test", "/api/x").await;
    assert_eq!(warm.status, 200);
    assert_knobs(&s, &node, &k, 0).await;

    let clients = load(node.http);
    for step in 1..=10 {
        match step % 4 {
            1 => k.b_site = !k.b_site,
            2 => k.c_on_second = !k.c_on_second,
            3 => k.bypass_api = !k.bypass_api,
            _ => k.second_cert = !k.second_cert,
        }
        s.write(&k);
        let reply = post_reload(&node).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "step {step}: {reply}");
        assert_knobs(&s, &node, &k, step).await;
    }
    // A file that does not parse changes nothing, and says where it is wrong.
    std::fs::write(&s.path, "[server]\nhttp = [\"127.0.0.1:0\"\n").expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 422"), "{reply}");
    assert!(
        reply.contains(&format!("{}:", s.path.display())),
        "names the file: {reply}"
    );
    assert_knobs(&s, &node, &k, 11).await;
    // An origin that names no known origin: refused with its position, nothing changed.
    let broken = s.text(&k).replace("origin = \"c\"", "origin = \"missing\"");
    std::fs::write(&s.path, broken).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 422"), "{reply}");
    assert!(reply.contains("missing"), "{reply}");
    assert_knobs(&s, &node, &k, 12).await;

    clients.stop.store(true, Ordering::Relaxed);
    for t in clients.tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        clients.failed.load(Ordering::Relaxed),
        0,
        "no request failed"
    );
    assert!(
        clients.done.load(Ordering::Relaxed) >= 20,
        "the clients ran"
    );
    // The object stored before the reloads was never fetched again.
    assert_eq!(s.first.count("/obj"), 1, "the cache was kept");
    let after = get(node.http, "a.test", "/obj").await;
    assert_eq!(after.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(
        metric(&node, "edgecache_config_reloads_total{result=\"ok\"}").await,
        10
    );
    assert_eq!(
        metric(&node, "edgecache_config_reloads_total{result=\"error\"}").await,
        2
    );
}

#[tokio::test]
async fn an_origin_kept_by_name_and_url_keeps_its_state_and_a_renamed_one_starts_anew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs {
        c_on_second: true,
        ..Knobs::default()
    };
    s.write(&k);
    let node = start(&s, dir).await;
    for _ in 0..3 {
        assert_eq!(get(node.http, "c.test", "/who").await.status, 200);
    }
    assert_eq!(origin_state(&node, "c").await["requests"], 3);
    // Same name and URL, another setting changed: the state is carried.
    std::fs::write(
        &s.path,
        s.text(&k).replace(
            &format!("name = \"c\"\nurl = \"{}\"\n", s.second.url()),
            &format!(
                "name = \"c\"\nurl = \"{}\"\ntimeout = \"9s\"\n",
                s.second.url()
            ),
        ),
    )
    .expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(origin_state(&node, "c").await["requests"], 3, "carried");
    assert_eq!(get(node.http, "c.test", "/who").await.status, 200);
    assert_eq!(origin_state(&node, "c").await["requests"], 4);
    // Another URL under the same name is another origin: its state starts at zero.
    let k = Knobs {
        c_on_second: false,
        ..k
    };
    s.write(&k);
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        origin_state(&node, "c").await["requests"],
        0,
        "a new origin"
    );
}

#[tokio::test]
async fn a_node_without_a_file_refuses_to_reload() {
    let origin = TestOrigin::start().await;
    let node = TestNode::start(
        "",
        &format!(
            "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
            site(&origin, "a.test", "")
        ),
    )
    .await;
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 409"), "{reply}");
}

#[tokio::test]
async fn a_reload_opens_the_listeners_the_file_adds_and_closes_those_it_drops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    s.write(&k);
    let node = start(&s, dir).await;
    let extra = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let with_extra = s.text(&k).replace(
        "http = [\"127.0.0.1:0\"]",
        &format!("http = [\"127.0.0.1:0\", \"{extra}\"]"),
    );
    std::fs::write(&s.path, with_extra).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.contains("1 opened"), "{reply}");
    let r = get(extra, "a.test", "/obj").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"object"[..]));
    // The first listener was kept: same socket, still serving.
    assert_eq!(get(node.http, "a.test", "/obj").await.status, 200);

    s.write(&k);
    let reply = post_reload(&node).await;
    assert!(reply.contains("1 closed"), "{reply}");
    assert!(
        eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(extra).is_err()
        })
        .await,
        "the dropped listener stops accepting"
    );
    assert_eq!(get(node.http, "a.test", "/obj").await.status, 200);
    // A listener that cannot be bound refuses the whole reload.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    let with_busy = s
        .text(&Knobs {
            b_site: true,
            ..k.clone()
        })
        .replace(
            "http = [\"127.0.0.1:0\"]",
            &format!("http = [\"127.0.0.1:0\", \"{busy}\"]"),
        );
    std::fs::write(&s.path, with_busy).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 422"), "{reply}");
    assert_eq!(
        get(node.http, "b.test", "/who").await.status,
        421,
        "nothing swapped"
    );
}

#[tokio::test]
async fn a_changed_cache_memory_resizes_the_store_keeping_what_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    let with_memory = |m: &str| {
        format!(
            "{}[cache]\nmemory = \"{m}\"\nmax_object_size = \"100KiB\"\nfill_memory = \"1MiB\"\n",
            s.text(&k)
        )
    };
    std::fs::write(&s.path, with_memory("4MiB")).expect("write");
    let objects = 40;
    for i in 0..objects {
        s.first.route(
            &format!("/big/{i}"),
            Route::bytes(Bytes::from(vec![b'a' + (i % 26) as u8; 60_000]))
                .header("cache-control", "max-age=600"),
        );
    }
    let node = start(&s, dir).await;
    let fetch_all = || async {
        let mut hits = 0;
        for i in 0..objects {
            let r = get(node.http, "a.test", &format!("/big/{i}")).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), 60_000);
            assert!(r.body.iter().all(|&b| b == b'a' + (i % 26) as u8));
            hits += usize::from(r.header("cache-status").is_some_and(|c| c.contains("hit")));
        }
        hits
    };
    assert_eq!(fetch_all().await, 0);
    assert_eq!(fetch_all().await, objects, "all stored");
    let fetched = |s: &Setup| {
        (0..objects)
            .map(|i| s.first.count(&format!("/big/{i}")))
            .sum::<usize>()
    };
    assert_eq!(fetched(&s), objects);

    // Larger: everything stays, and the capacity gauge says the new size.
    std::fs::write(&s.path, with_memory("8MiB")).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("cache resized"), "{reply}");
    assert_eq!(
        metric(&node, "edgecache_cache_capacity_bytes").await,
        8 << 20
    );
    assert_eq!(fetch_all().await, objects, "every object still a hit");
    assert_eq!(fetched(&s), objects, "no request reached the origin");

    // Smaller than what is stored: what no longer fits is evicted, the rest still hits.
    std::fs::write(&s.path, with_memory("1MiB")).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let store = node.node().store();
    store.sync();
    assert!(
        store.weighted_size() <= 1 << 20,
        "{}",
        store.weighted_size()
    );
    assert!(store.entry_count() > 0, "what fits is kept");
    assert_eq!(
        metric(&node, "edgecache_cache_capacity_bytes").await,
        1 << 20
    );
    let kept = store.entry_count() as usize;
    let hits = fetch_all().await;
    assert!(hits > 0, "what was kept is still served from the cache");
    assert_eq!(
        fetched(&s),
        2 * objects - hits,
        "only evicted objects were fetched again"
    );
    assert!(hits <= kept);
}

/// Whether the server closes (or resets) `s` within `wait`, with nothing sent on it.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn a_reload_applies_connection_limits_and_timeouts_to_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    let with_server = |extra: &str| {
        s.text(&k)
            .replacen("[server]\n", &format!("[server]\n{extra}"), 1)
    };
    std::fs::write(&s.path, with_server("idle_timeout = \"60s\"\n")).expect("write");
    let node = start(&s, dir).await;
    // Two connections open under the old settings, no request sent yet.
    let mut old_a = TcpStream::connect(node.http).await.expect("connect");
    let old_b = TcpStream::connect(node.http).await.expect("connect");

    std::fs::write(
        &s.path,
        with_server("idle_timeout = \"1s\"\nmax_connections_per_client = 2\n"),
    )
    .expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(!reply.contains("not applied"), "{reply}");
    // The cap counts the connections already open: a third one from this address is reset.
    let mut third = TcpStream::connect(node.http).await.expect("connect");
    assert!(
        closed_within(&mut third, Duration::from_secs(10)).await,
        "refused by the cap"
    );
    drop(old_b);
    // With a place free again, a new connection is served, under the new idle timeout:
    // it is closed after about a second of silence.
    let mut fresh = None;
    for _ in 0..100 {
        let mut c = TcpStream::connect(node.http).await.expect("connect");
        let got = request_on(&mut c, "a.test", "/obj").await;
        if got.is_some() {
            fresh = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = fresh.expect("a new connection is served once one closed");
    assert!(
        closed_within(&mut fresh, Duration::from_secs(15)).await,
        "the new timeout"
    );
    // The connection accepted before the reload keeps its own 60 s idle timeout and is served.
    let got = request_on(&mut old_a, "a.test", "/obj").await;
    assert_eq!(
        got.as_deref().map(|r| r.starts_with("HTTP/1.1 200")),
        Some(true)
    );
}

/// One request on `c`: the response head and body as text, or `None` when the connection was
/// closed or reset without an answer.
async fn request_on(c: &mut TcpStream, host: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    c.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, c.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return Some(text.into_owned());
            }
        }
    }
}

#[tokio::test]
async fn listeners_a_reload_opens_are_handed_to_an_upgrade_and_those_it_closes_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    let socket = dir.path().join("upgrade.sock");
    let base = s.text(&k).replacen(
        "[server]\n",
        &format!("[server]\nupgrade_socket = \"{}\"\n", socket.display()),
        1,
    );
    let free_port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (dropped, added) = (free_port(), free_port());
    let listing = |extra: SocketAddr| {
        base.replace(
            "http = [\"127.0.0.1:0\"]",
            &format!("http = [\"127.0.0.1:0\", \"{extra}\"]"),
        )
    };
    std::fs::write(&s.path, listing(dropped)).expect("write");
    let node = start(&s, dir).await;
    assert_eq!(get(dropped, "a.test", "/obj").await.status, 200);

    std::fs::write(&s.path, listing(added)).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.contains("1 opened, 1 closed"), "{reply}");
    assert!(
        eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(dropped).is_err()
        })
        .await,
        "a closed listener is not held open for an upgrade"
    );
    assert_eq!(get(added, "a.test", "/obj").await.status, 200);

    // A second node started on the same file while the first runs: it can only listen on
    // `added` (held by the first) if it was handed over.
    let next = edgecache::start(edgecache::Config::load(&s.path).expect("config"))
        .await
        .expect("the new node takes the listeners over");
    assert!(
        next.http_addrs().contains(&added),
        "{:?}",
        next.http_addrs()
    );
    tokio::time::timeout(Duration::from_secs(10), node.node().handed_over())
        .await
        .expect("the first node is told it handed over");
    next.shutdown().await;
}

#[tokio::test]
async fn a_reload_turns_tls_on_and_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let with_tls = s.text(&k).replace(
        "https = [\"127.0.0.1:0\"]",
        &format!("https = [\"{port}\"]"),
    );
    let cert = &s.certs[0];
    let without_tls = with_tls
        .replace(&format!("https = [\"{port}\"]\n"), "")
        .replace(
            &format!(
                "[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.cert_path.display(),
                cert.key_path.display()
            ),
            "",
        );
    assert!(!without_tls.contains("tls"), "{without_tls}");
    std::fs::write(&s.path, &without_tls).expect("write");
    let node = start(&s, dir).await;
    assert!(node.node().https_addrs().is_empty());

    std::fs::write(&s.path, &with_tls).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(!reply.contains("not applied"), "{reply}");
    assert_eq!(
        served_cert(&s, port).await,
        0,
        "HTTPS served with the new certificate"
    );

    std::fs::write(&s.path, &without_tls).expect("write");
    let reply = post_reload(&node).await;
    assert!(reply.contains("1 closed"), "{reply}");
    assert!(
        eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(port).is_err()
        })
        .await,
        "HTTPS off again"
    );
    assert_eq!(get(node.http, "a.test", "/obj").await.status, 200);
}

/// An admin request with `token`: its status line.
async fn admin_status_with(addr: SocketAddr, token: &str) -> String {
    let req = format!(
        "GET /status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (reply, _) = raw(addr, req.as_bytes(), Duration::from_secs(10)).await;
    reply.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_reload_applies_admin_settings_and_moves_or_closes_the_admin_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = setup(dir.path()).await;
    let k = Knobs::default();
    s.write(&k);
    let node = start(&s, dir).await;
    let first = node.node().admin_addr().expect("admin");
    assert!(admin_status_with(first, "t").await.contains("200"));

    // Same address, a new token: the old one is refused from now on.
    let text = s.text(&k).replace("token = \"t\"", "token = \"t2\"");
    std::fs::write(&s.path, &text).expect("write");
    let req = "POST /reload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\
               Content-Length: 0\r\nConnection: close\r\n\r\n";
    let reply = raw(first, req.as_bytes(), Duration::from_secs(10)).await.0;
    assert!(reply.contains("admin settings swapped in"), "{reply}");
    assert!(admin_status_with(first, "t").await.contains("401"));
    assert!(admin_status_with(first, "t2").await.contains("200"));
    assert_eq!(node.node().admin_addr(), Some(first), "same listener");

    // A new address: served there, and the old one closes.
    let moved = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    std::fs::write(
        &s.path,
        text.replace(
            "listen = \"127.0.0.1:0\"\ntoken",
            &format!("listen = \"{moved}\"\ntoken"),
        ),
    )
    .expect("write");
    let req = "POST /reload HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t2\r\n\
               Content-Length: 0\r\nConnection: close\r\n\r\n";
    let reply = raw(first, req.as_bytes(), Duration::from_secs(10)).await.0;
    assert!(reply.contains("admin listener opened"), "{reply}");
    assert_eq!(node.node().admin_addr(), Some(moved));
    assert!(admin_status_with(moved, "t2").await.contains("200"));
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            first
        )
        .is_err())
        .await,
        "the old admin address stops accepting"
    );

    // No [admin]: closed. (Reloaded by SIGHUP's path: the node's own reload.)
    let without: String = text.replace("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t2\"\n", "");
    assert!(!without.contains("[admin]"));
    std::fs::write(&s.path, &without).expect("write");
    let done = node.node().reload().expect("reload");
    assert!(done.contains("admin listener closed"), "{done}");
    assert_eq!(node.node().admin_addr(), None);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            moved
        )
        .is_err())
        .await,
        "closed"
    );
    // And back.
    std::fs::write(&s.path, &text).expect("write");
    let done = node.node().reload().expect("reload");
    assert!(done.contains("admin listener opened"), "{done}");
    let back = node.node().admin_addr().expect("admin again");
    assert!(admin_status_with(back, "t2").await.contains("200"));
    assert_eq!(get(node.http, "a.test", "/obj").await.status, 200);
}

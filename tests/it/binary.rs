//! The real `edgecache` binary: `check`, `run`, `--help`, memory while streaming, signals
//! (SIGUSR1, SIGUSR2, SIGHUP) and SIGTERM drain.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

#[test]
fn check_prints_a_summary_for_the_shipped_config() {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/edgecache.toml"))
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("is valid"));
    assert!(text.contains("0.0.0.0:8080"));
    assert!(text.contains("512MiB"));
    assert!(text.contains("primary"));
    assert!(
        text.contains("clients: named in x-forwarded-for by trusted proxies (none)"),
        "{text}"
    );
    assert!(
        text.contains("PURGE method: from clients in 127.0.0.1/32"),
        "{text}"
    );
    assert!(text.contains("per client: no limits"), "{text}");
}

#[test]
fn every_config_file_shipped_in_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for entry in std::fs::read_dir(dir).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = edgecache::Config::load(&path) {
                panic!("{}: {e}", path.display());
            }
        }
    }
}

fn check_error(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    err.replace(&path.display().to_string(), "bad.toml")
}

#[test]
fn malformed_config_names_file_line_and_key() {
    let base = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n";
    let e = check_error(&format!("{base}[cache]\nmemroy = \"1GiB\"\n"));
    assert!(
        e.starts_with("bad.toml:8:1: cache.memroy: unknown key `memroy`"),
        "{e}"
    );
    let e = check_error(&format!("[server]\nidle_timeout = \"ten\"\n{base}"));
    assert!(
        e.starts_with("bad.toml:2:16: server.idle_timeout: invalid duration \"ten\""),
        "{e}"
    );
    let e = check_error(&format!("[server]\nhttp = [\"localhost\"]\n{base}"));
    assert!(
        e.starts_with("bad.toml:2:9: server.http: \"localhost\" is not a listen address"),
        "{e}"
    );
    let e = check_error(&base.replace("origin = \"a\"", "origin = \"nope\""));
    assert!(
        e.starts_with("bad.toml:6:10: sites[0].origin: origin \"nope\" is not defined"),
        "{e}"
    );
    let e = check_error("[server\nhttp = 1\n");
    assert!(e.starts_with("bad.toml:1:"), "{e}");
}

/// `check` used to accept listen addresses that `run` then failed to bind.
#[test]
fn check_refuses_listen_addresses_that_run_could_not_bind() {
    let text = "[server]\nhttp = [\"0.0.0.0:8080\", \"127.0.0.1:8081\"]\n\
                [admin]\nlisten = \"127.0.0.1:8080\"\n\
                [[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n\
                [[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n";
    let e = check_error(text);
    assert_eq!(
        e.trim_end(),
        "bad.toml:4:10: admin.listen: 127.0.0.1:8080 overlaps 0.0.0.0:8080 (server.http at 2:9): \
         0.0.0.0 holds the port on every IPv4 address, so run could not bind both",
    );
    let e = check_error(&text.replace("127.0.0.1:8081", "0.0.0.0:8080"));
    assert_eq!(e.lines().count(), 2, "{e}");
    assert!(
        e.starts_with("bad.toml:2:25: server.http: 0.0.0.0:8080 is also server.http at 2:9"),
        "{e}"
    );
}

#[test]
fn certificate_not_matching_its_key_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = make_cert(dir.path(), "a", &["a.test"]);
    let b = make_cert(dir.path(), "b", &["b.test"]);
    let text = format!(
        "[server]\nhttps = [\"127.0.0.1:0\"]\n[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"a.test\"]\norigin = \"a\"\n",
        a.cert_path.display(),
        b.key_path.display()
    );
    let e = check_error(&text);
    assert!(e.starts_with("bad.toml:5:8: tls.certificates[0].cert: the private key does not match the certificate"), "{e}");
}

/// A running `edgecache run` process, killed on drop.
struct Proc {
    child: Child,
    http: SocketAddr,
    /// Every line it wrote to stderr (the error log) and stdout (the access log) so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(origin: &TestOrigin, server_extra: &str) -> Proc {
    spawn_with(&site(origin, "site.test", ""), server_extra, &[])
}

fn spawn_with(body: &str, server_extra: &str, args: &[&str]) -> Proc {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    let workers = if server_extra.contains("workers") {
        ""
    } else {
        "workers = 2\n"
    };
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\n{workers}{server_extra}\n[cache]\nmax_object_size = \"8MiB\"\n{body}"
    );
    std::fs::write(&path, text).expect("write config");
    let mut p = spawn_file(&path, args);
    p._dir = Some(dir);
    p
}

/// `edgecache run --config path`, once it said where it listens.
fn spawn_file(path: &std::path::Path, args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(path)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edgecache");
    // The bound address is in the "listening for HTTP" log line.
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            kept.lock().expect("lock").push(line);
        }
    });
    let kept = lines.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().expect("lock").push(line.clone());
            if !sent && line.contains("listening for HTTP") {
                // `addr=127.0.0.1:port` in text logs, `"addr":"127.0.0.1:port"` in JSON.
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .or_else(|| line.split("\"addr\":").nth(1))
                    .and_then(|s| s.split([' ', ',']).next())
                {
                    let clean: String = addr
                        .chars()
                        .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    let _ = tx.send(clean);
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("edgecache reported its address");
    Proc {
        child,
        http: addr
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .expect("address"),
        lines,
        _dir: None,
    }
}

#[tokio::test]
async fn each_request_has_an_access_log_line_naming_origin_and_route() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/page",
        Route::ok("page").header("cache-control", "max-age=60"),
    );
    let body = format!(
        "[[origins]]\nname = \"eu-1\"\nurl = \"{}\"\n[[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n[[sites.routes]]\nname = \"everyone\"\npools = [\"eu\"]\n",
        origin.url()
    );
    let p = spawn_with(
        &body,
        "trusted_proxies = [\"127.0.0.1\"]\n",
        &["--log-format", "json"],
    );
    assert_eq!(get(p.http, "site.test", "/page?x=1").await.status, 200);
    assert_eq!(get(p.http, "site.test", "/page?x=1").await.status, 200);
    let forwarded = request(
        "GET",
        "site.test",
        "/page?x=1",
        &[("x-forwarded-for", "203.0.113.9")],
    );
    assert_eq!(send(p.http, forwarded).await.status, 200);
    let access = |p: &Proc| -> Vec<serde_json::Value> {
        p.lines
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "edgecache::access")
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while access(&p).len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = access(&p);
    assert_eq!(lines.len(), 3, "one line per request: {lines:?}");
    let miss = &lines[0];
    assert_eq!(miss["host"], "site.test");
    assert_eq!(miss["method"], "GET");
    assert_eq!(miss["path"], "/page?x=1");
    assert_eq!(miss["status"], 200);
    assert_eq!(miss["bytes"], 4);
    assert_eq!(miss["cache"], "miss");
    assert_eq!(miss["origin"], "eu-1");
    assert_eq!(miss["route"], "everyone");
    assert_eq!(miss["client"], "127.0.0.1");
    assert!(miss["origin_ms"].is_number());
    let hit = &lines[1];
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["origin"], "-", "a hit reaches no origin");
    assert_eq!(hit["route"], "-");
    assert_eq!(lines[2]["client"], "127.0.0.1", "the TCP peer");
    assert_eq!(
        lines[2]["forwarded_client"], "203.0.113.9",
        "the client a trusted proxy names, as nginx's real_ip module finds it"
    );
}

#[tokio::test]
async fn a_rate_limited_request_is_logged_as_limited() {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("p").header("cache-control", "max-age=60"));
    let p = spawn_with(
        &site(&origin, "site.test", ""),
        "rate_per_client = \"1/min\"\n",
        &["--log-format", "json"],
    );
    assert_eq!(get(p.http, "site.test", "/p").await.status, 200);
    assert_eq!(get(p.http, "site.test", "/p").await.status, 429);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let limited = loop {
        let found = p
            .lines
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "edgecache::access" && v["status"] == 429);
        if let Some(v) = found {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access line for the 429"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(limited["cache"], "limited");
    assert_eq!(limited["client"], "127.0.0.1");
    assert_eq!(limited["origin"], "-");
}

/// The fields of a text-format access line after its message, as `(key, raw value)`; a
/// quoted value runs to the first `"` not escaped by `\`.
fn text_fields(line: &str) -> Vec<(String, String)> {
    let rest = line.split_once(" request ").map_or("", |(_, r)| r);
    let mut fields = Vec::new();
    let mut chars = rest.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            value.extend(chars.next());
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    value.extend(chars.next());
                } else if c == '"' {
                    break;
                }
            }
            chars.next();
        } else {
            value = chars.by_ref().take_while(|&c| c != ' ').collect();
        }
        fields.push((key.trim().to_owned(), value));
    }
    fields
}

#[tokio::test]
async fn a_host_header_cannot_forge_text_access_log_fields() {
    let origin = TestOrigin::start().await;
    let p = spawn(&origin, "");
    let host = "site.test status=200 cache=\"hit\" origin=\"eu-1\"";
    let r = get(p.http, host, "/page").await;
    assert_eq!(r.status, 421, "not a site of ours");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = p
            .lines
            .lock()
            .expect("lock")
            .iter()
            .find(|l| l.contains("edgecache::access"))
            .cloned();
        if let Some(l) = found {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no access line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fields = text_fields(&line);
    let values = |k: &str| -> Vec<&str> {
        fields
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("status"), ["421"], "{line}");
    assert_eq!(values("cache"), ["\"refused\""], "{line}");
    assert_eq!(values("origin"), ["\"-\""], "{line}");
    assert_eq!(
        values("host"),
        [r#""site.test status=200 cache=\"hit\" origin=\"eu-1\"""#],
        "{line}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_body_streams_through_with_flat_memory() {
    use http_body_util::BodyExt;
    let origin = TestOrigin::start().await;
    origin.route(
        "/huge",
        Route::ok("")
            .generated(256 << 10, 400, true, Duration::ZERO)
            .header("cache-control", "max-age=60"),
    );
    origin.route(
        "/huge-chunked",
        Route::ok("")
            .generated(256 << 10, 400, false, Duration::ZERO)
            .header("cache-control", "max-age=60"),
    );
    let p = spawn(&origin, "");
    let pid = p.child.id();
    // Warm up so the baseline includes the runtime, pools and buffers.
    assert_eq!(get(p.http, "site.test", "/nothing").await.status, 404);
    let baseline = rss_kib(pid);
    for path in ["/huge", "/huge-chunked"] {
        let stream = tokio::net::TcpStream::connect(p.http)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let resp = sender
            .send_request(request("GET", "site.test", path, &[]))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut total = 0usize;
        let mut peak = 0u64;
        let mut frames = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.expect("frame").into_data() {
                total += d.len();
            }
            frames += 1;
            if frames.is_multiple_of(64) {
                peak = peak.max(rss_kib(pid));
            }
        }
        assert_eq!(total, 100 << 20, "{path}: every byte arrived");
        let grown = peak.saturating_sub(baseline);
        // 100 MiB passed through; the proxy may hold at most max_object_size (8 MiB) of it
        // while deciding whether to store, plus buffers.
        assert!(
            grown < 40 << 10,
            "{path}: RSS grew by {grown} KiB (baseline {baseline} KiB)"
        );
    }
}

/// Sends `signal` (`TERM`, `USR1`, …) to the process.
fn kill(p: &Proc, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal}");
}

fn sigterm(p: &Proc) {
    kill(p, "TERM");
}

/// Waits (at most 10 s) for a stderr line containing `what`; true when one came.
async fn logged(p: &Proc, what: &str) -> bool {
    let seen = || {
        p.lines
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(what))
    };
    eventually(Duration::from_secs(10), seen).await
}

/// Waits (at most 20 s) for the process to exit, and asserts it exited successfully.
async fn assert_exits_cleanly(p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "edgecache did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_download_then_exits() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/dl",
        Route::ok("").generated(64 << 10, 30, true, Duration::from_millis(50)),
    );
    origin.route(
        "/hit",
        Route::ok("cached").header("cache-control", "max-age=60"),
    );
    let mut p = spawn(&origin, "shutdown_grace = \"30s\"");
    get(p.http, "site.test", "/hit").await;
    let r = get(p.http, "site.test", "/hit").await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(origin.count("/hit"), 1);

    let addr = p.http;
    let download = tokio::spawn(async move { get(addr, "site.test", "/dl").await });
    assert!(eventually(Duration::from_secs(5), || origin.count("/dl") == 1).await);
    sigterm(&p);
    let r = download.await.expect("download");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 30 * (64 << 10));
    assert_exits_cleanly(&mut p).await;
}

/// `workers = 1` runs the binary on a single-thread runtime: 600 HTTP/2 streams at once (more
/// runnable tasks than a worker's own queue holds) for one cold object all get the whole body
/// from one origin request, and SIGTERM still ends the process cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_600_concurrent_http2_streams_from_one_origin_request() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cold",
        Route::ok("")
            .generated(16 << 10, 4, false, Duration::ZERO)
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300)),
    );
    let mut p = spawn(&origin, "workers = 1\nh2_max_concurrent_streams = 200");
    let answers = h2c_concurrent(p.http, 4, 150, "http://site.test/cold").await;
    for r in answers {
        assert_eq!(r.status, 200);
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.body.len(), 4 * (16 << 10), "whole body");
    }
    assert_eq!(
        origin.count("/cold"),
        1,
        "one origin request for 600 streams"
    );
    let r = get(p.http, "site.test", "/cold").await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));

    sigterm(&p);
    assert_exits_cleanly(&mut p).await;
}

#[tokio::test]
async fn sighup_reloads_the_configuration_and_its_geo_database() {
    let (eu, us) = regional_origins().await;
    let geo_dir = tempfile::tempdir().expect("tempdir");
    let db = geo_dir.path().join("country.mmdb");
    write_mmdb(&db, false, &[("203.0.113.0/24", "DE", "EU")]);
    let body = format!(
        "[geo]\ndatabase = \"{}\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[origins]]\nname = \"eu-1\"\nurl = \"{}\"\n[[origins]]\nname = \"us-1\"\nurl = \"{}\"\n\
         [[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\n[[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n\
         [[sites.routes]]\nmatch = {{ continents = [\"EU\"] }}\npools = [\"eu\"]\n\
         [[sites.routes]]\npools = [\"us\"]\n",
        db.display(),
        eu.url(),
        us.url()
    );
    let p = spawn_with(&body, "", &[]);
    let whence = || async {
        let r = send(
            p.http,
            request(
                "GET",
                "site.test",
                "/where",
                &[("x-forwarded-for", "203.0.113.9")],
            ),
        )
        .await;
        String::from_utf8_lossy(&r.body).into_owned()
    };
    assert_eq!(whence().await, "eu");
    let hup = |pid: u32| {
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "signal sent");
    };
    let logged = |p: &Proc, what: &str| {
        p.lines
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(what))
    };

    // The network moves to the US in a new release of the file.
    write_mmdb(&db, false, &[("203.0.113.0/24", "US", "NA")]);
    assert_eq!(whence().await, "eu", "nothing changes before the signal");
    hup(p.child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !logged(&p, "configuration reloaded") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged(&p, "configuration reloaded"));
    assert_eq!(whence().await, "us");

    // A broken file is refused and the one in use stays.
    std::fs::write(&db, b"not a database").expect("write");
    hup(p.child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !logged(&p, "reload refused") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged(
        &p,
        "configuration reload refused; the running configuration stays"
    ));
    assert_eq!(whence().await, "us");
}

#[test]
fn check_summary_shows_who_may_use_the_admin_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("admin.toml");
    std::fs::write(
        &path,
        "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n\
         [admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"t\"\npublic_metrics = true\nmax_connections = 8\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "admin: 0.0.0.0:9090 (not loopback) (healthz, readyz, metrics; origins, purge with \
             the token), at most 8 connections"
        ),
        "{text}"
    );
}

#[test]
fn malformed_admin_settings_name_file_line_and_key() {
    let base = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n[admin]\n";
    let e = check_error(&format!("{base}max_connections = 0\n"));
    assert!(
        e.starts_with("bad.toml:8:19: admin.max_connections: must be at least 1"),
        "{e}"
    );
    let e = check_error(&format!("{base}public_metrics = \"yes\"\n"));
    assert!(
        e.starts_with("bad.toml:8:18: admin.public_metrics: "),
        "{e}"
    );
}

#[tokio::test]
async fn a_non_loopback_admin_address_is_warned_about_at_start() {
    let origin = TestOrigin::start().await;
    let warned = |listen: &str| {
        let body = format!(
            "{}[admin]\nlisten = \"{listen}\"\ntoken = \"t\"\n",
            site(&origin, "site.test", "")
        );
        // The admin listener is bound, and logged, before the data listeners, whose line
        // `spawn_with` waits for.
        let p = spawn_with(&body, "", &[]);
        let lines = p.lines.lock().expect("lock").clone();
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("admin listen address is not loopback"))
    };
    assert!(warned("0.0.0.0:0"));
    assert!(!warned("127.0.0.1:0"));
}

/// SIGUSR1 (logrotate's "reopen your logs") and SIGUSR2 used to end the process with the
/// signal's default action (exit 138 / 140), and the cache with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_and_sigusr2_are_logged_and_the_node_keeps_serving_its_cache() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/hit",
        Route::ok("cached").header("cache-control", "max-age=600"),
    );
    let mut p = spawn(&origin, "");
    assert_eq!(get(p.http, "site.test", "/hit").await.status, 200);
    assert_eq!(origin.count("/hit"), 1);

    kill(&p, "USR1");
    assert!(
        logged(
            &p,
            "SIGUSR1: no log files to reopen; logs go to stdout and stderr"
        )
        .await,
        "{:?}",
        p.lines.lock().expect("lock")
    );
    kill(&p, "USR2");
    assert!(logged(&p, "SIGUSR2 ignored").await);
    assert!(p.child.try_wait().expect("wait").is_none(), "still running");

    let r = get(p.http, "site.test", "/hit").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"cached");
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(origin.count("/hit"), 1, "the cache survived both signals");

    sigterm(&p);
    assert_exits_cleanly(&mut p).await;
}

#[test]
fn help_lists_the_signals_and_what_they_do() {
    for args in [&["--help"][..], &["run", "--help"]] {
        let out = Command::new(BIN).args(args).output().expect("run --help");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for signal in [
            "SIGTERM, SIGINT",
            "SIGHUP",
            "SIGUSR1          reopen the [log] access and error files",
            "SIGUSR2",
            "SIGQUIT",
            "RUST_LOG",
            "EDGECACHE_ADMIN_TOKEN",
        ] {
            assert!(
                text.contains(signal),
                "{args:?}: {signal} missing in\n{text}"
            );
        }
    }
}

/// One GET on a new connection; `Err` says what went wrong.
async fn fresh_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "site.test", path, &[]))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_takes_the_listeners_over_with_no_failed_request() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/page",
        Route::ok("page").header("cache-control", "max-age=60"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\nworkers = 2\nshutdown_grace = \"5s\"\n\
         upgrade_socket = \"upgrade.sock\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n{}",
        site(&origin, "site.test", "")
    );
    std::fs::write(&path, text).expect("write config");
    let mut old = spawn_file(&path, &[]);
    let addr = old.http;
    assert_eq!(fresh_get(addr, "/page").await, Ok(200));

    // Clients at a steady rate, a new connection each, through the takeover.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match fresh_get(addr, "/page").await {
                    Ok(200) => {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => failures.lock().expect("lock").push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(10), || done
            .load(std::sync::atomic::Ordering::Relaxed)
            > 50)
        .await
    );

    let new = spawn_file(&path, &[]);
    assert_eq!(new.http, addr, "the new process serves the same port");
    assert!(logged(&new, "took the listening sockets over").await);
    assert!(logged(&old, "handed to a new edgecache").await);
    // The old process drains and exits by itself.
    assert_exits_cleanly(&mut old).await;
    let served = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || done
            .load(std::sync::atomic::Ordering::Relaxed)
            > served + 50)
        .await,
        "the new process answers"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    let failures = failures.lock().expect("lock");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    // The new process starts with an empty cache: one more origin request, not one per client.
    assert_eq!(origin.count("/page"), 2);
}

//! `[log]` through the real binary: the access and error logs in files, the access record's
//! fields (user agent, referer, request id trusted or made here and sent to the origin, TLS
//! version, the client behind a trusted proxy), SIGUSR1 reopening the files after a rename,
//! lines flushed at exit, JSON lines without duplicate keys, SIGUSR2 harmless.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

/// An `edgecache run` whose logs go to files in `dir`; killed on drop.
struct Running {
    child: Child,
    http: SocketAddr,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The JSON lines of a file in the directory, each checked for duplicate keys.
    fn json_lines(&self, name: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        json_lines(&self.path(name))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }
}

fn json_lines(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| match serde_json::from_str::<Unique>(l) {
            Ok(u) => u.0,
            Err(e) => panic!("{}: {e}: {l}", path.display()),
        })
        .collect()
}

/// A JSON object whose keys are all different: serde_json's `Value` keeps the last of two
/// equal keys without a word, so a line that repeats one would pass a plain parse.
struct Unique(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Unique, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = Unique;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<serde_json::Value>()?;
                    if out.contains_key(&key) {
                        return Err(A::Error::custom(format!("duplicate key {key:?}")));
                    }
                    out.insert(key, value);
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_map(Keys)
    }
}

#[test]
fn duplicate_keys_are_detected() {
    assert!(serde_json::from_str::<Unique>(r#"{"a":1,"b":{"a":2}}"#).is_ok());
    let e = serde_json::from_str::<Unique>(r#"{"target":"x","a":1,"target":"y"}"#);
    assert!(e.is_err_and(|e| e.to_string().contains("duplicate key \"target\"")));
}

/// Starts the binary with `[log]` set to `log` (paths relative to the configuration) and
/// `extra` added to the file; addresses are read from the error log, `error.log`.
async fn start(log: &str, server_extra: &str, extra: &str, args: &[&str]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    std::fs::create_dir(dir.path().join("logs")).expect("mkdir logs");
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\nworkers = 2\n{server_extra}\n[log]\n{log}\n{extra}"
    );
    std::fs::write(&path, text).expect("write config");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn edgecache");
    let error_log = dir.path().join("error.log");
    let addr = |what: &str| {
        json_lines(&error_log)
            .into_iter()
            .find(|l| {
                l.get("message").and_then(|m| m.as_str()).is_some_and(|m| {
                    m == what || m.starts_with("admin listening (") && what == "admin"
                })
            })
            .and_then(|l| l.get("addr")?.as_str()?.parse::<SocketAddr>().ok())
    };
    let started = eventually(Duration::from_secs(30), || {
        addr("listening for HTTP").is_some()
    })
    .await;
    assert!(
        started,
        "no address in the error log: {:?}",
        std::fs::read_to_string(&error_log)
    );
    Running {
        http: addr("listening for HTTP").expect("http address"),
        https: addr("listening for HTTPS"),
        admin: addr("admin"),
        child,
        dir,
    }
}

/// One request from `source` (a loopback address other than 127.0.0.1 is a client no
/// configuration trusts).
async fn send_from(source: IpAddr, addr: SocketAddr, req: Request<Empty<Bytes>>) -> Got {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the source address");
    let stream = socket.connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    read(sender.send_request(req).await.expect("response")).await
}

type Line = serde_json::Map<String, serde_json::Value>;

/// Waits for `n` access lines in `file`, and returns them.
async fn access_lines(p: &Running, file: &str, n: usize) -> Vec<Line> {
    let found = eventually(Duration::from_secs(10), || p.json_lines(file).len() >= n).await;
    let lines = p.json_lines(file);
    assert!(found, "{n} lines expected in {file}: {lines:?}");
    lines
}

fn field<'l>(line: &'l Line, key: &str) -> &'l str {
    line.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string {key} in {line:?}"))
}

fn is_made_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_carry_agent_referer_request_id_tls_and_forwarded_client() {
    let origin = TestOrigin::start().await;
    // Never stored: every request reaches the origin with its id.
    origin.route(
        "/page",
        Route::ok("page").header("cache-control", "no-store"),
    );
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = make_cert(certs.path(), "site", &["site.test"]);
    let p = start(
        "access = \"access.log\"\nerror = \"error.log\"\nformat = \"json\"\n",
        "https = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        &format!(
            "[[tls.certificates]]\nhosts = [\"site.test\"]\ncert = \"{}\"\nkey = \"{}\"\n{}",
            cert.cert_path.display(),
            cert.key_path.display(),
            site(&origin, "site.test", "")
        ),
        &[],
    )
    .await;

    // 1. A trusted proxy (127.0.0.1) names its client and gives an id: both believed.
    let trusted = request(
        "GET",
        "site.test",
        "/page",
        &[
            ("user-agent", "Mozilla/5.0 (X11) \"quoted\""),
            ("referer", "https://ref.test/a?b=c"),
            ("x-request-id", "trace-abc.123"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    );
    assert_eq!(send(p.http, trusted).await.status, 200);
    assert_eq!(
        origin.last_headers("/page")["x-request-id"],
        "trace-abc.123",
        "a trusted proxy's id goes on to the origin"
    );
    // 2. A client no one trusts (127.0.0.2): its id and forwarding field are not believed.
    let untrusted = request(
        "GET",
        "site.test",
        "/page",
        &[
            ("x-request-id", "forged-id"),
            ("x-forwarded-for", "198.51.100.1"),
        ],
    );
    let source = IpAddr::from([127, 0, 0, 2]);
    assert_eq!(send_from(source, p.http, untrusted).await.status, 200);
    let sent_untrusted = origin.last_headers("/page")["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    // 3. A trusted proxy's id that could not be logged safely is replaced.
    let bad = request(
        "GET",
        "site.test",
        "/page",
        &[("x-request-id", "has space")],
    );
    assert_eq!(send(p.http, bad).await.status, 200);
    let sent_bad = origin.last_headers("/page")["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    // 4. Over TLS.
    let https = p.https.expect("https address");
    let r = tls_get(
        https,
        "site.test",
        std::slice::from_ref(&cert.der),
        false,
        "/page",
    )
    .await;
    assert_eq!(r.status, 200);

    let lines = access_lines(&p, "access.log", 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (first, second, third, fourth) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    assert_eq!(field(first, "user_agent"), "Mozilla/5.0 (X11) \"quoted\"");
    assert_eq!(field(first, "referer"), "https://ref.test/a?b=c");
    assert_eq!(field(first, "request_id"), "trace-abc.123");
    assert_eq!(field(first, "client"), "127.0.0.1", "the TCP peer");
    assert_eq!(field(first, "forwarded_client"), "203.0.113.9");
    assert_eq!(field(first, "tls_version"), "-", "plain HTTP");

    assert_eq!(field(second, "client"), "127.0.0.2");
    assert_eq!(field(second, "forwarded_client"), "127.0.0.2");
    assert_eq!(field(second, "user_agent"), "-");
    assert_eq!(field(second, "referer"), "-");
    let id = field(second, "request_id");
    assert!(is_made_id(id), "{id}");
    assert_eq!(id, sent_untrusted, "the origin saw the id the log has");

    let id = field(third, "request_id");
    assert!(is_made_id(id), "{id}");
    assert_eq!(id, sent_bad);
    assert_ne!(field(second, "request_id"), id, "every request its own id");

    assert_eq!(field(fourth, "tls_version"), "TLSv1.3");
    assert!(is_made_id(field(fourth, "request_id")));

    // No access line in the error log, and no other line in the access log.
    assert!(lines
        .iter()
        .all(|l| field(l, "target") == "edgecache::access"));
    let errors = p.json_lines("error.log");
    assert!(errors
        .iter()
        .all(|l| field(l, "target") != "edgecache::access"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_renamed_log_files_and_sigusr2_changes_nothing() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/hit",
        Route::ok("cached").header("cache-control", "max-age=600"),
    );
    let p = start(
        "access = \"logs/access.log\"\nerror = \"error.log\"\nformat = \"json\"\n",
        "",
        &site(&origin, "site.test", ""),
        &[],
    )
    .await;
    assert_eq!(get(p.http, "site.test", "/hit").await.status, 200);
    access_lines(&p, "logs/access.log", 1).await;

    // logrotate: rename, then signal.
    std::fs::rename(p.path("logs/access.log"), p.path("logs/access.log.1")).expect("mv");
    std::fs::rename(p.path("error.log"), p.path("error.log.1")).expect("mv");
    p.signal("USR1");
    let reopened = eventually(Duration::from_secs(10), || {
        p.json_lines("error.log")
            .iter()
            .any(|l| field(l, "message") == "SIGUSR1: log files reopened")
    })
    .await;
    assert!(reopened, "{:?}", p.json_lines("error.log.1"));
    let old = p.json_lines("logs/access.log.1").len();
    assert_eq!(old, 1);

    assert_eq!(get(p.http, "site.test", "/hit").await.status, 200);
    let lines = access_lines(&p, "logs/access.log", 1).await;
    assert_eq!(field(&lines[0], "cache"), "hit");
    assert_eq!(
        p.json_lines("logs/access.log.1").len(),
        old,
        "the old file stopped growing"
    );

    // SIGUSR2: logged, the process serves on from its cache.
    p.signal("USR2");
    let logged = eventually(Duration::from_secs(10), || {
        p.json_lines("error.log")
            .iter()
            .any(|l| field(l, "message").starts_with("SIGUSR2 ignored"))
    })
    .await;
    assert!(logged);
    let r = get(p.http, "site.test", "/hit").await;
    assert_eq!(&r.body[..], b"cached");
    assert_eq!(origin.count("/hit"), 1, "the cache survived both signals");
    assert!(
        !p.json_lines("error.log.1")
            .iter()
            .any(|l| field(l, "message").starts_with("SIGUSR")),
        "error lines after the signal go to the new file"
    );
}

/// The access log is buffered (a second at most); SIGTERM writes what it holds before exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_buffered_at_sigterm_are_written_before_exit() {
    let origin = TestOrigin::start().await;
    origin.route("/a", Route::ok("a"));
    let mut p = start(
        "access = \"access.log\"\nerror = \"error.log\"\nformat = \"json\"\n",
        "",
        &site(&origin, "site.test", ""),
        &[],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(p.http, "site.test", "/a").await.status, 200);
    }
    p.signal("TERM");
    let exited = eventually(Duration::from_secs(20), || {
        matches!(p.child.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(exited);
    assert_eq!(p.json_lines("access.log").len(), 5);
}

/// A purge line used to carry `target` twice in JSON: the event's target and a field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_have_no_duplicate_keys_purge_included() {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("p").header("cache-control", "max-age=60"));
    // `--log-format json` over a text [log] format: the flag still works.
    let p = start(
        "access = \"access.log\"\nerror = \"error.log\"\nformat = \"text\"\n",
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n{}",
            site(&origin, "site.test", "")
        ),
        &["--log-format", "json"],
    )
    .await;
    assert_eq!(get(p.http, "site.test", "/p").await.status, 200);
    let admin = p.admin.expect("admin address");
    let body = r#"{"all":true}"#;
    let (reply, _) = raw(
        admin,
        format!(
            "POST /purge HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer s3cret\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(reply.contains("\"purged\":1"), "{reply}");
    let purged = eventually(Duration::from_secs(10), || {
        p.json_lines("error.log")
            .iter()
            .any(|l| field(l, "message") == "purge")
    })
    .await;
    assert!(purged);
    // json_lines refuses duplicate keys: every line of both files parses.
    let purge = p
        .json_lines("error.log")
        .into_iter()
        .find(|l| field(l, "message") == "purge")
        .expect("purge line");
    assert_eq!(field(&purge, "target"), "edgecache::admin");
    assert_eq!(field(&purge, "purge"), "All");
    assert_eq!(access_lines(&p, "access.log", 1).await.len(), 1);
}

#[test]
fn a_log_file_that_cannot_be_opened_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    std::fs::write(
        &path,
        "[server]\nhttp = [\"127.0.0.1:0\"]\n[log]\naccess = \"missing/dir/access.log\"\n\
         [[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n[[sites]]\nhosts = [\"x\"]\norigin = \"a\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = dir.path().join("missing/dir/access.log");
    assert!(
        err.starts_with(&format!(
            "edgecache: open access log {}: No such file or directory",
            file.display()
        )),
        "{err}"
    );
    // `check` opens no file: it accepts the configuration.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    assert!(out.status.success());
}

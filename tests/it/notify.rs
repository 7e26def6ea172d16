//! systemd's readiness protocol through the real binary: `NOTIFY_SOCKET` names a datagram
//! socket the test binds, as systemd does for a `Type=notify` service.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

/// An `edgecache run` process told to notify `socket`, killed on drop.
struct Service {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start(config: &std::path::Path, socket: &std::path::Path) -> Service {
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgecache");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                kept.lock().expect("lock").push(line);
            }
        });
        Service { child, lines }
    }

    /// The address of the "listening for HTTP" log line (logged before `READY=1`).
    fn http(&self) -> SocketAddr {
        // The line was written before READY=1, but the thread reading stderr may not have
        // taken it in yet: poll with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let line = loop {
            let found = self
                .lines
                .lock()
                .expect("lock")
                .iter()
                .find(|l| l.contains("listening for HTTP"))
                .cloned();
            match found {
                Some(l) => break l,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                None => panic!("a listening line before READY=1"),
            }
        };
        let addr = line.split("addr=").nth(1).expect("addr=");
        let addr: String = addr
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse().expect("address")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    async fn exits_cleanly(&mut self) -> bool {
        let child = &mut self.child;
        eventually(
            Duration::from_secs(20),
            || matches!(child.try_wait(), Ok(Some(s)) if s.success()),
        )
        .await
    }
}

/// The next datagram on `socket`, within 30 s.
async fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), socket.recv(&mut buf))
        .await
        .expect("a notification within 30 s")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn config(dir: &std::path::Path, origin: &TestOrigin, extra: &str) -> std::path::PathBuf {
    let path = dir.join("edgecache.toml");
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\nworkers = 2\nshutdown_grace = \"5s\"\n{extra}\n{}",
        site(origin, "site.test", "")
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_serving_reloading_around_sighup_and_stopping_at_sigterm() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("home").header("cache-control", "max-age=60"));
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    let mut service = Service::start(&config(dir.path(), &origin, ""), &socket_path);

    assert_eq!(next(&socket).await, "READY=1\n");
    // Ready means serving: the port answers now, with no retry.
    let r = get(service.http(), "site.test", "/").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"home"[..]));

    service.signal("HUP");
    let reloading = next(&socket).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(&socket).await, "READY=1\n");

    service.signal("TERM");
    assert_eq!(next(&socket).await, "STOPPING=1\n");
    assert!(service.exits_cleanly().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_the_new_process_is_the_main_one_and_the_old_does_not_say_stopping() {
    let origin = TestOrigin::start().await;
    origin.route("/", Route::ok("home").header("cache-control", "max-age=60"));
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    let path = config(dir.path(), &origin, "upgrade_socket = \"upgrade.sock\"");
    let mut old = Service::start(&path, &socket_path);
    assert_eq!(next(&socket).await, "READY=1\n");

    let mut new = Service::start(&path, &socket_path);
    assert_eq!(
        next(&socket).await,
        format!("MAINPID={}\nREADY=1\n", new.child.id())
    );
    assert!(
        old.exits_cleanly().await,
        "the old process drains and exits"
    );
    assert_eq!(new.http(), old.http(), "the same port");
    let r = get(new.http(), "site.test", "/").await;
    assert_eq!(r.status.as_u16(), 200);

    // The next datagram is the new process's STOPPING=1: the old one sent none.
    new.signal("TERM");
    assert_eq!(next(&socket).await, "STOPPING=1\n");
    assert!(new.exits_cleanly().await);
}

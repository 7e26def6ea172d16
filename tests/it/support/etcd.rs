//! A real etcd (Debian's etcd-server, installed by scripts/install-tools) on two ephemeral
//! loopback ports with its own data directory, and a TCP relay that can cut one node off it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One etcd member; killed on drop.
pub struct TestEtcd {
    child: Option<Child>,
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
}

/// Two loopback ports free now (bound, then released); etcd may lose the race for them, so
/// `start` retries with new ones.
fn two_ports() -> (SocketAddr, SocketAddr) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (a.local_addr().expect("addr"), b.local_addr().expect("addr"))
}

impl TestEtcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> TestEtcd {
        if Command::new("etcd").arg("--version").output().is_err() {
            panic!(
                "etcd is not installed: the fleet tests run the real etcd; \
                 run scripts/install-tools (Debian etcd-server) or scripts/test"
            );
        }
        let mut last = String::new();
        for _ in 0..5 {
            let (client, peer) = two_ports();
            let mut etcd = TestEtcd {
                child: None,
                client,
                peer,
                dir: tempfile::Builder::new()
                    .prefix("etcd-test-")
                    .tempdir()
                    .expect("tempdir"),
            };
            etcd.spawn();
            if etcd.wait_healthy(Duration::from_secs(20)).await {
                return etcd;
            }
            last = etcd.log();
        }
        panic!("etcd did not start on ephemeral ports after 5 tries; its last log:\n{last}");
    }

    /// The client URL nodes connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// What etcd wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .env_remove("ETCD_NAME")
            .env_remove("ETCD_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    /// Polls etcd until it answers a request, it exits, or `limit` passes.
    async fn wait_healthy(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            let answered = async {
                let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
                c.get("health-probe", None).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), answered).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Kills etcd (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        assert!(
            self.wait_healthy(Duration::from_secs(20)).await,
            "etcd did not come back; its log:\n{}",
            self.log()
        );
    }

    /// Writes a key, then compacts etcd's history up to that write: every earlier revision
    /// is gone (a watch from one of them is refused). Returns the compaction revision.
    pub async fn compact(&self) -> i64 {
        let mut c = etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connect to etcd");
        let r = c.put("compact-probe", "x", None).await.expect("put");
        let rev = r.header().map_or(0, |h| h.revision());
        c.compact(rev, None).await.expect("compact");
        rev
    }

    /// A client of this etcd, for looking at the keys.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connect to etcd")
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay in front of etcd for one node: `cut` drops its connections and refuses new
/// ones (the node loses etcd while the others keep it), `heal` lets it through again.
pub struct Relay {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *cut_rx.borrow() {
                    continue; // dropped: refused
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { addr, cut, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

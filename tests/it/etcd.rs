//! Membership and purges through a real etcd (cluster::etcd), at library level: each "node"
//! is the etcd task with its own Membership and an `apply` that records the purges it gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgecache::cluster::etcd::{Etcd, EtcdPublisher, EtcdSettings, EtcdStatus};
use edgecache::cluster::{Member, Membership, Publish, Purge, Target};
use tokio::sync::watch;

use crate::support::etcd::{Relay, TestEtcd};
use crate::support::eventually;

const WAIT: Duration = Duration::from_secs(20);

struct FleetNode {
    id: &'static str,
    membership: Membership,
    applied: Arc<Mutex<Vec<(Purge, Instant)>>>,
    publisher: EtcdPublisher,
    status: Arc<EtcdStatus>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn address(id: &str) -> SocketAddr {
    let port = 7400 + id.bytes().next().map_or(0, u16::from);
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_node(endpoint: String, id: &'static str, lease_ttl: Duration) -> FleetNode {
    let (etcd, publisher) = Etcd::new(EtcdSettings {
        endpoints: vec![endpoint],
        name: "pop-test".into(),
        node: id.into(),
        advertise: address(id),
        lease_ttl,
    });
    let membership = Membership::new(Member {
        id: Arc::from(id),
        address: address(id),
        since: std::time::SystemTime::now(),
    });
    let applied: Arc<Mutex<Vec<(Purge, Instant)>>> = Arc::default();
    let record = applied.clone();
    let apply = Arc::new(move |p: Purge| {
        record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((p, Instant::now()));
    });
    let (stop, stop_rx) = watch::channel(false);
    let status = etcd.status();
    let task = tokio::spawn(etcd.run(membership.clone(), apply, stop_rx));
    FleetNode {
        id,
        membership,
        applied,
        publisher,
        status,
        stop,
        task: Some(task),
    }
}

impl FleetNode {
    fn members(&self) -> Vec<String> {
        self.membership
            .current()
            .iter()
            .map(|m| m.id.to_string())
            .collect()
    }

    fn applied(&self) -> Vec<Purge> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn applied_tag(&self, tag: &str) -> Option<Instant> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(p, _)| matches!(&p.target, Target::Tag { tag: t } if t == tag))
            .map(|(_, at)| *at)
    }

    fn purge_tag(&self, tag: &str) {
        self.publisher.publish(Purge {
            target: Target::Tag { tag: tag.into() },
            soft: false,
            node: self.id.into(),
        });
    }

    /// A clean stop: the task revokes its lease and returns.
    async fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the etcd task stops when told")
                .expect("the etcd task ends without panicking");
        }
    }
}

impl Drop for FleetNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn all_see(nodes: &[&FleetNode], expected: &[&str]) -> bool {
    let expected = ids(expected);
    eventually(WAIT, || nodes.iter().all(|n| n.members() == expected)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_seen_by_all_and_a_clean_stop_leaves_at_once() {
    let etcd = TestEtcd::start().await;
    // A lease far longer than the wait: only the revocation on a clean stop explains c
    // leaving within it.
    let ttl = Duration::from_secs(120);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let b = start_node(etcd.endpoint(), "b", ttl);
    let mut c = start_node(etcd.endpoint(), "c", ttl);
    assert!(
        all_see(&[&a, &b, &c], &["a", "b", "c"]).await,
        "members: a {:?} b {:?} c {:?}",
        a.members(),
        b.members(),
        c.members()
    );
    let seen = a.membership.current();
    assert_eq!(seen[1].address, address("b"), "b's advertised address");
    assert!(eventually(WAIT, || a.status.connected()).await);
    assert!(a.status.last_revision() > 0);

    // What an operator finds in etcd.
    let mut client = etcd.client().await;
    let got = client
        .get("/edgecache/pop-test/nodes/b", None)
        .await
        .expect("get");
    let value = got
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&value).expect("registration is JSON");
    assert_eq!(json["address"], "127.0.0.1:7498");
    assert!(
        json["version"].is_string() && json["started"].is_u64(),
        "{json}"
    );

    c.stop().await;
    assert!(
        all_see(&[&a, &b], &["a", "b"]).await,
        "c still listed: a {:?} b {:?}",
        a.members(),
        b.members()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_disappears_when_its_lease_expires() {
    let etcd = TestEtcd::start().await;
    let a = start_node(etcd.endpoint(), "a", Duration::from_secs(2));
    let mut b = start_node(etcd.endpoint(), "b", Duration::from_secs(2));
    assert!(all_see(&[&a, &b], &["a", "b"]).await, "{:?}", a.members());
    // Killed: no revocation, no more keep-alives.
    if let Some(task) = b.task.take() {
        task.abort();
    }
    assert!(
        eventually(WAIT, || a.members() == ids(&["a"])).await,
        "b still listed after its lease: {:?}",
        a.members()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_at_one_node_is_applied_at_the_others_p99_under_a_second() {
    let etcd = TestEtcd::start().await;
    let ttl = Duration::from_secs(10);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let b = start_node(etcd.endpoint(), "b", ttl);
    let c = start_node(etcd.endpoint(), "c", ttl);
    assert!(all_see(&[&a, &b, &c], &["a", "b", "c"]).await);
    assert!(eventually(WAIT, || [&a, &b, &c].iter().all(|n| n.status.connected())).await);

    let mut lags = Vec::new();
    for i in 0..100 {
        let tag = format!("t{i}");
        let sent = Instant::now();
        a.purge_tag(&tag);
        assert!(
            eventually(WAIT, || b.applied_tag(&tag).is_some()
                && c.applied_tag(&tag).is_some())
            .await,
            "purge {i} not applied at b and c"
        );
        for n in [&b, &c] {
            if let Some(at) = n.applied_tag(&tag) {
                lags.push(at.saturating_duration_since(sent));
            }
        }
    }
    lags.sort();
    let p99 = lags[lags.len() * 99 / 100 - 1];
    println!(
        "purge propagation over {} applications: p50 {:?}, p99 {:?}, max {:?}",
        lags.len(),
        lags[lags.len() / 2],
        p99,
        lags[lags.len() - 1]
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(
        a.applied().is_empty(),
        "a does not apply its own purges again"
    );
    assert_eq!(b.applied().len(), 100);
    assert_eq!(
        b.applied()[7],
        Purge {
            target: Target::Tag { tag: "t7".into() },
            soft: false,
            node: "a".into()
        },
        "the purge arrives as it was sent, in order"
    );
    assert_eq!(a.status.purges_sent(), 100);
    assert_eq!(c.status.purges_applied(), 100);
    assert_eq!(c.status.lag().count(), 100);
    assert!(c.status.last_lag().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_membership_and_a_purge_made_meanwhile_is_applied_after() {
    let mut etcd = TestEtcd::start().await;
    let ttl = Duration::from_secs(5);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let b = start_node(etcd.endpoint(), "b", ttl);
    assert!(all_see(&[&a, &b], &["a", "b"]).await);
    assert!(eventually(WAIT, || a.status.connected() && b.status.connected()).await);

    etcd.stop();
    assert!(
        eventually(WAIT, || !a.status.connected() && !b.status.connected()).await,
        "the status says disconnected"
    );
    assert!(a.status.errors() > 0);
    assert_eq!(a.members(), ids(&["a", "b"]), "the last membership is kept");
    assert_eq!(b.members(), ids(&["a", "b"]));
    a.purge_tag("during-the-gap");

    etcd.restart().await;
    assert!(
        eventually(WAIT, || b.applied_tag("during-the-gap").is_some()).await,
        "the purge queued at a is applied at b after etcd is back: {:?}",
        b.applied()
    );
    assert!(eventually(WAIT, || a.status.connected() && b.status.connected()).await);
    assert!(all_see(&[&a, &b], &["a", "b"]).await);
    // Membership resumes: a new node is seen.
    let c = start_node(etcd.endpoint(), "c", ttl);
    assert!(all_see(&[&a, &b, &c], &["a", "b", "c"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_replays_the_purges_it_missed_from_its_revision() {
    let etcd = TestEtcd::start().await;
    let relay = Relay::start(etcd.client_addr()).await;
    let ttl = Duration::from_secs(30);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let b = start_node(etcd.endpoint(), "b", ttl);
    let c = start_node(relay.endpoint(), "c", ttl);
    assert!(all_see(&[&a, &b, &c], &["a", "b", "c"]).await);
    assert!(eventually(WAIT, || c.status.connected()).await);

    relay.cut();
    assert!(eventually(WAIT, || !c.status.connected()).await);
    for i in 0..5 {
        a.purge_tag(&format!("missed{i}"));
    }
    assert!(eventually(WAIT, || b.applied().len() == 5).await);
    assert!(c.applied().is_empty(), "c cannot hear them yet");

    relay.heal();
    assert!(
        eventually(WAIT, || c.applied().len() == 5).await,
        "c replays what it missed: {:?}",
        c.applied()
    );
    assert_eq!(c.applied(), b.applied(), "same purges, same order");
    assert_eq!(
        c.status.full_purges(),
        0,
        "nothing compacted: no purge of all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_compacted_during_a_gap_soft_purges_everything() {
    let etcd = TestEtcd::start().await;
    let relay = Relay::start(etcd.client_addr()).await;
    let ttl = Duration::from_secs(30);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let c = start_node(relay.endpoint(), "c", ttl);
    assert!(all_see(&[&a, &c], &["a", "c"]).await);
    assert!(eventually(WAIT, || c.status.connected()).await);

    relay.cut();
    assert!(eventually(WAIT, || !c.status.connected()).await);
    a.purge_tag("lost-to-compaction");
    assert!(eventually(WAIT, || a.status.purges_sent() == 1).await);
    etcd.compact().await;

    relay.heal();
    let everything = Purge {
        target: Target::All,
        soft: true,
        node: "c".into(),
    };
    assert!(
        eventually(WAIT, || c.applied().contains(&everything)).await,
        "c soft-purges everything: {:?}",
        c.applied()
    );
    assert_eq!(c.status.full_purges(), 1);
    assert!(eventually(WAIT, || c.status.connected()).await);
    // And it follows purges again from now on.
    a.purge_tag("after");
    assert!(eventually(WAIT, || c.applied_tag("after").is_some()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_granted_again_and_the_node_registers_again() {
    let etcd = TestEtcd::start().await;
    let ttl = Duration::from_secs(3);
    let a = start_node(etcd.endpoint(), "a", ttl);
    let b = start_node(etcd.endpoint(), "b", ttl);
    assert!(all_see(&[&a, &b], &["a", "b"]).await);

    // As if etcd had expired them: every lease revoked, both keys deleted.
    let mut client = etcd.client().await;
    let leases = client.leases().await.expect("list leases");
    for lease in leases.leases() {
        client.lease_revoke(lease.id()).await.expect("revoke");
    }
    let registered = |client: &mut etcd_client::Client| {
        let mut client = client.clone();
        async move {
            client
                .get(
                    "/edgecache/pop-test/nodes/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .map_or(0, |r| r.count())
        }
    };
    let deadline = Instant::now() + WAIT;
    while registered(&mut client).await < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registered(&mut client).await, 2, "both registered again");
    assert!(all_see(&[&a, &b], &["a", "b"]).await);
}

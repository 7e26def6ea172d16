//! A fleet of three real nodes in this process with static peers (and with `peers_dns`):
//! one origin request per object fleet-wide, collapsing across nodes, a stopped member's
//! keys fetched from the origin without client errors, purges everywhere, `CDN-Loop`, and a
//! seeded randomised run checked against what every client must get.

use std::net::SocketAddr;
use std::time::Duration;

use edgecache::Config;

use crate::support::*;

/// Three nodes of one fleet, each with an admin listener (token `t`).
struct Fleet {
    nodes: Vec<Option<TestNode>>,
    peers: Vec<SocketAddr>,
}

impl Fleet {
    /// Three nodes over `origin` (site `a.test`), `[cluster]` lines `extra` added to each.
    async fn start(origin: &TestOrigin, extra: &str) -> Fleet {
        // Peers need each other's addresses before they start: ports are picked free, and
        // picked again if one was taken in between.
        for _ in 0..5 {
            let peers: Vec<SocketAddr> = (0..3).map(|_| closed_port()).collect();
            let list = peers
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let mut nodes = Vec::new();
            for (i, p) in peers.iter().enumerate() {
                let cluster =
                    format!("[cluster]\nname = \"pop\"\nnode = \"n{i}\"\nlisten = \"{p}\"\npeers = [{list}]\n{extra}\n");
                match start_node(origin, &cluster).await {
                    Some(n) => nodes.push(Some(n)),
                    None => break,
                }
            }
            if nodes.len() == 3 {
                return Fleet { nodes, peers };
            }
        }
        panic!("could not start three nodes on free ports");
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].as_ref().expect("node running").http
    }

    fn node(&self, i: usize) -> &TestNode {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Shuts node `i` down (its listeners close; the others find its peer listener gone).
    async fn stop(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            if let Some(node) = n.node.take() {
                node.shutdown().await;
            }
        }
    }
}

/// A node for `a.test` with `cluster` (TOML); `None` when a listener could not be bound.
async fn start_node(origin: &TestOrigin, cluster: &str) -> Option<TestNode> {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\n\n{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n\n{cluster}",
        site(origin, "a.test", "")
    );
    let config = Config::from_toml(&text, "test.toml", dir.path())
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
    let node = edgecache::start(config).await.ok()?;
    Some(TestNode {
        http: node.http_addrs()[0],
        https: None,
        node: Some(node),
        dir,
    })
}

fn cacheable(origin: &TestOrigin, path: &str, body: &'static str) {
    origin.route(
        path,
        Route::ok(body).header("cache-control", "max-age=3600"),
    );
}

#[tokio::test]
async fn each_object_reaches_the_origin_once_for_the_whole_fleet() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "").await;
    let paths: Vec<String> = (0..60).map(|i| format!("/obj/{i}")).collect();
    for p in &paths {
        let body: &'static str = Box::leak(format!("body of {p}").into_boxed_str());
        cacheable(&origin, p, body);
    }
    for p in &paths {
        for i in 0..3 {
            let got = get(fleet.addr(i), "a.test", p).await;
            assert_eq!(got.status, 200, "{p} at node {i}: {got:?}");
            assert_eq!(got.body, format!("body of {p}"), "{p} at node {i}");
        }
    }
    assert_eq!(origin.total(), 60, "one origin request per object");
    // Requests answered through a peer name the owner in Cache-Status and say fwd=peer.
    let mut via_peer = 0;
    for p in &paths {
        for i in 0..3 {
            let got = get(fleet.addr(i), "a.test", p).await;
            let status = got.header("cache-status").unwrap_or_default().to_owned();
            if status.contains("fwd=peer") {
                via_peer += 1;
                assert!(
                    status.starts_with('n') && status.contains("; hit, edgecache; fwd=peer"),
                    "{status}"
                );
            } else {
                assert_eq!(status, "edgecache; hit", "{p} at node {i}");
            }
        }
    }
    assert_eq!(origin.total(), 60, "second pass: no origin request");
    // Without hot copies each object is held by its owner alone: two of three requests
    // went through a peer.
    assert_eq!(via_peer, 120);
}

#[tokio::test]
async fn concurrent_requests_for_one_cold_object_make_one_origin_request() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "").await;
    origin.route(
        "/cold",
        Route::ok("cold body")
            .header("cache-control", "max-age=3600")
            .delay(Duration::from_millis(300)),
    );
    let mut tasks = Vec::new();
    for n in 0..300 {
        let addr = fleet.addr(n % 3);
        tasks.push(tokio::spawn(
            async move { get(addr, "a.test", "/cold").await },
        ));
    }
    for t in tasks {
        let got = t.await.expect("task");
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "cold body");
    }
    assert_eq!(origin.count("/cold"), 1);
}

#[tokio::test]
async fn a_stopped_member_is_skipped_and_its_keys_come_from_the_origin() {
    let origin = TestOrigin::start().await;
    let mut fleet = Fleet::start(&origin, "peer_timeout = \"1s\"").await;
    let paths: Vec<String> = (0..30).map(|i| format!("/s/{i}")).collect();
    for p in &paths {
        let body: &'static str = Box::leak(format!("body of {p}").into_boxed_str());
        cacheable(&origin, p, body);
    }
    fleet.stop(2).await;
    // A request loop at the two nodes left: every answer right, no error.
    for round in 0..3 {
        for p in &paths {
            for i in 0..2 {
                let got = get(fleet.addr(i), "a.test", p).await;
                assert_eq!(got.status, 200, "round {round}, {p} at node {i}: {got:?}");
                assert_eq!(got.body, format!("body of {p}"));
            }
        }
    }
    // Each object was fetched once by its live owner; objects the stopped node owned, by
    // whichever live node asked first for it (at most once per node).
    assert!(
        origin.total() >= 30 && origin.total() <= 60,
        "{}",
        origin.total()
    );
    let cluster = admin_get(fleet.node(0), "/cluster").await;
    assert!(cluster.contains("\"ejected\""), "{cluster}");
}

#[tokio::test]
async fn a_purge_at_one_node_is_in_force_at_all() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "hot_copies = true").await;
    cacheable(&origin, "/p", "version 1");
    for i in 0..3 {
        assert_eq!(get(fleet.addr(i), "a.test", "/p").await.body, "version 1");
    }
    assert_eq!(origin.count("/p"), 1);
    cacheable(&origin, "/p", "version 2");
    let reply = admin_post(fleet.node(1), "/purge", r#"{"url": "http://a.test/p"}"#).await;
    assert!(reply.contains("\"peers\""), "{reply}");
    for p in fleet.peers.iter().filter(|p| **p != fleet.peers[1]) {
        assert!(reply.contains(&format!("\"{p}\":\"ok\"")), "{reply}");
    }
    for i in 0..3 {
        assert_eq!(
            get(fleet.addr(i), "a.test", "/p").await.body,
            "version 2",
            "node {i} after the purge returned"
        );
    }
}

#[tokio::test]
async fn a_request_that_passed_through_the_fleet_is_never_sent_to_a_peer() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "").await;
    for n in 0..12 {
        cacheable(&origin, &format!("/l/{n}"), "looped");
    }
    for n in 0..12 {
        let path = format!("/l/{n}");
        let req = request(
            "GET",
            "a.test",
            &path,
            &[("cdn-loop", "edgecache; node=0000000000000000; fleet=pop")],
        );
        let got = send(fleet.addr(0), req).await;
        assert_eq!(got.status, 200);
        let status = got.header("cache-status").unwrap_or_default();
        assert!(!status.contains("fwd=peer"), "{path}: {status}");
        assert_eq!(origin.count(&path), 1);
    }
    let cluster = admin_get(fleet.node(0), "/cluster").await;
    assert!(!cluster.contains("\"requests\":1"), "{cluster}");
}

/// `POST path` on the admin listener with the token; the whole response as text.
async fn admin_post(node: &TestNode, path: &str, body: &str) -> String {
    let admin = node.node().admin_addr().expect("admin listener configured");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(admin, req.as_bytes(), Duration::from_secs(10)).await.0
}

/// A member that accepts connections and never answers.
async fn silent_peer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_member_that_times_out_is_ejected_and_the_origin_asked() {
    let origin = TestOrigin::start().await;
    let (silent, task) = silent_peer().await;
    let mut started = None;
    for _ in 0..5 {
        let peers = [closed_port(), closed_port(), silent];
        let list = peers
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, p) in peers[..2].iter().enumerate() {
            let cluster = format!(
                "[cluster]\nname = \"pop\"\nnode = \"n{i}\"\nlisten = \"{p}\"\npeers = [{list}]\npeer_timeout = \"300ms\"\n"
            );
            match start_node(&origin, &cluster).await {
                Some(n) => nodes.push(n),
                None => break,
            }
        }
        if nodes.len() == 2 {
            started = Some(nodes);
            break;
        }
    }
    let nodes = started.expect("two nodes on free ports");
    let paths: Vec<String> = (0..30).map(|i| format!("/t/{i}")).collect();
    for p in &paths {
        let body: &'static str = Box::leak(format!("body of {p}").into_boxed_str());
        cacheable(&origin, p, body);
    }
    for p in &paths {
        for n in &nodes {
            let got = get(n.http, "a.test", p).await;
            assert_eq!(got.status, 200, "{p}: {got:?}");
            assert_eq!(got.body, format!("body of {p}"));
        }
    }
    let timeouts = metric(
        &nodes[0],
        "edgecache_peer_requests_total{result=\"timeout\"}",
    )
    .await;
    assert!(timeouts >= 1, "the silent member was asked and timed out");
    let cluster = admin_get(&nodes[0], "/cluster").await;
    let json: serde_json::Value =
        serde_json::from_str(cluster.split("\r\n\r\n").nth(1).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {cluster}"));
    let silent_id = silent.to_string();
    let member = json["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == silent_id.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{silent_id} not in {json}"));
    assert_eq!(member["state"], "ejected", "{json}");
    assert_eq!(json["node"], "n0");
    assert_eq!(json["discovery"], "peers");
    assert!(
        json["peers"][&silent_id]["errors"].as_u64() >= Some(1),
        "{json}"
    );
    task.abort();
}

#[tokio::test]
async fn members_from_dns_fill_from_each_other() {
    let ips = [
        std::net::Ipv4Addr::new(127, 0, 0, 1),
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        std::net::Ipv4Addr::new(127, 0, 0, 3),
    ];
    let dns = TestDns::start(&ips, 1).await;
    let origin = TestOrigin::start().await;
    let mut started = None;
    for _ in 0..5 {
        let port = closed_port().port();
        let mut nodes = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let cluster = format!(
                "[dns]\nservers = [\"{}\"]\nmin_ttl = \"1s\"\n\n[cluster]\nname = \"pop\"\nnode = \"d{i}\"\nlisten = \"{ip}:{port}\"\npeers_dns = \"peers.test:{port}\"\n",
                dns.addr
            );
            match start_node(&origin, &cluster).await {
                Some(n) => nodes.push(n),
                None => break,
            }
        }
        if nodes.len() == 3 {
            started = Some(nodes);
            break;
        }
    }
    let nodes = started.expect("three nodes on one free port");
    // Each node has resolved the name into three members.
    for n in &nodes {
        let mut members = 0;
        for _ in 0..200 {
            members = metric(n, "edgecache_cluster_members").await;
            if members == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(members, 3);
    }
    let paths: Vec<String> = (0..60).map(|i| format!("/d/{i}")).collect();
    for p in &paths {
        let body: &'static str = Box::leak(format!("body of {p}").into_boxed_str());
        cacheable(&origin, p, body);
    }
    for p in &paths {
        for n in &nodes {
            let got = get(n.http, "a.test", p).await;
            assert_eq!(got.status, 200);
            assert_eq!(got.body, format!("body of {p}"));
        }
    }
    assert_eq!(origin.total(), 60, "one origin request per object");
    // A member gone from the records leaves the fleet as the answer expires.
    dns.set(&ips[..2]);
    let mut members = 3;
    for _ in 0..300 {
        members = metric(&nodes[0], "edgecache_cluster_members").await;
        if members == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(members, 2);
    assert!(metric(&nodes[0], "edgecache_cluster_membership_changes_total").await >= 2);
}

/// SplitMix64: the randomised test's generator, seeded so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random requests for random keys at random nodes, batches of them at once, with purges
/// (hard and soft, at random nodes) between batches: every answer is the key's own body at
/// its current version, never another key's, never a version purged before the request.
#[tokio::test]
async fn random_requests_and_purges_match_the_oracle() {
    for seed in [7u64, 1_234_567] {
        for hot in [false, true] {
            random_run(seed, hot).await;
        }
    }
}

async fn random_run(seed: u64, hot: bool) {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, &format!("hot_copies = {hot}")).await;
    let mut rng = Rng(seed);
    let keys = 16;
    let mut version = vec![0usize; keys];
    let body = |k: usize, v: usize| -> &'static str {
        Box::leak(format!("key {k} version {v}").into_boxed_str())
    };
    for (k, v) in version.iter().enumerate() {
        cacheable(&origin, &format!("/r/{k}"), body(k, *v));
    }
    for round in 0..12 {
        let mut batch = Vec::new();
        for _ in 0..24 {
            let (k, node) = (rng.below(keys), rng.below(3));
            let addr = fleet.addr(node);
            let expected = body(k, version[k]);
            batch.push(tokio::spawn(async move {
                let got = get(addr, "a.test", &format!("/r/{k}")).await;
                (k, node, expected, got)
            }));
        }
        for t in batch {
            let (k, node, expected, got) = t.await.expect("task");
            assert_eq!(
                got.status, 200,
                "seed {seed} hot {hot} round {round}: key {k} at {node}"
            );
            assert_eq!(
                got.body,
                expected,
                "seed {seed} hot {hot} round {round}: key {k} at node {node}: {:?}",
                got.header("cache-status")
            );
        }
        // A purge of one or two keys at a random node; it has returned before anything
        // else is asked.
        for _ in 0..1 + rng.below(2) {
            let (k, node) = (rng.below(keys), rng.below(3));
            version[k] += 1;
            cacheable(&origin, &format!("/r/{k}"), body(k, version[k]));
            let soft = rng.below(2) == 0;
            let reply = admin_post(
                fleet.node(node),
                "/purge",
                &format!(r#"{{"url": "http://a.test/r/{k}", "soft": {soft}}}"#),
            )
            .await;
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            assert!(!reply.contains("error"), "{reply}");
        }
    }
}

#[tokio::test]
async fn ranges_through_a_peer_are_cut_by_the_owner() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "").await;
    let body: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body: &'static str = Box::leak(body.into_boxed_str());
    for n in 0..6 {
        cacheable(&origin, &format!("/range/{n}"), body);
    }
    for n in 0..6 {
        let path = format!("/range/{n}");
        for i in 0..3 {
            let got = send(
                fleet.addr(i),
                request("GET", "a.test", &path, &[("range", "bytes=10-19")]),
            )
            .await;
            assert_eq!(got.status, 206, "{path} at {i}: {got:?}");
            assert_eq!(got.body, body[10..20], "{path} at {i}");
            assert_eq!(got.header("content-range"), Some("bytes 10-19/200"));
        }
    }
    assert_eq!(origin.total(), 6, "one origin request per object");
}

#[tokio::test]
async fn hot_copies_keep_what_a_non_owner_serves_often() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "hot_copies = true").await;
    for n in 0..9 {
        cacheable(&origin, &format!("/hot/{n}"), "hot body");
    }
    let mut kept = 0;
    for n in 0..9 {
        let path = format!("/hot/{n}");
        for i in 0..3 {
            let first = get(fleet.addr(i), "a.test", &path).await;
            let status = first.header("cache-status").unwrap_or_default().to_owned();
            if !status.contains("fwd=peer") {
                continue;
            }
            // A non-owner: the second fetch from the peer keeps a copy, the third is a hit
            // here (the owner's member still shown before ours).
            let second = get(fleet.addr(i), "a.test", &path).await;
            assert!(
                second
                    .header("cache-status")
                    .unwrap_or_default()
                    .contains("fwd=peer; stored"),
                "{second:?}"
            );
            let third = get(fleet.addr(i), "a.test", &path).await;
            let status = third.header("cache-status").unwrap_or_default();
            assert!(status.ends_with(", edgecache; hit"), "{status}");
            assert_eq!(third.body, "hot body");
            kept += 1;
        }
    }
    assert_eq!(kept, 18, "two non-owners per object");
    assert_eq!(origin.total(), 9);
}

#[tokio::test]
async fn the_peer_listener_believes_members_only() {
    let origin = TestOrigin::start().await;
    let fleet = Fleet::start(&origin, "").await;
    origin.route("/who", Route::ok("who").header("cache-control", "no-store"));
    // From an address that is no member's (127.0.0.5), straight to a peer listener: the
    // forwarding field it sends is not passed on as if a member had vouched for it.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.5:0".parse().expect("addr"))
        .expect("bind 127.0.0.5");
    let stream = socket.connect(fleet.peers[0]).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let got = read(
        sender
            .send_request(request(
                "GET",
                "a.test",
                "/who",
                &[("x-forwarded-for", "203.0.113.9")],
            ))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!(got.status, 200);
    let seen = origin.last_headers("/who");
    assert_eq!(
        seen.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        Some("127.0.0.5")
    );
    // A purge from there is refused, and nothing is purged.
    cacheable(&origin, "/kept", "kept");
    assert_eq!(get(fleet.addr(0), "a.test", "/kept").await.body, "kept");
    let body = r#"{"target":{"kind":"all"},"soft":false,"node":"intruder"}"#;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.5:0".parse().expect("addr"))
        .expect("bind 127.0.0.5");
    let mut stream = socket.connect(fleet.peers[0]).await.expect("connect");
    let req = format!(
        "POST /.edgecache/purge HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut reply = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    for i in 0..3 {
        assert_eq!(get(fleet.addr(i), "a.test", "/kept").await.body, "kept");
    }
    assert_eq!(origin.count("/kept"), 1, "still stored at its owner");
}

/// The member ids `/cluster` lists at `node`.
async fn members(node: &TestNode) -> Vec<String> {
    let reply = admin_get(node, "/cluster").await;
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let mut ids: Vec<String> = v["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Three real nodes finding each other through a real etcd: one origin request per object
/// fleet-wide, a purge at one node in force at all (through etcd's watch), a stopped node
/// gone from the others' member lists, and `/cluster` and `/metrics` saying so.
#[tokio::test]
async fn a_fleet_found_through_etcd_fills_once_and_purges_everywhere() {
    let etcd = crate::support::etcd::TestEtcd::start().await;
    let origin = TestOrigin::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let cluster = format!(
            "[cluster]\nname = \"pop\"\nnode = \"e{i}\"\nlisten = \"127.0.0.1:0\"\n\
             etcd = [\"{}\"]\nlease_ttl = \"2s\"\n",
            etcd.endpoint()
        );
        nodes.push(Some(start_node(&origin, &cluster).await.expect("node")));
    }
    let all = ["e0", "e1", "e2"].map(str::to_owned).to_vec();
    for n in nodes.iter().flatten() {
        assert!(
            until(Duration::from_secs(10), || async {
                members(n).await == all
            })
            .await,
            "every node sees the three: {:?}",
            members(n).await
        );
    }
    let paths: Vec<String> = (0..60).map(|i| format!("/etcd/{i}")).collect();
    for p in &paths {
        let body: &'static str = Box::leak(format!("body of {p}").into_boxed_str());
        cacheable(&origin, p, body);
    }
    for p in &paths {
        for n in nodes.iter().flatten() {
            let got = get(n.http, "a.test", p).await;
            assert_eq!(got.body, format!("body of {p}"));
        }
    }
    assert_eq!(origin.total(), 60, "one origin request per object");

    // A purge at one node: in force at every node, through etcd, within a second.
    cacheable(&origin, "/p", "version 1");
    for n in nodes.iter().flatten() {
        // hot copies off: the owner holds it; every node answers through it.
        assert_eq!(get(n.http, "a.test", "/p").await.body, "version 1");
    }
    cacheable(&origin, "/p", "version 2");
    let purger = nodes[1].as_ref().expect("running");
    let reply = admin_post(purger, "/purge", r#"{"url": "http://a.test/p"}"#).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    for n in nodes.iter().flatten() {
        assert!(
            until(Duration::from_secs(1), || async {
                get(n.http, "a.test", "/p").await.body == "version 2"
            })
            .await,
            "the purge reached every node within a second"
        );
    }
    let cluster = admin_get(purger, "/cluster").await;
    assert!(cluster.contains("\"connected\":true"), "{cluster}");
    assert!(metric(purger, "edgecache_etcd_connected").await == 1);

    // A node that stops leaves the others' member lists (its lease is revoked).
    let mut stopped = nodes[2].take().expect("running");
    if let Some(n) = stopped.node.take() {
        n.shutdown().await;
    }
    let two = ["e0", "e1"].map(str::to_owned).to_vec();
    for n in nodes.iter().flatten() {
        assert!(
            until(Duration::from_secs(10), || async {
                members(n).await == two
            })
            .await,
            "{:?}",
            members(n).await
        );
    }
    // Its keys now come from the origin or the remaining owners; no client error.
    for p in &paths {
        for n in nodes.iter().flatten() {
            assert_eq!(get(n.http, "a.test", p).await.status, 200);
        }
    }
}

/// A binary upgrade (`server.upgrade_socket`) hands the peer listener over with the others:
/// the new process starts on the same peer address while the old one still holds it.
#[tokio::test]
async fn an_upgrade_takes_the_peer_listener_over() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = closed_port();
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\nupgrade_socket = \"{}\"\n\n{}\n\
         [cluster]\nname = \"pop\"\nnode = \"u0\"\nlisten = \"{peer}\"\npeers = [\"{peer}\"]\n",
        dir.path().join("upgrade.sock").display(),
        site(&origin, "a.test", "")
    );
    let load = || Config::from_toml(&text, "test.toml", dir.path()).expect("config");
    let old = edgecache::start(load()).await.expect("old node");
    let socket = dir.path().join("upgrade.sock");
    assert!(
        until(Duration::from_secs(10), || async { socket.exists() }).await,
        "the old node offers its listeners"
    );
    let new = edgecache::start(load())
        .await
        .expect("the new process takes the peer listener over");
    tokio::time::timeout(Duration::from_secs(10), old.handed_over())
        .await
        .expect("the old node is told it handed over");
    old.shutdown().await;
    cacheable(&origin, "/u", "upgraded");
    let got = get(new.http_addrs()[0], "a.test", "/u").await;
    assert_eq!(got.body, "upgraded");
    // The peer listener answers in the new process.
    assert!(std::net::TcpStream::connect(peer).is_ok());
    new.shutdown().await;
}

//! Seeing inside a running node: `GET /status`, `edgecache --version`, the build-info and
//! latency series of `/metrics`, `GET /cache?url=` and `GET /cache/stats`, the token in
//! front of them, and `/readyz` as soon as shutdown begins.

use std::process::Command;
use std::time::Duration;

use edgecache::Config;

use crate::support::*;

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n";

/// The JSON body of an admin response, and its status code.
async fn admin_json(node: &TestNode, path: &str) -> (u16, serde_json::Value) {
    let text = admin_get(node, path).await;
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
    (status, json)
}

/// A node started from a configuration file in its own directory (so `/status` has a path
/// and a hash, and a reload can read the file again).
async fn node_from_file(text: &str) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let node = edgecache::start(config).await.expect("start node");
    TestNode {
        http: node.http_addrs()[0],
        https: None,
        node: Some(node),
        dir,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The commit `git` names for the source tree, when it is a git checkout.
fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn version_names_the_package_commit_and_profile() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgecache"))
        .arg("--version")
        .output()
        .expect("run edgecache --version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.trim();
    let rest = line
        .strip_prefix(concat!(
            "edgecache ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .unwrap_or_else(|| panic!("{line}"));
    let (commit, profile) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", "))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(["debug", "release"].contains(&profile), "{line}");
    match git_commit() {
        Some(git) => assert_eq!(commit, git, "{line}"),
        None => assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_alphanumeric()),
            "{line}"
        ),
    }
}

#[tokio::test]
async fn status_reports_build_configuration_cache_origins_and_listeners() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a",
        Route::ok("hello").header("Cache-Control", "max-age=60"),
    );
    let body = format!("{}{ADMIN}", site(&origin, "site.test", ""));
    let text = format!("[server]\nhttp = [\"127.0.0.1:0\"]\n{body}");
    let node = node_from_file(&text).await;
    let path = node.dir.path().join("edgecache.toml");
    assert_eq!(get(node.http, "site.test", "/a").await.status, 200);

    let (status, s) = admin_json(&node, "/status").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["commit"].as_str().is_some_and(|c| !c.is_empty()), "{s}");
    if let Some(git) = git_commit() {
        assert_eq!(s["commit"], git.as_str());
    }
    assert!(["debug", "release"].contains(&s["profile"].as_str().unwrap_or("")));
    assert!(s["uptime_seconds"].as_u64().is_some(), "{s}");
    assert!(
        httpdate::parse_http_date(s["started_at"].as_str().unwrap_or("")).is_ok(),
        "{s}"
    );
    assert_eq!(s["draining"], false);
    let config = &s["config"];
    assert_eq!(config["path"], path.display().to_string().as_str());
    assert_eq!(config["sha256"], sha256_hex(text.as_bytes()).as_str());
    assert_eq!(config["generation"], 1);
    assert_eq!(s["cache"]["objects"], 1, "{s}");
    assert!(s["cache"]["bytes"].as_u64().unwrap_or(0) > 5, "{s}");
    assert_eq!(s["cache"]["capacity"], 256u64 << 20, "{s}");
    assert_eq!(s["origins"]["total"], 1);
    assert_eq!(s["origins"]["up"], 1);
    assert_eq!(s["origins"]["down"], 0);
    let listeners = s["listeners"].as_array().cloned().unwrap_or_default();
    let admin = node.node().admin_addr().expect("admin").to_string();
    assert!(listeners
        .iter()
        .any(|l| l["kind"] == "http" && l["addr"] == node.http.to_string().as_str()));
    assert!(listeners
        .iter()
        .any(|l| l["kind"] == "admin" && l["addr"] == admin.as_str()));

    // A reload swaps in the edited file: its hash, a later load time, the next generation.
    let edited = format!("{text}\n# edited\n");
    std::fs::write(&path, &edited).expect("edit config");
    let reloader = node.node().reloader();
    tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .expect("reload task")
        .expect("reload");
    let (_, after) = admin_json(&node, "/status").await;
    assert_eq!(
        after["config"]["sha256"],
        sha256_hex(edited.as_bytes()).as_str()
    );
    assert_eq!(after["config"]["generation"], 2);
    assert_eq!(after["config"]["reloads"]["ok"], 1);
    assert!(
        after["config"]["loaded_at_unix"].as_u64() >= s["config"]["loaded_at_unix"].as_u64(),
        "{after}"
    );
}

#[tokio::test]
async fn metrics_show_build_info_and_latency_histograms_that_move_with_requests() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/h",
        Route::ok("hist").header("Cache-Control", "max-age=60"),
    );
    let body = format!("{}{ADMIN}", site(&origin, "site.test", ""));
    let node = TestNode::start("", &body).await;
    let build = format!(
        "edgecache_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    );
    let text = admin_get(&node, "/metrics").await;
    assert!(text.contains(&build), "{text}");
    assert!(text.contains("# TYPE edgecache_request_duration_seconds histogram"));

    get(node.http, "site.test", "/h").await;
    get(node.http, "site.test", "/h").await;
    get(node.http, "site.test", "/h").await;
    let count = |r: &str| format!("edgecache_request_duration_seconds_count{{result=\"{r}\"}}");
    assert_eq!(metric(&node, &count("miss")).await, 1);
    assert_eq!(metric(&node, &count("hit")).await, 2);
    let inf = "edgecache_request_duration_seconds_bucket{result=\"hit\",le=\"+Inf\"}";
    assert_eq!(metric(&node, inf).await, 2);
    let origin_count = "edgecache_origin_request_duration_seconds_count{origin=\"o\"}";
    assert_eq!(metric(&node, origin_count).await, 1);
    assert_eq!(origin.count("/h"), 1);
}

#[tokio::test]
async fn cache_lists_every_variant_of_a_url_until_it_is_purged() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v",
        Route::echo(&["accept-language"], 0)
            .header("Cache-Control", "max-age=100")
            .header("Vary", "Accept-Language")
            .header("ETag", "\"v1\"")
            .header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            .header("Surrogate-Key", "red blue"),
    );
    let body = format!("{}{ADMIN}", site(&origin, "site.test", ""));
    let node = TestNode::start("", &body).await;
    let mut sizes = Vec::new();
    for lang in ["en", "fr-CH"] {
        let req = request("GET", "site.test", "/v?x=1", &[("accept-language", lang)]);
        let got = send(node.http, req).await;
        assert_eq!(got.status, 200);
        sizes.push(got.body.len() as u64);
    }

    let path = "/cache?url=http%3A%2F%2Fsite.test%2Fv%3Fx%3D1";
    let (status, listed) = admin_json(&node, path).await;
    assert_eq!(status, 200, "{listed}");
    let variants = listed["variants"].as_array().cloned().unwrap_or_default();
    assert_eq!(variants.len(), 2, "{listed}");
    for (v, (lang, size)) in variants.iter().zip(["en", "fr-CH"].iter().zip(&sizes)) {
        assert_eq!(v["key"], "http://site.test/v?x=1", "{v}");
        // As the variant is keyed: language ranges lowercased (RFC 4647 §2).
        assert_eq!(
            v["vary"]["accept-language"],
            lang.to_ascii_lowercase(),
            "{v}"
        );
        assert_eq!(v["size"], *size, "{v}");
        assert_eq!(v["etag"], "\"v1\"", "{v}");
        assert_eq!(v["last_modified"], "Mon, 01 Jan 2024 00:00:00 GMT", "{v}");
        assert_eq!(v["tags"], serde_json::json!(["red", "blue"]), "{v}");
        assert_eq!(v["storage"], "heap", "{v}");
        let left = v["freshness_left_seconds"].as_f64().unwrap_or(-1.0);
        assert!(left > 0.0 && left <= 100.0, "{v}");
    }
    // The same URL unencoded (its own query after `url=`) finds the same variants, and the
    // freshness left goes down as the entries age.
    let first = variants[0]["freshness_left_seconds"]
        .as_f64()
        .unwrap_or(0.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let later = loop {
        let (status, now) = admin_json(&node, "/cache?url=http://site.test/v?x=1").await;
        assert_eq!(status, 200, "{now}");
        let later = now["variants"][0]["freshness_left_seconds"]
            .as_f64()
            .unwrap_or(first);
        if later < first || std::time::Instant::now() > deadline {
            break later;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(later < first, "freshness left stayed at {first}");

    // Not stored, not a URL, no URL: 404 and 400, as JSON.
    let (status, none) = admin_json(&node, "/cache?url=http://site.test/other").await;
    assert_eq!(status, 404, "{none}");
    assert_eq!(none["variants"], serde_json::json!([]));
    for bad in [
        "/cache",
        "/cache?url=",
        "/cache?url=/no/host",
        "/cache?url=http://a%20b/",
    ] {
        let (status, e) = admin_json(&node, bad).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["error"].is_string(), "{bad}: {e}");
    }

    // After a purge of the URL, nothing is listed.
    let admin = node.node().admin_addr().expect("admin");
    let purge = "{\"url\":\"http://site.test/v?x=1\"}";
    let req = format!(
        "POST /purge HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{purge}",
        purge.len()
    );
    let (text, _) = raw(admin, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.contains("\"purged\":2"), "{text}");
    assert_eq!(admin_json(&node, path).await.0, 404);
    assert_eq!(origin.count("/v?x=1"), 2);
}

#[tokio::test]
async fn cache_stats_count_what_was_stored_served_and_evicted() {
    let origin = TestOrigin::start().await;
    let big = bytes::Bytes::from(vec![b'x'; 200 << 10]);
    for i in 0..10 {
        origin.route(
            &format!("/big/{i}"),
            Route::bytes(big.clone()).header("Cache-Control", "max-age=600"),
        );
    }
    origin.route(
        "/small",
        Route::ok("small").header("Cache-Control", "max-age=600"),
    );
    let body = format!(
        "[cache]\nmemory = \"1MiB\"\nmax_object_size = \"256KiB\"\n{}{ADMIN}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;

    // One object, asked for three times: one miss, two hits.
    for _ in 0..3 {
        assert_eq!(get(node.http, "site.test", "/small").await.status, 200);
    }
    let (status, s) = admin_json(&node, "/cache/stats").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["objects"], 1, "{s}");
    assert_eq!(s["variants"], 1, "{s}");
    assert_eq!(s["capacity"], 1u64 << 20, "{s}");
    assert_eq!(
        (s["hits"].as_u64(), s["misses"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(
        (s["hit_ratio"].as_f64().unwrap_or(0.0) - 0.6667).abs() < 1e-9,
        "{s}"
    );
    let (_, small) = admin_json(&node, "/cache?url=http://site.test/small").await;
    assert_eq!(s["bytes"], small["variants"][0]["weight"], "{s} {small}");
    assert_eq!(s["top_hosts"][0]["host"], "site.test", "{s}");
    assert_eq!(s["top_hosts"][0]["bytes"], s["bytes"], "{s}");
    assert_eq!(s["evictions"]["size"], 0, "{s}");

    // Two megabytes through a one-megabyte cache: some objects pushed out for size, and
    // every object stored is either still there or counted as evicted.
    for i in 0..10 {
        let got = get(node.http, "site.test", &format!("/big/{i}")).await;
        assert_eq!(got.body.len(), 200 << 10);
    }
    let (_, s) = admin_json(&node, "/cache/stats").await;
    let evicted = s["evictions"]["size"].as_u64().unwrap_or(0);
    let objects = s["objects"].as_u64().unwrap_or(0);
    assert!(evicted > 0, "{s}");
    assert_eq!(objects + evicted, 11, "{s}");
    assert!(s["bytes"].as_u64().unwrap_or(u64::MAX) <= 1 << 20, "{s}");
}

#[tokio::test]
async fn status_and_cache_endpoints_need_the_token() {
    let origin = TestOrigin::start().await;
    let body = format!("{}{ADMIN}", site(&origin, "site.test", ""));
    let node = TestNode::start("", &body).await;
    let admin = node.node().admin_addr().expect("admin");
    for path in ["/status", "/cache?url=http://site.test/", "/cache/stats"] {
        for auth in ["", "Authorization: Bearer nope\r\n"] {
            let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n");
            let (text, _) = raw(admin, req.as_bytes(), Duration::from_secs(5)).await;
            assert!(text.starts_with("HTTP/1.1 401"), "{path} {auth:?}: {text}");
        }
    }
}

/// `/readyz` turns 503 as shutdown begins, while the listeners close: before the drain
/// (which waits up to a second for a connection accepted just before the close to send its
/// request) has closed an idle connection.
#[tokio::test]
async fn readyz_answers_503_as_soon_as_shutdown_begins() {
    let origin = TestOrigin::start().await;
    let body = format!("{}{ADMIN}", site(&origin, "site.test", ""));
    let mut node = TestNode::start("header_read_timeout = \"30s\"", &body).await;
    let admin = node.node().admin_addr().expect("admin");
    let ready = |text: &str| text.get(9..12).map(str::to_owned);
    let probe = "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let (text, _) = raw(admin, probe.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(ready(&text).as_deref(), Some("200"), "{text}");
    // An idle connection keeps the node from draining at once (the settle before the drain).
    let idle = tokio::net::TcpStream::connect(node.http)
        .await
        .expect("connect");
    assert!(
        eventually(Duration::from_secs(5), || node.node().open_connections()
            == 1)
        .await
    );
    let running = node.node.take().expect("node running");
    let shutdown = tokio::spawn(running.shutdown());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (text, _) = raw(admin, probe.as_bytes(), Duration::from_secs(5)).await;
        if ready(&text).as_deref() == Some("503") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never 503: {text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Not ready, and the drain has not begun: the idle connection is still open.
    let mut buf = [0u8; 1];
    match idle.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the idle connection was closed before /readyz said 503: {other:?}"),
    }
    drop(idle);
    shutdown.await.expect("shutdown");
}

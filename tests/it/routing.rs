//! Misses go to the right origin: geo routes, pools in preference order, latency-aware choice,
//! ejection of failing origins, failover.

use std::time::{Duration, Instant};

use crate::support::*;

fn two_regions(eu: &str, us: &str, geo: &str) -> String {
    format!(
        "{geo}\n[[origins]]\nname = \"eu-1\"\nurl = \"{eu}\"\nregion = \"eu\"\nconnect_timeout = \"500ms\"\n\
         [[origins]]\nname = \"us-1\"\nurl = \"{us}\"\nregion = \"us\"\nconnect_timeout = \"500ms\"\n\
         [[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\n[[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n\
         [[sites.routes]]\nmatch = {{ continents = [\"EU\", \"AF\"] }}\npools = [\"eu\", \"us\"]\n\
         [[sites.routes]]\nmatch = {{ countries = [\"US\"] }}\npools = [\"us\", \"eu\"]\n\
         [[sites.routes]]\npools = [\"us\", \"eu\"]\n"
    )
}

async fn answer(node: &TestNode, headers: &[(&str, &str)]) -> String {
    let r = send(node.http, request("GET", "site.test", "/where", headers)).await;
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

#[tokio::test]
async fn clients_reach_their_regions_pool() {
    let (eu, us) = regional_origins().await;
    let geo = "[geo]\nheader = \"CF-IPCountry\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
               [[geo.networks]]\ncidr = \"203.0.113.0/24\"\ncountry = \"DE\"\n\
               [[geo.networks]]\ncidr = \"198.51.100.0/24\"\ncountry = \"US\"\n";
    let node = TestNode::start("", &two_regions(&eu.url(), &us.url(), geo)).await;
    // CIDR table, for the client named by a trusted proxy's X-Forwarded-For.
    assert_eq!(
        answer(&node, &[("x-forwarded-for", "203.0.113.9")]).await,
        "eu"
    );
    assert_eq!(
        answer(&node, &[("x-forwarded-for", "198.51.100.9")]).await,
        "us"
    );
    // The country header from a trusted peer.
    assert_eq!(answer(&node, &[("cf-ipcountry", "FR")]).await, "eu");
    assert_eq!(
        answer(&node, &[("cf-ipcountry", "NG")]).await,
        "eu",
        "Africa routes to eu"
    );
    assert_eq!(
        answer(&node, &[("cf-ipcountry", "JP")]).await,
        "us",
        "unmatched: the default route"
    );
    assert_eq!(
        answer(&node, &[]).await,
        "us",
        "unknown location: the default route"
    );

    // The same header and forwarding from a peer that is not trusted are ignored.
    let untrusted = "[geo]\nheader = \"CF-IPCountry\"\n[[geo.networks]]\ncidr = \"203.0.113.0/24\"\ncountry = \"DE\"\n";
    let node = TestNode::start("", &two_regions(&eu.url(), &us.url(), untrusted)).await;
    assert_eq!(answer(&node, &[("cf-ipcountry", "FR")]).await, "us");
    assert_eq!(
        answer(&node, &[("x-forwarded-for", "203.0.113.9")]).await,
        "us"
    );

    // The CIDR table applies to the socket's own address too.
    let local = "[geo]\n[[geo.networks]]\ncidr = \"127.0.0.0/8\"\ncountry = \"DE\"\n";
    let node = TestNode::start("", &two_regions(&eu.url(), &us.url(), local)).await;
    assert_eq!(answer(&node, &[]).await, "eu");
}

#[tokio::test]
async fn a_pool_whose_origins_are_down_fails_over_to_the_next() {
    let (_eu, us) = regional_origins().await;
    let down = format!("http://{}", closed_port());
    let geo = "[geo]\n[[geo.networks]]\ncidr = \"127.0.0.0/8\"\ncountry = \"DE\"\n";
    let node = TestNode::start("", &two_regions(&down, &us.url(), geo)).await;
    for _ in 0..20 {
        assert_eq!(
            answer(&node, &[]).await,
            "us",
            "no 5xx while the next pool is up"
        );
    }
    assert_eq!(us.count("/where"), 20);
}

#[tokio::test]
async fn the_faster_origin_takes_the_traffic_and_traffic_follows_a_change() {
    let a = TestOrigin::start().await;
    let b = TestOrigin::start().await;
    let route = |d: u64| {
        Route::ok("x")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(d))
    };
    a.route("/where", route(5));
    b.route("/where", route(40));
    let body = format!(
        "[[origins]]\nname = \"a\"\nurl = \"{}\"\n[[origins]]\nname = \"b\"\nurl = \"{}\"\n\
         [[pools]]\nname = \"p\"\norigins = [\"a\", \"b\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n[[sites.routes]]\npools = [\"p\"]\n",
        a.url(),
        b.url()
    );
    let node = TestNode::start("", &body).await;
    for _ in 0..500 {
        answer(&node, &[]).await;
    }
    let fast = a.total();
    assert!(
        fast >= 450,
        "at least 90% of 500 misses to the fast origin, got {fast}"
    );

    // The delays swap: within a few seconds the new fast origin takes the traffic.
    a.route("/where", route(40));
    b.route("/where", route(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut followed = false;
    while Instant::now() < deadline {
        let before = b.total();
        for _ in 0..50 {
            answer(&node, &[]).await;
        }
        if b.total() - before >= 45 {
            followed = true;
            break;
        }
    }
    assert!(followed, "traffic did not follow the latency change");
}

/// 503 is in the default `fail_on`; a 500 would not count (see hardening.rs).
#[tokio::test]
async fn an_origin_returning_errors_is_ejected_and_comes_back() {
    let bad = TestOrigin::start().await;
    let good = TestOrigin::start().await;
    bad.route(
        "/where",
        Route::ok("broken")
            .status(503)
            .header("cache-control", "no-store"),
    );
    good.route(
        "/where",
        Route::ok("ok")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(20)),
    );
    let body = format!(
        "[[origins]]\nname = \"bad\"\nurl = \"{}\"\n[[origins]]\nname = \"good\"\nurl = \"{}\"\n\
         [[pools]]\nname = \"p\"\norigins = [\"bad\", \"good\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n[[sites.routes]]\npools = [\"p\"]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
        bad.url(),
        good.url()
    );
    let node = TestNode::start("", &body).await;
    for _ in 0..40 {
        send(node.http, request("GET", "site.test", "/where", &[])).await;
    }
    let bad_before = bad.total();
    assert!(
        bad_before <= 6,
        "ejected after a run of failures, reached {bad_before} times"
    );
    // The admin listener shows it.
    let bad_state = origin_state(&node, "bad").await;
    assert_eq!(bad_state["state"], "ejected", "{bad_state}");
    // And the metrics an operator scrapes.
    assert_eq!(
        metric(&node, "edgecache_origin_up{origin=\"good\"}").await,
        1
    );
    assert!(metric(&node, "edgecache_origin_failures_total{origin=\"bad\"}").await >= 5);
    assert_eq!(
        metric(&node, "edgecache_origin_ejections_total{origin=\"bad\"}").await,
        1
    );
    assert!(bad_state["ejections"].as_u64() >= Some(1));
    assert!(bad_state["errors"].as_u64() >= Some(5));
    // Healed: after the back-off it is tried again and, answering well, stays in.
    bad.route(
        "/where",
        Route::ok("healed").header("cache-control", "no-store"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while bad.total() == bad_before && Instant::now() < deadline {
        send(node.http, request("GET", "site.test", "/where", &[])).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        bad.total() > bad_before,
        "the origin came back after its back-off"
    );
}

#[tokio::test]
async fn when_every_origin_is_down_stored_content_is_served() {
    let (eu, us) = regional_origins().await;
    eu.route(
        "/page",
        Route::ok("kept")
            .header("cache-control", "max-age=1")
            .header("age", "1"),
    );
    us.route(
        "/page",
        Route::ok("kept")
            .header("cache-control", "max-age=1")
            .header("age", "1"),
    );
    eu.route(
        "/strict",
        Route::ok("strict")
            .header("cache-control", "max-age=1, must-revalidate")
            .header("age", "1"),
    );
    us.route(
        "/strict",
        Route::ok("strict")
            .header("cache-control", "max-age=1, must-revalidate")
            .header("age", "1"),
    );
    let node = TestNode::start("", &two_regions(&eu.url(), &us.url(), "")).await;
    assert_eq!(
        &get(node.http, "site.test", "/page").await.body[..],
        b"kept"
    );
    get(node.http, "site.test", "/strict").await;
    eu.stop();
    us.stop();
    let r = get(node.http, "site.test", "/page").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"kept");
    assert!(r
        .header("cache-status")
        .is_some_and(|c| c.contains("detail=origin-unreachable")));
    assert_eq!(
        get(node.http, "site.test", "/strict").await.status,
        504,
        "must-revalidate is never served stale"
    );
    assert_eq!(
        get(node.http, "site.test", "/never").await.status,
        502,
        "nothing stored: 502"
    );
}

fn health_config(eu1: &str, eu2: &str, us: &str) -> String {
    format!(
        "[geo]\n[[geo.networks]]\ncidr = \"127.0.0.0/8\"\ncountry = \"DE\"\n\
         [health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 3\nfall = 2\n\
         [[origins]]\nname = \"eu-1\"\nurl = \"{eu1}\"\nconnect_timeout = \"500ms\"\n\
         [[origins]]\nname = \"eu-2\"\nurl = \"{eu2}\"\nconnect_timeout = \"500ms\"\n\
         [[origins]]\nname = \"us-1\"\nurl = \"{us}\"\nconnect_timeout = \"500ms\"\n\
         [origins.health]\ninterval = \"1s\"\ntimeout = \"1s\"\n\
         [[pools]]\nname = \"eu\"\norigins = [\"eu-1\", \"eu-2\"]\n[[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n\
         [[sites.routes]]\nname = \"europe\"\nmatch = {{ continents = [\"EU\"] }}\npools = [\"eu\", \"us\"]\n\
         [[sites.routes]]\npools = [\"us\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n"
    )
}

fn regional(body: &'static str) -> Route {
    Route::ok(body).header("cache-control", "no-store")
}

#[tokio::test]
async fn health_checks_take_a_dead_pool_out_and_bring_it_back_after_rise_passes() {
    let eu1 = TestOrigin::start().await;
    let eu2 = TestOrigin::start().await;
    let us = TestOrigin::start().await;
    for o in [&eu1, &eu2] {
        o.route("/where", regional("eu"))
            .route("/healthz", Route::ok("ok"));
    }
    us.route("/where", regional("us"))
        .route("/healthz", Route::ok("ok"));
    let node = TestNode::start("", &health_config(&eu1.url(), &eu2.url(), &us.url())).await;
    for _ in 0..10 {
        assert_eq!(answer(&node, &[]).await, "eu");
    }
    // Checks run on their own, with their own interval per origin, and report latency.
    assert!(
        eventually(Duration::from_secs(5), || eu1.count("/healthz") >= 2).await,
        "eu-1 is checked every 100ms"
    );
    let state = origin_state(&node, "eu-1").await;
    assert_eq!(state["state"], "up", "{state}");
    assert_eq!(state["health"]["path"], "/healthz");
    assert_eq!(state["health"]["last_check"]["passed"], true, "{state}");
    assert_eq!(state["health"]["last_check"]["status"], 200);
    assert_eq!(
        origin_state(&node, "us-1").await["health"]["interval_ms"],
        1000
    );

    // Four clients keep asking while the whole primary pool dies.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let addr = node.http;
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = send(addr, request("GET", "site.test", "/where", &[])).await;
                if r.status.is_server_error() {
                    failed += 1;
                } else {
                    ok += 1;
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let eu_addrs = (eu1.addr, eu2.addr);
    eu1.stop();
    eu2.stop();
    let served_by_us = us.count("/where");
    assert!(
        eventually(Duration::from_secs(5), || us.count("/where")
            >= served_by_us + 50)
        .await,
        "the next pool takes the traffic"
    );
    // Active checks mark both down.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && (origin_state(&node, "eu-1").await["state"] != "down"
            || origin_state(&node, "eu-2").await["state"] != "down")
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = origin_state(&node, "eu-1").await;
    assert_eq!(state["state"], "down", "{state}");
    assert_eq!(state["health"]["last_check"]["passed"], false);
    assert!(
        state["health"]["last_check"]["error"].is_string(),
        "{state}"
    );

    // Restarted on their old ports: traffic comes back, but only after `rise` passed checks.
    let eu1 = TestOrigin::start_on(eu_addrs.0).await;
    let eu2 = TestOrigin::start_on(eu_addrs.1).await;
    for o in [&eu1, &eu2] {
        o.route("/where", regional("eu"))
            .route("/healthz", Route::ok("ok"));
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            eu1.count("/where") + eu2.count("/where") >= 20
        })
        .await,
        "traffic returns to the primary pool"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = 0;
    for c in clients {
        let (ok, f) = c.await.expect("client task");
        assert!(ok > 0);
        failed += f;
    }
    assert!(
        failed <= 4,
        "no 5xx beyond the 4 requests in flight at the kill, got {failed}"
    );
    for o in [&eu1, &eu2] {
        let log = o.log();
        if let Some(first) = log.iter().position(|p| p == "/where") {
            let checks_before = log[..first].iter().filter(|p| *p == "/healthz").count();
            assert!(
                checks_before >= 3,
                "traffic came back after {checks_before} passed checks (rise = 3): {log:?}"
            );
        }
    }
    assert_eq!(origin_state(&node, "eu-1").await["state"], "up");
}

/// An origin that accepts connections and closes them at once, without answering; counts
/// the connections it took.
async fn black_hole() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    (format!("http://{addr}"), accepted)
}

fn pair(a: &str, b: &str, extra: &str) -> String {
    format!(
        "{extra}\n[[origins]]\nname = \"a\"\nurl = \"{a}\"\n[[origins]]\nname = \"b\"\nurl = \"{b}\"\n\
         [[pools]]\nname = \"p\"\norigins = [\"a\", \"b\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n[[sites.routes]]\npools = [\"p\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n"
    )
}

#[tokio::test]
async fn a_connection_broken_before_the_answer_is_retried_on_another_origin() {
    let (hole, accepted) = black_hole().await;
    let good = TestOrigin::start().await;
    good.route("/where", regional("good"));
    let node = TestNode::start("", &pair(&hole, &good.url(), "")).await;
    for _ in 0..20 {
        let r = send(node.http, request("GET", "site.test", "/where", &[])).await;
        assert_eq!(r.status, 200, "the retry answers");
        assert_eq!(&r.body[..], b"good");
    }
    let broken = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(broken >= 1, "the broken origin was tried");
    assert_eq!(
        metric(&node, "edgecache_origin_retries_total").await,
        broken as u64
    );
    // A POST is never sent twice.
    let (hole, accepted) = black_hole().await;
    let node = TestNode::start("", &pair(&hole, &hole, "")).await;
    let r = send(node.http, request("POST", "site.test", "/where", &[])).await;
    assert_eq!(r.status, 502);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_retry_budget_holds_during_a_full_outage() {
    let (a, a_accepted) = black_hole().await;
    let (b, b_accepted) = black_hole().await;
    let node = TestNode::start(
        "",
        &pair(&a, &b, "[retries]\nbudget = 0.1\nmin_per_second = 1\n"),
    )
    .await;
    let requests = 100;
    for i in 0..requests {
        let r = send(
            node.http,
            request("GET", "site.test", &format!("/down/{i}"), &[]),
        )
        .await;
        assert_eq!(r.status, 502);
    }
    let reached = a_accepted.load(std::sync::atomic::Ordering::SeqCst)
        + b_accepted.load(std::sync::atomic::Ordering::SeqCst);
    let retries = metric(&node, "edgecache_origin_retries_total").await;
    let refused = metric(&node, "edgecache_origin_retries_refused_total").await;
    // 10% of 100 requests plus 1 per second over at most ten seconds.
    assert!(
        retries <= 20,
        "retries within budget, got {retries} (refused {refused})"
    );
    assert!(retries >= 10, "the budget was used: {retries}");
    assert!(refused >= 50, "most retries refused: {refused}");
    assert_eq!(
        reached as u64,
        requests + retries,
        "origins saw each request once plus the budgeted retries"
    );
}

async fn node_with_database(
    dir: tempfile::TempDir,
    geo_extra: &str,
) -> (TestNode, TestOrigin, TestOrigin) {
    let (eu, us) = regional_origins().await;
    let geo = format!(
        "[geo]\ndatabase = \"country.mmdb\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{geo_extra}"
    );
    let node = TestNode::start_in(dir, false, "", &two_regions(&eu.url(), &us.url(), &geo)).await;
    (node, eu, us)
}

#[tokio::test]
async fn a_maxmind_database_places_clients() {
    for flat in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_mmdb(
            &dir.path().join("country.mmdb"),
            flat,
            &[
                ("203.0.113.0/24", "DE", "EU"),
                ("198.51.100.0/24", "US", "NA"),
                ("2001:db8:1::/48", "NG", "AF"),
                ("192.0.2.0/24", "US", "NA"),
            ],
        );
        let extra = "[[geo.networks]]\ncidr = \"192.0.2.0/24\"\ncountry = \"FR\"\n";
        let (node, _eu, _us) = node_with_database(dir, extra).await;
        let from = |ip: &'static str| [("x-forwarded-for", ip)];
        assert_eq!(
            answer(&node, &from("203.0.113.7")).await,
            "eu",
            "flat={flat}"
        );
        assert_eq!(
            answer(&node, &from("198.51.100.7")).await,
            "us",
            "flat={flat}"
        );
        assert_eq!(
            answer(&node, &from("2001:db8:1::9")).await,
            "eu",
            "Africa via IPv6, flat={flat}"
        );
        assert_eq!(
            answer(&node, &from("192.0.2.1")).await,
            "eu",
            "the CIDR table is checked before the database"
        );
        assert_eq!(
            answer(&node, &from("100.64.0.1")).await,
            "us",
            "not in the database: the default route"
        );
    }
}

#[tokio::test]
async fn maxminds_own_test_database_is_read() {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-data/GeoIP2-Country-Test.mmdb");
    assert!(
        source.exists(),
        "{} is missing: run scripts/test, which fetches it",
        source.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(&source, dir.path().join("country.mmdb")).expect("copy");
    let (node, eu, us) = node_with_database(dir, "").await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    // Values from MaxMind's source data for this file.
    assert_eq!(answer(&node, &from("81.2.69.160")).await, "eu", "GB");
    assert_eq!(answer(&node, &from("89.160.20.115")).await, "eu", "SE");
    assert_eq!(
        answer(&node, &from("216.160.83.57")).await,
        "us",
        "US: countries = [\"US\"]"
    );
    assert_eq!(
        answer(&node, &from("2001:218::1")).await,
        "us",
        "JP: the default route"
    );
    assert_eq!(
        answer(&node, &from("2a02:d180::1")).await,
        "eu",
        "DE over IPv6"
    );
    assert_eq!(eu.count("/where"), 3);
    assert_eq!(us.count("/where"), 2);
}

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

async fn regional_origins() -> (TestOrigin, TestOrigin) {
    let eu = TestOrigin::start().await;
    eu.route(
        "/where",
        Route::ok("eu").header("cache-control", "no-store"),
    );
    let us = TestOrigin::start().await;
    us.route(
        "/where",
        Route::ok("us").header("cache-control", "no-store"),
    );
    (eu, us)
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

#[tokio::test]
async fn an_origin_returning_errors_is_ejected_and_comes_back() {
    let bad = TestOrigin::start().await;
    let good = TestOrigin::start().await;
    bad.route(
        "/where",
        Route::ok("broken")
            .status(500)
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
         [[sites]]\nhosts = [\"site.test\"]\n[[sites.routes]]\npools = [\"p\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
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
    let admin = node.node().admin_addr().expect("admin");
    let (text, _) = raw(
        admin,
        b"GET /origins HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let list: serde_json::Value = serde_json::from_str(json).expect("origins JSON");
    let bad_state = list
        .as_array()
        .and_then(|a| a.iter().find(|o| o["name"] == "bad"))
        .expect("bad listed");
    assert_eq!(bad_state["state"], "ejected", "{bad_state}");
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

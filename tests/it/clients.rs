//! Who the client is: the socket's peer in canonical form, clients named by trusted proxies,
//! and what that decides (geo routes, forwarding fields, the PURGE method).

use crate::support::*;

/// One site on two origins: clients located in `DE` go to `eu`, the rest to `us`. Each origin
/// answers `/where` with its name (not stored) and `/p` with a stored object.
async fn located_site(geo: &str, admin: &str) -> (TestOrigin, TestOrigin, String) {
    let (eu, us) = regional_origins().await;
    for o in [&eu, &us] {
        o.route("/p", Route::ok("p").header("cache-control", "max-age=600"));
    }
    let body = format!(
        "{geo}\n[[origins]]\nname = \"eu-1\"\nurl = \"{}\"\n[[origins]]\nname = \"us-1\"\nurl = \"{}\"\n\
         [[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\n[[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n\
         [[sites.routes]]\nmatch = {{ countries = [\"DE\"] }}\npools = [\"eu\"]\n\
         [[sites.routes]]\npools = [\"us\"]\n{admin}",
        eu.url(),
        us.url()
    );
    (eu, us, body)
}

async fn answer(node: &TestNode, headers: &[(&str, &str)]) -> String {
    let r = send(node.http, request("GET", "site.test", "/where", headers)).await;
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

fn xff(origin: &TestOrigin, path: &str) -> String {
    origin
        .last_headers(path)
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Issue 19: on a dual-stack socket an IPv4 client is `::ffff:a.b.c.d`, which matched no IPv4
/// network: trusted proxies, geo networks and `purge_allow` all failed, and the mapped form
/// went upstream in `X-Forwarded-For`. A listener on the mapped loopback address makes every
/// peer such an address.
#[tokio::test]
async fn ipv4_mapped_peers_match_ipv4_networks() {
    let geo = "[geo]\n[[geo.networks]]\ncidr = \"127.0.0.0/8\"\ncountry = \"DE\"\n";
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"127.0.0.1/32\"]\n";
    let (eu, us, body) = located_site(geo, admin).await;
    let node = TestNode::start_listening(
        "[::ffff:127.0.0.1]:0",
        "trusted_proxies = [\"127.0.0.1\"]\n",
        &body,
    )
    .await;
    assert!(node.http.is_ipv6(), "{}", node.http);

    assert_eq!(
        answer(&node, &[]).await,
        "eu",
        "the geo network holds the peer"
    );
    assert_eq!(xff(&eu, "/where"), "127.0.0.1", "written upstream as IPv4");
    assert_eq!(
        answer(&node, &[("x-forwarded-for", "198.51.100.9")]).await,
        "us",
        "the peer is a trusted proxy: its client is located"
    );
    assert_eq!(
        xff(&us, "/where"),
        "198.51.100.9, 127.0.0.1",
        "a trusted proxy's X-Forwarded-For is kept"
    );

    assert_eq!(get(node.http, "site.test", "/p").await.status, 200);
    let r = send(node.http, request("PURGE", "site.test", "/p", &[])).await;
    assert_eq!(r.status, 200, "purge_allow holds the peer");
    assert_eq!(&r.body[..], b"{\"purged\":1}\n");
    get(node.http, "site.test", "/p").await;
    assert_eq!(eu.count("/p"), 2, "purged, so fetched again");
}

/// Issue 19: when a trusted hop sent both fields, `X-Forwarded-For` won, and without it
/// `Forwarded` was read; a hop writes one and passes a client's own copy of the other
/// through, so only the configured one is read.
#[tokio::test]
async fn only_the_configured_client_address_header_is_read() {
    let geo = "[geo]\n[[geo.networks]]\ncidr = \"203.0.113.0/24\"\ncountry = \"DE\"\n";
    let (_eu, _us, body) = located_site(geo, "").await;
    let xff_de = ("x-forwarded-for", "203.0.113.9");
    let fwd_de = ("forwarded", "for=203.0.113.9");
    let xff_other = ("x-forwarded-for", "198.51.100.1");
    let fwd_other = ("forwarded", "for=198.51.100.1");

    let node = TestNode::start("trusted_proxies = [\"127.0.0.1\"]\n", &body).await;
    assert_eq!(answer(&node, &[xff_de]).await, "eu");
    assert_eq!(
        answer(&node, &[fwd_de]).await,
        "us",
        "Forwarded is not read"
    );
    assert_eq!(answer(&node, &[xff_other, fwd_de]).await, "us");

    let node = TestNode::start(
        "trusted_proxies = [\"127.0.0.1\"]\nclient_address_header = \"forwarded\"\n",
        &body,
    )
    .await;
    assert_eq!(answer(&node, &[fwd_de]).await, "eu");
    assert_eq!(
        answer(&node, &[xff_de]).await,
        "us",
        "X-Forwarded-For is not read"
    );
    assert_eq!(answer(&node, &[xff_de, fwd_other]).await, "us");
}

/// A node with one stored object at `/p` and `[admin]` as given; the origin counts fetches.
async fn purgeable(server_extra: &str, admin: &str) -> (TestOrigin, TestNode) {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("p").header("cache-control", "max-age=600"));
    let body = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{admin}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start(server_extra, &body).await;
    assert_eq!(get(node.http, "site.test", "/p").await.status, 200);
    assert_eq!(origin.count("/p"), 1);
    (origin, node)
}

async fn purge(node: &TestNode, headers: &[(&str, &str)]) -> u16 {
    send(node.http, request("PURGE", "site.test", "/p", headers))
        .await
        .status
        .as_u16()
}

/// Fetches `/p` once more and returns how often the origin has been asked for it.
async fn fetched(origin: &TestOrigin, node: &TestNode) -> usize {
    assert_eq!(get(node.http, "site.test", "/p").await.status, 200);
    origin.count("/p")
}

/// Issue 19: PURGE was authorised by the socket's peer alone, so behind a proxy on the same
/// host (the shipped `purge_allow` is 127.0.0.1/32) every client could purge. From a trusted
/// proxy, the client it names is matched.
#[tokio::test]
async fn purge_through_a_trusted_local_proxy_is_matched_by_its_client() {
    let (origin, node) = purgeable(
        "trusted_proxies = [\"127.0.0.1\"]\n",
        "purge_allow = [\"127.0.0.1/32\", \"192.0.2.0/24\"]\n",
    )
    .await;
    assert_eq!(
        purge(&node, &[("x-forwarded-for", "203.0.113.9")]).await,
        403
    );
    // What the proxy makes of a client that names itself 127.0.0.1.
    assert_eq!(
        purge(&node, &[("x-forwarded-for", "127.0.0.1, 203.0.113.9")]).await,
        403
    );
    assert_eq!(fetched(&origin, &node).await, 1, "still stored");

    assert_eq!(purge(&node, &[("x-forwarded-for", "192.0.2.9")]).await, 200);
    assert_eq!(
        fetched(&origin, &node).await,
        2,
        "an allowed client purged it"
    );
    assert_eq!(purge(&node, &[]).await, 200, "the local address itself");
    assert_eq!(fetched(&origin, &node).await, 3);
}

/// The shipped configuration: no trusted proxies, `purge_allow` 127.0.0.1/32. A PURGE that a
/// proxy on this host forwarded (it says so) is not taken for one made on this host.
#[tokio::test]
async fn purge_forwarded_by_an_untrusted_proxy_is_refused() {
    let (origin, node) = purgeable("", "purge_allow = [\"127.0.0.1/32\"]\n").await;
    assert_eq!(
        purge(&node, &[("x-forwarded-for", "203.0.113.9")]).await,
        403
    );
    assert_eq!(purge(&node, &[("forwarded", "for=203.0.113.9")]).await, 403);
    assert_eq!(fetched(&origin, &node).await, 1, "still stored");
    assert_eq!(purge(&node, &[]).await, 200);
    assert_eq!(fetched(&origin, &node).await, 2);
}

/// With an admin token configured, PURGE bearing it is accepted from any address.
#[tokio::test]
async fn purge_with_the_admin_token_from_any_address() {
    let (origin, node) = purgeable(
        "",
        "token = \"s3cret-token\"\npurge_allow = [\"192.0.2.0/24\"]\n",
    )
    .await;
    assert_eq!(purge(&node, &[]).await, 403);
    assert_eq!(
        purge(&node, &[("authorization", "Bearer wrong-token")]).await,
        403
    );
    assert_eq!(fetched(&origin, &node).await, 1, "still stored");
    assert_eq!(
        purge(&node, &[("authorization", "Bearer s3cret-token")]).await,
        200
    );
    assert_eq!(fetched(&origin, &node).await, 2);
}

/// Issue 19: a trusted proxy that writes only `Forwarded` passed the client's own
/// `X-Forwarded-For` through to the origin as if vouched for. The field the trusted hop does
/// not write is the client's, and is not forwarded; the one it writes is kept.
#[tokio::test]
async fn the_origin_gets_only_the_forwarding_field_the_trusted_proxy_writes() {
    let origin = TestOrigin::start().await;
    origin.route("/f", Route::ok("f").header("cache-control", "no-store"));
    let sent = [
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=203.0.113.9"),
    ];
    for (setting, xff, fwd) in [
        ("", "6.6.6.6, 127.0.0.1", None),
        (
            "client_address_header = \"forwarded\"\n",
            "127.0.0.1",
            Some("for=203.0.113.9"),
        ),
    ] {
        let node = TestNode::start(
            &format!("trusted_proxies = [\"127.0.0.1\"]\n{setting}"),
            &site(&origin, "site.test", ""),
        )
        .await;
        let g = send(node.http, request("GET", "site.test", "/f", &sent)).await;
        assert_eq!(g.status, 200);
        let seen = origin.last_headers("/f");
        assert_eq!(
            seen.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
            Some(xff),
            "{setting}"
        );
        assert_eq!(
            seen.get("forwarded").and_then(|v| v.to_str().ok()),
            fwd,
            "{setting}"
        );
    }
}

//! Two tiers: an edge node whose origin is another edgecache (the shield, another region's
//! node) in a pool, with failover to the real origin. `Cache-Status` names both layers, the
//! origin is asked once for many edge requests, a shield that stops is failed over like any
//! origin, and a cycle between tiers is stopped by `CDN-Loop` with 508 rather than a loop.

use crate::support::*;

const HOST: &str = "shield.test";

/// A shield node (`via_name = "shield"`) in front of `origin`.
async fn shield(origin_url: &str) -> TestNode {
    TestNode::start(
        "via_name = \"shield\"\n",
        &format!(
            "[[origins]]\nname = \"origin\"\nurl = \"{origin_url}\"\n[[sites]]\nhosts = [\"{HOST}\"]\norigin = \"origin\"\n"
        ),
    )
    .await
}

/// An edge node's configuration body: the shield's pool first, the real origin's after it.
fn edge_body(shield_url: &str, origin_url: &str) -> String {
    format!(
        "[[origins]]\nname = \"shield\"\nurl = \"{shield_url}\"\n\
         [[origins]]\nname = \"origin\"\nurl = \"{origin_url}\"\n\
         [[pools]]\nname = \"shield\"\norigins = [\"shield\"]\n\
         [[pools]]\nname = \"direct\"\norigins = [\"origin\"]\n\
         [[sites]]\nhosts = [\"{HOST}\"]\n[[sites.routes]]\npools = [\"shield\", \"direct\"]\n"
    )
}

fn url(node: &TestNode) -> String {
    format!("http://{}", node.http)
}

fn cacheable(origin: &TestOrigin, path: &str, body: &'static str) {
    origin.route(
        path,
        Route::ok(body).header("cache-control", "public, max-age=300"),
    );
}

#[tokio::test]
async fn cache_status_names_both_tiers_and_the_origin_is_asked_once() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/obj",
        Route::ok("shielded body")
            .header("cache-control", "public, max-age=300")
            .header("cdn-cache-control", "max-age=600")
            .header("edgecache-cache-control", "max-age=120"),
    );
    let shield = shield(&origin.url()).await;
    let edge_a = TestNode::start(
        "via_name = \"edge-a\"\n",
        &edge_body(&url(&shield), &origin.url()),
    )
    .await;
    let edge_b = TestNode::start(
        "via_name = \"edge-b\"\n",
        &edge_body(&url(&shield), &origin.url()),
    )
    .await;

    // The first request passes both tiers: the shield's member first (nearer the origin).
    let first = get(edge_a.http, HOST, "/obj").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body, "shielded body");
    let status = first.header("cache-status").unwrap_or_default().to_owned();
    let (shield_at, edge_at) = (status.find("shield; fwd="), status.find("edge-a; fwd="));
    assert!(
        shield_at.is_some() && edge_at.is_some() && shield_at < edge_at,
        "{status}"
    );
    // CDN-Cache-Control is for every CDN cache: passed on. The shield obeys and removes its
    // own targeted field, so the edge never sees it (a tier that needs its own instructions
    // gets its own cache_control_field).
    assert_eq!(first.header("cdn-cache-control"), Some("max-age=600"));
    assert_eq!(first.header("edgecache-cache-control"), None);

    // The other edge node misses, the shield hits.
    let other = get(edge_b.http, HOST, "/obj").await;
    assert_eq!(other.body, "shielded body");
    let status = other.header("cache-status").unwrap_or_default();
    assert!(status.contains("shield; hit"), "{status}");
    assert!(status.contains("edge-b; fwd="), "{status}");

    // Many more requests at both edges: hits at the edge, one origin request in all.
    for i in 0..40 {
        let edge = if i % 2 == 0 { &edge_a } else { &edge_b };
        let got = get(edge.http, HOST, "/obj").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "shielded body");
        let status = got.header("cache-status").unwrap_or_default();
        assert!(status.ends_with("; hit"), "{status}");
    }
    assert_eq!(origin.count("/obj"), 1);
}

#[tokio::test]
async fn a_stopped_shield_is_failed_over_to_the_origin() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/before", "before");
    cacheable(&origin, "/after", "after");
    let mut shield = shield(&origin.url()).await;
    let edge = TestNode::start(
        "via_name = \"edge\"\n",
        &edge_body(&url(&shield), &origin.url()),
    )
    .await;
    let got = get(edge.http, HOST, "/before").await;
    assert!(
        got.header("cache-status")
            .unwrap_or_default()
            .contains("shield; fwd="),
        "{got:?}"
    );

    if let Some(node) = shield.node.take() {
        node.shutdown().await;
    }
    // The shield refuses connections now: every miss is answered from the real origin,
    // without a client error, and the edge alone is named.
    for i in 0..5 {
        let got = get(edge.http, HOST, &format!("/after?{i}")).await;
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.body, "after");
        let status = got.header("cache-status").unwrap_or_default();
        assert!(
            !status.contains("shield") && status.contains("edge; fwd="),
            "{status}"
        );
    }
    assert_eq!(origin.count("/before"), 1);
    assert_eq!(origin.total(), 6);
}

#[tokio::test]
async fn tiers_that_point_at_each_other_are_stopped_by_cdn_loop() {
    let origin = TestOrigin::start().await;
    cacheable(&origin, "/loop", "never reached");
    // Each tier's origin is the other: the edge's address is picked first (free, then
    // released) so the shield can be pointed at it, and picked again if it was taken.
    for _ in 0..5 {
        let edge_addr = closed_port();
        let shield = TestNode::start(
            "via_name = \"shield\"\n",
            &format!(
                "[[origins]]\nname = \"edge\"\nurl = \"http://{edge_addr}\"\n[[sites]]\nhosts = [\"{HOST}\"]\norigin = \"edge\"\n"
            ),
        )
        .await;
        let body = format!(
            "[[origins]]\nname = \"shield\"\nurl = \"{}\"\n[[sites]]\nhosts = [\"{HOST}\"]\norigin = \"shield\"\n",
            url(&shield)
        );
        let text = format!("[server]\nhttp = [\"{edge_addr}\"]\nvia_name = \"edge\"\n{body}");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = edgecache::Config::from_toml(&text, "edge.toml", dir.path())
            .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let Ok(edge) = edgecache::start(config).await else {
            continue;
        };

        // edge → shield → edge: the edge finds its own CDN-Loop member and answers 508,
        // which the shield passes back; the client gets an error, not a hang.
        let got = get(edge_addr, HOST, "/loop").await;
        assert_eq!(got.status, 508, "{got:?}");
        // The same from the shield's side.
        let got = get(shield.http, HOST, "/loop").await;
        assert_eq!(got.status, 508, "{got:?}");
        assert_eq!(origin.total(), 0);
        edge.shutdown().await;
        return;
    }
    panic!("no free port for the edge");
}

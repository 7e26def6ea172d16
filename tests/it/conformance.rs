//! Edges of RFC 9111 and RFC 9213 that a conformance run found, each written from the RFC's
//! text: invalid `Age`, invalid targeted fields, targeted fields downstream, and fields
//! named by `private=` / `no-cache=`.

use crate::support::*;

/// Two GETs of `path`: the second's `Cache-Status`, and how many requests reached the origin.
async fn twice(node: &TestNode, origin: &TestOrigin, path: &str) -> (Got, Got, usize) {
    let first = get(node.http, "site.test", path).await;
    let second = get(node.http, "site.test", path).await;
    (first, second, origin.count(path))
}

fn is_hit(r: &Got) -> bool {
    r.header("cache-status")
        .is_some_and(|c| c.contains("; hit"))
}

/// RFC 9111 §5.1: a cache that receives an `Age` that is not a non-negative integer ignores
/// it; the response is otherwise stored and reused as its lifetime says.
#[tokio::test]
async fn a_response_with_an_invalid_age_is_stored_and_reused() {
    let origin = TestOrigin::start().await;
    let bad = ["3c", "10 days", "-5", "1.5", "", "abc, 7"];
    for (i, age) in bad.iter().enumerate() {
        origin.route(
            &format!("/age{i}"),
            Route::ok("aged")
                .header("cache-control", "max-age=600")
                .header("age", age),
        );
    }
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for (i, age) in bad.iter().enumerate() {
        let (first, second, fetched) = twice(&node, &origin, &format!("/age{i}")).await;
        assert_eq!(first.status, 200, "Age: {age:?}");
        assert!(is_hit(&second), "Age: {age:?} {:?}", second.headers);
        assert_eq!(fetched, 1, "Age: {age:?}");
        let sent = second.header("age").unwrap_or("0");
        assert!(
            sent.parse::<u64>().is_ok_and(|a| a < 600),
            "Age sent: {sent:?}"
        );
    }
}

/// RFC 9213 §2.1: a targeted field that does not parse as a Structured Fields Dictionary, or
/// whose known directives have the wrong type, is ignored whole: `Cache-Control` applies.
#[tokio::test]
async fn an_invalid_cdn_cache_control_is_ignored_and_cache_control_applies() {
    let origin = TestOrigin::start().await;
    let invalid = [
        "max-age=\"60\"",
        "max-age=abc",
        "max-age=6.5",
        "max-age=-1",
        "no-store=1",
        "no-store=?0",
        "max-age=60,,",
        "Max-Age=60",
        "max-age=60 no-store",
        "private=(a b)",
    ];
    for (i, v) in invalid.iter().enumerate() {
        origin.route(
            &format!("/cdn{i}"),
            Route::ok("cdn")
                .header("cache-control", "max-age=600")
                .header("cdn-cache-control", v),
        );
    }
    // Valid targeted fields still rule, over Cache-Control.
    origin.route(
        "/valid-no-store",
        Route::ok("v")
            .header("cache-control", "max-age=600")
            .header("cdn-cache-control", "no-store"),
    );
    origin.route(
        "/valid-max-age",
        Route::ok("v").header("cache-control", "no-store").header(
            "cdn-cache-control",
            "max-age=600, stale-if-error=60, private=\"x-a\"",
        ),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for (i, v) in invalid.iter().enumerate() {
        let (_, second, fetched) = twice(&node, &origin, &format!("/cdn{i}")).await;
        assert!(
            is_hit(&second),
            "CDN-Cache-Control: {v} {:?}",
            second.headers
        );
        assert_eq!(fetched, 1, "CDN-Cache-Control: {v}");
    }
    let (_, second, fetched) = twice(&node, &origin, "/valid-no-store").await;
    assert!(!is_hit(&second));
    assert_eq!(fetched, 2);
    let (_, second, fetched) = twice(&node, &origin, "/valid-max-age").await;
    assert!(is_hit(&second), "{:?}", second.headers);
    assert_eq!(fetched, 1);
}

/// RFC 9213 §2.1: `CDN-Cache-Control` targets every CDN on the path, so it is passed on to
/// the client (a CDN layer in front needs it); the node's own field is consumed and removed,
/// and takes precedence over `CDN-Cache-Control`, which takes precedence over
/// `Cache-Control`.
#[tokio::test]
async fn cdn_cache_control_is_passed_on_and_our_own_field_is_consumed_first() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/both",
        Route::ok("both")
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "no-store")
            .header("edgecache-cache-control", "max-age=600"),
    );
    origin.route(
        "/cdn-only",
        Route::ok("cdn")
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "max-age=600"),
    );
    origin.route(
        "/ours-no-store",
        Route::ok("ours")
            .header("cache-control", "max-age=600")
            .header("cdn-cache-control", "max-age=600")
            .header("edgecache-cache-control", "no-store"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let (first, second, fetched) = twice(&node, &origin, "/both").await;
    assert!(is_hit(&second));
    assert_eq!(fetched, 1);
    for r in [&first, &second] {
        assert_eq!(r.header("cdn-cache-control"), Some("no-store"), "passed on");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(
            r.header("edgecache-cache-control"),
            None,
            "ours is consumed"
        );
    }
    let (first, second, fetched) = twice(&node, &origin, "/cdn-only").await;
    assert!(is_hit(&second));
    assert_eq!(fetched, 1);
    assert_eq!(first.header("cdn-cache-control"), Some("max-age=600"));
    let (_, second, fetched) = twice(&node, &origin, "/ours-no-store").await;
    assert!(!is_hit(&second));
    assert_eq!(fetched, 2);
}

/// The own field's name is configurable (`[cache] cache_control_field`).
#[tokio::test]
async fn the_own_targeted_field_has_a_configurable_name() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/x",
        Route::ok("x")
            .header("cache-control", "no-store")
            .header("edgecache-cache-control", "no-store")
            .header("acme-cache-control", "max-age=600"),
    );
    let config = format!(
        "[cache]\ncache_control_field = \"Acme-Cache-Control\"\n{}",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &config).await;
    let (first, second, fetched) = twice(&node, &origin, "/x").await;
    assert!(is_hit(&second));
    assert_eq!(fetched, 1);
    assert_eq!(first.header("acme-cache-control"), None);
    assert_eq!(
        first.header("edgecache-cache-control"),
        Some("no-store"),
        "not ours now"
    );
}

/// RFC 9111 §5.2.2.4 and §5.2.2.7: fields named by `no-cache="..."` and `private="..."` are
/// not stored and not reused; the response that came from the origin still carries them to
/// the client it answers, and no other client (a collapsed one included) sees them.
#[tokio::test]
async fn fields_named_by_private_and_no_cache_reach_only_the_first_client() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/small",
        Route::ok("small")
            .header(
                "cache-control",
                "max-age=600, private=\"x-secret\", no-cache=\"x-token\"",
            )
            .header("x-secret", "s1")
            .header("x-token", "t1")
            .header("x-public", "p"),
    );
    origin.route(
        "/large",
        Route::ok("")
            .generated(64 << 10, 4, true, std::time::Duration::ZERO)
            .header("cache-control", "max-age=600, private=\"x-secret\"")
            .header("x-secret", "s2"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let (first, second, fetched) = twice(&node, &origin, "/small").await;
    assert_eq!(fetched, 1);
    assert_eq!(
        first.header("x-secret"),
        Some("s1"),
        "the origin's answer, whole"
    );
    assert_eq!(first.header("x-token"), Some("t1"));
    assert!(is_hit(&second));
    assert_eq!(second.header("x-secret"), None, "not reused");
    assert_eq!(second.header("x-token"), None);
    assert_eq!(second.header("x-public"), Some("p"));
    let (first, second, fetched) = twice(&node, &origin, "/large").await;
    assert_eq!(fetched, 1);
    assert_eq!(first.header("x-secret"), Some("s2"));
    assert_eq!(first.body.len(), 256 << 10);
    assert_eq!(second.header("x-secret"), None);
    assert_eq!(second.body.len(), 256 << 10);
}

/// Collapsed requests share the leader's fetch, not its private fields: of many concurrent
/// requests for a cold object, only the one whose request reached the origin sees them.
#[tokio::test]
async fn collapsed_requests_do_not_see_the_leaders_private_fields() {
    let origin = TestOrigin::start().await;
    for (path, chunks) in [("/small", 1usize), ("/large", 8)] {
        origin.route(
            path,
            Route::ok("")
                .generated(16 << 10, chunks, true, std::time::Duration::ZERO)
                .delay(std::time::Duration::from_millis(300))
                .header("cache-control", "max-age=600, private=\"x-secret\"")
                .header("set-cookie", "id=leader")
                .header("x-secret", "leader's"),
        );
    }
    let node = TestNode::start(
        "",
        &format!(
            "{}[sites.cache]\nstore_set_cookie = true\n",
            site(&origin, "site.test", "")
        ),
    )
    .await;
    for (path, len) in [("/small", 16 << 10), ("/large", 8 * (16 << 10))] {
        let mut set = tokio::task::JoinSet::new();
        let addr = node.http;
        for _ in 0..20 {
            set.spawn(async move { get(addr, "site.test", path).await });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.push(r.expect("request task"));
        }
        assert_eq!(origin.count(path), 1, "{path}: collapsed");
        let seen = all
            .iter()
            .filter(|r| r.header("x-secret").is_some())
            .count();
        let cookies = all
            .iter()
            .filter(|r| r.header("set-cookie").is_some())
            .count();
        assert!(
            seen <= 1 && cookies == seen,
            "{path}: {seen} saw the secret, {cookies} the cookie"
        );
        assert!(all.iter().all(|r| r.status == 200 && r.body.len() == len));
    }
}

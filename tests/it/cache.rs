//! The first cache: storing, reusing, refusing, Age and Cache-Status.

use crate::support::*;

#[tokio::test]
async fn repeated_get_reaches_the_origin_once() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a.css",
        Route::ok("body{}")
            .header("cache-control", "public, max-age=60")
            .header("etag", "\"v1\""),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;

    let first = get(node.http, "site.test", "/a.css").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
    for _ in 0..5 {
        let r = get(node.http, "site.test", "/a.css").await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], b"body{}");
        assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
        assert_eq!(r.header("etag"), Some("\"v1\""));
        assert!(r.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
        assert_eq!(r.header("content-length"), Some("6"));
    }
    assert_eq!(origin.count("/a.css"), 1);
    // Another query string is another object.
    get(node.http, "site.test", "/a.css?v=2").await;
    assert_eq!(origin.count("/a.css?v=2"), 1);
}

#[tokio::test]
async fn no_store_reaches_the_origin_every_time() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/api",
        Route::ok("live").header("cache-control", "no-store"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for _ in 0..3 {
        let r = get(node.http, "site.test", "/api").await;
        assert_eq!(
            r.header("cache-status"),
            Some("edgecache; fwd=uri-miss; detail=no-store")
        );
    }
    assert_eq!(origin.count("/api"), 3);
}

#[tokio::test]
async fn private_set_cookie_and_unlabelled_responses_are_not_stored() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/private",
        Route::ok("p").header("cache-control", "private, max-age=60"),
    );
    origin.route(
        "/cookie",
        Route::ok("c")
            .header("cache-control", "max-age=60")
            .header("set-cookie", "s=1"),
    );
    origin.route("/plain", Route::ok("n"));
    origin.route(
        "/star",
        Route::ok("v")
            .header("cache-control", "max-age=60")
            .header("vary", "*"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for (path, detail) in [
        ("/private", "private"),
        ("/cookie", "set-cookie"),
        ("/plain", "not-fresh"),
        ("/star", "vary-star"),
    ] {
        for _ in 0..2 {
            let r = get(node.http, "site.test", path).await;
            assert_eq!(
                r.header("cache-status"),
                Some(format!("edgecache; fwd=uri-miss; detail={detail}").as_str())
            );
        }
        assert_eq!(origin.count(path), 2, "{path}");
    }
}

#[tokio::test]
async fn authorization_requests_are_stored_only_when_allowed() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/mine",
        Route::ok("secret").header("cache-control", "max-age=60"),
    );
    origin.route(
        "/shared",
        Route::ok("public").header("cache-control", "public, max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for path in ["/mine", "/shared"] {
        for _ in 0..2 {
            send(
                node.http,
                request("GET", "site.test", path, &[("authorization", "Bearer x")]),
            )
            .await;
        }
    }
    assert_eq!(origin.count("/mine"), 2);
    assert_eq!(origin.count("/shared"), 1);
}

#[tokio::test]
async fn expires_and_s_maxage_give_freshness() {
    let origin = TestOrigin::start().await;
    let future =
        httpdate::fmt_http_date(std::time::SystemTime::now() + std::time::Duration::from_secs(600));
    let route = Route::ok("e").header("expires", &future);
    origin.route("/expires", route);
    origin.route(
        "/smax",
        Route::ok("s").header("cache-control", "max-age=0, s-maxage=60"),
    );
    origin.route("/bad-expires", Route::ok("b").header("expires", "0"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for path in ["/expires", "/smax", "/bad-expires"] {
        get(node.http, "site.test", path).await;
        get(node.http, "site.test", path).await;
    }
    assert_eq!(origin.count("/expires"), 1);
    assert_eq!(
        origin.count("/smax"),
        1,
        "s-maxage wins over max-age for a shared cache"
    );
    assert_eq!(
        origin.count("/bad-expires"),
        2,
        "an invalid Expires is already stale"
    );
}

#[tokio::test]
async fn age_counts_the_origins_age() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/aged",
        Route::ok("a")
            .header("cache-control", "max-age=600")
            .header("age", "100"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/aged").await;
    let r = get(node.http, "site.test", "/aged").await;
    let age: u64 = r.header("age").and_then(|a| a.parse().ok()).expect("age");
    assert!((100..110).contains(&age), "age {age}");
}

#[tokio::test]
async fn an_aged_out_response_is_refetched() {
    let origin = TestOrigin::start().await;
    // Already 59 of its 60 seconds old on arrival: fresh for about a second.
    origin.route(
        "/short",
        Route::ok("s")
            .header("cache-control", "max-age=60")
            .header("age", "59"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/short").await;
    let o = origin.clone();
    let addr = node.http;
    let refetched = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            get(addr, "site.test", "/short").await;
            if o.count("/short") >= 2 {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    assert!(refetched.await, "stale entry was refetched");
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get_and_fills_the_cache() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/img",
        Route::ok("0123456789").header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let r = send(node.http, request("HEAD", "site.test", "/img", &[])).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("10"));
    // The HEAD miss was fetched as GET and stored: the GET is a hit.
    let node_http = node.http;
    assert!(
        eventually(std::time::Duration::from_secs(5), || node
            .node()
            .store()
            .entry_count()
            > 0
            || {
                node.node().store().sync();
                false
            })
        .await
    );
    let g = get(node_http, "site.test", "/img").await;
    assert_eq!(g.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(&g.body[..], b"0123456789");
    let h = send(node_http, request("HEAD", "site.test", "/img", &[])).await;
    assert_eq!(h.header("cache-status"), Some("edgecache; hit"));
    assert!(h.body.is_empty());
    assert_eq!(origin.count("/img"), 1);
}

#[tokio::test]
async fn post_is_forwarded_and_invalidates_the_stored_url() {
    let origin = TestOrigin::start().await;
    origin.route("/doc", Route::ok("v").header("cache-control", "max-age=60"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/doc").await;
    get(node.http, "site.test", "/doc").await;
    assert_eq!(origin.count("/doc"), 1);
    let p = send(node.http, request("POST", "site.test", "/doc", &[])).await;
    assert_eq!(p.header("cache-status"), Some("edgecache; fwd=method"));
    get(node.http, "site.test", "/doc").await;
    assert_eq!(
        origin.count("/doc"),
        3,
        "POST reached the origin and the next GET refetched"
    );
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v",
        Route::ok("v")
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Encoding"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    send(
        node.http,
        request("GET", "site.test", "/v", &[("accept-encoding", "gzip, br")]),
    )
    .await;
    let r = send(
        node.http,
        request("GET", "site.test", "/v", &[("accept-encoding", "gzip,br")]),
    )
    .await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    let r = send(
        node.http,
        request("GET", "site.test", "/v", &[("accept-encoding", "identity")]),
    )
    .await;
    assert_eq!(
        r.header("cache-status"),
        Some("edgecache; fwd=vary-miss; stored")
    );
    assert_eq!(origin.count("/v"), 2);
}

#[tokio::test]
async fn junk_vary_values_do_not_evict_a_popular_variant() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v",
        Route::ok("v")
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Language"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let asking = |lang: &str| request("GET", "site.test", "/v", &[("accept-language", lang)]);
    let r = send(node.http, asking("en")).await;
    assert_eq!(
        r.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
    for _ in 0..5 {
        let r = send(node.http, asking("en")).await;
        assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    }
    assert_eq!(origin.count("/v"), 1);

    let started = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..32 {
        let r = send(node.http, asking(&format!("junk-{i}"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], b"v", "every client gets its answer");
        match r.header("cache-status") {
            Some("edgecache; fwd=vary-miss; stored") => {}
            Some("edgecache; fwd=vary-miss; detail=variant-rate") => refused += 1,
            other => panic!("junk-{i}: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(origin.count("/v"), 33);

    let r = send(node.http, asking("en")).await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(&r.body[..], b"v");
    assert_eq!(origin.count("/v"), 33, "the popular variant was kept");
    // 8 new variants at once, then 4 a second: all 32 stored would take 6 s of arrivals.
    if elapsed < std::time::Duration::from_secs(6) {
        assert!(
            refused > 0,
            "new variants past the URL's budget are not stored"
        );
    }
}

#[tokio::test]
async fn client_no_cache_goes_to_the_origin_and_refreshes() {
    let origin = TestOrigin::start().await;
    origin.route("/n", Route::ok("n").header("cache-control", "max-age=60"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/n").await;
    let r = send(
        node.http,
        request("GET", "site.test", "/n", &[("cache-control", "no-cache")]),
    )
    .await;
    assert_eq!(
        r.header("cache-status"),
        Some("edgecache; fwd=request; fwd-status=200; stored")
    );
    assert_eq!(origin.count("/n"), 2);
    let r = get(node.http, "site.test", "/n").await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    let r = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/missing",
            &[("cache-control", "only-if-cached")],
        ),
    )
    .await;
    assert_eq!(r.status, 504);
    assert_eq!(origin.count("/missing"), 0);
}

#[tokio::test]
async fn objects_over_max_object_size_stream_through_uncached() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/big",
        Route::ok("")
            .generated(64 << 10, 40, true, std::time::Duration::ZERO)
            .header("cache-control", "max-age=60"),
    );
    origin.route(
        "/big-chunked",
        Route::ok("")
            .generated(64 << 10, 40, false, std::time::Duration::ZERO)
            .header("cache-control", "max-age=60"),
    );
    let node = TestNode::start(
        "",
        &format!(
            "[cache]\nmax_object_size = \"1MiB\"\n{}",
            site(&origin, "site.test", "")
        ),
    )
    .await;
    for path in ["/big", "/big-chunked"] {
        for _ in 0..2 {
            let r = get(node.http, "site.test", path).await;
            assert_eq!(r.body.len(), 40 * (64 << 10));
        }
        assert_eq!(origin.count(path), 2, "{path}");
    }
}

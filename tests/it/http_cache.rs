//! The full HTTP cache through the real proxy: validation, stale serving, collapsing, ranges,
//! targeted directives, keys, rules and purge.

use std::time::Duration;

use crate::support::*;

/// A route that is stale on arrival (its Age equals its max-age) with validators.
fn stale_on_arrival(body: &'static str, extra_cc: &str) -> Route {
    Route::ok(body)
        .header("cache-control", &format!("max-age=5{extra_cc}"))
        .header("age", "5")
        .header("etag", "\"v1\"")
        .header("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")
}

async fn admin_post(addr: std::net::SocketAddr, token: Option<&str>, json: &str) -> (String, bool) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /purge HTTP/1.1\r\nHost: admin\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    raw(addr, req.as_bytes(), Duration::from_secs(5)).await
}

/// RFC 9211 §2: a cache adds its member after those already in `Cache-Status`, so an
/// operator sees the whole chain (here an origin shield behind edgecache).
#[tokio::test]
async fn cache_status_from_caches_behind_us_is_kept_with_ours_last() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/small",
        Route::ok("small")
            .header("cache-control", "max-age=60")
            .header("cache-status", "shield; hit; ttl=50"),
    );
    origin.route(
        "/large",
        Route::ok("")
            .generated(64 << 10, 4, true, Duration::ZERO)
            .header("cache-control", "max-age=60")
            .header("cache-status", "shield; fwd=uri-miss; stored"),
    );
    origin.route(
        "/private",
        Route::ok("mine")
            .header("cache-control", "no-store")
            .header("cache-status", "shield; fwd=uri-miss"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for (path, upstream) in [
        ("/small", "shield; hit; ttl=50"),
        ("/large", "shield; fwd=uri-miss; stored"),
    ] {
        let miss = get(node.http, "site.test", path).await;
        assert_eq!(
            miss.header("cache-status").map(str::to_owned),
            Some(format!("{upstream}, edgecache; fwd=uri-miss; stored")),
            "{path}"
        );
        let hit = get(node.http, "site.test", path).await;
        assert_eq!(
            hit.header("cache-status").map(str::to_owned),
            Some(format!("{upstream}, edgecache; hit")),
            "{path}"
        );
        assert_eq!(origin.count(path), 1, "{path}: the second was a hit");
    }
    let large = get(node.http, "site.test", "/large").await;
    assert_eq!(large.body.len(), 4 * (64 << 10));
    let private = get(node.http, "site.test", "/private").await;
    assert_eq!(
        private.header("cache-status"),
        Some("shield; fwd=uri-miss, edgecache; fwd=uri-miss; detail=no-store")
    );
}

#[tokio::test]
async fn stale_entry_is_revalidated_and_a_304_refreshes_it_without_a_body() {
    let origin = TestOrigin::start().await;
    origin.route("/r", stale_on_arrival("payload", ""));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let first = get(node.http, "site.test", "/r").await;
    assert_eq!(
        first.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
    let second = get(node.http, "site.test", "/r").await;
    assert_eq!(second.status, 200);
    assert_eq!(
        &second.body[..],
        b"payload",
        "the stored body is served after a 304"
    );
    assert_eq!(
        second.header("cache-status"),
        Some("edgecache; fwd=stale; fwd-status=304")
    );
    assert_eq!(origin.count("/r"), 2);
    assert_eq!(origin.not_modified(), 1);
    let seen = origin.last_headers("/r");
    assert_eq!(seen["if-none-match"], "\"v1\"");
    assert_eq!(seen["if-modified-since"], "Tue, 03 Nov 2026 10:00:00 GMT");
}

/// A response stored without ETag or Last-Modified is still a current representation: `*`
/// matches it (RFC 9110 §13.1.1, §13.1.2) and If-Unmodified-Since is ignored (§13.1.4).
/// These used to get 412, 200 and 412.
#[tokio::test]
async fn conditionals_on_a_response_stored_without_validators() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/plain",
        Route::ok("content").header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/plain").await;
    let cases: [(&str, &str, u16); 3] = [
        ("if-match", "*", 200),
        ("if-none-match", "*", 304),
        ("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT", 200),
    ];
    for (name, value, status) in cases {
        let r = send(
            node.http,
            request("GET", "site.test", "/plain", &[(name, value)]),
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{name}: {value}");
        let body: &[u8] = if status == 200 { b"content" } else { b"" };
        assert_eq!(&r.body[..], body);
    }
    assert_eq!(origin.count("/plain"), 1, "answered from the cache");
}

#[tokio::test]
async fn client_conditionals_are_answered_from_the_cache() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/c",
        Route::ok("content")
            .header("cache-control", "max-age=60")
            .header("etag", "\"v1\"")
            .header("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")
            .header("content-type", "text/plain"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/c").await;
    let cases: [(&[(&str, &str)], u16); 8] = [
        (&[("if-none-match", "\"v1\"")], 304),
        (&[("if-none-match", "W/\"v1\"")], 304),
        (&[("if-none-match", "\"a\", \"v1\"")], 304),
        (&[("if-none-match", "\"other\"")], 200),
        (
            &[("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")],
            304,
        ),
        (
            &[("if-modified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
            200,
        ),
        (&[("if-match", "\"other\"")], 412),
        (
            &[("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
            412,
        ),
    ];
    for (headers, status) in cases {
        let r = send(node.http, request("GET", "site.test", "/c", headers)).await;
        assert_eq!(r.status.as_u16(), status, "{headers:?}");
        if status == 304 {
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), Some("\"v1\""));
            assert_eq!(r.header("cache-control"), Some("max-age=60"));
            assert!(
                r.header("content-type").is_none(),
                "a 304 carries no representation metadata"
            );
        }
    }
    assert_eq!(
        origin.count("/c"),
        1,
        "every conditional was answered from the cache"
    );
    // A conditional miss fetches the whole object, stores it, and answers the condition.
    origin.route(
        "/d",
        Route::ok("dd")
            .header("cache-control", "max-age=60")
            .header("etag", "\"d1\""),
    );
    let r = send(
        node.http,
        request("GET", "site.test", "/d", &[("if-none-match", "\"d1\"")]),
    )
    .await;
    assert_eq!(r.status, 304);
    assert!(origin.last_headers("/d").get("if-none-match").is_none());
    assert_eq!(
        get(node.http, "site.test", "/d")
            .await
            .header("cache-status"),
        Some("edgecache; hit")
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once_in_the_background() {
    let origin = TestOrigin::start().await;
    let route = || {
        Route::ok("v")
            .header("cache-control", "max-age=5, stale-while-revalidate=600")
            .header("age", "5")
    };
    origin.route("/swr", route());
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/swr").await;
    // The refresh is slow: every request meanwhile gets the stale copy and no new fetch.
    origin.route("/swr", route().delay(Duration::from_secs(3)));
    for _ in 0..5 {
        let r = get(node.http, "site.test", "/swr").await;
        assert_eq!(&r.body[..], b"v");
        let cs = r.header("cache-status").unwrap_or_default().to_owned();
        assert!(
            cs.starts_with("edgecache; hit; fwd=stale;")
                && cs.contains("detail=stale-while-revalidate"),
            "{cs}"
        );
    }
    assert!(eventually(Duration::from_secs(10), || origin.count("/swr") == 2).await);
    assert_eq!(origin.count("/swr"), 2, "exactly one background refresh");
}

#[tokio::test]
async fn stale_if_error_serves_stale_when_the_origin_fails() {
    let origin = TestOrigin::start().await;
    origin.route("/e", stale_on_arrival("good", ", stale-if-error=600"));
    origin.route(
        "/m",
        stale_on_arrival("good", ", must-revalidate, stale-if-error=600"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/e").await;
    get(node.http, "site.test", "/m").await;
    origin.route("/e", Route::ok("broken").status(503));
    origin.route("/m", Route::ok("broken").status(503));
    let r = get(node.http, "site.test", "/e").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"good");
    let cs = r.header("cache-status").unwrap_or_default();
    assert!(
        cs.contains("fwd-status=503") && cs.contains("detail=stale-if-error"),
        "{cs}"
    );
    let m = get(node.http, "site.test", "/m").await;
    assert_eq!(m.status, 503, "must-revalidate forbids serving stale");
    origin.stop();
    let m = get(node.http, "site.test", "/m").await;
    assert_eq!(
        m.status, 504,
        "a response that must be revalidated and cannot be is a 504"
    );
}

#[tokio::test]
async fn site_grace_covers_an_origin_error_and_an_origin_that_is_down() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/g",
        Route::ok("kept")
            .header("cache-control", "max-age=5")
            .header("age", "5"),
    );
    let body = format!(
        "{}[sites.cache]\nstale_if_error = \"1h\"\n",
        site(&origin, "site.test", "connect_timeout = \"500ms\"")
    );
    let node = TestNode::start("", &body).await;
    assert_eq!(&get(node.http, "site.test", "/g").await.body[..], b"kept");
    origin.route("/g", Route::ok("").status(500));
    let r = get(node.http, "site.test", "/g").await;
    assert_eq!(&r.body[..], b"kept", "a 500 is covered by the site's grace");
    origin.stop();
    let r = get(node.http, "site.test", "/g").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"kept", "a refused connection is covered too");
    let cs = r.header("cache-status").unwrap_or_default();
    assert!(
        cs.contains("fwd-status=502") && cs.contains("detail=stale-if-error"),
        "{cs}"
    );
    // Without anything stored, the client sees the failure.
    assert_eq!(
        get(node.http, "site.test", "/never-stored").await.status,
        502
    );
}

#[tokio::test]
async fn no_cache_responses_are_stored_but_revalidated_on_every_use() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/nc",
        Route::ok("body")
            .header("cache-control", "no-cache, max-age=600")
            .header("etag", "\"n1\""),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/nc").await;
    for _ in 0..2 {
        let r = get(node.http, "site.test", "/nc").await;
        assert_eq!(&r.body[..], b"body");
        assert_eq!(
            r.header("cache-status"),
            Some("edgecache; fwd=stale; fwd-status=304")
        );
    }
    assert_eq!(origin.count("/nc"), 3);
    assert_eq!(
        origin.not_modified(),
        2,
        "the body came from the cache each time"
    );
}

#[tokio::test]
async fn set_cookie_responses_are_stored_only_when_the_site_opts_in_and_never_share_the_cookie() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/sc",
        Route::ok("page")
            .header("cache-control", "max-age=600")
            .header("set-cookie", "session=alice"),
    );
    let body = format!(
        "{}[sites.cache]\nstore_set_cookie = true\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    for i in 0..3 {
        let r = get(node.http, "site.test", "/sc").await;
        assert_eq!(&r.body[..], b"page");
        if i == 0 {
            // The origin's answer to this client: its cookie is its own.
            assert_eq!(r.header("set-cookie"), Some("session=alice"));
        } else {
            assert!(
                r.header("set-cookie").is_none(),
                "a stored cookie would leak to other users"
            );
        }
    }
    assert_eq!(origin.count("/sc"), 1);
}

#[tokio::test]
async fn a_site_may_ignore_client_no_cache() {
    let origin = TestOrigin::start().await;
    origin.route("/i", Route::ok("i").header("cache-control", "max-age=600"));
    let body = format!(
        "{}[sites.cache]\nclient_no_cache = \"ignore\"\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    get(node.http, "site.test", "/i").await;
    let r = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/i",
            &[("cache-control", "no-cache"), ("pragma", "no-cache")],
        ),
    )
    .await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(origin.count("/i"), 1);
}

#[tokio::test]
async fn an_aborted_origin_transfer_is_never_stored() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cut",
        Route::ok("")
            .generated(4096, 4, false, Duration::from_millis(50))
            .header("cache-control", "max-age=600")
            .aborting(),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for _ in 0..2 {
        let (text, _) = raw(
            node.http,
            b"GET /cut HTTP/1.1\r\nHost: site.test\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            &text[..text.len().min(100)]
        );
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "the cut body is not presented as complete"
        );
    }
    assert_eq!(
        origin.count("/cut"),
        2,
        "nothing was stored from the cut transfer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_origin_request() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cold",
        Route::ok("")
            .generated(16 << 10, 16, true, Duration::from_millis(20))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300)),
    );
    let node = TestNode::start(
        "h2_max_concurrent_streams = 200",
        &site(&origin, "site.test", ""),
    )
    .await;
    let answers = h2c_concurrent(node.http, 10, 100, "http://site.test/cold").await;
    let mut collapsed = 0;
    for r in answers {
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 16 * (16 << 10), "full body");
        if r.header("cache-status")
            .is_some_and(|c| c.contains("collapsed"))
        {
            collapsed += 1;
        }
    }
    assert_eq!(
        origin.count("/cold"),
        1,
        "one origin request for 1,000 clients"
    );
    assert!(collapsed > 0);
}

#[tokio::test]
async fn collapsed_clients_receive_the_body_as_it_arrives() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/slow",
        Route::ok("")
            .generated(16 << 10, 10, true, Duration::from_millis(200))
            .header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let addr = node.http;
    let leader = tokio::spawn(async move { get(addr, "site.test", "/slow").await });
    assert!(eventually(Duration::from_secs(5), || origin.count("/slow") == 1).await);
    // A follower joins mid-transfer and gets its first bytes before the origin has finished.
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "site.test", "/slow", &[]))
        .await
        .expect("response");
    assert!(resp.headers()["cache-status"]
        .to_str()
        .unwrap_or("")
        .contains("collapsed"));
    let mut body = resp.into_body();
    let first = body.frame().await.expect("frame").expect("ok");
    assert!(first.is_data());
    assert_eq!(
        origin.completed("/slow"),
        0,
        "streamed before the origin finished"
    );
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(
        first.into_data().map(|d| d.len()).unwrap_or(0) + rest.len(),
        10 * (16 << 10)
    );
    assert_eq!(leader.await.expect("leader").body.len(), 10 * (16 << 10));
    assert_eq!(origin.count("/slow"), 1);
}

#[tokio::test]
async fn uncacheable_responses_release_waiters_and_skip_collapsing_afterwards() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/nc",
        Route::ok("private stuff")
            .header("cache-control", "no-store")
            .delay(Duration::from_millis(300)),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let addr = node.http;
        tasks.push(tokio::spawn(
            async move { get(addr, "site.test", "/nc").await },
        ));
    }
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(&r.body[..], b"private stuff");
    }
    assert_eq!(origin.count("/nc"), 20, "every client got its own response");
    let r = get(node.http, "site.test", "/nc").await;
    assert_eq!(
        r.header("cache-status"),
        Some("edgecache; fwd=uri-miss; detail=no-store")
    );
}

#[tokio::test]
async fn ranges_are_cut_from_the_stored_object() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/bin",
        Route::ok("0123456789")
            .header("cache-control", "max-age=60")
            .header("etag", "\"b1\"")
            .header("content-type", "text/plain"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    // A range on a miss fetches the whole object and answers the range.
    let r = send(
        node.http,
        request("GET", "site.test", "/bin", &[("range", "bytes=2-4")]),
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(&r.body[..], b"234");
    assert_eq!(r.header("content-range"), Some("bytes 2-4/10"));
    assert!(
        origin.last_headers("/bin").get("range").is_none(),
        "the origin was asked for the whole object"
    );
    let r = send(
        node.http,
        request("GET", "site.test", "/bin", &[("range", "bytes=-3")]),
    )
    .await;
    assert_eq!(
        (&r.body[..], r.header("content-range")),
        (&b"789"[..], Some("bytes 7-9/10"))
    );
    let r = send(
        node.http,
        request("GET", "site.test", "/bin", &[("range", "bytes=0-0,8-9")]),
    )
    .await;
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap_or_default().to_owned();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        text.contains("Content-Range: bytes 0-0/10\r\n\r\n0\r\n"),
        "{text}"
    );
    assert!(
        text.contains("Content-Range: bytes 8-9/10\r\n\r\n89\r\n"),
        "{text}"
    );
    let r = send(
        node.http,
        request("GET", "site.test", "/bin", &[("range", "bytes=20-")]),
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10"));
    let r = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/bin",
            &[("range", "bytes=0-1"), ("if-range", "\"old\"")],
        ),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), &r.body[..]),
        (200, &b"0123456789"[..]),
        "If-Range mismatch sends everything"
    );
    let r = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/bin",
            &[("range", "bytes=0-1"), ("if-range", "\"b1\"")],
        ),
    )
    .await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (206, &b"01"[..]));
    assert_eq!(origin.count("/bin"), 1);
}

/// RFC 9111 §3.4: an origin's 206 is stored as what it is, part of the object. A whole GET
/// still needs the origin (the part cannot answer it, and without a strong validator no
/// missing bytes can be asked for to join it); a range inside the part is a hit.
#[tokio::test]
async fn origin_partial_content_is_stored_as_a_part_of_the_object() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/p",
        Route::ok("part")
            .status(206)
            .header("content-range", "bytes 0-3/100")
            .header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for _ in 0..2 {
        let r = get(node.http, "site.test", "/p").await;
        assert_eq!(r.status, 206);
        assert_eq!(&r.body[..], b"part");
        assert_eq!(r.header("content-range"), Some("bytes 0-3/100"));
        assert_eq!(
            r.header("cache-status"),
            Some("edgecache; fwd=uri-miss; stored; detail=partial")
        );
    }
    assert_eq!(origin.count("/p"), 2);
    let r = send(
        node.http,
        request("GET", "site.test", "/p", &[("range", "bytes=1-2")]),
    )
    .await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (206, &b"ar"[..]));
    assert_eq!(r.header("content-range"), Some("bytes 1-2/100"));
    assert_eq!(
        r.header("cache-status"),
        Some("edgecache; hit; detail=partial")
    );
    assert_eq!(origin.count("/p"), 2);
}

#[tokio::test]
async fn vary_variants_are_kept_side_by_side() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v",
        Route::ok("v")
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Encoding"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for _ in 0..3 {
        for ae in ["gzip", "br", "br, gzip", "gzip,br", "GZIP, BR"] {
            send(
                node.http,
                request("GET", "site.test", "/v", &[("accept-encoding", ae)]),
            )
            .await;
        }
    }
    assert_eq!(origin.count("/v"), 3, "three variants, each fetched once");
}

#[tokio::test]
async fn cdn_cache_control_steers_this_cache_and_is_passed_on_for_caches_in_front() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/t",
        Route::ok("t")
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "max-age=60"),
    );
    origin.route(
        "/s",
        Route::ok("s")
            .header("cache-control", "max-age=600")
            .header("surrogate-control", "no-store"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for _ in 0..2 {
        let r = get(node.http, "site.test", "/t").await;
        assert_eq!(
            r.header("cache-control"),
            Some("no-store"),
            "Cache-Control reaches clients unchanged"
        );
        assert_eq!(r.header("cdn-cache-control"), Some("max-age=60"));
        let r = get(node.http, "site.test", "/s").await;
        assert!(r.header("surrogate-control").is_none());
    }
    assert_eq!(origin.count("/t"), 1);
    assert_eq!(origin.count("/s"), 2);
}

#[tokio::test]
async fn qualified_private_fields_are_stripped_and_heuristics_apply() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/pf",
        Route::ok("p")
            .header("cache-control", "private=\"x-user\", max-age=60")
            .header("x-user", "alice"),
    );
    origin.route(
        "/h",
        Route::ok("h").header("last-modified", "Sun, 01 Nov 2026 00:00:00 GMT"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for i in 0..2 {
        let r = get(node.http, "site.test", "/pf").await;
        if i == 0 {
            assert_eq!(
                r.header("x-user"),
                Some("alice"),
                "the origin's answer to alice"
            );
        } else {
            assert!(
                r.header("x-user").is_none(),
                "a private field is never shared"
            );
        }
        get(node.http, "site.test", "/h").await;
    }
    assert_eq!(origin.count("/pf"), 1);
    assert_eq!(
        origin.count("/h"),
        1,
        "Last-Modified gives a heuristic lifetime"
    );
}

#[tokio::test]
async fn keys_can_sort_or_drop_query_parameters_and_add_headers_and_cookies() {
    let origin = TestOrigin::start().await;
    origin.route("/k", Route::ok("k").header("cache-control", "max-age=60"));
    let body = format!(
        "{}[sites.cache]\nquery = \"sort\"\nquery_ignore = [\"utm_source\"]\nkey_headers = [\"X-Device\"]\nkey_cookies = [\"lang\"]\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    get(node.http, "site.test", "/k?b=1&a=2").await;
    let r = get(node.http, "site.test", "/k?a=2&b=1&utm_source=mail").await;
    assert_eq!(r.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(origin.total(), 1);
    send(
        node.http,
        request("GET", "site.test", "/k", &[("x-device", "mobile")]),
    )
    .await;
    send(
        node.http,
        request("GET", "site.test", "/k", &[("x-device", "mobile")]),
    )
    .await;
    send(
        node.http,
        request("GET", "site.test", "/k", &[("x-device", "desktop")]),
    )
    .await;
    send(
        node.http,
        request(
            "GET",
            "site.test",
            "/k",
            &[("cookie", "lang=de; session=1")],
        ),
    )
    .await;
    send(
        node.http,
        request(
            "GET",
            "site.test",
            "/k",
            &[("cookie", "session=2; lang=de")],
        ),
    )
    .await;
    assert_eq!(
        origin.total(),
        4,
        "mobile, desktop and lang=de are three keys"
    );
}

#[tokio::test]
async fn path_rules_bypass_force_ttl_and_cache_404s() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/api/x",
        Route::ok("a").header("cache-control", "max-age=60"),
    );
    origin.route(
        "/static/app.js",
        Route::ok("js").header("cache-control", "max-age=0"),
    );
    let body = format!(
        "{}[[sites.rules]]\nprefix = \"/api/\"\nbypass = true\n[[sites.rules]]\npath = \"/static/*\"\nttl = \"1h\"\n[[sites.rules]]\nprefix = \"/\"\nstatus_ttl = {{ \"404\" = \"30s\" }}\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    for _ in 0..2 {
        let r = get(node.http, "site.test", "/api/x").await;
        assert_eq!(r.header("cache-status"), Some("edgecache; fwd=bypass"));
        get(node.http, "site.test", "/static/app.js").await;
        assert_eq!(get(node.http, "site.test", "/missing").await.status, 404);
    }
    assert_eq!(origin.count("/api/x"), 2);
    assert_eq!(origin.count("/static/app.js"), 1);
    assert_eq!(origin.count("/missing"), 1);
}

#[tokio::test]
async fn purge_over_admin_by_url_prefix_tag_and_all() {
    let origin = TestOrigin::start().await;
    for p in ["/a", "/img/1", "/img/2", "/t1", "/t2"] {
        origin.route(
            p,
            Route::ok("x")
                .header("cache-control", "max-age=600")
                .header("surrogate-key", "red blue")
                .header("vary", "accept-encoding"),
        );
    }
    origin.route(
        "/t2",
        Route::ok("x")
            .header("cache-control", "max-age=600")
            .header("cache-tag", "reddish,green"),
    );
    let body = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    let admin = node.node().admin_addr().expect("admin");
    for p in ["/a", "/img/1", "/img/2", "/t1", "/t2"] {
        get(node.http, "site.test", p).await;
    }
    send(
        node.http,
        request("GET", "site.test", "/a", &[("accept-encoding", "br")]),
    )
    .await;
    assert_eq!(origin.count("/a"), 2, "two variants of /a");

    let (text, _) = admin_post(admin, None, "{\"all\":true}").await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    let (text, _) = admin_post(admin, Some("wrong"), "{\"all\":true}").await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    let (text, _) = admin_post(admin, Some("s3cret"), "{\"url\":\"https://site.test/a\"}").await;
    assert!(
        text.contains("{\"purged\":2,"),
        "every variant of the URL: {text}"
    );
    let (text, _) = admin_post(
        admin,
        Some("s3cret"),
        "{\"host\":\"site.test\",\"prefix\":\"/img/\"}",
    )
    .await;
    assert!(text.contains("{\"purged\":2,"), "{text}");
    let (text, _) = admin_post(admin, Some("s3cret"), "{\"tag\":\"red\"}").await;
    assert!(
        text.contains("{\"purged\":1,"),
        "tags match exactly, not as a prefix: {text}"
    );
    let (text, _) = admin_post(admin, Some("s3cret"), "{\"all\":true}").await;
    assert!(text.contains("{\"purged\":1,"), "{text}");
    let (text, _) = admin_post(admin, Some("s3cret"), "{\"bogus\":1}").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    for p in ["/a", "/img/1", "/t1", "/t2"] {
        assert_ne!(
            get(node.http, "site.test", p).await.header("cache-status"),
            Some("edgecache; hit"),
            "{p}"
        );
    }
    // Metrics are scrapeable on the same listener.
    let (text, _) = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        text.contains("edgecache_requests_total{result=\"miss\",status=\"2xx\"}"),
        "{text}"
    );
    assert!(text.contains("edgecache_purged_objects_total 6"), "{text}");
}

#[tokio::test]
async fn soft_purge_keeps_stale_if_error_protection() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/s",
        Route::ok("old").header("cache-control", "max-age=600, stale-if-error=600"),
    );
    let body = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &body).await;
    let admin = node.node().admin_addr().expect("admin");
    get(node.http, "site.test", "/s").await;
    let (text, _) = admin_post(
        admin,
        Some("t"),
        "{\"url\":\"http://site.test/s\",\"soft\":true}",
    )
    .await;
    assert!(text.contains("\"purged\":1"), "{text}");
    origin.route("/s", Route::ok("").status(500));
    let r = get(node.http, "site.test", "/s").await;
    assert_eq!(
        &r.body[..],
        b"old",
        "soft-purged content still covers an origin error"
    );
    origin.route(
        "/s",
        Route::ok("new").header("cache-control", "max-age=600"),
    );
    assert_eq!(
        &get(node.http, "site.test", "/s").await.body[..],
        b"new",
        "but it is no longer served as fresh"
    );
}

#[tokio::test]
async fn purge_method_only_from_allowed_networks() {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("x").header("cache-control", "max-age=600"));
    let allowed = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"127.0.0.1/32\"]\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &allowed).await;
    get(node.http, "site.test", "/p").await;
    let r = send(node.http, request("PURGE", "site.test", "/p", &[])).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"{\"purged\":1}\n");
    get(node.http, "site.test", "/p").await;
    assert_eq!(origin.count("/p"), 2);
    let denied = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"10.0.0.0/8\"]\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &denied).await;
    assert_eq!(
        send(node.http, request("PURGE", "site.test", "/p", &[]))
            .await
            .status,
        403
    );
}

/// The PURGE method removed stored responses without counting them in
/// `edgecache_purged_objects_total`, which counts the admin listener's purges.
#[tokio::test]
async fn purge_method_counts_purged_objects() {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("x").header("cache-control", "max-age=600"));
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\npurge_allow = [\"127.0.0.1/32\"]\n",
        site(&origin, "site.test", "")
    );
    let node = TestNode::start("", &config).await;
    get(node.http, "site.test", "/p").await;
    let r = send(node.http, request("PURGE", "site.test", "/p", &[])).await;
    assert_eq!(&r.body[..], b"{\"purged\":1}\n");
    assert_eq!(metric(&node, "edgecache_purged_objects_total").await, 1);
}

#[tokio::test]
async fn unsafe_methods_invalidate_location_and_content_location() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/list",
        Route::ok("l").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/item",
        Route::ok("i").header("cache-control", "max-age=600"),
    );
    origin.route(
        "/form",
        Route::ok("ok")
            .status(201)
            .header("location", "/item")
            .header("content-location", "http://site.test/list"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    get(node.http, "site.test", "/list").await;
    get(node.http, "site.test", "/item").await;
    send(node.http, request("POST", "site.test", "/form", &[])).await;
    get(node.http, "site.test", "/list").await;
    get(node.http, "site.test", "/item").await;
    assert_eq!(origin.count("/list"), 2);
    assert_eq!(origin.count("/item"), 2);
}

#[tokio::test]
async fn client_max_stale_and_min_fresh() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/ms",
        Route::ok("m")
            .header("cache-control", "max-age=5")
            .header("age", "10"),
    );
    origin.route("/mf", Route::ok("f").header("cache-control", "max-age=60"));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let first = get(node.http, "site.test", "/ms").await;
    assert_eq!(
        first.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
    let r = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/ms",
            &[("cache-control", "max-stale=60")],
        ),
    )
    .await;

    assert!(r
        .header("cache-status")
        .is_some_and(|c| c.contains("detail=max-stale")));
    assert_eq!(origin.count("/ms"), 1);
    get(node.http, "site.test", "/mf").await;
    send(
        node.http,
        request(
            "GET",
            "site.test",
            "/mf",
            &[("cache-control", "min-fresh=3600")],
        ),
    )
    .await;
    assert_eq!(origin.count("/mf"), 2, "not fresh enough for the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_objects_are_collapsed_too() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/small",
        Route::ok("tiny body")
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300)),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = node.http;
        tasks.push(tokio::spawn(async move {
            get(addr, "site.test", "/small").await
        }));
    }
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(&r.body[..], b"tiny body");
        assert_eq!(r.header("content-length"), Some("9"));
    }
    assert_eq!(origin.count("/small"), 1);
}

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

/// RFC 9111 §5.2.2.3: `must-understand` with `no-store` is stored when the cache knows the
/// status code's caching rules (a 200), and not stored when it does not (a 299, unknown).
#[tokio::test]
async fn must_understand_overrides_no_store_only_for_understood_status_codes() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/known",
        Route::ok("k").header("cache-control", "max-age=600, must-understand, no-store"),
    );
    origin.route(
        "/unknown",
        Route::ok("u")
            .status(299)
            .header("cache-control", "max-age=600, must-understand, no-store"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let (_, second, fetched) = twice(&node, &origin, "/known").await;
    assert!(is_hit(&second));
    assert_eq!(fetched, 1);
    let (_, second, fetched) = twice(&node, &origin, "/unknown").await;
    assert!(!is_hit(&second));
    assert_eq!(fetched, 2);
}

/// RFC 9110 §5.6.7: `Expires` in the asctime format, and day and month names in any case.
#[tokio::test]
async fn expires_in_every_date_format_and_letter_case_gives_freshness() {
    let origin = TestOrigin::start().await;
    let when =
        httpdate::fmt_http_date(std::time::SystemTime::now() + std::time::Duration::from_secs(600));
    // "Thu, 03 Dec 2026 16:00:00 GMT" → asctime "Thu Dec  3 16:00:00 2026" and upper case.
    let parts: Vec<&str> = when.split(' ').collect();
    let day: u32 = parts[1].parse().expect("day");
    let asctime = format!(
        "{} {} {day:>2} {} {}",
        &parts[0][..3],
        parts[2],
        parts[4],
        parts[3]
    );
    for (i, expires) in [asctime, when.to_uppercase(), when.to_lowercase()]
        .iter()
        .enumerate()
    {
        origin.route(&format!("/e{i}"), Route::ok("e").header("expires", expires));
    }
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for i in 0..3 {
        let (_, second, fetched) = twice(&node, &origin, &format!("/e{i}")).await;
        assert!(is_hit(&second), "/e{i}: {:?}", second.headers);
        assert_eq!(fetched, 1);
    }
}

/// RFC 9110 §15.2: interim (1xx) responses from an origin never break the exchange and are
/// never stored or reused: the final response is. (hyper cannot yet send a 1xx from a server,
/// so `103 Early Hints` is not forwarded; see the README.)
#[tokio::test]
async fn interim_responses_from_the_origin_are_not_stored_and_do_not_break_the_exchange() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        counted.fetch_add(1, Ordering::SeqCst);
                        let reply = "HTTP/1.1 100 Continue\r\n\r\n\
                                     HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
                                     HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\
                                     Cache-Control: max-age=600\r\n\r\nfinal";
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let config = format!(
        "[[origins]]\nname = \"o\"\nurl = \"http://{addr}\"\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n"
    );
    let node = TestNode::start("", &config).await;
    let first = get(node.http, "site.test", "/x").await;
    assert_eq!(
        (first.status.as_u16(), &first.body[..]),
        (200, &b"final"[..])
    );
    let second = get(node.http, "site.test", "/x").await;
    assert_eq!(
        (second.status.as_u16(), &second.body[..]),
        (200, &b"final"[..])
    );
    assert!(is_hit(&second), "{:?}", second.headers);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

/// RFC 9110 §9.3.3 and RFC 9111 §4: a POST response with explicit freshness and a
/// `Content-Location` equal to the POST's target answers a later GET of that URI; one that
/// names another URI, or has no explicit freshness, does not.
#[tokio::test]
async fn a_post_response_naming_its_own_uri_answers_later_gets() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/form",
        Route::ok("the result")
            .header("cache-control", "max-age=60")
            .header("content-location", "/form"),
    );
    origin.route(
        "/moved",
        Route::ok("elsewhere")
            .header("cache-control", "max-age=60")
            .header("content-location", "/other"),
    );
    origin.route(
        "/heuristic",
        Route::ok("no lifetime")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            .header("content-location", "/heuristic"),
    );
    origin.route(
        "/personal",
        Route::ok("yours")
            .header("cache-control", "private, max-age=60")
            .header("content-location", "/personal"),
    );
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    for path in ["/form", "/moved", "/heuristic", "/personal"] {
        let p = send(node.http, request("POST", "site.test", path, &[])).await;
        assert_eq!(p.status, 200, "{path}");
        assert!(
            !p.body.is_empty(),
            "{path}: the POST's client gets the body"
        );
    }
    let g = get(node.http, "site.test", "/form").await;
    assert_eq!(&g.body[..], b"the result");
    assert!(is_hit(&g), "{:?}", g.headers);
    assert_eq!(
        origin.count("/form"),
        1,
        "the GET was answered by the POST's response"
    );
    for path in ["/moved", "/heuristic", "/personal"] {
        let g = get(node.http, "site.test", path).await;
        assert!(!is_hit(&g), "{path}: {:?}", g.headers);
        assert_eq!(origin.count(path), 2, "{path}: the GET went to the origin");
    }
}

/// RFC 9111 §3.4: a 206 from the origin is stored as partial content and reused for ranges
/// inside it; a request that needs more asks the origin for just the missing bytes (with
/// `If-Range`), joins them to what is stored, and the object is complete from then on; a
/// changed object (the `If-Range` fails) drops what was stored.
#[tokio::test]
async fn partial_content_is_stored_reused_and_completed() {
    let origin = TestOrigin::start().await;
    let partial = |etag: &str| {
        Route::ok("456789")
            .status(206)
            .header("content-range", "bytes 4-9/10")
            .header("cache-control", "max-age=3600")
            .header("etag", etag)
    };
    origin.route("/p", partial("\"p1\""));
    let node = TestNode::start("", &site(&origin, "site.test", "")).await;
    let ranged = |r: &'static str| request("GET", "site.test", "/p", &[("range", r)]);

    let first = send(node.http, ranged("bytes=-5")).await;
    assert_eq!(first.status, 206);
    assert_eq!(&first.body[..], b"56789");
    assert_eq!(first.header("content-range"), Some("bytes 5-9/10"));
    for r in ["bytes=-5", "bytes=4-6", "bytes=8-"] {
        let again = send(node.http, ranged(r)).await;
        assert_eq!(again.status, 206, "{r}");
        assert!(is_hit(&again), "{r}: {:?}", again.headers);
    }
    assert_eq!(&send(node.http, ranged("bytes=4-6")).await.body[..], b"456");
    assert_eq!(
        origin.count("/p"),
        1,
        "ranges inside the stored part are hits"
    );

    // The origin now serves ranges of the whole object (same ETag): a request for all of it
    // asks for bytes 0-3 only, and the object is complete.
    origin.route(
        "/p",
        Route::ok("0123456789")
            .ranged()
            .header("cache-control", "max-age=3600")
            .header("etag", "\"p1\""),
    );
    let all = send(node.http, ranged("bytes=0-9")).await;
    assert_eq!(all.status, 206);
    assert_eq!(&all.body[..], b"0123456789");
    assert_eq!(origin.ranges("/p"), [(0, 3)], "just the missing bytes");
    assert_eq!(
        origin
            .last_headers("/p")
            .get("if-range")
            .map(|v| v.as_bytes()),
        Some(&b"\"p1\""[..])
    );
    let whole = get(node.http, "site.test", "/p").await;
    assert_eq!(whole.status, 200);
    assert_eq!(&whole.body[..], b"0123456789");
    assert!(is_hit(&whole), "complete now: {:?}", whole.headers);
    assert_eq!(origin.count("/p"), 2);

    // A changed object: the stored part is dropped, the new one passed on whole.
    origin.route("/q", partial("\"q1\"").header("x", "1"));
    send(
        node.http,
        request("GET", "site.test", "/q", &[("range", "bytes=5-9")]),
    )
    .await;
    origin.route(
        "/q",
        Route::ok("ABCDEFGHIJ")
            .ranged()
            .header("cache-control", "max-age=3600")
            .header("etag", "\"q2\""),
    );
    let changed = send(
        node.http,
        request("GET", "site.test", "/q", &[("range", "bytes=2-9")]),
    )
    .await;
    assert_eq!(changed.status, 200, "If-Range failed: the whole new object");
    assert_eq!(&changed.body[..], b"ABCDEFGHIJ");
    let later = send(
        node.http,
        request("GET", "site.test", "/q", &[("range", "bytes=5-6")]),
    )
    .await;
    assert_eq!(&later.body[..], b"FG", "the old part is gone");

    // A purge by URL removes stored parts too.
    origin.route("/r", partial("\"r1\""));
    send(
        node.http,
        request("GET", "site.test", "/r", &[("range", "bytes=5-9")]),
    )
    .await;
    let purged = node.node().store().purge(
        &edgecache::cache::PurgeTarget::Url {
            host: "site.test",
            path_and_query: "/r",
        },
        false,
    );
    assert_eq!(purged, 1, "the stored part");
    send(
        node.http,
        request("GET", "site.test", "/r", &[("range", "bytes=5-9")]),
    )
    .await;
    assert_eq!(origin.count("/r"), 2, "fetched again after the purge");
}

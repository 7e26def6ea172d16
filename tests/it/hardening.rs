//! Requests that must never reach an origin as sent, and requests that must not let one
//! client harm the others (issue 13's findings, each kept fixed).

use std::time::Duration;

use crate::support::*;

fn one_site(origin: &TestOrigin, site_extra: &str) -> String {
    format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\n\n[[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n{site_extra}\n",
        origin.url()
    )
}

/// RFC 3986 §5.2.4 and §6.2.2: dot segments are resolved and unreserved characters decoded
/// before keying and forwarding; a path that climbs above the root is refused; equivalent
/// spellings are one object.
#[tokio::test]
async fn paths_are_normalised_once_and_never_climb_above_the_root() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/a/c",
        Route::echo(&[], 0).header("cache-control", "max-age=60"),
    );
    origin.route(
        "/~user",
        Route::echo(&[], 0).header("cache-control", "max-age=60"),
    );
    origin.route("/etc/passwd", Route::ok("root:x:0:0"));
    origin.route(
        "/a%2Fb",
        Route::echo(&[], 0).header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &one_site(&origin, "")).await;
    for walk in [
        "/static/../../../etc/passwd",
        "/a/%2e%2e/%2e%2e/etc/passwd",
        "/a/.%2e/.%2e/etc/passwd",
        "/..",
        "/a/%zz",
    ] {
        let (text, closed) = raw(
            node.http,
            format!("GET {walk} HTTP/1.1\r\nHost: site.test\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 400"), "{walk}: {text}");
        assert!(closed, "{walk}: connection closed");
    }
    assert_eq!(origin.total(), 0, "nothing reached the origin");

    for spelling in ["/a/b/../c", "/a/./c", "/%61/c", "/a/%2E/c", "/a/b/%2e%2E/c"] {
        let g = get(node.http, "site.test", spelling).await;
        assert_eq!(g.status, 200, "{spelling}");
        assert_eq!(g.body, echo_body("site.test", "/a/c", &[], 0), "{spelling}");
    }
    assert_eq!(origin.count("/a/c"), 1, "one object under every spelling");
    let g = get(node.http, "site.test", "/%7Euser").await;
    assert_eq!(g.body, echo_body("site.test", "/~user", &[], 0));
    // Encoded slashes pass unchanged by default.
    let g = get(node.http, "site.test", "/a%2fb").await;
    assert_eq!(g.body, echo_body("site.test", "/a%2Fb", &[], 0));
    assert_eq!(origin.log(), vec!["/a/c", "/~user", "/a%2Fb"]);

    // A site may refuse them.
    let strict = TestNode::start("", &one_site(&origin, "escaped_slashes = \"refuse\"")).await;
    for p in ["/a%2Fb", "/a%5cb", "/a\\b"] {
        let (text, _) = raw(
            strict.http,
            format!("GET {p} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 400"), "{p}: {text}");
    }
    assert_eq!(origin.log().len(), 3, "refused before the origin");
}

/// A GET or HEAD with a body is refused and the connection closed: forwarding its framing
/// without the bytes left the origin waiting and a pooled connection out of step.
#[tokio::test]
async fn a_get_or_head_with_a_body_is_refused() {
    let origin = TestOrigin::start().await;
    origin.route("/x", Route::ok("x").header("cache-control", "max-age=60"));
    let node = TestNode::start("", &one_site(&origin, "")).await;
    let body = "a".repeat(52);
    for method in ["GET", "HEAD"] {
        let (text, closed) = raw(
            node.http,
            format!(
                "{method} /x HTTP/1.1\r\nHost: site.test\r\nContent-Length: 52\r\n\r\n{body}\
                 GET /x HTTP/1.1\r\nHost: site.test\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 400"), "{method}: {text}");
        assert_eq!(
            text.matches("HTTP/1.1").count(),
            1,
            "nothing after it: {text}"
        );
        assert!(closed);
        let (text, _) = raw(
            node.http,
            format!(
                "{method} /x HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 400"), "{method} chunked: {text}");
    }
    assert_eq!(origin.total(), 0);
    // An empty body is no body: served, and no length goes upstream.
    let (text, _) = raw(
        node.http,
        b"GET /x HTTP/1.1\r\nHost: site.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(origin.last_headers("/x").get("content-length").is_none());
}

/// TRACE is answered 405 here, like nginx; a site's `methods` list answers anything else 405
/// with `Allow`, and no origin is contacted.
#[tokio::test]
async fn methods_a_site_does_not_serve_are_answered_405_here() {
    let origin = TestOrigin::start().await;
    origin.route("/m", Route::ok("m").status(501));
    let node = TestNode::start("", &one_site(&origin, "")).await;
    for method in ["TRACE", "BAN", "PROPFIND"] {
        let g = send(node.http, request(method, "site.test", "/m", &[])).await;
        assert_eq!(g.status, 405, "{method}");
        assert_eq!(
            g.header("allow"),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            "{method}"
        );
    }
    assert_eq!(origin.total(), 0);
    let g = send(node.http, request("OPTIONS", "site.test", "/m", &[])).await;
    assert_eq!(g.status, 501, "served methods still reach the origin");

    let narrow = TestNode::start(
        "",
        &one_site(&origin, "methods = [\"GET\", \"HEAD\", \"BAN\"]"),
    )
    .await;
    let g = send(narrow.http, request("POST", "site.test", "/m", &[])).await;
    assert_eq!(g.status, 405);
    assert_eq!(g.header("allow"), Some("GET, HEAD, BAN"));
    let g = send(narrow.http, request("BAN", "site.test", "/m", &[])).await;
    assert_eq!(g.status, 501, "a listed extension method is forwarded");
}

/// A main and a backup pool for `site.test`, each one origin, and an admin listener.
fn main_and_backup(main: &TestOrigin, backup: &TestOrigin, main_extra: &str) -> String {
    format!(
        "[[origins]]\nname = \"main\"\nurl = \"{}\"\n{main_extra}\n\
         [[origins]]\nname = \"backup\"\nurl = \"{}\"\n\
         [[pools]]\nname = \"main\"\norigins = [\"main\"]\n\
         [[pools]]\nname = \"backup\"\norigins = [\"backup\"]\n\
         [[sites]]\nhosts = [\"site.test\"]\n\
         [[sites.routes]]\nname = \"everyone\"\npools = [\"main\", \"backup\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
        main.url(),
        backup.url()
    )
}

/// One client's odd requests must not eject an origin for everyone: only connection
/// failures, timeouts and the statuses listed in `fail_on` (default 502, 503, 504) count.
#[tokio::test]
async fn only_fail_on_statuses_eject_an_origin() {
    let main = TestOrigin::start().await;
    let backup = TestOrigin::start().await;
    for o in [&main, &backup] {
        o.route("/ok", Route::ok("ok").header("cache-control", "no-store"));
        o.route("/odd", Route::ok("no").status(501));
        o.route("/oops", Route::ok("no").status(500));
        o.route("/down", Route::ok("no").status(503));
    }
    let node = TestNode::start("", &main_and_backup(&main, &backup, "")).await;
    for _ in 0..10 {
        assert_eq!(get(node.http, "site.test", "/odd").await.status, 501);
        assert_eq!(get(node.http, "site.test", "/oops").await.status, 500);
    }
    get(node.http, "site.test", "/ok").await;
    assert_eq!(main.count("/ok"), 1, "the main origin still serves");
    assert_eq!(backup.total(), 0);
    assert_eq!(origin_state(&node, "main").await["state"], "up");

    // 503s do count: five in a row eject it, and the backup pool serves.
    for _ in 0..5 {
        get(node.http, "site.test", "/down").await;
    }
    assert_eq!(origin_state(&node, "main").await["state"], "ejected");
    get(node.http, "site.test", "/ok").await;
    assert_eq!(
        backup.count("/ok"),
        1,
        "the backup pool serves while main is out"
    );

    // An operator can list other statuses.
    let node = TestNode::start("", &main_and_backup(&main, &backup, "fail_on = [500]")).await;
    for _ in 0..5 {
        get(node.http, "site.test", "/oops").await;
    }
    assert_eq!(origin_state(&node, "main").await["state"], "ejected");
}

/// Clients that leave while their request waits for an origin give back its in-flight count
/// (it drives the origin's selection cost and the in_flight gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_mid_request_leave_no_in_flight_count() {
    let main = TestOrigin::start().await;
    let backup = TestOrigin::start().await;
    main.route(
        "/slow",
        Route::ok("slow")
            .header("cache-control", "no-store")
            .delay(Duration::from_secs(20)),
    );
    let node = TestNode::start("", &main_and_backup(&main, &backup, "")).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut s = tokio::net::TcpStream::connect(node.http)
            .await
            .expect("connect");
        use tokio::io::AsyncWriteExt;
        s.write_all(format!("GET /slow?{i} HTTP/1.1\r\nHost: site.test\r\n\r\n").as_bytes())
            .await
            .expect("write");
        clients.push(s);
    }
    assert!(
        eventually(Duration::from_secs(10), || main.total() == 100).await,
        "every request reached the origin ({})",
        main.total()
    );
    let busy = origin_state(&node, "main").await["in_flight"].clone();
    assert_eq!(busy, 100, "counted while waiting");
    drop(clients);
    let mut left = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        left = origin_state(&node, "main").await["in_flight"].clone();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "given back when the clients left");
}

/// RFC 9111 §4.2.4: with the default configuration (no grace), an origin that dies under load
/// does not turn cached content into errors: while it cannot be reached, stored responses are
/// served stale, collapsed clients included; those that must be revalidated are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origin_does_not_turn_cached_content_into_errors() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/hot",
        Route::ok("hot").header("cache-control", "max-age=1"),
    );
    for i in 0..8 {
        origin.route(
            &format!("/other{i}"),
            Route::ok("other").header("cache-control", "max-age=1"),
        );
    }
    origin.route(
        "/strict",
        Route::ok("strict").header("cache-control", "max-age=1, must-revalidate"),
    );
    origin.route(
        "/shared",
        Route::ok("shared").header("cache-control", "max-age=60, s-maxage=1"),
    );
    let node = TestNode::start("", &one_site(&origin, "")).await;
    for p in ["/hot", "/strict", "/shared"] {
        assert_eq!(get(node.http, "site.test", p).await.status, 200);
    }
    for i in 0..8 {
        get(node.http, "site.test", &format!("/other{i}")).await;
    }
    origin.stop();
    // 16 clients hammer the hot URL on kept-alive connections through a 4 s outage, while
    // the other URLs are asked for now and then.
    let until = std::time::Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for c in 0..16 {
        let addr = node.http;
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            let (mut ok, mut bad) = (0usize, Vec::new());
            let mut n = 0;
            while std::time::Instant::now() < until {
                let path = if c == 0 && n % 4 == 0 {
                    format!("/other{}", n / 4 % 8)
                } else {
                    "/hot".to_owned()
                };
                n += 1;
                let Ok(resp) = sender
                    .send_request(request("GET", "site.test", &path, &[]))
                    .await
                else {
                    bad.push(format!("{path}: connection error"));
                    break;
                };
                let g = read(resp).await;
                if g.status == 200 && !g.body.is_empty() {
                    ok += 1;
                } else {
                    bad.push(format!(
                        "{path}: {} {:?}",
                        g.status,
                        g.header("cache-status")
                    ));
                }
            }
            (ok, bad)
        }));
    }
    let mut served = 0;
    for t in tasks {
        let (ok, bad) = t.await.expect("client");
        assert!(bad.is_empty(), "errors for cached content: {bad:?}");
        served += ok;
    }
    assert!(served > 16, "the clients were served ({served})");
    let g = get(node.http, "site.test", "/hot").await;
    assert!(
        g.header("cache-status")
            .is_some_and(|s| s.contains("fwd=stale") && s.contains("origin-unreachable")),
        "{:?}",
        g.header("cache-status")
    );
    // must-revalidate, and s-maxage (proxy-revalidate for a shared cache), are never served
    // stale: 504.
    for p in ["/strict", "/shared"] {
        let g = get(node.http, "site.test", p).await;
        assert_eq!(g.status, 504, "{p}: {:?}", g.header("cache-status"));
    }
}

/// A write to one URL invalidates that URL only: it used to clear every hit-for-miss marker,
/// turning collapsing back on for every uncacheable URL. With its marker kept, concurrent
/// requests for an uncacheable URL each go to the origin at once instead of queueing behind
/// one another's fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_one_url_keeps_other_urls_hit_for_miss_markers() {
    let origin = TestOrigin::start().await;
    origin.route("/nc", Route::ok("nc").header("cache-control", "no-store"));
    origin.route(
        "/other",
        Route::ok("o").header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &one_site(&origin, "")).await;
    // Uncacheable once: marked hit-for-miss (10 s by default).
    get(node.http, "site.test", "/nc").await;
    let post = send(node.http, request("POST", "site.test", "/other", &[])).await;
    assert_eq!(post.status, 200);
    // Now slow: a collapsed request would wait for the first one's 6 s answer.
    origin.route(
        "/nc",
        Route::ok("nc")
            .header("cache-control", "no-store")
            .delay(Duration::from_secs(6)),
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = node.http;
        tasks.push(tokio::spawn(
            async move { get(addr, "site.test", "/nc").await },
        ));
    }
    assert!(
        eventually(Duration::from_secs(4), || origin.count("/nc") == 5).await,
        "the four requests went to the origin at once ({})",
        origin.count("/nc")
    );
    for t in tasks {
        assert_eq!(&t.await.expect("client").body[..], b"nc");
    }
}

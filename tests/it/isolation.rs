//! One user's response never reaches another, and no request makes the node do unbounded
//! work: collapsed requests and `Vary`, refreshes and `Set-Cookie`, what the key ignores,
//! ranges, loops, framing and fill memory (issue 19's findings, each kept fixed).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A site on `origin` for `site.test`, with `site_extra` lines in `[[sites]]`.
fn site_with(origin: &TestOrigin, site_extra: &str) -> String {
    format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\n\n[[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n{site_extra}\n",
        origin.url()
    )
}

/// GETs `path` with these fields from `clients.len()` clients at the same moment.
async fn at_once(
    addr: SocketAddr,
    path: &'static str,
    clients: Vec<Vec<(&'static str, String)>>,
) -> Vec<Got> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|fields| {
            tokio::spawn(async move {
                let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                send(addr, request("GET", "site.test", path, &f)).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

/// Collapsed followers of a leader whose response varies get the leader's response only when
/// their own request matches it: with `Vary: Cookie` and `Vary: Accept-Language`, for small
/// bodies (handed over finished) and large ones (streamed), and with the site's `key_cookies`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collapsed_followers_never_get_another_variant() {
    let origin = TestOrigin::start().await;
    let slow = Duration::from_millis(300);
    for (path, vary, pad) in [
        ("/who-small", "cookie", 0),
        ("/who-large", "cookie", 200 << 10),
        ("/lang-small", "accept-language", 0),
        ("/lang-large", "accept-language", 200 << 10),
    ] {
        origin.route(
            path,
            Route::echo(&[vary], pad)
                .header("cache-control", "max-age=60")
                .header("vary", vary)
                .delay(slow),
        );
    }
    origin.route(
        "/keyed",
        Route::echo(&["cookie"], 0)
            .header("cache-control", "max-age=60")
            .delay(slow),
    );
    let node = TestNode::start("", &site_with(&origin, "")).await;
    for (path, field, values) in [
        ("/who-small", "cookie", ["session=alice", "session=bob"]),
        ("/who-large", "cookie", ["session=alice", "session=bob"]),
        ("/lang-small", "accept-language", ["de", "fr"]),
        ("/lang-large", "accept-language", ["de", "fr"]),
    ] {
        let mut clients = Vec::new();
        for i in 0..8 {
            clients.push(vec![(field, values[i % 2].to_owned())]);
        }
        let got = at_once(node.http, path, clients.clone()).await;
        for (fields, g) in clients.iter().zip(&got) {
            assert_eq!(g.status, 200, "{path}");
            let pad = if path.ends_with("large") {
                200 << 10
            } else {
                0
            };
            let want = echo_body("site.test", path, &[(field, Some(&fields[0].1))], pad);
            assert!(
                g.body == want,
                "{path}: a client with {field}: {} got another user's page ({:?})",
                fields[0].1,
                g.header("cache-status")
            );
        }
        // One request per variant at least; never one for everybody.
        assert!(origin.count(path) >= 2, "{path}");
    }

    // The site's extra key: cookies named in key_cookies.
    drop(node);
    let node = TestNode::start(
        "",
        &site_with(&origin, "[sites.cache]\nkey_cookies = [\"session\"]"),
    )
    .await;
    let clients: Vec<_> = (0..8)
        .map(|i| vec![("cookie", format!("session={}", ["alice", "bob"][i % 2]))])
        .collect();
    let got = at_once(node.http, "/keyed", clients.clone()).await;
    for (fields, g) in clients.iter().zip(&got) {
        let want = echo_body("site.test", "/keyed", &[("cookie", Some(&fields[0].1))], 0);
        assert!(
            g.body == want,
            "key_cookies: {} got {:?}",
            fields[0].1,
            g.body
        );
    }
}

/// A stale variant refreshed by a 304 is handed to collapsed followers only when they ask
/// for the same variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_variant_goes_only_to_followers_of_that_variant() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/v",
        Route::echo(&["accept-language"], 0)
            .header("cache-control", "max-age=5")
            .header("age", "5")
            .header("etag", "\"v1\"")
            .header("vary", "accept-language")
            .on_304("cache-control", "max-age=60")
            .on_304("age", "0")
            .delay(Duration::from_millis(300)),
    );
    let node = TestNode::start("", &site_with(&origin, "")).await;
    // Both variants stored, stale on arrival.
    for lang in ["de", "fr"] {
        let g = send(
            node.http,
            request("GET", "site.test", "/v", &[("accept-language", lang)]),
        )
        .await;
        assert_eq!(
            g.body,
            echo_body("site.test", "/v", &[("accept-language", Some(lang))], 0)
        );
    }
    let clients: Vec<_> = (0..8)
        .map(|i| vec![("accept-language", ["de", "fr"][i % 2].to_owned())])
        .collect();
    let got = at_once(node.http, "/v", clients.clone()).await;
    for (fields, g) in clients.iter().zip(&got) {
        let want = echo_body(
            "site.test",
            "/v",
            &[("accept-language", Some(&fields[0].1))],
            0,
        );
        assert!(
            g.body == want,
            "{} got another variant ({:?})",
            fields[0].1,
            g.header("cache-status")
        );
    }
}

/// RFC 9111 §3.2 / §4.3.4: a 304's `Set-Cookie` is for the client whose request revalidated;
/// it never enters the stored response, and collapsed clients never receive it. Checked on a
/// site that stores responses with cookies (the cookie is stripped) and on a default site (the
/// refreshed response is not shared at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_with_set_cookie_never_reaches_another_client() {
    for opt_in in [true, false] {
        let origin = TestOrigin::start().await;
        origin.route(
            "/r",
            Route::ok("shared body")
                .header("cache-control", "max-age=5")
                .header("age", "5")
                .header("etag", "\"r1\"")
                .on_304("cache-control", "max-age=60")
                .on_304("age", "0")
                .cookie_on_304()
                .delay(Duration::from_millis(200)),
        );
        let extra = if opt_in {
            "[sites.cache]\nstore_set_cookie = true"
        } else {
            ""
        };
        let node = TestNode::start("", &site_with(&origin, extra)).await;
        let first = get(node.http, "site.test", "/r").await;
        assert_eq!(&first.body[..], b"shared body");
        // Concurrent revalidation: one leader, followers collapsed on it.
        let clients: Vec<_> = (0..8)
            .map(|i| vec![("cookie", format!("session=user{i}"))])
            .collect();
        let got = at_once(node.http, "/r", clients.clone()).await;
        for (fields, g) in clients.iter().zip(&got) {
            assert_eq!(&g.body[..], b"shared body");
            for c in g.headers.get_all("set-cookie") {
                let c = c.to_str().unwrap_or("");
                assert_eq!(
                    c,
                    format!("seen=\"{}\"", fields[0].1),
                    "opt_in={opt_in}: {} received another client's cookie",
                    fields[0].1
                );
            }
        }
        // Later plain hits carry no cookie at all.
        for _ in 0..3 {
            let g = send(
                node.http,
                request("GET", "site.test", "/r", &[("cookie", "session=later")]),
            )
            .await;
            assert_eq!(&g.body[..], b"shared body");
            for c in g.headers.get_all("set-cookie") {
                assert_eq!(
                    c.to_str().unwrap_or(""),
                    "seen=\"session=later\"",
                    "opt_in={opt_in}: a shared copy served a cookie"
                );
            }
            if opt_in {
                assert!(
                    g.headers.get("set-cookie").is_none(),
                    "a hit serves no cookie ({:?})",
                    g.header("cache-status")
                );
            }
        }
    }
}

/// Fields named in `Connection` are never forwarded, so they cannot choose a variant either:
/// `Accept-Language: de` with `Connection: accept-language` is the request without the field.
#[tokio::test]
async fn fields_named_in_connection_do_not_choose_a_variant() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/page",
        Route::echo(&["accept-language"], 0)
            .header("cache-control", "max-age=60")
            .header("vary", "accept-language"),
    );
    let node = TestNode::start("", &site_with(&origin, "")).await;
    let hop = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/page",
            &[("accept-language", "de"), ("connection", "accept-language")],
        ),
    )
    .await;
    assert_eq!(
        hop.body,
        echo_body("site.test", "/page", &[("accept-language", None)], 0)
    );
    let de = send(
        node.http,
        request("GET", "site.test", "/page", &[("accept-language", "de")]),
    )
    .await;
    assert_eq!(
        de.body,
        echo_body("site.test", "/page", &[("accept-language", Some("de"))], 0),
        "the de variant is the origin's de answer ({:?})",
        de.header("cache-status")
    );
    // And the field-less request was stored as the field-less variant.
    let none = get(node.http, "site.test", "/page").await;
    assert_eq!(none.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(
        none.body,
        echo_body("site.test", "/page", &[("accept-language", None)], 0)
    );
}

/// Whatever the key ignores, the origin never sees: the host's port, case and trailing dot,
/// and query parameters the site drops or sorts.
#[tokio::test]
async fn the_origin_sees_the_request_the_key_stands_for() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/h",
        Route::echo(&[], 0).header("cache-control", "max-age=60"),
    );
    origin.route(
        "/q",
        Route::echo(&[], 0).header("cache-control", "max-age=60"),
    );
    let node = TestNode::start(
        "",
        &site_with(
            &origin,
            "[sites.cache]\nquery = \"sort\"\nquery_ignore = [\"utm_source\"]",
        ),
    )
    .await;
    for host in ["site.test:1337", "SITE.Test", "site.test."] {
        let g = get(node.http, host, "/h").await;
        assert_eq!(g.status, 200, "{host}");
        assert_eq!(g.body, echo_body("site.test", "/h", &[], 0), "{host}");
    }
    assert_eq!(
        origin.count("/h"),
        1,
        "one object for every spelling of the host"
    );

    let g = get(
        node.http,
        "site.test",
        "/q?id=1&utm_source=%3Cscript%3E&a=2",
    )
    .await;
    assert_eq!(g.body, echo_body("site.test", "/q?a=2&id=1", &[], 0));
    let plain = get(node.http, "site.test", "/q?a=2&id=1").await;
    assert_eq!(plain.header("cache-status"), Some("edgecache; hit"));
    assert_eq!(plain.body, echo_body("site.test", "/q?a=2&id=1", &[], 0));
    assert_eq!(origin.log(), vec!["/h", "/q?a=2&id=1"]);
}

/// PURGE, invalidation by unsafe methods and admin purges name a URL the way its key does.
#[tokio::test]
async fn purges_normalise_the_url_as_keys_do() {
    let origin = TestOrigin::start().await;
    origin.route("/p", Route::ok("p").header("cache-control", "max-age=60"));
    origin.route("/p2", Route::ok("p2").header("cache-control", "max-age=60"));
    origin.route("/p3", Route::ok("p3").header("cache-control", "max-age=60"));
    let node = TestNode::start(
        "",
        &format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"127.0.0.1/32\"]\n",
            site_with(&origin, "[sites.cache]\nquery_ignore = [\"utm_source\"]")
        ),
    )
    .await;
    get(node.http, "site.test", "/p?id=1").await;
    let purge = send(
        node.http,
        request("PURGE", "SITE.test:80", "/p?id=1&utm_source=x", &[]),
    )
    .await;
    assert_eq!(purge.status, 200);
    assert_eq!(&purge.body[..], b"{\"purged\":1}\n");
    let again = get(node.http, "site.test", "/p?id=1").await;
    assert_eq!(
        again.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );

    // A POST with the ignored parameter invalidates the keyed URL.
    origin.route("/p2", Route::ok("p2").header("cache-control", "max-age=60"));
    get(node.http, "site.test", "/p2").await;
    let post = send(
        node.http,
        request("POST", "site.test", "/p2?utm_source=mail", &[]),
    )
    .await;
    assert_eq!(post.status, 200);
    let after = get(node.http, "site.test", "/p2").await;
    assert_eq!(
        after.header("cache-status"),
        Some("edgecache; fwd=uri-miss; stored")
    );
}

/// `Range: bytes=0-,0-,0-,…` is the object once, not the object as many times as asked; a
/// HEAD with ranges is answered with the length a GET would get and no body built.
#[tokio::test]
async fn overlapping_ranges_cost_no_more_than_the_object() {
    let origin = TestOrigin::start().await;
    let body: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    origin.route(
        "/obj",
        Route::bytes(Bytes::from(body.clone()))
            .header("cache-control", "max-age=60")
            .header("content-type", "application/octet-stream"),
    );
    let node = TestNode::start("", &site_with(&origin, "")).await;
    get(node.http, "site.test", "/obj").await;
    let many = format!("bytes={}", vec!["0-"; 60].join(","));
    let g = send(
        node.http,
        request("GET", "site.test", "/obj", &[("range", &many)]),
    )
    .await;
    assert!(g.status == 206 || g.status == 200, "{}", g.status);
    assert!(
        g.body.len() <= 1024,
        "{} bytes for a 1 KiB object",
        g.body.len()
    );
    assert_eq!(&g.body[..], &body[..]);

    let two = "bytes=0-9,100-109";
    let get_two = send(
        node.http,
        request("GET", "site.test", "/obj", &[("range", two)]),
    )
    .await;
    assert_eq!(get_two.status, 206);
    let head_two = send(
        node.http,
        request("HEAD", "site.test", "/obj", &[("range", two)]),
    )
    .await;
    assert_eq!(head_two.status, 206);
    assert!(head_two.body.is_empty());
    assert_eq!(
        head_two.header("content-length"),
        Some(get_two.body.len().to_string().as_str()),
        "HEAD tells the length a GET gets"
    );
    assert_eq!(
        head_two.header("content-type"),
        get_two.header("content-type")
    );
}

/// A TCP relay on a known port that forwards every connection to the address set later.
async fn relay() -> (SocketAddr, tokio::sync::watch::Sender<Option<SocketAddr>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(None::<SocketAddr>);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let Ok(target) = rx
                    .wait_for(Option::is_some)
                    .await
                    .map(|t| t.unwrap_or(addr))
                else {
                    return;
                };
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, tx)
}

/// RFC 8586: a site whose origin leads back to the node is a loop, answered 508 at once, for
/// cacheable and other methods alike.
#[tokio::test]
async fn a_site_whose_origin_is_the_node_itself_gets_508() {
    let (relay_addr, target) = relay().await;
    let node = TestNode::start(
        "",
        &format!(
            "[[origins]]\nname = \"self\"\nurl = \"http://{relay_addr}\"\ntimeout = \"20s\"\n\n[[sites]]\nhosts = [\"site.test\"]\norigin = \"self\"\n"
        ),
    )
    .await;
    let _ = target.send(Some(node.http));
    for method in ["GET", "POST"] {
        let g = tokio::time::timeout(
            Duration::from_secs(10),
            send(node.http, request(method, "site.test", "/loop", &[])),
        )
        .await
        .expect("answered before the origin timeout");
        assert_eq!(g.status, 508, "{method}");
    }
    // Another node's member (two tiers of edgecache in front of an origin) is no loop: it
    // is kept, and ours is added after it.
    let origin = TestOrigin::start().await;
    origin.route(
        "/tier",
        Route::ok("t").header("cache-control", "max-age=60"),
    );
    let node = TestNode::start("", &site_with(&origin, "")).await;
    let g = send(
        node.http,
        request(
            "GET",
            "site.test",
            "/tier",
            &[("cdn-loop", "edgecache; node=0123456789abcdef")],
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    let seen: Vec<String> = origin
        .last_headers("/tier")
        .get_all("cdn-loop")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], "edgecache; node=0123456789abcdef");
    assert!(seen[1].starts_with("edgecache; node="), "{seen:?}");
}

/// RFC 9112 §6.3: an origin response with both `Transfer-Encoding` and `Content-Length` is
/// framed by the coding; the client receives the whole body, not `Content-Length` bytes of it.
#[tokio::test]
async fn an_origin_response_with_both_framings_reaches_the_client_whole() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
                          Cache-Control: max-age=60\r\nConnection: close\r\n\r\n\
                          14\r\n01234567890123456789\r\n0\r\n\r\n",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let node = TestNode::start(
        "",
        &format!(
            "[[origins]]\nname = \"o\"\nurl = \"http://{addr}\"\n\n[[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n"
        ),
    )
    .await;
    for _ in 0..2 {
        let g = get(node.http, "site.test", "/both").await;
        assert_eq!(g.status, 200);
        assert_eq!(&g.body[..], b"01234567890123456789");
        assert_ne!(g.header("content-length"), Some("5"));
    }
}

/// `cache.fill_memory` bounds what fills in flight hold for storing: past it a response is
/// not stored but still reaches its clients whole, and a fetch that nobody reads any more and
/// that will not be stored stops instead of downloading to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_in_flight_hold_no_more_than_fill_memory() {
    let origin = TestOrigin::start().await;
    let chunk = 64 << 10;
    // 1 MiB that then waits 2 s for the rest: a fill that holds half the budget while the
    // others run.
    origin.route(
        "/hold",
        Route::ok("")
            .generated(1 << 20, 2, true, Duration::from_secs(2))
            .header("cache-control", "max-age=60"),
    );
    // 1.75 MiB each, a chunk every 40 ms.
    for path in ["/drop", "/whole"] {
        origin.route(
            path,
            Route::ok("")
                .generated(chunk, 28, true, Duration::from_millis(40))
                .header("cache-control", "max-age=60"),
        );
    }
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n",
        site_with(&origin, "")
    );
    let node = TestNode::start(
        "",
        &format!("{config}\n[cache]\nmemory = \"16MiB\"\nmax_object_size = \"2MiB\"\nfill_memory = \"2MiB\"\n"),
    )
    .await;
    let addr = node.http;
    // One fill holds most of the budget while its client reads it.
    let hold = tokio::spawn(async move { get(addr, "site.test", "/hold").await });
    let mut held = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held < (1 << 20) && std::time::Instant::now() < deadline {
        held = metric(&node, "edgecache_fill_memory_bytes").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held >= 1 << 20, "the first fill is counted ({held})");
    // A second client reads the start of another object and leaves.
    {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(request("GET", "site.test", "/drop", &[]))
            .await
            .expect("response");
        let mut body = resp.into_body();
        let _ = body.frame().await;
        drop(body);
        drop(sender);
        conn.abort();
    }
    // A third client reads a whole object while the budget is short: whole, not stored.
    let whole = get(addr, "site.test", "/whole").await;
    assert_eq!(whole.body.len(), 28 * chunk);
    let hold = hold.await.expect("hold");
    assert_eq!(hold.body.len(), 2 << 20);
    // Once every fetch has ended, nothing is held, and the abandoned one did not run to the end.
    let mut ended = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if metric(&node, "edgecache_fills_in_flight").await == 0
            && metric(&node, "edgecache_fill_memory_bytes").await == 0
        {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "fills ended and gave their bytes back");
    assert!(metric(&node, "edgecache_fill_memory_full_total").await >= 1);
    assert_eq!(
        origin.completed("/drop"),
        0,
        "a fill with no reader that will not be stored stops"
    );
    // /whole was fetched while the budget was short: not stored.
    let again = get(addr, "site.test", "/whole").await;
    assert_eq!(again.body.len(), 28 * chunk);
    assert_eq!(origin.count("/whole"), 2, "not stored past the budget");
    let hold = get(addr, "site.test", "/hold").await;
    assert_eq!(
        hold.header("cache-status"),
        Some("edgecache; hit"),
        "within the budget: stored"
    );
}

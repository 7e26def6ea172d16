//! A seeded, bounded randomised search for responses that reach the wrong client.
//!
//! An origin answers with exactly what it saw (host, path and query, and the fields its
//! response varies on); routes get random `Vary`, `Cache-Control` and body sizes (below and
//! above the small-object and memory-file thresholds), some slow, some revalidated with 304s
//! that set a cookie for the revalidating client. Many clients at once send random cookies,
//! languages, host spellings, query parameters, `Connection`-named fields, HEADs and ranges,
//! with purges in between. Every answer is checked against what the origin answers to that
//! client's own request after normalisation: any difference fails and prints the seed.
//!
//! CI runs 3,000 requests of one seed. `EDGECACHE_LEAK_SEED` and `EDGECACHE_LEAK_REQUESTS`
//! run other seeds and more requests by hand (`scripts/test leak_search`).

use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

/// splitmix64: small, seedable, and enough to spread test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
}

/// How one path of the origin answers, as the oracle needs to know it.
#[derive(Clone, Debug)]
struct Spec {
    path: String,
    /// The fields the body echoes: those the response varies on (or is keyed by), or every
    /// personal field for responses that may not be shared.
    fields: Vec<&'static str>,
    pad: usize,
}

/// Random routes for a site under `prefix`; `keyed` sites add the `tier` cookie to the key.
fn routes(rng: &mut Rng, origin: &TestOrigin, prefix: &str, keyed: bool, n: usize) -> Vec<Spec> {
    let mut out = Vec::new();
    for i in 0..n {
        let path = format!("{prefix}/r{i}");
        const VARIES: [&[&str]; 4] = [
            &[],
            &["accept-language"],
            &["cookie"],
            &["accept-language", "cookie"],
        ];
        let varies: &[&'static str] = VARIES[rng.below(VARIES.len())];
        let pad = *rng.pick(&[0usize, 3_000, 20_000, 70_000, 100_000]);
        let kind = rng.below(7);
        let mut fields: Vec<&'static str> = if kind == 4 || kind == 5 {
            vec!["accept-language", "cookie"]
        } else {
            varies.to_vec()
        };
        if keyed {
            fields.push("cookie:tier");
        }
        let mut route = Route::echo(&fields, pad);
        if !varies.is_empty() {
            route = route.header("vary", &varies.join(", "));
        }
        route = match kind {
            0 => route.header("cache-control", "max-age=60"),
            1 => route
                .header("cache-control", "max-age=1")
                .header("etag", "\"e1\""),
            2 => route
                .header("cache-control", "max-age=5")
                .header("age", "5")
                .header("etag", "\"e2\"")
                .on_304("cache-control", "max-age=1")
                .on_304("age", "0")
                .cookie_on_304(),
            3 => route
                .header("cache-control", "no-cache")
                .header("etag", "\"e3\"")
                .cookie_on_304(),
            4 => route.header("cache-control", "no-store"),
            5 => route.header("cache-control", "private, max-age=60"),
            _ => route
                .header("cache-control", "max-age=60")
                .header("set-cookie", "static=1"),
        };
        if rng.percent(30) {
            route = route.delay(Duration::from_millis(40));
        }
        origin.route(&path, route);
        out.push(Spec { path, fields, pad });
    }
    out
}

/// One random request and the answer its own origin request would get.
#[derive(Clone, Debug)]
struct Case {
    method: &'static str,
    host: String,
    target: String,
    fields: Vec<(&'static str, String)>,
    expected: Bytes,
    /// The `Cookie` the client sent, for checking any `Set-Cookie` it receives.
    cookie: Option<String>,
    /// Sent over HTTP/2 (prior knowledge) instead of HTTP/1.1.
    h2: bool,
}

fn case(rng: &mut Rng, sites: &[(&str, Vec<Spec>)]) -> Case {
    let (host, specs) = rng.pick(sites);
    let spec = rng.pick(specs).clone();
    let spelled = match rng.below(4) {
        0 => host.to_string(),
        1 => host.to_ascii_uppercase(),
        2 => format!("{host}:8080"),
        _ => format!("{host}."),
    };
    // Query parameters in random order, some that the key drops.
    let mut params: Vec<String> = Vec::new();
    for p in ["a=1", "b=2", "c=3"] {
        if rng.percent(40) {
            params.push(p.to_owned());
        }
    }
    let utm = rng.percent(30);
    for i in (1..params.len()).rev() {
        params.swap(i, rng.below(i + 1));
    }
    let mut sent = params.clone();
    if utm {
        let at = rng.below(sent.len() + 1);
        sent.insert(at, format!("utm_source=x{}", rng.below(100)));
    }
    let target = if sent.is_empty() {
        spec.path.clone()
    } else {
        format!("{}?{}", spec.path, sent.join("&"))
    };
    params.sort();
    let keyed_pq = if params.is_empty() {
        spec.path.clone()
    } else {
        format!("{}?{}", spec.path, params.join("&"))
    };

    let lang = rng
        .pick(&[None, Some("de"), Some("fr"), Some("en")])
        .map(str::to_owned);
    let cookie = rng.percent(75).then(|| {
        format!(
            "session=u{}; tier={}",
            rng.below(6),
            rng.pick(&["gold", "free"])
        )
    });
    // HTTP/2 has no `Connection` field.
    let h2 = rng.percent(20);
    let hop_lang = !h2 && lang.is_some() && rng.percent(10);
    let mut fields = Vec::new();
    if let Some(l) = &lang {
        fields.push(("accept-language", l.clone()));
    }
    if let Some(c) = &cookie {
        fields.push(("cookie", c.clone()));
    }
    if hop_lang {
        fields.push(("connection", "accept-language".to_owned()));
    }
    let method = match rng.below(20) {
        0 => "HEAD",
        1 => {
            fields.push(("range", "bytes=0-9".to_owned()));
            "GET"
        }
        _ => "GET",
    };
    // What the origin sees: a field named in Connection is not forwarded.
    let seen_lang = if hop_lang { None } else { lang.clone() };
    let tier = cookie
        .as_deref()
        .and_then(|c| c.split("; ").find_map(|kv| kv.strip_prefix("tier=")))
        .map(str::to_owned);
    let values: Vec<(&str, Option<&str>)> = spec
        .fields
        .iter()
        .map(|f| {
            let v = match *f {
                "accept-language" => seen_lang.as_deref(),
                "cookie" => cookie.as_deref(),
                "cookie:tier" => tier.as_deref(),
                _ => None,
            };
            (*f, v)
        })
        .collect();
    Case {
        method,
        host: spelled,
        target,
        fields,
        expected: echo_body(host, &keyed_pq, &values, spec.pad),
        cookie,
        h2,
    }
}

/// Sends a case's request on a new connection, HTTP/1.1 or HTTP/2 as the case says.
async fn send_case(addr: std::net::SocketAddr, c: &Case) -> Got {
    let fields: Vec<(&str, &str)> = c.fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if !c.h2 {
        return send(addr, request(c.method, &c.host, &c.target, &fields)).await;
    }
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .method(c.method)
        .uri(format!("http://{}{}", c.host, c.target));
    for (k, v) in fields {
        b = b.header(k, v);
    }
    let req = b
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    read(sender.send_request(req).await.expect("response")).await
}

/// Checks one answer against the case's own origin answer; the reason when it differs.
fn check(c: &Case, g: &Got) -> Result<(), String> {
    let cs = g.header("cache-status").unwrap_or("-").to_owned();
    for v in g.headers.get_all("set-cookie") {
        let v = v.to_str().unwrap_or("?");
        let own = format!("seen=\"{}\"", c.cookie.as_deref().unwrap_or("<none>"));
        if v != "static=1" && v != own {
            return Err(format!("received another client's cookie {v:?} ({cs})"));
        }
    }
    if c.method == "HEAD" {
        if g.status != 200 || !g.body.is_empty() {
            return Err(format!(
                "HEAD: {} with {} bytes ({cs})",
                g.status,
                g.body.len()
            ));
        }
        return Ok(());
    }
    match g.status.as_u16() {
        200 if g.body == c.expected => Ok(()),
        206 if g.body[..] == c.expected[..10] => Ok(()),
        s => Err(format!(
            "{s}: got {:?}, expected {:?} ({cs})",
            String::from_utf8_lossy(&g.body[..g.body.len().min(120)]),
            String::from_utf8_lossy(&c.expected[..c.expected.len().min(120)]),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomised_clients_only_ever_get_their_own_answer() {
    let seed = std::env::var("EDGECACHE_LEAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0019_u64);
    let total: usize = std::env::var("EDGECACHE_LEAK_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    println!("leak search: seed {seed}, {total} requests");
    let mut rng = Rng(seed);
    let origin = TestOrigin::start().await;
    let plain = routes(&mut rng, &origin, "/s", false, 10);
    let keyed = routes(&mut rng, &origin, "/k", true, 6);
    let config = format!(
        "[[origins]]\nname = \"o\"\nurl = \"{}\"\n\n\
         [[sites]]\nhosts = [\"site.test\"]\norigin = \"o\"\n\
         [sites.cache]\nquery = \"sort\"\nquery_ignore = [\"utm_source\"]\n\n\
         [[sites]]\nhosts = [\"keyed.test\"]\norigin = \"o\"\n\
         [sites.cache]\nquery = \"sort\"\nquery_ignore = [\"utm_source\"]\nkey_cookies = [\"tier\"]\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"127.0.0.1/32\"]\n",
        origin.url()
    );
    let node = TestNode::start("", &config).await;
    let sites = [("site.test", plain), ("keyed.test", keyed)];
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut done = 0;
    while done < total && std::time::Instant::now() < deadline {
        // A round of clients at once, so that they collapse onto each other's fills.
        let mut tasks = Vec::new();
        for _ in 0..16 {
            if rng.percent(3) {
                let (host, specs) = rng.pick(&sites);
                let path = rng.pick(specs).path.clone();
                let host = host.to_string();
                let addr = node.http;
                tasks.push(tokio::spawn(async move {
                    let g = send(addr, request("PURGE", &host, &path, &[])).await;
                    assert_eq!(g.status, 200, "PURGE {host}{path}");
                    None
                }));
                continue;
            }
            let c = case(&mut rng, &sites);
            let addr = node.http;
            tasks.push(tokio::spawn(async move {
                let g = send_case(addr, &c).await;
                Some((c, g))
            }));
        }
        for t in tasks {
            if let Some((c, g)) = t.await.expect("client task") {
                if let Err(why) = check(&c, &g) {
                    panic!(
                        "seed {seed}, request {done}: {} {} host {:?} fields {:?} h2 {}: {why}",
                        c.method, c.target, c.host, c.fields, c.h2
                    );
                }
            }
            done += 1;
        }
    }
    assert!(
        done >= total.min(500),
        "only {done} requests in the time allowed"
    );
    assert!(origin.not_modified() > 0, "the search made revalidations");
}

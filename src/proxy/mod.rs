//! The request path: route a request to its site, answer from the cache when it can, else
//! fetch from the site's origin (one fetch per key however many clients wait) and store what
//! may be stored.
//!
//! Entry point: [`Proxy::handle`], called by `server` for every request. It never fails: every
//! error becomes a response (see `respond`).

pub mod body;
pub mod headers;
mod limit;
pub mod path;
mod purge;
pub mod range;
mod respond;
pub mod sites;

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts as RequestParts;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::cache::fill::{Fill, FillHead, Fills, Outcome};
use crate::cache::key::{key_extra, normalise_query};
use crate::cache::policy::{self, Precondition, RequestFacts, Reuse, Settings, StoreDecision};
use crate::cache::{
    CacheControl, Entry, KeyParts, NoStoreReason, OwnedKey, PurgeTarget, Store, VaryKey,
};
use crate::config::{ClientNoCache, Config, QueryMode};
use crate::origin::select::{PoolView, Selector};
use crate::origin::{self, OriginClient, UpstreamBody};
use crate::telemetry::{self, AccessLog};
use body::Body;
use headers::{forward_request_headers, remove_hop_by_hop, via_value};
use sites::{host_without_port, SiteTable};

use crate::cache::entry::upstream_status;
pub use crate::cache::entry::CACHE_STATUS;

/// Response fields that steer this cache and are not passed to clients.
static CACHE_ONLY_FIELDS: [&HeaderName; 4] = [
    &policy::CDN_CACHE_CONTROL,
    &policy::SURROGATE_CONTROL,
    &policy::SURROGATE_KEY,
    &policy::CACHE_TAG,
];

/// Request fields that would make the origin answer with less than the whole object.
const CONDITIONAL_FIELDS: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// Objects up to this size (by `Content-Length`) are read whole by the leader before it
/// answers, instead of being streamed through a fill.
const SMALL_OBJECT: u64 = 64 << 10;

/// Origins tried at most for one request when connections fail (nginx's
/// `proxy_next_upstream_tries`).
const MAX_ATTEMPTS: usize = 4;

/// Once a response is too large to store, the fetch runs at most this far ahead of the slowest
/// client reading it.
const STREAM_WINDOW: u64 = 1 << 20;

/// What the connection tells us about a request.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub https: bool,
}

/// How a request was answered, for the access log.
struct Outcome_ {
    cache: &'static str,
    origin: Option<usize>,
    origin_ms: Option<f64>,
    /// The geo route that chose the origin.
    route: Option<Arc<str>>,
}

impl Outcome_ {
    fn local(cache: &'static str) -> Outcome_ {
        Outcome_ {
            cache,
            origin: None,
            origin_ms: None,
            route: None,
        }
    }

    fn origin(cache: &'static str, origin: usize, ms: f64) -> Outcome_ {
        Outcome_ {
            cache,
            origin: Some(origin),
            origin_ms: Some(ms),
            route: None,
        }
    }
}

type Answer = (Response<Body>, Outcome_);

/// What [`Proxy::serve`] decided: an answer now (hits, refusals, purges), or work that
/// has to wait for an origin.
// The answer travels by value: boxing it, as the lint suggests, would allocate on every hit.
#[allow(clippy::large_enum_variant)]
enum Served {
    Now(Answer),
    Later(Pin<Box<dyn Future<Output = Answer> + Send>>),
}

/// The future [`Proxy::handle`] returns, in the shape hyper's service wants. A hit is
/// already answered when it is made; a miss or a forwarded request holds the boxed upstream
/// work.
pub struct Handling(HandlingState);

enum HandlingState {
    Ready(Option<Response<Body>>),
    Waiting {
        fut: Pin<Box<dyn Future<Output = Answer> + Send>>,
        proxy: Arc<Proxy>,
        log: Option<Box<AccessLog>>,
    },
    Done,
}

impl Future for Handling {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = match &mut self.0 {
            HandlingState::Ready(resp) => match resp.take() {
                Some(r) => return Poll::Ready(Ok(r)),
                None => return Poll::Pending,
            },
            HandlingState::Waiting { fut, .. } => match fut.as_mut().poll(cx) {
                Poll::Ready(answer) => answer,
                Poll::Pending => return Poll::Pending,
            },
            HandlingState::Done => return Poll::Pending,
        };
        match std::mem::replace(&mut self.0, HandlingState::Done) {
            HandlingState::Waiting { proxy, log, .. } => Poll::Ready(Ok(proxy.finish(answer, log))),
            _ => Poll::Pending,
        }
    }
}

/// Everything about one cacheable request that the fetch and respond steps need.
#[derive(Clone)]
struct Lookup {
    site: usize,
    hash: u64,
    key: OwnedKey,
    extra: Option<Box<str>>,
    settings: Settings,
    forced: bool,
    head: bool,
    /// The client's request head (headers as received).
    parts: Arc<RequestParts>,
    /// The `Host` the client sent (with port), for forwarding.
    host_value: HeaderValue,
    conn: ConnInfo,
    /// Answer with the whole object even if the client asked for a range (a fallback when the
    /// object could not be stored to cut the range from).
    ignore_range: bool,
    /// RFC 9211 forward reason when nothing usable was stored: `fwd=uri-miss` (nothing for
    /// the URL) or `fwd=vary-miss` (other variants only).
    miss: &'static str,
}

/// Shared state of the request path.
pub struct Proxy {
    config: Arc<Config>,
    sites: SiteTable,
    origins: Vec<OriginClient>,
    origin_names: Vec<Arc<str>>,
    store: Store,
    fills: Fills,
    locator: crate::geo::Locator,
    limits: limit::Limits,
    selector: Selector,
    retry_budget: origin::retry::RetryBudget,
    metrics: crate::admin::metrics::Metrics,
    name: String,
    hit: HeaderValue,
    /// `Cache-Status` values for the common miss answers, made once (see `miss_status`).
    miss_statuses: [HeaderValue; 4],
    via_11: HeaderValue,
    via_10: HeaderValue,
    via_2: HeaderValue,
    boundary: String,
    /// This node's `CDN-Loop` member (RFC 8586), `{via_name}; node={id}` with an id drawn at
    /// start: a request that already carries it has come back to us (508).
    cdn_loop: HeaderValue,
}

static X_FORWARDED_FOR_NAME: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `CDN-Loop` (RFC 8586): each CDN node a request passes appends itself.
static CDN_LOOP: HeaderName = HeaderName::from_static("cdn-loop");

impl Proxy {
    /// Builds the request path for a validated configuration and a store.
    pub fn new(config: Arc<Config>, store: Store) -> Result<Proxy, origin::Error> {
        let names_used = config.origins.iter().any(|o| {
            o.authority.host().parse::<std::net::IpAddr>().is_err()
                && !o.authority.host().starts_with('[')
        });
        let resolver = origin::dns::Resolver::new(&config.dns, names_used)?;
        let roots = if config
            .origins
            .iter()
            .any(|o| o.scheme == http::uri::Scheme::HTTPS)
        {
            origin::system_roots()
        } else {
            rustls::RootCertStore::empty()
        };
        let origins = config
            .origins
            .iter()
            .map(|o| OriginClient::new(o.clone(), resolver.clone(), &roots))
            .collect::<Result<Vec<_>, _>>()?;
        let name = config.server.via_name.clone();
        // Random per process (the store's hasher is randomly keyed).
        let node_id = store.hash(&KeyParts {
            https: false,
            host: "boundary",
            path_and_query: "/",
        });
        let boundary = format!("edgecache-{node_id:016x}");
        let cdn_loop = HeaderValue::from_str(&format!("{name}; node={node_id:016x}"))
            .unwrap_or_else(|_| HeaderValue::from_static("edgecache"));
        Ok(Proxy {
            sites: SiteTable::new(&config.sites),
            origin_names: config
                .origins
                .iter()
                .map(|o| Arc::from(o.name.as_str()))
                .collect(),
            origins,
            store,
            fills: Fills::new(config.cache.fill_memory),
            locator: crate::geo::Locator::new(
                config.geo.networks.clone(),
                config.geo.header.clone(),
                config
                    .server
                    .trusted_proxies
                    .iter()
                    .chain(&config.geo.trusted_proxies)
                    .copied()
                    .collect(),
                config.geo.database.clone(),
            )
            .with_address_header(config.server.client_address_header),
            limits: limit::Limits::new(&config),
            selector: Selector::new(config.origins.iter().map(|o| o.weight).collect()),
            retry_budget: origin::retry::RetryBudget::new(&config.retries),
            metrics: crate::admin::metrics::Metrics::default(),
            hit: status_value(&name, "hit"),
            miss_statuses: [
                status_value(&name, "fwd=uri-miss; stored"),
                status_value(&name, "fwd=vary-miss; stored"),
                status_value(&name, "fwd=uri-miss; collapsed"),
                status_value(&name, "fwd=vary-miss; collapsed"),
            ],
            via_11: via_value(Version::HTTP_11, &name),
            via_10: via_value(Version::HTTP_10, &name),
            via_2: via_value(Version::HTTP_2, &name),
            name,
            boundary,
            cdn_loop,
            config,
        })
    }

    /// The store this proxy reads and fills.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The request counters.
    pub fn metrics(&self) -> &crate::admin::metrics::Metrics {
        &self.metrics
    }

    /// Each origin's state for `GET /origins`: up or ejected, latency estimate, in-flight
    /// requests, requests, errors and ejections.
    pub fn origins_json(&self) -> String {
        let now = Instant::now();
        let list: Vec<serde_json::Value> = self
            .origins
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let s = self.selector.state().snapshot(i, now).unwrap_or_default();
                serde_json::json!({
                    "name": o.config.name,
                    "url": format!("{}://{}", o.config.scheme, o.config.authority),
                    "region": o.config.region,
                    "weight": o.config.weight,
                    "state": if s.down {
                        "down"
                    } else if s.ejected {
                        "ejected"
                    } else {
                        "up"
                    },
                    "health": o.config.health.as_ref().map(|h| {
                        serde_json::json!({
                            "path": h.path.as_str(),
                            "interval_ms": h.interval.as_millis() as u64,
                            "rise": h.rise,
                            "fall": h.fall,
                            "checks": s.checks,
                            "last_check": s.last_check.as_ref().map(|c| serde_json::json!({
                                "passed": c.passed,
                                "status": c.status.map(|st| st.as_u16()),
                                "latency_ms": (c.latency.as_secs_f64() * 100_000.0).round() / 100.0,
                                "error": c.error,
                                "seconds_ago": (now.saturating_duration_since(c.at).as_secs_f64() * 10.0).round() / 10.0,
                            })),
                        })
                    }),
                    "latency_ms": (s.latency_us / 10.0).round() / 100.0,
                    "in_flight": s.in_flight,
                    "requests": s.requests,
                    "errors": s.errors,
                    "ejections": s.ejections,
                })
            })
            .collect();
        let mut text = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".to_owned());
        text.push('\n');
        text
    }

    /// Per-origin series for `/metrics`: up (1, or 0 when down by its checks or ejected),
    /// latency estimate, in-flight, requests, errors, ejections.
    pub fn render_origin_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let now = Instant::now();
        // One snapshot per origin, so the series of one scrape agree with each other.
        let states: Vec<_> = (0..self.origins.len())
            .map(|o| self.selector.state().snapshot(o, now))
            .collect();
        type Series = (&'static str, &'static str, &'static str);
        let series: [Series; 6] = [
            (
                "edgecache_origin_up",
                "gauge",
                "1 when the origin is in rotation, 0 when down by its health checks or ejected.",
            ),
            (
                "edgecache_origin_latency_seconds",
                "gauge",
                "Peak-EWMA time to first byte.",
            ),
            (
                "edgecache_origin_in_flight",
                "gauge",
                "Requests waiting for the origin's answer.",
            ),
            (
                "edgecache_origin_responses_total",
                "counter",
                "Origin requests answered or failed, by origin.",
            ),
            (
                "edgecache_origin_failures_total",
                "counter",
                "Origin requests that failed (connect, reset, timeout, 5xx), by origin.",
            ),
            (
                "edgecache_origin_ejections_total",
                "counter",
                "Times passive detection ejected the origin.",
            ),
        ];
        for (i, (name, kind, help)) in series.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (client, st) in self.origins.iter().zip(&states) {
                let Some(st) = st else {
                    continue;
                };
                let value = match i {
                    0 => f64::from(u8::from(st.in_rotation())),
                    1 => st.latency_us / 1e6,
                    2 => f64::from(st.in_flight),
                    3 => st.requests as f64,
                    4 => st.errors as f64,
                    _ => f64::from(st.ejections),
                };
                let label = client
                    .config
                    .name
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = writeln!(out, "{name}{{origin=\"{label}\"}} {value}");
            }
        }
    }

    /// Reads the geo database file again (SIGHUP). `Ok(None)` when none is configured; on
    /// error the database in use stays.
    pub fn reload_geo(&self) -> Result<Option<String>, String> {
        match self.locator.database() {
            None => Ok(None),
            Some(slot) => slot
                .reload()
                .map(|db| Some(format!("{} ({})", db.path().display(), db.kind()))),
        }
    }

    /// Starts the active health checks of every origin that has them; each task ends when
    /// `shutdown` turns true.
    pub fn spawn_health_checks(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        shutdown: &tokio::sync::watch::Receiver<bool>,
    ) {
        for (i, o) in self.origins.iter().enumerate() {
            let Some(check) = o.config.health.clone() else {
                continue;
            };
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                if let Some(client) = proxy.origins.get(i) {
                    origin::health::run(client, proxy.selector.state(), i, &check, shutdown).await;
                }
            });
        }
    }

    /// The host and path-and-query under which a URL is keyed: the host lowercased without
    /// port or trailing dot, the query normalised as its site keys it. Purges by URL go
    /// through this, so a purge names what requests for the same URL were stored under.
    pub fn key_of(&self, host: &str, path_and_query: &str) -> (String, String) {
        let host = host_without_port(host).unwrap_or(host).to_ascii_lowercase();
        let pq = match self.sites.find(&host) {
            Some(i) => key_target(&self.config.sites[i], path_and_query).into_owned(),
            None => path_and_query.to_owned(),
        };
        (host, pq)
    }

    /// Body bytes fills hold for storing, and how many fills were not stored because that
    /// reached `cache.fill_memory`.
    pub fn fill_memory(&self) -> (u64, u64) {
        (self.fills.held(), self.fills.refused())
    }

    /// Fetches in flight.
    pub fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }

    /// True when the request's `CDN-Loop` names this node.
    fn is_loop(&self, headers: &HeaderMap) -> bool {
        // The random id alone is looked for, so a proxy between us that rewrites the
        // member's spacing does not hide the loop.
        let id = self
            .boundary
            .strip_prefix("edgecache-")
            .unwrap_or(&self.boundary)
            .as_bytes();
        headers
            .get_all(&CDN_LOOP)
            .iter()
            .any(|v| v.as_bytes().windows(id.len()).any(|w| w == id))
    }

    /// Appends this node to the `CDN-Loop` of a request going upstream.
    fn mark_hop(&self, headers: &mut HeaderMap) {
        headers.append(CDN_LOOP.clone(), self.cdn_loop.clone());
    }

    fn via(&self, version: Version) -> &HeaderValue {
        match version {
            Version::HTTP_2 => &self.via_2,
            Version::HTTP_10 | Version::HTTP_09 => &self.via_10,
            _ => &self.via_11,
        }
    }

    fn cache_status(&self, rest: &str) -> HeaderValue {
        status_value(&self.name, rest)
    }

    /// `Cache-Status` for a miss: `{base}; stored` (the leader) or `{base}; collapsed` (a
    /// follower), from the prepared values when `base` is a plain URI or Vary miss.
    fn miss_status(&self, base: &str, collapsed: bool) -> HeaderValue {
        let prepared = match (base, collapsed) {
            ("fwd=uri-miss", false) => Some(0),
            ("fwd=vary-miss", false) => Some(1),
            ("fwd=uri-miss", true) => Some(2),
            ("fwd=vary-miss", true) => Some(3),
            _ => None,
        };
        match prepared {
            Some(i) => self.miss_statuses[i].clone(),
            None if collapsed => self.cache_status(&format!("{base}; collapsed")),
            None => self.cache_status(&format!("{base}; stored")),
        }
    }

    /// `Cache-Status` for a response just stored: with `fwd-status=200` when it replaced a
    /// stale entry that the origin did not validate.
    fn stored_status(&self, base: &str, replaced_stale: bool) -> HeaderValue {
        if replaced_stale {
            self.cache_status(&format!("{base}; fwd-status=200; stored"))
        } else {
            self.miss_status(base, false)
        }
    }

    /// Answers one request. Never fails: errors become 4xx/5xx responses.
    ///
    /// Everything up to an answer from the cache runs synchronously, in this call; only a
    /// request that must go upstream returns a future with work left (boxed, so the future
    /// hyper keeps per request stays a few words for hits).
    pub fn handle(self: &Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> Handling {
        // The clock is read for the access log only.
        let log = telemetry::access_log_enabled().then(|| {
            Box::new(AccessLog {
                start: Instant::now(),
                client: self.locator.client(conn.peer.ip(), req.headers()),
                method: req.method().clone(),
                version: req.version(),
                host: req
                    .uri()
                    .host()
                    .or_else(|| {
                        req.headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                    })
                    .unwrap_or("-")
                    .to_owned(),
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("-")
                    .to_owned(),
                status: 0,
                cache: "-",
                origin: None,
                origin_ms: None,
                route: None,
                aborted: false,
            })
        });
        match self.serve(req, conn, false) {
            Served::Now(answer) => Handling(HandlingState::Ready(Some(self.finish(answer, log)))),
            Served::Later(fut) => Handling(HandlingState::Waiting {
                fut,
                proxy: self.clone(),
                log,
            }),
        }
    }

    /// Counts the answer and attaches its access-log record (written when the body ends).
    fn finish(
        &self,
        (mut resp, outcome): Answer,
        mut log: Option<Box<AccessLog>>,
    ) -> Response<Body> {
        self.metrics.request(
            outcome.cache,
            resp.status().as_u16(),
            outcome.origin.is_some(),
        );
        if let Some(l) = &mut log {
            l.status = resp.status().as_u16();
            l.cache = outcome.cache;
            l.origin = outcome
                .origin
                .and_then(|i| self.origin_names.get(i).cloned());
            l.origin_ms = outcome.origin_ms;
            l.route = outcome.route;
        }
        resp.body_mut().set_log(log);
        resp
    }

    /// `normal`: the request's path was normalised already (see `path`).
    fn serve(self: &Arc<Self>, req: Request<Incoming>, conn: ConnInfo, normal: bool) -> Served {
        let h = req.headers();
        // One pass over the field names for the fields asked about below: a request has a
        // handful of fields, and comparing a standard name is comparing a byte, where each
        // `contains_key` hashes the name and probes the map.
        let (mut chunked, mut length, mut has_cc, mut has_pragma) = (false, false, false, false);
        let (mut host_field, mut host_fields) = (None, 0u32);
        let (mut connection, mut cdn_loop) = (false, false);
        for (name, value) in h {
            if name == header::CONNECTION {
                connection = true;
            } else if name == CDN_LOOP {
                cdn_loop = true;
            } else if name == header::HOST {
                host_field = Some(value);
                host_fields += 1;
            } else if name == header::TRANSFER_ENCODING {
                chunked = true;
            } else if name == header::CONTENT_LENGTH {
                length = true;
            } else if name == header::CACHE_CONTROL {
                has_cc = true;
            } else if name == header::PRAGMA {
                has_pragma = true;
            }
        }
        // RFC 9112 §6.3: both framings at once is how request smuggling starts; refuse and close.
        // hyper's HTTP/1 parser already drops the length and closes after the response, so this
        // guards any path (or future parser) that hands us both.
        if chunked && length {
            return Served::Now(refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: Content-Length and Transfer-Encoding together\n",
                true,
            ));
        }
        // The fields `Connection` names are for this hop only and are never forwarded, so
        // the key, `Vary` matching and rules must not see them either: otherwise
        // `Accept-Language: de` with `Connection: accept-language` reaches the origin without
        // the field and its default answer is stored as the `de` variant. Removed once, up
        // front; the request then has no `Connection` field and is served as if sent so.
        if connection {
            let mut req = req;
            headers::remove_hop_by_hop(req.headers_mut());
            return self.serve(req, conn, normal);
        }
        // RFC 8586: our own `CDN-Loop` member means a site's origin leads back to this node
        // (directly or through others); forwarding again would loop until a limit broke it.
        if cdn_loop && self.is_loop(h) {
            return Served::Now(refuse(
                StatusCode::LOOP_DETECTED,
                "edgecache: request loop: this request has already passed this node\n",
                true,
            ));
        }
        if req.method() == Method::CONNECT {
            return Served::Now(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "edgecache: CONNECT is not supported\n",
                false,
            ));
        }
        let Some(pq) = req
            .uri()
            .path_and_query()
            .filter(|p| p.as_str().starts_with('/'))
        else {
            return Served::Now(refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: the request target must be a path\n",
                true,
            ));
        };
        // The target's authority (absolute-form, HTTP/2 :authority) takes precedence over Host.
        let authority = match req.uri().authority() {
            Some(a) => a.as_str(),
            None => match (host_field.and_then(|v| v.to_str().ok()), host_fields) {
                (Some(v), 1) => v,
                _ => {
                    return Served::Now(refuse(
                        StatusCode::BAD_REQUEST,
                        "edgecache: exactly one Host header is required\n",
                        true,
                    ))
                }
            },
        };
        let Some(host) = host_without_port(authority).filter(|_| !authority.contains('@')) else {
            return Served::Now(refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: invalid Host\n",
                true,
            ));
        };
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let Some(site_idx) = self.sites.find(&host) else {
            // Never an open proxy: an unknown host reaches no origin.
            return Served::Now(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "edgecache: this host is not served here\n",
                false,
            ));
        };
        let site = &self.config.sites[site_idx];
        // The `Host` sent upstream; built only where a request goes upstream, not per hit.
        // The host as the key and the site table saw it (lowercase, no port, no trailing
        // dot), as nginx's `$host`: the origin must not answer a request the key cannot tell
        // apart from another (`Host: site.test:1337` stored for every client of `site.test`).
        let host_value =
            || HeaderValue::from_str(&host).unwrap_or(HeaderValue::from_static("invalid"));

        // Methods the site does not serve are answered here, never forwarded (TRACE never is:
        // it would echo the request, cookies and all, as nginx also refuses).
        if !site.methods.allows(req.method()) {
            let (mut resp, outcome) = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "edgecache: method not allowed\n",
                false,
            );
            resp.headers_mut()
                .insert(header::ALLOW, site.methods.allow().clone());
            return Served::Now((resp, outcome));
        }
        // RFC 9110 §9.3.1: a GET or HEAD body has no meaning, and forwarding its framing
        // without the bytes (or the bytes to an origin that does not expect them) leaves a
        // pooled origin connection reading one request as another.
        let cache_method = req.method() == Method::GET || req.method() == Method::HEAD;
        if cache_method && !req.body().is_end_stream() {
            return Served::Now(refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: a GET or HEAD request may not have a body\n",
                true,
            ));
        }
        // The path as the key, the rules and the origin all see it: dot segments resolved,
        // unreserved characters decoded (RFC 3986 §6.2.2). Normalised once; the request
        // then carries the normal path and is served as if sent so.
        if !normal {
            match path::normalise(req.uri().path(), site.refuse_escaped_slashes) {
                Ok(Cow::Borrowed(_)) => {}
                Ok(Cow::Owned(p)) => {
                    let target = match req.uri().query() {
                        Some(q) => format!("{p}?{q}"),
                        None => p,
                    };
                    let mut uri = req.uri().clone().into_parts();
                    uri.path_and_query = PathAndQuery::try_from(target).ok();
                    let Ok(uri) = Uri::from_parts(uri) else {
                        return Served::Now(refuse(
                            StatusCode::BAD_REQUEST,
                            "edgecache: invalid request target\n",
                            true,
                        ));
                    };
                    let mut req = req;
                    *req.uri_mut() = uri;
                    return self.serve(req, conn, true);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "path refused");
                    return Served::Now(refuse(
                        StatusCode::BAD_REQUEST,
                        match e {
                            path::PathError::AboveRoot => {
                                "edgecache: the path climbs above the root\n"
                            }
                            path::PathError::EscapedSlash => {
                                "edgecache: encoded slashes are not accepted here\n"
                            }
                            path::PathError::BadEncoding => {
                                "edgecache: invalid percent-encoding in the path\n"
                            }
                        },
                        true,
                    ));
                }
            }
        }

        // Request rates (per client, per site): here, once the path is final, so a request
        // served again after normalising is counted once.
        if let Some(answer) = self
            .limits
            .check(site_idx, conn.peer.ip(), h, &self.locator)
        {
            return Served::Now(answer);
        }
        if req.method().as_str() == "PURGE" {
            let host = host.into_owned();
            let key_pq = key_target(site, pq.as_str());
            return Served::Now(self.purge_method(&req, conn, &host, &key_pq));
        }
        let rule = site.rule(req.uri().path());
        if !cache_method || rule.is_some_and(|r| r.bypass) {
            let detail = if cache_method {
                "fwd=bypass"
            } else {
                "fwd=method"
            };
            let status = self.cache_status(detail);
            let host_value = host_value();
            let host = host.into_owned();
            // Boxed, like the fetch below: only work that waits for an origin becomes a
            // future; everything before it (and every hit) runs in this call.
            let this = self.clone();
            return Served::Later(Box::pin(async move {
                this.pass(req, conn, site_idx, &host, host_value, status)
                    .await
            }));
        }

        // cache_lookup
        let req_cc = if has_cc {
            CacheControl::from_headers(h)
        } else {
            CacheControl::default()
        };
        let asked_fresh = req_cc.no_cache
            || req_cc.max_age == Some(0)
            || (!has_cc
                && has_pragma
                && h.get(header::PRAGMA)
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache")));
        let forced = asked_fresh && site.cache.client_no_cache == ClientNoCache::Revalidate;
        let key_pq = key_target(site, pq.as_str());
        let parts = KeyParts {
            https: conn.https,
            host: &host,
            path_and_query: &key_pq,
        };
        let extra = key_extra(h, &site.cache.key_headers, &site.cache.key_cookies);
        let hash = self.store.hash(&parts);
        let now = SystemTime::now();
        let stored = self.store.get(hash, &parts, extra.as_deref(), h);
        let head = req.method() == Method::HEAD;
        if let Some(entry) = &stored {
            match policy::reuse(&entry.facts(now), &req_cc, forced) {
                Reuse::Fresh => {
                    return Served::Now((
                        self.answer_from_entry(entry, h, head, now, self.hit.clone()),
                        Outcome_::local("hit"),
                    ))
                }
                Reuse::StaleAccepted => {
                    let status = self
                        .cache_status(&format!("hit; ttl={}; detail=max-stale", ttl(entry, now)));
                    return Served::Now((
                        self.answer_from_entry(entry, h, head, now, status),
                        Outcome_::local("stale"),
                    ));
                }
                Reuse::StaleWhileRevalidate => {
                    let status = self.cache_status(&format!(
                        "hit; fwd=stale; ttl={}; detail=stale-while-revalidate",
                        ttl(entry, now)
                    ));
                    let resp = self.answer_from_entry(entry, h, head, now, status);
                    self.refresh_in_background(
                        &req,
                        conn,
                        site_idx,
                        &parts,
                        extra.clone(),
                        hash,
                        host_value(),
                        entry.clone(),
                    );
                    return Served::Now((resp, Outcome_::local("stale")));
                }
                Reuse::Revalidate => {}
            }
        }
        if req_cc.only_if_cached && stored.is_none() {
            return Served::Now(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "edgecache: not cached (only-if-cached)\n",
                false,
            ));
        }
        let settings = rule
            .map(|r| r.apply(&site.cache.settings))
            .unwrap_or_else(|| site.cache.settings.clone());
        let key = OwnedKey::new(&parts);
        let miss = if stored.is_none() && self.store.contains(hash) {
            "fwd=vary-miss"
        } else {
            "fwd=uri-miss"
        };
        let lookup = Lookup {
            site: site_idx,
            hash,
            key,
            extra,
            settings,
            forced,
            head,
            host_value: host_value(),
            parts: Arc::new(req.into_parts().0),
            conn,
            ignore_range: false,
            miss,
        };
        let this = self.clone();
        Served::Later(Box::pin(async move { this.fetch(lookup, stored).await }))
    }

    /// Fetches for a cacheable request: collapsed with other requests for the same key unless
    /// the URL was recently uncacheable or the request is personal.
    async fn fetch(self: &Arc<Self>, lookup: Lookup, stale: Option<Arc<Entry>>) -> Answer {
        let h = &lookup.parts.headers;
        let solo = self.store.is_hit_for_miss(lookup.hash)
            || h.contains_key(header::AUTHORIZATION)
            || lookup.forced;
        if solo {
            let fill = Arc::new(Fill::default());
            return self.lead(&lookup, fill, false, stale).await;
        }
        for _ in 0..3 {
            let (fill, leader) = self.fills.join(lookup.hash);
            if leader {
                return self.lead(&lookup, fill, true, stale).await;
            }
            let range = h.contains_key(header::RANGE);
            let (outcome, reader) = fill.wait(!lookup.head && !range).await;
            let now = SystemTime::now();
            match outcome {
                Outcome::Streaming(fhead) => {
                    if !fhead.vary.matches(h, lookup.extra.as_deref()) {
                        break;
                    }
                    if range {
                        // Ranges are cut from the stored object once it is complete.
                        if let Some(e) = self.stored_after(&fill, &lookup).await {
                            let status = self.miss_status(lookup.miss, true);
                            return (
                                self.answer_from_entry(&e, h, false, now, status),
                                Outcome_::local("collapsed"),
                            );
                        }
                        break;
                    }
                    let status = self.miss_status(lookup.miss, true);
                    return (
                        self.answer_from_fill(&fhead, reader, h, lookup.head, status),
                        Outcome_::local("collapsed"),
                    );
                }
                Outcome::Ready(entry) => {
                    // The leader's entry is for the leader's variant: a follower whose
                    // request differs in a `Vary`-ed field or the site's extra key must not
                    // get it (it would be another user's page). The leader has left the
                    // map by now: joining again leads (or follows) a fill for our variant.
                    if !entry.vary.matches(h, lookup.extra.as_deref()) {
                        continue;
                    }
                    let status = if stale.is_some() {
                        self.cache_status("fwd=stale; collapsed")
                    } else {
                        self.miss_status(lookup.miss, true)
                    };
                    return (
                        self.answer_from_entry(&entry, h, lookup.head, now, status),
                        Outcome_::local("collapsed"),
                    );
                }
                Outcome::Failed {
                    status: code,
                    unreachable,
                } => {
                    if let Some(s) = stale.as_ref().filter(|s| s.usable_if_error(now)) {
                        let status = self.cache_status(&format!(
                            "hit; fwd=stale; fwd-status={}; collapsed; detail=stale-if-error",
                            code.as_u16()
                        ));
                        return (
                            self.answer_from_entry(s, h, lookup.head, now, status),
                            Outcome_::local("stale"),
                        );
                    }
                    if let Some(s) = stale
                        .as_ref()
                        .filter(|s| unreachable && s.usable_when_disconnected())
                    {
                        let status = self.cache_status(&format!(
                            "hit; fwd=stale; fwd-status={}; collapsed; detail=origin-unreachable",
                            code.as_u16()
                        ));
                        return (
                            self.answer_from_entry(s, h, lookup.head, now, status),
                            Outcome_::local("stale"),
                        );
                    }
                    let msg = if code == StatusCode::GATEWAY_TIMEOUT {
                        "edgecache: the origin did not answer in time\n"
                    } else {
                        "edgecache: the origin failed to answer\n"
                    };
                    return (respond::simple(code, msg, false), Outcome_::local("error"));
                }
                Outcome::Uncacheable => break,
                Outcome::Retry | Outcome::Pending => continue,
            }
        }
        let fill = Arc::new(Fill::default());
        let lookup = Lookup {
            ignore_range: true,
            ..lookup
        };
        self.lead(&lookup, fill, false, stale).await
    }

    /// Fetches from the origin for `lookup` and publishes the result on `fill` for followers.
    /// `registered` says whether `fill` is in the shared map (and must be removed from it).
    async fn lead(
        self: &Arc<Self>,
        lookup: &Lookup,
        fill: Arc<Fill>,
        registered: bool,
        stale: Option<Arc<Entry>>,
    ) -> Answer {
        let (candidates, route) = self.candidates(lookup.site, lookup.conn, &lookup.parts.headers);
        let (resp, mut outcome) = self
            .lead_with(lookup, fill, registered, stale, &candidates)
            .await;
        outcome.route = route;
        (resp, outcome)
    }

    async fn lead_with(
        self: &Arc<Self>,
        lookup: &Lookup,
        fill: Arc<Fill>,
        registered: bool,
        stale: Option<Arc<Entry>>,
        candidates: &[usize],
    ) -> Answer {
        let mut guard = LeaderGuard {
            proxy: self,
            hash: lookup.hash,
            fill: fill.clone(),
            registered,
            armed: true,
        };
        let site = &self.config.sites[lookup.site];
        let client = &lookup.parts.headers;

        // origin_fetch: a whole-object GET; our own validators when revalidating.
        let mut up_headers = client.clone();
        // The GET sent has no body, so no framing field goes with it (a request with a body
        // never gets here).
        up_headers.remove(header::CONTENT_LENGTH);
        if up_headers.keys().any(|k| CONDITIONAL_FIELDS.contains(k)) {
            for f in &CONDITIONAL_FIELDS {
                up_headers.remove(f);
            }
        }
        let validators = stale.as_ref().filter(|s| s.has_validator());
        if let Some(s) = validators {
            if let Some(etag) = s.headers.get(header::ETAG) {
                up_headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = s.headers.get(header::LAST_MODIFIED) {
                up_headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }
        let trusted = self.trusted(lookup.conn, &mut up_headers);
        forward_request_headers(
            &mut up_headers,
            lookup.conn.peer.ip(),
            lookup.conn.https,
            &lookup.host_value,
            trusted,
            self.via(lookup.parts.version),
        );
        self.mark_hop(&mut up_headers);
        // The path and query as keyed, not as received: parameters the key drops or reorders
        // never reach the origin (a response to `?id=1&utm_source=<script>` would otherwise
        // be stored for `?id=1`).
        let pq = match lookup.parts.uri.path_and_query() {
            Some(raw) if raw.as_str() == &*lookup.key.path_and_query => raw.clone(),
            _ => match PathAndQuery::try_from(&*lookup.key.path_and_query) {
                Ok(pq) => pq,
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "edgecache: invalid request target\n",
                        true,
                    )
                }
            },
        };
        let request_time = SystemTime::now();
        let Some((origin_index, origin_ms, result)) = self
            .send_failover(
                candidates,
                &Method::GET,
                &pq,
                up_headers,
                &lookup.host_value,
                None,
            )
            .await
        else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: invalid request target\n",
                true,
            );
        };
        let origin = &self.origins[origin_index];
        let now = SystemTime::now();
        let client_status_base = if lookup.forced {
            "fwd=request"
        } else if stale.is_some() {
            "fwd=stale"
        } else {
            lookup.miss
        };

        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(origin = %origin.config.name, error = %ErrorChain(&e), "origin request failed");
                let code = if e.is_timeout() {
                    StatusCode::GATEWAY_TIMEOUT
                } else if e.is_saturated() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                // No answer at all (refused, reset, no address): the cache is disconnected from
                // the origin, and RFC 9111 §4.2.4 lets it serve what it has unless the response
                // says it must be revalidated, whatever grace the site gives.
                let unreachable = e.is_connect() || e.is_broken();
                guard.publish(Outcome::Failed {
                    status: code,
                    unreachable,
                });
                if let Some(s) = stale.as_ref().filter(|s| s.usable_if_error(now)) {
                    let status = self.cache_status(&format!(
                        "hit; fwd=stale; fwd-status={}; detail=stale-if-error",
                        code.as_u16()
                    ));
                    return (
                        self.answer_from_entry(s, client, lookup.head, now, status),
                        Outcome_::origin("stale", origin_index, origin_ms),
                    );
                }
                if let Some(s) = stale
                    .as_ref()
                    .filter(|s| unreachable && s.usable_when_disconnected())
                {
                    let status = self.cache_status(&format!(
                        "hit; fwd=stale; fwd-status={}; detail=origin-unreachable",
                        code.as_u16()
                    ));
                    return (
                        self.answer_from_entry(s, client, lookup.head, now, status),
                        Outcome_::origin("stale", origin_index, origin_ms),
                    );
                }
                if stale.is_some() {
                    // RFC 9111 §5.2.2.2: a stored response that may not be served stale and
                    // cannot be revalidated is answered with 504, never reused.
                    return (
                        respond::simple(
                            StatusCode::GATEWAY_TIMEOUT,
                            "edgecache: the stored response could not be revalidated\n",
                            false,
                        ),
                        Outcome_::origin("error", origin_index, origin_ms),
                    );
                }
                return (
                    respond::origin_error(&e),
                    Outcome_::origin("error", origin_index, origin_ms),
                );
            }
        };
        let response_time = SystemTime::now();
        let (mut rparts, rbody) = resp.into_parts();
        remove_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .append(header::VIA, self.via(rparts.version).clone());
        rparts.version = Version::HTTP_11;

        // A 304 for our validators refreshes the stored response (RFC 9111 §4.3.4).
        if rparts.status == StatusCode::NOT_MODIFIED {
            if let Some(s) = validators {
                let mut headers = s.headers.clone();
                policy::refresh_headers(&mut headers, &rparts.headers);
                let facts = RequestFacts {
                    method: &Method::GET,
                    has_authorization: client.contains_key(header::AUTHORIZATION),
                    cache_control: &CacheControl::default(),
                };
                let decision =
                    policy::storable(facts, s.status, &headers, &lookup.settings, response_time);
                let initial_age =
                    policy::corrected_initial_age(&rparts.headers, request_time, response_time);
                // What the 304 says to this client alone (`Set-Cookie`, fields named by
                // `private=` / `no-cache=`) is stripped as on store: it never enters the
                // shared copy, and only this client receives it.
                let mut strip = decision
                    .as_ref()
                    .map(|d| d.strip.clone())
                    .unwrap_or_default();
                if !strip.iter().any(|n| n.eq_ignore_ascii_case("set-cookie")) {
                    strip.push("set-cookie".into());
                }
                let personal: Vec<(HeaderName, HeaderValue)> = rparts
                    .headers
                    .iter()
                    .filter(|(n, _)| strip.iter().any(|f| f.eq_ignore_ascii_case(n.as_str())))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                let stored_ok = decision.is_ok();
                let refreshed = s.refreshed(
                    strip_cache_only(headers, &strip),
                    response_time,
                    initial_age,
                    decision.unwrap_or_else(|_| s.decision.clone()),
                );
                // The refreshed entry is built once: stored, shared with followers and
                // answered from when storable; otherwise answered from for this client only,
                // the old one removed, and followers fetch for themselves.
                let entry = if stored_ok {
                    let entry = self.store.insert_shared(lookup.hash, refreshed);
                    guard.publish(Outcome::Ready(entry.clone()));
                    entry
                } else {
                    self.store.remove(lookup.hash);
                    guard.publish(Outcome::Uncacheable);
                    Arc::new(refreshed)
                };
                let status = self.cache_status(&format!("{client_status_base}; fwd-status=304"));
                let mut resp =
                    self.answer_from_entry(&entry, client, lookup.head, response_time, status);
                for (name, value) in personal {
                    resp.headers_mut().append(name, value);
                }
                return (
                    resp,
                    Outcome_::origin("revalidated", origin_index, origin_ms),
                );
            }
        }
        // An origin error with a usable stale response: serve stale (RFC 5861 §4).
        if rparts.status.is_server_error() {
            if let Some(s) = stale.as_ref().filter(|s| s.usable_if_error(now)) {
                guard.publish(Outcome::Failed {
                    status: rparts.status,
                    unreachable: false,
                });
                let status = self.cache_status(&format!(
                    "hit; fwd=stale; fwd-status={}; detail=stale-if-error",
                    rparts.status.as_u16()
                ));
                return (
                    self.answer_from_entry(s, client, lookup.head, now, status),
                    Outcome_::origin("stale", origin_index, origin_ms),
                );
            }
        }

        // cache_store
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &CacheControl::from_headers(client),
        };
        let limit = self.config.cache.max_object_size;
        let content_length = rparts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        let decision = policy::storable(
            facts,
            rparts.status,
            &rparts.headers,
            &lookup.settings,
            response_time,
        )
        .and_then(|d| {
            if content_length.is_some_and(|n| n > limit) {
                Err(NoStoreReason::TooLarge)
            } else {
                Ok(d)
            }
        });
        let tags = tags(&rparts.headers);
        let strip: Vec<Box<str>> = decision
            .as_ref()
            .map(|d| d.strip.clone())
            .unwrap_or_default();
        rparts.headers = strip_cache_only(std::mem::take(&mut rparts.headers), &strip);
        let vary = VaryKey::from_response(&rparts.headers, client).with_extra(lookup.extra.clone());
        // A new variant past the URL's budget is served, not stored (see `Store::admit_variant`).
        let decision = decision.and_then(|d| {
            let admitted = self.store.admit_variant(lookup.hash, &lookup.key, &vary);
            admitted.map(|()| d)
        });
        let decision = match decision {
            Ok(d) => d,
            Err(reason) => {
                guard.publish(Outcome::Uncacheable);
                // Errors are not a property of the URL: keep collapsing so a failing origin is
                // not hit by every waiting client at once.
                if !rparts.status.is_server_error()
                    && !matches!(
                        reason,
                        NoStoreReason::RequestNoStore
                            | NoStoreReason::Authorization
                            | NoStoreReason::VariantRate
                    )
                {
                    self.store
                        .mark_hit_for_miss(lookup.hash, site.cache.hit_for_miss);
                }
                if stale.is_some() && !rparts.status.is_server_error() {
                    // The origin's current answer supersedes what we held (a 5xx does not: §4.3.3).
                    self.store.remove(lookup.hash);
                }
                let ours =
                    self.cache_status(&format!("{client_status_base}; detail={}", reason.as_str()));
                let status = after_upstream(&rparts.headers, ours);
                rparts.headers.insert(CACHE_STATUS.clone(), status);
                let body = if lookup.head {
                    Body::empty()
                } else {
                    Body::stream(rbody)
                };
                return (
                    Response::from_parts(rparts, body),
                    Outcome_::origin("pass", origin_index, origin_ms),
                );
            }
        };
        if content_length.is_some_and(|n| n <= SMALL_OBJECT) {
            // A small object is read whole before anyone is answered: followers are then
            // served from the stored entry, with no streaming machinery per request.
            let mut body = rbody;
            let mut buf = bytes::BytesMut::with_capacity(content_length.unwrap_or(0) as usize);
            let complete = loop {
                match tokio::time::timeout(origin.config.timeout, body.frame()).await {
                    Ok(None) => break true,
                    Ok(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            buf.extend_from_slice(d);
                        }
                    }
                    _ => break false,
                }
            };
            if !complete || buf.len() as u64 != content_length.unwrap_or(0) {
                guard.publish(Outcome::Failed {
                    status: StatusCode::BAD_GATEWAY,
                    unreachable: false,
                });
                return (
                    respond::simple(
                        StatusCode::BAD_GATEWAY,
                        "edgecache: the origin's response was cut off\n",
                        false,
                    ),
                    Outcome_::origin("error", origin_index, origin_ms),
                );
            }
            let initial_age =
                policy::corrected_initial_age(&rparts.headers, request_time, response_time);
            let entry = Entry::new(
                lookup.key.clone(),
                vary,
                rparts.status,
                rparts.headers,
                buf.freeze(),
                response_time,
                initial_age,
                decision,
                tags,
            );
            let entry = self.store.insert_shared(lookup.hash, entry);
            guard.publish(Outcome::Ready(entry.clone()));
            let status = self.stored_status(client_status_base, stale.is_some());
            let resp =
                self.answer_from_entry(&entry, client, lookup.head, SystemTime::now(), status);
            return (resp, Outcome_::origin("miss", origin_index, origin_ms));
        }
        let fhead = Arc::new(FillHead {
            status: rparts.status,
            headers: rparts.headers.clone(),
            vary: vary.clone(),
            content_length,
        });
        guard.publish(Outcome::Streaming(fhead.clone()));
        guard.armed = false;
        let range = client.contains_key(header::RANGE) && !lookup.ignore_range;
        let reader = if lookup.head || range {
            None
        } else {
            fill.reader()
        };
        let done = range.then(|| fill.clone());
        let pump = Pump {
            store: self.store.clone(),
            proxy: self.clone(),
            hash: lookup.hash,
            fill,
            registered,
            key: lookup.key.clone(),
            vary,
            status: rparts.status,
            headers: rparts.headers,
            request_time,
            response_time,
            decision,
            tags,
            limit,
            idle: origin.config.timeout,
            hit_for_miss: site.cache.hit_for_miss,
        };
        tokio::spawn(pump.run(rbody));
        if let Some(fill) = done {
            // A range is cut from the stored object once it is complete.
            if let Some(e) = self.stored_after(&fill, lookup).await {
                let status = self.miss_status(client_status_base, false);
                return (
                    self.answer_from_entry(&e, client, lookup.head, SystemTime::now(), status),
                    Outcome_::origin("miss", origin_index, origin_ms),
                );
            }
            let lookup = Lookup {
                ignore_range: true,
                ..lookup.clone()
            };
            return Box::pin(self.lead(&lookup, Arc::new(Fill::default()), false, None)).await;
        }
        let status = self.stored_status(client_status_base, stale.is_some());
        (
            self.answer_from_fill(&fhead, reader, client, lookup.head, status),
            Outcome_::origin("miss", origin_index, origin_ms),
        )
    }

    /// Origins for a miss, best first: the site's route for where the client is, its pools in
    /// order, each origin by latency and health (see `origin::select`); and the route's name.
    fn candidates(
        &self,
        site: usize,
        conn: ConnInfo,
        headers: &HeaderMap,
    ) -> (Vec<usize>, Option<Arc<str>>) {
        let site = &self.config.sites[site];
        let loc = self.locator.locate(conn.peer.ip(), headers);
        let Some(route) = site.route(&loc) else {
            return (vec![site.origin], None);
        };
        let views: Vec<PoolView<'_>> = route
            .pools
            .iter()
            .filter_map(|&p| self.config.pools.get(p))
            .map(|p| PoolView {
                origins: &p.origins,
                spill_latency: p.spill_latency,
            })
            .collect();
        let out = self.selector.candidates(&views, Instant::now());
        let name = Some(route.name.clone());
        if out.is_empty() {
            (vec![site.origin], name)
        } else {
            (out, name)
        }
    }

    /// Sends a request to the first candidate. A bodiless idempotent request is sent again to
    /// the next candidate when nothing came back: after a failed connection (down the list, up
    /// to [`MAX_ATTEMPTS`] in all) or once after a connection that broke before the response
    /// head; each retry is taken from the retry budget. A request with a body is sent once.
    /// Returns the origin used, the time to its response head in milliseconds, and the
    /// result; `None` for an invalid target.
    async fn send_failover(
        &self,
        candidates: &[usize],
        method: &Method,
        pq: &PathAndQuery,
        mut headers: HeaderMap,
        host: &HeaderValue,
        mut body: Option<UpstreamBody>,
    ) -> Option<(usize, f64, Result<Response<Incoming>, origin::Error>)> {
        let retryable = body.is_none() && method.is_idempotent();
        let attempts = candidates.len().min(MAX_ATTEMPTS);
        self.retry_budget.request(Instant::now());
        let mut last = None;
        let mut broken_retried = false;
        for (attempt, &index) in candidates.iter().take(attempts).enumerate() {
            if attempt > 0 {
                if !self.retry_budget.try_retry(Instant::now()) {
                    self.metrics.retry(false);
                    tracing::debug!("retry budget spent: not retrying");
                    break;
                }
                self.metrics.retry(true);
            }
            let origin = self.origins.get(index)?;
            let uri = origin_uri(origin, pq.clone())?;
            let mut up = Request::new(body.take().unwrap_or_else(UpstreamBody::empty));
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            // The last attempt takes the fields; earlier ones send a copy.
            let mut h = if attempt + 1 < attempts {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            h.insert(
                header::HOST,
                origin
                    .config
                    .host_header
                    .clone()
                    .unwrap_or_else(|| host.clone()),
            );
            *up.headers_mut() = h;
            // Counted while the request waits, and given back however the wait ends (a client
            // that leaves drops this future mid-await).
            let in_flight = self.selector.state().enter(index);
            let sent_at = Instant::now();
            let result = origin.send(up).await;
            let elapsed = sent_at.elapsed();
            drop(in_flight);
            let ms = elapsed.as_secs_f64() * 1000.0;
            match &result {
                Ok(r) if origin.config.fail_on.contains(&r.status().as_u16()) => {
                    self.note_failure(index, Failure::Status(r.status()));
                }
                Ok(_) => {
                    if self
                        .selector
                        .state()
                        .success(index, elapsed, Instant::now())
                    {
                        tracing::info!(origin = %origin.config.name, "origin back in rotation after its ejection");
                    }
                }
                Err(e) => {
                    if !e.is_saturated() {
                        self.note_failure(
                            index,
                            if e.is_timeout() {
                                Failure::Timeout
                            } else if e.is_connect() {
                                Failure::Connect
                            } else {
                                Failure::Broken
                            },
                        );
                    }
                    let again = retryable
                        && attempt + 1 < attempts
                        && (e.is_connect() || (e.is_broken() && !broken_retried));
                    if again {
                        broken_retried |= !e.is_connect();
                        tracing::warn!(origin = %origin.config.name, error = %ErrorChain(e), "no answer from origin, trying the next one");
                        last = Some((index, ms, result));
                        continue;
                    }
                }
            }
            return Some((index, ms, result));
        }
        last
    }

    fn note_failure(&self, index: usize, why: Failure) {
        if let Some(back_off) = self.selector.state().failure(index, Instant::now()) {
            if let Some(o) = self.origins.get(index) {
                tracing::warn!(
                    origin = %o.config.name,
                    failures = origin::state::EJECT_AFTER,
                    last = %why,
                    ejected_for_s = back_off.as_secs(),
                    "origin ejected after failures in a row"
                );
            }
        }
    }

    /// Waits for `fill` to complete and returns the entry it stored for `lookup`, if any.
    async fn stored_after(&self, fill: &Fill, lookup: &Lookup) -> Option<Arc<Entry>> {
        if !fill.wait_done().await {
            return None;
        }
        let parts = lookup.key.parts();
        self.store.get(
            lookup.hash,
            &parts,
            lookup.extra.as_deref(),
            &lookup.parts.headers,
        )
    }

    /// Starts one background revalidation for a stale entry (stale-while-revalidate).
    #[allow(clippy::too_many_arguments)]
    fn refresh_in_background(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        conn: ConnInfo,
        site: usize,
        parts: &KeyParts<'_>,
        extra: Option<Box<str>>,
        hash: u64,
        host_value: HeaderValue,
        stale: Arc<Entry>,
    ) {
        let (fill, leader) = self.fills.join(hash);
        if !leader {
            return;
        }
        let mut head = Request::new(());
        *head.method_mut() = Method::GET;
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let settings = {
            let s = &self.config.sites[site];
            s.rule(req.uri().path())
                .map(|r| r.apply(&s.cache.settings))
                .unwrap_or_else(|| s.cache.settings.clone())
        };
        let lookup = Lookup {
            site,
            hash,
            key: OwnedKey::new(parts),
            extra,
            settings,
            forced: false,
            head: true,
            parts: Arc::new(head.into_parts().0),
            host_value,
            conn,
            ignore_range: true,
            miss: "fwd=stale",
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            let _ = proxy.lead(&lookup, fill, true, Some(stale)).await;
        });
    }

    /// Forwards a request that the cache does not handle (other methods, bypass rules).
    async fn pass(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        site_idx: usize,
        host: &str,
        host_value: HeaderValue,
        status: HeaderValue,
    ) -> Answer {
        let (candidates, route) = self.candidates(site_idx, conn, req.headers());
        let (resp, mut outcome) = self
            .pass_with(req, conn, site_idx, host, host_value, status, &candidates)
            .await;
        outcome.route = route;
        (resp, outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pass_with(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        site_idx: usize,
        host: &str,
        host_value: HeaderValue,
        status: HeaderValue,
        candidates: &[usize],
    ) -> Answer {
        let method = req.method().clone();
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let (mut parts, body) = req.into_parts();
        let mut up_headers = std::mem::take(&mut parts.headers);
        let trusted = self.trusted(conn, &mut up_headers);
        forward_request_headers(
            &mut up_headers,
            conn.peer.ip(),
            conn.https,
            &host_value,
            trusted,
            self.via(parts.version),
        );
        self.mark_hop(&mut up_headers);
        // Only a request without a body to replay may be retried on another origin.
        let up_body = if body.is_end_stream() {
            None
        } else {
            match preread(body, self.config.server.header_read_timeout).await {
                Ok(b) => Some(b),
                Err(PrereadError::Malformed) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "edgecache: malformed request body\n",
                        true,
                    )
                }
                Err(PrereadError::TimedOut) => {
                    return refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "edgecache: request body too slow\n",
                        true,
                    )
                }
            }
        };
        let retry_ok = up_body.is_none() && method.is_idempotent();
        let attempts = if retry_ok {
            candidates
        } else {
            &candidates[..candidates.len().min(1)]
        };
        let Some((origin_index, origin_ms, result)) = self
            .send_failover(attempts, &method, &pq, up_headers, &host_value, up_body)
            .await
        else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: invalid request target\n",
                true,
            );
        };
        let origin = &self.origins[origin_index];
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(origin = %origin.config.name, error = %ErrorChain(&e), "origin request failed");
                return (
                    respond::origin_error(&e),
                    Outcome_::origin("error", origin_index, origin_ms),
                );
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        remove_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .append(header::VIA, self.via(rparts.version).clone());
        rparts.version = Version::HTTP_11;
        // RFC 9111 §4.4: a successful unsafe request invalidates the target URI and the same-host
        // URIs named by Location and Content-Location.
        if !method.is_safe() && (rparts.status.is_success() || rparts.status.is_redirection()) {
            let site = &self.config.sites[site_idx];
            self.store.purge(
                &PurgeTarget::Url {
                    host,
                    path_and_query: &key_target(site, pq.as_str()),
                },
                false,
            );
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(target) = rparts
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<Uri>().ok())
                {
                    let same_host = target.host().is_none_or(|h| h.eq_ignore_ascii_case(host));
                    if let (true, Some(p)) = (same_host, target.path_and_query()) {
                        if p.as_str().starts_with('/') {
                            self.store.purge(
                                &PurgeTarget::Url {
                                    host,
                                    path_and_query: &key_target(site, p.as_str()),
                                },
                                false,
                            );
                        }
                    }
                }
            }
        }
        rparts.headers = strip_cache_only(std::mem::take(&mut rparts.headers), &[]);
        let status = after_upstream(&rparts.headers, status);
        rparts.headers.insert(CACHE_STATUS.clone(), status);
        let cache = if method.is_safe() { "bypass" } else { "pass" };
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            Body::stream(rbody)
        };
        (
            Response::from_parts(rparts, body),
            Outcome_::origin(cache, origin_index, origin_ms),
        )
    }

    /// The HTTP `PURGE` method: removes every stored variant of the URL, for clients in
    /// allowed networks or bearing the admin token (see `purge`).
    fn purge_method(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        host: &str,
        pq: &str,
    ) -> Answer {
        let allowed = purge::allowed(
            self.config.admin.as_ref(),
            &self.locator,
            conn.peer.ip(),
            req.headers(),
        );
        if !allowed {
            return refuse(
                StatusCode::FORBIDDEN,
                "edgecache: PURGE is not allowed from this address\n",
                false,
            );
        }
        let soft = req
            .headers()
            .get("x-purge-soft")
            .is_some_and(|v| v == "1" || v == "true");
        let n = self.store.purge(
            &PurgeTarget::Url {
                host,
                path_and_query: pq,
            },
            soft,
        );
        let mut resp = Response::new(Body::full(Bytes::from(format!("{{\"purged\":{n}}}\n"))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        (resp, Outcome_::local("purge"))
    }

    /// Whether the peer is a trusted proxy whose forwarding fields are kept. The field it
    /// does not write (`server.client_address_header`) is the client's own and is dropped
    /// here, so it never reaches the origin as if the proxy had vouched for it.
    fn trusted(&self, conn: ConnInfo, headers: &mut HeaderMap) -> bool {
        let trusted = self
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&conn.peer.ip()));
        if trusted {
            match self.config.server.client_address_header {
                crate::geo::AddressHeader::XForwardedFor => {
                    headers.remove(header::FORWARDED);
                }
                crate::geo::AddressHeader::Forwarded => {
                    headers.remove(&X_FORWARDED_FOR_NAME);
                }
            }
        }
        trusted
    }

    /// Answers from a stored response: preconditions (304/412), ranges (206/416), HEAD.
    fn answer_from_entry(
        &self,
        entry: &Entry,
        request: &HeaderMap,
        head: bool,
        now: SystemTime,
        status: HeaderValue,
    ) -> Response<Body> {
        let status = chain_status(entry.upstream_status.as_ref(), status);
        let age = headers::age_value(entry.age(now).as_secs());
        let ok = entry.status == StatusCode::OK;
        match policy::evaluate_preconditions(request, &entry.headers) {
            Precondition::NotModified if ok || entry.headers.contains_key(header::ETAG) => {
                return not_modified(&entry.headers, age, status);
            }
            Precondition::Failed => {
                let mut r = respond::simple(
                    StatusCode::PRECONDITION_FAILED,
                    "edgecache: precondition failed\n",
                    false,
                );
                r.headers_mut().insert(CACHE_STATUS.clone(), status);
                return r;
            }
            Precondition::IgnoreRange => return self.whole(entry, head, age, status),
            Precondition::NotModified | Precondition::Proceed => {}
        }
        if let (true, Some(r)) = (ok, request.get(header::RANGE).and_then(|v| v.to_str().ok())) {
            let len = entry.body.len() as u64;
            match range::parse(r, len) {
                range::Ranges::Ignore => {}
                range::Ranges::Unsatisfiable => {
                    let mut resp = respond::simple(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "edgecache: range not satisfiable\n",
                        false,
                    );
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        resp.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    resp.headers_mut().insert(CACHE_STATUS.clone(), status);
                    return resp;
                }
                range::Ranges::Satisfiable(ranges) => {
                    let mut headers = entry.headers.clone();
                    headers.insert(header::AGE, age);
                    headers.insert(CACHE_STATUS.clone(), status);
                    let (body, length) = if let [(first, last)] = ranges[..] {
                        if let Ok(v) =
                            HeaderValue::from_str(&range::content_range(first, last, len))
                        {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                        let b = entry.body.slice(first as usize..=last as usize);
                        let n = b.len() as u64;
                        (b, n)
                    } else {
                        let ct = entry
                            .headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok());
                        // HEAD gets the length a GET would, with no body built.
                        let (b, n) = if head {
                            let n = range::multipart_len(len, &ranges, ct, &self.boundary);
                            (Bytes::new(), n)
                        } else {
                            let b = range::multipart(&entry.body, &ranges, ct, &self.boundary);
                            let n = b.len() as u64;
                            (b, n)
                        };
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            "multipart/byteranges; boundary={}",
                            self.boundary
                        )) {
                            headers.insert(header::CONTENT_TYPE, v);
                        }
                        (b, n)
                    };
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                    let mut resp = Response::new(if head {
                        Body::empty()
                    } else {
                        Body::full(body)
                    });
                    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                    *resp.headers_mut() = headers;
                    return resp;
                }
            }
        }
        self.whole(entry, head, age, status)
    }

    /// The whole stored response; only `Age` and `Cache-Status` are added per hit.
    fn whole(
        &self,
        entry: &Entry,
        head: bool,
        age: HeaderValue,
        status: HeaderValue,
    ) -> Response<Body> {
        let mut headers = entry.headers.clone();
        // The stored map holds both fields already (placeholders): replacing a value in place
        // skips the capacity check and the old value's return that `insert` does.
        set(&mut headers, header::AGE, age);
        set(&mut headers, CACHE_STATUS.clone(), status);
        let body = if head {
            Body::empty()
        } else {
            Body::full(entry.body.clone())
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = headers;
        resp
    }

    /// Answers from a fill that is still arriving.
    fn answer_from_fill(
        &self,
        head: &FillHead,
        reader: Option<crate::cache::fill::FillReader>,
        request: &HeaderMap,
        head_only: bool,
        status: HeaderValue,
    ) -> Response<Body> {
        let status = after_upstream(&head.headers, status);
        if head.status == StatusCode::OK
            && matches!(
                policy::evaluate_preconditions(request, &head.headers),
                Precondition::NotModified
            )
        {
            return not_modified(&head.headers, HeaderValue::from_static("0"), status);
        }
        let mut headers = head.headers.clone();
        headers.insert(CACHE_STATUS.clone(), status);
        let body = match (head_only, reader) {
            (false, Some(r)) => Body::fill(r),
            _ => Body::empty(),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// What counted against an origin, for the ejection log line.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Connect,
    Timeout,
    Broken,
    Status(StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect => f.write_str("connection failed"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Broken => f.write_str("connection broke"),
            Failure::Status(s) => write!(f, "status {}", s.as_u16()),
        }
    }
}

/// Publishes `Retry` if the leader goes away (client disconnect) before publishing.
struct LeaderGuard<'a> {
    proxy: &'a Proxy,
    hash: u64,
    fill: Arc<Fill>,
    registered: bool,
    armed: bool,
}

impl LeaderGuard<'_> {
    fn publish(&mut self, outcome: Outcome) {
        let streaming = matches!(outcome, Outcome::Streaming(_));
        self.fill.publish(outcome);
        if !streaming {
            self.release();
        }
    }

    fn release(&mut self) {
        self.armed = false;
        if self.registered {
            self.proxy.fills.remove(self.hash, &self.fill);
        }
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.fill.publish(Outcome::Retry);
            self.release();
        }
    }
}

/// Reads an origin body into a fill, then stores it (stream-while-caching). Runs on its own
/// task, so the object is completed for the cache even if every client leaves.
struct Pump {
    store: Store,
    proxy: Arc<Proxy>,
    hash: u64,
    fill: Arc<Fill>,
    registered: bool,
    key: OwnedKey,
    vary: VaryKey,
    status: StatusCode,
    headers: HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    decision: StoreDecision,
    tags: Box<[Box<str>]>,
    limit: u64,
    idle: Duration,
    hit_for_miss: Duration,
}

impl Pump {
    async fn run(self, mut body: Incoming) {
        let mut abandoned = false;
        // Bytes counted against `cache.fill_memory` while this fill is kept for storing.
        let mut charged = 0u64;
        let complete = loop {
            let frame = match tokio::time::timeout(self.idle, body.frame()).await {
                Err(_) => break false,
                Ok(None) => break true,
                Ok(Some(Err(_))) => break false,
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let last = body.is_end_stream();
            let n = data.len() as u64;
            let mut over_budget = false;
            if !abandoned {
                charged += n;
                over_budget = !self.proxy.fills.charge(n);
            }
            if last && !abandoned && !over_budget && self.fill.len() + n <= self.limit {
                // The last bytes: store first, then let readers finish, so a client that has
                // read everything always finds the object stored.
                self.fill.push_hidden(data);
                break true;
            }
            self.fill.push(data);
            if !abandoned && (over_budget || self.fill.len() > self.limit) {
                // Too large to store after all, or fills in flight hold too much: keep
                // streaming to the readers we have, with the fetch held to their pace (and
                // stopped when none is left), and let new requests go their own way.
                abandoned = true;
                self.fill.abandon();
                self.release();
                self.proxy.fills.uncharge(std::mem::take(&mut charged));
                if over_budget {
                    tracing::debug!("fill memory full: not storing this response");
                } else {
                    self.store.mark_hit_for_miss(self.hash, self.hit_for_miss);
                }
            }
            if abandoned && !self.fill.wait_for_readers(STREAM_WINDOW).await {
                break false;
            }
        };
        if complete && !abandoned {
            if let Some(bytes) = self.fill.collect(self.proxy.config.cache.sendfile_min_size) {
                let initial_age = policy::corrected_initial_age(
                    &self.headers,
                    self.request_time,
                    self.response_time,
                );
                let entry = Entry::new(
                    self.key.clone(),
                    self.vary.clone(),
                    self.status,
                    self.headers.clone(),
                    bytes,
                    self.response_time,
                    initial_age,
                    self.decision.clone(),
                    self.tags.clone(),
                );
                self.store.insert(self.hash, entry);
            }
        }
        self.proxy.fills.uncharge(charged);
        self.fill.finish(complete);
        self.release();
    }

    fn release(&self) {
        if self.registered {
            self.proxy.fills.remove(self.hash, &self.fill);
        }
    }
}

/// The path and query as `site` keys them (parameters sorted or dropped as configured). The
/// one normalisation for keys, what the origin is asked for, and purges: whatever the key
/// ignores, the origin never sees. Borrows when nothing changes.
fn key_target<'a>(site: &crate::config::Site, pq: &'a str) -> Cow<'a, str> {
    match site.cache.query {
        QueryMode::Keep if site.cache.query_ignore.is_empty() => Cow::Borrowed(pq),
        mode => normalise_query(
            pq,
            mode == QueryMode::Sort,
            mode == QueryMode::Ignore,
            &site.cache.query_ignore,
        ),
    }
}

/// A refusal made here (4xx, or 5xx that no origin produced), for the access log as "refused".
fn refuse(status: StatusCode, message: &'static str, close: bool) -> Answer {
    (
        respond::simple(status, message, close),
        Outcome_::local("refused"),
    )
}

/// A 304 built from stored headers (RFC 9110 §15.4.5).
fn not_modified(stored: &HeaderMap, age: HeaderValue, status: HeaderValue) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let h = resp.headers_mut();
    for name in &policy::NOT_MODIFIED_FIELDS {
        for v in stored.get_all(name) {
            h.append(name.clone(), v.clone());
        }
    }
    for v in stored.get_all(header::VIA) {
        h.append(header::VIA, v.clone());
    }
    h.insert(header::AGE, age);
    h.insert(CACHE_STATUS.clone(), status);
    resp
}

/// Sets a field that a stored map holds exactly once (`Age` and `Cache-Status`, which
/// `cache::entry::prepare` puts there as placeholders); inserts it where it is missing.
fn set(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    match headers.get_mut(&name) {
        Some(v) => *v = value,
        None => {
            headers.insert(name, value);
        }
    }
}

/// Purge tags from `Surrogate-Key` and `Cache-Tag` (space or comma separated).
fn tags(headers: &HeaderMap) -> Box<[Box<str>]> {
    let mut out: Vec<Box<str>> = Vec::new();
    for name in [&policy::SURROGATE_KEY, &policy::CACHE_TAG] {
        for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for t in v.split([' ', ',']).map(str::trim).filter(|t| !t.is_empty()) {
                if !out.iter().any(|o| **o == *t) {
                    out.push(t.into());
                }
            }
        }
    }
    out.into_boxed_slice()
}

/// Removes fields meant for this cache only, and `strip` (lowercase names).
fn strip_cache_only(mut headers: HeaderMap, strip: &[Box<str>]) -> HeaderMap {
    // One look at the names first: most responses carry none of these.
    if headers.keys().any(|n| CACHE_ONLY_FIELDS.contains(&n)) {
        for name in CACHE_ONLY_FIELDS {
            headers.remove(name);
        }
    }
    for name in strip {
        headers.remove(&**name);
    }
    headers
}

fn origin_uri(origin: &OriginClient, pq: PathAndQuery) -> Option<Uri> {
    Uri::builder()
        .scheme(origin.config.scheme.clone())
        .authority(origin.config.authority.clone())
        .path_and_query(pq)
        .build()
        .ok()
}

/// Our `Cache-Status` member after those of the caches behind us, when there are any
/// (RFC 9211 §2); our value alone, with no allocation, when there are none.
fn chain_status(upstream: Option<&HeaderValue>, ours: HeaderValue) -> HeaderValue {
    let Some(up) = upstream else {
        return ours;
    };
    let mut v = Vec::with_capacity(up.len() + 2 + ours.len());
    v.extend_from_slice(up.as_bytes());
    v.extend_from_slice(b", ");
    v.extend_from_slice(ours.as_bytes());
    HeaderValue::from_bytes(&v).unwrap_or(ours)
}

/// Our `Cache-Status` member after those `headers` arrived with from the origin.
fn after_upstream(headers: &HeaderMap, ours: HeaderValue) -> HeaderValue {
    chain_status(upstream_status(headers).as_ref(), ours)
}

fn status_value(name: &str, rest: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{name}; {rest}"))
        .unwrap_or(HeaderValue::from_static("edgecache"))
}

/// Remaining freshness in seconds, negative when stale (RFC 9211 `ttl`).
fn ttl(entry: &Entry, now: SystemTime) -> i64 {
    let lifetime = entry.lifetime().as_secs() as i64;
    lifetime - entry.age(now).as_secs() as i64
}

/// Bytes of a request body read before the origin is contacted (as nginx's
/// `client_body_buffer_size`): a body that is malformed or stalls within them never reaches
/// an origin. Larger bodies stream after this prefix.
const PREREAD_BYTES: usize = 64 << 10;

enum PrereadError {
    Malformed,
    TimedOut,
}

/// Reads up to [`PREREAD_BYTES`] of a request body, each frame within `timeout`.
async fn preread(mut body: Incoming, timeout: Duration) -> Result<UpstreamBody, PrereadError> {
    let mut buf = bytes::BytesMut::new();
    while buf.len() < PREREAD_BYTES {
        if body.is_end_stream() {
            return Ok(UpstreamBody::new(buf.freeze(), None, None));
        }
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(PrereadError::TimedOut),
            Ok(None) => return Ok(UpstreamBody::new(buf.freeze(), None, None)),
            Ok(Some(Err(_))) => return Err(PrereadError::Malformed),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => buf.extend_from_slice(&d),
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Ok(UpstreamBody::new(buf.freeze(), trailers, None));
                }
            },
        }
    }
    Ok(UpstreamBody::new(buf.freeze(), None, Some(body)))
}

/// Displays an error with its sources, `a: b: c`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

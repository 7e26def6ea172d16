//! The request path: route a request to its site, answer from the cache when it can, else
//! fetch from the site's origin (one fetch per key however many clients wait) and store what
//! may be stored.
//!
//! Entry point: [`Proxy::handle`], called by `server` for every request. It never fails: every
//! error becomes a response (see `respond`).

/// Awaits a stage's future inside a span of the stage's name, when a subscriber wants the
/// span. Wrapping a future moves it (a miss's futures hold the origin client's, several KiB:
/// three wraps cost a miss ~2,000 instructions of memcpy), so with the span off the future
/// is awaited as it is.
macro_rules! in_stage {
    ($name:expr, $fut:expr) => {{
        let span = tracing::debug_span!($name);
        if span.is_disabled() {
            $fut.await
        } else {
            tracing::Instrument::instrument($fut, span).await
        }
    }};
}

mod admit;
mod answer;
pub mod body;
mod collapse;
mod error;
pub mod headers;
mod limit;
mod lookup;
mod partial;
mod pass;
pub mod path;
mod peer;
mod purge;
pub mod range;
mod respond;
mod route;
pub mod sites;
mod slice;
mod upstream;
mod views;
pub use purge::PeerResults;
pub use views::OriginCounts;

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
use tracing::Instrument;

use crate::cache::fill::FillHead;
use crate::cache::key::{key_extra, normalise_query};
use crate::cache::policy::{self, Precondition, RequestFacts, Reuse, Settings, StoreDecision};
use crate::cache::{
    CacheControl, Entry, KeyParts, NoStoreReason, OwnedKey, PurgeTarget, Store, VaryKey,
};
use crate::config::{ClientNoCache, Config, QueryMode};
use crate::origin::select::{PoolView, Selector};
use crate::origin::{self, OriginClient, UpstreamBody};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{self, AccessLog, CacheResult};
use admit::strip_cache_only;
use answer::{after_upstream, ttl};
use body::Body;
use error::ProxyError;
use headers::{forward_request_headers, remove_hop_by_hop, via_value};
use lookup::{host_value, key_target, Looked};
use route::{Detour, Routed};
use sites::{host_without_port, SiteTable};
use upstream::{Sent, Upstream};

use crate::cache::entry::upstream_status;
pub use crate::cache::entry::CACHE_STATUS;

/// Response fields that steer this cache and are not passed to clients (with the configured
/// `cache.cache_control_field`). `CDN-Cache-Control` is not among them: it targets every CDN
/// on the path, and a CDN or shield in front of this one needs it (RFC 9213 §2.1).
static CACHE_ONLY_FIELDS: [&HeaderName; 3] = [
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

/// What the connection tells us about a request, and the id [`Proxy::handle`] gave it.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub https: bool,
    /// The TLS version negotiated (`TLSv1.3`), `None` for plain HTTP.
    pub tls_version: Option<&'static str>,
    /// The request's id when this node made one for the access log; `None` on a connection,
    /// and for a request whose trusted proxy gave it an id, or whose id nothing needed yet
    /// (the upstream stage makes one then).
    pub request_id: Option<telemetry::RequestId>,
    /// The request came in on the peer listener (`cluster.listen`): another member asks for
    /// a key this node owns. It is answered here (cache or origin), never sent to a peer.
    pub from_peer: bool,
    /// On the peer listener, from the address of a fleet member (set per request by
    /// [`Proxy::handle`]): its forwarding fields, scheme and request id are believed and
    /// per-client rate limits skipped (the member its client asked applied them). Anyone
    /// else there is served as an untrusted client (and never sent to a peer).
    pub member: bool,
}

impl ConnInfo {
    /// A connection's information before any request: plain HTTP when `https` is false.
    pub fn new(peer: SocketAddr, https: bool, tls_version: Option<&'static str>) -> ConnInfo {
        ConnInfo {
            peer,
            https,
            tls_version,
            request_id: None,
            from_peer: false,
            member: false,
        }
    }

    /// A connection on the peer listener.
    pub fn peer_listener(peer: SocketAddr) -> ConnInfo {
        ConnInfo {
            from_peer: true,
            ..ConnInfo::new(peer, false, None)
        }
    }
}

/// The request id field, kept from a trusted proxy and sent to origins.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How a request was answered, for the access log and the metrics.
struct Outcome_ {
    cache: CacheResult,
    origin: Option<usize>,
    origin_ms: Option<f64>,
    /// The geo route that chose the origin.
    route: Option<Arc<str>>,
    /// The member that answered instead of an origin (peer fill).
    peer: Option<Arc<str>>,
}

impl Outcome_ {
    fn local(cache: CacheResult) -> Outcome_ {
        Outcome_ {
            cache,
            origin: None,
            origin_ms: None,
            route: None,
            peer: None,
        }
    }

    fn origin(cache: CacheResult, origin: usize, ms: f64, route: Option<Arc<str>>) -> Outcome_ {
        Outcome_ {
            cache,
            origin: Some(origin),
            origin_ms: Some(ms),
            route,
            peer: None,
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
        /// When the request head was handed over (`edgecache_request_duration_seconds`).
        start: Instant,
        /// Asked by a peer: `Cache-Status` names this node by its id.
        from_peer: bool,
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
            HandlingState::Waiting {
                proxy,
                log,
                start,
                from_peer,
                ..
            } => Poll::Ready(Ok(proxy.finish(answer, log, start, from_peer))),
            _ => Poll::Pending,
        }
    }
}

/// Everything about one cacheable request that the fetch and respond steps need: what the
/// lookup stage learnt ([`lookup::Keyed`], read through `Deref`) and the request head.
#[derive(Clone)]
struct Lookup {
    keyed: lookup::Keyed,
    /// The client's request head (headers as received).
    parts: Arc<RequestParts>,
    /// Answer with the whole object even if the client asked for a range (a fallback when the
    /// object could not be stored to cut the range from).
    ignore_range: bool,
}

impl std::ops::Deref for Lookup {
    type Target = lookup::Keyed;

    fn deref(&self) -> &lookup::Keyed {
        &self.keyed
    }
}

impl Lookup {
    /// The settings the store decision is made under: the path's rule's, else the site's;
    /// resolved at load and borrowed here.
    fn settings<'c>(&self, config: &'c Config) -> &'c Settings {
        config.sites[self.site].settings(self.rule)
    }
}

/// Shared state of the request path.
pub struct Proxy {
    config: Arc<Config>,
    sites: SiteTable,
    origins: Vec<OriginClient>,
    origin_names: Vec<Arc<str>>,
    store: Store,
    /// Shared with the proxies of later configurations: a fetch begun before a reload still
    /// collapses the requests that come after it.
    fills: Arc<Fills>,
    locator: crate::geo::Locator,
    limits: limit::Limits,
    selector: Selector,
    retry_budget: origin::retry::RetryBudget,
    metrics: Arc<Metrics>,
    name: String,
    hit: HeaderValue,
    /// `Cache-Status` values for the common miss answers, made once (see `miss_status`).
    miss_statuses: [HeaderValue; 4],
    /// The fleet this node is a member of (`[cluster]`); `None` on its own. Shared with the
    /// proxies of later configurations.
    fleet: Option<Arc<crate::cluster::peer::Fleet>>,
    via_11: HeaderValue,
    via_10: HeaderValue,
    via_2: HeaderValue,
    boundary: String,
    /// This node's `CDN-Loop` member (RFC 8586), `{via_name}; node={id}` with an id drawn at
    /// start: a request that already carries it has come back to us (508).
    cdn_loop: HeaderValue,
}

/// The proxy in service, swapped whole by a configuration reload. Each request takes the
/// current one and keeps it to its end, so requests in flight finish on the configuration
/// they began with.
pub struct Live {
    current: arc_swap::ArcSwap<Proxy>,
    /// Raised by every swap, after it: connections compare it to the one they saw (see
    /// [`Current`]) instead of loading the proxy for every request.
    generation: std::sync::atomic::AtomicU64,
}

impl Live {
    pub fn new(proxy: Arc<Proxy>) -> Live {
        Live {
            current: arc_swap::ArcSwap::new(proxy),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The proxy in service now.
    pub fn load(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Puts `proxy` in service for every request that starts from now on.
    pub fn store(&self, proxy: Arc<Proxy>) {
        self.current.store(proxy);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// A connection's handle on the proxy in service.
    pub fn current(self: &Arc<Self>) -> Current {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        Current {
            proxy: std::cell::RefCell::new(self.load()),
            generation: std::cell::Cell::new(generation),
            live: self.clone(),
        }
    }
}

/// One connection's view of the proxy in service: a request costs one atomic load to see
/// whether a reload happened, and the proxy is loaded again only after one (an `ArcSwap`
/// load per request cost a hit about 450 instructions, 2.7%).
pub struct Current {
    live: Arc<Live>,
    generation: std::cell::Cell<u64>,
    proxy: std::cell::RefCell<Arc<Proxy>>,
}

impl Current {
    /// [`Proxy::handle`] on the proxy in service.
    pub fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Handling {
        let now = self
            .live
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        if now != self.generation.get() {
            *self.proxy.borrow_mut() = self.live.load();
            self.generation.set(now);
        }
        self.proxy.borrow().handle(req, conn)
    }
}

/// A fill whose failure tells followers the leader's error.
type Fill = crate::cache::fill::Fill<ProxyError>;
type Fills = crate::cache::fill::Fills<ProxyError>;
type Outcome = crate::cache::fill::Outcome<ProxyError>;

static X_FORWARDED_FOR_NAME: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `CDN-Loop` (RFC 8586): each CDN node a request passes appends itself.
static CDN_LOOP: HeaderName = HeaderName::from_static("cdn-loop");

impl Proxy {
    /// Builds the request path for a validated configuration over ready parts: the store,
    /// one client per configured origin (in configuration order) and the geo locator.
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        origins: Vec<OriginClient>,
        locator: crate::geo::Locator,
    ) -> Proxy {
        let fills = Arc::new(Fills::new(config.cache.fill_memory));
        let selector = Selector::new(config.origins.iter().map(|o| o.weight).collect());
        Proxy::assemble(config, store, metrics, fills, origins, selector, locator)
    }

    /// The request path for a new configuration (a reload) beside this one: the same store,
    /// counters and fills in flight; origin clients and their `states` as the caller carried
    /// them (see `node::reload`). This node's `CDN-Loop` id stays (it comes from the store's
    /// key), so loops through the old and the new configuration are still seen.
    pub fn reconfigured(
        &self,
        config: Arc<Config>,
        store: Store,
        origins: Vec<OriginClient>,
        states: origin::state::OriginStates,
        locator: crate::geo::Locator,
    ) -> Proxy {
        self.fills.set_budget(config.cache.fill_memory);
        let weights = config.origins.iter().map(|o| o.weight).collect();
        let selector = Selector::with_state(weights, states);
        let (metrics, fills) = (self.metrics.clone(), self.fills.clone());
        let next = Proxy::assemble(config, store, metrics, fills, origins, selector, locator);
        match &self.fleet {
            Some(f) => next.with_fleet(f.clone()),
            None => next,
        }
    }

    fn assemble(
        config: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        fills: Arc<Fills>,
        origins: Vec<OriginClient>,
        selector: Selector,
        locator: crate::geo::Locator,
    ) -> Proxy {
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
        Proxy {
            sites: SiteTable::new(&config.sites),
            origin_names: config
                .origins
                .iter()
                .map(|o| Arc::from(o.name.as_str()))
                .collect(),
            origins,
            store,
            fills,
            locator,
            limits: limit::Limits::new(&config),
            selector,
            retry_budget: origin::retry::RetryBudget::new(&config.retries),
            metrics,
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
            fleet: None,
        }
    }

    /// This proxy as a member of `fleet`: misses for keys another member owns are fetched
    /// from it, and its `CDN-Loop` member names the fleet.
    pub fn with_fleet(mut self, fleet: Arc<crate::cluster::peer::Fleet>) -> Proxy {
        let value = format!(
            "{}; node={}; fleet={}",
            self.name,
            self.boundary
                .strip_prefix("edgecache-")
                .unwrap_or(&self.boundary),
            fleet.config.name
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            self.cdn_loop = v;
        }
        self.fleet = Some(fleet);
        self
    }

    /// The fleet this node is a member of.
    pub fn fleet(&self) -> Option<&Arc<crate::cluster::peer::Fleet>> {
        self.fleet.as_ref()
    }

    /// The store this proxy reads and fills.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The counters this proxy adds to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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

    /// The origin clients, in configuration order (for the health checks `node` starts).
    pub(crate) fn origins(&self) -> &[OriginClient] {
        &self.origins
    }

    /// The configuration this proxy serves.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Per-origin state, which the health checks write and selection reads.
    pub(crate) fn origin_states(&self) -> &origin::state::OriginStates {
        self.selector.state()
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

    /// True when the request's `CDN-Loop` has passed through this node's fleet already: it
    /// is answered here, never sent to a peer again (RFC 8586; a shield tier pointing back
    /// at its own fleet would otherwise bounce between members).
    fn been_through_fleet(&self, headers: &HeaderMap) -> bool {
        let Some(fleet) = &self.fleet else {
            return true;
        };
        let name = fleet.config.name.as_bytes();
        headers.get_all(&CDN_LOOP).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',' || b == b';')
                .map(|p| p.trim_ascii())
                .any(|p| p.strip_prefix(b"fleet=").is_some_and(|n| n == name))
        })
    }

    /// Appends this node to the `CDN-Loop` of a request going upstream.
    fn mark_hop(&self, headers: &mut HeaderMap) {
        headers.append(CDN_LOOP.clone(), self.cdn_loop.clone());
    }

    /// Whether `peer` is one of `server.trusted_proxies`, whose forwarding fields and request
    /// ids are believed.
    fn trusts(&self, peer: std::net::IpAddr) -> bool {
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer))
    }

    /// The `X-Request-Id` a trusted proxy sent, when there is exactly one and it is fit for
    /// the log (`telemetry::request_id::acceptable`); any other is replaced by one of ours.
    /// A member's request carries the id its client's request got there, so one request
    /// has one id across the fleet.
    fn given_request_id<'h>(
        &self,
        conn: ConnInfo,
        headers: &'h HeaderMap,
    ) -> Option<&'h HeaderValue> {
        let mut all = headers.get_all(&X_REQUEST_ID).iter();
        let (Some(v), None) = (all.next(), all.next()) else {
            return None;
        };
        ((conn.member || self.trusts(conn.peer.ip()))
            && telemetry::request_id::acceptable(v.as_bytes()))
        .then_some(v)
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
    pub fn handle(self: &Arc<Self>, req: Request<Incoming>, mut conn: ConnInfo) -> Handling {
        // One clock read, for the request duration histogram and the access log. The request
        // id is made for the access log only; with it off a hit makes none, and the upstream
        // stage makes the id of a request it sends.
        let start = Instant::now();
        if conn.from_peer {
            conn.member = self
                .fleet
                .as_ref()
                .is_some_and(|f| f.is_member_ip(conn.peer.ip()));
        }
        if conn.member {
            // The member that asked keys the request by its client's scheme.
            conn.https = req
                .headers()
                .get("x-forwarded-proto")
                .is_some_and(|v| v == "https");
        }
        let log = telemetry::access_log_enabled().then(|| {
            let peer = conn.peer.ip();
            let headers = req.headers();
            let given = self.given_request_id(conn, headers);
            let request_id = match given {
                Some(v) => telemetry::access::LoggedId::Given(v.clone()),
                None => {
                    let id = telemetry::RequestId::next();
                    conn.request_id = Some(id);
                    telemetry::access::LoggedId::Made(id)
                }
            };
            Box::new(AccessLog {
                start,
                client: peer,
                forwarded_client: self.locator.client(peer, headers),
                method: req.method().clone(),
                version: req.version(),
                host: req
                    .uri()
                    .host()
                    .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
                    .unwrap_or("-")
                    .to_owned(),
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("-")
                    .to_owned(),
                status: 0,
                cache: None,
                origin: None,
                origin_ms: None,
                route: None,
                peer: None,
                aborted: false,
                user_agent: headers.get(header::USER_AGENT).cloned(),
                referer: headers.get(header::REFERER).cloned(),
                request_id,
                tls_version: conn.tls_version,
            })
        });
        // Spans name the stages (see `telemetry::spans`); at `debug`, so with the default
        // filter each costs one check of a cached interest and the hit path is unchanged.
        let span = tracing::debug_span!(
            telemetry::spans::REQUEST,
            method = %req.method(),
            uri = %req.uri()
        );
        let served = span.in_scope(|| self.serve(req, conn, false));
        match served {
            Served::Now(answer) => Handling(HandlingState::Ready(Some(self.finish(
                answer,
                log,
                start,
                conn.from_peer,
            )))),
            Served::Later(fut) => Handling(HandlingState::Waiting {
                fut: if span.is_disabled() {
                    fut
                } else {
                    Box::pin(fut.instrument(span))
                },
                proxy: self.clone(),
                log,
                start,
                from_peer: conn.from_peer,
            }),
        }
    }

    /// Counts the answer and its time since `start`, to the response head: the node's own
    /// latency, which a slow client reading a large body does not inflate (Varnish's
    /// `Timestamp:Process`; the access log's duration runs to the last byte, as nginx's
    /// `$request_time`). Attaches the access-log record (written when the body ends).
    fn finish(
        &self,
        (mut resp, outcome): Answer,
        mut log: Option<Box<AccessLog>>,
        start: Instant,
        from_peer: bool,
    ) -> Response<Body> {
        if from_peer {
            self.name_member(&mut resp);
        }
        self.metrics.request(
            outcome.cache,
            resp.status().as_u16(),
            outcome.origin.is_some(),
        );
        self.metrics
            .request_duration(outcome.cache, start.elapsed());
        if let Some(l) = &mut log {
            l.status = resp.status().as_u16();
            l.cache = Some(outcome.cache);
            l.origin = outcome
                .origin
                .and_then(|i| self.origin_names.get(i).cloned());
            l.origin_ms = outcome.origin_ms;
            l.route = outcome.route;
            l.peer = outcome.peer;
        }
        resp.body_mut().set_log(log);
        resp
    }

    /// Routes a request and answers it from the cache, or returns the work that waits for an
    /// origin. `normal`: the request's path was normalised already (see `route`).
    fn serve(self: &Arc<Self>, req: Request<Incoming>, conn: ConnInfo, normal: bool) -> Served {
        if conn.from_peer && req.uri().path() == peer::PURGE_PATH {
            let this = self.clone();
            return Served::Later(Box::pin(async move { this.receive_purge(req, conn).await }));
        }
        let routed = tracing::debug_span!(telemetry::spans::ROUTE)
            .in_scope(|| self.route(&req, conn, normal));
        let routed = match routed {
            Ok(routed) => routed,
            Err(Detour::Answer(answer)) => return Served::Now(*answer),
            Err(Detour::StripConnection) => {
                let mut req = req;
                headers::remove_hop_by_hop(req.headers_mut());
                return self.serve(req, conn, normal);
            }
            Err(Detour::Rewrite(uri)) => {
                let mut req = req;
                *req.uri_mut() = uri;
                return self.serve(req, conn, true);
            }
        };
        let site_idx = routed.site;
        let site = &self.config.sites[site_idx];
        if req.method().as_str() == "PURGE" {
            let key_pq = key_target(site, routed.pq.as_str());
            let _span = tracing::debug_span!(telemetry::spans::PURGE).entered();
            return Served::Now(self.purge_method(&req, conn, &routed.host, &key_pq));
        }
        let rule = site.rule(req.uri().path());
        if !routed.cache_method
            || rule
                .and_then(|i| site.rules.get(i))
                .is_some_and(|r| r.bypass)
        {
            let detail = if routed.cache_method {
                "fwd=bypass"
            } else {
                "fwd=method"
            };
            let status = self.cache_status(detail);
            let host_value = host_value(&routed.host);
            let host = routed.host.into_owned();
            // Boxed, like the fetch below: only work that waits for an origin becomes a
            // future; everything before it (and every hit) runs in this call.
            let this = self.clone();
            return Served::Later(Box::pin(async move {
                in_stage!(
                    telemetry::spans::PASS,
                    this.pass(req, conn, site_idx, &host, host_value, status)
                )
            }));
        }
        if let Some((rule, size)) = rule.and_then(|i| Some((i, site.rules.get(i)?.slice?))) {
            // A slicing rule: the object is had in slices, whatever is stored whole.
            let key_pq = key_target(site, routed.pq.as_str()).into_owned();
            let host = routed.host.into_owned();
            let this = self.clone();
            let parts = req.into_parts().0;
            return Served::Later(Box::pin(async move {
                this.sliced(parts, conn, site_idx, rule, size, host, key_pq)
                    .await
            }));
        }
        let looked = tracing::debug_span!(telemetry::spans::LOOKUP)
            .in_scope(|| self.lookup(&req, conn, &routed, rule));
        match looked {
            Looked::Answer(answer) => Served::Now(answer),
            Looked::Partial(miss) => {
                let parts = req.into_parts().0;
                let this = self.clone();
                Served::Later(Box::pin(
                    async move { this.complete_extent(miss, parts).await },
                ))
            }
            Looked::Miss(miss) => {
                let (lookup, stale) = miss.into_lookup(req.into_parts().0);
                let this = self.clone();
                Served::Later(Box::pin(async move {
                    in_stage!(telemetry::spans::COLLAPSE, this.fetch(lookup, stale))
                }))
            }
        }
    }
}

/// A body of exactly `expected` bytes read whole (each frame within `timeout`); `None` when
/// it is cut, stalls, or runs longer. For objects already bounded by their `Content-Range` or
/// `Content-Length` (slices, extents).
async fn read_exactly(body: &mut Incoming, expected: u64, timeout: Duration) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(expected).ok()?);
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if (buf.len() + d.len()) as u64 > expected {
                        return None;
                    }
                    buf.extend_from_slice(d);
                }
            }
            _ => return None,
        }
    }
    (buf.len() as u64 == expected).then(|| buf.freeze())
}

/// A refusal made here (4xx, or 5xx that no origin produced), for the access log as "refused".
fn refuse(e: ProxyError) -> Answer {
    tracing::debug!(error = %e, side = ?e.side(), "request refused");
    (respond::error(e), Outcome_::local(CacheResult::Refused))
}

impl Proxy {
    /// For an answer to a peer: this node's `Cache-Status` member (the last) named by the
    /// node's id instead of `via_name`, so the client of the member that asked sees which
    /// node answered (`fra1-b; hit, edgecache; fwd=peer`).
    fn name_member(&self, resp: &mut Response<Body>) {
        let Some(fleet) = &self.fleet else { return };
        let Some(v) = resp.headers().get(&CACHE_STATUS) else {
            return;
        };
        let Ok(text) = v.to_str() else { return };
        let (before, ours) = match text.rfind(", ") {
            Some(i) => (&text[..i + 2], &text[i + 2..]),
            None => ("", text),
        };
        let Some(rest) = ours.strip_prefix(self.name.as_str()) else {
            return;
        };
        let renamed = format!("{before}{}{rest}", fleet.config.node);
        if let Ok(v) = HeaderValue::from_str(&renamed) {
            resp.headers_mut().insert(CACHE_STATUS.clone(), v);
        }
    }
}

fn status_value(name: &str, rest: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{name}; {rest}"))
        .unwrap_or(HeaderValue::from_static("edgecache"))
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

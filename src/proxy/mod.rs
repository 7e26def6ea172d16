//! The request path: route a request to its site, answer from the cache when it can, else
//! forward to the site's origin and store what may be stored.
//!
//! Entry point: [`Proxy::handle`], called by `server` for every request. It never fails: every
//! error becomes a response (see `respond`).

pub mod body;
pub mod headers;
mod respond;
pub mod sites;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::cache::policy::{self, RequestFacts};
use crate::cache::{CacheControl, Entry, KeyParts, NoStoreReason, OwnedKey, Store, VaryKey};
use crate::config::Config;
use crate::origin::{self, OriginClient, UpstreamBody};
use crate::telemetry::{self, AccessLog};
use body::{Body, PendingEntry};
use headers::{forward_request_headers, remove_hop_by_hop, via_value};
use sites::{host_without_port, SiteTable};

/// RFC 9211 `Cache-Status`.
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// What the connection tells us about a request.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub https: bool,
}

/// `Cache-Status` values, formatted once with this node's name.
struct StatusValues {
    hit: HeaderValue,
    miss_stored: HeaderValue,
    fwd_request_stored: HeaderValue,
    not_stored: Vec<(NoStoreReason, HeaderValue)>,
    fwd_request_not_stored: Vec<(NoStoreReason, HeaderValue)>,
}

const ALL_REASONS: [NoStoreReason; 12] = [
    NoStoreReason::Method,
    NoStoreReason::RequestNoStore,
    NoStoreReason::Status,
    NoStoreReason::NoStore,
    NoStoreReason::Private,
    NoStoreReason::NoCache,
    NoStoreReason::SetCookie,
    NoStoreReason::Authorization,
    NoStoreReason::VaryStar,
    NoStoreReason::NotFresh,
    NoStoreReason::TooLarge,
    NoStoreReason::Aborted,
];

impl StatusValues {
    fn new(name: &str) -> StatusValues {
        let v =
            |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("edgecache"));
        let reasons = |fwd: &str| {
            ALL_REASONS
                .iter()
                .map(|r| (*r, v(format!("{name}; fwd={fwd}; detail={}", r.as_str()))))
                .collect()
        };
        StatusValues {
            hit: v(format!("{name}; hit")),
            miss_stored: v(format!("{name}; fwd=miss; stored")),
            fwd_request_stored: v(format!("{name}; fwd=request; stored")),
            not_stored: reasons("miss"),
            fwd_request_not_stored: reasons("request"),
        }
    }

    fn not_stored(&self, reason: NoStoreReason, client_forced: bool) -> HeaderValue {
        let list = if client_forced {
            &self.fwd_request_not_stored
        } else {
            &self.not_stored
        };
        list.iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, v)| v.clone())
            .unwrap_or(HeaderValue::from_static("edgecache; fwd=miss"))
    }
}

/// How a request was answered, for the access log.
struct Outcome {
    cache: &'static str,
    origin: Option<usize>,
    origin_ms: Option<f64>,
}

impl Outcome {
    fn local(cache: &'static str) -> Outcome {
        Outcome {
            cache,
            origin: None,
            origin_ms: None,
        }
    }
}

/// Shared state of the request path.
pub struct Proxy {
    config: Arc<Config>,
    sites: SiteTable,
    origins: Vec<OriginClient>,
    origin_names: Vec<Arc<str>>,
    store: Store,
    status: StatusValues,
    via_11: HeaderValue,
    via_10: HeaderValue,
    via_2: HeaderValue,
}

impl Proxy {
    /// Builds the request path for a validated configuration and a store.
    pub fn new(config: Arc<Config>, store: Store) -> Result<Proxy, origin::Error> {
        let origins = config
            .origins
            .iter()
            .map(|o| OriginClient::new(o.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let name = config.server.via_name.as_str();
        Ok(Proxy {
            sites: SiteTable::new(&config.sites),
            origin_names: config
                .origins
                .iter()
                .map(|o| Arc::from(o.name.as_str()))
                .collect(),
            origins,
            store,
            status: StatusValues::new(name),
            via_11: via_value(Version::HTTP_11, name),
            via_10: via_value(Version::HTTP_10, name),
            via_2: via_value(Version::HTTP_2, name),
            config,
        })
    }

    /// The store this proxy reads and fills.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn via(&self, version: Version) -> &HeaderValue {
        match version {
            Version::HTTP_2 => &self.via_2,
            Version::HTTP_10 | Version::HTTP_09 => &self.via_10,
            _ => &self.via_11,
        }
    }

    /// Answers one request. Never fails: errors become 4xx/5xx responses.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let mut log = telemetry::access_log_enabled().then(|| {
            Box::new(AccessLog {
                start,
                client: conn.peer.ip(),
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
                aborted: false,
            })
        });
        let (mut resp, outcome) = self.serve(req, conn).await;
        if let Some(l) = &mut log {
            l.status = resp.status().as_u16();
            l.cache = outcome.cache;
            l.origin = outcome
                .origin
                .and_then(|i| self.origin_names.get(i).cloned());
            l.origin_ms = outcome.origin_ms;
        }
        resp.body_mut().set_log(log);
        resp
    }

    async fn serve(&self, req: Request<Incoming>, conn: ConnInfo) -> (Response<Body>, Outcome) {
        let refuse = |status, msg, close| {
            (
                respond::simple(status, msg, close),
                Outcome::local("refused"),
            )
        };
        let h = req.headers();
        // RFC 9112 §6.3: both framings at once is how request smuggling starts; refuse and close.
        // hyper's HTTP/1 parser already drops the length and closes after the response, so this
        // guards any path (or future parser) that hands us both.
        if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: Content-Length and Transfer-Encoding together\n",
                true,
            );
        }
        if req.method() == Method::CONNECT {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "edgecache: CONNECT is not supported\n",
                false,
            );
        }
        let Some(pq) = req
            .uri()
            .path_and_query()
            .filter(|p| p.as_str().starts_with('/'))
        else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: the request target must be a path\n",
                true,
            );
        };
        // The target's authority (absolute-form, HTTP/2 :authority) takes precedence over Host.
        let authority = match req.uri().authority() {
            Some(a) => a.as_str(),
            None => {
                let mut hosts = h.get_all(header::HOST).iter();
                match (hosts.next().and_then(|v| v.to_str().ok()), hosts.next()) {
                    (Some(v), None) => v,
                    _ => {
                        return refuse(
                            StatusCode::BAD_REQUEST,
                            "edgecache: exactly one Host header is required\n",
                            true,
                        )
                    }
                }
            }
        };
        let Some(host) = host_without_port(authority).filter(|_| !authority.contains('@')) else {
            return refuse(StatusCode::BAD_REQUEST, "edgecache: invalid Host\n", true);
        };
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let Some(site) = self.sites.find(&host) else {
            // Never an open proxy: an unknown host reaches no origin.
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "edgecache: this host is not served here\n",
                false,
            );
        };

        let method = req.method().clone();
        let cache_method = method == Method::GET || method == Method::HEAD;
        let req_cc = if h.contains_key(header::CACHE_CONTROL) {
            CacheControl::from_headers(h)
        } else {
            CacheControl::default()
        };
        let client_forced = req_cc.no_cache
            || req_cc.max_age == Some(0)
            || (!h.contains_key(header::CACHE_CONTROL)
                && h.get(header::PRAGMA)
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache")));
        let parts = KeyParts {
            https: conn.https,
            host: &host,
            path_and_query: pq.as_str(),
        };
        let hash = self.store.hash(&parts);
        if cache_method && !client_forced {
            if let Some(entry) = self.store.get(hash, &parts, h) {
                let now = SystemTime::now();
                if acceptable(&entry, &req_cc, now) {
                    return (
                        self.hit(&entry, method == Method::HEAD, now),
                        Outcome::local("hit"),
                    );
                }
            }
            if req_cc.only_if_cached {
                return refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "edgecache: not cached (only-if-cached)\n",
                    false,
                );
            }
        }

        let origin_index = self.config.sites[site].origin;
        let origin = &self.origins[origin_index];
        let key = cache_method.then(|| OwnedKey::new(&parts));
        let host_value =
            HeaderValue::from_str(authority).unwrap_or(HeaderValue::from_static("invalid"));
        let pq: PathAndQuery = pq.clone();
        let trusted = self
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&conn.peer.ip()));
        let has_authorization = h.contains_key(header::AUTHORIZATION);

        let (mut rparts, body) = req.into_parts();
        let client_headers = rparts.headers.clone();
        let mut up_headers = std::mem::take(&mut rparts.headers);
        forward_request_headers(
            &mut up_headers,
            conn.peer.ip(),
            conn.https,
            &host_value,
            trusted,
            self.via(rparts.version),
        );
        up_headers.insert(
            header::HOST,
            origin.config.host_header.clone().unwrap_or(host_value),
        );
        let mut builder = Uri::builder()
            .scheme(origin.config.scheme.clone())
            .authority(origin.config.authority.clone());
        builder = builder.path_and_query(pq);
        let Ok(uri) = builder.build() else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "edgecache: invalid request target\n",
                true,
            );
        };
        // A HEAD miss is fetched as GET so the object can be stored (as nginx and Varnish do).
        let head_as_get = method == Method::HEAD;
        let up_method = if head_as_get {
            Method::GET
        } else {
            method.clone()
        };
        let up_body = if body.is_end_stream() {
            UpstreamBody::empty()
        } else {
            match preread(body, self.config.server.header_read_timeout).await {
                Ok(b) => b,
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
        let mut up = Request::new(up_body);
        *up.method_mut() = up_method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = up_headers;

        let request_time = SystemTime::now();
        let sent_at = Instant::now();
        let result = origin.send(up).await;
        let origin_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(origin = %origin.config.name, error = %ErrorChain(&e), "origin request failed");
                return (
                    respond::origin_error(&e),
                    Outcome {
                        cache: "error",
                        origin: Some(origin_index),
                        origin_ms: Some(origin_ms),
                    },
                );
            }
        };
        let response_time = SystemTime::now();
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .append(header::VIA, self.via(parts.version).clone());
        parts.version = Version::HTTP_11;

        // RFC 9111 §4.4: a successful unsafe request invalidates what we hold for its URI.
        if !method.is_safe() && (parts.status.is_success() || parts.status.is_redirection()) {
            self.store.remove(hash);
        }

        let decision = match &key {
            Some(_) => {
                let resp_cc = CacheControl::from_headers(&parts.headers);
                let facts = RequestFacts {
                    method: &up_method,
                    has_authorization,
                    cache_control: &req_cc,
                };
                policy::storable(facts, parts.status, &parts.headers, &resp_cc, response_time)
                    .and_then(|lifetime| {
                        let too_large = parts
                            .headers
                            .get(header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| s.parse::<u64>().ok())
                            .is_some_and(|n| n > self.config.cache.max_object_size);
                        if too_large {
                            Err(NoStoreReason::TooLarge)
                        } else {
                            Ok(lifetime)
                        }
                    })
            }
            None => Err(NoStoreReason::Method),
        };
        let pending = match (decision, key) {
            (Ok(lifetime), Some(key)) => {
                let mut stored_headers = parts.headers.clone();
                stored_headers.remove(header::AGE);
                Some(PendingEntry {
                    store: self.store.clone(),
                    hash,
                    key,
                    vary: VaryKey::from_response(&parts.headers, &client_headers),
                    status: parts.status,
                    initial_age: policy::corrected_initial_age(
                        &parts.headers,
                        request_time,
                        response_time,
                    ),
                    headers: stored_headers,
                    response_time,
                    lifetime,
                    limit: self.config.cache.max_object_size,
                })
            }
            _ => None,
        };
        let cache_status = match (&pending, decision) {
            (Some(_), _) if client_forced => self.status.fwd_request_stored.clone(),
            (Some(_), _) => self.status.miss_stored.clone(),
            (None, Err(reason)) => self.status.not_stored(reason, client_forced),
            (None, Ok(_)) => self.status.not_stored(NoStoreReason::Method, client_forced),
        };
        parts.headers.insert(CACHE_STATUS.clone(), cache_status);
        let stored = pending.is_some();
        let body = if head_as_get {
            // The client asked for HEAD: fill the cache in the background, answer the head.
            if let Some(p) = pending {
                let fill = Body::stream(body, Some(p));
                tokio::spawn(drain(fill));
            }
            Body::empty()
        } else {
            Body::stream(body, pending)
        };
        let outcome = Outcome {
            cache: if stored { "miss" } else { "pass" },
            origin: Some(origin_index),
            origin_ms: Some(origin_ms),
        };
        (Response::from_parts(parts, body), outcome)
    }

    /// Builds a response from a stored entry; only `Age` and `Cache-Status` are added per hit.
    fn hit(&self, entry: &Entry, head: bool, now: SystemTime) -> Response<Body> {
        let mut headers = entry.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(entry.age(now).as_secs()));
        headers.insert(CACHE_STATUS.clone(), self.status.hit.clone());
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
}

/// Whether a stored entry satisfies the request's own freshness limits (RFC 9111 §5.2.1).
fn acceptable(entry: &Entry, req_cc: &CacheControl, now: SystemTime) -> bool {
    let age = entry.age(now).as_secs();
    if !entry.is_fresh(now) {
        return false;
    }
    if req_cc.max_age.is_some_and(|m| age > m) {
        return false;
    }
    let left = entry.lifetime.as_secs().saturating_sub(age);
    req_cc.min_fresh.is_none_or(|m| left >= m)
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
async fn preread(
    mut body: Incoming,
    timeout: std::time::Duration,
) -> Result<UpstreamBody, PrereadError> {
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

/// Reads a body to its end (so a tee stores it), discarding the data.
async fn drain(mut body: Body) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
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

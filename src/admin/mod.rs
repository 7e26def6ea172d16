//! The admin listener (loopback by default): `/healthz` and `/readyz` for probes, and behind a
//! bearer token `/metrics` for Prometheus (public with `public_metrics`), `/status`
//! ([`status`]), `/origins`, `/cache?url=` and `/cache/stats` ([`inspect`]), `POST /purge`
//! and `POST /reload`. It runs on the data listeners' accept loop and connection handling
//! (`server::accept_with`, `server::conn::serve_plain`), so it has the same header-read and
//! idle timeouts, with its own connection limit. The data path never waits on it.

mod inspect;
mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::cache::PurgeTarget;
use crate::config::Admin as AdminConfig;
use crate::proxy::Live;
use crate::server::conn::Builders;
use crate::server::ConnTracker;
use crate::telemetry::metrics::{self, Gauges, Metrics, Scrape};

pub use status::{ConfigStamp, NodeStatus, Started};

/// What the admin endpoints read.
pub struct AdminState {
    /// `[admin]` in service: a reload that keeps the address swaps it (token, public metrics).
    pub config: arc_swap::ArcSwap<AdminConfig>,
    /// The proxy in service (a reload swaps it).
    pub proxy: Arc<Live>,
    /// What `POST /reload` runs; `None` when the node has no configuration file to read.
    pub reload: Option<Arc<dyn Reload>>,
    pub metrics: Arc<Metrics>,
    pub tracker: ConnTracker,
    /// Set as soon as the node begins to shut down (before its listeners close): from then
    /// on `/readyz` answers 503.
    pub draining: watch::Receiver<bool>,
    /// The configuration in service and the listeners, for `/status`.
    pub node: Arc<dyn NodeStatus>,
    pub started: Started,
    /// This listener's bound address.
    pub admin_addr: SocketAddr,
}

/// A configuration reload, as the node runs it (`node::Reloader`): the file read again and,
/// when valid, swapped in. `Ok` says what changed; `Err` carries every problem, one per line.
pub trait Reload: Send + Sync {
    fn reload(&self) -> Result<String, String>;
}

/// A purge request body: exactly one target, and `soft` to mark stale instead of removing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    host: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    soft: bool,
}

/// Serves the admin endpoints on `listener` until `stop`, with the data listeners' connection
/// `builders` (timeouts, header limits) and at most `config.max_connections` connections.
///
/// `stop` is not the data listeners' shutdown signal: the admin listener keeps answering
/// while the node drains, so `/readyz` can say so and `/metrics` can be scraped.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    builders: Arc<Builders>,
    stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(state.config.load().max_connections));
    let conn_stop = stop.clone();
    crate::server::accept_with(listener, limit, stop, move |stream, peer| {
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, req).await) }
        });
        crate::server::conn::serve_plain(stream, peer, builders.clone(), svc, conn_stop.clone())
    })
    .await
}

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let public = matches!(
        (req.method(), req.uri().path()),
        (&Method::GET, "/healthz" | "/readyz")
    ) || (state.config.load().public_metrics
        && (req.method(), req.uri().path()) == (&Method::GET, "/metrics"));
    if !public {
        if let Some(refused) = refusal(state, &req) {
            return refused;
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if *state.draining.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                text(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let proxy = state.proxy.load();
            let store = proxy.store();
            #[cfg(target_os = "linux")]
            let memory_files = {
                let usage = crate::cache::mapped::usage();
                metrics::MemoryFiles {
                    objects: usage.objects,
                    bytes: usage.bytes,
                    fallbacks: usage.fallbacks,
                }
            };
            #[cfg(not(target_os = "linux"))]
            let memory_files = metrics::MemoryFiles::default();
            let gauges = Gauges {
                cache_objects: store.entry_count(),
                cache_bytes: store.weighted_size(),
                cache_capacity_bytes: store.capacity(),
                fills_in_flight: proxy.fills_in_flight() as u64,
                fill_bytes: proxy.fill_memory().0,
                fill_memory_full: proxy.fill_memory().1,
                open_connections: state.tracker.open() as u64,
                memory_files,
            };
            let scrape = Scrape {
                metrics: state.metrics.clone(),
                gauges,
                origins: proxy.origin_series(),
                fleet: proxy.fleet().map(|f| f.series()),
            };
            text(StatusCode::OK, metrics::CONTENT_TYPE, scrape.render())
        }
        (&Method::GET, "/status") => {
            text(StatusCode::OK, "application/json", status::render(state))
        }
        (&Method::GET, "/cache") => {
            let (status, body) = inspect::variants(state, req.uri().query());
            text(status, "application/json", body)
        }
        (&Method::GET, "/cache/stats") => {
            text(StatusCode::OK, "application/json", inspect::stats(state))
        }
        (&Method::POST, "/purge") => purge(state, req).await,
        (&Method::POST, "/reload") => reload(state).await,
        (&Method::GET, "/cluster") => {
            let (status, body) = cluster(state);
            text(status, "application/json", body)
        }
        (&Method::GET, "/origins") => text(
            StatusCode::OK,
            "application/json",
            state.proxy.load().origins_json(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `POST /reload`: the configuration file read again (off the runtime's threads: it reads
/// files and builds clients). 200 with what changed, or 422 with every problem and the
/// running configuration kept.
async fn reload(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(reload) = state.reload.clone() else {
        return text(
            StatusCode::CONFLICT,
            "text/plain",
            "no configuration file to reload: this node was started without one\n",
        );
    };
    match tokio::task::spawn_blocking(move || reload.reload()).await {
        Ok(Ok(done)) => text(StatusCode::OK, "text/plain", format!("{done}\n")),
        Ok(Err(problems)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            "text/plain",
            format!("{problems}\n"),
        ),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "the reload failed unexpectedly; the running configuration stays\n",
        ),
    }
}

/// Checks the request's bearer token against the configured one: `None` when it matches,
/// else the answer to send: 403 when no token is configured (nothing could pass), else 401.
fn refusal(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let config = state.config.load();
    if config.token.is_none() {
        return Some(text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "refused: no admin token is configured\n",
        ));
    }
    if config.authorizes(req.headers().get(header::AUTHORIZATION)) {
        return None;
    }
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "a valid bearer token is required\n",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// How long a purge's reply waits for the members it was forwarded to.
const PEER_PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET /cluster`: the fleet as this node sees it; 404 for a node on its own.
fn cluster(state: &AdminState) -> (StatusCode, String) {
    let proxy = state.proxy.load();
    let Some(fleet) = proxy.fleet() else {
        return (
            StatusCode::NOT_FOUND,
            "{\"error\":\"this node is not a member of a fleet ([cluster] is not configured)\"}\n"
                .to_owned(),
        );
    };
    let members = fleet.members();
    let list: Vec<serde_json::Value> = members
        .iter()
        .map(|(m, state, since, _)| {
            serde_json::json!({
                "id": &*m.id,
                "address": m.address.to_string(),
                "state": state,
                "since": since,
            })
        })
        .collect();
    let peers: serde_json::Map<String, serde_json::Value> = members
        .iter()
        .filter_map(|(m, _, _, counts)| {
            Some((
                m.id.to_string(),
                serde_json::to_value(counts.as_ref()?).ok()?,
            ))
        })
        .collect();
    let body = serde_json::json!({
        "node": fleet.config.node,
        "name": fleet.config.name,
        "address": fleet.this.address.to_string(),
        "discovery": fleet.config.discovery.kind(),
        "hot_copies": fleet.config.hot_copies,
        "members": list,
        "etcd": fleet.discovery_status(),
        "peers": peers,
    });
    (StatusCode::OK, format!("{body}\n"))
}

async fn purge(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), 64 << 10).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "could not read the request body\n",
            )
        }
    };
    let p: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("invalid purge request: {e}\n"),
            )
        }
    };
    let url_parts = p.url.as_deref().and_then(|u| u.parse::<http::Uri>().ok());
    let target = match (&p, &url_parts) {
        (
            PurgeRequest {
                url: Some(_),
                host: None,
                prefix: None,
                tag: None,
                all: false,
                ..
            },
            Some(u),
        ) => match (u.host(), u.path_and_query()) {
            (Some(h), Some(pq)) => {
                let (host, pq) = state.proxy.load().key_of(h, pq.as_str());
                Some((host, pq, 0))
            }
            _ => None,
        },
        (
            PurgeRequest {
                url: None,
                host: Some(h),
                prefix: Some(pre),
                tag: None,
                all: false,
                ..
            },
            _,
        ) => Some((h.to_ascii_lowercase(), pre.clone(), 1)),
        (
            PurgeRequest {
                url: None,
                host: None,
                prefix: None,
                tag: Some(t),
                all: false,
                ..
            },
            _,
        ) => Some((String::new(), t.clone(), 2)),
        (
            PurgeRequest {
                url: None,
                host: None,
                prefix: None,
                tag: None,
                all: true,
                ..
            },
            _,
        ) => Some((String::new(), String::new(), 3)),
        _ => None,
    };
    let Some((host, arg, kind)) = target else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "give exactly one of {\"url\": \"https://host/path\"}, {\"host\": ..., \"prefix\": \"/path\"}, {\"tag\": ...}, {\"all\": true}\n",
        );
    };
    let target = match kind {
        0 => PurgeTarget::Url {
            host: &host,
            path_and_query: &arg,
        },
        1 => PurgeTarget::Prefix {
            host: &host,
            prefix: &arg,
        },
        2 => PurgeTarget::Tag(&arg),
        _ => PurgeTarget::All,
    };
    let (n, peers) = state.proxy.load().purge_reporting(&target, p.soft);
    // Not `target`: the JSON format has a key of that name (the event's target) already.
    tracing::info!(purge = ?target, soft = p.soft, purged = n, "purge");
    let mut reply = serde_json::json!({ "purged": n, "soft": p.soft });
    if let Some(rx) = peers {
        // Forwarded to the other members: their results, or "pending" for those that had
        // not answered within the deadline (the forwarding goes on).
        let results = tokio::time::timeout(PEER_PURGE_WAIT, rx).await;
        let peers: serde_json::Map<String, serde_json::Value> = match results {
            Ok(Ok(list)) => list
                .into_iter()
                .map(|(id, r)| (id.to_string(), serde_json::Value::from(r)))
                .collect(),
            _ => std::iter::once(("*".to_owned(), serde_json::Value::from("pending"))).collect(),
        };
        reply["peers"] = serde_json::Value::Object(peers);
    }
    text(StatusCode::OK, "application/json", format!("{reply}\n"))
}

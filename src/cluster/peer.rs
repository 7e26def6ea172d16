//! The fleet as the request path sees it ([`Fleet`]): the owner of a key among the members
//! that are not ejected, the pooled HTTP/1.1 client that fetches from an owner's peer
//! listener, and what each peer did (requests, errors, latency, ejection).
//!
//! A peer that refuses, resets or times out is ejected here at once for 1 s, doubling up to
//! 30 s while it keeps failing (as origins are, see `origin::state`); once the time is up
//! the next miss it owns is its probe, and an answer ends the ejection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::{ring, Member, Membership, Publish, Purge};
use tokio::sync::oneshot;

/// Where members forward purges, on the peer listener only.
pub const PURGE_PATH: &str = "/.edgecache/purge";
use crate::config::Cluster;
use crate::origin::UpstreamBody;
use crate::telemetry::metrics::Histogram;

/// The first ejection of a failing peer; each failure in a row doubles it up to [`MAX_EJECT`].
const MIN_EJECT: Duration = Duration::from_secs(1);
const MAX_EJECT: Duration = Duration::from_secs(30);

/// Why a peer request failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer} sent no response head within {timeout:?}")]
    Timeout { peer: Arc<str>, timeout: Duration },
    #[error("request to peer {peer}: {source}")]
    Request {
        peer: Arc<str>,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

impl PeerError {
    /// The `result` label of `edgecache_peer_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            PeerError::Timeout { .. } => "timeout",
            PeerError::Request { source, .. } if source.is_connect() => "refused",
            PeerError::Request { .. } => "broken",
        }
    }
}

/// What one peer did, as this node saw it; kept across membership changes by address.
#[derive(Default)]
pub struct PeerStats {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Sum of the times to the response head, in microseconds.
    latency_us: AtomicU64,
    /// Milliseconds since the fleet's start until which the peer is ejected; 0 when it is not.
    ejected_until_ms: AtomicU64,
    /// The current ejection's length in milliseconds (doubles per failure in a row).
    eject_ms: AtomicU64,
    /// When its state (up or ejected) last changed, in seconds since the Unix epoch.
    since_s: AtomicU64,
}

/// A peer's counts for `/cluster`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PeerCounts {
    pub requests: u64,
    pub errors: u64,
    /// Mean time to the response head over all answered requests.
    pub latency_ms: f64,
}

/// One member in the ring: its seed and whether it is this node.
struct Slot {
    member: Member,
    seed: u64,
    local: bool,
    stats: Arc<PeerStats>,
}

/// The other member that owns a key, for one fetch.
pub struct Owner {
    pub id: Arc<str>,
    pub address: SocketAddr,
    stats: Arc<PeerStats>,
}

/// Each member's result of a forwarded purge, by member id: `ok` or `error: ...`.
pub type PurgeResults = oneshot::Receiver<Vec<(Arc<str>, String)>>;

/// Counters by `result`, in `RESULTS` order.
pub const RESULTS: [&str; 4] = ["ok", "refused", "broken", "timeout"];

/// The fleet for the request path and `/cluster`: shared by every proxy a reload builds.
pub struct Fleet {
    pub config: Cluster,
    /// This node as the others know it.
    pub this: Member,
    membership: Membership,
    ring: ArcSwap<Vec<Slot>>,
    stats: Mutex<HashMap<SocketAddr, Arc<PeerStats>>>,
    client: Client<HttpConnector, UpstreamBody>,
    started: Instant,
    /// Where purges accepted here go (static peers, etcd); `None` until discovery sets it.
    publisher: ArcSwap<Option<Arc<dyn Publish>>>,
    results: [AtomicU64; RESULTS.len()],
    pub latency: Histogram,
    membership_changes: AtomicU64,
    /// With `cluster.etcd`: the connection's state, for `/cluster` and `/metrics`.
    etcd: std::sync::OnceLock<Arc<super::etcd::EtcdStatus>>,
    /// With `hot_copies`: keys (this node's store hashes) fetched from a peer recently; a
    /// second fetch within [`HOT_WINDOW`] keeps a copy.
    recent: moka::sync::Cache<u64, ()>,
    /// `now_ms` until which copies fetched from peers are not kept (see `copies_held`).
    copies_held_until_ms: AtomicU64,
}

/// How long after a purge a non-owner keeps no copy fetched from a peer: longer than a purge
/// takes to reach every member (under a second, p99, through etcd).
const COPY_HOLD: Duration = Duration::from_secs(2);

/// How long a key fetched from a peer is remembered for `hot_copies`.
const HOT_WINDOW: Duration = Duration::from_secs(60);

impl Fleet {
    /// The fleet for `config`, this node at `advertise` (the bound peer listener when the
    /// configured one has port 0), its members followed from `membership` by a task.
    pub fn new(config: Cluster, advertise: SocketAddr, membership: Membership) -> Arc<Fleet> {
        let this = Member {
            id: Arc::from(config.node.as_str()),
            address: advertise,
            since: SystemTime::now(),
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.peer_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let hot = config.hot_copies;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(http);
        let fleet = Arc::new(Fleet {
            config,
            this,
            membership: membership.clone(),
            ring: ArcSwap::from_pointee(Vec::new()),
            stats: Mutex::new(HashMap::new()),
            client,
            started: Instant::now(),
            publisher: ArcSwap::from_pointee(None),
            results: Default::default(),
            latency: Histogram::default(),
            membership_changes: AtomicU64::new(0),
            etcd: std::sync::OnceLock::new(),
            recent: moka::sync::Cache::builder()
                .max_capacity(if hot { 65_536 } else { 0 })
                .time_to_live(HOT_WINDOW)
                .build(),
            copies_held_until_ms: AtomicU64::new(0),
        });
        fleet.rebuild(&membership.current());
        let weak = Arc::downgrade(&fleet);
        let mut rx = membership.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let members = rx.borrow_and_update().clone();
                let Some(fleet) = weak.upgrade() else { break };
                fleet.membership_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(members = members.len(), "fleet membership changed");
                fleet.rebuild(&members);
            }
        });
        fleet
    }

    fn rebuild(&self, members: &[Member]) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let slots = members
            .iter()
            .map(|m| Slot {
                member: m.clone(),
                seed: ring::member_seed(&m.address),
                local: m.address == self.this.address,
                stats: stats.entry(m.address).or_default().clone(),
            })
            .collect();
        drop(stats);
        self.ring.store(Arc::new(slots));
    }

    /// The membership this fleet follows (discovery sets it).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Sets where purges accepted here are published.
    pub fn set_publisher(&self, p: Arc<dyn Publish>) {
        self.publisher.store(Arc::new(Some(p)));
    }

    /// The etcd connection whose state `/cluster` and `/metrics` show (`cluster.etcd`).
    pub fn set_etcd(&self, status: Arc<super::etcd::EtcdStatus>) {
        let _ = self.etcd.set(status);
    }

    /// What `/cluster` shows under `etcd`: `null` without etcd.
    pub fn discovery_status(&self) -> serde_json::Value {
        let Some(e) = self.etcd.get() else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "connected": e.connected(),
            "last_revision": e.last_revision(),
            "errors": e.errors(),
            "purges_sent": e.purges_sent(),
            "purges_applied": e.purges_applied(),
            "purges_dropped": e.purges_dropped(),
            "full_purges": e.full_purges(),
            "last_purge_lag_ms": e.last_lag().map(|d| d.as_secs_f64() * 1000.0),
        })
    }

    /// Where purges accepted here are published, if anywhere.
    pub fn publisher(&self) -> Option<Arc<dyn Publish>> {
        (**self.publisher.load()).clone()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// The other member that owns the key hashed as `key` (see `ring::key_hash`), among the
    /// members not ejected; `None` when this node owns it (or is alone).
    pub fn owner(&self, key: u64) -> Option<Owner> {
        let slots = self.ring.load();
        let now = self.now_ms();
        let i = ring::owner(key, slots.iter().map(|s| s.seed), |i| {
            slots
                .get(i)
                .is_some_and(|s| s.local || s.stats.ejected_until_ms.load(Ordering::Relaxed) <= now)
        })?;
        let s = slots.get(i)?;
        (!s.local).then(|| Owner {
            id: s.member.id.clone(),
            address: s.member.address,
            stats: s.stats.clone(),
        })
    }

    /// Sends `req` (its URI `http://<owner>/<path>`) to the owner, waiting at most
    /// `peer_timeout` for the response head. A failure ejects the owner; an answer ends an
    /// ejection.
    pub async fn send(
        &self,
        owner: &Owner,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, PeerError> {
        let timeout = self.config.peer_timeout;
        let started = Instant::now();
        owner.stats.requests.fetch_add(1, Ordering::Relaxed);
        let result = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(PeerError::Timeout {
                peer: owner.id.clone(),
                timeout,
            }),
            Ok(Err(source)) => Err(PeerError::Request {
                peer: owner.id.clone(),
                source,
            }),
            Ok(Ok(r)) => Ok(r),
        };
        let elapsed = started.elapsed();
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        if let Some(i) = RESULTS.iter().position(|r| *r == label) {
            self.results[i].fetch_add(1, Ordering::Relaxed);
        }
        let s = &owner.stats;
        match &result {
            Ok(_) => {
                self.latency.observe(elapsed);
                s.latency_us
                    .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
                s.eject_ms.store(0, Ordering::Relaxed);
                if s.ejected_until_ms.swap(0, Ordering::Relaxed) != 0 {
                    s.since_s.store(unix_now(), Ordering::Relaxed);
                    tracing::info!(peer = %owner.id, "peer back after its ejection");
                }
            }
            Err(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                let last = s.eject_ms.load(Ordering::Relaxed);
                let next = if last == 0 {
                    MIN_EJECT.as_millis() as u64
                } else {
                    (last * 2).min(MAX_EJECT.as_millis() as u64)
                };
                s.eject_ms.store(next, Ordering::Relaxed);
                s.ejected_until_ms
                    .store(self.now_ms() + next, Ordering::Relaxed);
                s.since_s.store(unix_now(), Ordering::Relaxed);
                tracing::warn!(peer = %owner.id, error = %e, ejected_for_ms = next, "peer request failed: asking the origin, peer ejected");
            }
        }
        result
    }

    /// The members with their state (`up`, `ejected`) and since when (Unix seconds), and
    /// each other member's counts, for `/cluster`.
    pub fn members(&self) -> Vec<(Member, &'static str, u64, Option<PeerCounts>)> {
        let slots = self.ring.load();
        let now = self.now_ms();
        slots
            .iter()
            .map(|s| {
                let ejected = !s.local && s.stats.ejected_until_ms.load(Ordering::Relaxed) > now;
                let since = match s.stats.since_s.load(Ordering::Relaxed) {
                    0 => s
                        .member
                        .since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    t => t,
                };
                let counts = (!s.local).then(|| {
                    let requests = s.stats.requests.load(Ordering::Relaxed);
                    let errors = s.stats.errors.load(Ordering::Relaxed);
                    let answered = requests.saturating_sub(errors);
                    let us = s.stats.latency_us.load(Ordering::Relaxed);
                    PeerCounts {
                        requests,
                        errors,
                        latency_ms: if answered == 0 {
                            0.0
                        } else {
                            us as f64 / answered as f64 / 1000.0
                        },
                    }
                });
                (
                    s.member.clone(),
                    if ejected { "ejected" } else { "up" },
                    since,
                    counts,
                )
            })
            .collect()
    }

    /// Peer requests by result, in [`RESULTS`] order.
    pub fn results(&self) -> [u64; RESULTS.len()] {
        let mut out = [0; RESULTS.len()];
        for (o, r) in out.iter_mut().zip(&self.results) {
            *o = r.load(Ordering::Relaxed);
        }
        out
    }

    /// Whether this node keeps a copy of what a peer sent for the key `hash` (the store's
    /// hash): with `hot_copies`, when the key was fetched from a peer before within the last
    /// minute (served often); never without.
    pub fn keep_copy(&self, hash: u64) -> bool {
        if !self.config.hot_copies {
            return false;
        }
        let seen = self.recent.contains_key(&hash);
        if !seen {
            self.recent.insert(hash, ());
        }
        seen && !self.copies_held()
    }

    /// True while a copy fetched from a peer may predate a purge this node has applied: the
    /// owner may not have applied it yet, and keeping its answer would bring the purged
    /// object back here for good. So for [`COPY_HOLD`] after each purge applied here, and
    /// while etcd (which carries purges) is unreachable and for [`COPY_HOLD`] after it comes
    /// back, a non-owner passes peers' answers on without keeping them.
    fn copies_held(&self) -> bool {
        if self.now_ms() < self.copies_held_until_ms.load(Ordering::Relaxed) {
            return true;
        }
        self.etcd.get().is_some_and(|e| {
            e.connected_for(SystemTime::now())
                .is_none_or(|d| d < COPY_HOLD)
        })
    }

    /// A purge was applied here (accepted here or at another member): copies fetched from
    /// peers are not kept for a while (see `copies_held`).
    pub fn purged(&self) {
        let until = self.now_ms() + COPY_HOLD.as_millis() as u64;
        self.copies_held_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    /// Whether `ip` is the address of a member, this node's included (members may share a
    /// host): purges and trust on the peer listener are for members only.
    pub fn is_member_ip(&self, ip: std::net::IpAddr) -> bool {
        self.ring.load().iter().any(|s| s.member.address.ip() == ip)
    }

    /// Sends a purge accepted here on to every other member: through the publisher (etcd)
    /// when one is set, else to each member's peer listener (static peers, DNS). The
    /// receiver gets each member's result (`ok` or `error: ...`) once all answered or timed
    /// out; `None` when a publisher carries it.
    pub fn publish(self: &Arc<Self>, purge: Purge) -> Option<PurgeResults> {
        if let Some(p) = self.publisher() {
            p.publish(purge);
            return None;
        }
        let body = match serde_json::to_vec(&purge) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "purge not forwarded: cannot encode it");
                return None;
            }
        };
        let targets: Vec<(Arc<str>, SocketAddr)> = self
            .ring
            .load()
            .iter()
            .filter(|s| !s.local)
            .map(|s| (s.member.id.clone(), s.member.address))
            .collect();
        let (tx, rx) = oneshot::channel();
        let fleet = self.clone();
        tokio::spawn(async move {
            let sends = targets.into_iter().map(|(id, addr)| {
                let fleet = fleet.clone();
                let body = body.clone();
                async move {
                    let result = fleet.forward_purge(addr, body).await;
                    if let Err(e) = &result {
                        tracing::warn!(peer = %id, error = %e, "purge not applied at a peer");
                    }
                    (
                        id,
                        result.map_or_else(|e| format!("error: {e}"), |()| "ok".to_owned()),
                    )
                }
            });
            let mut set = tokio::task::JoinSet::new();
            for s in sends {
                set.spawn(s);
            }
            let mut results = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    results.push(r);
                }
            }
            results.sort();
            let _ = tx.send(results);
        });
        Some(rx)
    }

    async fn forward_purge(&self, addr: SocketAddr, body: bytes::Bytes) -> Result<(), String> {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(PURGE_PATH)
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(UpstreamBody::new(body, None, None));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let timeout = self.config.peer_timeout;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(e)) => Err(crate::proxy::ErrorChain(&e).to_string()),
            Ok(Ok(r)) if r.status().is_success() => Ok(()),
            Ok(Ok(r)) => Err(format!("status {}", r.status().as_u16())),
        }
    }

    /// The values `/metrics` shows.
    pub fn series(&self) -> crate::telemetry::metrics::FleetSeries {
        // The owned share from a fixed sample of the key space: cheap, and within a percent
        // or so of the true share.
        const SAMPLE: u64 = 4096;
        let owned = (0..SAMPLE)
            .filter(|&i| self.owner(ring::mix(i)).is_none())
            .count();
        crate::telemetry::metrics::FleetSeries {
            results: RESULTS.iter().copied().zip(self.results()).collect(),
            durations: self.latency.snapshot(),
            members: self.ring.load().len() as u64,
            membership_changes: self.membership_changes(),
            owned_share: owned as f64 / SAMPLE as f64,
            etcd: self
                .etcd
                .get()
                .map(|e| crate::telemetry::metrics::EtcdSeries {
                    connected: e.connected(),
                    errors: e.errors(),
                    purges_sent: e.purges_sent(),
                    purges_dropped: e.purges_dropped(),
                    purges_applied: e.purges_applied(),
                    full_purges: e.full_purges(),
                    lag: e.lag(),
                }),
        }
    }

    /// Membership changes seen since start.
    pub fn membership_changes(&self) -> u64 {
        self.membership_changes.load(Ordering::Relaxed)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

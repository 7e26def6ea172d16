//! Membership and purges through etcd: this node registered under a lease kept alive, the
//! fleet's members read from a watch on the node keys, and purges written as keys that every
//! other node's watch applies.
//!
//! Keys, all under `/edgecache/<name>/`:
//! - `nodes/<node>`: `{"address", "version", "started"}` (JSON; `started` in Unix
//!   milliseconds) under this node's lease of `lease_ttl`, kept alive every third of it. A node
//!   that dies disappears when its lease expires; a clean stop revokes it at once.
//! - `purges/<node>-<start>-<n>`: a [`Purge`] with the node that wrote it and when it was
//!   accepted (JSON), under a lease of ten minutes so that purge keys do not pile up.
//!
//! One watch on the prefix, from the revision after the last one seen, carries both. While
//! etcd is unreachable the node keeps the last membership and queues its purges; reconnected,
//! it writes them and replays what it missed from its last revision. If etcd compacted that
//! far, the node cannot know what it missed, so it soft-purges everything and says why.
//!
//! Entry types: [`Etcd`] (the task, built with its [`EtcdPublisher`] by [`Etcd::new`]) and
//! [`EtcdStatus`] (connection state and counters for `/cluster` and `/metrics`).
//!
//! Why `etcd-client`: the issue mandates etcd, whose API is gRPC; this crate is the
//! maintained Rust client (tonic/prost, on the hyper and tokio already built here). It needs
//! `protoc` to build (Debian `protobuf-compiler`).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};

use super::{Member, Membership, Publish, Purge, Target};
use crate::telemetry::metrics::{Histogram, HistogramSnapshot};

/// How long a purge key lives in etcd: long enough for a node that lost etcd for a few
/// minutes to replay it, short enough that keys do not pile up.
const PURGE_LEASE_SECS: i64 = 600;
/// A purge lease is used for new keys for half its life, then a new one is granted.
const PURGE_LEASE_REUSE: Duration = Duration::from_secs(300);
/// Reconnection back-off: from 100 ms, doubled per failure, at most 5 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A unary call to etcd that takes longer is abandoned and the session restarted. Not set as
/// the client's timeout: tonic sends that as `grpc-timeout`, which would end the watch.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Purges accepted here and not yet handed to the task; past this, `publish` drops them.
const QUEUE: usize = 1024;
/// Purges kept for writing while etcd is unreachable; past this the oldest are dropped.
const PENDING_MAX: usize = 10_000;

/// What the task needs to know; the lead maps `[cluster]` onto it.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The fleet's name (`cluster.name`): the key prefix `/edgecache/<name>/`.
    pub name: String,
    /// This node's id (`cluster.node`).
    pub node: String,
    /// Where peers reach this node (`cluster.advertise`).
    pub advertise: SocketAddr,
    /// How long this node's registration outlives its last keep-alive; whole seconds, at
    /// least one (etcd counts leases in seconds and may raise a very short one).
    pub lease_ttl: Duration,
}

/// An etcd failure, as logged and counted; the task retries after each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op}")]
    Call {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout { op: &'static str },
    #[error("etcd watch ended")]
    WatchEnded,
    #[error("etcd watch canceled: {reason}")]
    WatchCanceled { reason: String },
    #[error("etcd history compacted at revision {compacted}: the watch restarts from now")]
    Compacted { compacted: i64 },
    #[error("lease {lease:x} expired before its keep-alive")]
    LeaseLost { lease: i64 },
}

/// The etcd connection as `/cluster` and `/metrics` show it. Shared: the task writes, anyone
/// reads, all through atomics.
#[derive(Debug, Default)]
pub struct EtcdStatus {
    connected: AtomicBool,
    /// When `connected` last changed, in milliseconds since the Unix epoch.
    changed_ms: AtomicU64,
    last_revision: AtomicI64,
    errors: AtomicU64,
    purges_sent: AtomicU64,
    purges_applied: AtomicU64,
    purges_dropped: AtomicU64,
    full_purges: AtomicU64,
    last_lag_us: AtomicU64,
    lag: Histogram,
}

impl EtcdStatus {
    /// Registered and watching now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How long this node has been registered and watching, as of `now`; `None` while it is
    /// not.
    pub fn connected_for(&self, now: SystemTime) -> Option<Duration> {
        if !self.connected() {
            return None;
        }
        let since = Duration::from_millis(self.changed_ms.load(Ordering::Relaxed));
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        Some(now.saturating_sub(since))
    }

    /// Sets the state; returns the one before.
    fn set_connected(&self, connected: bool) -> bool {
        let was = self.connected.swap(connected, Ordering::Relaxed);
        if was != connected {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.changed_ms
                .store(now.as_millis() as u64, Ordering::Relaxed);
        }
        was
    }

    /// The last etcd revision this node has seen every change up to (0: none yet).
    pub fn last_revision(&self) -> i64 {
        self.last_revision.load(Ordering::Relaxed)
    }

    /// Failed connections, calls and watches since start (`edgecache_etcd_errors_total`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Purges accepted here and written to etcd.
    pub fn purges_sent(&self) -> u64 {
        self.purges_sent.load(Ordering::Relaxed)
    }

    /// Purges from other nodes applied here.
    pub fn purges_applied(&self) -> u64 {
        self.purges_applied.load(Ordering::Relaxed)
    }

    /// Purges accepted here and never written: the queue was full.
    pub fn purges_dropped(&self) -> u64 {
        self.purges_dropped.load(Ordering::Relaxed)
    }

    /// Soft purges of everything made because etcd had compacted the history this node
    /// needed to replay.
    pub fn full_purges(&self) -> u64 {
        self.full_purges.load(Ordering::Relaxed)
    }

    /// The propagation lag of the last purge applied here: from its acceptance at another
    /// node to its application here, by the two nodes' clocks.
    pub fn last_lag(&self) -> Option<Duration> {
        match self.last_lag_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Every propagation lag so far (`edgecache_purge_propagation_seconds`).
    pub fn lag(&self) -> HistogramSnapshot {
        self.lag.snapshot()
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// A purge on its way to the task, stamped when it was accepted.
struct Accepted {
    purge: Purge,
    at: SystemTime,
}

/// Hands purges accepted at this node to the etcd task; never blocks.
#[derive(Clone)]
pub struct EtcdPublisher {
    tx: mpsc::Sender<Accepted>,
    status: Arc<EtcdStatus>,
}

impl Publish for EtcdPublisher {
    fn publish(&self, purge: Purge) {
        let accepted = Accepted {
            purge,
            at: SystemTime::now(),
        };
        if let Err(e) = self.tx.try_send(accepted) {
            self.status.purges_dropped.fetch_add(1, Ordering::Relaxed);
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "etcd task stopped",
            };
            tracing::warn!(reason, "purge not sent to the fleet");
        }
    }
}

/// A node's registration, the value of `nodes/<node>`.
#[derive(Debug, Serialize, Deserialize)]
struct Registration {
    address: SocketAddr,
    version: String,
    /// Unix milliseconds.
    started: u64,
}

/// A purge as stored under `purges/`: the shared [`Purge`] with who wrote it and when it was
/// accepted, for skipping our own and measuring the lag.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    purge: Purge,
    from: String,
    /// When the purge was accepted, Unix microseconds.
    accepted: u64,
}

/// The etcd task of one node: see the module doc.
pub struct Etcd {
    settings: EtcdSettings,
    rx: mpsc::Receiver<Accepted>,
    status: Arc<EtcdStatus>,
}

impl Etcd {
    /// The task and the publisher that feeds it purges.
    pub fn new(settings: EtcdSettings) -> (Etcd, EtcdPublisher) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let status = Arc::new(EtcdStatus::default());
        let publisher = EtcdPublisher {
            tx,
            status: status.clone(),
        };
        (
            Etcd {
                settings,
                rx,
                status,
            },
            publisher,
        )
    }

    /// Its status, shared.
    pub fn status(&self) -> Arc<EtcdStatus> {
        self.status.clone()
    }

    /// Runs until `stop` turns true (or its sender is dropped): registers, keeps `membership`
    /// current, writes this node's purges and calls `apply` for every other node's. On a clean
    /// stop the registration is removed at once.
    pub async fn run(
        self,
        membership: Membership,
        apply: Arc<dyn Fn(Purge) + Send + Sync>,
        mut stop: watch::Receiver<bool>,
    ) {
        let started = SystemTime::now();
        let this = Member {
            id: Arc::from(self.settings.node.as_str()),
            address: self.settings.advertise,
            since: started,
        };
        let prefix = format!("/edgecache/{}/", self.settings.name);
        let mut runner = Runner {
            nodes: format!("{prefix}nodes/"),
            purges: format!("{prefix}purges/"),
            prefix,
            settings: self.settings,
            rx: self.rx,
            status: self.status,
            membership,
            apply,
            this,
            started_ms: unix_ms(started),
            members: BTreeMap::new(),
            pending: VecDeque::new(),
            counter: 0,
            last_rev: 0,
            lease: None,
        };
        runner.run(&mut stop).await;
    }
}

struct Runner {
    settings: EtcdSettings,
    prefix: String,
    nodes: String,
    purges: String,
    rx: mpsc::Receiver<Accepted>,
    status: Arc<EtcdStatus>,
    membership: Membership,
    apply: Arc<dyn Fn(Purge) + Send + Sync>,
    this: Member,
    started_ms: u64,
    /// The members etcd lists, by id.
    members: BTreeMap<String, Member>,
    /// Purges accepted here, encoded as (key, value), not yet written.
    pending: VecDeque<(String, String)>,
    counter: u64,
    /// Every change up to this revision has been seen (0: none).
    last_rev: i64,
    /// The registration lease of the current session, revoked on a clean stop.
    lease: Option<(Client, i64)>,
}

/// How a session ended without an error.
struct Stopped;

/// Resolves once the node is told to stop (or the sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Bounds a unary etcd call.
async fn call<T>(
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Call { op, source }),
        Err(_) => Err(Error::Timeout { op }),
    }
}

impl Runner {
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        // Whether the last attempt failed: an error is logged at warn only on the change.
        let mut failing = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let result = self.session(stop, &mut failing, &mut backoff).await;
            let was_connected = self.status.set_connected(false);
            match result {
                Ok(Stopped) => break,
                Err(Error::Compacted { compacted }) => {
                    // Not a connection problem: start again from now at once.
                    tracing::warn!(
                        compacted,
                        last_revision = self.last_rev,
                        "etcd compacted the purges this node had not seen: soft-purging everything"
                    );
                    self.full_purge();
                    continue;
                }
                Err(e) => {
                    self.status.error();
                    if was_connected || !failing {
                        tracing::warn!(
                            error = %error_chain(&e),
                            "etcd unreachable: serving with the last membership, retrying"
                        );
                    } else {
                        tracing::debug!(error = %error_chain(&e), "etcd still unreachable");
                    }
                    failing = true;
                }
            }
            // Back off, keeping the purges accepted meanwhile.
            let wake = Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = stopped(stop) => break,
                    got = self.rx.recv() => match got {
                        Some(a) => self.enqueue(a),
                        None => break,
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let _ = self.status.set_connected(false);
        if let Some((mut client, lease)) = self.lease.take() {
            // A clean stop: the others see this node leave now, not when its lease expires.
            if let Err(e) = call("lease revoke", client.lease_revoke(lease)).await {
                tracing::debug!(error = %error_chain(&e), "registration lease not revoked");
            }
        }
    }

    /// One connection to etcd, from registration to the first failure.
    async fn session(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        failing: &mut bool,
        backoff: &mut Duration,
    ) -> Result<Stopped, Error> {
        let mut client = self.connect().await?;
        let ttl = self.settings.lease_ttl.as_secs().max(1) as i64;
        let (mut lease, mut keeper, mut keep_alives) = self.register(&mut client, ttl).await?;
        let mut purge_lease: Option<(i64, Instant)> = None;
        let snapshot_rev = self.load_members(&mut client).await?;
        let mut stream = call(
            "watch",
            client.watch(
                self.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.last_rev + 1),
                ),
            ),
        )
        .await?;

        let every = Duration::from_secs(ttl as u64) / 3;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        let mut last_keep_alive = Instant::now();
        loop {
            self.flush_pending(&mut client, &mut purge_lease).await?;
            tokio::select! {
                _ = stopped(stop) => return Ok(Stopped),
                got = self.rx.recv() => match got {
                    Some(a) => self.enqueue(a),
                    None => return Ok(Stopped),
                },
                _ = tick.tick() => {
                    if last_keep_alive.elapsed() > self.settings.lease_ttl.max(Duration::from_secs(1)) {
                        return Err(Error::LeaseLost { lease });
                    }
                    call("lease keep-alive", keeper.keep_alive()).await?;
                    // Progress reports let an idle node's last revision follow etcd's, so a
                    // later gap replays from near now rather than hitting a compaction.
                    call("watch progress", stream.request_progress()).await?;
                }
                answer = keep_alives.message() => match answer {
                    Ok(Some(r)) if r.ttl() > 0 => last_keep_alive = Instant::now(),
                    Ok(Some(_)) => {
                        // etcd forgot the lease (it expired while we were slow): register anew.
                        tracing::warn!(lease = format_args!("{lease:x}"), "etcd lease lost: registering again");
                        (lease, keeper, keep_alives) = self.register(&mut client, ttl).await?;
                        last_keep_alive = Instant::now();
                    }
                    Ok(None) => return Err(Error::WatchEnded),
                    Err(source) => return Err(Error::Call { op: "lease keep-alive", source }),
                },
                message = stream.message() => match message {
                    Ok(Some(r)) => {
                        if r.created() && !r.canceled() {
                            let _ = self.status.set_connected(true);
                            self.status.last_revision.store(self.last_rev, Ordering::Relaxed);
                            if *failing {
                                tracing::info!(revision = self.last_rev, "etcd reachable again");
                            } else {
                                tracing::info!(revision = self.last_rev, "etcd connected");
                            }
                            *failing = false;
                            *backoff = BACKOFF_MIN;
                        }
                        self.on_watch(r, snapshot_rev)?;
                    }
                    Ok(None) => return Err(Error::WatchEnded),
                    Err(source) => return Err(Error::Call { op: "watch", source }),
                },
            }
        }
    }

    /// A client for the configured endpoints, within [`CALL_TIMEOUT`].
    async fn connect(&self) -> Result<Client, Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let connecting = Client::connect(&self.settings.endpoints, Some(options));
        match timeout(CALL_TIMEOUT, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(source)) => Err(Error::Connect {
                endpoints: self.settings.endpoints.join(","),
                source,
            }),
            Err(_) => Err(Error::Timeout { op: "connect" }),
        }
    }

    /// The members registered now, published whole; returns the revision they were read
    /// at (a new node replays nothing from before it: it starts there).
    async fn load_members(&mut self, client: &mut Client) -> Result<i64, Error> {
        let mut snapshot = call(
            "get nodes",
            client.get(self.nodes.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let snapshot_rev = snapshot.header().map_or(0, |h| h.revision());
        self.members.clear();
        for kv in snapshot.take_kvs() {
            if let Some(m) = self.member_of(kv.key(), kv.value()) {
                self.members.insert(m.id.to_string(), m);
            }
        }
        self.publish_members();
        if self.last_rev == 0 {
            // A new node has nothing to replay: purges before it started found nothing here.
            self.last_rev = snapshot_rev;
        }
        Ok(snapshot_rev)
    }

    /// Writes the purges queued while etcd was away (or since the last loop), each under a
    /// short lease shared by the purges of a few seconds (`purge_lease`).
    async fn flush_pending(
        &mut self,
        client: &mut Client,
        purge_lease: &mut Option<(i64, Instant)>,
    ) -> Result<(), Error> {
        while let Some((key, value)) = self.pending.front() {
            let id = match *purge_lease {
                Some((id, at)) if at.elapsed() < PURGE_LEASE_REUSE => id,
                _ => {
                    let id = call("lease grant", client.lease_grant(PURGE_LEASE_SECS, None))
                        .await?
                        .id();
                    *purge_lease = Some((id, Instant::now()));
                    id
                }
            };
            let options = Some(PutOptions::new().with_lease(id));
            call(
                "put purge",
                client.put(key.as_str(), value.as_str(), options),
            )
            .await?;
            self.pending.pop_front();
            self.status.purges_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Grants a lease, keeps it alive and writes this node's key under it.
    async fn register(
        &mut self,
        client: &mut Client,
        ttl: i64,
    ) -> Result<
        (
            i64,
            etcd_client::LeaseKeeper,
            etcd_client::LeaseKeepAliveStream,
        ),
        Error,
    > {
        let lease = call("lease grant", client.lease_grant(ttl, None))
            .await?
            .id();
        self.lease = Some((client.clone(), lease));
        let (keeper, stream) = call("lease keep-alive", client.lease_keep_alive(lease)).await?;
        let value = serde_json::to_string(&Registration {
            address: self.settings.advertise,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: self.started_ms,
        })
        .unwrap_or_default();
        let key = format!("{}{}", self.nodes, self.settings.node);
        call(
            "register",
            client.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok((lease, keeper, stream))
    }

    /// One watch answer: member changes, purges to apply, the revision reached.
    fn on_watch(&mut self, r: WatchResponse, snapshot_rev: i64) -> Result<(), Error> {
        if r.canceled() {
            if r.compact_revision() > 0 {
                return Err(Error::Compacted {
                    compacted: r.compact_revision(),
                });
            }
            return Err(Error::WatchCanceled {
                reason: r.cancel_reason().to_owned(),
            });
        }
        let events = r.events();
        if events.is_empty() {
            // A progress report (or the creation): every change up to its revision was sent.
            if !r.created() {
                if let Some(h) = r.header() {
                    self.advance(h.revision());
                }
            }
            return Ok(());
        }
        let mut members_changed = false;
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let key = kv.key();
            if key.starts_with(self.nodes.as_bytes()) {
                // Changes the snapshot already holds are not applied again.
                if kv.mod_revision() <= snapshot_rev {
                    continue;
                }
                let id = String::from_utf8_lossy(&key[self.nodes.len()..]).into_owned();
                match event.event_type() {
                    EventType::Put => {
                        if let Some(m) = self.member_of(key, kv.value()) {
                            self.members.insert(id, m);
                            members_changed = true;
                        }
                    }
                    EventType::Delete => {
                        members_changed |= self.members.remove(&id).is_some();
                    }
                }
            } else if key.starts_with(self.purges.as_bytes())
                && event.event_type() == EventType::Put
                && kv.create_revision() == kv.mod_revision()
            {
                self.on_purge(kv.value());
            }
            self.advance(kv.mod_revision());
        }
        if members_changed {
            self.publish_members();
        }
        Ok(())
    }

    fn on_purge(&self, value: &[u8]) {
        let envelope: Envelope = match serde_json::from_slice(value) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "purge in etcd not understood: skipped");
                return;
            }
        };
        if envelope.from == self.settings.node {
            // Applied when it was accepted here.
            return;
        }
        let accepted = UNIX_EPOCH + Duration::from_micros(envelope.accepted);
        // Clocks of two machines: a purge from "the future" counts as no lag.
        let lag = SystemTime::now()
            .duration_since(accepted)
            .unwrap_or(Duration::ZERO);
        tracing::debug!(from = %envelope.from, lag_ms = lag.as_millis() as u64, "purge from the fleet");
        (self.apply)(envelope.purge);
        self.status.purges_applied.fetch_add(1, Ordering::Relaxed);
        self.status
            .last_lag_us
            .store((lag.as_micros() as u64).max(1), Ordering::Relaxed);
        self.status.lag.observe(lag);
    }

    fn advance(&mut self, revision: i64) {
        if revision > self.last_rev {
            self.last_rev = revision;
            self.status.last_revision.store(revision, Ordering::Relaxed);
        }
    }

    /// etcd compacted history this node had not seen: what was purged meanwhile is unknown,
    /// so everything is marked stale; replay starts again from now.
    fn full_purge(&mut self) {
        self.last_rev = 0;
        self.status.full_purges.fetch_add(1, Ordering::Relaxed);
        (self.apply)(Purge {
            target: Target::All,
            soft: true,
            node: self.settings.node.clone(),
        });
    }

    fn enqueue(&mut self, a: Accepted) {
        self.counter += 1;
        let key = format!(
            "{}{}-{}-{}",
            self.purges, self.settings.node, self.started_ms, self.counter
        );
        let value = match serde_json::to_string(&Envelope {
            purge: a.purge,
            from: self.settings.node.clone(),
            accepted: unix_us(a.at),
        }) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "purge not encoded: not sent to the fleet");
                return;
            }
        };
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
            self.status.purges_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                kept = PENDING_MAX,
                "etcd unreachable too long: oldest queued purge dropped"
            );
        }
        self.pending.push_back((key, value));
    }

    /// A member from its key and registration; `None` (logged) for a value not understood.
    fn member_of(&self, key: &[u8], value: &[u8]) -> Option<Member> {
        let id = std::str::from_utf8(key.get(self.nodes.len()..)?).ok()?;
        match serde_json::from_slice::<Registration>(value) {
            Ok(r) => Some(Member {
                id: Arc::from(id),
                address: r.address,
                since: UNIX_EPOCH + Duration::from_millis(r.started),
            }),
            Err(e) => {
                tracing::warn!(node = id, error = %e, "registration in etcd not understood: skipped");
                None
            }
        }
    }

    /// The members etcd lists, with this node always among them.
    fn publish_members(&self) {
        let mut list: Vec<Member> = self.members.values().cloned().collect();
        if !self.members.contains_key(self.settings.node.as_str()) {
            list.push(self.this.clone());
        }
        self.membership.set(list);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The error and its sources on one line, for a log field.
fn error_chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_travels_with_its_sender_and_time() {
        let e = Envelope {
            purge: Purge {
                target: Target::Tag { tag: "t".into() },
                soft: false,
                node: "a".into(),
            },
            from: "a".into(),
            accepted: 1_700_000_000_000_000,
        };
        let text = serde_json::to_string(&e).unwrap_or_default();
        let back: Envelope = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(back.purge, e.purge);
        assert_eq!(back.accepted, e.accepted);
    }
}

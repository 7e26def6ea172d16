//! The node: wires every other module together. [`start`] builds the store, the origin
//! clients (with their DNS resolver and TLS roots), the geo locator and the proxy, binds the
//! listeners, spawns the accept loops, the admin listener and the origin health checks, and
//! returns a [`Node`] that owns shutdown.
//!
//! This is the only module that knows every other one; none of them imports it. What one
//! configuration determines (sites, origin clients, the locator, the proxy over them) is built
//! by [`build_runtime`] from a `Config` and the parts that outlive a configuration (the store,
//! the metrics); a reload ([`Reloader`]) builds the next proxy beside the running one, from
//! the new configuration and what it carries over, and swaps it whole.
//!
//! Files: this one starts a node and owns its shutdown; `cluster_start` starts a fleet member's
//! parts (`[cluster]`); `listeners` binds, inherits and hands over listening sockets (binary
//! upgrades); `reload` swaps a configuration in ([`Reloader`]); `admin_listener` runs the admin
//! listener across reloads.

mod admin_listener;
mod cluster_start;
mod listeners;
mod reload;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::telemetry::metrics::Metrics;

use crate::admin;
use crate::cache::Store;
use crate::cluster::{self, peer::Fleet, Member, Membership};
use crate::config::{Config, Discovery};
use crate::error::Error;
use crate::geo::Locator;
use crate::origin::{self, OriginClient};
use crate::proxy::{Live, Proxy};
use crate::server::{self, conn::Builders, upgrade, ConnTracker, Shared};
use std::os::fd::{AsFd, OwnedFd};

use admin_listener::AdminRun;
use cluster_start::{run_etcd, start_cluster};
use listeners::{bind_all, handover_fd, inherit, offer_listeners, Listening};
pub use reload::Reloader;

/// A running edgecache node.
pub struct Node {
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    /// Turned true as shutdown begins, before the listeners close: `/readyz` says 503 from
    /// then on.
    stopping: watch::Sender<bool>,
    tracker: ConnTracker,
    reloader: Arc<Reloader>,
    /// Turns true when a new process took the listeners over (`server.upgrade_socket`).
    handed_over: watch::Receiver<bool>,
    /// This node took its listeners over from a process running before (an upgrade).
    took_over: bool,
}

/// What one configuration determines: the unit a reload will replace. The store is not in
/// it: stored responses outlive a configuration.
///
pub struct Runtime {
    /// The configuration the parts were built from.
    pub config: Arc<Config>,
    /// The request path over this configuration's sites, origin clients and locator.
    pub proxy: Arc<Proxy>,
}

/// Builds the parts one configuration determines over the long-lived `store` and `metrics`: the origin
/// clients (DNS resolver and TLS roots shared among them), the geo locator, and the proxy.
/// Nothing is bound or spawned, and no origin is connected to.
pub fn build_runtime(
    config: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<Runtime, Error> {
    build_member_runtime(config, store, metrics, None)
}

/// [`build_runtime`] for a member of `fleet` (`[cluster]`).
fn build_member_runtime(
    config: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
    fleet: Option<Arc<Fleet>>,
) -> Result<Runtime, Error> {
    let origins = origin_clients(&config)?;
    let locator = locator(&config);
    let proxy = Proxy::new(config.clone(), store, metrics, origins, locator);
    let proxy = Arc::new(match fleet {
        Some(f) => proxy.with_fleet(f),
        None => proxy,
    });
    Ok(Runtime { config, proxy })
}

/// One pooled client per configured origin, in configuration order. The resolver is built
/// strictly (its system configuration must load) only when some origin is named by a host
/// name; the system's trust anchors are loaded only when some origin uses https.
fn origin_clients(config: &Config) -> Result<Vec<OriginClient>, origin::Error> {
    origin_clients_reusing(config, |_| None)
}

/// As [`origin_clients`], with origin `i`'s client taken from `reuse(i)` where it gives one
/// (a reload keeps an unchanged origin's client and its pooled connections).
fn origin_clients_reusing(
    config: &Config,
    reuse: impl Fn(usize) -> Option<OriginClient>,
) -> Result<Vec<OriginClient>, origin::Error> {
    let reused: Vec<Option<OriginClient>> = (0..config.origins.len()).map(reuse).collect();
    let new = |i: usize| reused[i].is_none();
    let names_used = config.origins.iter().enumerate().any(|(i, o)| {
        new(i)
            && o.authority.host().parse::<std::net::IpAddr>().is_err()
            && !o.authority.host().starts_with('[')
    });
    let resolver = origin::dns::Resolver::new(&config.dns, names_used)?;
    let roots = if config
        .origins
        .iter()
        .enumerate()
        .any(|(i, o)| new(i) && o.scheme == http::uri::Scheme::HTTPS)
    {
        origin::system_roots()
    } else {
        rustls::RootCertStore::empty()
    };
    config
        .origins
        .iter()
        .zip(reused)
        .map(|(o, kept)| match kept {
            Some(client) => Ok(client),
            None => OriginClient::new(o.clone(), resolver.clone(), &roots),
        })
        .collect()
}

/// The geo locator: `[geo]` networks, country header and database; proxies trusted by
/// `[server]` and `[geo]` alike; the configured client-address field.
pub(crate) fn locator(config: &Config) -> Locator {
    Locator::new(
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
    .with_address_header(config.server.client_address_header)
}

/// The peers `max_connections_per_client` does not count: the proxies trusted by `[server]`
/// and `[geo]`, whose connections carry many clients.
fn per_client_exempt(config: &Config) -> Vec<ipnet::IpNet> {
    let trusted = config.server.trusted_proxies.iter();
    trusted
        .chain(&config.geo.trusted_proxies)
        .copied()
        .collect()
}

/// Starts the active health checks of every origin of `proxy` that has them, as tasks of
/// their own; each ends when `stop` turns true (the node shuts down, or a reload replaced
/// the configuration they check for).
fn spawn_health_checks(proxy: &Arc<Proxy>, stop: &watch::Receiver<bool>) {
    for (i, o) in proxy.origins().iter().enumerate() {
        let Some(check) = o.config.health.clone() else {
            continue;
        };
        let proxy = proxy.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Some(client) = proxy.origins().get(i) {
                origin::health::run(client, proxy.origin_states(), i, &check, stop).await;
            }
        });
    }
}

/// Binds the configured listeners and starts serving. Port 0 binds an ephemeral port; the
/// bound addresses are on the returned [`Node`]. A configuration read from a file
/// ([`Config::load`]) can be reloaded from it ([`Node::reload`], SIGHUP, `POST /reload`).
pub async fn start(config: Config) -> Result<Node, Error> {
    let started = admin::Started::now();
    tracing::info!(
        version = crate::telemetry::build::VERSION,
        commit = crate::telemetry::build::COMMIT,
        profile = crate::telemetry::build::PROFILE,
        "starting edgecache"
    );
    let config = Arc::new(config);
    let store = Store::new(config.cache.memory);
    let metrics = Arc::new(Metrics::default());
    let (peer_stop, peer_stopped) = watch::channel(false);
    let (mut inherited, took_over) = inherit(&config).await;
    let cluster = start_cluster(&config, &peer_stopped, &mut inherited)?;
    let fleet = cluster.as_ref().map(|c| c.fleet.clone());
    let runtime = build_member_runtime(config.clone(), store, metrics.clone(), fleet)?;
    let proxy = runtime.proxy.clone();
    let tls = server::tls::server_config(&config.tls.certificates)?
        .map(|c| Arc::new(server::tls::LiveTls::new(c)));
    let (tx, rx) = watch::channel(false);
    let shared = Shared {
        proxy: Arc::new(Live::new(proxy.clone())),
        metrics: metrics.clone(),
        builders: Arc::new(ArcSwap::from_pointee(Builders::new(&config.server))),
        limit: Arc::new(Semaphore::new(config.server.max_connections)),
        per_client: Arc::new(server::limit::PerClient::new(
            config.server.max_connections_per_client,
            per_client_exempt(&config),
        )),
        tracker: ConnTracker::default(),
        shutdown: rx,
    };
    let mut accept = JoinSet::new();
    let http = bind_all(&config.server.http, upgrade::Kind::Http, &mut inherited)?;
    let https = bind_all(&config.server.https, upgrade::Kind::Https, &mut inherited)?;
    let http_addrs: Vec<SocketAddr> = http.iter().map(|(_, a)| *a).collect();
    let https_addrs: Vec<SocketAddr> = https.iter().map(|(_, a)| *a).collect();
    let mut listening = serve_data_listeners(&config, (http, https), &tls, &shared, &mut accept)?;
    if let Some(c) = cluster {
        if let Some(etcd) = c.etcd {
            run_etcd(etcd, &c.fleet, shared.proxy.clone(), peer_stopped.clone());
        }
        listening.push(serve_peer_listener(
            &config,
            c.listener,
            c.bound,
            &shared,
            &mut accept,
        )?);
    }
    let (health_stop, health) = watch::channel(false);
    spawn_health_checks(&proxy, &health);
    let (stopping, stopping_rx) = watch::channel(false);
    let reloader = Arc::new_cyclic(|me| Reloader {
        me: me.clone(),
        admin_base: (started, stopping_rx),
        admin_tasks: Mutex::new(JoinSet::new()),
        path: config.path.clone(),
        upgrade: config.server.upgrade_socket.is_some(),
        live: shared.proxy.clone(),
        tls: Mutex::new(tls),
        metrics,
        health: Mutex::new(health_stop),
        busy: Mutex::new(()),
        listening: Mutex::new(listening),
        admin: Mutex::new(None),
        peer_stop,
        accept: Mutex::new(accept),
        shared: shared.clone(),
        stamp: Mutex::new(admin::ConfigStamp {
            path: config.path.clone(),
            sha256: config.sha256.clone(),
            loaded_at: started.at,
            generation: 1,
        }),
    });
    if let Some(a) = &config.admin {
        let (l, bound) = bind_all(&[a.listen], upgrade::Kind::Admin, &mut inherited)?
            .pop()
            .ok_or(Error::Bind {
                addr: a.listen,
                source: std::io::Error::other("no listener"),
            })?;
        reloader.serve_admin(a, l, bound)?;
    }
    if inherited.unused() > 0 {
        tracing::info!(
            listeners = inherited.unused(),
            "listeners of the process before that this configuration does not name are closed"
        );
    }
    drop(inherited);
    let handed_over = offer_listeners(&config, reloader.clone());
    for a in &http_addrs {
        tracing::info!(addr = %a, "listening for HTTP");
    }
    for a in &https_addrs {
        tracing::info!(addr = %a, "listening for HTTPS");
    }
    Ok(Node {
        http: http_addrs,
        https: https_addrs,
        shutdown: tx,
        stopping,
        tracker: shared.tracker,
        reloader,
        handed_over,
        took_over,
    })
}

impl Node {
    /// Bound plain-HTTP addresses, in configuration order.
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http
    }

    /// Bound HTTPS addresses, in configuration order.
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https
    }

    /// The bound admin address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let admin = self
            .reloader
            .admin
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        admin.as_ref().map(|a| a.listening.bound)
    }

    /// The request counters.
    pub fn metrics(&self) -> &Metrics {
        &self.reloader.metrics
    }

    /// The node's cache store (for inspection in tests and admin).
    pub fn store(&self) -> Store {
        self.reloader.live.load().store().clone()
    }

    /// Reads `[geo] database` again: lookups use the new file from now on; on error the one
    /// in use stays. `Ok(None)` when no database is configured. (A reload reads it too.)
    pub fn reload_geo_database(&self) -> Result<Option<String>, String> {
        self.reloader.live.load().reload_geo()
    }

    /// Reads the configuration file again and swaps it in (what SIGHUP and `POST /reload`
    /// do); see [`Reloader`]. Blocking: it reads files. The error lists every problem.
    pub fn reload(&self) -> Result<String, String> {
        self.reloader.reload()
    }

    /// Completes when a new edgecache process has taken this node's listeners over (a binary
    /// upgrade through `server.upgrade_socket`): the node should then shut down, which drains
    /// its connections. Never completes without an upgrade socket.
    pub async fn handed_over(&self) {
        let mut rx = self.handed_over.clone();
        if rx.wait_for(|&h| h).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether this node took its listening sockets over from an edgecache running before it
    /// (a binary upgrade through `server.upgrade_socket`).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Whether the configuration came from a file that a reload can read again.
    pub fn reloadable(&self) -> bool {
        self.reloader.path.is_some()
    }

    /// The reload handle, to run a reload off the runtime's threads.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Open client connections.
    pub fn open_connections(&self) -> usize {
        self.tracker.open()
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_grace`, then
    /// returns. Connections still open when the grace period ends drop themselves
    /// (`server::conn`), so none is left holding a response. The admin listener keeps
    /// answering (`/readyz` with 503) until the drain is over.
    pub async fn shutdown(self) {
        // The configuration in service says how long (a reload may have changed it).
        let (grace, header_read) = {
            let proxy = self.reloader.live.load();
            let server = &proxy.config().server;
            (server.shutdown_grace, server.header_read_timeout)
        };
        // Not ready from the first moment: a load balancer polling `/readyz` stops sending
        // new connections while the listeners close, not only once the drain begins.
        let _ = self.stopping.send(true);
        let mut accept = self.reloader.stop_accepting();
        while accept.join_next().await.is_some() {}
        // A connection accepted just before the listeners closed may not have sent its
        // request yet, and a drained HTTP/1 connection with no request in progress is closed
        // unanswered. Its request follows its connect within a round trip: give it that
        // (`settle`, at most a second) before the drain. After a binary upgrade the new
        // process accepts everything from here on, so no client is refused or dropped.
        if self.tracker.open() > 0 {
            tokio::time::sleep(header_read.min(Duration::from_secs(1))).await;
        }
        let _ = self.shutdown.send(true);
        let open = self.tracker.open();
        if open > 0 {
            tracing::info!(connections = open, grace = ?grace, "draining connections");
        }
        if tokio::time::timeout(grace, self.tracker.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.tracker.open(),
                "shutdown grace expired with connections still open"
            );
        }
        self.reloader.stop_health();
        let mut admin = self.reloader.stop_admin();
        while admin.join_next().await.is_some() {}
    }
}

/// Listeners bound, each with the address it got.
type Bound = Vec<(TcpListener, SocketAddr)>;

/// The data listeners' accept loops spawned on `accept`, each listed for reloads and
/// upgrades (with the descriptor an upgrade hands over).
fn serve_data_listeners(
    config: &Config,
    (http, https): (Bound, Bound),
    tls: &Option<Arc<server::tls::LiveTls>>,
    shared: &Shared,
    accept: &mut JoinSet<()>,
) -> Result<Vec<Listening>, Error> {
    let mut listening = Vec::new();
    let listeners = http
        .into_iter()
        .zip(&config.server.http)
        .map(|(l, &c)| (l, c, upgrade::Kind::Http, None))
        .chain(
            https
                .into_iter()
                .zip(&config.server.https)
                .map(|(l, &c)| (l, c, upgrade::Kind::Https, tls.clone())),
        );
    for ((l, bound), configured, kind, tls) in listeners {
        let (stop, stopped) = watch::channel(false);
        let fd = handover_fd(config.server.upgrade_socket.is_some(), &l, bound)?;
        accept.spawn(server::accept_loop(l, tls, shared.clone(), stopped));
        listening.push(Listening {
            kind,
            configured,
            bound,
            stop,
            fd,
        });
    }
    Ok(listening)
}

/// The peer listener's accept loop spawned on `accept`, listed with the data listeners: it
/// stops accepting with them, and an upgrade takes it over with them.
fn serve_peer_listener(
    config: &Config,
    listener: TcpListener,
    bound: SocketAddr,
    shared: &Shared,
    accept: &mut JoinSet<()>,
) -> Result<Listening, Error> {
    let (stop, stopped) = watch::channel(false);
    let fd = handover_fd(config.server.upgrade_socket.is_some(), &listener, bound)?;
    accept.spawn(server::peer_accept_loop(listener, shared.clone(), stopped));
    Ok(Listening {
        kind: upgrade::Kind::Peer,
        configured: config.cluster.as_ref().map_or(bound, |k| k.listen),
        bound,
        stop,
        fd,
    })
}

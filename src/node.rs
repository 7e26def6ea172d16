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

/// `[cluster]` at start: the fleet, its peer listener, and with `cluster.etcd` the etcd task
/// to run once the proxy is in service (it applies other members' purges through it).
struct ClusterStart {
    fleet: Arc<Fleet>,
    listener: TcpListener,
    bound: SocketAddr,
    etcd: Option<cluster::etcd::Etcd>,
}

/// `[cluster]`: the peer listener bound, and the fleet with its members found as configured
/// (a static list is set here; DNS is followed by a task until `stop`; etcd is prepared
/// here, its publisher set on the fleet, and run by [`run_etcd`]).
fn start_cluster(
    config: &Config,
    stop: &watch::Receiver<bool>,
    inherited: &mut upgrade::Inherited,
) -> Result<Option<ClusterStart>, Error> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    let addr = c.listen;
    let (l, bound) = bind_all(&[addr], upgrade::Kind::Peer, inherited)?
        .pop()
        .ok_or(Error::Bind {
            addr,
            source: std::io::Error::other("no listener"),
        })?;
    // Left to `listen` with port 0 (tests): the bound port is what peers dial.
    let advertise = if c.advertise.port() == 0 {
        SocketAddr::new(c.advertise.ip(), bound.port())
    } else {
        c.advertise
    };
    let this = Member {
        id: Arc::from(c.node.as_str()),
        address: advertise,
        since: std::time::SystemTime::now(),
    };
    let membership = Membership::new(this.clone());
    let mut etcd = None;
    match &c.discovery {
        Discovery::Peers(peers) => {
            membership.set(static_members(&this, peers));
        }
        Discovery::PeersDns { name, port } => {
            let resolver =
                origin::dns::Resolver::new(&config.dns, true).map_err(origin::Error::from)?;
            tokio::spawn(cluster::dns::follow(
                resolver,
                name.clone(),
                *port,
                this.clone(),
                membership.clone(),
                stop.clone(),
            ));
        }
        Discovery::Etcd(endpoints) => {
            etcd = Some(cluster::etcd::Etcd::new(cluster::etcd::EtcdSettings {
                endpoints: endpoints.clone(),
                name: c.name.clone(),
                node: c.node.clone(),
                advertise,
                lease_ttl: c.lease_ttl,
            }));
        }
    }
    let fleet = Fleet::new(c.clone(), advertise, membership);
    let etcd = etcd.map(|(etcd, publisher)| {
        fleet.set_publisher(Arc::new(publisher));
        fleet.set_etcd(etcd.status());
        etcd
    });
    tracing::info!(addr = %bound, node = %c.node, fleet = %c.name, discovery = c.discovery.kind(), "peer listener open");
    Ok(Some(ClusterStart {
        fleet,
        listener: l,
        bound,
        etcd,
    }))
}

/// Runs the etcd task until `stop`: it keeps the fleet's membership from etcd and applies
/// other members' purges to the proxy in service.
fn run_etcd(
    etcd: cluster::etcd::Etcd,
    fleet: &Fleet,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
) {
    let apply = Arc::new(move |purge: cluster::Purge| {
        let n = live.load().purge_from_fleet(&purge);
        tracing::info!(purge = ?purge.target, soft = purge.soft, from = %purge.node, purged = n, "purge from the fleet");
    });
    tokio::spawn(etcd.run(fleet.membership().clone(), apply, stop));
}

/// A static peer list as members: this node by its id, the others by their address (all
/// that a list says of them; ownership goes by address, which every node knows alike).
fn static_members(this: &Member, peers: &[SocketAddr]) -> Vec<Member> {
    peers
        .iter()
        .map(|&address| {
            if address == this.address {
                this.clone()
            } else {
                Member {
                    id: Arc::from(address.to_string()),
                    address,
                    since: this.since,
                }
            }
        })
        .collect()
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

/// A listener for every address of `addrs`, in order, with its bound address: the one the
/// process before handed over for it (a binary upgrade), else bound here.
fn bind_all(
    addrs: &[SocketAddr],
    kind: upgrade::Kind,
    inherited: &mut upgrade::Inherited,
) -> Result<Vec<(TcpListener, SocketAddr)>, Error> {
    addrs
        .iter()
        .map(|&addr| {
            let l = match inherited.take(kind, addr) {
                Some(l) => l,
                None => server::bind(addr),
            }
            .map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Ok((l, bound))
        })
        .collect()
}

/// With `server.upgrade_socket`: the listeners of the process running before, if one answers
/// there (a binary upgrade). Without an answer, none: everything is bound anew.
/// The flag says whether there was one.
async fn inherit(config: &Config) -> (upgrade::Inherited, bool) {
    let Some(path) = &config.server.upgrade_socket else {
        return (upgrade::Inherited::default(), false);
    };
    match upgrade::take_over(path).await {
        Ok(Some(inherited)) => {
            tracing::info!(socket = %path.display(), "took the listening sockets over from the running edgecache");
            (inherited, true)
        }
        Ok(None) => (upgrade::Inherited::default(), false),
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "upgrade socket: no listeners taken over; binding them anew");
            (upgrade::Inherited::default(), false)
        }
    }
}

/// A duplicate of `l`'s descriptor, kept to hand the listener to the next process when
/// `keep` (the node has an upgrade socket). Dropped with the listener's entry when a reload
/// closes it, so a closed listener is not held open for an upgrade.
fn handover_fd(keep: bool, l: &TcpListener, bound: SocketAddr) -> Result<Option<OwnedFd>, Error> {
    if !keep {
        return Ok(None);
    }
    l.as_fd()
        .try_clone_to_owned()
        .map(Some)
        .map_err(|source| Error::Bind {
            addr: bound,
            source,
        })
}

/// With `server.upgrade_socket`: offers the node's listeners to the next process there, as
/// they are when it asks (those a reload opened included, those it closed not). The receiver
/// turns true once they are handed over (the node should then drain and stop).
fn offer_listeners(config: &Config, reloader: Arc<Reloader>) -> watch::Receiver<bool> {
    let (done, handed) = watch::channel(false);
    let Some(path) = config.server.upgrade_socket.clone() else {
        return handed;
    };
    tokio::spawn(async move {
        match upgrade::offer(&path, || reloader.handover()).await {
            Ok(()) => {
                tracing::info!("listening sockets handed to a new edgecache: draining");
                let _ = done.send(true);
            }
            Err(e) => {
                tracing::error!(socket = %path.display(), error = %e, "upgrade socket unusable: a new process cannot take the listeners over");
                // Kept open (never true) so the node is not told to stop.
                std::future::pending::<()>().await;
            }
        }
    });
    handed
}

/// The admin listener in service: the listener (its stop ends the accept loop; its
/// descriptor is what an upgrade takes over) and the state its requests see.
struct AdminRun {
    listening: Listening,
    state: Arc<admin::AdminState>,
}

/// What a reload does to the admin listener, decided before anything is swapped (binding a
/// new address can fail and refuse the reload).
enum AdminChange {
    /// No `[admin]` before or after.
    None,
    /// Same address: the new settings (token, public metrics, purge networks) swapped in.
    Update(crate::config::Admin),
    /// A new address, or `[admin]` added: this listener replaces the one in service, if any.
    Open(crate::config::Admin, TcpListener, SocketAddr),
    /// `[admin]` removed.
    Close,
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
    if let Some(c) = cluster {
        if let Some(etcd) = c.etcd {
            run_etcd(etcd, &c.fleet, shared.proxy.clone(), peer_stopped.clone());
        }
        // Listed with the data listeners: it stops accepting with them, and an upgrade takes
        // it over with them.
        let (stop, stopped) = watch::channel(false);
        let fd = handover_fd(config.server.upgrade_socket.is_some(), &c.listener, c.bound)?;
        accept.spawn(server::peer_accept_loop(
            c.listener,
            shared.clone(),
            stopped,
        ));
        listening.push(Listening {
            kind: upgrade::Kind::Peer,
            configured: config.cluster.as_ref().map_or(c.bound, |k| k.listen),
            bound: c.bound,
            stop,
            fd,
        });
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

/// Swaps in a new configuration while the node serves: SIGHUP and `POST /reload` run it.
///
/// What the new file says applies to requests that start after the swap (sites, routes,
/// pools, origins, rules, cache settings, geo, request rates, certificates for new
/// handshakes); requests in flight finish on the proxy they began with. The store, the
/// metrics and fetches in flight are carried over whole; a changed `cache.memory` resizes
/// the store ([`Store::resized`]). An origin with the same name and URL keeps its state
/// (latency, health, ejection, counts), and when none of its settings changed also its
/// client with the pooled connections; a removed origin's connections close as its last
/// requests end. Listeners the file adds are opened (before anything is swapped: one that
/// cannot be bound refuses the reload; HTTPS ones turn TLS on) and those it drops stop
/// accepting. New connections get the new `[server]` limits and timeouts. `[admin]` applies
/// to the next admin request, on a new listener when its address changed. `workers`,
/// `upgrade_socket` and `[log]` are set at start: a change to them is reported and waits for
/// a restart.
pub struct Reloader {
    path: Option<std::path::PathBuf>,
    /// Whether the node started with an upgrade socket (listeners are then kept to hand over).
    upgrade: bool,
    live: Arc<Live>,
    /// The certificates in service; `None` while no configuration had any (no HTTPS).
    tls: Mutex<Option<Arc<server::tls::LiveTls>>>,
    metrics: Arc<Metrics>,
    /// Stops the health checks of the configuration in service (a reload starts new ones).
    health: Mutex<watch::Sender<bool>>,
    /// One reload at a time.
    busy: Mutex<()>,
    /// The data listeners, each with what stops its accept loop.
    listening: Mutex<Vec<Listening>>,
    /// The admin listener in service, with `[admin]`.
    admin: Mutex<Option<AdminRun>>,
    /// The admin listeners' accept loops (a reload may add one), joined at shutdown.
    admin_tasks: Mutex<JoinSet<()>>,
    /// What every admin listener's state shares: the start time, and the flag set when the
    /// node begins to shut down (`/readyz` then answers 503).
    admin_base: (admin::Started, watch::Receiver<bool>),
    /// This reloader, for the admin state a reload makes (it reloads and reports through it).
    me: std::sync::Weak<Reloader>,
    /// Stops the peer listener and the fleet's discovery (`[cluster]`).
    peer_stop: watch::Sender<bool>,
    /// The accept loops (a reload adds some), joined at shutdown.
    accept: Mutex<JoinSet<()>>,
    /// What a new accept loop shares with the others.
    shared: Shared,
    /// The configuration in service, for `/status`.
    stamp: Mutex<admin::ConfigStamp>,
}

/// One open data listener.
struct Listening {
    kind: upgrade::Kind,
    /// Its address as configured (port 0 included): what a reload compares.
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    /// What is handed to the next process in a binary upgrade ([`handover_fd`]).
    fd: Option<OwnedFd>,
}

impl admin::Reload for Reloader {
    fn reload(&self) -> Result<String, String> {
        Reloader::reload(self)
    }
}

impl admin::NodeStatus for Reloader {
    fn config_stamp(&self) -> admin::ConfigStamp {
        self.stamp.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        open.iter()
            .map(|l| {
                let kind = match l.kind {
                    upgrade::Kind::Http => "http",
                    upgrade::Kind::Https => "https",
                    upgrade::Kind::Admin => "admin",
                    upgrade::Kind::Peer => "peer",
                };
                (kind, l.bound)
            })
            .collect()
    }
}

impl Reloader {
    /// Reads the configuration file again and swaps it in; on any problem the running
    /// configuration stays and every problem is returned, one `FILE:LINE:COLUMN: key:
    /// message` per line. Counted in `edgecache_config_reloads_total`; logged either way.
    pub fn reload(&self) -> Result<String, String> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        crate::notify::reloading();
        let result = match &self.path {
            None => Err("no configuration file to read: the node was started without one".into()),
            Some(path) => Config::load(path)
                .map_err(|e| e.to_string())
                .and_then(|config| {
                    // A reloaded file warns as `run` does at start (see `config::validate`).
                    for w in &config.warnings {
                        tracing::warn!(warning = %w, "configuration");
                    }
                    self.apply(config).map_err(|e| e.to_string())
                }),
        };
        self.metrics.config_reload(result.is_ok());
        // Serving again, on the new configuration or the one kept.
        crate::notify::ready();
        match &result {
            Ok(done) => tracing::info!(changes = %done, "configuration reloaded"),
            Err(problems) => {
                for line in problems.lines() {
                    tracing::error!(problem = %line, "configuration reload refused; the running configuration stays");
                }
            }
        }
        result
    }

    /// Swaps in `config` (validated): builds the next proxy beside the running one, then
    /// swaps the proxy and the certificates and moves the health checks over. Says what
    /// changed, and what waits for a restart.
    pub fn apply(&self, config: Config) -> Result<String, Error> {
        let old = self.live.load();
        let config = Arc::new(config);
        let before = old.config();
        // An origin is the same one when its name and URL are: it keeps its state; its
        // client (and pooled connections) only when nothing else about it changed either.
        let same = |i: usize| {
            let o = &config.origins[i];
            before.origins.iter().position(|p| {
                p.name == o.name && p.scheme == o.scheme && p.authority == o.authority
            })
        };
        // Every setting compared through its Debug text (certificates and client keys have
        // no equality of their own).
        let unchanged = |i: usize| {
            same(i).filter(|&j| {
                format!("{:?}", before.origins[j]) == format!("{:?}", config.origins[i])
            })
        };
        let origins = origin_clients_reusing(&config, |i| {
            unchanged(i).and_then(|j| old.origins().get(j).cloned())
        })?;
        let states = old.origin_states().carried(config.origins.len(), same);
        let tls = server::tls::server_config(&config.tls.certificates)?;
        let opened = self.open_listeners(&config)?;
        let admin_change = self.plan_admin(&config)?;
        // Nothing fails from here on: the reload is applied whole.
        let store = match old.store() {
            s if s.capacity() == config.cache.memory => s.clone(),
            s => s.resized(config.cache.memory),
        };
        let proxy =
            Arc::new(old.reconfigured(config.clone(), store, origins, states, locator(&config)));
        let kept = (0..config.origins.len())
            .filter(|&i| same(i).is_some())
            .count();
        let mut done = format!(
            "{} sites, {} origins ({kept} kept with their state), {} certificates",
            config.sites.len(),
            config.origins.len(),
            config.tls.certificates.len()
        );
        if before.cache.memory != config.cache.memory {
            done.push_str(&format!(
                "; cache resized from {} to {} bytes",
                before.cache.memory, config.cache.memory
            ));
        }
        let waiting = restart_only(before, &config);
        if !waiting.is_empty() {
            done.push_str(&format!(
                "; not applied until a restart: {}",
                waiting.join(", ")
            ));
        }
        if let Some(new) = tls {
            let mut live = self.tls.lock().unwrap_or_else(|p| p.into_inner());
            match &*live {
                Some(live) => live.store(new),
                // TLS turned on: HTTPS listeners opened below serve these.
                None => *live = Some(Arc::new(server::tls::LiveTls::new(new))),
            }
        }
        self.live.store(proxy.clone());
        self.apply_connection_settings(before, &config);
        {
            let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
            *stamp = admin::ConfigStamp {
                path: config.path.clone(),
                sha256: config.sha256.clone(),
                loaded_at: std::time::SystemTime::now(),
                generation: stamp.generation + 1,
            };
        }
        let (added, removed) = self.swap_listeners(opened, &config);
        if let Some(what) = self.apply_admin(admin_change)? {
            done.push_str("; ");
            done.push_str(what);
        }
        if added + removed > 0 {
            done.push_str(&format!("; listeners: {added} opened, {removed} closed"));
        }
        let (stop, health) = watch::channel(false);
        let previous = std::mem::replace(
            &mut *self.health.lock().unwrap_or_else(|p| p.into_inner()),
            stop,
        );
        let _ = previous.send(true);
        spawn_health_checks(&proxy, &health);
        Ok(done)
    }

    /// New connections get the new `[server]` limits and timeouts; open ones keep the
    /// timeouts they were accepted with and stay counted against the limits.
    fn apply_connection_settings(&self, before: &Config, after: &Config) {
        let (a, b) = (&before.server, &after.server);
        if a.max_connections != b.max_connections {
            server::resize_limit(&self.shared.limit, a.max_connections, b.max_connections);
        }
        self.shared
            .per_client
            .set(b.max_connections_per_client, per_client_exempt(after));
        self.shared
            .builders
            .store(Arc::new(Builders::new(&after.server)));
    }

    /// Binds what the new configuration lists and no listener has yet (before anything is
    /// swapped: an address that cannot be bound refuses the reload). HTTPS listeners only
    /// when TLS was on at start.
    fn open_listeners(&self, config: &Config) -> Result<Vec<(Listening, TcpListener)>, Error> {
        let open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted: Vec<(upgrade::Kind, SocketAddr)> = config
            .server
            .http
            .iter()
            .map(|&a| (upgrade::Kind::Http, a))
            .collect();
        if !config.tls.certificates.is_empty() {
            wanted.extend(
                config
                    .server
                    .https
                    .iter()
                    .map(|&a| (upgrade::Kind::Https, a)),
            );
        }
        let mut opened = Vec::new();
        for (kind, addr) in wanted {
            if open.iter().any(|l| l.kind == kind && l.configured == addr) {
                continue;
            }
            let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            let (stop, _) = watch::channel(false);
            let listening = Listening {
                kind,
                configured: addr,
                bound,
                stop,
                fd: handover_fd(self.upgrade, &l, bound)?,
            };
            opened.push((listening, l));
        }
        Ok(opened)
    }

    /// Starts accepting on the listeners `open_listeners` bound, and stops the ones the new
    /// configuration no longer lists (their connections go on until they end). Returns how
    /// many were opened and closed.
    fn swap_listeners(
        &self,
        opened: Vec<(Listening, TcpListener)>,
        config: &Config,
    ) -> (usize, usize) {
        let mut open = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let listed = |l: &Listening| match l.kind {
            upgrade::Kind::Http => config.server.http.contains(&l.configured),
            upgrade::Kind::Https => config.server.https.contains(&l.configured),
            upgrade::Kind::Admin | upgrade::Kind::Peer => true,
        };
        let before = open.len();
        open.retain(|l| {
            let keep = listed(l);
            if !keep {
                tracing::info!(addr = %l.bound, "listener closed by the reload");
                let _ = l.stop.send(true);
            }
            keep
        });
        let removed = before - open.len();
        let added = opened.len();
        let mut accept = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        for (listening, l) in opened {
            let tls = match listening.kind {
                upgrade::Kind::Https => self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                _ => None,
            };
            let stopped = listening.stop.subscribe();
            accept.spawn(server::accept_loop(l, tls, self.shared.clone(), stopped));
            tracing::info!(addr = %listening.bound, "listener opened by the reload");
            open.push(listening);
        }
        (added, removed)
    }

    /// The listeners to hand to a new process, as they are now: each with a duplicate of its
    /// descriptor, and its bound address.
    fn handover(&self) -> Vec<(upgrade::Handed, SocketAddr)> {
        let listening = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        let admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        listening
            .iter()
            .chain(admin.iter().map(|a| &a.listening))
            .filter_map(|l| {
                let fd = l.fd.as_ref()?.try_clone().ok()?;
                Some((
                    upgrade::Handed {
                        kind: l.kind,
                        configured: l.configured,
                        fd,
                    },
                    l.bound,
                ))
            })
            .collect()
    }

    /// Serves the admin endpoints on `l` (bound at `bound`) with `admin`'s settings, in place
    /// of the admin listener in service if any (which stops accepting; its connections
    /// finish). Warns about a non-loopback address and a missing token.
    fn serve_admin(
        &self,
        admin: &crate::config::Admin,
        l: TcpListener,
        bound: SocketAddr,
    ) -> Result<(), Error> {
        if !bound.ip().is_loopback() {
            tracing::warn!(
                addr = %bound,
                "admin listen address is not loopback: the admin endpoints are reachable \
                 from other hosts"
            );
        }
        if admin.token.is_none() {
            tracing::warn!(
                public_metrics = admin.public_metrics,
                "no admin token is configured: admin endpoints other than /healthz, /readyz \
                 and public metrics are refused"
            );
        }
        let fd = handover_fd(self.upgrade, &l, bound)?;
        let me = self.me.upgrade().ok_or(Error::Bind {
            addr: bound,
            source: std::io::Error::other("the node is shutting down"),
        })?;
        let reload: Option<Arc<dyn admin::Reload>> = match self.path {
            Some(_) => Some(me.clone()),
            None => None,
        };
        let (started, draining) = self.admin_base.clone();
        let state = Arc::new(admin::AdminState {
            config: ArcSwap::from_pointee(admin.clone()),
            proxy: self.live.clone(),
            reload,
            metrics: self.metrics.clone(),
            tracker: self.shared.tracker.clone(),
            draining,
            node: me,
            started,
            admin_addr: bound,
        });
        let (stop, stopped) = watch::channel(false);
        let builders = self.shared.builders.load_full();
        self.admin_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(admin::serve(l, state.clone(), builders, stopped));
        tracing::info!(addr = %bound, "admin listening (metrics, health, status, origins, cache, purge, reload)");
        let run = AdminRun {
            listening: Listening {
                kind: upgrade::Kind::Admin,
                configured: admin.listen,
                bound,
                stop,
                fd,
            },
            state,
        };
        let old = self
            .admin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(run);
        if let Some(old) = old {
            tracing::info!(addr = %old.listening.bound, "admin listener closed by the reload");
            let _ = old.listening.stop.send(true);
        }
        Ok(())
    }

    /// What the reload to `after` does to the admin listener; binds a new address here, so
    /// that one that cannot be bound refuses the reload before anything is swapped.
    fn plan_admin(&self, after: &Config) -> Result<AdminChange, Error> {
        let running = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let configured = running.as_ref().map(|a| a.listening.configured);
        Ok(match (&after.admin, configured) {
            (None, None) => AdminChange::None,
            (None, Some(_)) => AdminChange::Close,
            (Some(a), Some(listen)) if listen == a.listen => AdminChange::Update(a.clone()),
            (Some(a), _) => {
                let addr = a.listen;
                let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                AdminChange::Open(a.clone(), l, bound)
            }
        })
    }

    /// Carries out what [`Reloader::plan_admin`] decided; says what it did.
    fn apply_admin(&self, change: AdminChange) -> Result<Option<&'static str>, Error> {
        Ok(match change {
            AdminChange::None => None,
            AdminChange::Update(a) => {
                let running = self.admin.lock().unwrap_or_else(|p| p.into_inner());
                let run = running.as_ref();
                let before = run.map(|r| r.state.config.load_full());
                if before.as_deref().map(|b| format!("{b:?}")) == Some(format!("{a:?}")) {
                    return Ok(None);
                }
                if let Some(r) = run {
                    r.state.config.store(Arc::new(a));
                }
                Some("admin settings swapped in")
            }
            AdminChange::Open(a, l, bound) => {
                self.serve_admin(&a, l, bound)?;
                Some("admin listener opened")
            }
            AdminChange::Close => {
                if let Some(old) = self.admin.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    tracing::info!(addr = %old.listening.bound, "admin listener closed by the reload");
                    let _ = old.listening.stop.send(true);
                }
                Some("admin listener closed")
            }
        })
    }

    /// Stops the admin listener (the node has drained); returns its tasks to be joined.
    fn stop_admin(&self) -> JoinSet<()> {
        if let Some(run) = self.admin.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = run.listening.stop.send(true);
        }
        std::mem::take(&mut *self.admin_tasks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops every accept loop; returns them to be joined.
    fn stop_accepting(&self) -> JoinSet<()> {
        for l in self
            .listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = l.stop.send(true);
        }
        let _ = self.peer_stop.send(true);
        std::mem::take(&mut *self.accept.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops the health checks (the node shuts down).
    fn stop_health(&self) {
        let _ = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(true);
    }
}

/// The settings a running node cannot change, named when a reload changes them.
fn restart_only(before: &Config, after: &Config) -> Vec<&'static str> {
    let (a, b) = (&before.server, &after.server);
    let mut out = Vec::new();
    if a.workers != b.workers {
        out.push("server.workers");
    }
    if a.upgrade_socket != b.upgrade_socket {
        out.push("server.upgrade_socket");
    }
    if let (Some(a), Some(b)) = (&before.admin, &after.admin) {
        if a.listen == b.listen && a.max_connections != b.max_connections {
            out.push("admin.max_connections (on the same address)");
        }
    }
    // Log files are opened once, before the runtime starts; SIGUSR1 reopens those paths.
    if before.log != after.log {
        out.push("[log]");
    }
    // The peer listener, the membership source and this node's id are set up once.
    if before.cluster != after.cluster {
        out.push("[cluster]");
    }
    out
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

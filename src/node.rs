//! The node: wires every other module together. [`start`] builds the store, the origin
//! clients (with their DNS resolver and TLS roots), the geo locator and the proxy, binds the
//! listeners, spawns the accept loops, the admin listener and the origin health checks, and
//! returns a [`Node`] that owns shutdown.
//!
//! This is the only module that knows every other one; none of them imports it. What one
//! configuration determines (sites, origin clients, the locator, the proxy over them) is built
//! by [`build_runtime`] from a `Config` and the parts that outlive a configuration (the store),
//! so that a reload can build a new [`Runtime`] beside the running one and swap it whole.
//! Reload itself is not here yet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::telemetry::metrics::Metrics;

use crate::admin;
use crate::cache::Store;
use crate::config::Config;
use crate::error::Error;
use crate::geo::Locator;
use crate::origin::{self, OriginClient};
use crate::proxy::Proxy;
use crate::server::{self, conn::Builders, ConnTracker, Shared};

/// A running edgecache node.
pub struct Node {
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    accept: JoinSet<()>,
    /// The admin listener's task, stopped after the drain (it answers `/readyz` with 503
    /// while the node drains).
    admin_task: JoinSet<()>,
    admin_stop: watch::Sender<bool>,
    tracker: ConnTracker,
    grace: Duration,
    runtime: Runtime,
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
    let origins = origin_clients(&config)?;
    let locator = locator(&config);
    let proxy = Arc::new(Proxy::new(config.clone(), store, metrics, origins, locator));
    Ok(Runtime { config, proxy })
}

/// One pooled client per configured origin, in configuration order. The resolver is built
/// strictly (its system configuration must load) only when some origin is named by a host
/// name; the system's trust anchors are loaded only when some origin uses https.
fn origin_clients(config: &Config) -> Result<Vec<OriginClient>, origin::Error> {
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
    config
        .origins
        .iter()
        .map(|o| OriginClient::new(o.clone(), resolver.clone(), &roots))
        .collect()
}

/// The geo locator: `[geo]` networks, country header and database; proxies trusted by
/// `[server]` and `[geo]` alike; the configured client-address field.
fn locator(config: &Config) -> Locator {
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

/// Starts the active health checks of every origin that has them; each task ends when
/// `shutdown` turns true.
fn spawn_health_checks(
    proxy: &Arc<Proxy>,
    tasks: &mut JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) {
    for (i, o) in proxy.origins().iter().enumerate() {
        let Some(check) = o.config.health.clone() else {
            continue;
        };
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Some(client) = proxy.origins().get(i) {
                origin::health::run(client, proxy.origin_states(), i, &check, shutdown).await;
            }
        });
    }
}

/// Binds every address of `addrs`, in order: the listeners and their bound addresses.
fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<(TcpListener, SocketAddr)>, Error> {
    addrs
        .iter()
        .map(|&addr| {
            let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Ok((l, bound))
        })
        .collect()
}

/// The admin listener, when `[admin]` is configured: its bound address, its task, and the
/// sender that stops it.
struct AdminListener {
    addr: Option<SocketAddr>,
    task: JoinSet<()>,
    stop: watch::Sender<bool>,
}

/// Binds and spawns the admin listener (or nothing without `[admin]`), warning about a
/// non-loopback address and a missing token.
fn start_admin(
    config: &Config,
    proxy: &Arc<Proxy>,
    shared: &Shared,
) -> Result<AdminListener, Error> {
    let mut task = JoinSet::new();
    let (stop, stopped) = watch::channel(false);
    let Some(admin) = &config.admin else {
        return Ok(AdminListener {
            addr: None,
            task,
            stop,
        });
    };
    let addr = admin.listen;
    let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let bound = l
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
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
    let state = Arc::new(admin::AdminState {
        config: admin.clone(),
        proxy: proxy.clone(),
        metrics: shared.metrics.clone(),
        tracker: shared.tracker.clone(),
        capacity: config.cache.memory,
        draining: shared.shutdown.clone(),
    });
    task.spawn(admin::serve(l, state, shared.builders.clone(), stopped));
    tracing::info!(addr = %bound, "admin listening (metrics, health, origins, purge)");
    Ok(AdminListener {
        addr: Some(bound),
        task,
        stop,
    })
}

/// Binds the configured listeners and starts serving. Port 0 binds an ephemeral port; the
/// bound addresses are on the returned [`Node`].
pub async fn start(config: Config) -> Result<Node, Error> {
    let config = Arc::new(config);
    let store = Store::new(config.cache.memory);
    let metrics = Arc::new(Metrics::default());
    let runtime = build_runtime(config.clone(), store, metrics.clone())?;
    let proxy = runtime.proxy.clone();
    let tls = server::tls::server_config(&config.tls.certificates)?.map(TlsAcceptor::from);
    let (tx, rx) = watch::channel(false);
    let shared = Shared {
        proxy: proxy.clone(),
        metrics,
        builders: Arc::new(Builders::new(&config.server)),
        limit: Arc::new(Semaphore::new(config.server.max_connections)),
        per_client: config.server.max_connections_per_client.map(|max| {
            let trusted = config.server.trusted_proxies.iter();
            let exempt = trusted.chain(&config.geo.trusted_proxies).copied();
            Arc::new(server::limit::PerClient::new(max, exempt.collect()))
        }),
        tracker: ConnTracker::default(),
        shutdown: rx,
    };
    let mut accept = JoinSet::new();
    let http = bind_all(&config.server.http)?;
    let https = bind_all(&config.server.https)?;
    let http_addrs: Vec<SocketAddr> = http.iter().map(|(_, a)| *a).collect();
    let https_addrs: Vec<SocketAddr> = https.iter().map(|(_, a)| *a).collect();
    let listeners = http
        .into_iter()
        .map(|(l, _)| (l, None))
        .chain(https.into_iter().map(|(l, _)| (l, tls.clone())));
    for (l, tls) in listeners {
        accept.spawn(server::accept_loop(l, tls, shared.clone()));
    }
    spawn_health_checks(&proxy, &mut accept, &shared.shutdown);
    let admin = start_admin(&config, &proxy, &shared)?;
    for a in &http_addrs {
        tracing::info!(addr = %a, "listening for HTTP");
    }
    for a in &https_addrs {
        tracing::info!(addr = %a, "listening for HTTPS");
    }
    Ok(Node {
        http: http_addrs,
        https: https_addrs,
        admin: admin.addr,
        shutdown: tx,
        accept,
        admin_task: admin.task,
        admin_stop: admin.stop,
        tracker: shared.tracker,
        grace: config.server.shutdown_grace,
        runtime,
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
        self.admin
    }

    /// The request counters.
    pub fn metrics(&self) -> &Metrics {
        self.runtime.proxy.metrics()
    }

    /// The node's cache store (for inspection in tests and admin).
    pub fn store(&self) -> &Store {
        self.runtime.proxy.store()
    }

    /// Reads `[geo] database` again (what SIGHUP does): lookups use the new file from now on;
    /// on error the one in use stays. `Ok(None)` when no database is configured.
    pub fn reload_geo_database(&self) -> Result<Option<String>, String> {
        self.runtime.proxy.reload_geo()
    }

    /// Open client connections.
    pub fn open_connections(&self) -> usize {
        self.tracker.open()
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_grace`, then
    /// returns. Connections still open when the grace period ends drop themselves
    /// (`server::conn`), so none is left holding a response. The admin listener keeps
    /// answering (`/readyz` with 503) until the drain is over.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.accept.join_next().await.is_some() {}
        let open = self.tracker.open();
        if open > 0 {
            tracing::info!(connections = open, grace = ?self.grace, "draining connections");
        }
        if tokio::time::timeout(self.grace, self.tracker.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.tracker.open(),
                "shutdown grace expired with connections still open"
            );
        }
        let _ = self.admin_stop.send(true);
        while self.admin_task.join_next().await.is_some() {}
    }
}

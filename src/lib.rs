//! edgecache: an edge caching reverse proxy.
//!
//! [`start`] binds every configured listener and serves until [`Node::shutdown`]. See
//! ARCHITECTURE.md for the module map and the path of a request.

pub mod admin;
pub mod cache;
pub mod config;
pub mod demo;
mod error;
pub mod geo;
pub mod origin;
pub mod proxy;
pub mod server;
pub mod telemetry;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use config::Config;
pub use error::Error;

use cache::Store;
use proxy::Proxy;
use server::{conn::Builders, ConnTracker, Shared};

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
    proxy: Arc<Proxy>,
}

/// Binds the configured listeners and starts serving. Port 0 binds an ephemeral port; the
/// bound addresses are on the returned [`Node`].
pub async fn start(config: Config) -> Result<Node, Error> {
    let config = Arc::new(config);
    let store = Store::new(config.cache.memory);
    let metrics = Arc::new(telemetry::metrics::Metrics::default());
    let proxy = Arc::new(Proxy::new(config.clone(), store, metrics.clone())?);
    let tls = server::tls::server_config(&config.tls.certificates)?.map(TlsAcceptor::from);
    let (tx, rx) = watch::channel(false);
    let shared = Shared {
        proxy: proxy.clone(),
        metrics: metrics.clone(),
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
    let mut http = Vec::new();
    let mut https = Vec::new();
    let mut listeners = Vec::new();
    for &addr in &config.server.http {
        let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
        http.push(
            l.local_addr()
                .map_err(|source| Error::Bind { addr, source })?,
        );
        listeners.push((l, None));
    }
    for &addr in &config.server.https {
        let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
        https.push(
            l.local_addr()
                .map_err(|source| Error::Bind { addr, source })?,
        );
        listeners.push((l, tls.clone()));
    }
    for (l, tls) in listeners {
        accept.spawn(server::accept_loop(l, tls, shared.clone()));
    }
    proxy.spawn_health_checks(&mut accept, &shared.shutdown);
    let mut admin_addr = None;
    let mut admin_task = JoinSet::new();
    let (admin_stop, admin_stopped) = watch::channel(false);
    if let Some(admin) = &config.admin {
        let addr = admin.listen;
        let l = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
        let bound = l
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        admin_addr = Some(bound);
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
            metrics: metrics.clone(),
            tracker: shared.tracker.clone(),
            capacity: config.cache.memory,
            draining: shared.shutdown.clone(),
        });
        admin_task.spawn(admin::serve(
            l,
            state,
            shared.builders.clone(),
            admin_stopped,
        ));
        tracing::info!(addr = %bound, "admin listening (metrics, health, origins, purge)");
    }
    for a in &http {
        tracing::info!(addr = %a, "listening for HTTP");
    }
    for a in &https {
        tracing::info!(addr = %a, "listening for HTTPS");
    }
    Ok(Node {
        http,
        https,
        admin: admin_addr,
        shutdown: tx,
        accept,
        admin_task,
        admin_stop,
        tracker: shared.tracker,
        grace: config.server.shutdown_grace,
        proxy,
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
    pub fn metrics(&self) -> &telemetry::metrics::Metrics {
        self.proxy.metrics()
    }

    /// The node's cache store (for inspection in tests and admin).
    pub fn store(&self) -> &Store {
        self.proxy.store()
    }

    /// Reads `[geo] database` again (what SIGHUP does): lookups use the new file from now on;
    /// on error the one in use stays. `Ok(None)` when no database is configured.
    pub fn reload_geo_database(&self) -> Result<Option<String>, String> {
        self.proxy.reload_geo()
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

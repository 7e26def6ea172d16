//! Origins: one pooled HTTP client per configured origin, with its timeouts.
//!
//! Connections are kept alive and reused (hyper-util's pool); `https` origins are verified
//! against the system's trust store plus the Mozilla root set built into `webpki-roots` (so
//! a slim container needs no CA bundle), plus the origin's own `ca` files, and speak HTTP/2
//! when the origin offers it by ALPN. The clients are built by `node` (see `system_roots`).
//! Per-origin state lives in `state` (written by the proxy and `health`, read by `select`);
//! a site's route for a client in `route`; choosing among origins in `select`; active checks
//! in `health`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Origin;
use limit::Limited;

mod body;
pub mod dns;
pub mod health;
pub mod limit;
pub mod retry;
pub(crate) mod route;
pub mod select;
pub mod state;

pub use body::UpstreamBody;

/// Why an origin request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to origin {origin}: {source}")]
    Connect {
        origin: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("origin {origin}: all {limit} connections are busy")]
    Saturated { origin: String, limit: usize },
    #[error("origin {origin} sent no response head within {timeout:?}")]
    Timeout { origin: String, timeout: Duration },
    #[error("request to origin {origin}: {source}")]
    Request {
        origin: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error(transparent)]
    Dns(#[from] dns::SetupError),
    #[error("build TLS client for origin {origin}: {source}")]
    Tls {
        origin: String,
        #[source]
        source: rustls::Error,
    },
}

impl Error {
    /// True when no connection could be made (nothing reached the origin), including when
    /// the origin is at its connection limit.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::Saturated { .. })
    }

    /// True when the origin was not tried because every connection it may have is busy
    /// (not a sign that it is unwell).
    pub fn is_saturated(&self) -> bool {
        matches!(self, Error::Saturated { .. })
    }

    /// True when a connection was made but broke before a response head came back.
    pub fn is_broken(&self) -> bool {
        matches!(self, Error::Request { .. })
    }

    /// True when the origin accepted the request but did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// The trust anchors for `https` origins: the system's store (`/etc/ssl/certs` and the like,
/// so a CA an operator installed there is trusted) plus the Mozilla set compiled in (so a slim
/// container without a CA bundle still verifies public origins). Loaded once at start.
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    for e in found.errors {
        tracing::debug!(error = %e, "skipping part of the system's CA store");
    }
    tracing::debug!(system = added, "trust anchors for https origins loaded");
    roots
}

/// A configured origin with its connection pool (a clone shares the pool).
#[derive(Clone)]
pub struct OriginClient {
    pub config: Origin,
    client: Client<Limited<HttpsConnector<HttpConnector<dns::Resolver>>>, UpstreamBody>,
}

impl OriginClient {
    /// Builds the pool for one origin, resolving its name through `resolver`. Nothing is
    /// connected until the first request.
    pub fn new(
        config: Origin,
        resolver: dns::Resolver,
        system_roots: &rustls::RootCertStore,
    ) -> Result<OriginClient, Error> {
        let mut roots = system_roots.clone();
        for ca in &config.ca {
            roots.add(ca.clone()).map_err(|source| Error::Tls {
                origin: config.name.clone(),
                source,
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::Tls {
                origin: config.name.clone(),
                source,
            })?
            .with_root_certificates(roots);
        let tls = match &config.client_auth {
            Some(auth) => tls
                .with_client_auth_cert(auth.chain.clone(), auth.key.clone_key())
                .map_err(|source| Error::Tls {
                    origin: config.name.clone(),
                    source,
                })?,
            None => tls.with_no_client_auth(),
        };
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let connector = Limited::new(connector, config.max_connections, config.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_idle_connections)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(OriginClient { config, client })
    }

    /// Sends a request with no deadline and no error mapping (health checks bound it).
    pub(crate) async fn request(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }

    /// Sends a request whose URI already names this origin; waits at most `timeout` for the
    /// response head. The body then streams with no overall deadline.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, Error> {
        match tokio::time::timeout(self.config.timeout, self.client.request(req)).await {
            Err(_) => Err(Error::Timeout {
                origin: self.config.name.clone(),
                timeout: self.config.timeout,
            }),
            Ok(Err(source)) if saturated(&source).is_some() => Err(Error::Saturated {
                origin: self.config.name.clone(),
                limit: saturated(&source).map_or(0, |s| s.limit),
            }),
            Ok(Err(source)) if source.is_connect() => Err(Error::Connect {
                origin: self.config.name.clone(),
                source,
            }),
            Ok(Err(source)) => Err(Error::Request {
                origin: self.config.name.clone(),
                source,
            }),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// The connection-limit error somewhere in `e`'s chain of causes.
fn saturated<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a limit::Saturated> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<limit::Saturated>() {
            return Some(s);
        }
        cur = err.source();
    }
    None
}

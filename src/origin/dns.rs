//! Resolving origin host names: hickory's async resolver with its TTL-respecting cache, so a
//! name is asked again once its records expire and an origin whose addresses change is
//! followed without a restart. Every address of a name is used: each new connection starts at
//! the next address in the answer, spreading connections over all of them (and a refused one
//! falls through to the rest, as hyper's connector tries them in order).
//!
//! IP-literal origins never get here (hyper's connector uses them as they are).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::Name;

use crate::config::Dns;

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the system's DNS configuration (set [dns] servers instead): {0}")]
pub struct SetupError(#[from] hickory_resolver::ResolveError);

/// A shared resolver (one cache for every origin).
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
    next: Arc<AtomicUsize>,
}

impl Resolver {
    /// The configured name servers, or the system's (`/etc/resolv.conf`, `/etc/hosts`).
    /// `names_used` says whether any origin is named by a host name: when none is, a system
    /// without a readable DNS configuration is no reason to refuse to start.
    pub fn new(config: &Dns, names_used: bool) -> Result<Resolver, SetupError> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if config.servers.is_empty() {
            match TokioResolver::builder(provider.clone()) {
                Ok(b) => b,
                Err(e) if names_used => return Err(e.into()),
                Err(_) => TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), NameServerConfigGroup::new()),
                    provider,
                ),
            }
        } else {
            let mut servers = Vec::new();
            for &addr in &config.servers {
                servers.push(NameServerConfig::new(addr, Protocol::Udp));
                servers.push(NameServerConfig::new(addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), NameServerConfigGroup::from(servers)),
                provider,
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.positive_min_ttl = Some(config.min_ttl);
        opts.positive_max_ttl = Some(config.max_ttl);
        // A failed lookup is asked again soon rather than remembered for long.
        opts.negative_max_ttl = Some(config.min_ttl.max(std::time::Duration::from_secs(1)));
        Ok(Resolver {
            inner: Arc::new(builder.build()),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }
}

impl Resolver {
    /// Every address of `name` (A and AAAA) and until when the answer holds (its TTL, within
    /// `[dns]` min_ttl and max_ttl): the fleet's `peers_dns`.
    pub async fn addresses(
        &self,
        name: &str,
    ) -> Result<(Vec<std::net::IpAddr>, std::time::Instant), hickory_resolver::ResolveError> {
        let found = self.inner.lookup_ip(name).await?;
        Ok((found.iter().collect(), found.valid_until()))
    }
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = hickory_resolver::ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let inner = self.inner.clone();
        let next = self.next.clone();
        Box::pin(async move {
            let found = inner.lookup_ip(name.as_str()).await?;
            // The port is set by the connector from the origin's URL.
            let mut addrs: Vec<SocketAddr> =
                found.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            if addrs.len() > 1 {
                let start = next.fetch_add(1, Ordering::Relaxed) % addrs.len();
                addrs.rotate_left(start);
            }
            tracing::trace!(name = name.as_str(), addresses = ?addrs, "resolved origin");
            Ok(addrs.into_iter())
        })
    }
}

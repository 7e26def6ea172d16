//! TLS termination: rustls with certificates chosen by SNI (exact, then wildcard, then the
//! default), ALPN offering HTTP/2 and HTTP/1.1, TLS 1.2 and 1.3.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::Certificate;

/// Picks a certificate for a handshake from the configured list.
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`; a wildcard covers exactly one label (RFC 6125).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SniResolver {
    /// `None` when there are no certificates.
    pub fn new(certs: &[Certificate]) -> Option<SniResolver> {
        let default = certs.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for h in &c.hosts {
                let map = match h.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()),
                    None => exact.entry(h.clone()),
                };
                // The first certificate naming a host keeps it.
                map.or_insert_with(|| c.key.clone());
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `server_name` (already lowercase), or the default.
    pub fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        if let Some(name) = server_name {
            if let Some(k) = self.exact.get(name) {
                return k.clone();
            }
            if let Some((_, suffix)) = name.split_once('.') {
                if let Some(k) = self.wildcard.get(suffix) {
                    return k.clone();
                }
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands us the SNI name already validated and lowercased.
        Some(self.pick(hello.server_name()))
    }
}

/// The TLS configuration in service, swapped whole when a reload reads new certificates.
pub type LiveTls = arc_swap::ArcSwap<ServerConfig>;

/// Builds the rustls server configuration, or `None` when no certificate is configured.
pub fn server_config(certs: &[Certificate]) -> Result<Option<Arc<ServerConfig>>, rustls::Error> {
    let Some(resolver) = SniResolver::new(certs) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(Some(Arc::new(cfg)))
}

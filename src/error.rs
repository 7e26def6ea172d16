//! Errors of starting and running a node.

use std::net::SocketAddr;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("set up TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Origin(#[from] crate::origin::Error),
}

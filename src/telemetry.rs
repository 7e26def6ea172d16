//! Logging setup and the access log. Field names used in events are defined here once.

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, Version};
use tracing_subscriber::EnvFilter;

/// The target of the one-line-per-request access log; filter it with
/// `RUST_LOG=edgecache::access=off` (or `=info`) independently of other logs.
pub const ACCESS_TARGET: &str = "edgecache::access";

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; the level comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests start several nodes) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// True when access-log events would be recorded; checked once per request so that no log
/// record is built when the access log is off.
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// One request's access-log record, completed when the response body ends.
#[derive(Debug)]
pub struct AccessLog {
    pub start: tokio::time::Instant,
    /// The socket's peer, or the client a trusted proxy names (`geo::Locator::client`).
    pub client: IpAddr,
    pub method: Method,
    pub version: Version,
    pub host: String,
    pub path: String,
    pub status: u16,
    /// `hit`, `miss`, `pass`, `refused` or `error`.
    pub cache: &'static str,
    pub origin: Option<Arc<str>>,
    pub origin_ms: Option<f64>,
    /// The geo route (`[[sites.routes]]` name) that chose the origin.
    pub route: Option<Arc<str>>,
    pub aborted: bool,
}

impl AccessLog {
    /// Writes the access-log line: `bytes` sent, and whether the body was sent completely.
    pub fn emit(&self, bytes: u64, complete: bool) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: ACCESS_TARGET,
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            version = ?self.version,
            status = self.status,
            bytes,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            cache = self.cache,
            origin = self.origin.as_deref().unwrap_or("-"),
            origin_ms = self.origin_ms.map(|m| (m * 1000.0).round() / 1000.0),
            route = self.route.as_deref().unwrap_or("-"),
            complete = complete && !self.aborted,
            "request"
        );
    }
}

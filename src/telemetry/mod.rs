//! Telemetry: the log subscriber, and the access log with its target. A leaf: it depends
//! on std and external crates only, never on the modules it reports on.
//!
//! - [`init`] installs the subscriber (text or JSON, filtered by `RUST_LOG`).
//! - `access`: the access-log record, one INFO event per request on [`ACCESS_TARGET`].

pub mod access;

use tracing_subscriber::EnvFilter;

pub use access::{access_log_enabled, AccessLog};

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

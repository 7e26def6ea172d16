//! Telemetry: the log subscriber, and the access log with its target. A leaf: it depends
//! on std and external crates only, never on the modules it reports on.
//!
//! - [`init`] installs the subscriber (text or JSON, filtered by `RUST_LOG`): the access log
//!   and the error log each to stdout, stderr or a file (`logfile`: append, reopen on
//!   SIGUSR1, buffered access log flushed once a second and at exit), per [`LogSettings`].
//! - `request_id`: the ids the access log and origins see.
//! - `access`: the access-log record, one INFO event per request on [`ACCESS_TARGET`].
//! - `metrics`: every metric, counted in atomics and exposed through `prometheus-client`.
//! - [`CacheResult`]: what happened to a request, as the access log and the metrics name it.

pub mod access;
mod logfile;
pub mod metrics;
pub mod request_id;

/// What was built, recorded by `build.rs`: `edgecache --version`, the start-up log line,
/// `GET /status` and `edgecache_build_info` all report these.
pub mod build {
    /// The package version (`Cargo.toml`).
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    /// The git commit, 12 hex digits; `EDGECACHE_COMMIT` from the environment when built
    /// outside a git checkout, else "unknown".
    pub const COMMIT: &str = env!("EDGECACHE_COMMIT");
    /// Cargo's build profile: "release" or "debug".
    pub const PROFILE: &str = env!("EDGECACHE_PROFILE");
}

use std::path::PathBuf;
use std::sync::Arc;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use access::{access_log_enabled, AccessLog};
pub use request_id::RequestId;

/// Span names: one per stage of the request path (`proxy`), so that a `debug` filter shows a
/// request's way through them: `RUST_LOG=edgecache=debug`.
pub mod spans {
    /// The whole request (fields: `method`, `uri`).
    pub const REQUEST: &str = "request";
    /// Framing, host and site, method, path, request rates.
    pub const ROUTE: &str = "route";
    /// Key, stored response, reuse decision (and an answer from the cache).
    pub const LOOKUP: &str = "lookup";
    /// Joining another request's fetch for the same key, or leading it.
    pub const COLLAPSE: &str = "collapse";
    /// Candidates and the send with failover.
    pub const UPSTREAM: &str = "upstream";
    /// What becomes of the origin's response: refresh, stale on error, store.
    pub const ADMIT: &str = "admit";
    /// A request the cache does not handle, streamed to the origin.
    pub const PASS: &str = "pass";
    /// The PURGE method.
    pub const PURGE: &str = "purge";
}

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

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    Stderr,
    /// Not written at all (the access log only): no access record is even built.
    Off,
    /// A file, opened in append mode and created when missing; reopened on SIGUSR1.
    File(PathBuf),
}

/// `[log]`: where the access log and the error log (every other event) go, their format and
/// the default filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// The access log (default stdout, as in nginx's container images).
    pub access: Destination,
    /// Every other log line (default stderr). Never [`Destination::Off`].
    pub error: Destination,
    pub format: LogFormat,
    /// The filter used when `RUST_LOG` is not set (default `info`), in `RUST_LOG` syntax.
    pub level: Option<String>,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            access: Destination::Stdout,
            error: Destination::Stderr,
            format: LogFormat::Text,
            level: None,
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open {which} log {}: {source}", path.display())]
    Open {
        which: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reopen log file {}: {source}", path.display())]
    Reopen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The log files in use, for SIGUSR1 and for the flush at exit (also done when dropped).
#[derive(Debug, Default)]
pub struct Logs {
    files: Vec<Arc<logfile::LogFile>>,
}

impl Logs {
    /// The files written to, none for stdout and stderr only.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        self.files.iter().map(|f| f.path())
    }

    /// Opens every log file again by its path (after logrotate renamed it). Each file is
    /// tried; one that cannot be opened keeps its old file, and the first such error is
    /// returned.
    pub fn reopen(&self) -> Result<(), Error> {
        let mut first = None;
        for f in &self.files {
            if let Err(source) = f.reopen() {
                first.get_or_insert(Error::Reopen {
                    path: f.path().to_owned(),
                    source,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes out what buffered files hold.
    pub fn flush(&self) {
        for f in &self.files {
            let _ = f.flush();
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A formatting layer of either format over any writer.
type BoxedLayer = Box<dyn Layer<Layered<EnvFilter, Registry>> + Send + Sync>;

fn layer<W>(format: LogFormat, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    }
}

/// Installs the global subscriber: access events ([`ACCESS_TARGET`]) to `settings.access`,
/// every other event to `settings.error`, both filtered by `RUST_LOG` or else
/// `settings.level` (default `info`). Files are opened here; one that cannot be opened is an
/// error naming it. Keep the returned [`Logs`] for SIGUSR1 and until exit (it flushes).
pub fn init(settings: &LogSettings) -> Result<Logs, Error> {
    let level = settings.level.as_deref().unwrap_or("info");
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let mut files: Vec<Arc<logfile::LogFile>> = Vec::new();
    let mut open = |which: &'static str, dest: &Destination, buffered: bool| {
        let format = settings.format;
        let made = match dest {
            Destination::Off => None,
            Destination::Stdout => Some(layer(
                format,
                std::io::stdout,
                is_terminal(&std::io::stdout()),
            )),
            Destination::Stderr => Some(layer(
                format,
                std::io::stderr,
                is_terminal(&std::io::stderr()),
            )),
            Destination::File(path) => {
                // Both logs in one file share one handle, so their lines never interleave.
                let file = match files.iter().find(|f| f.path() == path) {
                    Some(f) => f.clone(),
                    None => {
                        let f = logfile::LogFile::open(path, buffered).map_err(|source| {
                            Error::Open {
                                which,
                                path: path.clone(),
                                source,
                            }
                        })?;
                        let f = Arc::new(f);
                        files.push(f.clone());
                        f
                    }
                };
                Some(layer(format, logfile::FileWriter(file), false))
            }
        };
        Ok::<_, Error>(made)
    };
    let access = open("access", &settings.access, true)?.map(|l| {
        l.with_filter(filter_fn(|m| m.target() == ACCESS_TARGET))
            .boxed()
    });
    let error = open("error", &settings.error, false)?.map(|l| {
        l.with_filter(filter_fn(|m| m.target() != ACCESS_TARGET))
            .boxed()
    });
    let layers: Vec<BoxedLayer> = access.into_iter().chain(error).collect();
    // A second init (tests start several nodes) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    logfile::spawn_flusher(files.clone());
    Ok(Logs { files })
}

fn is_terminal(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal()
}

/// What happened to a request, decided by the request path and reported in three places
/// under one name ([`CacheResult::as_str`]): the access log's `cache` field, the `result`
/// label of `edgecache_requests_total`, and (in its own RFC 9211 terms) the `Cache-Status`
/// the client receives, as each variant notes.
///
/// Adding a variant adds a row of series to `edgecache_requests_total`; the names are part
/// of what dashboards read, so an existing one never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// Answered from a fresh stored response. `Cache-Status: …; hit`.
    Hit,
    /// Answered from a stored response past its freshness: allowed by the client's
    /// `max-stale`, served while a background refresh runs (stale-while-revalidate), or in
    /// place of an origin that failed (stale-if-error, origin unreachable). `Cache-Status:
    /// …; hit; fwd=stale; …` with the reason in `detail`.
    Stale,
    /// Fetched from an origin by this request (the leader of its fill), and stored when
    /// storable. `Cache-Status: …; fwd=uri-miss` or `fwd=vary-miss`, with `stored`.
    Miss,
    /// Answered by following another request's fill for the same key, without a fetch of
    /// its own. `Cache-Status: …; fwd=…; collapsed`.
    Collapsed,
    /// A stored response the origin confirmed with 304, refreshed and served.
    /// `Cache-Status: …; fwd=stale; fwd-status=304` (`fwd=request` when the client's
    /// `no-cache` asked for the check).
    Revalidated,
    /// Forwarded and relayed without storing: an unsafe method (POST, PUT, …) or a response
    /// the cache may not store. `Cache-Status: …; fwd=method`, or the miss's `fwd` with
    /// `detail=` the reason it was not stored.
    Pass,
    /// A safe method forwarded without looking in the cache: a site rule with `bypass`, or
    /// another safe method the cache does not handle (OPTIONS, for one). `Cache-Status: …;
    /// fwd=bypass` or `fwd=method`.
    Bypass,
    /// The origin failed (connect, reset, timeout, a cut-off body) and nothing stored could
    /// stand in, or a stored response that may not be served stale could not be
    /// revalidated: 502 or 504 made here, with no `Cache-Status`. Also counted in
    /// `edgecache_origin_errors_total`.
    Error,
    /// Refused with 429 for a request rate, per client or per site (`proxy::limit`).
    Limited,
    /// Refused here without an origin: a malformed or misdirected request, a method or
    /// path not allowed, a loop, `only-if-cached` with nothing stored.
    Refused,
    /// A `PURGE` request, answered here with what it removed.
    Purge,
}

impl CacheResult {
    /// Every result, in the order their series are exposed.
    pub const ALL: [CacheResult; 11] = [
        CacheResult::Hit,
        CacheResult::Stale,
        CacheResult::Miss,
        CacheResult::Collapsed,
        CacheResult::Revalidated,
        CacheResult::Pass,
        CacheResult::Bypass,
        CacheResult::Error,
        CacheResult::Limited,
        CacheResult::Refused,
        CacheResult::Purge,
    ];

    /// The name in the access log and the `result` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Stale => "stale",
            CacheResult::Miss => "miss",
            CacheResult::Collapsed => "collapsed",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Pass => "pass",
            CacheResult::Bypass => "bypass",
            CacheResult::Error => "error",
            CacheResult::Limited => "limited",
            CacheResult::Refused => "refused",
            CacheResult::Purge => "purge",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CacheResult;

    #[test]
    fn results_are_listed_once_in_declaration_order() {
        for (i, r) in CacheResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let names: Vec<&str> = CacheResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "hit",
                "stale",
                "miss",
                "collapsed",
                "revalidated",
                "pass",
                "bypass",
                "error",
                "limited",
                "refused",
                "purge"
            ]
        );
    }
}

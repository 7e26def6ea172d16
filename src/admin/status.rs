//! `GET /status`: what runs (version, commit, profile), since when, on which configuration
//! (path, SHA-256, load time, generation), what the cache and the origins hold, and where the
//! node listens, as one JSON object.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::json;
use tokio::time::Instant;

use super::AdminState;
use crate::telemetry::build;

/// What `GET /status` reports of the node beyond the proxy: `node::Reloader` answers, as
/// reloads change both.
pub trait NodeStatus: Send + Sync {
    /// The configuration in service.
    fn config_stamp(&self) -> ConfigStamp;
    /// The data listeners open now: kind (`http`, `https`) and bound address.
    fn listeners(&self) -> Vec<(&'static str, SocketAddr)>;
}

/// The configuration in service, as loaded.
#[derive(Debug, Clone)]
pub struct ConfigStamp {
    /// The file it was read from; `None` when given in memory.
    pub path: Option<PathBuf>,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: Option<String>,
    /// When it was put in service (at start, or by the reload that swapped it in).
    pub loaded_at: SystemTime,
    /// 1 for the configuration the node started with, one more at each reload swapped in.
    pub generation: u64,
}

/// When the node started: the wall clock for people, a monotonic instant for the uptime.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub at: SystemTime,
    pub instant: Instant,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: SystemTime::now(),
            instant: Instant::now(),
        }
    }
}

/// Seconds since the epoch, for machines; the HTTP date beside it is for people.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `/status` document, pretty-printed, with a final newline.
pub(super) fn render(state: &AdminState) -> String {
    let proxy = state.proxy.load();
    let store = proxy.store();
    // Pending maintenance first, so the counts include what was stored just before.
    store.sync();
    let stamp = state.node.config_stamp();
    let (ok, error) = state.metrics.config_reloads();
    let origins = proxy.origin_counts();
    let mut listeners: Vec<serde_json::Value> = state
        .node
        .listeners()
        .into_iter()
        .map(|(kind, addr)| json!({ "kind": kind, "addr": addr.to_string() }))
        .collect();
    listeners.push(json!({ "kind": "admin", "addr": state.admin_addr.to_string() }));
    let doc = json!({
        "version": build::VERSION,
        "commit": build::COMMIT,
        "profile": build::PROFILE,
        "started_at": httpdate::fmt_http_date(state.started.at),
        "started_at_unix": unix(state.started.at),
        "uptime_seconds": state.started.instant.elapsed().as_secs(),
        "draining": *state.draining.borrow(),
        "config": {
            "path": stamp.path.as_ref().map(|p| p.display().to_string()),
            "sha256": stamp.sha256,
            "loaded_at": httpdate::fmt_http_date(stamp.loaded_at),
            "loaded_at_unix": unix(stamp.loaded_at),
            "generation": stamp.generation,
            "reloads": { "ok": ok, "error": error },
        },
        "cache": {
            "objects": store.entry_count(),
            "bytes": store.weighted_size(),
            "capacity": store.capacity(),
        },
        "origins": {
            "total": origins.total,
            "up": origins.up,
            "down": origins.down,
            "ejected": origins.ejected,
        },
        "listeners": listeners,
        "open_connections": state.tracker.open(),
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

//! Metrics: fixed label sets counted in atomics (no lock, no allocation on the request path),
//! rendered in the Prometheus text format by the admin listener.
//!
//! Written by hand rather than with a metrics crate: every label value is known at compile
//! time, so a counter is an index into an array of atomics, and rendering is a few lines.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::telemetry::CacheResult;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counters shared by every request.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; 5]; CacheResult::ALL.len()],
    origin_requests: AtomicU64,
    origin_errors: AtomicU64,
    purged: AtomicU64,
    retries: AtomicU64,
    retries_refused: AtomicU64,
    sendfile_bytes: AtomicU64,
    connections_refused: AtomicU64,
}

/// Point-in-time values read from elsewhere when rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub cache_objects: u64,
    pub cache_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub fills_in_flight: u64,
    /// Body bytes fills in flight hold for storing (bounded by `cache.fill_memory`).
    pub fill_bytes: u64,
    /// Fills not stored because `cache.fill_memory` was full.
    pub fill_memory_full: u64,
    pub open_connections: u64,
    /// Stored bodies in memory files (process-wide, see `cache::mapped`).
    pub memory_files: MemoryFiles,
}

/// What `cache::mapped` reports; zero where there are no memory files.
#[cfg(target_os = "linux")]
pub use crate::cache::mapped::Usage as MemoryFiles;

/// What `cache::mapped` reports; zero where there are no memory files.
#[cfg(not(target_os = "linux"))]
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFiles {
    pub objects: u64,
    pub bytes: u64,
    pub fallbacks: u64,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, result: CacheResult, status: u16, used_origin: bool) {
        let c = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests[result as usize][c].fetch_add(1, Ordering::Relaxed);
        if used_origin {
            self.origin_requests.fetch_add(1, Ordering::Relaxed);
        }
        if result == CacheResult::Error {
            self.origin_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a retry on another origin, or one the retry budget refused.
    pub fn retry(&self, granted: bool) {
        if granted {
            self.retries.fetch_add(1, Ordering::Relaxed);
        } else {
            self.retries_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts stored responses removed or marked stale by purges.
    pub fn purged(&self, n: u64) {
        self.purged.fetch_add(n, Ordering::Relaxed);
    }

    /// Requests so far with this result (all status classes).
    pub fn requests_with(&self, result: CacheResult) -> u64 {
        self.requests[result as usize]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a connection closed at accept for `server.max_connections_per_client`.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed at accept for `server.max_connections_per_client` so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Counts body bytes sent to clients straight from memory files.
    pub fn sent_from_file(&self, n: u64) {
        self.sendfile_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Body bytes sent with `sendfile` so far.
    pub fn sendfile_bytes(&self) -> u64 {
        self.sendfile_bytes.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: Gauges) -> String {
        let mut s = String::with_capacity(4096);
        let _ = writeln!(
            s,
            "# HELP edgecache_requests_total Requests answered, by cache result and status class."
        );
        let _ = writeln!(s, "# TYPE edgecache_requests_total counter");
        for result in CacheResult::ALL {
            let name = result.as_str();
            for (c, class) in CLASSES.iter().enumerate() {
                let v = self.requests[result as usize][c].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        s,
                        "edgecache_requests_total{{result=\"{name}\",status=\"{class}\"}} {v}"
                    );
                }
            }
        }
        let counters = [
            (
                "edgecache_origin_requests_total",
                "Requests sent to origins.",
                self.origin_requests.load(Ordering::Relaxed),
            ),
            (
                "edgecache_origin_errors_total",
                "Origin requests that failed (connect, timeout, reset).",
                self.origin_errors.load(Ordering::Relaxed),
            ),
            (
                "edgecache_origin_retries_total",
                "Requests sent again to another origin after a failed connection.",
                self.retries.load(Ordering::Relaxed),
            ),
            (
                "edgecache_origin_retries_refused_total",
                "Retries not made because the retry budget was spent.",
                self.retries_refused.load(Ordering::Relaxed),
            ),
            (
                "edgecache_purged_objects_total",
                "Stored responses removed or marked stale by purges.",
                self.purged.load(Ordering::Relaxed),
            ),
            (
                "edgecache_sendfile_bytes_total",
                "Body bytes of hits sent from memory files with sendfile, not copied.",
                self.sendfile_bytes.load(Ordering::Relaxed),
            ),
            (
                "edgecache_client_connections_refused_total",
                "Connections closed as accepted: their address held server.max_connections_per_client.",
                self.connections_refused.load(Ordering::Relaxed),
            ),
            (
                "edgecache_memory_file_fallbacks_total",
                "Bodies of sendfile size kept on the heap (memory-file limit reached or refused).",
                g.memory_files.fallbacks,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauges = [
            ("edgecache_cache_objects", "URLs stored.", g.cache_objects),
            (
                "edgecache_cache_bytes",
                "Bytes stored, as weighed against the capacity.",
                g.cache_bytes,
            ),
            (
                "edgecache_cache_capacity_bytes",
                "The store's bound (cache.memory).",
                g.cache_capacity_bytes,
            ),
            (
                "edgecache_fills_in_flight",
                "Origin fetches shared by collapsed requests.",
                g.fills_in_flight,
            ),
            (
                "edgecache_fill_memory_bytes",
                "Body bytes that fetches in flight hold for storing (cache.fill_memory).",
                g.fill_bytes,
            ),
            (
                "edgecache_open_connections",
                "Open client connections.",
                g.open_connections,
            ),
            (
                "edgecache_memory_file_objects",
                "Stored bodies kept in sealed memory files (cache.sendfile_min_size and up).",
                g.memory_files.objects,
            ),
            (
                "edgecache_memory_file_bytes",
                "Bytes of the stored bodies kept in memory files.",
                g.memory_files.bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let name = "edgecache_fill_memory_full_total";
        let _ = writeln!(
            s,
            "# HELP {name} Responses not stored because cache.fill_memory was full.\n# TYPE {name} counter\n{name} {}",
            g.fill_memory_full
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_in_prometheus_format() {
        let m = Metrics::default();
        m.request(CacheResult::Hit, 200, false);
        m.request(CacheResult::Miss, 200, true);
        m.request(CacheResult::Error, 502, true);
        let text = m.render(Gauges {
            cache_objects: 3,
            ..Gauges::default()
        });
        assert!(text.contains("edgecache_requests_total{result=\"hit\",status=\"2xx\"} 1"));
        assert!(text.contains("edgecache_requests_total{result=\"error\",status=\"5xx\"} 1"));
        assert!(text.contains("edgecache_origin_requests_total 2"));
        assert!(text.contains("edgecache_origin_errors_total 1"));
        assert!(text.contains("edgecache_cache_objects 3"));
        assert_eq!(m.requests_with(CacheResult::Hit), 1);
    }

    #[test]
    fn limited_has_its_own_label() {
        let m = Metrics::default();
        m.request(CacheResult::Limited, 429, false);
        m.request(CacheResult::Refused, 400, false);
        m.connection_refused();
        let text = m.render(Gauges::default());
        assert!(text.contains("edgecache_requests_total{result=\"limited\",status=\"4xx\"} 1"));
        assert!(text.contains("edgecache_requests_total{result=\"refused\",status=\"4xx\"} 1"));
        assert_eq!(m.requests_with(CacheResult::Limited), 1);
        assert_eq!(m.requests_with(CacheResult::Refused), 1);
        assert!(text.contains("edgecache_client_connections_refused_total 1"));
    }
}

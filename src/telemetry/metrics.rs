//! Every metric the node exposes, defined here once: the counters the request path and the
//! listeners add to ([`Metrics`]), and the values read at scrape time from other modules
//! ([`Gauges`], [`OriginSeries`]), which those modules fill in; this module imports none of
//! them.
//!
//! Counting is one relaxed atomic add: every label value is known at compile time, so a
//! counter is a slot in a fixed array indexed by enum (no registry, hash, lock or
//! allocation per request). At scrape time a [`Scrape`] is handed to `prometheus-client` as
//! a collector, and the crate writes the Prometheus text format (0.0.4) with its label
//! escaping. Names and meanings are what dashboards read: a name, label or HELP meaning
//! never changes; a counter's `_total` is added by the encoder, so it is not in the names
//! below.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::CacheResult;

/// The `Content-Type` of [`Scrape::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Status classes, the `status` label of `edgecache_requests_total`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counters shared by every request and listener.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; CLASSES.len()]; CacheResult::ALL.len()],
    origin_requests: AtomicU64,
    origin_errors: AtomicU64,
    purged: AtomicU64,
    retries: AtomicU64,
    retries_refused: AtomicU64,
    sendfile_bytes: AtomicU64,
    connections_refused: AtomicU64,
    /// Idle HTTP/1 connections parked (holding no buffers, `server::park`) now.
    parked_connections: AtomicU64,
    /// Configuration reloads: `[ok, error]`.
    config_reloads: [AtomicU64; 2],
    /// Time to the response head, by cache result.
    durations: [Histogram; CacheResult::ALL.len()],
}

/// Upper bounds, in seconds, of the latency histograms' buckets (a last one, `+Inf`, takes
/// the rest): from half a millisecond, a hit served from memory, to ten seconds, a slow
/// origin's large response head; about two buckets per factor of ten in between.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram of fixed buckets ([`LATENCY_BUCKETS`]), each a relaxed atomic: an
/// observation is a search of 14 bounds and two adds, with no lock and no allocation.
/// Written here because `prometheus-client`'s `Histogram` takes a lock on every observation,
/// which the hit path would pay for each request.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one past every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// The sum of the observations, in nanoseconds (u64 holds 584 years of them).
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `d`.
    pub fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        // The first bound at or above the value: Prometheus buckets are `le` (less or equal).
        let i = LATENCY_BUCKETS.partition_point(|&bound| bound < seconds);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now. The total is the sum of the buckets read, so a scrape's `_count`
    /// always equals its `+Inf` bucket.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut counts = [0; LATENCY_BUCKETS.len() + 1];
        for (c, b) in counts.iter_mut().zip(&self.buckets) {
            *c = b.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            counts,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A [`Histogram`]'s counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative), the last one past every bound.
    pub counts: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Encodes the histogram as one series of `family`.
    fn encode(&self, metric: &mut prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
        let mut buckets = [(f64::INFINITY, 0); LATENCY_BUCKETS.len() + 1];
        for (i, (bound, count)) in buckets.iter_mut().enumerate() {
            if let Some(b) = LATENCY_BUCKETS.get(i) {
                *bound = *b;
            }
            *count = self.counts[i];
        }
        metric.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count(), &buckets, None)
    }
}

/// Point-in-time values of the node, read when a scrape is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub cache_objects: u64,
    pub cache_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub fills_in_flight: u64,
    /// Body bytes fills in flight hold for storing (bounded by `cache.fill_memory`).
    pub fill_bytes: u64,
    /// Fills not stored because `cache.fill_memory` was full (a count since start).
    pub fill_memory_full: u64,
    pub open_connections: u64,
    /// Stored bodies in memory files (process-wide).
    pub memory_files: MemoryFiles,
}

/// Memory files (`cache::mapped`) at a scrape; zero where there are none.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFiles {
    /// Bodies kept in memory files.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bodies of that size kept on the heap instead, since the process started.
    pub fallbacks: u64,
}

/// One origin's values at a scrape (from one snapshot of its state, so its series agree).
#[derive(Debug, Clone, Default)]
pub struct OriginSeries {
    /// The origin's configured name, the `origin` label (escaped by the encoder).
    pub name: Arc<str>,
    /// Neither down by its checks nor ejected.
    pub up: bool,
    /// Peak-EWMA time to first byte.
    pub latency_seconds: f64,
    /// Requests waiting for the origin's answer.
    pub in_flight: u32,
    /// Requests answered or failed (since start).
    pub responses: u64,
    /// Requests that failed (since start).
    pub failures: u64,
    /// Times passive detection ejected the origin (since start).
    pub ejections: u32,
    /// Time to the origin's response head (or failure), per attempt (since start).
    pub durations: HistogramSnapshot,
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

    /// Counts the time one request took to its response head, by result.
    pub fn request_duration(&self, result: CacheResult, d: Duration) {
        self.durations[result as usize].observe(d);
    }

    /// The request durations so far with this result.
    pub fn request_durations(&self, result: CacheResult) -> HistogramSnapshot {
        self.durations[result as usize].snapshot()
    }

    /// Requests so far with this result (all status classes).
    pub fn requests_with(&self, result: CacheResult) -> u64 {
        self.requests[result as usize]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a configuration reload: swapped in (`ok`), or refused and the running one kept.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Configuration reloads so far: `(swapped in, refused)`.
    pub fn config_reloads(&self) -> (u64, u64) {
        let [ok, error] = &self.config_reloads;
        (ok.load(Ordering::Relaxed), error.load(Ordering::Relaxed))
    }

    /// Counts a connection closed at accept for `server.max_connections_per_client`.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// An idle connection gave its buffers back (`server::park`).
    pub fn connection_parked(&self) {
        self.parked_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A parked connection woke for its next request, or closed.
    pub fn connection_unparked(&self) {
        self.parked_connections.fetch_sub(1, Ordering::Relaxed);
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
}

/// What one scrape of `/metrics` shows: the counters, and the values read for it.
#[derive(Debug)]
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub gauges: Gauges,
    /// Every configured origin with a state, in configuration order.
    pub origins: Vec<OriginSeries>,
    /// The fleet's values, for a member of one (`[cluster]`).
    pub fleet: Option<FleetSeries>,
}

/// A fleet member's values at a scrape (`crate::cluster`).
#[derive(Debug, Clone, Default)]
pub struct FleetSeries {
    /// Peer requests by `result` (`ok`, `refused`, `broken`, `timeout`).
    pub results: Vec<(&'static str, u64)>,
    /// Times to a peer's response head (answered requests).
    pub durations: HistogramSnapshot,
    /// Members as this node knows them, itself included.
    pub members: u64,
    /// Member list changes since start.
    pub membership_changes: u64,
    /// The share of keys this node owns (0 to 1; a sample of the key space).
    pub owned_share: f64,
    /// With `cluster.etcd`: the connection and the purges through it.
    pub etcd: Option<EtcdSeries>,
}

/// A fleet member's etcd connection at a scrape (`crate::cluster::etcd`).
#[derive(Debug, Clone, Default)]
pub struct EtcdSeries {
    pub connected: bool,
    /// etcd requests that failed (connect, lease, watch, write).
    pub errors: u64,
    /// Purges accepted here and written to etcd; queued ones dropped (queue full).
    pub purges_sent: u64,
    pub purges_dropped: u64,
    /// Purges from other members applied here.
    pub purges_applied: u64,
    /// Soft purges of everything after etcd compacted history this node had not seen.
    pub full_purges: u64,
    /// From a purge's acceptance at another member to its application here.
    pub lag: HistogramSnapshot,
}

impl Scrape {
    /// The Prometheus text exposition ([`CONTENT_TYPE`]).
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail, and encoding here returns no error of its own.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }

    fn encode_requests(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "edgecache_requests",
            "Requests answered, by cache result and status class.",
            None,
            MetricType::Counter,
        )?;
        for result in CacheResult::ALL {
            for (c, class) in CLASSES.iter().enumerate() {
                let v = self.metrics.requests[result as usize][c].load(Ordering::Relaxed);
                // Only pairs that happened: most of the 55 never do.
                if v > 0 {
                    let labels = [("result", result.as_str()), ("status", class)];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        Ok(())
    }

    fn encode_reloads(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "edgecache_config_reloads",
            "Configuration reloads (SIGHUP, POST /reload): ok swapped in, error refused.",
            None,
            MetricType::Counter,
        )?;
        let (ok, error) = self.metrics.config_reloads();
        for (result, v) in [("ok", ok), ("error", error)] {
            family
                .encode_family(&[("result", result)])?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
        }
        Ok(())
    }

    fn encode_node(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.metrics;
        let g = &self.gauges;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "edgecache_origin_requests",
                "Requests sent to origins.",
                load(&m.origin_requests),
            ),
            (
                "edgecache_origin_errors",
                "Origin requests that failed (connect, timeout, reset).",
                load(&m.origin_errors),
            ),
            (
                "edgecache_origin_retries",
                "Requests sent again to another origin after a failed connection.",
                load(&m.retries),
            ),
            (
                "edgecache_origin_retries_refused",
                "Retries not made because the retry budget was spent.",
                load(&m.retries_refused),
            ),
            (
                "edgecache_purged_objects",
                "Stored responses removed or marked stale by purges.",
                load(&m.purged),
            ),
            (
                "edgecache_sendfile_bytes",
                "Body bytes of hits sent from memory files with sendfile, not copied.",
                load(&m.sendfile_bytes),
            ),
            (
                "edgecache_client_connections_refused",
                "Connections closed as accepted: their address held server.max_connections_per_client.",
                load(&m.connections_refused),
            ),
            (
                "edgecache_memory_file_fallbacks",
                "Bodies of sendfile size kept on the heap (memory-file limit reached or refused).",
                g.memory_files.fallbacks,
            ),
        ];
        for (name, help, v) in counters {
            one(encoder, name, help, MetricType::Counter, v)?;
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
            one(encoder, name, help, MetricType::Gauge, v)?;
        }
        one(
            encoder,
            "edgecache_parked_connections",
            "Idle HTTP/1.1 client connections waiting for their next request with no buffers held.",
            MetricType::Gauge,
            self.metrics.parked_connections.load(Ordering::Relaxed),
        )?;
        one(
            encoder,
            "edgecache_fill_memory_full",
            "Responses not stored because cache.fill_memory was full.",
            MetricType::Counter,
            g.fill_memory_full,
        )
    }

    /// Per-origin series, labelled `origin`: up (1, or 0 when down by its checks or
    /// ejected), latency estimate, in-flight, responses, failures, ejections.
    fn encode_origins(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let series: [OriginFamily; 6] = [
            (
                "edgecache_origin_up",
                "1 when the origin is in rotation, 0 when down by its health checks or ejected.",
                MetricType::Gauge,
                |o| Value::Level(u64::from(o.up)),
            ),
            (
                "edgecache_origin_latency_seconds",
                "Peak-EWMA time to first byte.",
                MetricType::Gauge,
                |o| Value::Seconds(o.latency_seconds),
            ),
            (
                "edgecache_origin_in_flight",
                "Requests waiting for the origin's answer.",
                MetricType::Gauge,
                |o| Value::Level(u64::from(o.in_flight)),
            ),
            (
                "edgecache_origin_responses",
                "Origin requests answered or failed, by origin.",
                MetricType::Counter,
                |o| Value::Count(o.responses),
            ),
            (
                "edgecache_origin_failures",
                "Origin requests that failed (connect, reset, timeout, 5xx), by origin.",
                MetricType::Counter,
                |o| Value::Count(o.failures),
            ),
            (
                "edgecache_origin_ejections",
                "Times passive detection ejected the origin.",
                MetricType::Counter,
                |o| Value::Count(u64::from(o.ejections)),
            ),
        ];
        for (name, help, kind, value) in series {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for o in &self.origins {
                let labels = [("origin", &*o.name)];
                let mut one = family.encode_family(&labels)?;
                match value(o) {
                    Value::Count(v) => one.encode_counter::<NoLabelSet, u64, u64>(&v, None)?,
                    Value::Level(v) => one.encode_gauge(&v)?,
                    Value::Seconds(v) => one.encode_gauge(&v)?,
                }
            }
        }
        Ok(())
    }
}

/// A per-origin series: name, help, type, and its value for one origin.
type OriginFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&OriginSeries) -> Value,
);

/// A per-origin series' value; integers are written as integers.
enum Value {
    Count(u64),
    Level(u64),
    Seconds(f64),
}

/// One series without labels.
fn one(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, u64, u64>(&v, None),
        _ => metric.encode_gauge(&v),
    }
}

impl Scrape {
    /// The fleet's series, for a member of one.
    fn encode_fleet(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let Some(f) = &self.fleet else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "edgecache_peer_requests",
            "Misses sent to the member owning their key, by result (ok, refused, broken, timeout).",
            None,
            MetricType::Counter,
        )?;
        for (result, v) in &f.results {
            family
                .encode_family(&[("result", *result)])?
                .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
        }
        let mut family = encoder.encode_descriptor(
            "edgecache_peer_request_duration_seconds",
            "Time from a request sent to a peer to its response head.",
            None,
            MetricType::Histogram,
        )?;
        f.durations.encode(&mut family)?;
        one(
            encoder,
            "edgecache_cluster_members",
            "Members of the fleet as this node knows them, itself included.",
            MetricType::Gauge,
            f.members,
        )?;
        one(
            encoder,
            "edgecache_cluster_membership_changes",
            "Changes of the fleet's member list seen since start.",
            MetricType::Counter,
            f.membership_changes,
        )?;
        let mut family = encoder.encode_descriptor(
            "edgecache_cluster_owned_share",
            "The share of keys this node owns among the live members (0 to 1).",
            None,
            MetricType::Gauge,
        )?;
        family.encode_gauge(&f.owned_share)?;
        if let Some(e) = &f.etcd {
            let counters: [(&str, &str, u64); 5] = [
                (
                    "edgecache_etcd_errors",
                    "etcd requests that failed.",
                    e.errors,
                ),
                (
                    "edgecache_fleet_purges_sent",
                    "Purges accepted here and written to etcd.",
                    e.purges_sent,
                ),
                (
                    "edgecache_fleet_purges_dropped",
                    "Purges accepted here that could not be queued for etcd.",
                    e.purges_dropped,
                ),
                (
                    "edgecache_fleet_purges_applied",
                    "Purges accepted at other members and applied here.",
                    e.purges_applied,
                ),
                (
                    "edgecache_fleet_full_purges",
                    "Soft purges of everything after etcd compacted purges not yet seen here.",
                    e.full_purges,
                ),
            ];
            one(
                encoder,
                "edgecache_etcd_connected",
                "1 while registered in etcd and watching, else 0.",
                MetricType::Gauge,
                u64::from(e.connected),
            )?;
            for (name, help, v) in counters {
                one(encoder, name, help, MetricType::Counter, v)?;
            }
            let mut family = encoder.encode_descriptor(
                "edgecache_purge_propagation_seconds",
                "From a purge's acceptance at another member to its application here.",
                None,
                MetricType::Histogram,
            )?;
            e.lag.encode(&mut family)?;
        }
        Ok(())
    }

    /// `edgecache_build_info`, and the latency histograms: requests by result (those that
    /// happened), origin requests by origin.
    fn encode_build_and_latency(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "edgecache_build_info",
            "Always 1; the labels say what runs: package version and git commit.",
            None,
            MetricType::Gauge,
        )?;
        let labels = [
            ("version", super::build::VERSION),
            ("commit", super::build::COMMIT),
        ];
        family.encode_family(&labels)?.encode_gauge(&1u64)?;

        let mut family = encoder.encode_descriptor(
            "edgecache_request_duration_seconds",
            "Time from a request's head read to its response head sent on, by cache result.",
            None,
            MetricType::Histogram,
        )?;
        for result in CacheResult::ALL {
            let h = self.metrics.request_durations(result);
            if h.count() > 0 {
                h.encode(&mut family.encode_family(&[("result", result.as_str())])?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "edgecache_origin_request_duration_seconds",
            "Time from a request sent to an origin to its response head (or failure), per attempt.",
            None,
            MetricType::Histogram,
        )?;
        for o in &self.origins {
            o.durations
                .encode(&mut family.encode_family(&[("origin", &*o.name)])?)?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        self.encode_requests(&mut encoder)?;
        self.encode_node(&mut encoder)?;
        self.encode_origins(&mut encoder)?;
        self.encode_reloads(&mut encoder)?;
        self.encode_fleet(&mut encoder)?;
        self.encode_build_and_latency(&mut encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: Metrics, gauges: Gauges, origins: Vec<OriginSeries>) -> String {
        Scrape {
            metrics: Arc::new(metrics),
            gauges,
            origins,
            fleet: None,
        }
        .render()
    }

    #[test]
    fn counts_render_in_prometheus_format() {
        let m = Metrics::default();
        m.request(CacheResult::Hit, 200, false);
        m.request(CacheResult::Miss, 200, true);
        m.request(CacheResult::Error, 502, true);
        assert_eq!(m.requests_with(CacheResult::Hit), 1);
        let text = scrape(
            m,
            Gauges {
                cache_objects: 3,
                ..Gauges::default()
            },
            Vec::new(),
        );
        assert!(text.contains("edgecache_requests_total{result=\"hit\",status=\"2xx\"} 1\n"));
        assert!(text.contains("edgecache_requests_total{result=\"error\",status=\"5xx\"} 1\n"));
        assert!(text.contains("\nedgecache_origin_requests_total 2\n"));
        assert!(text.contains("\nedgecache_origin_errors_total 1\n"));
        assert!(text.contains("\nedgecache_cache_objects 3\n"));
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn limited_has_its_own_label() {
        let m = Metrics::default();
        m.request(CacheResult::Limited, 429, false);
        m.request(CacheResult::Refused, 400, false);
        m.connection_refused();
        assert_eq!(m.requests_with(CacheResult::Limited), 1);
        assert_eq!(m.requests_with(CacheResult::Refused), 1);
        let text = scrape(m, Gauges::default(), Vec::new());
        assert!(text.contains("edgecache_requests_total{result=\"limited\",status=\"4xx\"} 1"));
        assert!(text.contains("edgecache_requests_total{result=\"refused\",status=\"4xx\"} 1"));
        assert!(text.contains("edgecache_client_connections_refused_total 1"));
    }

    /// The text a few series make, byte for byte: counters with `_total` in HELP, TYPE and
    /// sample alike (as written by hand before), and an origin name that needs escaping.
    #[test]
    fn exposition_is_exact_and_label_values_are_escaped() {
        let m = Metrics::default();
        m.request(CacheResult::Hit, 200, false);
        m.request(CacheResult::Hit, 304, false);
        m.request(CacheResult::Purge, 200, false);
        m.retry(true);
        let origin = OriginSeries {
            name: Arc::from("eu \"1\"\\west\nb"),
            up: true,
            latency_seconds: 0.25,
            in_flight: 2,
            responses: 7,
            failures: 1,
            ejections: 0,
            durations: HistogramSnapshot::default(),
        };
        let text = scrape(m, Gauges::default(), vec![origin]);
        let requests = "\
# HELP edgecache_requests_total Requests answered, by cache result and status class.
# TYPE edgecache_requests_total counter
edgecache_requests_total{result=\"hit\",status=\"2xx\"} 1
edgecache_requests_total{result=\"hit\",status=\"3xx\"} 1
edgecache_requests_total{result=\"purge\",status=\"2xx\"} 1
# HELP edgecache_origin_requests_total Requests sent to origins.
# TYPE edgecache_origin_requests_total counter
edgecache_origin_requests_total 0
";
        assert!(text.starts_with(requests), "{text}");
        let retries = "\
# HELP edgecache_origin_retries_total Requests sent again to another origin after a failed connection.
# TYPE edgecache_origin_retries_total counter
edgecache_origin_retries_total 1
";
        assert!(text.contains(retries), "{text}");
        let open = "\
# HELP edgecache_open_connections Open client connections.
# TYPE edgecache_open_connections gauge
edgecache_open_connections 0
";
        assert!(text.contains(open), "{text}");
        let origins = r#"# HELP edgecache_origin_up 1 when the origin is in rotation, 0 when down by its health checks or ejected.
# TYPE edgecache_origin_up gauge
edgecache_origin_up{origin="eu \"1\"\\west\nb"} 1
# HELP edgecache_origin_latency_seconds Peak-EWMA time to first byte.
# TYPE edgecache_origin_latency_seconds gauge
edgecache_origin_latency_seconds{origin="eu \"1\"\\west\nb"} 0.25
# HELP edgecache_origin_in_flight Requests waiting for the origin's answer.
# TYPE edgecache_origin_in_flight gauge
edgecache_origin_in_flight{origin="eu \"1\"\\west\nb"} 2
# HELP edgecache_origin_responses_total Origin requests answered or failed, by origin.
# TYPE edgecache_origin_responses_total counter
edgecache_origin_responses_total{origin="eu \"1\"\\west\nb"} 7
# HELP edgecache_origin_failures_total Origin requests that failed (connect, reset, timeout, 5xx), by origin.
# TYPE edgecache_origin_failures_total counter
edgecache_origin_failures_total{origin="eu \"1\"\\west\nb"} 1
# HELP edgecache_origin_ejections_total Times passive detection ejected the origin.
# TYPE edgecache_origin_ejections_total counter
edgecache_origin_ejections_total{origin="eu \"1\"\\west\nb"} 0
"#;
        assert!(text.contains(origins), "{text}");
        let reloads = "\
# HELP edgecache_config_reloads_total Configuration reloads (SIGHUP, POST /reload): ok swapped in, error refused.
# TYPE edgecache_config_reloads_total counter
edgecache_config_reloads_total{result=\"ok\"} 0
edgecache_config_reloads_total{result=\"error\"} 0
";
        assert!(text.contains(reloads), "{text}");
    }

    /// Every series name, in order, as dashboards know them.
    #[test]
    fn every_series_keeps_its_name() {
        let m = Metrics::default();
        m.request(CacheResult::Miss, 200, true);
        let text = scrape(m, Gauges::default(), Vec::new());
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            names,
            [
                "edgecache_requests_total counter",
                "edgecache_origin_requests_total counter",
                "edgecache_origin_errors_total counter",
                "edgecache_origin_retries_total counter",
                "edgecache_origin_retries_refused_total counter",
                "edgecache_purged_objects_total counter",
                "edgecache_sendfile_bytes_total counter",
                "edgecache_client_connections_refused_total counter",
                "edgecache_memory_file_fallbacks_total counter",
                "edgecache_cache_objects gauge",
                "edgecache_cache_bytes gauge",
                "edgecache_cache_capacity_bytes gauge",
                "edgecache_fills_in_flight gauge",
                "edgecache_fill_memory_bytes gauge",
                "edgecache_open_connections gauge",
                "edgecache_memory_file_objects gauge",
                "edgecache_memory_file_bytes gauge",
                "edgecache_parked_connections gauge",
                "edgecache_fill_memory_full_total counter",
                "edgecache_origin_up gauge",
                "edgecache_origin_latency_seconds gauge",
                "edgecache_origin_in_flight gauge",
                "edgecache_origin_responses_total counter",
                "edgecache_origin_failures_total counter",
                "edgecache_origin_ejections_total counter",
                "edgecache_config_reloads_total counter",
                "edgecache_build_info gauge",
                "edgecache_request_duration_seconds histogram",
                "edgecache_origin_request_duration_seconds histogram",
            ]
        );
    }

    /// Buckets are `le`: a value on a bound counts in that bound's bucket; counts are
    /// cumulative in the text, `_count` equals `+Inf`, and only results seen are written.
    #[test]
    fn request_durations_render_as_cumulative_buckets() {
        let m = Metrics::default();
        m.request_duration(CacheResult::Hit, Duration::from_micros(500));
        m.request_duration(CacheResult::Hit, Duration::from_micros(700));
        m.request_duration(CacheResult::Miss, Duration::from_secs(30));
        let text = scrape(m, Gauges::default(), Vec::new());
        let hit = "\
edgecache_request_duration_seconds_bucket{result=\"hit\",le=\"0.0005\"} 1
edgecache_request_duration_seconds_bucket{result=\"hit\",le=\"0.001\"} 2
edgecache_request_duration_seconds_bucket{result=\"hit\",le=\"0.0025\"} 2
";
        assert!(text.contains(hit), "{text}");
        let tail = "\
edgecache_request_duration_seconds_bucket{result=\"hit\",le=\"+Inf\"} 2
edgecache_request_duration_seconds_sum{result=\"hit\"} 0.0012
edgecache_request_duration_seconds_count{result=\"hit\"} 2
";
        assert!(text.contains(tail), "{text}");
        assert!(text.contains(
            "edgecache_request_duration_seconds_bucket{result=\"miss\",le=\"10\"} 0\n\
             edgecache_request_duration_seconds_bucket{result=\"miss\",le=\"+Inf\"} 1\n"
        ));
        assert!(!text.contains("result=\"stale\""), "{text}");
        assert!(text.contains("edgecache_build_info{version=\"0.1.0\",commit=\""));
    }
}

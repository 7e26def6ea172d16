//! Views of the request path's state for the admin listener: per-origin JSON for
//! `GET /origins` and per-origin values for `/metrics` (telemetry's `OriginSeries`), read
//! from `origin::state` snapshots.

use super::*;
use crate::telemetry::metrics::OriginSeries;

impl Proxy {
    /// Each origin's state for `GET /origins`: up or ejected, latency estimate, in-flight
    /// requests, requests, errors and ejections.
    pub fn origins_json(&self) -> String {
        let now = Instant::now();
        let list: Vec<serde_json::Value> = self
            .origins
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let s = self.selector.state().snapshot(i, now).unwrap_or_default();
                serde_json::json!({
                    "name": o.config.name,
                    "url": format!("{}://{}", o.config.scheme, o.config.authority),
                    "region": o.config.region,
                    "weight": o.config.weight,
                    "state": if s.down {
                        "down"
                    } else if s.ejected {
                        "ejected"
                    } else {
                        "up"
                    },
                    "health": o.config.health.as_ref().map(|h| {
                        serde_json::json!({
                            "path": h.path.as_str(),
                            "interval_ms": h.interval.as_millis() as u64,
                            "rise": h.rise,
                            "fall": h.fall,
                            "checks": s.checks,
                            "last_check": s.last_check.as_ref().map(|c| serde_json::json!({
                                "passed": c.passed,
                                "status": c.status.map(|st| st.as_u16()),
                                "latency_ms": (c.latency.as_secs_f64() * 100_000.0).round() / 100.0,
                                "error": c.error,
                                "seconds_ago": (now.saturating_duration_since(c.at).as_secs_f64() * 10.0).round() / 10.0,
                            })),
                        })
                    }),
                    "latency_ms": (s.latency_us / 10.0).round() / 100.0,
                    "in_flight": s.in_flight,
                    "requests": s.requests,
                    "errors": s.errors,
                    "ejections": s.ejections,
                })
            })
            .collect();
        let mut text = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".to_owned());
        text.push('\n');
        text
    }

    /// Each origin's values for `/metrics`, from one snapshot per origin so that the series
    /// of one scrape agree with each other; an origin without a state is left out.
    pub fn origin_series(&self) -> Vec<OriginSeries> {
        let now = Instant::now();
        self.origin_names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let s = self.selector.state().snapshot(i, now)?;
                Some(OriginSeries {
                    name: name.clone(),
                    up: s.in_rotation(),
                    latency_seconds: s.latency_us / 1e6,
                    in_flight: s.in_flight,
                    responses: s.requests,
                    failures: s.errors,
                    ejections: s.ejections,
                    durations: s.durations,
                })
            })
            .collect()
    }
}

/// How many origins are in each state (`GET /status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OriginCounts {
    pub total: usize,
    /// In rotation: neither down nor ejected.
    pub up: usize,
    /// Down by their active checks.
    pub down: usize,
    /// Ejected by passive detection (and not down).
    pub ejected: usize,
}

impl Proxy {
    /// How many configured origins are up, down and ejected now.
    pub fn origin_counts(&self) -> OriginCounts {
        let now = Instant::now();
        let mut c = OriginCounts {
            total: self.origins.len(),
            ..OriginCounts::default()
        };
        for i in 0..self.origins.len() {
            match self.selector.state().snapshot(i, now) {
                Some(s) if s.down => c.down += 1,
                Some(s) if s.ejected => c.ejected += 1,
                _ => c.up += 1,
            }
        }
        c
    }
}

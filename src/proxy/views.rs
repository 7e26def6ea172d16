//! Views of the request path's state for the admin listener: per-origin JSON for
//! `GET /origins` and per-origin series for `/metrics`, read from `origin::state` snapshots.

use super::*;

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

    /// Per-origin series for `/metrics`: up (1, or 0 when down by its checks or ejected),
    /// latency estimate, in-flight, requests, errors, ejections.
    pub fn render_origin_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let now = Instant::now();
        // One snapshot per origin, so the series of one scrape agree with each other.
        let states: Vec<_> = (0..self.origins.len())
            .map(|o| self.selector.state().snapshot(o, now))
            .collect();
        type Series = (&'static str, &'static str, &'static str);
        let series: [Series; 6] = [
            (
                "edgecache_origin_up",
                "gauge",
                "1 when the origin is in rotation, 0 when down by its health checks or ejected.",
            ),
            (
                "edgecache_origin_latency_seconds",
                "gauge",
                "Peak-EWMA time to first byte.",
            ),
            (
                "edgecache_origin_in_flight",
                "gauge",
                "Requests waiting for the origin's answer.",
            ),
            (
                "edgecache_origin_responses_total",
                "counter",
                "Origin requests answered or failed, by origin.",
            ),
            (
                "edgecache_origin_failures_total",
                "counter",
                "Origin requests that failed (connect, reset, timeout, 5xx), by origin.",
            ),
            (
                "edgecache_origin_ejections_total",
                "counter",
                "Times passive detection ejected the origin.",
            ),
        ];
        for (i, (name, kind, help)) in series.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (client, st) in self.origins.iter().zip(&states) {
                let Some(st) = st else {
                    continue;
                };
                let value = match i {
                    0 => f64::from(u8::from(st.in_rotation())),
                    1 => st.latency_us / 1e6,
                    2 => f64::from(st.in_flight),
                    3 => st.requests as f64,
                    4 => st.errors as f64,
                    _ => f64::from(st.ejections),
                };
                let label = client
                    .config
                    .name
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = writeln!(out, "{name}{{origin=\"{label}\"}} {value}");
            }
        }
    }
}

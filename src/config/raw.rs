//! The configuration file exactly as written: serde types with `deny_unknown_fields`.
//!
//! Values that later checks may reject (names, addresses, paths) are wrapped in
//! [`toml::Spanned`] so that an error can point at the line and column that caused it.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) tls: RawTls,
    #[serde(default)]
    pub(crate) cache: RawCache,
    #[serde(default)]
    pub(crate) origins: Vec<RawOrigin>,
    #[serde(default)]
    pub(crate) sites: Vec<RawSite>,
    pub(crate) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(crate) pools: Vec<RawPool>,
    #[serde(default)]
    pub(crate) geo: RawGeo,
    pub(crate) health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    pub(crate) retries: RawRetries,
    #[serde(default)]
    pub(crate) dns: RawDns,
    #[serde(default)]
    pub(crate) log: RawLog,
    pub(crate) cluster: Option<Spanned<RawCluster>>,
}

/// `[cluster]`: this node's place in a fleet (see `crate::cluster`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) name: Option<Spanned<String>>,
    pub(crate) node: Option<Spanned<String>>,
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) advertise: Option<Spanned<String>>,
    pub(crate) advertise_env: Option<Spanned<String>>,
    pub(crate) etcd: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) peers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) peers_dns: Option<Spanned<String>>,
    pub(crate) lease_ttl: Option<Duration>,
    pub(crate) hot_copies: Option<bool>,
    pub(crate) peer_timeout: Option<Duration>,
}

/// `[log]`: where the access and error logs go, their format, the default filter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub(crate) access: Option<Spanned<String>>,
    pub(crate) error: Option<Spanned<String>>,
    pub(crate) format: Option<Spanned<String>>,
    pub(crate) level: Option<Spanned<String>>,
}

/// `[health]` and `[origins.health]`: active health checks. Every field is optional; an
/// origin's section overrides the defaults from `[health]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub(crate) enabled: Option<bool>,
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) interval: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) expect_status: Option<Spanned<Vec<Spanned<u16>>>>,
    pub(crate) rise: Option<Spanned<u32>>,
    pub(crate) fall: Option<Spanned<u32>>,
}

/// `[retries]`: the retry budget.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetries {
    pub(crate) budget: Option<Spanned<f64>>,
    pub(crate) min_per_second: Option<Spanned<u32>>,
}

/// `[dns]`: how origin host names are resolved.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    #[serde(default)]
    pub(crate) servers: Vec<Spanned<String>>,
    pub(crate) min_ttl: Option<Duration>,
    pub(crate) max_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) token: Option<Spanned<String>>,
    pub(crate) token_env: Option<Spanned<String>>,
    pub(crate) public_metrics: Option<bool>,
    pub(crate) max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    pub(crate) purge_allow: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    #[serde(default)]
    pub(crate) http: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) https: Vec<Spanned<String>>,
    pub(crate) workers: Option<Spanned<usize>>,
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) send_timeout: Option<Duration>,
    pub(crate) max_header_bytes: Option<Spanned<Size>>,
    pub(crate) max_connections: Option<Spanned<usize>>,
    pub(crate) shutdown_grace: Option<Duration>,
    pub(crate) h2_max_concurrent_streams: Option<Spanned<u32>>,
    pub(crate) h2_max_pending_resets: Option<usize>,
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<Spanned<String>>,
    pub(crate) client_address_header: Option<Spanned<String>>,
    pub(crate) via_name: Option<Spanned<String>>,
    pub(crate) rate_per_client: Option<Spanned<String>>,
    pub(crate) burst_per_client: Option<Spanned<i64>>,
    pub(crate) max_connections_per_client: Option<Spanned<i64>>,
    pub(crate) upgrade_socket: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    #[serde(default)]
    pub(crate) certificates: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub(crate) hosts: Spanned<Vec<Spanned<String>>>,
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub(crate) memory: Option<Spanned<Size>>,
    pub(crate) max_object_size: Option<Spanned<Size>>,
    pub(crate) sendfile: Option<bool>,
    pub(crate) sendfile_min_size: Option<Spanned<Size>>,
    pub(crate) fill_memory: Option<Spanned<Size>>,
    pub(crate) cache_control_field: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOrigin {
    pub(crate) name: Spanned<String>,
    pub(crate) url: Spanned<String>,
    pub(crate) host_header: Option<Spanned<String>>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) ca: Option<Spanned<String>>,
    pub(crate) max_idle_connections: Option<usize>,
    pub(crate) region: Option<String>,
    pub(crate) weight: Option<Spanned<u32>>,
    pub(crate) health: Option<Spanned<RawHealth>>,
    pub(crate) max_connections: Option<Spanned<usize>>,
    pub(crate) client_cert: Option<Spanned<String>>,
    pub(crate) client_key: Option<Spanned<String>>,
    pub(crate) fail_on: Option<Spanned<Vec<Spanned<u16>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub(crate) name: Spanned<String>,
    pub(crate) origins: Spanned<Vec<Spanned<String>>>,
    pub(crate) spill_latency: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGeo {
    pub(crate) database: Option<Spanned<String>>,
    pub(crate) header: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) networks: Vec<RawNetwork>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub(crate) cidr: Spanned<String>,
    pub(crate) country: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) name: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub(crate) matcher: Option<RawMatch>,
    pub(crate) pools: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    #[serde(default)]
    pub(crate) continents: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) countries: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) cidrs: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub(crate) hosts: Spanned<Vec<Spanned<String>>>,
    pub(crate) origin: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(crate) cache: RawSiteCache,
    /// Spanned, so that a rule missing `path` and `prefix` is reported at the rule.
    #[serde(default)]
    pub(crate) rules: Vec<Spanned<RawRule>>,
    pub(crate) methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) escaped_slashes: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) limits: RawSiteLimits,
    #[serde(default)]
    pub(crate) compression: RawCompression,
}

/// `[sites.compression]`: what the site compresses, and how.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCompression {
    pub(crate) enabled: Option<bool>,
    pub(crate) encodings: Option<Vec<Spanned<String>>>,
    pub(crate) types: Option<Vec<Spanned<String>>>,
    pub(crate) min_size: Option<Spanned<Size>>,
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) levels: RawLevels,
}

/// `[sites.compression.levels]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLevels {
    pub(crate) br: Option<Spanned<i64>>,
    pub(crate) zstd: Option<Spanned<i64>>,
    pub(crate) gzip: Option<Spanned<i64>>,
}

/// `[sites.limits]`: what the site answers from all clients together.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSiteLimits {
    pub(crate) rate: Option<Spanned<String>>,
    pub(crate) burst: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSiteCache {
    pub(crate) query: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) query_ignore: Vec<String>,
    #[serde(default)]
    pub(crate) key_headers: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) key_cookies: Vec<String>,
    pub(crate) client_no_cache: Option<Spanned<String>>,
    pub(crate) store_set_cookie: Option<bool>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    pub(crate) keep: Option<Duration>,
    pub(crate) heuristic_fraction: Option<Spanned<f64>>,
    pub(crate) heuristic_max: Option<Duration>,
    pub(crate) hit_for_miss: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) prefix: Option<Spanned<String>>,
    pub(crate) bypass: Option<bool>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) min_ttl: Option<Duration>,
    pub(crate) max_ttl: Option<Duration>,
    pub(crate) stale_while_revalidate: Option<Duration>,
    pub(crate) stale_if_error: Option<Duration>,
    #[serde(default)]
    pub(crate) status_ttl: std::collections::BTreeMap<String, Duration>,
    pub(crate) slice: Option<Spanned<Size>>,
}

/// A byte size such as `512MiB`, `64KiB`, `1GiB` or a plain integer of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"512MiB\", \"64KiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration such as `500ms`, `5s`, `2m`, `1h` or `1d`.
pub(crate) type Duration = Spanned<DurationValue>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurationValue(pub(crate) std::time::Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"500ms\", \"5s\", \"2m\", \"1h\" or \"1d\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses `512MiB` (units B, KiB, MiB, GiB, TiB); `1.5GiB` is refused (sizes are whole
/// numbers), `100` means bytes, `1MB` is refused as ambiguous.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a whole number and a unit such as \"512MiB\"")
    })?;
    // Exactly the units the documentation lists, binary multiples all. `MB` and friends are
    // refused rather than read: to some they mean 10^6 bytes, to others 2^20, and a size
    // silently 5% off from what its writer meant is worse than a question at load.
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            let binary = match other.to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => Some("KiB"),
                "M" | "MB" | "MIB" => Some("MiB"),
                "G" | "GB" | "GIB" => Some("GiB"),
                "T" | "TB" | "TIB" => Some("TiB"),
                _ => None,
            };
            return Err(match binary {
                Some(b) => format!(
                    "invalid size {text:?}: {other:?} is ambiguous; write {b} (a power of 1024) or the number of bytes"
                ),
                None => format!(
                    "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB or TiB)"
                ),
            });
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Parses a request rate, `100/s`, `2/min` (or `2/m`), `10/h`: the count and its period.
pub(crate) fn parse_rate(text: &str) -> Result<(u32, std::time::Duration), String> {
    let expected = || {
        format!("invalid rate {text:?}: expected requests per second, minute or hour, such as \"100/s\", \"2/min\" or \"10/h\"")
    };
    let (num, unit) = text.trim().split_once('/').ok_or_else(expected)?;
    let count: u32 = num.trim().parse().map_err(|_| expected())?;
    if count == 0 {
        return Err(format!(
            "invalid rate {text:?}: must allow at least one request (leave the key out for no limit)"
        ));
    }
    let secs = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => return Err(expected()),
    };
    Ok((count, std::time::Duration::from_secs(secs)))
}

/// Parses `500ms`, `5s`, `2m`, `1h`, `1d`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a whole number and a unit such as \"5s\"")
    })?;
    let ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => {
            return Err(format!(
                "invalid duration {text:?}: a unit is required (ms, s, m, h or d)"
            ))
        }
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5GiB").is_err());
        // Decimal-looking units are refused, never read as binary ones.
        for t in ["1MB", "1KB", "1GB", "1TB", "1M", "1k", "1mib"] {
            let e = parse_size(t).expect_err(t);
            assert!(e.contains("ambiguous"), "{e}");
        }
    }

    #[test]
    fn rates() {
        let s = std::time::Duration::from_secs;
        assert_eq!(parse_rate("100/s"), Ok((100, s(1))));
        assert_eq!(parse_rate(" 2 / min "), Ok((2, s(60))));
        assert_eq!(parse_rate("2/m"), Ok((2, s(60))));
        assert_eq!(parse_rate("10/h"), Ok((10, s(3600))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("100/d").is_err());
        assert!(parse_rate("-1/s").is_err());
        assert!(parse_rate("1.5/s").is_err());
        assert!(parse_rate("99999999999/s").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(parse_duration("5s"), Ok(std::time::Duration::from_secs(5)));
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            parse_duration("1d"),
            Ok(std::time::Duration::from_secs(86_400))
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}

//! What `edgecache check` prints for a valid configuration: listeners, certificates, clients,
//! the cache's bounds, origins, sites with their routes, pools, the admin listener and the
//! limits. Only formatting: every value was validated and resolved at load.

use std::net::SocketAddr;

use super::Config;

impl Config {
    /// A one-screen description of what would be served, for `edgecache check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "configuration {} is valid", self.source);
        let list = |v: &[SocketAddr]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(s, "listeners:");
        let _ = writeln!(s, "  http   {}", list(&self.server.http));
        let _ = writeln!(s, "  https  {}", list(&self.server.https));
        if !self.tls.certificates.is_empty() {
            let _ = writeln!(s, "certificates:");
            for (i, c) in self.tls.certificates.iter().enumerate() {
                let default = if i == 0 { " (default)" } else { "" };
                let _ = writeln!(s, "  {}{}  from {}", c.hosts.join(", "), default, c.source);
            }
        }
        let trusted: Vec<String> = self
            .server
            .trusted_proxies
            .iter()
            .chain(&self.geo.trusted_proxies)
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(
            s,
            "clients: named in {} by trusted proxies ({}), else the socket's address",
            self.server.client_address_header.as_str(),
            if trusted.is_empty() {
                "none".to_owned()
            } else {
                trusted.join(", ")
            }
        );
        let _ = write!(
            s,
            "cache: {} in memory, objects up to {}",
            human_size(self.cache.memory),
            human_size(self.cache.max_object_size)
        );
        let _ = match self.cache.sendfile_min_size {
            Some(min) => write!(s, ", sendfile from {}", human_size(min)),
            None => write!(s, ", sendfile off"),
        };
        let _ = writeln!(
            s,
            ", fills hold up to {}",
            human_size(self.cache.fill_memory)
        );
        self.summary_origins(&mut s);
        self.summary_sites(&mut s);
        self.summary_pools_admin_limits(&mut s);
        s
    }

    /// `check`'s lines for the origins and the geo database.
    fn summary_origins(&self, s: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(s, "origins:");
        for o in &self.origins {
            let _ = write!(
                s,
                "  {:<12} {}://{}  connect {:?}, response {:?}",
                o.name, o.scheme, o.authority, o.connect_timeout, o.timeout
            );
            if let Some(h) = &o.health {
                let _ = write!(
                    s,
                    "; checked: GET {} every {:?} (rise {}, fall {})",
                    h.path, h.interval, h.rise, h.fall
                );
            }
            if let Some(m) = o.max_connections {
                let _ = write!(s, "; at most {m} connections");
            }
            if o.client_auth.is_some() {
                let _ = write!(s, "; client certificate");
            }
            let fail_on: Vec<String> = o.fail_on.iter().map(u16::to_string).collect();
            let _ = write!(s, "; failing on {}", fail_on.join(" "));
            let _ = writeln!(s);
        }
        if let Some(db) = &self.geo.database {
            let _ = writeln!(s, "geo database: {} ({})", db.path().display(), db.kind());
        }
    }

    /// `check`'s lines for the sites: hosts, methods, routes, rules and keys.
    fn summary_sites(&self, s: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(s, "sites:");
        for site in &self.sites {
            let origin = self
                .origins
                .get(site.origin)
                .map(|o| o.name.as_str())
                .unwrap_or("?");
            let _ = writeln!(s, "  {}  ->  {}", site.hosts.join(", "), origin);
            let methods: Vec<&str> = site.methods.list().iter().map(|m| m.as_str()).collect();
            let _ = writeln!(
                s,
                "    methods {}; encoded slashes {}",
                methods.join(" "),
                if site.refuse_escaped_slashes {
                    "refused"
                } else {
                    "kept"
                }
            );
            let named_routes = site.routes.len() > 1
                || site.routes.iter().any(|r| {
                    r.pools.iter().any(|&p| {
                        self.pools
                            .get(p)
                            .is_some_and(|p| !p.name.starts_with("origin:"))
                    })
                });
            if named_routes {
                for r in &site.routes {
                    let pools: Vec<&str> = r
                        .pools
                        .iter()
                        .filter_map(|&p| self.pools.get(p))
                        .map(|p| p.name.as_str())
                        .collect();
                    let when = match &r.matcher {
                        None => "default".to_owned(),
                        Some(m) => {
                            let code =
                                |c: &crate::geo::Code| String::from_utf8_lossy(c).into_owned();
                            let mut parts: Vec<String> = m.continents.iter().map(code).collect();
                            parts.extend(m.countries.iter().map(code));
                            parts.extend(m.cidrs.iter().map(|n| n.to_string()));
                            parts.join(" ")
                        }
                    };
                    let _ = writeln!(
                        s,
                        "    route {} ({when}): pools {}",
                        r.name,
                        pools.join(" > ")
                    );
                }
            }
            if let Some(r) = &site.rate {
                let _ = writeln!(s, "    rate limit {r}, all clients together");
            }
            let z = &site.compression;
            if z.enabled && !z.encodings.is_empty() {
                let names: Vec<&str> = z.encodings.iter().map(|c| c.name()).collect();
                let _ = writeln!(
                    s,
                    "    compression: {} from {} bytes, {} type pattern(s){}",
                    names.join(", "),
                    z.min_size,
                    z.types.len(),
                    if z.stream {
                        ", streamed when not stored"
                    } else {
                        ""
                    }
                );
            } else {
                let _ = writeln!(s, "    compression: off");
            }
            let c = &site.cache.settings;
            let _ = writeln!(
                s,
                "    grace: stale-while-revalidate {:?}, stale-if-error {:?}, keep {:?}; {} path rule(s)",
                c.default_stale_while_revalidate,
                c.default_stale_if_error,
                c.keep,
                site.rules.len()
            );
        }
    }

    /// `check`'s lines for the pools, the admin listener and the per-client limits.
    fn summary_pools_admin_limits(&self, s: &mut String) {
        use std::fmt::Write;
        for p in self.pools.iter().filter(|p| !p.name.starts_with("origin:")) {
            let names: Vec<&str> = p
                .origins
                .iter()
                .filter_map(|&o| self.origins.get(o))
                .map(|o| o.name.as_str())
                .collect();
            let _ = writeln!(s, "pool {}: {}", p.name, names.join(", "));
        }
        match &self.admin {
            Some(a) => {
                let (open, guarded) = if a.public_metrics {
                    ("healthz, readyz, metrics", "origins, purge")
                } else {
                    ("healthz, readyz", "metrics, origins, purge")
                };
                let guard = if a.token.is_some() {
                    "with the token"
                } else {
                    "refused: no token"
                };
                let _ = writeln!(
                    s,
                    "admin: {}{} ({open}; {guarded} {guard}), at most {} connections",
                    a.listen,
                    if a.listen.ip().is_loopback() {
                        ""
                    } else {
                        " (not loopback)"
                    },
                    a.max_connections
                );
                let nets: Vec<String> = a.purge_allow.iter().map(|n| n.to_string()).collect();
                let _ = writeln!(
                    s,
                    "PURGE method: from clients in {}{}",
                    if nets.is_empty() {
                        "no network".to_owned()
                    } else {
                        nets.join(", ")
                    },
                    if a.token.is_some() {
                        ", or with the admin token"
                    } else {
                        ""
                    }
                );
            }
            None => {
                let _ = writeln!(s, "admin: off");
            }
        }
        if let Some(k) = &self.cluster {
            use super::Discovery;
            let found = match &k.discovery {
                Discovery::Etcd(urls) => format!("members from etcd {}", urls.join(", ")),
                Discovery::Peers(p) => format!("{} static peers", p.len()),
                Discovery::PeersDns { name, port } => format!("members from DNS {name}:{port}"),
            };
            let _ = writeln!(
                s,
                "cluster {}: node {}, peer listener {} (advertised {}), {found}, {} copies on non-owners",
                k.name,
                k.node,
                k.listen,
                k.advertise,
                if k.hot_copies { "hot" } else { "no" }
            );
        }
        let mut per_client = Vec::new();
        if let Some(r) = &self.server.rate_per_client {
            per_client.push(r.to_string());
        }
        if let Some(n) = self.server.max_connections_per_client {
            per_client.push(format!("{n} connections (trusted proxies exempt)"));
        }
        let _ = writeln!(
            s,
            "per client: {}",
            if per_client.is_empty() {
                "no limits".to_owned()
            } else {
                per_client.join("; ")
            }
        );
        let _ = write!(
            s,
            "limits: {} connections, {} header bytes, header read {:?}, idle {:?}, send {:?}, grace {:?}",
            self.server.max_connections,
            self.server.max_header_bytes,
            self.server.header_read_timeout,
            self.server.idle_timeout,
            self.server.send_timeout,
            self.server.shutdown_grace
        );
    }
}

/// Formats a byte count with a binary unit, for summaries.
fn human_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{}", n / size, name);
        }
    }
    for (name, size) in UNITS {
        if n >= size {
            return format!("{:.1}{}", n as f64 / size as f64, name);
        }
    }
    format!("{n}B")
}

//! `edgecache check --print`: the effective configuration as TOML, every default filled in.
//!
//! Built from the validated [`Config`], so the defaults shown are the ones the node runs with,
//! not a copy of them that could drift. The output is accepted by `check` again and yields
//! the same configuration (a test prints, loads the print and prints again). Files are named
//! by absolute path, so the print can be loaded from anywhere. Two things are not printed as
//! they were written: `[health]` (its defaults are folded into each origin's own
//! `[origins.health]`) and an admin token written in the file (a secret: a comment says it is
//! set; `token_env` is printed as it is).
//!
//! One function per section, in the order of the file; a new section adds its function to
//! [`Config::to_toml`] and nothing else.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::{ClientNoCache, Config, PathMatch, QueryMode, Rate};

impl Config {
    /// The effective configuration as TOML (see the module documentation).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# The effective configuration of {}, every default filled in (edgecache check --print).",
            self.source
        );
        let sections: [fn(&Config, &mut String); 12] = [
            server, tls, cache, origins, pools, geo, sites, admin, retries, dns, log, cluster,
        ];
        for section in sections {
            out.push('\n');
            section(self, &mut out);
        }
        out
    }
}

/// A TOML basic string: quoted, with `"`, `\` and control characters escaped.
fn q(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", u32::from(c));
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A list of quoted strings.
fn list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| q(&i.to_string())).collect();
    format!("[{}]", items.join(", "))
}

fn path(p: &Path) -> String {
    q(&std::path::absolute(p)
        .unwrap_or_else(|_| p.to_owned())
        .display()
        .to_string())
}

/// A duration in the largest unit that states it exactly.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let text = match ms {
        0 => "0s".to_owned(),
        ms if ms.is_multiple_of(86_400_000) => format!("{}d", ms / 86_400_000),
        ms if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        ms if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        ms if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    };
    q(&text)
}

/// A size in the largest binary unit that states it exactly.
fn size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return q(&format!("{}{unit}", bytes >> shift));
        }
    }
    bytes.to_string()
}

fn rate(r: &Rate) -> String {
    let unit = match r.period.as_secs() {
        3600 => "h",
        60 => "min",
        _ => "s",
    };
    q(&format!("{}/{unit}", r.count))
}

fn server(c: &Config, out: &mut String) {
    let s = &c.server;
    let _ = writeln!(out, "[server]");
    let _ = writeln!(out, "http = {}", list(&s.http));
    let _ = writeln!(out, "https = {}", list(&s.https));
    match s.workers {
        Some(n) => {
            let _ = writeln!(out, "workers = {n}");
        }
        None => out.push_str("# workers: one per core (the default)\n"),
    }
    let _ = writeln!(
        out,
        "header_read_timeout = {}",
        duration(s.header_read_timeout)
    );
    let _ = writeln!(out, "idle_timeout = {}", duration(s.idle_timeout));
    let _ = writeln!(out, "send_timeout = {}", duration(s.send_timeout));
    let _ = writeln!(
        out,
        "max_header_bytes = {}",
        size(s.max_header_bytes as u64)
    );
    let _ = writeln!(out, "max_connections = {}", s.max_connections);
    let _ = writeln!(out, "shutdown_grace = {}", duration(s.shutdown_grace));
    let _ = writeln!(
        out,
        "h2_max_concurrent_streams = {}",
        s.h2_max_concurrent_streams
    );
    let _ = writeln!(out, "h2_max_pending_resets = {}", s.h2_max_pending_resets);
    let _ = writeln!(out, "trusted_proxies = {}", list(&s.trusted_proxies));
    let _ = writeln!(
        out,
        "client_address_header = {}",
        q(s.client_address_header.as_str())
    );
    let _ = writeln!(out, "via_name = {}", q(&s.via_name));
    match &s.rate_per_client {
        Some(r) => {
            let _ = writeln!(out, "rate_per_client = {}", rate(r));
            let _ = writeln!(out, "burst_per_client = {}", r.burst);
        }
        None => out.push_str("# rate_per_client: no limit (the default)\n"),
    }
    match s.max_connections_per_client {
        Some(n) => {
            let _ = writeln!(out, "max_connections_per_client = {n}");
        }
        None => out.push_str("# max_connections_per_client: no limit (the default)\n"),
    }
    match &s.upgrade_socket {
        Some(p) => {
            let _ = writeln!(out, "upgrade_socket = {}", path(p));
        }
        None => out.push_str("# upgrade_socket: none (the default)\n"),
    }
}

fn tls(c: &Config, out: &mut String) {
    if c.tls.certificates.is_empty() {
        out.push_str("# [[tls.certificates]]: none\n");
    }
    for cert in &c.tls.certificates {
        let _ = writeln!(out, "[[tls.certificates]]");
        let _ = writeln!(out, "hosts = {}", list(&cert.hosts));
        let _ = writeln!(out, "cert = {}", path(Path::new(&cert.source)));
        match &cert.key_file {
            Some(k) => {
                let _ = writeln!(out, "key = {}", path(k));
            }
            None => out.push_str("# key: given in memory, not from a file\n"),
        }
    }
}

fn cache(c: &Config, out: &mut String) {
    let k = &c.cache;
    let _ = writeln!(out, "[cache]");
    let _ = writeln!(out, "memory = {}", size(k.memory));
    let _ = writeln!(out, "max_object_size = {}", size(k.max_object_size));
    let _ = writeln!(out, "sendfile = {}", k.sendfile_min_size.is_some());
    if let Some(min) = k.sendfile_min_size {
        let _ = writeln!(out, "sendfile_min_size = {}", size(min));
    }
    let _ = writeln!(out, "fill_memory = {}", size(k.fill_memory));
    let _ = writeln!(
        out,
        "cache_control_field = {}",
        q(k.cache_control_field.as_str())
    );
}

fn origins(c: &Config, out: &mut String) {
    for o in &c.origins {
        let _ = writeln!(out, "[[origins]]");
        let _ = writeln!(out, "name = {}", q(&o.name));
        let _ = writeln!(
            out,
            "url = {}",
            q(&format!("{}://{}", o.scheme, o.authority))
        );
        if let Some(h) = o.host_header.as_ref().and_then(|h| h.to_str().ok()) {
            let _ = writeln!(out, "host_header = {}", q(h));
        }
        let _ = writeln!(out, "connect_timeout = {}", duration(o.connect_timeout));
        let _ = writeln!(out, "timeout = {}", duration(o.timeout));
        if let Some(ca) = &o.ca_file {
            let _ = writeln!(out, "ca = {}", path(ca));
        }
        let _ = writeln!(out, "max_idle_connections = {}", o.max_idle_connections);
        if let Some(r) = &o.region {
            let _ = writeln!(out, "region = {}", q(r));
        }
        let _ = writeln!(out, "weight = {}", o.weight);
        if let Some(m) = o.max_connections {
            let _ = writeln!(out, "max_connections = {m}");
        }
        if let Some(a) = &o.client_auth {
            let _ = writeln!(out, "client_cert = {}", path(&a.cert_file));
            let _ = writeln!(out, "client_key = {}", path(&a.key_file));
        }
        let statuses: Vec<String> = o.fail_on.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "fail_on = [{}]", statuses.join(", "));
        match &o.health {
            Some(h) => {
                let _ = writeln!(out, "[origins.health]");
                let _ = writeln!(out, "path = {}", q(h.path.as_str()));
                let _ = writeln!(out, "interval = {}", duration(h.interval));
                let _ = writeln!(out, "timeout = {}", duration(h.timeout));
                let statuses: Vec<String> = h.expect_status.iter().map(u16::to_string).collect();
                let _ = writeln!(out, "expect_status = [{}]", statuses.join(", "));
                let _ = writeln!(out, "rise = {}", h.rise);
                let _ = writeln!(out, "fall = {}", h.fall);
            }
            None => out.push_str("# no active health checks\n"),
        }
    }
}

/// Whether pool `p` is the one a site's `origin = "name"` made (not written as a pool).
fn implicit_pool(c: &Config, p: usize) -> bool {
    c.sites
        .iter()
        .enumerate()
        .any(|(i, s)| origin_site(s, i) == Some(p))
}

/// The pool of a site written with `origin = "name"`: its one route, made by validation.
fn origin_site(s: &super::Site, i: usize) -> Option<usize> {
    match s.routes.as_slice() {
        [r] if r.matcher.is_none() && *r.name == *format!("sites[{i}].origin") => {
            // Validation names the pool it makes `origin:NAME` and gives it one origin.
            r.pools.first().copied()
        }
        _ => None,
    }
}

fn pools(c: &Config, out: &mut String) {
    for (i, p) in c.pools.iter().enumerate() {
        if implicit_pool(c, i) {
            continue;
        }
        let _ = writeln!(out, "[[pools]]");
        let _ = writeln!(out, "name = {}", q(&p.name));
        let names = p
            .origins
            .iter()
            .filter_map(|&o| c.origins.get(o).map(|o| o.name.as_str()));
        let _ = writeln!(out, "origins = {}", list(names));
        if let Some(d) = p.spill_latency {
            let _ = writeln!(out, "spill_latency = {}", duration(d));
        }
    }
}

fn geo(c: &Config, out: &mut String) {
    let g = &c.geo;
    let _ = writeln!(out, "[geo]");
    if let Some(db) = &g.database {
        let _ = writeln!(out, "database = {}", path(db.path()));
    }
    if let Some(h) = &g.header {
        let _ = writeln!(out, "header = {}", q(h.as_str()));
    }
    let _ = writeln!(out, "trusted_proxies = {}", list(&g.trusted_proxies));
    for (net, country) in &g.networks {
        let _ = writeln!(out, "[[geo.networks]]");
        let _ = writeln!(out, "cidr = {}", q(&net.to_string()));
        let _ = writeln!(out, "country = {}", q(&String::from_utf8_lossy(country)));
    }
}

fn codes(list_of: &[crate::geo::Code]) -> String {
    list(
        list_of
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    )
}

/// A site's `[sites.cache]`.
fn site_cache(k: &crate::config::SiteCache, out: &mut String) {
    let _ = writeln!(out, "[sites.cache]");
    let query = match k.query {
        QueryMode::Keep => "keep",
        QueryMode::Sort => "sort",
        QueryMode::Ignore => "ignore",
    };
    let _ = writeln!(out, "query = {}", q(query));
    let _ = writeln!(out, "query_ignore = {}", list(&k.query_ignore));
    let _ = writeln!(out, "key_headers = {}", list(&k.key_headers));
    let _ = writeln!(out, "key_cookies = {}", list(&k.key_cookies));
    let no_cache = match k.client_no_cache {
        ClientNoCache::Revalidate => "revalidate",
        ClientNoCache::Ignore => "ignore",
    };
    let _ = writeln!(out, "client_no_cache = {}", q(no_cache));
    let st = &k.settings;
    let _ = writeln!(out, "store_set_cookie = {}", st.store_set_cookie);
    let _ = writeln!(
        out,
        "stale_while_revalidate = {}",
        duration(st.default_stale_while_revalidate)
    );
    let _ = writeln!(
        out,
        "stale_if_error = {}",
        duration(st.default_stale_if_error)
    );
    let _ = writeln!(out, "keep = {}", duration(st.keep));
    let _ = writeln!(out, "heuristic_fraction = {:?}", st.heuristic_fraction);
    let _ = writeln!(out, "heuristic_max = {}", duration(st.heuristic_max));
    let _ = writeln!(out, "hit_for_miss = {}", duration(k.hit_for_miss));
}

/// A site's `[sites.compression]`.
fn compression(z: &crate::compress::Compression, out: &mut String) {
    let _ = writeln!(out, "[sites.compression]");
    let _ = writeln!(out, "enabled = {}", z.enabled);
    let _ = writeln!(
        out,
        "encodings = {}",
        list(z.encodings.iter().map(|c| c.name()))
    );
    let _ = writeln!(out, "types = {}", list(&z.types));
    let _ = writeln!(out, "min_size = {}", size(z.min_size));
    let _ = writeln!(out, "stream = {}", z.stream);
    let _ = writeln!(
        out,
        "levels = {{ br = {}, zstd = {}, gzip = {} }}",
        z.levels.br, z.levels.zstd, z.levels.gzip
    );
}

fn sites(c: &Config, out: &mut String) {
    for (i, s) in c.sites.iter().enumerate() {
        let _ = writeln!(out, "[[sites]]");
        let _ = writeln!(out, "hosts = {}", list(&s.hosts));
        let origin = origin_site(s, i)
            .and_then(|p| c.pools.get(p))
            .and_then(|p| p.origins.first())
            .and_then(|&o| c.origins.get(o));
        if let Some(o) = origin {
            let _ = writeln!(out, "origin = {}", q(&o.name));
        }
        let methods = s.methods.list().iter().map(|m| m.as_str());
        let _ = writeln!(out, "methods = {}", list(methods));
        let slashes = if s.refuse_escaped_slashes {
            "refuse"
        } else {
            "keep"
        };
        let _ = writeln!(out, "escaped_slashes = {}", q(slashes));
        site_cache(&s.cache, out);
        let _ = writeln!(out, "[sites.limits]");
        match &s.rate {
            Some(r) => {
                let _ = writeln!(out, "rate = {}", rate(r));
                let _ = writeln!(out, "burst = {}", r.burst);
            }
            None => out.push_str("# rate: no limit (the default)\n"),
        }
        compression(&s.compression, out);
        if origin.is_none() {
            for r in &s.routes {
                let _ = writeln!(out, "[[sites.routes]]");
                let _ = writeln!(out, "name = {}", q(&r.name));
                if let Some(m) = &r.matcher {
                    let _ = writeln!(
                        out,
                        "match = {{ continents = {}, countries = {}, cidrs = {} }}",
                        codes(&m.continents),
                        codes(&m.countries),
                        list(&m.cidrs)
                    );
                }
                let names = r
                    .pools
                    .iter()
                    .filter_map(|&p| c.pools.get(p).map(|p| p.name.as_str()));
                let _ = writeln!(out, "pools = {}", list(names));
            }
        }
        for r in &s.rules {
            let _ = writeln!(out, "[[sites.rules]]");
            match &r.path {
                PathMatch::Glob(g) => {
                    let _ = writeln!(out, "path = {}", q(g));
                }
                PathMatch::Prefix(p) => {
                    let _ = writeln!(out, "prefix = {}", q(p));
                }
            }
            let _ = writeln!(out, "bypass = {}", r.bypass);
            if let Some(n) = r.slice {
                let _ = writeln!(out, "slice = {}", size(n));
            }
            let st = &r.settings;
            for (key, v) in [
                ("ttl", st.force_ttl),
                ("min_ttl", st.min_ttl),
                ("max_ttl", st.max_ttl),
                ("stale_while_revalidate", st.stale_while_revalidate),
                ("stale_if_error", st.stale_if_error),
            ] {
                if let Some(d) = v {
                    let _ = writeln!(out, "{key} = {}", duration(d));
                }
            }
            if !st.status_ttl.is_empty() {
                let pairs: Vec<String> = st
                    .status_ttl
                    .iter()
                    .map(|(code, d)| format!("{code} = {}", duration(*d)))
                    .collect();
                let _ = writeln!(out, "status_ttl = {{ {} }}", pairs.join(", "));
            }
        }
    }
}

fn admin(c: &Config, out: &mut String) {
    let Some(a) = &c.admin else {
        out.push_str("# [admin]: none (no admin listener, no PURGE)\n");
        return;
    };
    let _ = writeln!(out, "[admin]");
    let _ = writeln!(out, "listen = {}", q(&a.listen.to_string()));
    match (&a.token_env, &a.token) {
        (Some(env), _) => {
            let _ = writeln!(out, "token_env = {}", q(env));
        }
        (None, Some(_)) => out.push_str("# token: set in the file (a secret: not printed)\n"),
        (None, None) => {
            out.push_str("# token: none (every endpoint but /healthz and /readyz refused)\n")
        }
    }
    let _ = writeln!(out, "public_metrics = {}", a.public_metrics);
    let _ = writeln!(out, "max_connections = {}", a.max_connections);
    let _ = writeln!(out, "purge_allow = {}", list(&a.purge_allow));
}

fn retries(c: &Config, out: &mut String) {
    let _ = writeln!(out, "[retries]");
    let _ = writeln!(out, "budget = {:?}", c.retries.budget);
    let _ = writeln!(out, "min_per_second = {}", c.retries.min_per_second);
}

fn dns(c: &Config, out: &mut String) {
    let d = &c.dns;
    let _ = writeln!(out, "[dns]");
    let _ = writeln!(out, "servers = {}", list(&d.servers));
    let _ = writeln!(out, "min_ttl = {}", duration(d.min_ttl));
    let _ = writeln!(out, "max_ttl = {}", duration(d.max_ttl));
}

fn cluster(c: &Config, out: &mut String) {
    use super::Discovery;
    let Some(k) = &c.cluster else {
        out.push_str("# [cluster]: none (this node on its own)\n");
        return;
    };
    let _ = writeln!(out, "[cluster]");
    let _ = writeln!(out, "name = {}", q(&k.name));
    let _ = writeln!(out, "node = {}", q(&k.node));
    let _ = writeln!(out, "listen = {}", q(&k.listen.to_string()));
    let _ = writeln!(out, "advertise = {}", q(&k.advertise.to_string()));
    match &k.discovery {
        Discovery::Etcd(urls) => {
            let _ = writeln!(out, "etcd = {}", list(urls));
        }
        Discovery::Peers(peers) => {
            let _ = writeln!(out, "peers = {}", list(peers));
        }
        Discovery::PeersDns { name, port } => {
            let _ = writeln!(out, "peers_dns = {}", q(&format!("{name}:{port}")));
        }
    }
    let _ = writeln!(out, "lease_ttl = {}", duration(k.lease_ttl));
    let _ = writeln!(out, "hot_copies = {}", k.hot_copies);
    let _ = writeln!(out, "peer_timeout = {}", duration(k.peer_timeout));
}

fn log(c: &Config, out: &mut String) {
    use crate::telemetry::{Destination, LogFormat};
    let destination = |d: &Destination| match d {
        Destination::Stdout => q("stdout"),
        Destination::Stderr => q("stderr"),
        Destination::Off => q("off"),
        Destination::File(p) => path(p),
    };
    let l = &c.log;
    let _ = writeln!(out, "[log]");
    let _ = writeln!(out, "access = {}", destination(&l.access));
    let _ = writeln!(out, "error = {}", destination(&l.error));
    let format = match l.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let _ = writeln!(out, "format = {}", q(format));
    match &l.level {
        Some(level) => {
            let _ = writeln!(out, "level = {}", q(level));
        }
        None => {
            let _ = writeln!(out, "# level: not set (info, or RUST_LOG)");
        }
    }
}

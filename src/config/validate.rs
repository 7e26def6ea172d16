//! Raw TOML types to validated [`Config`]: every problem is collected, with its position.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use http::uri::{Scheme, Uri};
use http::HeaderValue;
use ipnet::IpNet;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use toml::Spanned;

use super::raw::{RawConfig, Size};
use super::{
    Admin, Cache, Certificate, ClientAuth, ClientNoCache, Config, Diagnostic, Dns, Error, Geo,
    HealthCheck, Methods, Origin, PathMatch, Pool, QueryMode, Rate, Retries, Route, RouteMatch,
    Rule, Server, Site, SiteCache, Tls,
};

/// Collects diagnostics against one file's text.
struct Checker<'a> {
    text: &'a str,
    file: &'a str,
    errors: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: Some(key.into()),
            message: message.into(),
        });
    }
}

pub(super) fn from_toml(text: &str, file: &str, base: &Path) -> Result<Config, Error> {
    let mut ck = Checker {
        text,
        file,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = e.span().map(|s| ck.position(s.start)).unwrap_or((1, 1));
            return Err(Error::Invalid(vec![Diagnostic {
                file: file.to_owned(),
                line,
                column,
                key: e.span().and_then(|s| key_at(text, s.start)),
                message: parse_message(e.message(), e.span().and_then(|s| text.get(s.start..))),
            }]));
        }
    };
    let config = check(&mut ck, raw, base);
    if ck.errors.is_empty() {
        Ok(config)
    } else {
        Err(Error::Invalid(ck.errors))
    }
}

/// The parser's message on one line: it puts what it expected on a line of its own
/// ("invalid array\nexpected `]`"), and every line of a report starts `FILE:LINE:COLUMN:`.
/// For some characters it has no message at all (a carriage return alone in a comment);
/// then the character at the position (`at`, the text from there) is named.
fn parse_message(message: &str, at: Option<&str>) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if !line.is_empty() {
        return line;
    }
    match at.and_then(|t| t.chars().next()) {
        Some(c) => format!("{c:?} is not allowed here"),
        None => "not valid TOML".to_owned(),
    }
}

/// The dotted key (`server.workers`, `sites[1].routes[0].pools`) whose line holds `offset`,
/// read off the text: the parser's errors carry a position but not the key, and naming the
/// key is what lets a person find a mistake in a long file. `None` where the line is no
/// `key = value` and no table header precedes it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    // The table the line is in, and how many of each array of tables came before it.
    let mut table: Option<(String, bool)> = None;
    let mut counts: Vec<(String, usize)> = Vec::new();
    // A header line counts itself (an error about a whole table points at its header).
    let scanned = if table_header(line).is_some() {
        line_end
    } else {
        line_start
    };
    for l in text[..scanned].lines() {
        if let Some((name, array)) = table_header(l) {
            if array {
                counts.retain(|(n, _)| !n.starts_with(&format!("{name}.")));
                match counts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, c)) => *c += 1,
                    None => counts.push((name.clone(), 1)),
                }
            }
            table = Some((name, array));
        }
    }
    let path = table.map(|(name, _)| {
        let mut out = String::new();
        let mut prefix = String::new();
        for part in name.split('.') {
            if !prefix.is_empty() {
                prefix.push('.');
                out.push('.');
            }
            prefix.push_str(part);
            out.push_str(part);
            if let Some((_, c)) = counts.iter().find(|(n, _)| *n == prefix) {
                out.push_str(&format!("[{}]", c - 1));
            }
        }
        out
    });
    let leaf = (table_header(line).is_none())
        .then(|| line.split_once('='))
        .flatten()
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('#'));
    match (path, leaf) {
        (Some(p), Some(k)) => Some(format!("{p}.{k}")),
        (None, Some(k)) => Some(k.to_owned()),
        (p, None) => p,
    }
}

/// `[name]` → `(name, false)`, `[[name]]` → `(name, true)`; `None` for any other line
/// (including the lines of a multi-line array, which hold quotes or commas).
fn table_header(line: &str) -> Option<(String, bool)> {
    let l = line.split('#').next().unwrap_or("").trim();
    let (inner, array) = if let Some(i) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
        (i, true)
    } else {
        (l.strip_prefix('[')?.strip_suffix(']')?, false)
    };
    let inner = inner.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ');
    (!inner.is_empty() && inner.chars().all(plain))
        .then(|| {
            inner
                .split('.')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(".")
        })
        .map(|n| (n, array))
}

fn check(ck: &mut Checker<'_>, raw: RawConfig, base: &Path) -> Config {
    let defaults = Server::default();
    let mut server = Server {
        http: addresses(ck, "server.http", &raw.server.http),
        https: addresses(ck, "server.https", &raw.server.https),
        ..defaults
    };
    if raw.server.http.is_empty() && raw.server.https.is_empty() {
        server.http = vec![SocketAddr::from(([0, 0, 0, 0], 8080))];
    }
    if let Some(w) = &raw.server.workers {
        if *w.get_ref() == 0 || *w.get_ref() > 1024 {
            ck.error(w.span(), "server.workers", "must be between 1 and 1024");
        } else {
            server.workers = Some(*w.get_ref());
        }
    }
    let positive = |ck: &mut Checker<'_>,
                    key: &str,
                    v: &Option<super::raw::Duration>,
                    slot: &mut std::time::Duration| {
        if let Some(d) = v {
            if d.get_ref().0.is_zero() {
                ck.error(d.span(), key, "must be greater than zero");
            } else {
                *slot = d.get_ref().0;
            }
        }
    };
    positive(
        ck,
        "server.header_read_timeout",
        &raw.server.header_read_timeout,
        &mut server.header_read_timeout,
    );
    positive(
        ck,
        "server.idle_timeout",
        &raw.server.idle_timeout,
        &mut server.idle_timeout,
    );
    positive(
        ck,
        "server.send_timeout",
        &raw.server.send_timeout,
        &mut server.send_timeout,
    );
    if let Some(d) = &raw.server.shutdown_grace {
        server.shutdown_grace = d.get_ref().0;
    }
    if let Some(m) = &raw.server.max_header_bytes {
        let Size(n) = *m.get_ref();
        if !(8192..=(1 << 20)).contains(&n) {
            ck.error(
                m.span(),
                "server.max_header_bytes",
                "must be between 8KiB and 1MiB",
            );
        } else {
            server.max_header_bytes = n as usize;
        }
    }
    if let Some(m) = &raw.server.max_connections {
        if *m.get_ref() == 0 {
            ck.error(m.span(), "server.max_connections", "must be at least 1");
        } else {
            server.max_connections = *m.get_ref();
        }
    }
    if let Some(m) = &raw.server.h2_max_concurrent_streams {
        if *m.get_ref() == 0 {
            ck.error(
                m.span(),
                "server.h2_max_concurrent_streams",
                "must be at least 1",
            );
        } else {
            server.h2_max_concurrent_streams = *m.get_ref();
        }
    }
    if let Some(m) = raw.server.h2_max_pending_resets {
        server.h2_max_pending_resets = m;
    }
    for p in &raw.server.trusted_proxies {
        match parse_cidr(p.get_ref()) {
            Some(net) => server.trusted_proxies.push(net),
            None => ck.error(
                p.span(),
                "server.trusted_proxies",
                format!("{:?} is not an IP address or CIDR block", p.get_ref()),
            ),
        }
    }
    if let Some(h) = &raw.server.client_address_header {
        match h.get_ref().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => {
                server.client_address_header = crate::geo::AddressHeader::XForwardedFor;
            }
            "forwarded" => server.client_address_header = crate::geo::AddressHeader::Forwarded,
            _ => ck.error(
                h.span(),
                "server.client_address_header",
                format!(
                    "{:?} is not \"x-forwarded-for\" or \"forwarded\"",
                    h.get_ref()
                ),
            ),
        }
    }
    if let Some(v) = &raw.server.via_name {
        let name = v.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            ck.error(
                v.span(),
                "server.via_name",
                "must be a token of letters, digits, '-', '.' or '_'",
            );
        } else {
            server.via_name = name.clone();
        }
    }
    server.rate_per_client = rate(
        ck,
        ("server.rate_per_client", &raw.server.rate_per_client),
        ("server.burst_per_client", &raw.server.burst_per_client),
    );
    if let Some(m) = &raw.server.max_connections_per_client {
        match usize::try_from(*m.get_ref()) {
            Ok(n) if n >= 1 => server.max_connections_per_client = Some(n),
            _ => ck.error(
                m.span(),
                "server.max_connections_per_client",
                "must be at least 1 (leave the key out for no cap)",
            ),
        }
    }

    let mut tls = Tls::default();
    for (i, c) in raw.tls.certificates.iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        let mut hosts = Vec::new();
        if c.hosts.get_ref().is_empty() {
            ck.error(
                c.hosts.span(),
                format!("{key}.hosts"),
                "needs at least one host name",
            );
        }
        for h in c.hosts.get_ref() {
            match host_pattern(h.get_ref(), false) {
                Ok(h) => hosts.push(h),
                Err(m) => ck.error(h.span(), format!("{key}.hosts"), m),
            }
        }
        let cert_path = base.join(c.cert.get_ref());
        let key_path = base.join(c.key.get_ref());
        let cert_pem = match std::fs::read(&cert_path) {
            Ok(b) => Some(b),
            Err(e) => {
                ck.error(
                    c.cert.span(),
                    format!("{key}.cert"),
                    format!("cannot read {}: {e}", cert_path.display()),
                );
                None
            }
        };
        let key_pem = match std::fs::read(&key_path) {
            Ok(b) => Some(b),
            Err(e) => {
                ck.error(
                    c.key.span(),
                    format!("{key}.key"),
                    format!("cannot read {}: {e}", key_path.display()),
                );
                None
            }
        };
        if let (Some(cert_pem), Some(key_pem)) = (cert_pem, key_pem) {
            match certified_key_from_pem(&cert_pem, &key_pem) {
                Ok(ck_) => tls.certificates.push(Certificate {
                    hosts,
                    key: Arc::new(ck_),
                    source: cert_path.display().to_string(),
                }),
                Err(m) => ck.error(c.cert.span(), format!("{key}.cert"), m),
            }
        }
    }
    if !server.https.is_empty() && raw.tls.certificates.is_empty() {
        let span = raw.server.https.first().map(|s| s.span()).unwrap_or(0..0);
        ck.error(
            span,
            "server.https",
            "HTTPS listeners need at least one [[tls.certificates]]",
        );
    }

    let mut cache = Cache::default();
    if let Some(m) = &raw.cache.memory {
        if m.get_ref().0 < (1 << 20) {
            ck.error(m.span(), "cache.memory", "must be at least 1MiB");
        } else {
            cache.memory = m.get_ref().0;
        }
    }
    if let Some(m) = &raw.cache.max_object_size {
        // moka weighs entries in u32 units; keep a margin for headers.
        if m.get_ref().0 == 0 || m.get_ref().0 > (2 << 30) {
            ck.error(
                m.span(),
                "cache.max_object_size",
                "must be between 1B and 2GiB",
            );
        } else {
            cache.max_object_size = m.get_ref().0;
        }
    }
    if let Some(m) = &raw.cache.sendfile_min_size {
        // Smaller slices are never sent from the file (cache::mapped::MIN_SEND).
        if m.get_ref().0 < 32 << 10 {
            ck.error(
                m.span(),
                "cache.sendfile_min_size",
                "must be at least 32KiB",
            );
        } else {
            cache.sendfile_min_size = Some(m.get_ref().0);
        }
    }
    if raw.cache.sendfile == Some(false) {
        cache.sendfile_min_size = None;
    }
    if cache.max_object_size > cache.memory {
        let span = raw
            .cache
            .max_object_size
            .as_ref()
            .map(|m| m.span())
            .unwrap_or(0..0);
        ck.error(span, "cache.max_object_size", "is larger than cache.memory");
    }
    cache.fill_memory = (cache.memory / 4).max(cache.max_object_size);
    if let Some(m) = &raw.cache.fill_memory {
        if m.get_ref().0 < cache.max_object_size {
            ck.error(
                m.span(),
                "cache.fill_memory",
                "must be at least cache.max_object_size",
            );
        } else {
            cache.fill_memory = m.get_ref().0;
        }
    }

    let health_defaults = raw
        .health
        .as_ref()
        .map(|h| health(ck, "health", h.get_ref(), &HealthCheck::default()));
    let health_everywhere = raw
        .health
        .as_ref()
        .is_some_and(|h| h.get_ref().enabled != Some(false));
    let health_defaults = health_defaults.unwrap_or_default();

    let mut origins = Vec::new();
    let mut origin_index: HashMap<String, usize> = HashMap::new();
    for (i, o) in raw.origins.iter().enumerate() {
        let key = format!("origins[{i}]");
        let name = o.name.get_ref();
        if name.is_empty() {
            ck.error(o.name.span(), format!("{key}.name"), "must not be empty");
        } else if origin_index.contains_key(name) {
            ck.error(
                o.name.span(),
                format!("{key}.name"),
                format!("origin {name:?} is defined twice"),
            );
        }
        let uri: Option<Uri> = o.url.get_ref().parse().ok();
        let (scheme, authority) = match uri
            .as_ref()
            .and_then(|u| Some((u.scheme()?.clone(), u.authority()?.clone())))
        {
            Some((s, a)) if s == Scheme::HTTP || s == Scheme::HTTPS => {
                let path = uri.as_ref().map(|u| u.path()).unwrap_or("/");
                if path != "/" && !path.is_empty() {
                    ck.error(
                        o.url.span(),
                        format!("{key}.url"),
                        "must not have a path: the client's path is forwarded as is",
                    );
                }
                (s, a)
            }
            _ => {
                ck.error(
                    o.url.span(),
                    format!("{key}.url"),
                    format!(
                        "{:?} is not an http:// or https:// URL with a host",
                        o.url.get_ref()
                    ),
                );
                continue;
            }
        };
        let host_header = match &o.host_header {
            Some(h) => match HeaderValue::from_str(h.get_ref()) {
                Ok(v) if !h.get_ref().is_empty() => Some(v),
                _ => {
                    ck.error(
                        h.span(),
                        format!("{key}.host_header"),
                        "is not a valid Host value",
                    );
                    None
                }
            },
            None => None,
        };
        let ca =
            o.ca.as_ref()
                .and_then(|path| pem_certs(ck, path, &format!("{key}.ca"), base))
                .unwrap_or_default();
        let client_auth = client_auth(ck, &key, o, base, &scheme);
        let mut origin = Origin {
            name: name.clone(),
            scheme,
            authority,
            host_header,
            connect_timeout: std::time::Duration::from_secs(5),
            timeout: std::time::Duration::from_secs(30),
            ca,
            max_idle_connections: o.max_idle_connections.unwrap_or(256),
            region: o.region.clone(),
            weight: 1,
            health: match &o.health {
                Some(h) if h.get_ref().enabled == Some(false) => None,
                Some(h) => Some(health(
                    ck,
                    &format!("{key}.health"),
                    h.get_ref(),
                    &health_defaults,
                )),
                None => health_everywhere.then(|| health_defaults.clone()),
            },
            max_connections: None,
            client_auth,
            fail_on: vec![502, 503, 504],
        };
        if let Some(list) = &o.fail_on {
            origin.fail_on = fail_on(ck, &key, list);
        }
        if let Some(m) = &o.max_connections {
            if *m.get_ref() == 0 {
                ck.error(
                    m.span(),
                    format!("{key}.max_connections"),
                    "must be at least 1",
                );
            } else {
                origin.max_connections = Some(*m.get_ref());
            }
        }
        if let Some(w) = &o.weight {
            if *w.get_ref() == 0 || *w.get_ref() > 1000 {
                ck.error(
                    w.span(),
                    format!("{key}.weight"),
                    "must be between 1 and 1000",
                );
            } else {
                origin.weight = *w.get_ref();
            }
        }
        positive(
            ck,
            &format!("{key}.connect_timeout"),
            &o.connect_timeout,
            &mut origin.connect_timeout,
        );
        positive(
            ck,
            &format!("{key}.timeout"),
            &o.timeout,
            &mut origin.timeout,
        );
        origin_index.insert(name.clone(), origins.len());
        origins.push(origin);
    }

    let mut pools: Vec<Pool> = Vec::new();
    let mut pool_index: HashMap<String, usize> = HashMap::new();
    for (i, p) in raw.pools.iter().enumerate() {
        let key = format!("pools[{i}]");
        if pool_index.contains_key(p.name.get_ref()) {
            ck.error(
                p.name.span(),
                format!("{key}.name"),
                format!("pool {:?} is defined twice", p.name.get_ref()),
            );
            continue;
        }
        let mut members = Vec::new();
        for o in p.origins.get_ref() {
            match origin_index.get(o.get_ref()) {
                Some(&idx) => members.push(idx),
                None => ck.error(
                    o.span(),
                    format!("{key}.origins"),
                    format!("origin {:?} is not defined", o.get_ref()),
                ),
            }
        }
        if p.origins.get_ref().is_empty() {
            ck.error(
                p.origins.span(),
                format!("{key}.origins"),
                "a pool needs at least one origin",
            );
        }
        pool_index.insert(p.name.get_ref().clone(), pools.len());
        pools.push(Pool {
            name: p.name.get_ref().clone(),
            origins: members,
            spill_latency: p.spill_latency.as_ref().map(|d| d.get_ref().0),
        });
    }
    let geo = geo(ck, &raw.geo, base);

    let mut sites = Vec::new();
    let mut seen_hosts: HashMap<String, usize> = HashMap::new();
    for (i, s) in raw.sites.iter().enumerate() {
        let known = SiteRefs {
            origins: &origins,
            origin_index: &origin_index,
            pool_index: &pool_index,
            purge_enabled: raw.admin.is_some(),
        };
        if let Some(site) = site(ck, i, s, &known, &mut pools, &mut seen_hosts) {
            sites.push(site);
        }
    }
    if raw.sites.is_empty() {
        ck.errors.push(Diagnostic {
            file: ck.file.to_owned(),
            line: 1,
            column: 1,
            key: Some("sites".to_owned()),
            message: "no [[sites]] defined: nothing would be served".to_owned(),
        });
    }

    let admin = raw.admin.as_ref().map(|a| admin(ck, a));
    overlapping_listeners(ck, &raw, &server, admin.as_ref());
    let retries = retries(ck, &raw.retries);
    let dns = dns(ck, &raw.dns);

    Config {
        source: ck.file.to_owned(),
        admin,
        pools,
        geo,
        retries,
        dns,
        server,
        tls,
        cache,
        origins,
        sites,
    }
}

fn admin(ck: &mut Checker<'_>, raw: &super::raw::RawAdmin) -> Admin {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 9090));
    if let Some(l) = &raw.listen {
        match l.get_ref().parse() {
            Ok(a) => listen = a,
            Err(_) => ck.error(
                l.span(),
                "admin.listen",
                format!(
                    "{:?} is not a listen address such as \"127.0.0.1:9090\"",
                    l.get_ref()
                ),
            ),
        }
    }
    let token = match (&raw.token, &raw.token_env) {
        (Some(t), _) if t.get_ref().is_empty() => {
            ck.error(t.span(), "admin.token", "must not be empty");
            None
        }
        (Some(t), None) => Some(t.get_ref().clone()),
        (Some(t), Some(_)) => {
            ck.error(
                t.span(),
                "admin.token",
                "give either token or token_env, not both",
            );
            None
        }
        // A variable named in the file is a promise that purges and metrics are guarded:
        // when it is missing, refuse to start rather than run with those endpoints refused.
        (None, Some(env)) => match std::env::var_os(env.get_ref()) {
            Some(t) if t.is_empty() => {
                ck.error(
                    env.span(),
                    "admin.token_env",
                    format!("environment variable {} is empty", env.get_ref()),
                );
                None
            }
            Some(t) => match t.into_string() {
                Ok(t) => Some(t),
                Err(_) => {
                    ck.error(
                        env.span(),
                        "admin.token_env",
                        format!("environment variable {} is not valid UTF-8", env.get_ref()),
                    );
                    None
                }
            },
            None => {
                ck.error(
                    env.span(),
                    "admin.token_env",
                    format!("environment variable {} is not set", env.get_ref()),
                );
                None
            }
        },
        (None, None) => std::env::var("EDGECACHE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let mut max_connections = 64;
    if let Some(m) = &raw.max_connections {
        if *m.get_ref() == 0 {
            ck.error(m.span(), "admin.max_connections", "must be at least 1");
        } else {
            max_connections = *m.get_ref();
        }
    }
    let mut purge_allow = Vec::new();
    for p in &raw.purge_allow {
        match parse_cidr(p.get_ref()) {
            Some(n) => purge_allow.push(n),
            None => ck.error(
                p.span(),
                "admin.purge_allow",
                format!("{:?} is not an IP address or CIDR block", p.get_ref()),
            ),
        }
    }
    Admin {
        listen,
        token,
        public_metrics: raw.public_metrics.unwrap_or(false),
        max_connections,
        purge_allow,
    }
}

/// One health-check section over `base` (the built-in defaults, or `[health]`'s).
fn health(
    ck: &mut Checker<'_>,
    key: &str,
    raw: &super::raw::RawHealth,
    base: &HealthCheck,
) -> HealthCheck {
    let mut h = base.clone();
    if let Some(p) = &raw.path {
        match p.get_ref().parse::<http::uri::PathAndQuery>() {
            Ok(pq) if p.get_ref().starts_with('/') => h.path = pq,
            _ => ck.error(
                p.span(),
                format!("{key}.path"),
                format!("{:?} is not a path starting with /", p.get_ref()),
            ),
        }
    }
    for (name, v, slot) in [
        ("interval", &raw.interval, &mut h.interval),
        ("timeout", &raw.timeout, &mut h.timeout),
    ] {
        if let Some(d) = v {
            if d.get_ref().0.is_zero() {
                ck.error(
                    d.span(),
                    format!("{key}.{name}"),
                    "must be greater than zero",
                );
            } else {
                *slot = d.get_ref().0;
            }
        }
    }
    if h.timeout > h.interval {
        // An inherited timeout shrinks to a shorter interval; one written here is a mistake.
        let Some(t) = raw.timeout.as_ref() else {
            h.timeout = h.interval;
            return finish(ck, key, raw, h);
        };
        ck.error(
            t.span(),
            format!("{key}.timeout"),
            format!(
                "{:?} is longer than the interval {:?}: checks would overlap",
                h.timeout, h.interval
            ),
        );
    }
    finish(ck, key, raw, h)
}

fn finish(
    ck: &mut Checker<'_>,
    key: &str,
    raw: &super::raw::RawHealth,
    mut h: HealthCheck,
) -> HealthCheck {
    if let Some(list) = &raw.expect_status {
        if list.get_ref().is_empty() {
            ck.error(
                list.span(),
                format!("{key}.expect_status"),
                "needs at least one status",
            );
        }
        let mut statuses = Vec::new();
        for st in list.get_ref() {
            if (100..=599).contains(st.get_ref()) {
                statuses.push(*st.get_ref());
            } else {
                ck.error(
                    st.span(),
                    format!("{key}.expect_status"),
                    format!("{} is not an HTTP status", st.get_ref()),
                );
            }
        }
        if !statuses.is_empty() {
            h.expect_status = statuses;
        }
    }
    for (name, v, slot) in [
        ("rise", &raw.rise, &mut h.rise),
        ("fall", &raw.fall, &mut h.fall),
    ] {
        if let Some(n) = v {
            if (1..=100).contains(n.get_ref()) {
                *slot = *n.get_ref();
            } else {
                ck.error(
                    n.span(),
                    format!("{key}.{name}"),
                    "must be between 1 and 100",
                );
            }
        }
    }
    h
}

/// `client_cert` and `client_key` of an origin: both or neither, PEM files that match.
fn client_auth(
    ck: &mut Checker<'_>,
    key: &str,
    o: &super::raw::RawOrigin,
    base: &Path,
    scheme: &Scheme,
) -> Option<Arc<ClientAuth>> {
    let (cert, pkey) = match (&o.client_cert, &o.client_key) {
        (None, None) => return None,
        (Some(c), Some(k)) => (c, k),
        (Some(c), None) => {
            ck.error(
                c.span(),
                format!("{key}.client_key"),
                "client_cert needs client_key",
            );
            return None;
        }
        (None, Some(k)) => {
            ck.error(
                k.span(),
                format!("{key}.client_cert"),
                "client_key needs client_cert",
            );
            return None;
        }
    };
    if *scheme != Scheme::HTTPS {
        ck.error(
            cert.span(),
            format!("{key}.client_cert"),
            "a client certificate needs an https:// origin",
        );
        return None;
    }
    let cert_path = base.join(cert.get_ref());
    let chain = pem_certs(ck, cert, &format!("{key}.client_cert"), base)?;
    let key_path = base.join(pkey.get_ref());
    let pem = read_named(ck, pkey, &format!("{key}.client_key"), base)?;
    let Ok(Some(private)) = rustls_pemfile::private_key(&mut pem.as_slice()) else {
        ck.error(
            pkey.span(),
            format!("{key}.client_key"),
            format!("{} holds no PEM private key", key_path.display()),
        );
        return None;
    };
    let signing = rustls::crypto::ring::sign::any_supported_type(&private);
    match signing {
        Ok(signing) => {
            let certified = CertifiedKey::new(chain.clone(), signing);
            if let Err(e) = certified.keys_match() {
                ck.error(
                    pkey.span(),
                    format!("{key}.client_key"),
                    format!(
                        "does not match the certificate in {}: {e}",
                        cert_path.display()
                    ),
                );
                return None;
            }
        }
        Err(e) => {
            ck.error(
                pkey.span(),
                format!("{key}.client_key"),
                format!("unusable key in {}: {e}", key_path.display()),
            );
            return None;
        }
    }
    Some(Arc::new(ClientAuth {
        chain,
        key: private,
    }))
}

/// The bytes of a file named in the configuration (relative to it); a failure is reported
/// against the name's position.
fn read_named(
    ck: &mut Checker<'_>,
    name: &Spanned<String>,
    key: &str,
    base: &Path,
) -> Option<Vec<u8>> {
    let path = base.join(name.get_ref());
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            ck.error(
                name.span(),
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            None
        }
    }
}

/// The PEM certificates (at least one) of a file named in the configuration.
fn pem_certs(
    ck: &mut Checker<'_>,
    name: &Spanned<String>,
    key: &str,
    base: &Path,
) -> Option<Vec<CertificateDer<'static>>> {
    let pem = read_named(ck, name, key, base)?;
    match rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>() {
        Ok(c) if !c.is_empty() => Some(c),
        _ => {
            ck.error(
                name.span(),
                key,
                format!(
                    "{} holds no PEM certificate",
                    base.join(name.get_ref()).display()
                ),
            );
            None
        }
    }
}

/// Bursts at most this large: with the slowest rate (1/h) the bucket's depth in nanoseconds
/// still fits a `u64` (see `proxy::limit`).
const MAX_BURST: u32 = 1_000_000;

/// A rate key and its burst key: `None` when the rate is absent (a burst alone is an error:
/// it would look like a limit and be none).
fn rate(
    ck: &mut Checker<'_>,
    (rate_key, rate): (&str, &Option<Spanned<String>>),
    (burst_key, burst): (&str, &Option<Spanned<i64>>),
) -> Option<Rate> {
    let burst = match burst {
        None => None,
        Some(b) if rate.is_none() => {
            let rate_name = rate_key.rsplit('.').next().unwrap_or(rate_key);
            ck.error(
                b.span(),
                burst_key,
                format!("has no effect without {rate_name}"),
            );
            return None;
        }
        Some(b) => match u32::try_from(*b.get_ref()) {
            Ok(n) if (1..=MAX_BURST).contains(&n) => Some(n),
            _ => {
                ck.error(
                    b.span(),
                    burst_key,
                    format!("must be between 1 and {MAX_BURST}"),
                );
                return None;
            }
        },
    };
    let rate = rate.as_ref()?;
    match super::raw::parse_rate(rate.get_ref()) {
        Ok((count, period)) => Some(Rate {
            count,
            period,
            burst: burst.unwrap_or(count.min(MAX_BURST)),
        }),
        Err(m) => {
            ck.error(rate.span(), rate_key, m);
            None
        }
    }
}

fn retries(ck: &mut Checker<'_>, raw: &super::raw::RawRetries) -> Retries {
    let mut r = Retries::default();
    if let Some(b) = &raw.budget {
        if (0.0..=1.0).contains(b.get_ref()) {
            r.budget = *b.get_ref();
        } else {
            ck.error(
                b.span(),
                "retries.budget",
                "must be a fraction between 0 and 1 (0.2 = one retry per five requests)",
            );
        }
    }
    if let Some(m) = &raw.min_per_second {
        if *m.get_ref() <= 100_000 {
            r.min_per_second = *m.get_ref();
        } else {
            ck.error(m.span(), "retries.min_per_second", "must be at most 100000");
        }
    }
    r
}

fn dns(ck: &mut Checker<'_>, raw: &super::raw::RawDns) -> Dns {
    let mut d = Dns::default();
    for s in &raw.servers {
        let text = s.get_ref();
        let addr = text.parse::<SocketAddr>().ok().or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match addr {
            Some(a) => d.servers.push(a),
            None => ck.error(
                s.span(),
                "dns.servers",
                format!("{text:?} is not an IP address (with an optional :port)"),
            ),
        }
    }
    if let Some(m) = &raw.min_ttl {
        d.min_ttl = m.get_ref().0;
    }
    if let Some(m) = &raw.max_ttl {
        if m.get_ref().0.is_zero() {
            ck.error(m.span(), "dns.max_ttl", "must be greater than zero");
        } else {
            d.max_ttl = m.get_ref().0;
        }
    }
    if d.min_ttl > d.max_ttl {
        let span = raw.min_ttl.as_ref().map(|m| m.span()).unwrap_or(0..0);
        ck.error(span, "dns.min_ttl", "is longer than dns.max_ttl");
    }
    d
}

fn geo(ck: &mut Checker<'_>, raw: &super::raw::RawGeo, base: &Path) -> Geo {
    let mut g = Geo::default();
    if let Some(d) = &raw.database {
        let path = base.join(d.get_ref());
        match crate::geo::Database::open(&path) {
            Ok(db) => g.database = Some(Arc::new(db)),
            Err(e) => ck.error(
                d.span(),
                "geo.database",
                format!("cannot use {} as a MaxMind database: {e}", path.display()),
            ),
        }
    }
    if let Some(h) = &raw.header {
        match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => g.header = Some(n),
            Err(_) => ck.error(
                h.span(),
                "geo.header",
                format!("{:?} is not a header name", h.get_ref()),
            ),
        }
    }
    for p in &raw.trusted_proxies {
        match parse_cidr(p.get_ref()) {
            Some(n) => g.trusted_proxies.push(n),
            None => ck.error(
                p.span(),
                "geo.trusted_proxies",
                format!("{:?} is not an IP address or CIDR block", p.get_ref()),
            ),
        }
    }
    for (i, n) in raw.networks.iter().enumerate() {
        let net = parse_cidr(n.cidr.get_ref());
        let country = crate::geo::code(n.country.get_ref().as_bytes());
        match (net, country) {
            (Some(net), Some(c)) => g.networks.push((net, c)),
            (None, _) => ck.error(
                n.cidr.span(),
                format!("geo.networks[{i}].cidr"),
                format!("{:?} is not a CIDR block", n.cidr.get_ref()),
            ),
            (_, None) => ck.error(
                n.country.span(),
                format!("geo.networks[{i}].country"),
                "must be a two-letter country code",
            ),
        }
    }
    g
}

fn route(
    ck: &mut Checker<'_>,
    key: &str,
    raw: &super::raw::RawRoute,
    pool_index: &HashMap<String, usize>,
) -> Option<Route> {
    let mut pools = Vec::new();
    for p in raw.pools.get_ref() {
        match pool_index.get(p.get_ref()) {
            Some(&i) => pools.push(i),
            None => ck.error(
                p.span(),
                format!("{key}.pools"),
                format!("pool {:?} is not defined", p.get_ref()),
            ),
        }
    }
    if raw.pools.get_ref().is_empty() {
        ck.error(
            raw.pools.span(),
            format!("{key}.pools"),
            "a route needs at least one pool",
        );
    }
    let matcher = raw.matcher.as_ref().map(|m| {
        let mut out = RouteMatch::default();
        for c in &m.continents {
            match crate::geo::code(c.get_ref().as_bytes()) {
                Some(code) if crate::geo::CONTINENTS.iter().any(|x| x.as_bytes() == code) => {
                    out.continents.push(code)
                }
                _ => ck.error(
                    c.span(),
                    format!("{key}.match.continents"),
                    format!(
                        "{:?} is not one of {}",
                        c.get_ref(),
                        crate::geo::CONTINENTS.join(", ")
                    ),
                ),
            }
        }
        for c in &m.countries {
            match crate::geo::code(c.get_ref().as_bytes()) {
                Some(code) => out.countries.push(code),
                None => ck.error(
                    c.span(),
                    format!("{key}.match.countries"),
                    "must be two-letter country codes",
                ),
            }
        }
        for c in &m.cidrs {
            match parse_cidr(c.get_ref()) {
                Some(n) => out.cidrs.push(n),
                None => ck.error(
                    c.span(),
                    format!("{key}.match.cidrs"),
                    format!("{:?} is not a CIDR block", c.get_ref()),
                ),
            }
        }
        out
    });
    let name = match &raw.name {
        Some(n) if n.get_ref().is_empty() || n.get_ref().contains(char::is_whitespace) => {
            ck.error(
                n.span(),
                format!("{key}.name"),
                "must be a non-empty word without spaces",
            );
            Arc::from(key)
        }
        Some(n) => Arc::from(n.get_ref().as_str()),
        None => Arc::from(key),
    };
    Some(Route {
        name,
        matcher,
        pools,
    })
}

/// What a site may name: origins and pools already validated, and whether purging is on.
struct SiteRefs<'a> {
    origins: &'a [Origin],
    origin_index: &'a HashMap<String, usize>,
    pool_index: &'a HashMap<String, usize>,
    purge_enabled: bool,
}

/// `[[sites]]` entry `i`: its hosts (each served by one site only), its origin or routes
/// (`origin = "name"` adds a one-origin pool), cache settings, rules, methods, path
/// handling and rate. `None` when it cannot be built; its problems are in `ck`.
fn site(
    ck: &mut Checker<'_>,
    i: usize,
    s: &super::raw::RawSite,
    known: &SiteRefs<'_>,
    pools: &mut Vec<Pool>,
    seen_hosts: &mut HashMap<String, usize>,
) -> Option<Site> {
    let (origins, origin_index, pool_index, purge_enabled) = (
        known.origins,
        known.origin_index,
        known.pool_index,
        known.purge_enabled,
    );
    let key = format!("sites[{i}]");
    let hosts = site_hosts(ck, &key, i, &s.hosts, seen_hosts);
    let routes: Vec<Route> = match (&s.origin, s.routes.is_empty()) {
        (Some(o), true) => match origin_index.get(o.get_ref()) {
            Some(&origin) => {
                // `origin = "name"` is the one-origin case: a pool of its own.
                pools.push(Pool {
                    name: format!("origin:{}", o.get_ref()),
                    origins: vec![origin],
                    spill_latency: None,
                });
                vec![Route {
                    name: Arc::from(format!("{key}.origin")),
                    matcher: None,
                    pools: vec![pools.len() - 1],
                }]
            }
            None => {
                let known: Vec<&str> = origins.iter().map(|o| o.name.as_str()).collect();
                ck.error(
                    o.span(),
                    format!("{key}.origin"),
                    format!(
                        "origin {:?} is not defined (known origins: {})",
                        o.get_ref(),
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                return None;
            }
        },
        (Some(o), false) => {
            ck.error(
                o.span(),
                format!("{key}.origin"),
                "give either origin or [[sites.routes]], not both",
            );
            return None;
        }
        (None, true) => {
            ck.error(
                s.hosts.span(),
                key.clone(),
                "a site needs origin = \"name\" or [[sites.routes]]",
            );
            return None;
        }
        (None, false) => s
            .routes
            .iter()
            .enumerate()
            .filter_map(|(j, r)| route(ck, &format!("{key}.routes[{j}]"), r, pool_index))
            .collect(),
    };
    let origin = routes
        .last()
        .and_then(|r| r.pools.first())
        .and_then(|p| pools.get(*p))
        .and_then(|p| p.origins.first().copied())
        .unwrap_or(0);
    let cache = site_cache(ck, &key, &s.cache);
    let rules = s
        .rules
        .iter()
        .enumerate()
        .filter_map(|(j, r)| rule(ck, &format!("{key}.rules[{j}]"), r))
        .collect();
    let methods = match &s.methods {
        None => Methods::default_for(purge_enabled),
        Some(list) => site_methods(ck, &key, list),
    };
    let refuse_escaped_slashes = s
        .escaped_slashes
        .as_ref()
        .is_some_and(|v| escaped_slashes(ck, &key, v));
    let rate = rate(
        ck,
        (&format!("{key}.limits.rate"), &s.limits.rate),
        (&format!("{key}.limits.burst"), &s.limits.burst),
    );
    Some(Site {
        hosts,
        origin,
        routes,
        cache,
        rules,
        methods,
        refuse_escaped_slashes,
        rate,
    })
}

/// `escaped_slashes = "keep" | "refuse"`: true for "refuse".
fn escaped_slashes(ck: &mut Checker<'_>, key: &str, v: &Spanned<String>) -> bool {
    match v.get_ref().as_str() {
        "keep" => false,
        "refuse" => true,
        other => {
            ck.error(
                v.span(),
                format!("{key}.escaped_slashes"),
                format!("{other:?} is not \"keep\" or \"refuse\""),
            );
            false
        }
    }
}

/// A site's `hosts`: at least one, each a valid name or pattern served by no other site.
fn site_hosts(
    ck: &mut Checker<'_>,
    key: &str,
    i: usize,
    list: &Spanned<Vec<Spanned<String>>>,
    seen_hosts: &mut HashMap<String, usize>,
) -> Vec<String> {
    let mut hosts = Vec::new();
    if list.get_ref().is_empty() {
        ck.error(
            list.span(),
            format!("{key}.hosts"),
            "needs at least one host name",
        );
    }
    for h in list.get_ref() {
        match host_pattern(h.get_ref(), true) {
            Ok(name) => {
                if let Some(prev) = seen_hosts.insert(name.clone(), i) {
                    ck.error(
                        h.span(),
                        format!("{key}.hosts"),
                        format!("{name:?} is already served by sites[{prev}]"),
                    );
                }
                hosts.push(name);
            }
            Err(m) => ck.error(h.span(), format!("{key}.hosts"), m),
        }
    }
    hosts
}

/// `fail_on = [...]`: 5xx statuses that count as the origin failing.
fn fail_on(ck: &mut Checker<'_>, key: &str, list: &Spanned<Vec<Spanned<u16>>>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for s in list.get_ref() {
        if (500..=599).contains(s.get_ref()) {
            statuses.push(*s.get_ref());
        } else {
            ck.error(
                s.span(),
                format!("{key}.fail_on"),
                format!("{} is not a 5xx status", s.get_ref()),
            );
        }
    }
    statuses
}

/// `methods = [...]`: method names (tokens), never TRACE or CONNECT, each once.
fn site_methods(ck: &mut Checker<'_>, key: &str, list: &Spanned<Vec<Spanned<String>>>) -> Methods {
    let key = format!("{key}.methods");
    let mut out: Vec<http::Method> = Vec::new();
    if list.get_ref().is_empty() {
        ck.error(list.span(), key.clone(), "needs at least one method");
    }
    for m in list.get_ref() {
        let name = m.get_ref();
        match http::Method::from_bytes(name.as_bytes()) {
            Ok(method) if method == http::Method::TRACE || method == http::Method::CONNECT => {
                ck.error(
                    m.span(),
                    key.clone(),
                    format!("{name} is never forwarded (answered 405 here)"),
                );
            }
            Ok(method) if out.contains(&method) => {
                ck.error(m.span(), key.clone(), format!("{name} is listed twice"));
            }
            Ok(method) if name.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') => {
                out.push(method)
            }
            _ => ck.error(
                m.span(),
                key.clone(),
                format!("{name:?} is not a method name (upper case, like \"GET\")"),
            ),
        }
    }
    Methods::new(out)
}

fn site_cache(ck: &mut Checker<'_>, key: &str, raw: &super::raw::RawSiteCache) -> SiteCache {
    let mut c = SiteCache::default();
    if let Some(q) = &raw.query {
        c.query = match q.get_ref().as_str() {
            "keep" => QueryMode::Keep,
            "sort" => QueryMode::Sort,
            "ignore" => QueryMode::Ignore,
            other => {
                ck.error(
                    q.span(),
                    format!("{key}.cache.query"),
                    format!("{other:?} is not one of \"keep\", \"sort\", \"ignore\""),
                );
                QueryMode::Keep
            }
        };
    }
    c.query_ignore = raw.query_ignore.clone();
    for h in &raw.key_headers {
        match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => c.key_headers.push(n),
            Err(_) => ck.error(
                h.span(),
                format!("{key}.cache.key_headers"),
                format!("{:?} is not a header name", h.get_ref()),
            ),
        }
    }
    c.key_cookies = raw.key_cookies.clone();
    if let Some(m) = &raw.client_no_cache {
        c.client_no_cache = match m.get_ref().as_str() {
            "revalidate" => ClientNoCache::Revalidate,
            "ignore" => ClientNoCache::Ignore,
            other => {
                ck.error(
                    m.span(),
                    format!("{key}.cache.client_no_cache"),
                    format!("{other:?} is not one of \"revalidate\", \"ignore\""),
                );
                ClientNoCache::Revalidate
            }
        };
    }
    let s = &mut c.settings;
    if let Some(b) = raw.store_set_cookie {
        s.store_set_cookie = b;
    }
    if let Some(d) = &raw.stale_while_revalidate {
        s.default_stale_while_revalidate = d.get_ref().0;
    }
    if let Some(d) = &raw.stale_if_error {
        s.default_stale_if_error = d.get_ref().0;
    }
    if let Some(d) = &raw.keep {
        s.keep = d.get_ref().0;
    }
    if let Some(d) = &raw.heuristic_max {
        s.heuristic_max = d.get_ref().0;
    }
    if let Some(f) = &raw.heuristic_fraction {
        let v = *f.get_ref();
        if (0.0..=1.0).contains(&v) {
            s.heuristic_fraction = v;
        } else {
            ck.error(
                f.span(),
                format!("{key}.cache.heuristic_fraction"),
                "must be between 0 and 1",
            );
        }
    }
    if let Some(d) = &raw.hit_for_miss {
        c.hit_for_miss = d.get_ref().0;
    }
    c
}

fn rule(ck: &mut Checker<'_>, key: &str, raw: &super::raw::RawRule) -> Option<Rule> {
    let path = match (&raw.path, &raw.prefix) {
        (Some(g), None) if g.get_ref().starts_with('/') || g.get_ref().starts_with('*') => {
            PathMatch::Glob(g.get_ref().clone())
        }
        (None, Some(p)) if p.get_ref().starts_with('/') => PathMatch::Prefix(p.get_ref().clone()),
        (Some(g), None) => {
            ck.error(
                g.span(),
                format!("{key}.path"),
                "a path glob starts with '/' or '*'",
            );
            return None;
        }
        (None, Some(p)) => {
            ck.error(
                p.span(),
                format!("{key}.prefix"),
                "a path prefix starts with '/'",
            );
            return None;
        }
        (Some(g), Some(_)) => {
            ck.error(g.span(), key, "give either path or prefix, not both");
            return None;
        }
        (None, None) => {
            ck.errors.push(Diagnostic {
                file: ck.file.to_owned(),
                line: 1,
                column: 1,
                key: Some(key.to_owned()),
                message: "a rule needs path (glob) or prefix".to_owned(),
            });
            return None;
        }
    };
    let d = |v: &Option<super::raw::Duration>| v.as_ref().map(|d| d.get_ref().0);
    let mut status_ttl = Vec::new();
    for (code, ttl) in &raw.status_ttl {
        match code.parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => status_ttl.push((c, ttl.get_ref().0)),
            _ => ck.error(
                ttl.span(),
                format!("{key}.status_ttl"),
                format!("{code:?} is not an HTTP status code"),
            ),
        }
    }
    Some(Rule {
        path,
        bypass: raw.bypass.unwrap_or(false),
        ttl: d(&raw.ttl),
        min_ttl: d(&raw.min_ttl),
        max_ttl: d(&raw.max_ttl),
        stale_while_revalidate: d(&raw.stale_while_revalidate),
        stale_if_error: d(&raw.stale_if_error),
        status_ttl,
    })
}

fn addresses(ck: &mut Checker<'_>, key: &str, list: &[Spanned<String>]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in list {
        match a.get_ref().parse::<SocketAddr>() {
            Ok(addr) => out.push(addr),
            Err(_) => ck.error(
                a.span(),
                key,
                format!(
                    "{:?} is not a listen address such as \"0.0.0.0:8080\" or \"[::]:8443\"",
                    a.get_ref()
                ),
            ),
        }
    }
    out
}

/// One listen address as configured: `span` is `None` for a default (`server.http` when no
/// listener is given, `admin.listen` when `[admin]` names none).
struct Listener {
    addr: SocketAddr,
    key: &'static str,
    span: Option<Range<usize>>,
}

/// Reports every listen address (`server.http`, `server.https`, `admin.listen`) that `run`
/// could not bind because an earlier one holds its port: the same address, or an address
/// under a wildcard on the same port (`0.0.0.0:P` holds P on every IPv4 address; `[::]:P` on
/// every IPv6 and IPv4 address, since `server::bind` leaves the socket dual-stack, Linux's
/// default with `net.ipv6.bindv6only = 0`). Port 0 (any free port) never clashes. Each later
/// address is reported once, at its own position, naming the first one it clashes with.
fn overlapping_listeners(
    ck: &mut Checker<'_>,
    raw: &RawConfig,
    server: &Server,
    admin: Option<&Admin>,
) {
    let mut all = Vec::new();
    let written = |key: &'static str, list: &[Spanned<String>], all: &mut Vec<Listener>| {
        for a in list {
            if let Ok(addr) = a.get_ref().parse() {
                all.push(Listener {
                    addr,
                    key,
                    span: Some(a.span()),
                });
            }
        }
    };
    if raw.server.http.is_empty() && raw.server.https.is_empty() {
        all.extend(server.http.iter().map(|&addr| Listener {
            addr,
            key: "server.http",
            span: None,
        }));
    }
    written("server.http", &raw.server.http, &mut all);
    written("server.https", &raw.server.https, &mut all);
    match (admin, raw.admin.as_ref().and_then(|a| a.listen.as_ref())) {
        (Some(_), Some(l)) => written("admin.listen", std::slice::from_ref(l), &mut all),
        (Some(a), None) => all.push(Listener {
            addr: a.listen,
            key: "admin.listen",
            span: None,
        }),
        (None, _) => {}
    }
    for (i, later) in all.iter().enumerate() {
        let Some((earlier, why)) = all[..i]
            .iter()
            .find_map(|e| listeners_clash(e.addr, later.addr).map(|why| (e, why)))
        else {
            continue;
        };
        // Reported where it was written; a default has no position, so a clash with one is
        // reported at the other address.
        let (at, other) = match &later.span {
            Some(_) => (later, earlier),
            None => (earlier, later),
        };
        let Some(span) = at.span.clone() else {
            continue;
        };
        let other_is = match &other.span {
            Some(s) => {
                let (line, column) = ck.position(s.start);
                format!("{} at {line}:{column}", other.key)
            }
            None => format!("the default {}", other.key),
        };
        let message = match why {
            Clash::Same => format!(
                "{} is also {other_is}: run could not bind it twice",
                at.addr
            ),
            Clash::Under(wildcard) => format!(
                "{} overlaps {} ({other_is}): {wildcard}, so run could not bind both",
                at.addr, other.addr
            ),
        };
        ck.error(span, at.key, message);
    }
}

/// Why two listen addresses cannot both be bound.
#[derive(Debug, PartialEq)]
enum Clash {
    Same,
    /// One is a wildcard holding the other's port; the text says which and how far it reaches.
    Under(&'static str),
}

fn listeners_clash(a: SocketAddr, b: SocketAddr) -> Option<Clash> {
    if a.port() == 0 || a.port() != b.port() {
        return None;
    }
    // An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is bound as the IPv4 address.
    let ip = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (x, y) = (ip(a), ip(b));
    if x == y {
        return Some(Clash::Same);
    }
    let under = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    for (wild, other) in [(x, y), (y, x)] {
        if under(wild, other) {
            return Some(Clash::Under(if wild.is_ipv4() {
                "0.0.0.0 holds the port on every IPv4 address"
            } else {
                "[::] holds the port on every IPv6 and IPv4 address (a dual-stack socket)"
            }));
        }
    }
    None
}

/// An address or CIDR block. IPv4-mapped IPv6 forms (`::ffff:10.0.0.0/104`) become the IPv4
/// network they name: peers and forwarded addresses are matched as IPv4 (`server::canonical`),
/// so a mapped network would otherwise never match anything.
fn parse_cidr(text: &str) -> Option<IpNet> {
    let net = text
        .parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))?;
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            return ipnet::Ipv4Net::new(v4, len).ok().map(IpNet::V4);
        }
    }
    Some(net)
}

/// Checks and lowercases a host name pattern: `name`, `*.suffix`, or (sites only) `*`.
fn host_pattern(text: &str, allow_catch_all: bool) -> Result<String, String> {
    let h = text.trim().to_ascii_lowercase();
    if h == "*" {
        return if allow_catch_all {
            Ok(h)
        } else {
            Err("\"*\" is not a certificate name; the first certificate is the default".to_owned())
        };
    }
    let name = h.strip_prefix("*.").unwrap_or(&h);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        || name.parse::<std::net::IpAddr>().is_ok()
        || name.starts_with('[') && name.ends_with(']');
    if !valid || h.contains(':') && !h.starts_with('[') {
        return Err(format!(
            "{text:?} is not a host name (no port, no scheme; \"*.example.com\" for a wildcard)"
        ));
    }
    Ok(h)
}

/// Parses a PEM chain and key and checks that they belong together.
pub(super) fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("certificate file holds no PEM certificate".to_owned());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("key file is not valid PEM: {e}"))?
        .ok_or_else(|| "key file holds no PEM private key".to_owned())?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the certificate".to_owned()
        }
        other => format!("unusable certificate or key: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_key_they_are_about() {
        let text = "# edge\n[server]\nworkers = \"two\"\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("t.toml:3:11: server.workers: invalid type"),
            "{e:?}"
        );

        let text = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n\
                    [[origins]]\nname = \"b\"\nurl = \"http://127.0.0.1:8\"\nweight = \"x\"\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("t.toml:7:10: origins[1].weight: "),
            "{e:?}"
        );
        let text = "[[sites]]\nhosts = [\"a\"]\n[[sites.routes]]\nname = \"r\"\npools = [\"p\"]\n\
                    [[sites]]\nhosts = [\"b\"]\n[[sites.routes]]\nname = 5\npools = [\"p\"]\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("t.toml:9:8: sites[1].routes[0].name: "),
            "{e:?}"
        );
        let text = "[[sites]]\nhosts = [\"a\"]\n[[sites.routes]]\nname = \"r\"\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("t.toml:3:1: sites[0].routes[0]: missing field `pools`"),
            "{e:?}"
        );
        // A broken header names no key: the position is all there is.
        assert!(key_at("[server\nhttp = 1\n", 0).is_none());
        // Lines of a multi-line array are not headers.
        let text = "[server]\nhttp = [\n  [\"x\"],\n]\nworkers = 1\n";
        assert_eq!(
            key_at(text, text.len() - 3).as_deref(),
            Some("server.workers")
        );
    }

    /// Found by the property `any_text_is_loaded_or_reported_by_position`: the parser's "expected
    /// ..." went on a line of its own, which started with no position.
    #[test]
    fn syntax_errors_are_reported_on_one_line() {
        assert_eq!(
            errors("a=."),
            ["t.toml:1:3: a: invalid floating-point number; expected leading digit"]
        );
        assert_eq!(
            errors("[server]\nhttp = [1,\n"),
            ["t.toml:3:1: server: invalid array; expected `]`"]
        );
    }

    /// Found by the property `an_edited_shipped_config_is_loaded_or_reported_by_position`: for a
    /// carriage return alone in a comment the parser has no message, and the report ended
    /// at its position.
    #[test]
    fn a_syntax_error_without_a_message_names_the_character() {
        assert_eq!(
            errors("# a\rcomment\n"),
            ["t.toml:1:4: '\\r' is not allowed here"]
        );
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml(text, "t.toml", Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(Error::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    const MINIMAL: &str = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9000\"\n[[sites]]\nhosts = [\"example.com\"]\norigin = \"a\"\n";

    #[test]
    fn minimal_is_valid_and_defaults_to_8080() {
        let c = Config::from_toml(MINIMAL, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("minimal config is valid");
        assert_eq!(c.server.http, vec!["0.0.0.0:8080".parse().expect("addr")]);
        assert_eq!(c.sites[0].origin, 0);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = errors("[server]\nhttp = [\"127.0.0.1:1\"]\nbogus = 1\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:3:1: "), "{e:?}");
        assert!(e[0].contains("bogus"), "{e:?}");
    }

    #[test]
    fn bad_duration_and_address_are_all_reported() {
        let text = format!("[server]\nhttp = [\"nope\"]\nidle_timeout = \"5 parsecs\"\n{MINIMAL}");
        let e = errors(&text);
        // A serde error stops parsing, so the duration is reported first on its own.
        assert!(e[0].starts_with("t.toml:3:16: "), "{e:?}");
        let text = format!("[server]\nhttp = [\"nope\", \"1.2.3.4\"]\n{MINIMAL}");
        let e = errors(&text);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:2:9: server.http: \"nope\""),
            "{e:?}"
        );
        assert!(e[1].starts_with("t.toml:2:17: server.http:"), "{e:?}");
    }

    #[test]
    fn send_timeout_defaults_to_a_minute_and_must_be_positive() {
        let c = Config::from_toml(MINIMAL, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("minimal config is valid");
        assert_eq!(c.server.send_timeout, std::time::Duration::from_secs(60));
        let text = format!("[server]\nsend_timeout = \"1500ms\"\n{MINIMAL}");
        let c = Config::from_toml(&text, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("send_timeout = 1500ms is valid");
        assert_eq!(
            c.server.send_timeout,
            std::time::Duration::from_millis(1500)
        );
        assert!(c.summary().contains("send 1.5s"), "{}", c.summary());
        let e = errors(&format!("[server]\nsend_timeout = \"0s\"\n{MINIMAL}"));
        assert_eq!(
            e,
            ["t.toml:2:16: server.send_timeout: must be greater than zero"],
            "{e:?}"
        );
    }

    #[test]
    fn site_naming_unknown_origin() {
        let e = errors("[[origins]]\nname = \"a\"\nurl = \"http://x:1\"\n[[sites]]\nhosts = [\"h\"]\norigin = \"b\"\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("t.toml:6:10: sites[0].origin: origin \"b\" is not defined"),
            "{e:?}"
        );
    }

    #[test]
    fn missing_certificate_file() {
        let text = format!("[server]\nhttps = [\"127.0.0.1:0\"]\n[[tls.certificates]]\nhosts = [\"a\"]\ncert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\n{MINIMAL}");
        let e = errors(&text);
        assert!(
            e.iter().any(|e| e.starts_with(
                "t.toml:5:8: tls.certificates[0].cert: cannot read /nonexistent/a.crt"
            )),
            "{e:?}"
        );
    }

    #[test]
    fn health_checks_merge_defaults_and_report_mistakes() {
        let three = "[[origins]]\nname = \"a\"\nurl = \"http://x:1\"\n\
                     [[origins]]\nname = \"b\"\nurl = \"http://x:2\"\n[origins.health]\npath = \"/ping\"\nrise = 5\n\
                     [[origins]]\nname = \"c\"\nurl = \"http://x:3\"\n[origins.health]\nenabled = false\n\
                     [[sites]]\nhosts = [\"h\"]\norigin = \"a\"\n";
        let c = Config::from_toml(
            &format!("[health]\npath = \"/healthz\"\ninterval = \"1s\"\n{three}"),
            "t.toml",
            Path::new("."),
        )
        .expect("valid");
        let a = c.origins[0].health.clone().expect("checked from [health]");
        assert_eq!(a.path.as_str(), "/healthz");
        assert_eq!(a.interval, std::time::Duration::from_secs(1));
        assert_eq!((a.rise, a.fall), (2, 3));
        let b = c.origins[1].health.clone().expect("own section");
        assert_eq!(
            (b.path.as_str(), b.interval, b.rise),
            ("/ping", std::time::Duration::from_secs(1), 5)
        );
        assert!(c.origins[2].health.is_none(), "enabled = false");
        // Without [health], only origins with their own section are checked.
        let c = Config::from_toml(three, "t.toml", Path::new(".")).expect("valid");
        assert!(c.origins[0].health.is_none());
        assert_eq!(
            c.origins[1].health.as_ref().map(|h| h.interval),
            Some(std::time::Duration::from_secs(5))
        );

        let e = errors(&format!(
            "[health]\npath = \"ping\"\ninterval = \"1s\"\ntimeout = \"2s\"\nexpect_status = [200, 700]\nrise = 0\n{MINIMAL}"
        ));
        for want in [
            "t.toml:2:8: health.path: \"ping\" is not a path starting with /",
            "health.timeout: 2s is longer than the interval 1s",
            "t.toml:5:23: health.expect_status: 700 is not an HTTP status",
            "t.toml:6:8: health.rise: must be between 1 and 100",
        ] {
            assert!(
                e.iter().any(|e| e.starts_with(want) || e.contains(want)),
                "{want}: {e:?}"
            );
        }
    }

    #[test]
    fn client_certificates_retries_and_route_names_are_checked() {
        let e = errors(
            "[[origins]]\nname = \"a\"\nurl = \"http://x:1\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"\n\
             [[origins]]\nname = \"b\"\nurl = \"https://x:1\"\nclient_cert = \"c.pem\"\n\
             [[origins]]\nname = \"c\"\nurl = \"https://x:1\"\nclient_cert = \"/nonexistent/c.pem\"\nclient_key = \"k.pem\"\n\
             [[pools]]\nname = \"p\"\norigins = [\"a\"]\n\
             [[sites]]\nhosts = [\"h\"]\n[[sites.routes]]\nname = \"two words\"\npools = [\"p\"]\n\
             [retries]\nbudget = 2.0\n",
        );
        for want in [
            "origins[0].client_cert: a client certificate needs an https:// origin",
            "origins[1].client_key: client_cert needs client_key",
            "origins[2].client_cert: cannot read /nonexistent/c.pem",
            "sites[0].routes[0].name: must be a non-empty word without spaces",
            "retries.budget: must be a fraction between 0 and 1",
        ] {
            assert!(e.iter().any(|e| e.contains(want)), "{want}: {e:?}");
        }
    }

    #[test]
    fn routes_pools_and_geo_are_checked() {
        let base = "[[origins]]\nname = \"a\"\nurl = \"http://x:1\"\n[[pools]]\nname = \"p\"\norigins = [\"a\", \"zz\"]\n";
        let e = errors(&format!(
            "{base}[[sites]]\nhosts = [\"h\"]\n[[sites.routes]]\nmatch = {{ continents = [\"XX\"] }}\npools = [\"p\", \"q\"]\n[geo]\nheader = \"bad header\"\n"
        ));
        assert!(
            e.iter()
                .any(|e| e
                    .starts_with("t.toml:6:17: pools[0].origins: origin \"zz\" is not defined")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("sites[0].routes[0].match.continents: \"XX\" is not one of")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("sites[0].routes[0].pools: pool \"q\" is not defined")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("geo.header: \"bad header\" is not a header name")),
            "{e:?}"
        );
        let e = errors(&format!(
            "{base}[[sites]]\nhosts = [\"h\"]\norigin = \"a\"\n[[sites.routes]]\npools = [\"p\"]\n"
        ));
        assert!(
            e.iter()
                .any(|e| e.contains("give either origin or [[sites.routes]]")),
            "{e:?}"
        );
        let e =
            errors("[[origins]]\nname = \"a\"\nurl = \"http://x:1\"\n[[sites]]\nhosts = [\"h\"]\n");
        assert!(e.iter().any(|e| e.contains("a site needs origin")), "{e:?}");
    }

    #[test]
    fn client_address_header_is_one_of_two_fields() {
        let c = Config::from_toml(MINIMAL, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        assert_eq!(
            c.expect("valid").server.client_address_header,
            crate::geo::AddressHeader::XForwardedFor
        );
        let text = format!("[server]\nclient_address_header = \"Forwarded\"\n{MINIMAL}");
        let c = Config::from_toml(&text, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        assert_eq!(
            c.expect("valid").server.client_address_header,
            crate::geo::AddressHeader::Forwarded
        );
        let e = errors(&format!(
            "[server]\nclient_address_header = \"x-real-ip\"\n{MINIMAL}"
        ));
        assert_eq!(
            e,
            ["t.toml:2:25: server.client_address_header: \"x-real-ip\" is not \"x-forwarded-for\" or \"forwarded\""],
        );
    }

    #[test]
    fn client_limits_are_off_by_default_and_one_line_each() {
        let c = Config::from_toml(MINIMAL, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("valid");
        assert_eq!(c.server.rate_per_client, None);
        assert_eq!(c.server.max_connections_per_client, None);
        assert_eq!(c.sites[0].rate, None);
        assert!(
            c.summary().contains("per client: no limits"),
            "{}",
            c.summary()
        );

        let text = format!(
            "[server]\nrate_per_client = \"100/s\"\nmax_connections_per_client = 50\n{MINIMAL}\
             limits = {{ rate = \"2/min\" }}\n"
        );
        let c = Config::from_toml(&text, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("valid");
        let second = std::time::Duration::from_secs(1);
        assert_eq!(
            c.server.rate_per_client,
            Some(Rate {
                count: 100,
                period: second,
                burst: 100
            }),
            "the burst defaults to one period's count"
        );
        assert_eq!(c.server.max_connections_per_client, Some(50));
        let site = c.sites[0].rate.expect("site rate");
        assert_eq!((site.count, site.period, site.burst), (2, 60 * second, 2));
        assert_eq!(site.interval(), 30 * second);
        let summary = c.summary();
        assert!(
            summary.contains(
                "per client: 100 requests/s (burst 100); 50 connections (trusted proxies exempt)"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("rate limit 2 requests/min (burst 2), all clients together"),
            "{summary}"
        );

        let text = format!(
            "[server]\nrate_per_client = \"10/s\"\nburst_per_client = 40\n{MINIMAL}\
             [sites.limits]\nrate = \"1000/h\"\nburst = 5\n"
        );
        let c = Config::from_toml(&text, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("valid");
        assert_eq!(c.server.rate_per_client.map(|r| r.burst), Some(40));
        assert_eq!(c.sites[0].rate.map(|r| r.burst), Some(5));
    }

    #[test]
    fn client_limit_mistakes_are_located() {
        let e = errors(&format!(
            "[server]\nrate_per_client = \"fast\"\nmax_connections_per_client = 0\n{MINIMAL}"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:2:19: server.rate_per_client: invalid rate \"fast\""),
            "{e:?}"
        );
        assert_eq!(
            e[1],
            "t.toml:3:30: server.max_connections_per_client: must be at least 1 (leave the key out for no cap)"
        );
        let e = errors(&format!(
            "[server]\nrate_per_client = \"0/s\"\nburst_per_client = -1\n{MINIMAL}"
        ));
        assert_eq!(
            e,
            ["t.toml:3:20: server.burst_per_client: must be between 1 and 1000000"],
            "{e:?}"
        );
        let e = errors(&format!("[server]\nrate_per_client = \"0/s\"\n{MINIMAL}"));
        assert!(
            e[0].starts_with(
                "t.toml:2:19: server.rate_per_client: invalid rate \"0/s\": must allow"
            ),
            "{e:?}"
        );
        let e = errors(&format!("[server]\nburst_per_client = 10\n{MINIMAL}"));
        assert_eq!(
            e,
            ["t.toml:2:20: server.burst_per_client: has no effect without rate_per_client"],
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}[sites.limits]\nrate = \"5/d\"\n"));
        assert!(
            e[0].starts_with("t.toml:8:8: sites[0].limits.rate: invalid rate \"5/d\""),
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}[sites.limits]\nburst = 3\n"));
        assert_eq!(
            e,
            ["t.toml:8:9: sites[0].limits.burst: has no effect without rate"],
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}[sites.limits]\nrates = \"5/s\"\n"));
        assert!(
            e[0].starts_with("t.toml:8:1: sites[0].limits.rates: "),
            "{e:?}"
        );
    }

    #[test]
    fn ipv4_mapped_networks_are_ipv4_networks() {
        let check = |text: &str, expected: &str| {
            assert_eq!(
                parse_cidr(text),
                Some(expected.parse::<IpNet>().expect("net")),
                "{text}"
            );
        };
        check("::ffff:10.0.0.0/104", "10.0.0.0/8");
        check("::ffff:127.0.0.1", "127.0.0.1/32");
        check("::ffff:192.0.2.0/120", "192.0.2.0/24");
        check("::ffff:0:0/96", "0.0.0.0/0");
        // Wider than the mapped range: not an IPv4 network, kept as written.
        check("::/0", "::/0");
        check("::ffff:0:0/95", "::ffff:0:0/95");
        check("2001:db8::/32", "2001:db8::/32");
        check("10.0.0.0/8", "10.0.0.0/8");
    }

    #[test]
    fn listeners_that_run_could_not_bind_are_reported_where_written() {
        // HTTPS listeners without certificates are reported too; not the point here.
        let with = |server: &str, admin: &str| -> Vec<String> {
            let mut e = errors(&format!("{server}{admin}{MINIMAL}"));
            e.retain(|e| !e.contains("[[tls.certificates]]"));
            e
        };
        let e = with(
            "[server]\nhttp = [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\nhttps = [\"127.0.0.1:8080\"]\n",
            "[admin]\nlisten = \"127.0.0.1:8080\"\n",
        );
        assert_eq!(
            e,
            [
                "t.toml:2:27: server.http: 0.0.0.0:8080 overlaps 127.0.0.1:8080 (server.http at 2:9): \
                 0.0.0.0 holds the port on every IPv4 address, so run could not bind both",
                "t.toml:3:10: server.https: 127.0.0.1:8080 is also server.http at 2:9: \
                 run could not bind it twice",
                "t.toml:5:10: admin.listen: 127.0.0.1:8080 is also server.http at 2:9: \
                 run could not bind it twice",
            ]
        );
        // [::] is dual-stack: it holds the port for IPv4 too.
        let e = with(
            "[server]\nhttp = [\"[::]:80\"]\nhttps = [\"10.0.0.1:80\"]\n",
            "",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:3:10: server.https: 10.0.0.1:80 overlaps [::]:80 (server.http at 2:9): [::] holds"),
            "{e:?}"
        );
        // A default has no position: the address written is reported.
        let e = with("[server]\nhttp = [\"0.0.0.0:9090\"]\n", "[admin]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:2:9: server.http: 0.0.0.0:9090 overlaps 127.0.0.1:9090 (the default admin.listen)"),
            "{e:?}"
        );
        let e = with("", "[admin]\nlisten = \"[::ffff:127.0.0.1]:8080\"\n");
        assert!(
            e[0].starts_with("t.toml:2:10: admin.listen: [::ffff:127.0.0.1]:8080 overlaps 0.0.0.0:8080 (the default server.http)"),
            "{e:?}"
        );
        // What binds side by side is accepted: port 0 (any free port each time), other
        // ports, other addresses of one family, [::1] beside 0.0.0.0.
        for ok in [
            "[server]\nhttp = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\nhttps = [\"[::]:0\"]\n",
            "[server]\nhttp = [\"127.0.0.1:80\", \"127.0.0.2:80\", \"127.0.0.1:81\"]\n",
            "[server]\nhttp = [\"0.0.0.0:80\", \"[::1]:80\"]\n",
        ] {
            assert_eq!(with(ok, "[admin]\n"), Vec::<String>::new(), "{ok}");
        }
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            host_pattern("Static.Example.COM", false),
            Ok("static.example.com".into())
        );
        assert_eq!(
            host_pattern("*.example.com", false),
            Ok("*.example.com".into())
        );
        assert!(host_pattern("*", false).is_err());
        assert_eq!(host_pattern("*", true), Ok("*".into()));
        assert!(host_pattern("example.com:80", true).is_err());
        assert!(host_pattern("http://x", true).is_err());
        assert_eq!(host_pattern("127.0.0.1", true), Ok("127.0.0.1".into()));
    }
}

/// Properties of the loader over generated text: it never panics, and every problem it
/// reports reads `FILE:LINE:COLUMN: ` on a line of its own, at a place inside the text.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    const SHIPPED: &str = include_str!("../../config/edgecache.toml");

    const HEADERS: &[&str] = &[
        "[server]",
        "[cache]",
        "[admin]",
        "[tls]",
        "[[tls.certificates]]",
        "[[origins]]",
        "[origins.health]",
        "[health]",
        "[dns]",
        "[retries]",
        "[[pools]]",
        "[geo]",
        "[[geo.networks]]",
        "[[sites]]",
        "[[sites.routes]]",
        "[sites.cache]",
        "[[sites.rules]]",
        "[ sites . cache ]",
        "[[ x ]]",
        "[server",
    ];

    /// Every key `raw.rs` knows, and a few it does not.
    const KEYS: &[&str] = &[
        "admin",
        "budget",
        "bypass",
        "ca",
        "cache",
        "cert",
        "cidr",
        "cidrs",
        "client_address_header",
        "client_cert",
        "client_key",
        "client_no_cache",
        "connect_timeout",
        "continents",
        "countries",
        "country",
        "database",
        "enabled",
        "expect_status",
        "fall",
        "fill_memory",
        "h2_max_concurrent_streams",
        "h2_max_pending_resets",
        "header",
        "header_read_timeout",
        "heuristic_fraction",
        "heuristic_max",
        "hit_for_miss",
        "host_header",
        "hosts",
        "http",
        "https",
        "idle_timeout",
        "interval",
        "keep",
        "key",
        "key_cookies",
        "key_headers",
        "listen",
        "match",
        "max_connections",
        "max_header_bytes",
        "max_idle_connections",
        "max_object_size",
        "max_ttl",
        "memory",
        "min_per_second",
        "min_ttl",
        "name",
        "networks",
        "origin",
        "origins",
        "path",
        "pools",
        "prefix",
        "purge_allow",
        "query",
        "query_ignore",
        "region",
        "rise",
        "sendfile",
        "sendfile_min_size",
        "shutdown_grace",
        "spill_latency",
        "stale_if_error",
        "stale_while_revalidate",
        "status_ttl",
        "store_set_cookie",
        "timeout",
        "token",
        "token_env",
        "trusted_proxies",
        "ttl",
        "url",
        "via_name",
        "weight",
        "workers",
        "memroy",
        "\"quoted key\"",
        "a.b",
        "é",
    ];

    /// Scalars that are right for some key and wrong for most.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(
                &[
                    "\"127.0.0.1:0\"",
                    "\"0.0.0.0:8080\"",
                    "\"[::]:8443\"",
                    "\"localhost\"",
                    "\"1GiB\"",
                    "\"512 MiB\"",
                    "\"10s\"",
                    "\"5 parsecs\"",
                    "\"http://127.0.0.1:9\"",
                    "\"https://x:1\"",
                    "\"a\"",
                    "\"\"",
                    "\"*.example.com\"",
                    "\"10.0.0.0/8\"",
                    "\"GET\"",
                    "\"é😀\"",
                    "'literal'",
                    "\"\"\"multi\nline\"\"\"",
                    "\"\\u00e9\"",
                    "\"\\uD800\"",
                    "0",
                    "1",
                    "-1",
                    "18446744073709551616",
                    "1.5",
                    "nan",
                    "true",
                    "1979-05-27T07:32:00Z",
                    "{ continents = [\"EU\"] }",
                    "{}",
                    "[]",
                ][..]
            )
            .prop_map(str::to_owned),
            "\"[ -~é😀]{0,12}\"",
        ]
    }

    /// Values of the type most keys take, with content validation refuses.
    fn plausible() -> impl Strategy<Value = String> {
        proptest::sample::select(
            &[
                "\"\"",
                "\"localhost\"",
                "\"0.0.0.0:8080\"",
                "\"127.0.0.1:9090\"",
                "\"5 parsecs\"",
                "\"0s\"",
                "\"0B\"",
                "\"1TiB\"",
                "\"ftp://x\"",
                "\"http://\"",
                "\"*\"",
                "\"GET\"",
                "\"10.0.0.0/33\"",
                "\"nope\"",
                "\"é\"",
                "0",
                "2000000",
                "[\"\"]",
                "[\"a\", \"a\"]",
            ][..],
        )
        .prop_map(str::to_owned)
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => scalar(),
            1 => proptest::collection::vec(scalar(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            1 => proptest::collection::vec(scalar(), 1..3)
                .prop_map(|v| format!("[\n  {},\n]", v.join(",\n  "))),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => proptest::sample::select(HEADERS).prop_map(str::to_owned),
            6 => (proptest::sample::select(KEYS), "[ \t]{0,2}", value())
                .prop_map(|(k, ws, v)| format!("{k}{ws}={ws}{v}")),
            1 => Just("# a comment é".to_owned()),
            1 => Just(String::new()),
            1 => "[^\n]{0,20}",
        ]
    }

    /// TOML-shaped text: mostly lines of known tables and keys, some junk.
    fn tomlish() -> impl Strategy<Value = String> {
        proptest::collection::vec(line(), 0..30).prop_map(|l| l.join("\n"))
    }

    /// An edit of the shipped configuration.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Characters cut out at a place, and a line put in.
        Splice(usize, usize, String),
        /// A setting's value replaced.
        Value(usize, String),
        /// A commented-out line (`# [health]`, `# workers = 2`) made live.
        Uncomment(usize),
    }

    /// The shipped configuration, a few edits away: deep in a file that is otherwise valid,
    /// so validation (not only parsing) has its say.
    fn edited() -> impl Strategy<Value = String> {
        let chars = SHIPPED.chars().count();
        let lines = SHIPPED.lines().count();
        let edit = prop_oneof![
            1 => (0..chars, 0usize..12, line())
                .prop_map(|(at, cut, put)| Edit::Splice(at, cut, put)),
            3 => (0..lines, prop_oneof![3 => plausible(), 1 => value()])
                .prop_map(|(i, v)| Edit::Value(i, v)),
            3 => (0..lines).prop_map(Edit::Uncomment),
        ];
        proptest::collection::vec(edit, 1..5).prop_map(|edits| {
            let mut lines: Vec<String> = SHIPPED.lines().map(str::to_owned).collect();
            for e in edits {
                match e {
                    Edit::Value(i, v) => {
                        if let Some((key, _)) = lines[i].split_once(" = ") {
                            if !key.starts_with('#') {
                                lines[i] = format!("{key} = {v}");
                            }
                        }
                    }
                    Edit::Uncomment(i) => {
                        let live = lines[i]
                            .strip_prefix("# ")
                            .map(|l| l.split("  #").next().unwrap_or(l));
                        // Settings and table headers only, not the prose around them.
                        if let Some(l) = live.filter(|l| l.starts_with('[') || l.contains(" = ")) {
                            lines[i] = l.to_owned();
                        }
                    }
                    Edit::Splice(at, cut, put) => {
                        let mut text: Vec<char> = lines.join("\n").chars().collect();
                        let at = at.min(text.len());
                        let end = (at + cut).min(text.len());
                        text.splice(at..end, put.chars());
                        lines = text
                            .into_iter()
                            .collect::<String>()
                            .lines()
                            .map(str::to_owned)
                            .collect();
                        lines.resize(SHIPPED.lines().count().max(lines.len()), String::new());
                    }
                }
            }
            lines.join("\n")
        })
    }

    fn check_report(text: &str) -> Result<(), TestCaseError> {
        let base = Path::new("/nonexistent/edgecache-props");
        let Err(e) = Config::from_toml(text, "t.toml", base) else {
            return Ok(());
        };
        let Error::Invalid(diagnostics) = &e else {
            return Err(TestCaseError::fail(format!("not a diagnostic: {e}")));
        };
        prop_assert!(!diagnostics.is_empty());
        let report = e.to_string();
        prop_assert_eq!(
            report.lines().count(),
            diagnostics.len(),
            "one line each:\n{}",
            report
        );
        let lines = text.lines().count() + 1;
        for l in report.lines() {
            let mut parts = l.splitn(4, ':');
            let (file, line, column) = (parts.next(), parts.next(), parts.next());
            let number = |n: Option<&str>| n.and_then(|n| n.parse::<usize>().ok());
            prop_assert_eq!(file, Some("t.toml"), "{}", l);
            prop_assert!(
                number(line).is_some_and(|n| (1..=lines).contains(&n)),
                "{}",
                l
            );
            prop_assert!(number(column).is_some_and(|n| n >= 1), "{}", l);
            let rest = parts.next().unwrap_or("");
            prop_assert!(
                rest.starts_with(' ') && !rest.ends_with(": "),
                "says what is wrong: {}",
                l
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn any_text_is_loaded_or_reported_by_position(text in any::<String>()) {
            check_report(&text)?;
        }

        #[test]
        fn toml_shaped_text_is_loaded_or_reported_by_position(text in tomlish()) {
            check_report(&text)?;
        }

        #[test]
        fn an_edited_shipped_config_is_loaded_or_reported_by_position(text in edited()) {
            check_report(&text)?;
        }
    }
}

//! `[[origins]]` with `[health]` and their own health checks, trust anchors and client
//! certificates; `[[pools]]` of them; and how origins are reached: `[retries]` and `[dns]`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::uri::{Authority, Scheme, Uri};
use http::HeaderValue;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use toml::Spanned;

use super::{positive, Checker};
use crate::config::raw::{RawConfig, RawDns, RawHealth, RawOrigin, RawPool, RawRetries};
use crate::config::{ClientAuth, Dns, HealthCheck, Origin, Pool, Retries};

/// `[health]` (the defaults, and whether every origin is checked) and `[[origins]]`, each
/// name once; with the index of each valid origin by name, for pools and sites to look up.
pub(super) fn origins(
    ck: &mut Checker<'_>,
    raw: &RawConfig,
    base: &Path,
) -> (Vec<Origin>, HashMap<String, usize>) {
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
        let health = (&health_defaults, health_everywhere);
        if let Some(origin) = origin(ck, &key, o, base, health) {
            origin_index.insert(name.clone(), origins.len());
            origins.push(origin);
        }
    }
    (origins, origin_index)
}

/// One `[[origins]]` entry but its name: URL, `Host`, timeouts, trust and client
/// certificate, health checks (its own section over `health`'s defaults, or those defaults
/// where `[health]` checks every origin), limits and weight. `None` without a usable URL.
fn origin(
    ck: &mut Checker<'_>,
    key: &str,
    o: &RawOrigin,
    base: &Path,
    (health_defaults, health_everywhere): (&HealthCheck, bool),
) -> Option<Origin> {
    let (scheme, authority) = url(ck, key, &o.url)?;
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
    let client_auth = client_auth(ck, key, o, base, &scheme);
    let mut origin = Origin {
        name: o.name.get_ref().clone(),
        scheme,
        authority,
        host_header,
        connect_timeout: std::time::Duration::from_secs(5),
        timeout: std::time::Duration::from_secs(30),
        ca,
        ca_file: o.ca.as_ref().map(|p| base.join(p.get_ref())),
        max_idle_connections: o.max_idle_connections.unwrap_or(256),
        region: o.region.clone(),
        weight: 1,
        health: match &o.health {
            Some(h) if h.get_ref().enabled == Some(false) => None,
            Some(h) => Some(health(
                ck,
                &format!("{key}.health"),
                h.get_ref(),
                health_defaults,
            )),
            None => health_everywhere.then(|| health_defaults.clone()),
        },
        max_connections: None,
        client_auth,
        fail_on: vec![502, 503, 504],
    };
    if let Some(list) = &o.fail_on {
        origin.fail_on = fail_on(ck, key, list);
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
    Some(origin)
}

/// An origin's `url`: `http` or `https` with a host, and no path, query or `user:password@`
/// (the client's path and query are forwarded).
fn url(ck: &mut Checker<'_>, key: &str, url: &Spanned<String>) -> Option<(Scheme, Authority)> {
    let uri: Option<Uri> = url.get_ref().parse().ok();
    match uri
        .as_ref()
        .and_then(|u| Some((u.scheme()?.clone(), u.authority()?.clone())))
    {
        Some((s, a)) if s == Scheme::HTTP || s == Scheme::HTTPS => {
            let path = uri.as_ref().map(|u| u.path()).unwrap_or("/");
            // Both were once dropped without a word: a query the origin never saw, and
            // credentials that were never sent (and would sit in every log of the URL).
            if a.as_str().contains('@') {
                ck.error(
                    url.span(),
                    format!("{key}.url"),
                    "must not carry user:password@; send credentials from the origin side or use client_cert",
                );
                return None;
            }
            if uri.as_ref().is_some_and(|u| u.query().is_some()) || url.get_ref().contains('#') {
                ck.error(
                    url.span(),
                    format!("{key}.url"),
                    "must not have a query or fragment: the client's query is forwarded as is",
                );
                return None;
            }
            if path != "/" && !path.is_empty() {
                ck.error(
                    url.span(),
                    format!("{key}.url"),
                    "must not have a path: the client's path is forwarded as is",
                );
            }
            Some((s, a))
        }
        _ => {
            ck.error(
                url.span(),
                format!("{key}.url"),
                format!(
                    "{:?} is not an http:// or https:// URL with a host",
                    url.get_ref()
                ),
            );
            None
        }
    }
}

/// One health-check section over `base` (the built-in defaults, or `[health]`'s).
fn health(ck: &mut Checker<'_>, key: &str, raw: &RawHealth, base: &HealthCheck) -> HealthCheck {
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

fn finish(ck: &mut Checker<'_>, key: &str, raw: &RawHealth, mut h: HealthCheck) -> HealthCheck {
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
    o: &RawOrigin,
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
        cert_file: cert_path,
        key_file: key_path,
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

/// `[[pools]]`: each name once, each with at least one origin, every origin defined; with the
/// index of each pool by name, for routes to look up.
pub(super) fn pools(
    ck: &mut Checker<'_>,
    raw: &[RawPool],
    origin_index: &HashMap<String, usize>,
) -> (Vec<Pool>, HashMap<String, usize>) {
    let mut pools: Vec<Pool> = Vec::new();
    let mut pool_index: HashMap<String, usize> = HashMap::new();
    for (i, p) in raw.iter().enumerate() {
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
    (pools, pool_index)
}

pub(super) fn retries(ck: &mut Checker<'_>, raw: &RawRetries) -> Retries {
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

pub(super) fn dns(ck: &mut Checker<'_>, raw: &RawDns) -> Dns {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{errors, MINIMAL};
    use crate::config::Config;
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
    fn origin_urls_with_a_query_or_credentials_are_refused() {
        for (url, want) in [
            (
                "http://u:p@x:1",
                "origins[0].url: must not carry user:password@",
            ),
            (
                "http://u@x:1",
                "origins[0].url: must not carry user:password@",
            ),
            ("http://x:1/?a=1", "origins[0].url: must not have a query"),
            ("http://x:1?a=1", "origins[0].url: must not have a query"),
        ] {
            let e = errors(&format!(
                "[[origins]]\nname = \"a\"\nurl = \"{url}\"\n[[sites]]\nhosts = [\"h\"]\norigin = \"a\"\n"
            ));
            assert!(
                e[0].starts_with(&format!("t.toml:3:7: {want}")),
                "{url}: {e:?}"
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
}

//! `edgecache route`: which site, rule, route, pools and origins a request would get, and why,
//! without sending anything (what `nginx -T` and Envoy's route table dump give operators).
//!
//! Every decision is made by the functions the proxy itself calls: the site table
//! (`proxy::sites`), path normalisation (`proxy::path`), the site's rule lookup, the geo
//! locator as `node` builds it, and `origin::route::find`; this file only explains their
//! answers, so the dry run cannot drift from what a request gets. What an offline command
//! cannot know (latency, health, ejections) is said to be unknown, and origins are listed in
//! their configured order. Like `node`, it may use several modules: it is a leaf nobody imports.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::config::{Config, PathMatch, Site};
use crate::geo::Location;
use crate::proxy::sites::{host_without_port, SiteTable};

/// Why a dry run could not say where a request goes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a URL such as http://static.example.com/app.js")]
    Url(String),
    #[error("header {0:?} is not NAME=VALUE with a valid field name and value")]
    Header(String),
    #[error("the URL names no host and no Host header was given")]
    NoHost,
    #[error("no site serves host {0:?}: the request would be refused (421), never forwarded")]
    NoSite(String),
}

/// What a request would get, as lines for a person ([`fmt::Display`]).
#[derive(Debug)]
pub struct Report(String);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dry run of a request for `url` from `client` (the connection's peer) with `headers`
/// (`NAME=VALUE` each).
pub fn route(
    config: &Config,
    client: IpAddr,
    headers: &[String],
    url: &str,
) -> Result<Report, Error> {
    let mut map = HeaderMap::new();
    for h in headers {
        let (name, value) = h.split_once('=').ok_or_else(|| Error::Header(h.clone()))?;
        let name =
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| Error::Header(h.clone()))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| Error::Header(h.clone()))?;
        map.append(name, value);
    }
    let uri: Uri = url.parse().map_err(|_| Error::Url(url.to_owned()))?;
    let authority = match uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => map
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or(Error::NoHost)?
            .to_owned(),
    };
    let host = host_without_port(&authority)
        .filter(|_| !authority.contains('@'))
        .ok_or_else(|| Error::Url(url.to_owned()))?
        .to_ascii_lowercase();
    let sites = SiteTable::new(&config.sites);
    let site_idx = sites
        .find(&host)
        .ok_or_else(|| Error::NoSite(host.clone()))?;
    let site = &config.sites[site_idx];

    let mut out = String::new();
    let _ = writeln!(
        out,
        "site: sites[{site_idx}] ({}): {}",
        site.hosts.join(", "),
        host_reason(site, &host)
    );

    let path = uri.path();
    match crate::proxy::path::normalise(path, site.refuse_escaped_slashes) {
        Err(e) => {
            let _ = writeln!(out, "path: {path:?} is refused ({e}): nothing is forwarded");
            return Ok(Report(out));
        }
        Ok(normal) => {
            if normal != path {
                let _ = writeln!(out, "path: {path:?} is served as {normal:?}");
            }
            rule(&mut out, site, site_idx, &normal);
        }
    }

    let locator = crate::node::locator(config);
    let loc = locator.locate(client, &map);
    location(&mut out, config, &locator, client, &map, &loc);

    let Some(route) = crate::origin::route::find(&site.routes, &loc) else {
        let _ = writeln!(out, "route: none");
        return Ok(Report(out));
    };
    let _ = writeln!(
        out,
        "route: {}: {}",
        route.name,
        route_reason(site, route, &loc)
    );
    let _ = writeln!(
        out,
        "origins (no measurements offline: configured order; at run time the first pool with an \
         origin up serves, chosen among its origins by latency, load and weight):"
    );
    for (n, &p) in route.pools.iter().enumerate() {
        let Some(pool) = config.pools.get(p) else {
            continue;
        };
        let spill = pool
            .spill_latency
            .map(|d| format!(", spills to the next pool over {d:?}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  pool {}: {}{spill}", n + 1, pool.name);
        for &o in &pool.origins {
            let Some(origin) = config.origins.get(o) else {
                continue;
            };
            let health = match &origin.health {
                Some(h) => format!("health checked on {} every {:?}", h.path, h.interval),
                None => "no active health checks".to_owned(),
            };
            let _ = writeln!(
                out,
                "    {} {}://{} weight {}, {health}; state unknown offline",
                origin.name, origin.scheme, origin.authority, origin.weight
            );
        }
    }
    Ok(Report(out))
}

/// Which of the site's host patterns `host` matched, in the order `SiteTable` tries them.
fn host_reason(site: &Site, host: &str) -> String {
    if site.hosts.iter().any(|h| h == host) {
        return format!("host {host:?} matched exactly");
    }
    let wildcard = site
        .hosts
        .iter()
        .filter(|h| {
            h.strip_prefix('*')
                .is_some_and(|s| s.len() > 1 && host.ends_with(s))
        })
        .max_by_key(|h| h.len());
    match wildcard {
        Some(w) => format!("host {host:?} matched the wildcard {w:?}"),
        None => format!("host {host:?} matched no name; the catch-all \"*\" serves it"),
    }
}

fn rule(out: &mut String, site: &Site, site_idx: usize, path: &str) {
    match site.rule(path) {
        Some(i) => {
            let r = &site.rules[i];
            let how = match &r.path {
                PathMatch::Prefix(p) => format!("prefix {p:?}"),
                PathMatch::Glob(g) => format!("path glob {g:?}"),
            };
            let mut what = if r.bypass {
                "bypass: never looked up or stored".to_owned()
            } else {
                match r.settings.force_ttl {
                    Some(t) => format!("stored for {t:?} whatever the origin says"),
                    None => "cached as the origin's headers say, with the rule's limits".to_owned(),
                }
            };
            if let Some(n) = r.slice {
                what.push_str(&format!("; fetched and stored in slices of {n} bytes"));
            }
            let _ = writeln!(
                out,
                "rule: sites[{site_idx}].rules[{i}]: {path:?} matched {how} (first match wins); {what}"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "rule: none of the site's {} rules matches {path:?}: the site's [sites.cache] settings apply",
                site.rules.len()
            );
        }
    }
}

/// Where the client is and which source said so. The location itself is the locator's answer;
/// the sources are named after it.
fn location(
    out: &mut String,
    config: &Config,
    locator: &crate::geo::Locator,
    peer: IpAddr,
    headers: &HeaderMap,
    loc: &Location,
) {
    let code = |c: Option<crate::geo::Code>| {
        c.map_or_else(
            || "unknown".to_owned(),
            |c| String::from_utf8_lossy(&c).into_owned(),
        )
    };
    let trusted = locator.is_trusted(peer);
    if loc.ip != peer {
        let _ = writeln!(
            out,
            "client: {} (named in {} by the trusted proxy {peer})",
            loc.ip,
            config.server.client_address_header.as_str()
        );
    } else if trusted {
        let _ = writeln!(
            out,
            "client: {peer} (a trusted proxy that named no other client)"
        );
    } else {
        let _ = writeln!(out, "client: {peer}");
    }
    let network = config
        .geo
        .networks
        .iter()
        .filter(|(n, _)| n.contains(&loc.ip))
        .max_by_key(|(n, _)| n.prefix_len());
    let header = config.geo.header.as_ref();
    let source = match (network, header) {
        (Some((n, _)), _) if loc.country.is_some() => format!("from [[geo.networks]] {n}"),
        (_, Some(h)) if trusted && headers.contains_key(h) && loc.country.is_some() => {
            format!("from the {h} header of a trusted proxy")
        }
        _ if loc.country.is_some() => match &config.geo.database {
            Some(db) => format!("from the database {}", db.path().display()),
            None => "from the configured sources".to_owned(),
        },
        _ => "no source knows this address".to_owned(),
    };
    let _ = writeln!(
        out,
        "location: country {}, continent {} ({source})",
        code(loc.country),
        code(loc.continent)
    );
    if let Some(h) = header {
        if headers.contains_key(h) && !trusted {
            let _ = writeln!(
                out,
                "  the {h} header is ignored: {peer} is not a trusted proxy (server.trusted_proxies, geo.trusted_proxies)"
            );
        }
    }
}

fn route_reason(site: &Site, route: &crate::config::Route, loc: &Location) -> String {
    let Some(m) = &route.matcher else {
        return "has no match: serves every client that reaches it".to_owned();
    };
    let text = |c: &crate::geo::Code| String::from_utf8_lossy(c).into_owned();
    if let Some(c) = loc.continent.filter(|c| m.continents.contains(c)) {
        return format!("matched continent {}", text(&c));
    }
    if let Some(c) = loc.country.filter(|c| m.countries.contains(c)) {
        return format!("matched country {}", text(&c));
    }
    if let Some(n) = m.cidrs.iter().find(|n| n.contains(&loc.ip)) {
        return format!("matched network {n}");
    }
    let last = site.routes.last().is_some_and(|r| std::ptr::eq(r, route));
    if last {
        "no route matched: the last route serves everyone else".to_owned()
    } else {
        "chosen by origin::route".to_owned()
    }
}

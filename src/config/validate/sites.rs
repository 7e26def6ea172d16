//! `[[sites]]`: host names (each served by one site), the origin or `[[sites.routes]]` that
//! misses go to, `[sites.cache]`, `[[sites.rules]]`, methods, path handling and the site's
//! request rate.

use std::collections::HashMap;
use std::sync::Arc;

use toml::Spanned;

use super::{host_pattern, parse_cidr, rate, Checker};
use crate::cache::policy::Settings;
use crate::compress::{Coding, Compression};
use crate::config::raw::{self, RawRoute, RawRule, RawSite, RawSiteCache};
use crate::config::{
    ClientNoCache, Methods, Origin, PathMatch, Pool, QueryMode, Route, RouteMatch, Rule, Site,
    SiteCache,
};

/// Every `[[sites]]` entry that can be built (a site's `origin = "name"` adds a pool of one
/// to `pools`); a file with none is an error, since nothing would be served.
pub(super) fn sites(
    ck: &mut Checker<'_>,
    raw: &[RawSite],
    known: &SiteRefs<'_>,
    pools: &mut Vec<Pool>,
) -> Vec<Site> {
    let mut sites = Vec::new();
    let mut seen_hosts: HashMap<String, usize> = HashMap::new();
    for (i, s) in raw.iter().enumerate() {
        if let Some(site) = site(ck, i, s, known, pools, &mut seen_hosts) {
            sites.push(site);
        }
    }
    if raw.is_empty() {
        ck.error_at_start("sites", "no [[sites]] defined: nothing would be served");
    }
    sites
}

fn route(
    ck: &mut Checker<'_>,
    key: &str,
    raw: &RawRoute,
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
pub(super) struct SiteRefs<'a> {
    pub(super) origins: &'a [Origin],
    pub(super) origin_index: &'a HashMap<String, usize>,
    pub(super) pool_index: &'a HashMap<String, usize>,
    pub(super) purge_enabled: bool,
    /// `cache.max_object_size`: a rule's slices are stored objects, so none may be larger.
    pub(super) max_object_size: u64,
}

/// `[[sites]]` entry `i`: its hosts (each served by one site only), its origin or routes
/// (`origin = "name"` adds a one-origin pool), cache settings, rules, methods, path
/// handling and rate. `None` when it cannot be built; its problems are in `ck`.
fn site(
    ck: &mut Checker<'_>,
    i: usize,
    s: &RawSite,
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
        .filter_map(|(j, r)| {
            let rule = rule(ck, &format!("{key}.rules[{j}]"), r, &cache.settings)?;
            slice_fits(ck, &format!("{key}.rules[{j}]"), r, known.max_object_size);
            Some(rule)
        })
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
    let compression = compression(ck, &key, &s.compression);
    Some(Site {
        hosts,
        origin,
        routes,
        cache,
        rules,
        methods,
        refuse_escaped_slashes,
        rate,
        compression: Arc::new(compression),
    })
}

/// `[sites.compression]`: codings produced (each once, of those edgecache writes), media
/// type patterns, the size below which nothing is compressed, and each codec's level.
fn compression(ck: &mut Checker<'_>, key: &str, raw: &raw::RawCompression) -> Compression {
    let key = format!("{key}.compression");
    let mut c = Compression::default();
    if let Some(e) = raw.enabled {
        c.enabled = e;
    }
    if let Some(st) = raw.stream {
        c.stream = st;
    }
    if let Some(list) = &raw.encodings {
        c.encodings.clear();
        for e in list {
            match Coding::parse(e.get_ref()).filter(|c| Coding::PRODUCED.contains(c)) {
                Some(coding) if c.encodings.contains(&coding) => ck.error(
                    e.span(),
                    format!("{key}.encodings"),
                    format!("{:?} is listed twice", e.get_ref()),
                ),
                Some(coding) if e.get_ref().eq_ignore_ascii_case(coding.name()) => {
                    c.encodings.push(coding)
                }
                _ => ck.error(
                    e.span(),
                    format!("{key}.encodings"),
                    format!("{:?} is not one of \"br\", \"zstd\", \"gzip\"", e.get_ref()),
                ),
            }
        }
    }
    if let Some(list) = &raw.types {
        c.types.clear();
        for t in list {
            let pattern = t.get_ref().trim().to_ascii_lowercase();
            if crate::compress::valid_type_pattern(&pattern) {
                c.types.push(pattern);
            } else {
                ck.error(
                    t.span(),
                    format!("{key}.types"),
                    format!(
                        "{:?} is not a media type (\"text/css\"), a type's subtypes \
                         (\"text/*\") or a suffix (\"application/*+json\")",
                        t.get_ref()
                    ),
                );
            }
        }
    }
    if let Some(m) = &raw.min_size {
        c.min_size = m.get_ref().0;
    }
    let mut level =
        |v: &Option<toml::Spanned<i64>>, name: &str, range: std::ops::RangeInclusive<i64>| {
            let v = v.as_ref()?;
            if range.contains(v.get_ref()) {
                Some(*v.get_ref())
            } else {
                ck.error(
                    v.span(),
                    format!("{key}.levels.{name}"),
                    format!("must be from {} to {}", range.start(), range.end()),
                );
                None
            }
        };
    if let Some(v) = level(&raw.levels.br, "br", 0..=11) {
        c.levels.br = v as u32;
    }
    if let Some(v) = level(&raw.levels.zstd, "zstd", 1..=22) {
        c.levels.zstd = v as i32;
    }
    if let Some(v) = level(&raw.levels.gzip, "gzip", 1..=9) {
        c.levels.gzip = v as u32;
    }
    c
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

fn site_cache(ck: &mut Checker<'_>, key: &str, raw: &RawSiteCache) -> SiteCache {
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

/// One `[[sites.rules]]` entry: its path (glob or prefix), whether it bypasses the cache,
/// and `site`'s settings with its overrides in place.
fn rule(
    ck: &mut Checker<'_>,
    key: &str,
    spanned: &Spanned<RawRule>,
    site: &Settings,
) -> Option<Rule> {
    let raw = spanned.get_ref();
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
            ck.error(spanned.span(), key, "a rule needs path (glob) or prefix");
            return None;
        }
    };
    let d = |v: &Option<raw::Duration>| v.as_ref().map(|d| d.get_ref().0);
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
    // The site's settings never hold these (they are rule keys only): the rule's replace them.
    let settings = Settings {
        force_ttl: d(&raw.ttl),
        min_ttl: d(&raw.min_ttl),
        max_ttl: d(&raw.max_ttl),
        stale_while_revalidate: d(&raw.stale_while_revalidate),
        stale_if_error: d(&raw.stale_if_error),
        status_ttl,
        ..site.clone()
    };
    let slice = raw.slice.as_ref().and_then(|v| {
        let n = v.get_ref().0;
        if (SLICE_MIN..=SLICE_MAX).contains(&n) {
            Some(n)
        } else {
            ck.error(
                v.span(),
                format!("{key}.slice"),
                "must be from 64KiB to 1GiB",
            );
            None
        }
    });
    if slice.is_some() && raw.bypass == Some(true) {
        ck.error(spanned.span(), key, "a bypass rule stores nothing to slice");
    }
    Some(Rule {
        path,
        bypass: raw.bypass.unwrap_or(false),
        settings,
        slice,
    })
}

/// The smallest and largest `slice` a rule may give.
const SLICE_MIN: u64 = 64 << 10;
const SLICE_MAX: u64 = 1 << 30;

/// A rule's `slice` is stored as an object: no larger than `cache.max_object_size`.
fn slice_fits(ck: &mut Checker<'_>, key: &str, raw: &Spanned<RawRule>, max_object_size: u64) {
    if let Some(v) = &raw.get_ref().slice {
        if v.get_ref().0 > max_object_size && (SLICE_MIN..=SLICE_MAX).contains(&v.get_ref().0) {
            ck.error(
                v.span(),
                format!("{key}.slice"),
                "is larger than cache.max_object_size: each slice is stored as one object",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::{errors, MINIMAL};
    use crate::config::Config;

    #[test]
    fn rule_settings_are_the_sites_with_the_rules_overrides() {
        let text = format!(
            "{MINIMAL}[sites.cache]\nstale_if_error = \"1m\"\n\
             [[sites.rules]]\nprefix = \"/api/\"\nttl = \"5s\"\nstatus_ttl = {{ 404 = \"30s\" }}\n\
             [[sites.rules]]\npath = \"*.css\"\nbypass = true\n"
        );
        let c = Config::from_toml(&text, "t.toml", Path::new(".")).map_err(|e| e.to_string());
        let c = c.expect("valid");
        let site = &c.sites[0];
        assert_eq!(site.rule("/api/v1"), Some(0));
        assert_eq!(site.rule("/a/b.css"), Some(1));
        assert_eq!(site.rule("/index.html"), None);
        let api = site.settings(site.rule("/api/v1"));
        assert_eq!(api.force_ttl, Some(Duration::from_secs(5)));
        assert_eq!(api.status_ttl, [(404, Duration::from_secs(30))]);
        assert_eq!(api.default_stale_if_error, Duration::from_secs(60));
        let css = site.settings(Some(1));
        assert!(site.rules[1].bypass);
        assert_eq!((css.force_ttl, css.status_ttl.len()), (None, 0));
        assert_eq!(site.settings(None), &site.cache.settings);
        assert_eq!(site.settings(Some(7)), &site.cache.settings, "no such rule");
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
}

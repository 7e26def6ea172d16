//! Raw TOML types to validated [`Config`]: every problem is collected, with its position.
//!
//! This file owns what every section shares: the `Checker` that turns byte offsets into
//! `FILE:LINE:COLUMN` and collects diagnostics, the dotted key paths named in parse errors,
//! `check` (each section in turn), and the value checks more than one section uses (positive
//! durations, rates, CIDR blocks, host patterns). Each section has a file of its own: `server`
//! (listeners, timeouts, client limits, listeners that clash), `tls`, `cache`, `origins` (with
//! health checks, pools, retries and DNS), `sites` (with routes and rules), `admin`, `geo` and `log`.

mod admin;
mod cache;
mod cluster;
mod geo;
mod log;
mod origins;
mod parse;
#[cfg(test)]
mod props;
mod server;
mod sites;
mod tls;
mod warnings;

use std::ops::Range;
use std::path::Path;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::RawConfig;
use super::{Config, Diagnostic, Error, Rate};

pub(super) use tls::certified_key_from_pem;

/// Collects diagnostics against one file's text.
struct Checker<'a> {
    text: &'a str,
    file: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
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

    /// Something valid that likely does not do what was meant (see `warnings`).
    fn warn(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.warnings.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: Some(key.into()),
            message: message.into(),
        });
    }

    /// A problem the parser found at byte `offset`, about `key` when one can be named.
    fn raw_error(&mut self, offset: usize, key: Option<String>, message: String) {
        let (line, column) = self.position(offset);
        self.errors.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message,
        });
    }

    /// A problem with no place in the text (something missing from the whole file, or from a
    /// table that has no header of its own): reported at its start.
    fn error_at_start(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            file: self.file.to_owned(),
            line: 1,
            column: 1,
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
        warnings: Vec::new(),
    };
    let Some(raw) = parse::raw(&mut ck) else {
        return Err(Error::Invalid(ck.errors));
    };
    let mut config = check(&mut ck, &raw, base);
    if ck.errors.is_empty() {
        warnings::warnings(&mut ck, &raw, &config);
        config.warnings = ck.warnings;
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
///
/// Why not the deserializer's path (`serde_path_to_error` around `toml::Deserializer`): the
/// toml crate parses the whole document before serde visits any of it, so a syntax error
/// (`a=.`, an unclosed array) would come with an empty path where this names `a` or
/// `server`, and the tests pin those keys. This scan would stay for them; a second way to
/// name keys, and a new dependency, for the errors serde raises is not worth it. (toml also
/// hands a `Spanned` value to serde as a map of private keys, which a path would run into.)
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

/// Every section in turn, each adding its problems to `ck`: the order here is the order they
/// are reported in, and a section that names another (a pool its origins, a site its pools)
/// comes after it.
fn check(ck: &mut Checker<'_>, raw: &RawConfig, base: &Path) -> Config {
    let mut server = server::server(ck, &raw.server);
    server.upgrade_socket = server::upgrade_socket(ck, &raw.server, base);
    let tls = tls::tls(ck, raw, &server, base);
    let cache = cache::cache(ck, &raw.cache);
    let (origins, origin_index) = origins::origins(ck, raw, base);
    let (mut pools, pool_index) = origins::pools(ck, &raw.pools, &origin_index);
    let geo = geo::geo(ck, &raw.geo, base);
    let known = sites::SiteRefs {
        origins: &origins,
        origin_index: &origin_index,
        pool_index: &pool_index,
        purge_enabled: raw.admin.is_some(),
        max_object_size: cache.max_object_size,
    };
    let mut sites = sites::sites(ck, &raw.sites, &known, &mut pools);
    // Every site's and rule's settings read directives from the same own field.
    for site in &mut sites {
        let field = &cache.cache_control_field;
        site.cache.settings.cache_control_field = field.clone();
        for rule in &mut site.rules {
            rule.settings.cache_control_field = field.clone();
        }
    }
    let admin = raw.admin.as_ref().map(|a| admin::admin(ck, a));
    server::overlapping_listeners(ck, raw, &server, admin.as_ref());
    let retries = origins::retries(ck, &raw.retries);
    let dns = origins::dns(ck, &raw.dns);
    let log = log::log(ck, &raw.log, base);
    let cluster = raw.cluster.as_ref().map(|c| cluster::cluster(ck, c));

    Config {
        log,
        cluster,
        source: ck.file.to_owned(),
        path: None,
        sha256: None,
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
        warnings: Vec::new(),
    }
}

/// A duration that must not be zero: stored in `slot` when given and valid.
fn positive(
    ck: &mut Checker<'_>,
    key: &str,
    v: &Option<super::raw::Duration>,
    slot: &mut std::time::Duration,
) {
    if let Some(d) = v {
        if d.get_ref().0.is_zero() {
            ck.error(d.span(), key, "must be greater than zero");
        } else {
            *slot = d.get_ref().0;
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

#[cfg(test)]
fn errors(text: &str) -> Vec<String> {
    match Config::from_toml(text, "t.toml", Path::new(".")) {
        Ok(_) => Vec::new(),
        Err(Error::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// One origin and one site: the smallest valid file, for tests to add a section to.
#[cfg(test)]
const MINIMAL: &str = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9000\"\n[[sites]]\nhosts = [\"example.com\"]\norigin = \"a\"\n";

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse_errors_name_the_key_they_are_about() {
        let text = "# edge\n[server]\nworkers = \"two\"\n";
        let e = errors(text);
        assert!(
            e[0].starts_with("t.toml:3:11: server.workers: text \"two\" is not a whole number"),
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
            e[0].starts_with("t.toml:3:1: sites[0].routes[0]: `pools` is required here"),
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
    #[test]
    fn every_parse_error_is_reported_at_once() {
        let text = "[server]\nworkers = \"two\"\nbogus = 1\n\
                    [cache]\nmemory = \"1MB\"\n\
                    [[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\nweight = \"x\"\n\
                    [[sites]]\nhosts = \"h\"\norigin = \"a\"\n\
                    [[sites.routes]]\nname = \"r\"\n";
        let e = errors(text);
        let at: Vec<&str> = e
            .iter()
            .map(|e| e.split(": ").take(2).last().unwrap_or(""))
            .collect();
        assert_eq!(
            at,
            [
                "server.workers",
                "server.bogus",
                "cache.memory",
                "origins[0].weight",
                "sites[0].hosts",
                "sites[0].routes[0]"
            ],
            "{e:#?}"
        );
        assert!(e[0].starts_with("t.toml:2:11: "), "{e:?}");
        assert!(e[1].starts_with("t.toml:3:1: "), "{e:?}");
        assert!(e[5].starts_with("t.toml:13:1: "), "{e:?}");
    }
    #[test]
    fn a_header_without_its_bracket_is_reported_on_its_line() {
        let e = errors("# edge\n[server\nhttp = [\"127.0.0.1:1\"]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("t.toml:2:8: "), "{e:?}");
    }
    #[test]
    fn wrong_types_are_named_in_words() {
        let text = "[server]\nworkers = \"x\"\nhttp = \"x\"\nh2_max_concurrent_streams = true\n\
                    burst_per_client = \"x\"\n\
                    [cache]\nsendfile = 1\nmemory = true\n\
                    [admin]\npublic_metrics = \"x\"\nmax_connections = -1\n\
                    [retries]\nbudget = \"x\"\n\
                    [health]\nexpect_status = [70000]\nrise = \"x\"\ninterval = 5\n\
                    [dns]\nservers = [1]\n\
                    [[origins]]\nname = 1\nurl = \"http://x:1\"\nhealth = 5\nfail_on = \"x\"\n\
                    [[sites]]\nhosts = [\"h\"]\norigin = \"a\"\nmethods = \"GET\"\nrules = 5\n\
                    [sites.cache]\nheuristic_fraction = \"x\"\nquery_ignore = \"x\"\n";
        let e = errors(text);
        assert!(e.len() >= 18, "{e:#?}");
        for d in &e {
            for word in [
                "usize", "u16", "u32", "u64", "i64", "f64", "sequence", "map", "struct", "enum",
                "Option", "field",
            ] {
                assert!(!d.contains(word), "{word} in {d}");
            }
        }
        let has = |s: &str| e.iter().any(|d| d.contains(s));
        assert!(
            has("server.workers: text \"x\" is not a whole number"),
            "{e:#?}"
        );
        assert!(
            has("server.http: text \"x\" is not a list in [ ]"),
            "{e:#?}"
        );
        assert!(
            has("cache.sendfile: number `1` is not true or false"),
            "{e:#?}"
        );
        assert!(has("is not a number from 0 to 65535"), "{e:#?}");
        assert!(
            has("origins[0].health: number `5` is not a table"),
            "{e:#?}"
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

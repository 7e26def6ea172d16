//! `[server]`: listeners, timeouts, sizes, HTTP/2 limits and the per-client limits; and the
//! listen addresses (`server.http`, `server.https`, `admin.listen`) that `run` could not all
//! bind.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use super::{parse_cidr, positive, rate, Checker};
use crate::config::raw::{RawConfig, RawServer, Size};
use crate::config::{Admin, Server};

/// `[server]`: listeners (0.0.0.0:8080 when none is given), workers, timeouts, sizes and
/// HTTP/2 limits here, the client-facing settings in [`clients`].
pub(super) fn server(ck: &mut Checker<'_>, raw: &RawServer) -> Server {
    let defaults = Server::default();
    let mut server = Server {
        http: addresses(ck, "server.http", &raw.http),
        https: addresses(ck, "server.https", &raw.https),
        ..defaults
    };
    if raw.http.is_empty() && raw.https.is_empty() {
        server.http = vec![SocketAddr::from(([0, 0, 0, 0], 8080))];
    }
    if let Some(w) = &raw.workers {
        if *w.get_ref() == 0 || *w.get_ref() > 1024 {
            ck.error(w.span(), "server.workers", "must be between 1 and 1024");
        } else {
            server.workers = Some(*w.get_ref());
        }
    }
    positive(
        ck,
        "server.header_read_timeout",
        &raw.header_read_timeout,
        &mut server.header_read_timeout,
    );
    positive(
        ck,
        "server.idle_timeout",
        &raw.idle_timeout,
        &mut server.idle_timeout,
    );
    positive(
        ck,
        "server.send_timeout",
        &raw.send_timeout,
        &mut server.send_timeout,
    );
    if let Some(d) = &raw.shutdown_grace {
        server.shutdown_grace = d.get_ref().0;
    }
    if let Some(m) = &raw.max_header_bytes {
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
    if let Some(m) = &raw.max_connections {
        if *m.get_ref() == 0 {
            ck.error(m.span(), "server.max_connections", "must be at least 1");
        } else {
            server.max_connections = *m.get_ref();
        }
    }
    if let Some(m) = &raw.h2_max_concurrent_streams {
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
    if let Some(m) = raw.h2_max_pending_resets {
        server.h2_max_pending_resets = m;
    }
    clients(ck, raw, &mut server);
    server
}

/// `[server]`'s settings about clients: trusted proxies and the field they name clients in,
/// the `Via` name, and the per-client request rate and connection cap.
fn clients(ck: &mut Checker<'_>, raw: &RawServer, server: &mut Server) {
    for p in &raw.trusted_proxies {
        match parse_cidr(p.get_ref()) {
            Some(net) => server.trusted_proxies.push(net),
            None => ck.error(
                p.span(),
                "server.trusted_proxies",
                format!("{:?} is not an IP address or CIDR block", p.get_ref()),
            ),
        }
    }
    if let Some(h) = &raw.client_address_header {
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
    if let Some(v) = &raw.via_name {
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
        ("server.rate_per_client", &raw.rate_per_client),
        ("server.burst_per_client", &raw.burst_per_client),
    );
    if let Some(m) = &raw.max_connections_per_client {
        match usize::try_from(*m.get_ref()) {
            Ok(n) if n >= 1 => server.max_connections_per_client = Some(n),
            _ => ck.error(
                m.span(),
                "server.max_connections_per_client",
                "must be at least 1 (leave the key out for no cap)",
            ),
        }
    }
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
pub(super) fn overlapping_listeners(
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

/// `server.upgrade_socket`: a path, relative to the configuration's directory.
pub(super) fn upgrade_socket(
    ck: &mut Checker<'_>,
    raw: &RawServer,
    base: &Path,
) -> Option<std::path::PathBuf> {
    let s = raw.upgrade_socket.as_ref()?;
    if s.get_ref().trim().is_empty() {
        ck.error(s.span(), "server.upgrade_socket", "must be a file path");
        return None;
    }
    Some(base.join(s.get_ref()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{errors, MINIMAL};
    use crate::config::{Config, Rate};
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
}

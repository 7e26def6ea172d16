//! `[cluster]`: the fleet's name, this node's id (the host name by default), the peer
//! listener and the address peers dial, and exactly one way of finding the members: etcd
//! endpoints, a static list of peer addresses (this node's own among them), or a DNS name.

use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::{positive, Checker};
use crate::config::raw::RawCluster;
use crate::config::{Cluster, Discovery};

/// `[cluster]`, present.
pub(super) fn cluster(ck: &mut Checker<'_>, spanned: &Spanned<RawCluster>) -> Cluster {
    let raw = spanned.get_ref();
    let name = match &raw.name {
        Some(n) if id_like(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            ck.error(
                n.span(),
                "cluster.name",
                format!(
                    "{:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                    n.get_ref()
                ),
            );
            String::new()
        }
        None => {
            ck.error(
                spanned.span(),
                "cluster.name",
                "is required: nodes with the same name form one fleet",
            );
            String::new()
        }
    };
    let node = match &raw.node {
        Some(n) if id_like(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            ck.error(
                n.span(),
                "cluster.node",
                format!(
                    "{:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                    n.get_ref()
                ),
            );
            String::new()
        }
        None => match host_name() {
            Some(h) => h,
            None => {
                ck.error(
                    spanned.span(),
                    "cluster.node",
                    "the host name could not be read as a node id: set node",
                );
                String::new()
            }
        },
    };
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let listen = match &raw.listen {
        Some(l) => address(ck, "cluster.listen", l).unwrap_or(unspecified),
        None => {
            ck.error(
                spanned.span(),
                "cluster.listen",
                "is required: the peer listener, such as \"127.0.0.1:7400\"",
            );
            unspecified
        }
    };
    let advertise = advertise(ck, spanned, listen);
    let discovery = discovery(ck, spanned, advertise);
    let mut lease_ttl = Duration::from_secs(5);
    positive(ck, "cluster.lease_ttl", &raw.lease_ttl, &mut lease_ttl);
    let mut peer_timeout = Duration::from_secs(2);
    positive(
        ck,
        "cluster.peer_timeout",
        &raw.peer_timeout,
        &mut peer_timeout,
    );
    Cluster {
        name,
        node,
        listen,
        advertise,
        discovery,
        lease_ttl,
        hot_copies: raw.hot_copies.unwrap_or(false),
        peer_timeout,
    }
}

/// Exactly one of `etcd`, `peers` and `peers_dns`.
fn discovery(
    ck: &mut Checker<'_>,
    spanned: &Spanned<RawCluster>,
    advertise: SocketAddr,
) -> Discovery {
    let raw = spanned.get_ref();
    let given = [
        raw.etcd.as_ref().map(|e| e.span()),
        raw.peers.as_ref().map(|p| p.span()),
        raw.peers_dns.as_ref().map(|p| p.span()),
    ];
    if given.iter().flatten().count() > 1 {
        let span = given
            .iter()
            .flatten()
            .nth(1)
            .cloned()
            .unwrap_or(spanned.span());
        ck.error(
            span,
            "cluster",
            "give exactly one of etcd, peers and peers_dns",
        );
    }
    if let Some(etcd) = &raw.etcd {
        let mut urls = Vec::new();
        for u in etcd.get_ref() {
            let ok = u
                .get_ref()
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| {
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
                })
                .is_some();
            if ok {
                urls.push(u.get_ref().clone());
            } else {
                ck.error(
                    u.span(),
                    "cluster.etcd",
                    format!(
                        "{:?} is not an etcd endpoint such as \"http://127.0.0.1:2379\"",
                        u.get_ref()
                    ),
                );
            }
        }
        if etcd.get_ref().is_empty() {
            ck.error(etcd.span(), "cluster.etcd", "names no endpoint");
        }
        return Discovery::Etcd(urls);
    }
    if let Some(peers) = &raw.peers {
        let mut list = Vec::new();
        for p in peers.get_ref() {
            match p.get_ref().parse::<SocketAddr>() {
                Ok(a) if !a.ip().is_unspecified() && a.port() != 0 => list.push(a),
                _ => ck.error(
                    p.span(),
                    "cluster.peers",
                    format!(
                        "{:?} is not a peer address such as \"10.0.0.2:7400\" (an IP address and a port; use peers_dns for a name)",
                        p.get_ref()
                    ),
                ),
            }
        }
        if list.len() == peers.get_ref().len() && !list.contains(&advertise) {
            ck.error(
                peers.span(),
                "cluster.peers",
                format!("must list this node's own advertise address {advertise}, so every node sees the same members"),
            );
        }
        return Discovery::Peers(list);
    }
    if let Some(dns) = &raw.peers_dns {
        let parsed = dns
            .get_ref()
            .rsplit_once(':')
            .and_then(|(n, p)| Some((n, p.parse::<u16>().ok().filter(|p| *p != 0)?)))
            .filter(|(n, _)| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            });
        return match parsed {
            Some((name, port)) => Discovery::PeersDns {
                name: name.to_owned(),
                port,
            },
            None => {
                ck.error(
                    dns.span(),
                    "cluster.peers_dns",
                    format!(
                        "{:?} is not \"name:port\" such as \"edgecache-peers.default.svc:7400\"",
                        dns.get_ref()
                    ),
                );
                Discovery::PeersDns {
                    name: String::new(),
                    port: 0,
                }
            }
        };
    }
    ck.error(
        spanned.span(),
        "cluster",
        "give one of etcd, peers and peers_dns: how this node finds the others",
    );
    Discovery::Peers(Vec::new())
}

/// `advertise`, or the address in the environment variable `advertise_env` names, or
/// `listen` when that is dialable.
fn advertise(
    ck: &mut Checker<'_>,
    spanned: &Spanned<RawCluster>,
    listen: SocketAddr,
) -> SocketAddr {
    let raw = spanned.get_ref();
    let (text, key, span) = match (&raw.advertise, &raw.advertise_env) {
        (Some(a), Some(_)) => {
            ck.error(
                a.span(),
                "cluster.advertise",
                "give either advertise or advertise_env, not both",
            );
            return listen;
        }
        (Some(a), None) => (a.get_ref().clone(), "cluster.advertise", a.span()),
        // A pod learns its own IP address only when it starts (Kubernetes' downward API
        // puts it in an environment variable), and the file is shared by every pod: so the
        // file may name the variable instead of the address.
        (None, Some(env)) => {
            let value = match std::env::var(env.get_ref()) {
                Ok(v) if !v.trim().is_empty() => v.trim().to_owned(),
                Ok(_) => {
                    ck.error(
                        env.span(),
                        "cluster.advertise_env",
                        format!("environment variable {} is empty", env.get_ref()),
                    );
                    return listen;
                }
                Err(std::env::VarError::NotPresent) => {
                    ck.error(
                        env.span(),
                        "cluster.advertise_env",
                        format!(
                            "environment variable {} is not set (it should hold this node's address, such as the pod IP)",
                            env.get_ref()
                        ),
                    );
                    return listen;
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    ck.error(
                        env.span(),
                        "cluster.advertise_env",
                        format!("environment variable {} is not valid UTF-8", env.get_ref()),
                    );
                    return listen;
                }
            };
            (value, "cluster.advertise_env", env.span())
        }
        (None, None) => {
            if listen.ip().is_unspecified() && raw.listen.is_some() {
                let span = raw.listen.as_ref().map_or(spanned.span(), |l| l.span());
                ck.error(
                    span,
                    "cluster.advertise",
                    format!("is required when listen is {listen}: peers cannot dial an unspecified address (or name a variable holding it in advertise_env)"),
                );
            }
            return listen;
        }
    };
    // An address and port, or an address alone, which takes listen's port (a bare IPv6
    // address such as a pod's needs no brackets then).
    // With listen's port 0, that is the port bound (as when advertise is left to listen).
    let (parsed, port_given) = match text.parse::<SocketAddr>() {
        Ok(a) => (Some(a), true),
        Err(_) => (
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, listen.port())),
            false,
        ),
    };
    match parsed {
        Some(addr) if addr.ip().is_unspecified() || (port_given && addr.port() == 0) => {
            ck.error(
                span,
                key,
                format!("{addr} cannot be dialled by peers: give an address and port they reach"),
            );
            addr
        }
        Some(addr) => addr,
        None => {
            ck.error(
                span,
                key,
                format!("{text:?} is not an address such as \"127.0.0.1:7400\" or \"10.0.0.2\""),
            );
            listen
        }
    }
}

fn address(ck: &mut Checker<'_>, key: &str, v: &Spanned<String>) -> Option<SocketAddr> {
    match v.get_ref().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            ck.error(
                v.span(),
                key,
                format!(
                    "{:?} is not an address such as \"127.0.0.1:7400\"",
                    v.get_ref()
                ),
            );
            None
        }
    }
}

/// A name fit for keys, paths and headers: ASCII letters, digits, `-`, `_` and `.`.
fn id_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The host name, as the kernel has it (Linux); `None` where it cannot be read or is no id.
fn host_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = text.trim();
    id_like(name).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    fn errors(cluster: &str) -> Vec<String> {
        super::super::errors(&format!("{}{cluster}", super::super::MINIMAL))
    }

    const PEERS: &str = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"127.0.0.1:7400\"\npeers = [\"127.0.0.1:7400\", \"127.0.0.1:7401\"]\n";

    fn check(extra_cluster: &str, expected: &[&str]) {
        let text = format!("{PEERS}{extra_cluster}");
        let got = errors(&text);
        for e in expected {
            assert!(got.iter().any(|g| g.contains(e)), "{e:?} not in {got:#?}");
        }
        if expected.is_empty() {
            assert!(got.is_empty(), "{got:#?}");
        }
    }

    #[test]
    fn a_static_fleet_is_valid() {
        check("", &[]);
        check(
            "hot_copies = true\npeer_timeout = \"500ms\"\nlease_ttl = \"3s\"\n",
            &[],
        );
    }

    #[test]
    fn exactly_one_way_of_finding_members() {
        check(
            "etcd = [\"http://127.0.0.1:2379\"]\n",
            &["cluster: give exactly one of etcd, peers and peers_dns"],
        );
        let text = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"127.0.0.1:7400\"\n";
        let got = errors(text);
        assert!(
            got.iter()
                .any(|g| g.contains("give one of etcd, peers and peers_dns")),
            "{got:#?}"
        );
    }

    #[test]
    fn the_node_must_be_in_its_peer_list() {
        let text = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"127.0.0.1:7409\"\npeers = [\"127.0.0.1:7400\"]\n";
        let got = errors(text);
        assert!(
            got.iter()
                .any(|g| g.contains("must list this node's own advertise address 127.0.0.1:7409")),
            "{got:#?}"
        );
    }

    #[test]
    fn unspecified_advertise_is_refused() {
        let text = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"0.0.0.0:7400\"\npeers_dns = \"peers.test:7400\"\n";
        let got = errors(text);
        assert!(
            got.iter()
                .any(|g| g.contains("cluster.advertise: is required when listen is 0.0.0.0:7400")),
            "{got:#?}"
        );
        let text = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"0.0.0.0:7400\"\nadvertise = \"0.0.0.0:7400\"\npeers_dns = \"peers.test:7400\"\n";
        let got = errors(text);
        assert!(
            got.iter().any(|g| g.contains("cannot be dialled by peers")),
            "{got:#?}"
        );
    }

    #[test]
    fn advertise_from_the_environment() {
        const DNS: &str = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"0.0.0.0:7400\"\npeers_dns = \"peers.test:7400\"\n";
        // Names no other test uses: the environment is shared by the test threads.
        std::env::set_var("EDGECACHE_TEST_ADVERTISE_IP", "10.1.2.3");
        std::env::set_var("EDGECACHE_TEST_ADVERTISE_IPV6", "fd00::7");
        std::env::set_var("EDGECACHE_TEST_ADVERTISE_FULL", "10.1.2.3:7500");
        std::env::set_var("EDGECACHE_TEST_ADVERTISE_BAD", "pod-ip");
        std::env::set_var("EDGECACHE_TEST_ADVERTISE_ANY", "0.0.0.0");
        for (var, expected) in [
            ("EDGECACHE_TEST_ADVERTISE_IP", "10.1.2.3:7400"),
            ("EDGECACHE_TEST_ADVERTISE_IPV6", "[fd00::7]:7400"),
            ("EDGECACHE_TEST_ADVERTISE_FULL", "10.1.2.3:7500"),
        ] {
            let text = format!("{}{DNS}advertise_env = \"{var}\"\n", super::super::MINIMAL);
            let config =
                crate::config::Config::from_toml(&text, "t.toml", std::path::Path::new("."))
                    .unwrap_or_else(|e| panic!("{var}: {e}"));
            let advertise = config.cluster.map(|c| c.advertise.to_string());
            assert_eq!(advertise.as_deref(), Some(expected), "{var}");
        }
        for (var, expected) in [
            ("EDGECACHE_TEST_ADVERTISE_UNSET", "cluster.advertise_env: environment variable EDGECACHE_TEST_ADVERTISE_UNSET is not set"),
            ("EDGECACHE_TEST_ADVERTISE_BAD", "cluster.advertise_env: \"pod-ip\" is not an address"),
            ("EDGECACHE_TEST_ADVERTISE_ANY", "cluster.advertise_env: 0.0.0.0:7400 cannot be dialled by peers"),
        ] {
            let got = errors(&format!("{DNS}advertise_env = \"{var}\"\n"));
            assert!(got.iter().any(|g| g.contains(expected)), "{expected:?} not in {got:#?}");
        }
        let got = errors(&format!(
            "{DNS}advertise = \"10.0.0.1:7400\"\nadvertise_env = \"EDGECACHE_TEST_ADVERTISE_IP\"\n"
        ));
        assert!(
            got.iter()
                .any(|g| g.contains("give either advertise or advertise_env, not both")),
            "{got:#?}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let text = "[cluster]\nname = \"pop fra\"\nnode = \"\"\nlisten = \"x\"\npeers_dns = \"nope\"\npeer_timeout = \"0s\"\n";
        let got = errors(text);
        for e in [
            "cluster.name: \"pop fra\" must be",
            "cluster.node: \"\" must be",
            "cluster.listen: \"x\" is not an address",
            "cluster.peers_dns: \"nope\" is not \"name:port\"",
            "cluster.peer_timeout: must be greater than zero",
        ] {
            assert!(got.iter().any(|g| g.contains(e)), "{e:?} not in {got:#?}");
        }
        let text = "[cluster]\nname = \"pop\"\nnode = \"a\"\nlisten = \"127.0.0.1:7400\"\netcd = [\"127.0.0.1:2379\"]\n";
        let got = errors(text);
        assert!(
            got.iter().any(|g| g.contains("is not an etcd endpoint")),
            "{got:#?}"
        );
    }
}

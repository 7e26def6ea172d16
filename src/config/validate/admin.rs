//! `[admin]`: the loopback listener's address, its token (written, or from the environment:
//! a variable named but missing is a problem, not an open endpoint), its connection limit,
//! and the networks allowed to purge.

use std::net::SocketAddr;

use super::{parse_cidr, Checker};
use crate::config::raw::RawAdmin;
use crate::config::Admin;

/// `[admin]`, present: every key has a default.
pub(super) fn admin(ck: &mut Checker<'_>, raw: &RawAdmin) -> Admin {
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
    let token_env = match (&raw.token, &raw.token_env) {
        (None, Some(env)) => Some(env.get_ref().clone()),
        (None, None) if std::env::var("EDGECACHE_ADMIN_TOKEN").is_ok_and(|t| !t.is_empty()) => {
            Some("EDGECACHE_ADMIN_TOKEN".to_owned())
        }
        _ => None,
    };
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
        token_env,
        public_metrics: raw.public_metrics.unwrap_or(false),
        max_connections,
        purge_allow,
    }
}

//! Who may send the HTTP `PURGE` method to the data listeners: a client whose address is in
//! `admin.purge_allow`, or a request bearing the admin token.
//!
//! The address is the client's, not the socket's: behind a proxy on the same host every
//! request arrives from `127.0.0.1` (the shipped `purge_allow`). From a trusted proxy the
//! client is the one it names ([`Locator::client`], as for geo routes); a request that
//! carries forwarding fields from a peer that is not trusted was forwarded by a proxy we know
//! nothing of, so its peer's address says nothing about the client and it is refused.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use super::body::Body;
use super::{refuse, Answer, ConnInfo, Outcome_, ProxyError};
use crate::cache::PurgeTarget;

use crate::config::Admin;
use crate::geo::Locator;
use crate::telemetry::CacheResult;

/// Each member's result of a forwarded purge: `ok` or `error: ...`, by member id.
pub type PeerResults = crate::cluster::peer::PurgeResults;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Whether a `PURGE` that arrived from `peer` with `headers` may purge. Never without an
/// `[admin]` section.
pub(crate) fn allowed(
    admin: Option<&Admin>,
    locator: &Locator,
    peer: IpAddr,
    headers: &HeaderMap,
) -> bool {
    let Some(admin) = admin else {
        return false;
    };
    if admin.authorizes(headers.get(header::AUTHORIZATION)) {
        return true;
    }
    if !locator.is_trusted(peer)
        && (headers.contains_key(&X_FORWARDED_FOR) || headers.contains_key(header::FORWARDED))
    {
        return false;
    }
    let client = locator.client(peer, headers);
    admin.purge_allow.iter().any(|n| n.contains(&client))
}

impl super::Proxy {
    /// Purges `target` here and counts it: the one place every purge accepted at this node
    /// goes through (the `PURGE` method and the admin API), so that a fleet can pass it on.
    /// Returns how many stored responses matched here.
    pub fn purge(&self, target: &PurgeTarget<'_>, soft: bool) -> usize {
        self.purge_reporting(target, soft).0
    }

    /// [`Proxy::purge`], with the fleet's per-member results to come when the purge is
    /// forwarded to members (static peers, DNS); the forwarding goes on if the receiver is
    /// dropped.
    pub fn purge_reporting(
        &self,
        target: &PurgeTarget<'_>,
        soft: bool,
    ) -> (usize, Option<PeerResults>) {
        let n = self.apply_purge(target, soft);
        let results = self.fleet.as_ref().and_then(|f| {
            f.publish(crate::cluster::Purge {
                target: crate::cluster::Target::from(target),
                soft,
                node: f.config.node.clone(),
            })
        });
        (n, results)
    }

    /// A purge another member accepted, applied here only (never published again): what
    /// the peer listener's purge endpoint and the etcd watch call.
    pub fn purge_from_fleet(&self, purge: &crate::cluster::Purge) -> usize {
        self.apply_purge(&purge.target.as_store(), purge.soft)
    }

    /// Purges here only (a purge another member accepted, or this node's own).
    pub(super) fn apply_purge(&self, target: &PurgeTarget<'_>, soft: bool) -> usize {
        let n = self.store.purge(target, soft);
        if let Some(f) = &self.fleet {
            f.purged();
        }
        self.metrics.purged(n as u64);
        n
    }

    /// The HTTP `PURGE` method: removes every stored variant of the URL, for clients in
    /// allowed networks or bearing the admin token (see `purge`).
    pub(super) fn purge_method(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        host: &str,
        pq: &str,
    ) -> Answer {
        let allowed = allowed(
            self.config.admin.as_ref(),
            &self.locator,
            conn.peer.ip(),
            req.headers(),
        );
        if !allowed {
            return refuse(ProxyError::PurgeForbidden);
        }
        let soft = req
            .headers()
            .get("x-purge-soft")
            .is_some_and(|v| v == "1" || v == "true");
        let n = self.purge(
            &PurgeTarget::Url {
                host,
                path_and_query: pq,
            },
            soft,
        );
        let mut resp = Response::new(Body::full(Bytes::from(format!("{{\"purged\":{n}}}\n"))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        (resp, Outcome_::local(CacheResult::Purge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::AddressHeader;
    use http::HeaderValue;
    use std::net::SocketAddr;

    fn admin(token: Option<&str>) -> Admin {
        Admin {
            token_env: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: token.map(str::to_owned),
            public_metrics: false,
            max_connections: 64,
            purge_allow: vec![
                "127.0.0.1/32".parse().expect("net"),
                "192.0.2.0/24".parse().expect("net"),
            ],
        }
    }

    fn check(token: Option<&str>, peer: &str, hdrs: &[(&str, &str)], expected: bool) {
        let locator = Locator::new(
            Vec::new(),
            None,
            vec!["127.0.0.1/32".parse().expect("net")],
            None,
        )
        .with_address_header(AddressHeader::XForwardedFor);
        let mut headers = HeaderMap::new();
        for (k, v) in hdrs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let got = allowed(
            Some(&admin(token)),
            &locator,
            peer.parse().expect("ip"),
            &headers,
        );
        assert_eq!(got, expected, "token {token:?}, from {peer} with {hdrs:?}");
    }

    #[test]
    fn by_the_clients_address() {
        check(None, "127.0.0.1", &[], true);
        check(None, "192.0.2.9", &[], true);
        check(None, "203.0.113.9", &[], false);
        // A trusted proxy's client is matched, not the proxy.
        check(
            None,
            "127.0.0.1",
            &[("x-forwarded-for", "203.0.113.9")],
            false,
        );
        check(None, "127.0.0.1", &[("x-forwarded-for", "192.0.2.9")], true);
        check(
            None,
            "127.0.0.1",
            &[("x-forwarded-for", "192.0.2.9, 203.0.113.9")],
            false,
        );
        // Not the configured field: the proxy named nobody, so the peer is the client.
        check(None, "127.0.0.1", &[("forwarded", "for=203.0.113.9")], true);
    }

    #[test]
    fn forwarded_by_an_untrusted_proxy_is_refused() {
        check(
            None,
            "192.0.2.1",
            &[("x-forwarded-for", "192.0.2.9")],
            false,
        );
        check(None, "192.0.2.1", &[("forwarded", "for=192.0.2.9")], false);
    }

    #[test]
    fn by_the_admin_token_from_anywhere() {
        let t = Some("s3cret");
        check(
            t,
            "203.0.113.9",
            &[("authorization", "Bearer s3cret")],
            true,
        );
        check(
            t,
            "203.0.113.9",
            &[("authorization", "bearer s3cret")],
            true,
        );
        check(
            t,
            "127.0.0.1",
            &[
                ("x-forwarded-for", "203.0.113.9"),
                ("authorization", "Bearer s3cret"),
            ],
            true,
        );
        check(
            t,
            "203.0.113.9",
            &[("authorization", "Bearer s3cre")],
            false,
        );
        check(
            t,
            "203.0.113.9",
            &[("authorization", "Bearer s3cretX")],
            false,
        );
        check(
            t,
            "203.0.113.9",
            &[("authorization", "Basic s3cret")],
            false,
        );
        check(t, "203.0.113.9", &[("authorization", "Bearer")], false);
        check(t, "203.0.113.9", &[("authorization", "Bearer ")], false);
        check(t, "203.0.113.9", &[], false);
        // Without a configured token no bearer is accepted, and the address still counts.
        check(None, "203.0.113.9", &[("authorization", "Bearer ")], false);
        check(t, "127.0.0.1", &[], true);
    }

    #[test]
    fn never_without_an_admin_section() {
        let locator = Locator::default();
        let peer = "127.0.0.1".parse().expect("ip");
        assert!(!allowed(None, &locator, peer, &HeaderMap::new()));
    }
}

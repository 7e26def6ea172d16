//! The fleet on the request path: which member owns a miss's key, the request sent to that
//! member's peer listener (the origin request, addressed to the peer), and purges that
//! other members forward here (`POST /.edgecache/purge` on the peer listener).
//!
//! Ownership is looked up on a miss only: a hit never computes it.

use super::*;
use crate::cluster::peer::Owner;
use crate::cluster::{ring, Purge};

pub(super) use crate::cluster::peer::PURGE_PATH;

impl Proxy {
    /// The other member that owns `lookup`'s key, when the request should be filled from it:
    /// not one that came from a peer (the owner answers those itself), nor one that has
    /// passed through this fleet already (`CDN-Loop`).
    pub(super) fn owner_of(&self, lookup: &Lookup) -> Option<Owner> {
        let fleet = self.fleet.as_ref()?;
        if lookup.conn.from_peer || self.been_through_fleet(&lookup.parts.headers) {
            return None;
        }
        let key = &lookup.key;
        fleet.owner(ring::key_hash(key.https, &key.host, &key.path_and_query))
    }

    /// Sends the origin request `up` to `owner` instead (with the client's `Range` when
    /// `with_range`: the owner cuts it). `None` when the peer did not answer: it is ejected
    /// for a while, and the caller asks the origin.
    pub(super) async fn send_to_peer(
        &self,
        owner: &Owner,
        up: &Upstream,
        lookup: &Lookup,
        with_range: bool,
    ) -> Option<(Response<Incoming>, f64)> {
        let fleet = self.fleet.as_ref()?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(owner.address.to_string())
            .path_and_query(up.pq.clone())
            .build()
            .ok()?;
        let mut headers = up.headers.clone();
        headers.insert(header::HOST, up.host.clone());
        if with_range {
            for f in [header::RANGE, header::IF_RANGE] {
                if let Some(v) = lookup.parts.headers.get(&f) {
                    headers.insert(f, v.clone());
                }
            }
        }
        let mut req = Request::new(UpstreamBody::empty());
        *req.method_mut() = up.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let sent = Instant::now();
        let result = fleet.send(owner, req).await;
        let ms = sent.elapsed().as_secs_f64() * 1000.0;
        result.ok().map(|r| (r, ms))
    }

    /// The peer listener's purge endpoint: a purge another member accepted, applied here
    /// (not published again). Only from a member's address.
    pub(super) async fn receive_purge(&self, req: Request<Incoming>, conn: ConnInfo) -> Answer {
        let Some(fleet) = &self.fleet else {
            return refuse(ProxyError::PurgeForbidden);
        };
        if req.method() != Method::POST || !fleet.is_member_ip(conn.peer.ip()) {
            return refuse(ProxyError::PurgeForbidden);
        }
        let body = match http_body_util::Limited::new(req.into_body(), 64 << 10)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return refuse(ProxyError::PurgeForbidden),
        };
        let purge: Purge = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(peer = %conn.peer, error = %e, "invalid purge from a peer");
                return refuse(ProxyError::PurgeForbidden);
            }
        };
        let n = self.purge_from_fleet(&purge);
        tracing::info!(purge = ?purge.target, soft = purge.soft, purged = n, from = %purge.node, "purge from a peer");
        let mut resp = Response::new(Body::full(Bytes::from(format!("{{\"purged\":{n}}}\n"))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        (resp, Outcome_::local(CacheResult::Purge))
    }
}

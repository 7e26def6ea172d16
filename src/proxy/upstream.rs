//! The `upstream` stage (origin_select and the send): the origins a miss may go to, best
//! first, by the site's route for where the client is and by measured latency and health;
//! the send with failover and the retry budget; what counts against an origin.

use super::*;

/// A request on its way to an origin, built by [`Proxy::upstream`] for misses and passes
/// alike; [`Proxy::send_failover`] gives it each origin's URI and `Host`.
pub(super) struct Upstream {
    pub(super) method: Method,
    /// The path and query sent (for a miss: as keyed).
    pub(super) pq: PathAndQuery,
    pub(super) headers: HeaderMap,
    /// The `Host` as keyed, sent unless the origin names its own (`host_header`).
    pub(super) host: HeaderValue,
    /// A body read whole beforehand (so that it could be sent again); `None` for none.
    pub(super) body: Option<UpstreamBody>,
}

impl Proxy {
    /// A GET of bytes `from..=to` of the object at `pq` (as keyed) for a client with fields
    /// `client`: its fields without conditionals, range and framing, and the `Range`.
    /// `None` for a target that is not one.
    pub(super) fn range_request(
        &self,
        client: &HeaderMap,
        (from, to): (u64, u64),
        pq: &str,
        conn: ConnInfo,
        host: &HeaderValue,
        version: Version,
    ) -> Option<Upstream> {
        let mut headers = client.clone();
        for f in &CONDITIONAL_FIELDS {
            headers.remove(f);
        }
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes={from}-{to}")).ok()?,
        );
        let pq = PathAndQuery::try_from(pq).ok()?;
        Some(self.upstream(Method::GET, pq, headers, conn, host, version))
    }

    /// The one request builder: a client's fields made ready for an origin. Forwarding
    /// fields (kept from a trusted proxy, and only the one it writes), hop-by-hop fields
    /// removed, `Via`, this node's `CDN-Loop` member, and `X-Request-Id`: the trusted
    /// proxy's, else the id the access log has (or a new one).
    pub(super) fn upstream(
        &self,
        method: Method,
        pq: PathAndQuery,
        mut headers: HeaderMap,
        conn: ConnInfo,
        host: &HeaderValue,
        version: Version,
    ) -> Upstream {
        let trusted = self.trusted(conn, &mut headers);
        forward_request_headers(
            &mut headers,
            conn.peer.ip(),
            conn.https,
            host,
            trusted,
            self.via(version),
        );
        self.mark_hop(&mut headers);
        if self.given_request_id(conn, &headers).is_none() {
            let id = conn.request_id.unwrap_or_else(telemetry::RequestId::next);
            headers.insert(X_REQUEST_ID.clone(), id.header_value());
        }
        Upstream {
            method,
            pq,
            headers,
            host: host.clone(),
            body: None,
        }
    }

    /// An origin's response head as it goes on to the client: hop-by-hop fields removed, our
    /// `Via` added, HTTP/1.1 semantics.
    pub(super) fn relay_head(&self, head: &mut http::response::Parts) {
        remove_hop_by_hop(&mut head.headers);
        head.headers
            .append(header::VIA, self.via(head.version).clone());
        head.version = Version::HTTP_11;
    }

    /// Origins for a request, best first: the site's route for where the client is (read
    /// from the client's own fields, before forwarding fields are added), its pools in order,
    /// each origin by latency and health (see `origin::select`); and the route's name.
    pub(super) fn candidates(&self, site: usize, conn: ConnInfo, client: &HeaderMap) -> Candidates {
        let site = &self.config.sites[site];
        let loc = self.locator.locate(conn.peer.ip(), client);
        let Some(route) = origin::route::find(&site.routes, &loc) else {
            return Candidates {
                origins: vec![site.origin],
                route: None,
            };
        };
        let views: Vec<PoolView<'_>> = route
            .pools
            .iter()
            .filter_map(|&p| self.config.pools.get(p))
            .map(|p| PoolView {
                origins: &p.origins,
                spill_latency: p.spill_latency,
            })
            .collect();
        let mut origins = self.selector.candidates(&views, Instant::now());
        if origins.is_empty() {
            origins.push(site.origin);
        }
        Candidates {
            origins,
            route: Some(route.name.clone()),
        }
    }

    /// The upstream stage: `up` sent to the candidates with failover, in the stage's span.
    /// `None` for a target no origin URI can be made of.
    pub(super) async fn send(&self, candidates: Candidates, up: Upstream) -> Option<Sent> {
        let (origin, ms, result) = in_stage!(
            telemetry::spans::UPSTREAM,
            self.send_failover(&candidates.origins, up)
        )?;
        Some(Sent {
            origin,
            ms,
            result,
            route: candidates.route,
        })
    }

    /// Sends a request to the first candidate. A bodiless idempotent request is sent again to
    /// the next candidate when nothing came back: after a failed connection (down the list, up
    /// to [`MAX_ATTEMPTS`] in all) or once after a connection that broke before the response
    /// head; each retry is taken from the retry budget. A request with a body is sent once.
    /// Returns the origin used, the time to its response head in milliseconds, and the
    /// result; `None` for an invalid target.
    async fn send_failover(
        &self,
        candidates: &[usize],
        up: Upstream,
    ) -> Option<(usize, f64, Result<Response<Incoming>, origin::Error>)> {
        let Upstream {
            method,
            pq,
            mut headers,
            host,
            mut body,
        } = up;
        let retryable = body.is_none() && method.is_idempotent();
        let attempts = if retryable {
            candidates.len().min(MAX_ATTEMPTS)
        } else {
            candidates.len().min(1)
        };
        self.retry_budget.request(Instant::now());
        let mut last = None;
        let mut broken_retried = false;
        for (attempt, &index) in candidates.iter().take(attempts).enumerate() {
            if attempt > 0 {
                if !self.retry_budget.try_retry(Instant::now()) {
                    self.metrics.retry(false);
                    tracing::debug!("retry budget spent: not retrying");
                    break;
                }
                self.metrics.retry(true);
            }
            let origin = self.origins.get(index)?;
            let uri = origin_uri(origin, pq.clone())?;
            let mut up = Request::new(body.take().unwrap_or_else(UpstreamBody::empty));
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            // The last attempt takes the fields; earlier ones send a copy.
            let mut h = if attempt + 1 < attempts {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            h.insert(
                header::HOST,
                origin
                    .config
                    .host_header
                    .clone()
                    .unwrap_or_else(|| host.clone()),
            );
            *up.headers_mut() = h;
            // Counted while the request waits, and given back however the wait ends (a client
            // that leaves drops this future mid-await).
            let in_flight = self.selector.state().enter(index);
            let sent_at = Instant::now();
            let result = origin.send(up).await;
            let elapsed = sent_at.elapsed();
            drop(in_flight);
            self.selector.state().took(index, elapsed);
            let ms = elapsed.as_secs_f64() * 1000.0;
            match &result {
                Ok(r) if origin.config.fail_on.contains(&r.status().as_u16()) => {
                    self.note_failure(index, Failure::Status(r.status()));
                }
                Ok(_) => {
                    if self
                        .selector
                        .state()
                        .success(index, elapsed, Instant::now())
                    {
                        tracing::info!(origin = %origin.config.name, "origin back in rotation after its ejection");
                    }
                }
                Err(e) => {
                    if !e.is_saturated() {
                        self.note_failure(
                            index,
                            if e.is_timeout() {
                                Failure::Timeout
                            } else if e.is_connect() {
                                Failure::Connect
                            } else {
                                Failure::Broken
                            },
                        );
                    }
                    // A broken connection is tried elsewhere once: twice in a row suggests
                    // the request itself breaks origins.
                    let broken = e.is_broken();
                    let again = retryable
                        && attempt + 1 < attempts
                        && ProxyError::from(e).retryable()
                        && !(broken && broken_retried);
                    if again {
                        broken_retried |= broken;
                        tracing::warn!(origin = %origin.config.name, error = %ErrorChain(e), "no answer from origin, trying the next one");
                        last = Some((index, ms, result));
                        continue;
                    }
                }
            }
            return Some((index, ms, result));
        }
        last
    }

    pub(super) fn note_failure(&self, index: usize, why: Failure) {
        if let Some(back_off) = self.selector.state().failure(index, Instant::now()) {
            if let Some(o) = self.origins.get(index) {
                tracing::warn!(
                    origin = %o.config.name,
                    failures = origin::state::EJECT_AFTER,
                    last = %why,
                    ejected_for_s = back_off.as_secs(),
                    "origin ejected after failures in a row"
                );
            }
        }
    }

    /// Whether the peer is a trusted proxy whose forwarding fields are kept. The field it
    /// does not write (`server.client_address_header`) is the client's own and is dropped
    /// here, so it never reaches the origin as if the proxy had vouched for it.
    pub(super) fn trusted(&self, conn: ConnInfo, headers: &mut HeaderMap) -> bool {
        // A member's request carries its client's forwarding fields, made by that member.
        let trusted = conn.member || self.trusts(conn.peer.ip());
        if trusted {
            match self.config.server.client_address_header {
                crate::geo::AddressHeader::XForwardedFor => {
                    headers.remove(header::FORWARDED);
                }
                crate::geo::AddressHeader::Forwarded => {
                    headers.remove(&X_FORWARDED_FOR_NAME);
                }
            }
        }
        trusted
    }
}

/// Where a request may go: origins best first, and the geo route that chose them.
pub(super) struct Candidates {
    origins: Vec<usize>,
    pub(super) route: Option<Arc<str>>,
}

impl Candidates {
    /// The best origin (whose timeouts apply to a peer's body, see `peer`).
    pub(super) fn first(&self) -> usize {
        self.origins.first().copied().unwrap_or(0)
    }
}

/// What the upstream stage came back with.
pub(super) struct Sent {
    /// The origin that answered (or failed last), and its time to the response head in
    /// milliseconds.
    pub(super) origin: usize,
    pub(super) ms: f64,
    pub(super) result: Result<Response<Incoming>, origin::Error>,
    /// The geo route that chose the origin, for the access log.
    pub(super) route: Option<Arc<str>>,
}

/// What counted against an origin, for the ejection log line.
#[derive(Debug, Clone, Copy)]
pub(super) enum Failure {
    Connect,
    Timeout,
    Broken,
    Status(StatusCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect => f.write_str("connection failed"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Broken => f.write_str("connection broke"),
            Failure::Status(s) => write!(f, "status {}", s.as_u16()),
        }
    }
}

pub(super) fn origin_uri(origin: &OriginClient, pq: PathAndQuery) -> Option<Uri> {
    Uri::builder()
        .scheme(origin.config.scheme.clone())
        .authority(origin.config.authority.clone())
        .path_and_query(pq)
        .build()
        .ok()
}

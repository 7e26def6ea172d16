//! The `pass` stage: requests the cache does not handle (other methods, bypass rules) are
//! streamed to the origin and back; a successful unsafe method invalidates what it names.

use super::*;

impl Proxy {
    /// Forwards a request that the cache does not handle (other methods, bypass rules).
    pub(super) async fn pass(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        site_idx: usize,
        host: &str,
        host_value: HeaderValue,
        status: HeaderValue,
    ) -> Answer {
        let candidates = self.candidates(site_idx, conn, req.headers());
        let method = req.method().clone();
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let (mut parts, body) = req.into_parts();
        // What the client accepts, kept for compressing the answer (no allocation without).
        let mut accept = HeaderMap::new();
        for v in parts.headers.get_all(header::ACCEPT_ENCODING) {
            accept.append(header::ACCEPT_ENCODING, v.clone());
        }
        // A POST's fields, kept for storing its answer for GETs (see `store_post`).
        let post = (method == Method::POST).then(|| parts.headers.clone());
        let headers = std::mem::take(&mut parts.headers);
        let mut up = self.upstream(
            method.clone(),
            pq.clone(),
            headers,
            conn,
            &host_value,
            parts.version,
        );
        // A body is read whole first (see `preread`); only a request without one may be
        // retried on another origin.
        up.body = if body.is_end_stream() {
            None
        } else {
            match preread(body, self.config.server.header_read_timeout).await {
                Ok(b) => Some(b),
                Err(PrereadError::Malformed) => return refuse(ProxyError::MalformedBody),
                Err(PrereadError::TimedOut) => return refuse(ProxyError::SlowBody),
            }
        };
        let Some(Sent {
            origin: origin_index,
            ms: origin_ms,
            result,
            route,
        }) = self.send(candidates, up).await
        else {
            return refuse(ProxyError::InvalidTarget);
        };
        let origin = &self.origins[origin_index];
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(origin = %origin.config.name, error = %ErrorChain(&e), "origin request failed");
                return (
                    respond::error(ProxyError::from(&e)),
                    Outcome_::origin(CacheResult::Error, origin_index, origin_ms, route),
                );
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        self.relay_head(&mut rparts);
        if !method.is_safe() && (rparts.status.is_success() || rparts.status.is_redirection()) {
            self.invalidate_after_write(site_idx, host, pq.as_str(), &rparts.headers);
        }
        let (mut rparts, rbody) = match post {
            Some(client) => {
                let target = Target {
                    site: site_idx,
                    host,
                    pq: pq.as_str(),
                    conn,
                };
                let outcome = |c| Outcome_::origin(c, origin_index, origin_ms, route.clone());
                match self
                    .store_post(&target, &client, rparts, rbody, origin_index)
                    .await
                {
                    Ok(Some(resp)) => return (resp, outcome(CacheResult::Pass)),
                    // The origin cut it: nothing stored, and the client told so.
                    Ok(None) => {
                        return (
                            respond::error(ProxyError::OriginCutOff),
                            outcome(CacheResult::Error),
                        )
                    }
                    Err(back) => *back,
                }
            }
            None => (rparts, rbody),
        };
        rparts.headers = strip_cache_only(
            std::mem::take(&mut rparts.headers),
            &self.config.cache.cache_control_field,
            &[],
        );
        let status = after_upstream(&rparts.headers, status);
        rparts.headers.insert(CACHE_STATUS.clone(), status);
        let cache = if method.is_safe() {
            CacheResult::Bypass
        } else {
            CacheResult::Pass
        };
        let body = self.streamed(
            site_idx,
            &accept,
            &mut rparts,
            rbody,
            method == Method::HEAD,
        );
        (
            Response::from_parts(rparts, body),
            Outcome_::origin(cache, origin_index, origin_ms, route),
        )
    }

    /// RFC 9110 §9.3.3 and RFC 9111 §4: a response to a POST with explicit freshness and a
    /// `Content-Location` naming the POST's own target may answer later GETs of that URI.
    /// Such a response, when the policy would store it for a GET (no `private`, no cookie,
    /// no `Authorization` unless allowed) and it is small (64 KiB by `Content-Length`), is
    /// read whole, stored as the GET's, and its head and body returned for the POST's client
    /// (`None`: the origin cut it, nothing stored); anything else is given back to be
    /// streamed as usual.
    async fn store_post(
        &self,
        target: &Target<'_>,
        client: &HeaderMap,
        rparts: http::response::Parts,
        mut rbody: Incoming,
        origin: usize,
    ) -> Result<Option<Response<Body>>, Box<(http::response::Parts, Incoming)>> {
        let site = &self.config.sites[target.site];
        let now = SystemTime::now();
        let key_pq = key_target(site, target.pq);
        let names_itself = rparts
            .headers
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Uri>().ok())
            .is_some_and(|u| {
                u.host().is_none_or(|h| h.eq_ignore_ascii_case(target.host))
                    && u.path_and_query()
                        .is_some_and(|p| key_target(site, p.as_str()) == key_pq)
            });
        let length = rparts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n <= SMALL_OBJECT);
        let rule = site.rule(target.pq.split('?').next().unwrap_or(""));
        let bypass = rule
            .and_then(|i| site.rules.get(i))
            .is_some_and(|r| r.bypass);
        let explicit = policy::freshness_lifetime(
            &rparts.headers,
            &CacheControl::from_headers(&rparts.headers),
            now,
        )
        .is_some_and(|l| !l.is_zero());
        let decision = self.judged_as_get(client, &rparts.headers, site.settings(rule), now);
        let (decision, length) = match (decision, length) {
            (Ok(d), Some(n))
                if rparts.status == StatusCode::OK && names_itself && explicit && !bypass =>
            {
                (d, n)
            }
            _ => return Err(Box::new((rparts, rbody))),
        };
        let timeout = self.origins[origin].config.timeout;
        let Some(body) = read_exactly(&mut rbody, length, timeout).await else {
            return Ok(None);
        };
        let (stored, tags) = self.shared_copy(rparts.headers.clone(), &decision.strip);
        let parts = KeyParts {
            https: target.conn.https,
            host: target.host,
            path_and_query: &key_pq,
        };
        let extra = key_extra(client, &site.cache.key_headers, &site.cache.key_cookies);
        let vary = VaryKey::from_response(&stored, client).with_extra(extra);
        let initial_age = policy::corrected_initial_age(&stored, now, now);
        let entry = Entry::new(
            OwnedKey::new(&parts),
            vary,
            StatusCode::OK,
            stored,
            body.clone(),
            now,
            initial_age,
            decision,
            tags,
        );
        self.store.insert(self.store.hash(&parts), entry);
        let own = &self.config.cache.cache_control_field;
        let mut resp = Response::new(Body::full(body));
        *resp.headers_mut() = strip_cache_only(rparts.headers, own, &[]);
        let status = self.cache_status("fwd=method; stored");
        resp.headers_mut().insert(CACHE_STATUS.clone(), status);
        Ok(Some(resp))
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates its target URI and the
    /// same-host URIs named by `Location` and `Content-Location`, as the site keys them.
    fn invalidate_after_write(&self, site_idx: usize, host: &str, pq: &str, response: &HeaderMap) {
        let site = &self.config.sites[site_idx];
        self.store.purge(
            &PurgeTarget::Url {
                host,
                path_and_query: &key_target(site, pq),
            },
            false,
        );
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(target) = response
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<Uri>().ok())
            {
                let same_host = target.host().is_none_or(|h| h.eq_ignore_ascii_case(host));
                if let (true, Some(p)) = (same_host, target.path_and_query()) {
                    if p.as_str().starts_with('/') {
                        self.store.purge(
                            &PurgeTarget::Url {
                                host,
                                path_and_query: &key_target(site, p.as_str()),
                            },
                            false,
                        );
                    }
                }
            }
        }
    }
}

/// A request's target, as a site keys it.
struct Target<'a> {
    site: usize,
    host: &'a str,
    pq: &'a str,
    conn: ConnInfo,
}

/// Bytes of a request body read before the origin is contacted (as nginx's
/// `client_body_buffer_size`): a body that is malformed or stalls within them never reaches
/// an origin. Larger bodies stream after this prefix.
pub(super) const PREREAD_BYTES: usize = 64 << 10;

pub(super) enum PrereadError {
    Malformed,
    TimedOut,
}

/// Reads up to [`PREREAD_BYTES`] of a request body, each frame within `timeout`.
pub(super) async fn preread(
    mut body: Incoming,
    timeout: Duration,
) -> Result<UpstreamBody, PrereadError> {
    let mut buf = bytes::BytesMut::new();
    while buf.len() < PREREAD_BYTES {
        if body.is_end_stream() {
            return Ok(UpstreamBody::new(buf.freeze(), None, None));
        }
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(PrereadError::TimedOut),
            Ok(None) => return Ok(UpstreamBody::new(buf.freeze(), None, None)),
            Ok(Some(Err(_))) => return Err(PrereadError::Malformed),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => buf.extend_from_slice(&d),
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Ok(UpstreamBody::new(buf.freeze(), trailers, None));
                }
            },
        }
    }
    Ok(UpstreamBody::new(buf.freeze(), None, Some(body)))
}

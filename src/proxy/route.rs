//! The `route` stage: framing checks, the host and its site, the methods the site serves, and
//! the path normalised once, so that every later stage sees the request the origin will.
//!
//! Runs on a borrowed request and answers (a refusal) or hands on what it learned
//! ([`Routed`]); a request that must first be changed (fields named in `Connection`, a path
//! that was not normal) is sent round again changed ([`Detour`]).

use super::*;

/// What `route` learned about a request it hands on.
pub(super) struct Routed<'r> {
    pub(super) site: usize,
    /// Lowercase, without port or trailing dot: the key's host and what the origin is sent.
    pub(super) host: Cow<'r, str>,
    pub(super) pq: &'r PathAndQuery,
    pub(super) has_cc: bool,
    pub(super) has_pragma: bool,
    /// GET or HEAD.
    pub(super) cache_method: bool,
}

/// Why `route` did not hand a request on.
pub(super) enum Detour {
    /// Answered here (a refusal; boxed, so the `Result` a routed request travels in stays
    /// small).
    Answer(Box<Answer>),
    /// Serve it again without the fields `Connection` names (hop-by-hop: never forwarded, so
    /// the key, `Vary` and rules must not see them either).
    StripConnection,
    /// Serve it again with this target: its path normalised.
    Rewrite(Uri),
}

fn refused(e: ProxyError) -> Detour {
    Detour::Answer(Box::new(refuse(e)))
}

impl Proxy {
    /// Framing, loops, the target and the host, then the site's own checks
    /// ([`Proxy::site_checks`]).
    pub(super) fn route<'r>(
        &self,
        req: &'r Request<Incoming>,
        conn: ConnInfo,
        normal: bool,
    ) -> Result<Routed<'r>, Detour> {
        let h = req.headers();
        // One pass over the field names for the fields asked about below: a request has a
        // handful of fields, and comparing a standard name is comparing a byte, where each
        // `contains_key` hashes the name and probes the map.
        let (mut chunked, mut length, mut has_cc, mut has_pragma) = (false, false, false, false);
        let (mut host_field, mut host_fields) = (None, 0u32);
        let (mut connection, mut cdn_loop) = (false, false);
        for (name, value) in h {
            if name == header::CONNECTION {
                connection = true;
            } else if name == CDN_LOOP {
                cdn_loop = true;
            } else if name == header::HOST {
                host_field = Some(value);
                host_fields += 1;
            } else if name == header::TRANSFER_ENCODING {
                chunked = true;
            } else if name == header::CONTENT_LENGTH {
                length = true;
            } else if name == header::CACHE_CONTROL {
                has_cc = true;
            } else if name == header::PRAGMA {
                has_pragma = true;
            }
        }
        // RFC 9112 §6.3: both framings at once is how request smuggling starts; refuse and
        // close. hyper's HTTP/1 parser already drops the length and closes after the response,
        // so this guards any path (or future parser) that hands us both.
        if chunked && length {
            return Err(refused(ProxyError::AmbiguousFraming));
        }
        // `Accept-Language: de` with `Connection: accept-language` reaches the origin without
        // the field; its default answer must not be stored as the `de` variant.
        if connection {
            return Err(Detour::StripConnection);
        }
        // RFC 8586: our own `CDN-Loop` member means a site's origin leads back to this node
        // (directly or through others); forwarding again would loop until a limit broke it.
        if cdn_loop && self.is_loop(h) {
            return Err(refused(ProxyError::Loop));
        }
        if req.method() == Method::CONNECT {
            return Err(refused(ProxyError::Connect));
        }
        let Some(pq) = req
            .uri()
            .path_and_query()
            .filter(|p| p.as_str().starts_with('/'))
        else {
            return Err(refused(ProxyError::TargetNotPath));
        };
        // The target's authority (absolute-form, HTTP/2 :authority) takes precedence over Host.
        let authority = match req.uri().authority() {
            Some(a) => a.as_str(),
            None => match (host_field.and_then(|v| v.to_str().ok()), host_fields) {
                (Some(v), 1) => v,
                _ => return Err(refused(ProxyError::HostCount)),
            },
        };
        let Some(host) = host_without_port(authority).filter(|_| !authority.contains('@')) else {
            return Err(refused(ProxyError::InvalidHost));
        };
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let Some(site) = self.sites.find(&host) else {
            // Never an open proxy: an unknown host reaches no origin.
            return Err(refused(ProxyError::UnknownHost));
        };
        let cache_method = req.method() == Method::GET || req.method() == Method::HEAD;
        self.site_checks(req, conn, site, cache_method, normal)?;
        Ok(Routed {
            site,
            host,
            pq,
            has_cc,
            has_pragma,
            cache_method,
        })
    }

    /// What the site allows: its methods, no body on GET or HEAD, a path that is normal (or
    /// normalised and sent round again), and the request rates.
    fn site_checks(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        site_idx: usize,
        cache_method: bool,
        normal: bool,
    ) -> Result<(), Detour> {
        let site = &self.config.sites[site_idx];
        // Methods the site does not serve are answered here, never forwarded (TRACE never
        // is: it would echo the request, cookies and all, as nginx also refuses).
        if !site.methods.allows(req.method()) {
            let (mut resp, outcome) = refuse(ProxyError::MethodNotAllowed);
            resp.headers_mut()
                .insert(header::ALLOW, site.methods.allow().clone());
            return Err(Detour::Answer(Box::new((resp, outcome))));
        }
        // RFC 9110 §9.3.1: a GET or HEAD body has no meaning, and forwarding its framing
        // without the bytes (or the bytes to an origin that does not expect them) leaves a
        // pooled origin connection reading one request as another.
        if cache_method && !req.body().is_end_stream() {
            return Err(refused(ProxyError::BodyWithoutUse));
        }
        // The path as the key, the rules and the origin all see it: dot segments resolved,
        // unreserved characters decoded (RFC 3986 §6.2.2). Normalised once; the request
        // then carries the normal path and is served as if sent so.
        if !normal {
            match path::normalise(req.uri().path(), site.refuse_escaped_slashes) {
                Ok(Cow::Borrowed(_)) => {}
                Ok(Cow::Owned(p)) => {
                    let target = match req.uri().query() {
                        Some(q) => format!("{p}?{q}"),
                        None => p,
                    };
                    let mut uri = req.uri().clone().into_parts();
                    uri.path_and_query = PathAndQuery::try_from(target).ok();
                    return match Uri::from_parts(uri) {
                        Ok(uri) => Err(Detour::Rewrite(uri)),
                        Err(_) => Err(refused(ProxyError::InvalidTarget)),
                    };
                }
                Err(e) => {
                    tracing::debug!(error = %e, "path refused");
                    return Err(refused(e.into()));
                }
            }
        }
        // Request rates (per client, per site): here, once the path is final, so a request
        // served again after normalising is counted once. A member's request was counted by
        // the member its client asked (counting it again would limit a whole node as one
        // client).
        if conn.member {
            return Ok(());
        }
        if let Some(answer) =
            self.limits
                .check(site_idx, conn.peer.ip(), req.headers(), &self.locator)
        {
            return Err(Detour::Answer(Box::new(answer)));
        }
        Ok(())
    }
}

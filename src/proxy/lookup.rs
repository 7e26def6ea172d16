//! The `lookup` stage: the request's key (the site's normalisation of host, path and query,
//! plus `Vary` and the site's key material), the stored response if one fits, and what
//! `cache::policy` says may be done with it: answer, answer stale and refresh in the
//! background, or go to the origin ([`Miss`]).

use super::*;

/// What a lookup found: an answer (a hit, or a refusal), or a miss to fetch.
// The answer travels by value, as `Served` does: boxing it would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub(super) enum Looked {
    Answer(Answer),
    Miss(Miss),
    /// A stored extent and one range request for the bytes it lacks answer it.
    Partial(super::partial::PartialMiss),
}

/// What the lookup stage learnt about a cacheable request, kept for its fetch.
#[derive(Clone)]
pub(super) struct Keyed {
    pub(super) site: usize,
    pub(super) hash: u64,
    pub(super) key: OwnedKey,
    pub(super) extra: Option<Box<str>>,
    /// The site's rule for the path, if any (see `Lookup::settings`).
    pub(super) rule: Option<usize>,
    /// The client asked for a fresh answer and the site lets it revalidate.
    pub(super) forced: bool,
    pub(super) head: bool,
    /// The `Host` as keyed, for forwarding.
    pub(super) host_value: HeaderValue,
    pub(super) conn: ConnInfo,
    /// RFC 9211 forward reason when nothing usable was stored: `fwd=uri-miss` (nothing for
    /// the URL) or `fwd=vary-miss` (other variants only).
    pub(super) miss: &'static str,
}

/// A cacheable request that the store cannot answer: everything the fetch needs but the
/// request head, which the caller moves in ([`Miss::into_lookup`]).
pub(super) struct Miss {
    keyed: Keyed,
    /// The stored response to revalidate, if any.
    stale: Option<Arc<Entry>>,
}

impl Miss {
    /// The fetch's view of the request, with its head.
    pub(super) fn into_lookup(self, parts: RequestParts) -> (Lookup, Option<Arc<Entry>>) {
        let lookup = Lookup {
            keyed: self.keyed,
            parts: Arc::new(parts),
            ignore_range: false,
        };
        (lookup, self.stale)
    }
}

impl Proxy {
    /// Looks a GET or HEAD up in the store: an answer now, or the [`Miss`] to fetch.
    pub(super) fn lookup(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        conn: ConnInfo,
        routed: &Routed<'_>,
        rule: Option<usize>,
    ) -> Looked {
        let h = req.headers();
        let site_idx = routed.site;
        let site = &self.config.sites[site_idx];
        let req_cc = if routed.has_cc {
            CacheControl::from_headers(h)
        } else {
            CacheControl::default()
        };
        let asked_fresh = req_cc.no_cache
            || req_cc.max_age == Some(0)
            || (!routed.has_cc
                && routed.has_pragma
                && h.get(header::PRAGMA)
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache")));
        let forced = asked_fresh && site.cache.client_no_cache == ClientNoCache::Revalidate;
        let key_pq = key_target(site, routed.pq.as_str());
        let parts = KeyParts {
            https: conn.https,
            host: &routed.host,
            path_and_query: &key_pq,
        };
        let extra = key_extra(h, &site.cache.key_headers, &site.cache.key_cookies);
        let hash = self.store.hash(&parts);
        let now = SystemTime::now();
        let stored = self.store.get(hash, &parts, extra.as_deref(), h);
        let head = req.method() == Method::HEAD;
        if let Some(entry) = &stored {
            match policy::reuse(&entry.facts(now), &req_cc, forced) {
                Reuse::Fresh => {
                    return Looked::Answer((
                        self.answer_from_entry(entry, h, head, now, self.hit.clone()),
                        Outcome_::local(CacheResult::Hit),
                    ))
                }
                Reuse::StaleAccepted => {
                    let status = self
                        .cache_status(&format!("hit; ttl={}; detail=max-stale", ttl(entry, now)));
                    return Looked::Answer((
                        self.answer_from_entry(entry, h, head, now, status),
                        Outcome_::local(CacheResult::Stale),
                    ));
                }
                Reuse::StaleWhileRevalidate => {
                    let status = self.cache_status(&format!(
                        "hit; fwd=stale; ttl={}; detail=stale-while-revalidate",
                        ttl(entry, now)
                    ));
                    let resp = self.answer_from_entry(entry, h, head, now, status);
                    let keyed = Keyed {
                        site: site_idx,
                        hash,
                        key: OwnedKey::new(&parts),
                        extra,
                        rule,
                        forced: false,
                        head: true,
                        host_value: host_value(&routed.host),
                        conn,
                        miss: "fwd=stale",
                    };
                    self.refresh_in_background(req, keyed, entry.clone());
                    return Looked::Answer((resp, Outcome_::local(CacheResult::Stale)));
                }
                Reuse::Revalidate => {}
            }
        }
        if stored.is_none() {
            let keyed = Keyed {
                site: site_idx,
                hash,
                key: OwnedKey::new(&parts),
                extra: extra.clone(),
                rule,
                forced,
                head,
                host_value: host_value(&routed.host),
                conn,
                miss: "fwd=uri-miss",
            };
            if let Some(looked) = self.look_in_extent(&keyed, &parts, h, &req_cc, now) {
                return looked;
            }
        }
        if req_cc.only_if_cached && stored.is_none() {
            return Looked::Answer(refuse(ProxyError::OnlyIfCached));
        }
        let miss = if stored.is_none() && self.store.contains(hash) {
            "fwd=vary-miss"
        } else {
            "fwd=uri-miss"
        };
        Looked::Miss(Miss {
            keyed: Keyed {
                site: site_idx,
                hash,
                key: OwnedKey::new(&parts),
                extra,
                rule,
                forced,
                head,
                host_value: host_value(&routed.host),
                conn,
                miss,
            },
            stale: stored,
        })
    }

    /// Starts one background revalidation for a stale entry (stale-while-revalidate): a GET
    /// with the client's fields, led like any miss but answered to no one.
    fn refresh_in_background(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        keyed: Keyed,
        stale: Arc<Entry>,
    ) {
        let (fill, leader) = self.fills.join(keyed.hash);
        if !leader {
            return;
        }
        let mut head = Request::new(());
        *head.method_mut() = Method::GET;
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let lookup = Lookup {
            keyed,
            parts: Arc::new(head.into_parts().0),
            ignore_range: true,
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            let _ = proxy.lead(&lookup, fill, true, Some(stale)).await;
        });
    }
}

/// The path and query as `site` keys them (parameters sorted or dropped as configured). The
/// one normalisation for keys, what the origin is asked for, and purges: whatever the key
/// ignores, the origin never sees. Borrows when nothing changes.
pub(super) fn key_target<'a>(site: &crate::config::Site, pq: &'a str) -> Cow<'a, str> {
    match site.cache.query {
        QueryMode::Keep if site.cache.query_ignore.is_empty() => Cow::Borrowed(pq),
        mode => normalise_query(
            pq,
            mode == QueryMode::Sort,
            mode == QueryMode::Ignore,
            &site.cache.query_ignore,
        ),
    }
}

/// The `Host` sent upstream: the host as the key and the site table saw it (lowercase, no
/// port, no trailing dot), as nginx's `$host`. The origin must not answer a request the key
/// cannot tell apart from another (`Host: site.test:1337` stored for every `site.test`).
/// Built only where a request goes upstream, not per hit.
pub(super) fn host_value(host: &str) -> HeaderValue {
    HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("invalid"))
}

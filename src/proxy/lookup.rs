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
}

/// A cacheable request that the store cannot answer: everything the fetch needs but the
/// request head, which the caller moves in ([`Miss::into_lookup`]).
pub(super) struct Miss {
    site: usize,
    hash: u64,
    key: OwnedKey,
    extra: Option<Box<str>>,
    settings: Settings,
    forced: bool,
    head: bool,
    host_value: HeaderValue,
    conn: ConnInfo,
    miss: &'static str,
    /// The stored response to revalidate, if any.
    pub(super) stale: Option<Arc<Entry>>,
}

impl Miss {
    /// The fetch's view of the request, with its head.
    pub(super) fn into_lookup(self, parts: RequestParts) -> (Lookup, Option<Arc<Entry>>) {
        (
            Lookup {
                site: self.site,
                hash: self.hash,
                key: self.key,
                extra: self.extra,
                settings: self.settings,
                forced: self.forced,
                head: self.head,
                parts: Arc::new(parts),
                host_value: self.host_value,
                conn: self.conn,
                ignore_range: false,
                miss: self.miss,
            },
            self.stale,
        )
    }
}

impl Proxy {
    /// Looks a GET or HEAD up in the store: an answer now, or the [`Miss`] to fetch.
    pub(super) fn lookup(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        conn: ConnInfo,
        routed: &Routed<'_>,
        rule: Option<&crate::config::Rule>,
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
                    self.refresh_in_background(
                        req,
                        conn,
                        site_idx,
                        &parts,
                        extra.clone(),
                        hash,
                        host_value(&routed.host),
                        entry.clone(),
                    );
                    return Looked::Answer((resp, Outcome_::local(CacheResult::Stale)));
                }
                Reuse::Revalidate => {}
            }
        }
        if req_cc.only_if_cached && stored.is_none() {
            return Looked::Answer(refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "edgecache: not cached (only-if-cached)\n",
                false,
            ));
        }
        let settings = rule
            .map(|r| r.apply(&site.cache.settings))
            .unwrap_or_else(|| site.cache.settings.clone());
        let miss = if stored.is_none() && self.store.contains(hash) {
            "fwd=vary-miss"
        } else {
            "fwd=uri-miss"
        };
        Looked::Miss(Miss {
            site: site_idx,
            hash,
            key: OwnedKey::new(&parts),
            extra,
            settings,
            forced,
            head,
            host_value: host_value(&routed.host),
            conn,
            miss,
            stale: stored,
        })
    }

    /// Starts one background revalidation for a stale entry (stale-while-revalidate).
    #[allow(clippy::too_many_arguments)]
    fn refresh_in_background(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        conn: ConnInfo,
        site: usize,
        parts: &KeyParts<'_>,
        extra: Option<Box<str>>,
        hash: u64,
        host_value: HeaderValue,
        stale: Arc<Entry>,
    ) {
        let (fill, leader) = self.fills.join(hash);
        if !leader {
            return;
        }
        let mut head = Request::new(());
        *head.method_mut() = Method::GET;
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let settings = {
            let s = &self.config.sites[site];
            s.rule(req.uri().path())
                .map(|r| r.apply(&s.cache.settings))
                .unwrap_or_else(|| s.cache.settings.clone())
        };
        let lookup = Lookup {
            site,
            hash,
            key: OwnedKey::new(parts),
            extra,
            settings,
            forced: false,
            head: true,
            parts: Arc::new(head.into_parts().0),
            host_value,
            conn,
            ignore_range: true,
            miss: "fwd=stale",
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

//! The `admit` stage: the leader's origin fetch for a cacheable request and what becomes of
//! the response: a 304 that refreshes the stored entry, stale on error, the store decision,
//! small objects read whole, larger ones published as a fill and pumped into the store.

use super::*;
use crate::compress::{self, Coding, Compression, Plan};

impl Proxy {
    /// Fetches from the origin for `lookup` and publishes the result on `fill` for followers.
    /// `registered` says whether `fill` is in the shared map (and must be removed from it).
    pub(super) async fn lead(
        self: &Arc<Self>,
        lookup: &Lookup,
        fill: Arc<Fill>,
        registered: bool,
        stale: Option<Arc<Entry>>,
    ) -> Answer {
        let candidates = self.candidates(lookup.site, lookup.conn, &lookup.parts.headers);
        let mut guard = LeaderGuard {
            proxy: self,
            hash: lookup.hash,
            fill: fill.clone(),
            registered,
            armed: true,
        };
        let validators = stale.as_ref().filter(|s| s.has_validator());
        let Some(up) = self.upstream_request(lookup, validators) else {
            return refuse(ProxyError::InvalidTarget);
        };
        let request_time = SystemTime::now();
        // Peer fill: a key another member owns is asked of it first; if it does not answer,
        // of the origin as usual.
        let owner = self.owner_of(lookup);
        let range = lookup.parts.headers.contains_key(header::RANGE) && !lookup.ignore_range;
        let keep = owner.is_none()
            || self
                .fleet
                .as_ref()
                .is_some_and(|f| f.keep_copy(lookup.hash));
        let from_peer = match &owner {
            Some(owner) => self.send_to_peer(owner, &up, lookup, range && !keep).await,
            None => None,
        };
        let (origin, ms, result, route, peer) = match from_peer {
            Some((resp, ms)) => {
                let id = owner.map(|o| o.id);
                (candidates.first(), ms, Ok(resp), candidates.route, id)
            }
            None => {
                let Some(Sent {
                    origin,
                    ms,
                    result,
                    route,
                }) = self.send(candidates, up).await
                else {
                    return refuse(ProxyError::InvalidTarget);
                };
                (origin, ms, result, route, None)
            }
        };
        let f = Fetched {
            lookup,
            stale: stale.as_ref(),
            origin,
            ms,
            route,
            request_time,
            keep,
            base: if peer.is_some() {
                "fwd=peer"
            } else if lookup.forced {
                "fwd=request"
            } else if stale.is_some() {
                "fwd=stale"
            } else {
                lookup.miss
            },
            peer,
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => return self.origin_failed(&mut guard, &f, &e),
        };
        let response_time = SystemTime::now();
        let (mut rparts, rbody) = resp.into_parts();
        self.relay_head(&mut rparts);
        if range && !keep {
            // The owner cut the range (or answered whole): passed on as it came.
            guard.publish(Outcome::Uncacheable);
            let status = after_upstream(&rparts.headers, self.cache_status(f.base));
            rparts.headers.insert(CACHE_STATUS.clone(), status);
            let body = if lookup.head {
                Body::empty()
            } else {
                Body::stream(rbody)
            };
            return (
                Response::from_parts(rparts, body),
                f.outcome(CacheResult::Miss),
            );
        }

        // A 304 for our validators refreshes the stored response (RFC 9111 §4.3.4).
        if let (StatusCode::NOT_MODIFIED, Some(s)) = (rparts.status, validators) {
            return self.refresh(&mut guard, &f, s, &rparts.headers, response_time);
        }
        // An origin error with a usable stale response: serve stale (RFC 5861 §4).
        if rparts.status.is_server_error() {
            let error = ProxyError::OriginStatus(rparts.status);
            let client = &lookup.parts.headers;
            if let Some(resp) =
                self.stale_on_error(stale.as_ref(), error, false, client, lookup.head)
            {
                guard.publish(Outcome::Failed(error));
                return (resp, f.outcome(CacheResult::Stale));
            }
        }
        let response = Response::from_parts(rparts, rbody);
        in_stage!(
            telemetry::spans::ADMIT,
            self.admit(guard, &f, fill, registered, response, response_time)
        )
    }

    /// A stale answer for a fetch that failed with `error`, when the stored response allows
    /// it: under stale-if-error (RFC 5861 §4), or when no origin could be reached at all
    /// (refused, reset, no address: RFC 9111 §4.2.4 lets a disconnected cache serve what it
    /// has unless the response must be revalidated, whatever grace the site gives).
    /// `collapsed`: for a follower of the failed fill.
    pub(super) fn stale_on_error(
        &self,
        stale: Option<&Arc<Entry>>,
        error: ProxyError,
        collapsed: bool,
        client: &HeaderMap,
        head: bool,
    ) -> Option<Response<Body>> {
        let s = stale?;
        let now = SystemTime::now();
        let detail = if s.usable_if_error(now) {
            "stale-if-error"
        } else if error.unreachable() && s.usable_when_disconnected() {
            "origin-unreachable"
        } else {
            return None;
        };
        let code = error.status().as_u16();
        let collapsed = if collapsed { " collapsed;" } else { "" };
        let status = self.cache_status(&format!(
            "hit; fwd=stale; fwd-status={code};{collapsed} detail={detail}"
        ));
        Some(self.answer_from_entry(s, client, head, now, status))
    }

    /// The whole-object GET for `lookup`: the client's fields without its conditionals,
    /// range and framing, our validators when revalidating, forwarding fields and our
    /// `CDN-Loop` member; the path and query as keyed. `None` for a target that is not one.
    fn upstream_request(
        &self,
        lookup: &Lookup,
        validators: Option<&Arc<Entry>>,
    ) -> Option<Upstream> {
        let mut up_headers = lookup.parts.headers.clone();
        // The GET sent has no body, so no framing field goes with it (a request with a body
        // never gets here).
        up_headers.remove(header::CONTENT_LENGTH);
        if up_headers.keys().any(|k| CONDITIONAL_FIELDS.contains(k)) {
            for f in &CONDITIONAL_FIELDS {
                up_headers.remove(f);
            }
        }
        if let Some(s) = validators {
            if let Some(etag) = s.headers.get(header::ETAG) {
                up_headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = s.headers.get(header::LAST_MODIFIED) {
                up_headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }
        // The path and query as keyed, not as received: parameters the key drops or reorders
        // never reach the origin (a response to `?id=1&utm_source=<script>` would otherwise
        // be stored for `?id=1`).
        let pq = match lookup.parts.uri.path_and_query() {
            Some(raw) if raw.as_str() == &*lookup.key.path_and_query => raw.clone(),
            _ => PathAndQuery::try_from(&*lookup.key.path_and_query).ok()?,
        };
        Some(self.upstream(
            Method::GET,
            pq,
            up_headers,
            lookup.conn,
            &lookup.host_value,
            lookup.parts.version,
        ))
    }

    /// No response from the origin: stale if the entry allows it (stale-if-error, or the
    /// origin unreachable), else 504 for an entry that had to be revalidated, else the error.
    fn origin_failed(
        &self,
        guard: &mut LeaderGuard<'_>,
        f: &Fetched<'_>,
        e: &origin::Error,
    ) -> Answer {
        let (lookup, client) = (f.lookup, &f.lookup.parts.headers);
        let name = &self.origins[f.origin].config.name;
        tracing::warn!(origin = %name, error = %ErrorChain(e), "origin request failed");
        let error = ProxyError::from(e);
        guard.publish(Outcome::Failed(error));
        if let Some(resp) = self.stale_on_error(f.stale, error, false, client, lookup.head) {
            return (resp, f.outcome(CacheResult::Stale));
        }
        if f.stale.is_some() {
            // RFC 9111 §5.2.2.2: a stored response that may not be served stale and cannot be
            // revalidated is answered with 504, never reused.
            return (
                respond::error(ProxyError::NotRevalidated),
                f.outcome(CacheResult::Error),
            );
        }
        (respond::error(error), f.outcome(CacheResult::Error))
    }

    /// A 304 for our validators: the stored response refreshed with its fields (RFC 9111
    /// §4.3.4), stored and shared when it may be, answered from either way.
    fn refresh(
        &self,
        guard: &mut LeaderGuard<'_>,
        f: &Fetched<'_>,
        s: &Entry,
        not_modified: &HeaderMap,
        response_time: SystemTime,
    ) -> Answer {
        let (lookup, client) = (f.lookup, &f.lookup.parts.headers);
        let mut headers = s.headers.clone();
        policy::refresh_headers(&mut headers, not_modified);
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &CacheControl::default(),
        };
        let settings = lookup.settings(&self.config);
        let decision = policy::storable(facts, s.status, &headers, settings, response_time);
        let initial_age =
            policy::corrected_initial_age(not_modified, f.request_time, response_time);
        // What the 304 says to this client alone (`Set-Cookie`, fields named by `private=` /
        // `no-cache=`) is stripped as on store: it never enters the shared copy, and only
        // this client receives it.
        let mut strip = decision
            .as_ref()
            .map(|d| d.strip.clone())
            .unwrap_or_default();
        if !strip.iter().any(|n| n.eq_ignore_ascii_case("set-cookie")) {
            strip.push("set-cookie".into());
        }
        let personal: Vec<(HeaderName, HeaderValue)> = not_modified
            .iter()
            .filter(|(n, _)| strip.iter().any(|f| f.eq_ignore_ascii_case(n.as_str())))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let stored_ok = decision.is_ok();
        let refreshed = s.refreshed(
            strip_cache_only(headers, &self.config.cache.cache_control_field, &strip),
            response_time,
            initial_age,
            decision.unwrap_or_else(|_| s.decision.clone()),
        );
        // The refreshed entry is built once: stored, shared with followers and answered from
        // when storable; otherwise answered from for this client only, the old one removed,
        // and followers fetch for themselves.
        let entry = if stored_ok {
            let entry = self.store.insert_shared(lookup.hash, refreshed);
            guard.publish(Outcome::Ready(entry.clone()));
            entry
        } else {
            self.store.remove(lookup.hash);
            guard.publish(Outcome::Uncacheable);
            Arc::new(refreshed)
        };
        let status = self.cache_status(&format!("{}; fwd-status=304", f.base));
        let mut resp = self.answer_from_entry(&entry, client, lookup.head, response_time, status);
        for (name, value) in personal {
            resp.headers_mut().append(name, value);
        }
        (resp, f.outcome(CacheResult::Revalidated))
    }

    /// cache_store: whether the response may be stored (and as which variant); if not, it is
    /// passed on as it comes; a small one is read whole and stored before anyone is answered;
    /// a larger one is published as a fill that a [`Pump`] reads into the store.
    async fn admit(
        self: &Arc<Self>,
        mut guard: LeaderGuard<'_>,
        f: &Fetched<'_>,
        fill: Arc<Fill>,
        registered: bool,
        response: Response<Incoming>,
        response_time: SystemTime,
    ) -> Answer {
        let (lookup, client) = (f.lookup, &f.lookup.parts.headers);
        let site = &self.config.sites[lookup.site];
        let (rparts, rbody) = response.into_parts();
        // An origin's 206: stored as an extent of the object (`proxy::partial`); followers
        // go their own way (they may want other bytes).
        let (mut rparts, rbody) =
            if rparts.status == StatusCode::PARTIAL_CONTENT && f.keep && f.peer.is_none() {
                guard.publish(Outcome::Uncacheable);
                match self.admit_partial(f, rparts, rbody, response_time).await {
                    Ok(answer) => return answer,
                    Err(back) => *back,
                }
            } else {
                (rparts, rbody)
            };
        let limit = self.config.cache.max_object_size;
        let content_length = rparts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        let mut stored = match self.store_decision(
            f.keep,
            lookup,
            &mut rparts.headers,
            rparts.status,
            content_length,
            response_time,
        ) {
            Ok(stored) => stored,
            Err(reason) => {
                guard.publish(Outcome::Uncacheable);
                return self.not_stored(f, reason, rparts, rbody);
            }
        };
        // Answers below are built from what is shared (the entry, the fill's head); this
        // client's own fields are added to its answer alone.
        let personal = std::mem::take(&mut stored.personal);
        if content_length.is_some_and(|n| n <= SMALL_OBJECT) {
            let expected = content_length.unwrap_or(0);
            let answer = self
                .store_small(guard, f, stored, rparts, rbody, expected)
                .await;
            return with_personal(answer, personal);
        }
        let fhead = Arc::new(FillHead {
            status: rparts.status,
            headers: rparts.headers.clone(),
            vary: stored.vary.clone(),
            content_length,
        });
        guard.publish(Outcome::Streaming(fhead.clone()));
        guard.armed = false;
        let range = client.contains_key(header::RANGE) && !lookup.ignore_range;
        let reader = if lookup.head || range {
            None
        } else {
            fill.reader()
        };
        let done = range.then(|| fill.clone());
        let pump = Pump {
            store: self.store.clone(),
            proxy: self.clone(),
            hash: lookup.hash,
            fill,
            registered,
            key: lookup.key.clone(),
            vary: stored.vary,
            status: rparts.status,
            headers: rparts.headers,
            request_time: f.request_time,
            response_time,
            decision: stored.decision,
            tags: stored.tags,
            limit,
            idle: self.origins[f.origin].config.timeout,
            hit_for_miss: site.cache.hit_for_miss,
            keep: f.keep,
            plan: stored.plan,
            compression: site.compression.clone(),
        };
        tokio::spawn(pump.run(rbody));
        if let Some(fill) = done {
            // A range is cut from the stored object once it is complete.
            if let Some(e) = self.stored_after(&fill, lookup).await {
                let status = self.miss_status(f.base, false);
                return with_personal(
                    (
                        self.answer_from_entry(&e, client, lookup.head, SystemTime::now(), status),
                        f.outcome(CacheResult::Miss),
                    ),
                    personal,
                );
            }
            let lookup = Lookup {
                ignore_range: true,
                ..lookup.clone()
            };
            return Box::pin(self.lead(&lookup, Arc::new(Fill::default()), false, None)).await;
        }
        let status = if f.keep {
            self.stored_status(f.base, f.stale.is_some())
        } else {
            self.cache_status(f.base)
        };
        let answer = (
            self.answer_from_fill(&fhead, reader, client, lookup.head, status),
            f.outcome(CacheResult::Miss),
        );
        with_personal(answer, personal)
    }

    /// Whether a response may be stored, and how: the policy's decision (too large counts
    /// as no), the fields it says to strip removed from `headers`, its variant, and the
    /// URL's budget for new variants (see `Store::admit_variant`).
    fn store_decision(
        &self,
        keep: bool,
        lookup: &Lookup,
        headers: &mut HeaderMap,
        status: StatusCode,
        content_length: Option<u64>,
        response_time: SystemTime,
    ) -> Result<Stored, NoStoreReason> {
        let client = &lookup.parts.headers;
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &CacheControl::from_headers(client),
        };
        let limit = self.config.cache.max_object_size;
        let settings = lookup.settings(&self.config);
        let decision =
            policy::storable(facts, status, headers, settings, response_time).and_then(|d| {
                if content_length.is_some_and(|n| n > limit) {
                    Err(NoStoreReason::TooLarge)
                } else {
                    Ok(d)
                }
            });
        let tags = tags(headers);
        let strip: Vec<Box<str>> = decision
            .as_ref()
            .map(|d| d.strip.clone())
            .unwrap_or_default();
        // What is stripped for storing (fields named by `private=` / `no-cache=`, a stored
        // `Set-Cookie`) is the origin's answer to this client alone: it still gets them.
        let personal: Vec<(HeaderName, HeaderValue)> = if strip.is_empty() {
            Vec::new()
        } else {
            headers
                .iter()
                .filter(|(n, _)| strip.iter().any(|f| f.eq_ignore_ascii_case(n.as_str())))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        let own = &self.config.cache.cache_control_field;
        *headers = strip_cache_only(std::mem::take(headers), own, &strip);
        let compression = &self.config.sites[lookup.site].compression;
        let plan = compression.plan(status, headers, content_length);
        // A response compressed here serves every `Accept-Encoding` from one entry, so the
        // field is not part of its variant even where the origin names it.
        let vary = match plan {
            Plan::Encode => {
                VaryKey::from_response_except(headers, client, &header::ACCEPT_ENCODING)
            }
            _ => VaryKey::from_response(headers, client),
        }
        .with_extra(lookup.extra.clone());
        if plan != Plan::Keep {
            compress::add_vary(headers);
        }
        let decision = decision?;
        if keep {
            self.store.admit_variant(lookup.hash, &lookup.key, &vary)?;
        }
        Ok(Stored {
            vary,
            decision,
            tags,
            response_time,
            personal,
            plan,
        })
    }

    /// A response that may not be stored, passed on as it comes (marked hit-for-miss when
    /// that is a property of the URL).
    fn not_stored(
        &self,
        f: &Fetched<'_>,
        reason: NoStoreReason,
        mut rparts: http::response::Parts,
        rbody: Incoming,
    ) -> Answer {
        let lookup = f.lookup;
        // Errors are not a property of the URL: keep collapsing so a failing origin is not hit
        // by every waiting client at once.
        if !rparts.status.is_server_error()
            && !matches!(
                reason,
                NoStoreReason::RequestNoStore
                    | NoStoreReason::Authorization
                    | NoStoreReason::VariantRate
            )
        {
            let hit_for_miss = self.config.sites[lookup.site].cache.hit_for_miss;
            self.store.mark_hit_for_miss(lookup.hash, hit_for_miss);
        }
        if f.stale.is_some() && !rparts.status.is_server_error() {
            // The origin's current answer supersedes what we held (a 5xx does not: §4.3.3).
            self.store.remove(lookup.hash);
        }
        let ours = self.cache_status(&format!("{}; detail={}", f.base, reason.as_str()));
        let status = after_upstream(&rparts.headers, ours);
        rparts.headers.insert(CACHE_STATUS.clone(), status);
        let client = &lookup.parts.headers;
        let body = self.streamed(lookup.site, client, &mut rparts, rbody, lookup.head);
        (
            Response::from_parts(rparts, body),
            f.outcome(CacheResult::Pass),
        )
    }

    /// A small object is read whole before anyone is answered: followers are then served from
    /// the stored entry, with no streaming machinery per request.
    async fn store_small(
        &self,
        mut guard: LeaderGuard<'_>,
        f: &Fetched<'_>,
        stored: Stored,
        rparts: http::response::Parts,
        mut body: Incoming,
        expected: u64,
    ) -> Answer {
        let lookup = f.lookup;
        let timeout = self.origins[f.origin].config.timeout;
        let mut buf = bytes::BytesMut::with_capacity(expected as usize);
        let complete = loop {
            match tokio::time::timeout(timeout, body.frame()).await {
                Ok(None) => break true,
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        buf.extend_from_slice(d);
                    }
                }
                _ => break false,
            }
        };
        if !complete || buf.len() as u64 != expected {
            guard.publish(Outcome::Failed(ProxyError::OriginCutOff));
            return (
                respond::error(ProxyError::OriginCutOff),
                f.outcome(CacheResult::Error),
            );
        }
        let initial_age =
            policy::corrected_initial_age(&rparts.headers, f.request_time, stored.response_time);
        let body = buf.freeze();
        let forms = if f.keep {
            let site = &self.config.sites[lookup.site];
            encoded_forms(
                stored.plan,
                &site.compression,
                &body,
                self.config.cache.max_object_size,
            )
            .await
        } else {
            Vec::new()
        };
        let entry = Entry::new(
            lookup.key.clone(),
            stored.vary,
            rparts.status,
            rparts.headers,
            body,
            stored.response_time,
            initial_age,
            stored.decision,
            stored.tags,
        )
        .with_forms(forms)
        .with_decodable(decodable(stored.plan));
        // Not kept (a peer's object at a non-owner): still shared with this fill's followers.
        let entry = if f.keep {
            self.store.insert_shared(lookup.hash, entry)
        } else {
            Arc::new(entry)
        };
        guard.publish(Outcome::Ready(entry.clone()));
        let status = if f.keep {
            self.stored_status(f.base, f.stale.is_some())
        } else {
            self.cache_status(f.base)
        };
        let client = &lookup.parts.headers;
        let resp = self.answer_from_entry(&entry, client, lookup.head, SystemTime::now(), status);
        (resp, f.outcome(CacheResult::Miss))
    }

    /// Waits for `fill` to complete and returns the entry it stored for `lookup`, if any.
    pub(super) async fn stored_after(&self, fill: &Fill, lookup: &Lookup) -> Option<Arc<Entry>> {
        if !fill.wait_done().await {
            return None;
        }
        let parts = lookup.key.parts();
        self.store.get(
            lookup.hash,
            &parts,
            lookup.extra.as_deref(),
            &lookup.parts.headers,
        )
    }
}

/// What the leader knows once the origin has answered or failed.
pub(super) struct Fetched<'a> {
    pub(super) lookup: &'a Lookup,
    /// The stored response being revalidated, if any.
    stale: Option<&'a Arc<Entry>>,
    /// The origin asked, and its time to the response head in milliseconds.
    pub(super) origin: usize,
    ms: f64,
    /// The geo route that chose the origin.
    route: Option<Arc<str>>,
    pub(super) request_time: SystemTime,
    /// The forward reason in the client's `Cache-Status` (`fwd=uri-miss`, `fwd=stale`...).
    pub(super) base: &'static str,
    /// The member that answered instead of the origin (then `origin` is only the one whose
    /// timeouts apply to the body).
    peer: Option<Arc<str>>,
    /// Whether the response may be stored here (false for a peer's object, unless
    /// `cluster.hot_copies`).
    keep: bool,
}

impl Fetched<'_> {
    pub(super) fn outcome(&self, cache: CacheResult) -> Outcome_ {
        match &self.peer {
            Some(peer) => Outcome_ {
                cache,
                origin: None,
                origin_ms: Some(self.ms),
                route: self.route.clone(),
                peer: Some(peer.clone()),
            },
            None => Outcome_::origin(cache, self.origin, self.ms, self.route.clone()),
        }
    }
}

/// How a storable response is stored.
pub(super) struct Stored {
    vary: VaryKey,
    decision: StoreDecision,
    tags: Box<[Box<str>]>,
    response_time: SystemTime,
    /// Fields removed from the stored copy that the client whose request fetched it still
    /// receives (see `store_decision`).
    personal: Vec<(HeaderName, HeaderValue)>,
    /// What compression does with it (`compress`).
    plan: Plan,
}

/// Publishes `Retry` if the leader goes away (client disconnect) before publishing.
pub(super) struct LeaderGuard<'a> {
    proxy: &'a Proxy,
    hash: u64,
    fill: Arc<Fill>,
    registered: bool,
    armed: bool,
}

impl LeaderGuard<'_> {
    fn publish(&mut self, outcome: Outcome) {
        let streaming = matches!(outcome, Outcome::Streaming(_));
        self.fill.publish(outcome);
        if !streaming {
            self.release();
        }
    }

    fn release(&mut self) {
        self.armed = false;
        if self.registered {
            self.proxy.fills.remove(self.hash, &self.fill);
        }
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.fill.publish(Outcome::Retry);
            self.release();
        }
    }
}

/// Reads an origin body into a fill, then stores it (stream-while-caching). Runs on its own
/// task, so the object is completed for the cache even if every client leaves.
pub(super) struct Pump {
    store: Store,
    proxy: Arc<Proxy>,
    hash: u64,
    fill: Arc<Fill>,
    registered: bool,
    key: OwnedKey,
    vary: VaryKey,
    status: StatusCode,
    headers: HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    decision: StoreDecision,
    tags: Box<[Box<str>]>,
    limit: u64,
    idle: Duration,
    hit_for_miss: Duration,
    /// Store the object once complete (false: a peer's object at a non-owner, streamed to
    /// the fill's readers only).
    keep: bool,
    /// What compression does with the object, and the site's settings for it.
    plan: Plan,
    compression: Arc<Compression>,
}

impl Pump {
    async fn run(self, mut body: Incoming) {
        let mut abandoned = false;
        // Bytes counted against `cache.fill_memory` while this fill is kept for storing.
        let mut charged = 0u64;
        let complete = loop {
            let frame = match tokio::time::timeout(self.idle, body.frame()).await {
                Err(_) => break false,
                Ok(None) => break true,
                Ok(Some(Err(_))) => break false,
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let last = body.is_end_stream();
            let n = data.len() as u64;
            let mut over_budget = false;
            if !abandoned {
                charged += n;
                over_budget = !self.proxy.fills.charge(n);
            }
            if last && !abandoned && !over_budget && self.fill.len() + n <= self.limit {
                // The last bytes: store first, then let readers finish, so a client that has
                // read everything always finds the object stored.
                self.fill.push_hidden(data);
                break true;
            }
            self.fill.push(data);
            if !abandoned && (over_budget || self.fill.len() > self.limit) {
                // Too large to store after all, or fills in flight hold too much: keep
                // streaming to the readers we have, with the fetch held to their pace (and
                // stopped when none is left), and let new requests go their own way.
                abandoned = true;
                self.fill.abandon();
                self.release();
                self.proxy.fills.uncharge(std::mem::take(&mut charged));
                if over_budget {
                    tracing::debug!("fill memory full: not storing this response");
                } else {
                    self.store.mark_hit_for_miss(self.hash, self.hit_for_miss);
                }
            }
            if abandoned && !self.fill.wait_for_readers(STREAM_WINDOW).await {
                break false;
            }
        };
        if complete && !abandoned && self.keep {
            if let Some(bytes) = self.fill.collect(self.proxy.config.cache.sendfile_min_size) {
                let initial_age = policy::corrected_initial_age(
                    &self.headers,
                    self.request_time,
                    self.response_time,
                );
                let forms = encoded_forms(self.plan, &self.compression, &bytes, self.limit).await;
                let entry = Entry::new(
                    self.key.clone(),
                    self.vary.clone(),
                    self.status,
                    self.headers.clone(),
                    bytes,
                    self.response_time,
                    initial_age,
                    self.decision.clone(),
                    self.tags.clone(),
                )
                .with_forms(forms)
                .with_decodable(decodable(self.plan));
                self.store.insert(self.hash, entry);
            }
        }
        self.proxy.fills.uncharge(charged);
        self.fill.finish(complete);
        self.release();
    }

    fn release(&self) {
        if self.registered {
            self.proxy.fills.remove(self.hash, &self.fill);
        }
    }
}

/// The encoded forms of a body a fill is about to store, made on a blocking thread when
/// `plan` says so and the body (its size now known) is not below the site's minimum; what is
/// left of `limit` (`cache.max_object_size`) after the identity body bounds their total.
async fn encoded_forms(
    plan: Plan,
    compression: &Arc<Compression>,
    body: &Bytes,
    limit: u64,
) -> Vec<(Coding, Bytes)> {
    let len = body.len() as u64;
    if plan != Plan::Encode || len < compression.min_size {
        return Vec::new();
    }
    let (c, body) = (compression.clone(), body.clone());
    let budget = limit.saturating_sub(len);
    tokio::task::spawn_blocking(move || compress::forms(&c.encodings, &c.levels, &body, budget))
        .await
        .unwrap_or_default()
}

/// The stored body's coding when clients that do not accept it get it decoded.
fn decodable(plan: Plan) -> Option<Coding> {
    match plan {
        Plan::Decode(c) => Some(c),
        _ => None,
    }
}

impl Proxy {
    /// Whether a response with `headers` to a request with `client`'s fields may be stored,
    /// judged as the GET's 200 it stands for (a slice, an extent, a POST's answer).
    pub(super) fn judged_as_get(
        &self,
        client: &HeaderMap,
        headers: &HeaderMap,
        settings: &Settings,
        response_time: SystemTime,
    ) -> Result<StoreDecision, NoStoreReason> {
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &CacheControl::from_headers(client),
        };
        policy::storable(facts, StatusCode::OK, headers, settings, response_time)
    }

    /// The fields of a copy shared by every client, with the purge tags read before they
    /// go: cache-only fields, those `strip` names and `Set-Cookie` removed.
    pub(super) fn shared_copy(
        &self,
        headers: HeaderMap,
        strip: &[Box<str>],
    ) -> (HeaderMap, Box<[Box<str>]>) {
        let tags = tags(&headers);
        let mut strip = strip.to_vec();
        strip.push("set-cookie".into());
        let own = &self.config.cache.cache_control_field;
        (strip_cache_only(headers, own, &strip), tags)
    }

    /// An origin's answer that is none of the cache's business, passed on as it came:
    /// cache-only fields removed, `detail` in `Cache-Status` after the origin's members.
    pub(super) fn passed_on(
        &self,
        mut rparts: http::response::Parts,
        rbody: Incoming,
        head: bool,
        detail: &str,
    ) -> Response<Body> {
        let status = after_upstream(&rparts.headers, self.cache_status(detail));
        let own = &self.config.cache.cache_control_field;
        rparts.headers = strip_cache_only(std::mem::take(&mut rparts.headers), own, &[]);
        rparts.headers.insert(CACHE_STATUS.clone(), status);
        let body = if head {
            Body::empty()
        } else {
            Body::stream(rbody)
        };
        Response::from_parts(rparts, body)
    }
}

/// Purge tags from `Surrogate-Key` and `Cache-Tag` (space or comma separated).
pub(super) fn tags(headers: &HeaderMap) -> Box<[Box<str>]> {
    let mut out: Vec<Box<str>> = Vec::new();
    for name in [&policy::SURROGATE_KEY, &policy::CACHE_TAG] {
        for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for t in v.split([' ', ',']).map(str::trim).filter(|t| !t.is_empty()) {
                if !out.iter().any(|o| **o == *t) {
                    out.push(t.into());
                }
            }
        }
    }
    out.into_boxed_slice()
}

/// `answer` with `personal` (the fields its client alone receives) added.
fn with_personal(mut answer: Answer, personal: Vec<(HeaderName, HeaderValue)>) -> Answer {
    for (name, value) in personal {
        answer.0.headers_mut().append(name, value);
    }
    answer
}

/// Removes fields meant for this cache only (`own`: `cache.cache_control_field`), and
/// `strip` (lowercase names).
pub(super) fn strip_cache_only(
    mut headers: HeaderMap,
    own: &HeaderName,
    strip: &[Box<str>],
) -> HeaderMap {
    // One look at the names first: most responses carry none of these.
    if headers
        .keys()
        .any(|n| CACHE_ONLY_FIELDS.contains(&n) || n == own)
    {
        for name in CACHE_ONLY_FIELDS {
            headers.remove(name);
        }
        headers.remove(own);
    }
    for name in strip {
        headers.remove(&**name);
    }
    headers
}

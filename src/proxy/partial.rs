//! Partial content (RFC 9111 §3.4): a `206` an origin sends is stored as what it is, the
//! bytes of one extent of the object (`URL#partial`, see `Store::partial_path`), and reused
//! for ranges inside it. A later request that needs more, on one side of the extent, asks
//! the origin for just the missing bytes with `If-Range` (the extent's strong `ETag`): the
//! answer is joined to the extent (RFC 9111 §3.4 allows combining responses with the same
//! strong validator), and once the extent is the whole object it is stored as a complete
//! response. If the object has changed the origin sends it whole: the extent is dropped and
//! the answer passed on. Ranges the extent cannot serve otherwise go the usual way (a
//! whole-object fetch).
//!
//! Extents live beside slices' and complete objects' keys: a lookup finds a complete
//! response first, and a purge by URL removes the extent too.

use super::*;
use lookup::Keyed;

/// A miss that an extent and one range request can answer.
pub(super) struct PartialMiss {
    pub(super) keyed: Keyed,
    extent: Arc<Entry>,
    /// The bytes to ask for.
    missing: (u64, u64),
}

/// What an extent can do for a request.
pub(super) enum Use {
    Answer(Response<Body>),
    Complete((u64, u64)),
    No,
}

impl Proxy {
    /// The stored extent of the URL `parts` names, matching `request`'s variant.
    pub(super) fn extent(
        &self,
        parts: &KeyParts<'_>,
        extra: Option<&str>,
        request: &HeaderMap,
    ) -> Option<(u64, Arc<Entry>)> {
        if !self.store.has_partials() {
            return None;
        }
        let path = Store::partial_path(parts.path_and_query);
        let p = KeyParts {
            path_and_query: &path,
            ..*parts
        };
        let hash = self.store.hash(&p);
        self.store.get(hash, &p, extra, request).map(|e| (hash, e))
    }

    /// What `extent` can do for a request with `request`'s fields: answer it (the range,
    /// or a 304/412/416), be completed by a range request for the bytes returned, or nothing.
    pub(super) fn use_extent(
        &self,
        extent: &Entry,
        request: &HeaderMap,
        head: bool,
        now: SystemTime,
        status: HeaderValue,
    ) -> Use {
        let Some((a, b, total)) = slice::content_range(&extent.headers) else {
            return Use::No;
        };
        let status = answer::chain_status(extent.upstream_status.as_ref(), status);
        let age = headers::age_value(extent.age(now).as_secs());
        let mut stored = extent.headers.clone();
        stored.remove(header::CONTENT_RANGE);
        let mut range = request.get(header::RANGE).and_then(|v| v.to_str().ok());
        match policy::evaluate_preconditions(request, &stored) {
            Precondition::NotModified => {
                return Use::Answer(answer::not_modified(&stored, age, status))
            }
            Precondition::Failed => {
                let mut r = respond::error(ProxyError::PreconditionFailed);
                r.headers_mut().insert(CACHE_STATUS.clone(), status);
                return Use::Answer(r);
            }
            Precondition::IgnoreRange => range = None,
            Precondition::Proceed => {}
        }
        let want = match range.map(|r| range::parse(r, total)) {
            Some(range::Ranges::Satisfiable(r)) if r.len() == 1 => Some(r[0]),
            Some(range::Ranges::Unsatisfiable) => {
                let mut resp = respond::error(ProxyError::RangeNotSatisfiable);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                resp.headers_mut().insert(CACHE_STATUS.clone(), status);
                return Use::Answer(resp);
            }
            _ => None,
        };
        let (x, y) = want.unwrap_or((0, total.saturating_sub(1)));
        if a <= x && y <= b && total > 0 {
            let body = extent.body.slice((x - a) as usize..=(y - a) as usize);
            let mut headers = stored;
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(y - x + 1));
            let code = if want.is_some() {
                if let Ok(v) = HeaderValue::from_str(&range::content_range(x, y, total)) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            };
            answer::set(&mut headers, header::AGE, age);
            answer::set(&mut headers, CACHE_STATUS.clone(), status);
            let mut resp = Response::new(if head {
                Body::empty()
            } else {
                Body::full(body)
            });
            *resp.status_mut() = code;
            *resp.headers_mut() = headers;
            return Use::Answer(resp);
        }
        // One gap beside the extent, and a strong validator to ask for it with.
        if !strong_etag(&extent.headers) {
            return Use::No;
        }
        let missing = if x < a && y <= b && y + 1 >= a {
            (x, a - 1)
        } else if x >= a && x <= b + 1 && y > b {
            (b + 1, y)
        } else {
            return Use::No;
        };
        // What is asked for and what the joined extent would be are objects in memory: no
        // larger than an object may be (a whole GET of a large file goes the usual way).
        let limit = self.config.cache.max_object_size;
        let joined = b.max(missing.1) - a.min(missing.0) + 1;
        if joined > limit {
            return Use::No;
        }
        Use::Complete(missing)
    }

    /// The lookup's answer from a stored extent when it has one for the request: a hit
    /// inside it, or the completion to fetch; `None` to go the usual way.
    pub(super) fn look_in_extent(
        &self,
        keyed: &Keyed,
        parts: &KeyParts<'_>,
        request: &HeaderMap,
        req_cc: &CacheControl,
        now: SystemTime,
    ) -> Option<Looked> {
        let (_, extent) = self.extent(parts, keyed.extra.as_deref(), request)?;
        if !matches!(
            policy::reuse(&extent.facts(now), req_cc, keyed.forced),
            Reuse::Fresh
        ) {
            return None;
        }
        let hit = self.cache_status("hit; detail=partial");
        match self.use_extent(&extent, request, keyed.head, now, hit) {
            Use::Answer(resp) => Some(Looked::Answer((resp, Outcome_::local(CacheResult::Hit)))),
            // `only-if-cached`: the origin may not be asked (the lookup answers 504).
            Use::Complete(_) if req_cc.only_if_cached => None,
            Use::Complete(missing) => Some(Looked::Partial(PartialMiss {
                keyed: keyed.clone(),
                extent,
                missing,
            })),
            Use::No => None,
        }
    }

    /// Asks the origin for the bytes an extent lacks (`If-Range` its `ETag`), joins them to
    /// it, and answers from the result: stored whole once complete, else as the larger
    /// extent. Anything but the expected 206 drops the extent and is passed on.
    pub(super) async fn complete_extent(&self, miss: PartialMiss, parts: RequestParts) -> Answer {
        let PartialMiss {
            keyed,
            extent,
            missing: (m0, m1),
        } = miss;
        let client = &parts.headers;
        let Some((a, b, total)) = slice::content_range(&extent.headers) else {
            return refuse(ProxyError::OriginFailed);
        };
        let mut up_headers = client.clone();
        for f in &CONDITIONAL_FIELDS {
            up_headers.remove(f);
        }
        up_headers.remove(header::CONTENT_LENGTH);
        if let Ok(v) = HeaderValue::from_str(&format!("bytes={m0}-{m1}")) {
            up_headers.insert(header::RANGE, v);
        }
        if let Some(etag) = extent.headers.get(header::ETAG) {
            up_headers.insert(header::IF_RANGE, etag.clone());
        }
        let Ok(pq) = PathAndQuery::try_from(&*keyed.key.path_and_query) else {
            return refuse(ProxyError::InvalidTarget);
        };
        let up = self.upstream(
            Method::GET,
            pq,
            up_headers,
            keyed.conn,
            &keyed.host_value,
            parts.version,
        );
        let candidates = self.candidates(keyed.site, keyed.conn, client);
        let request_time = SystemTime::now();
        let Some(Sent {
            origin,
            ms,
            result,
            route,
        }) = self.send(candidates, up).await
        else {
            return refuse(ProxyError::InvalidTarget);
        };
        let outcome = |c| Outcome_::origin(c, origin, ms, route.clone());
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                return (
                    respond::error(ProxyError::from(&e)),
                    outcome(CacheResult::Error),
                )
            }
        };
        let response_time = SystemTime::now();
        let (mut rparts, mut rbody) = resp.into_parts();
        self.relay_head(&mut rparts);
        let key = keyed.key.parts();
        let fits = slice::content_range(&rparts.headers) == Some((m0, m1, total))
            && rparts.status == StatusCode::PARTIAL_CONTENT
            && rparts.headers.get(header::ETAG) == extent.headers.get(header::ETAG);
        if !fits {
            // Changed (a 200 for If-Range that failed), or not what was asked: the extent is
            // out of date or of no use; the answer goes to the client as it came.
            self.drop_extent(&key);
            let ours = self.cache_status("fwd=partial; detail=extent-dropped");
            let status = after_upstream(&rparts.headers, ours);
            rparts.headers = strip_cache_only(
                std::mem::take(&mut rparts.headers),
                &self.config.cache.cache_control_field,
                &[],
            );
            rparts.headers.insert(CACHE_STATUS.clone(), status);
            let body = if keyed.head {
                Body::empty()
            } else {
                Body::stream(rbody)
            };
            return (
                Response::from_parts(rparts, body),
                outcome(CacheResult::Miss),
            );
        }
        let timeout = self.origins[origin].config.timeout;
        let expected = m1 - m0 + 1;
        let buf = read_exactly(&mut rbody, expected, timeout).await;
        let Some(buf) = buf else {
            return (
                respond::error(ProxyError::OriginCutOff),
                outcome(CacheResult::Error),
            );
        };
        let (lo, hi, joined) = if m0 < a {
            (m0, b, concat(&buf, &extent.body))
        } else {
            (a, m1, concat(&extent.body, &buf))
        };
        let client_cc = CacheControl::from_headers(client);
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &client_cc,
        };
        let settings = self.config.sites[keyed.site].settings(keyed.rule);
        let decision = policy::storable(
            facts,
            StatusCode::OK,
            &rparts.headers,
            settings,
            response_time,
        );
        let Ok(decision) = decision else {
            // The origin says not to store it any more: nor the extent. This client is still
            // answered what it asked for, from the joined bytes, stored nowhere.
            self.drop_extent(&key);
            let mut headers = rparts.headers;
            if let Ok(v) = HeaderValue::from_str(&range::content_range(lo, hi, total)) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            let path = Store::partial_path(key.path_and_query);
            let temp = Entry::new(
                OwnedKey::new(&KeyParts {
                    path_and_query: &path,
                    ..key
                }),
                extent.vary.clone(),
                StatusCode::PARTIAL_CONTENT,
                headers,
                joined,
                response_time,
                Duration::ZERO,
                StoreDecision::fresh_for(Duration::ZERO),
                Box::new([]),
            );
            let status = self.cache_status("fwd=partial; detail=not-stored");
            return match self.use_extent(&temp, client, keyed.head, SystemTime::now(), status) {
                Use::Answer(resp) => (resp, outcome(CacheResult::Miss)),
                _ => (
                    respond::error(ProxyError::OriginFailed),
                    outcome(CacheResult::Error),
                ),
            };
        };
        let tags = admit::tags(&rparts.headers);
        let mut strip = decision.strip.clone();
        strip.push("set-cookie".into());
        let own = &self.config.cache.cache_control_field;
        let mut headers = strip_cache_only(rparts.headers, own, &strip);
        let initial_age = policy::corrected_initial_age(&headers, request_time, response_time);
        let status = self.cache_status("fwd=partial; stored");
        let now = SystemTime::now();
        if lo == 0 && hi + 1 == total {
            // Whole: a complete response, as if fetched with one GET.
            headers.remove(header::CONTENT_RANGE);
            let entry = Entry::new(
                keyed.key.clone(),
                extent.vary.clone(),
                StatusCode::OK,
                headers,
                joined,
                response_time,
                initial_age,
                decision,
                tags,
            );
            let entry = self.store.insert_shared(keyed.hash, entry);
            self.drop_extent(&key);
            let resp = self.answer_from_entry(&entry, client, keyed.head, now, status);
            return (resp, outcome(CacheResult::Miss));
        }
        if let Ok(v) = HeaderValue::from_str(&range::content_range(lo, hi, total)) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        let entry = self.store_extent(
            &key,
            extent.vary.clone(),
            headers,
            joined,
            response_time,
            initial_age,
            decision,
            tags,
        );
        match self.use_extent(&entry, client, keyed.head, now, status) {
            Use::Answer(resp) => (resp, outcome(CacheResult::Miss)),
            _ => (
                respond::error(ProxyError::OriginFailed),
                outcome(CacheResult::Error),
            ),
        }
    }

    /// Stores an extent of the URL `key` names, returning it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_extent(
        &self,
        key: &KeyParts<'_>,
        vary: VaryKey,
        headers: HeaderMap,
        body: Bytes,
        response_time: SystemTime,
        initial_age: Duration,
        decision: StoreDecision,
        tags: Box<[Box<str>]>,
    ) -> Arc<Entry> {
        self.store.note_partial();
        let path = Store::partial_path(key.path_and_query);
        let p = KeyParts {
            path_and_query: &path,
            ..*key
        };
        let entry = Entry::new(
            OwnedKey::new(&p),
            vary,
            StatusCode::PARTIAL_CONTENT,
            headers,
            body,
            response_time,
            initial_age,
            decision,
            tags,
        );
        self.store.insert_shared(self.store.hash(&p), entry)
    }

    fn drop_extent(&self, key: &KeyParts<'_>) {
        let path = Store::partial_path(key.path_and_query);
        let p = KeyParts {
            path_and_query: &path,
            ..*key
        };
        self.store.remove(self.store.hash(&p));
    }

    /// The leader's 206 from the origin: stored as an extent (joined to a stored one it
    /// overlaps or adjoins, under the same strong `ETag`) when the policy allows, and
    /// answered from; passed on as it came when it cannot be.
    pub(super) async fn admit_partial(
        &self,
        f: &admit::Fetched<'_>,
        rparts: http::response::Parts,
        mut rbody: Incoming,
        response_time: SystemTime,
    ) -> Result<Answer, Box<(http::response::Parts, Incoming)>> {
        let lookup = f.lookup;
        let client = &lookup.parts.headers;
        let Some((a, b, total)) = slice::content_range(&rparts.headers) else {
            return Err(Box::new((rparts, rbody)));
        };
        let expected = b - a + 1;
        let facts = RequestFacts {
            method: &Method::GET,
            has_authorization: client.contains_key(header::AUTHORIZATION),
            cache_control: &CacheControl::from_headers(client),
        };
        let settings = lookup.settings(&self.config);
        let decision = policy::storable(
            facts,
            StatusCode::OK,
            &rparts.headers,
            settings,
            response_time,
        );
        let decision = match decision {
            Ok(d) if expected <= self.config.cache.max_object_size => d,
            _ => return Err(Box::new((rparts, rbody))),
        };
        let timeout = self.origins[f.origin].config.timeout;
        let buf = read_exactly(&mut rbody, expected, timeout).await;
        let Some(buf) = buf else {
            return Ok((
                respond::error(ProxyError::OriginCutOff),
                f.outcome(CacheResult::Error),
            ));
        };
        let tags = admit::tags(&rparts.headers);
        let mut strip = decision.strip.clone();
        strip.push("set-cookie".into());
        let own = &self.config.cache.cache_control_field;
        let mut headers = strip_cache_only(rparts.headers, own, &strip);
        let vary = VaryKey::from_response(&headers, client).with_extra(lookup.extra.clone());
        let initial_age = policy::corrected_initial_age(&headers, f.request_time, response_time);
        let key = lookup.key.parts();
        let mut body = buf;
        let (mut lo, mut hi) = (a, b);
        // Joined to the stored extent when both are the same representation.
        if let Some((_, old)) = self.extent(&key, lookup.extra.as_deref(), client) {
            if let Some((oa, ob, ot)) = slice::content_range(&old.headers) {
                let same = ot == total
                    && strong_etag(&headers)
                    && old.headers.get(header::ETAG) == headers.get(header::ETAG);
                let joined_len = ob.max(b) - oa.min(a) + 1;
                let fits = joined_len <= self.config.cache.max_object_size;
                if same && fits && oa <= b + 1 && a <= ob + 1 {
                    let (nlo, nhi) = (oa.min(a), ob.max(b));
                    let mut joined = bytes::BytesMut::with_capacity((nhi - nlo + 1) as usize);
                    // The newer bytes win where both have them.
                    if oa < a {
                        joined.extend_from_slice(&old.body[..(a - oa) as usize]);
                    }
                    joined.extend_from_slice(&body);
                    if ob > b {
                        joined.extend_from_slice(&old.body[(b + 1 - oa) as usize..]);
                    }
                    body = joined.freeze();
                    (lo, hi) = (nlo, nhi);
                }
            }
        }
        let status = self.cache_status(&format!("{}; stored; detail=partial", f.base));
        let now = SystemTime::now();
        if lo == 0 && hi + 1 == total {
            headers.remove(header::CONTENT_RANGE);
            let entry = Entry::new(
                lookup.key.clone(),
                vary,
                StatusCode::OK,
                headers,
                body,
                response_time,
                initial_age,
                decision,
                tags,
            );
            let entry = self.store.insert_shared(lookup.hash, entry);
            self.drop_extent(&key);
            let resp = self.answer_from_entry(&entry, client, lookup.head, now, status);
            return Ok((resp, f.outcome(CacheResult::Miss)));
        }
        if let Ok(v) = HeaderValue::from_str(&range::content_range(lo, hi, total)) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        let entry = self.store_extent(
            &key,
            vary,
            headers,
            body,
            response_time,
            initial_age,
            decision,
            tags,
        );
        if let Use::Answer(resp) = self.use_extent(&entry, client, lookup.head, now, status.clone())
        {
            return Ok((resp, f.outcome(CacheResult::Miss)));
        }
        // The client wanted bytes the extent lacks: it gets what the origin sent.
        let (x, y) = (a, b);
        let mut headers = entry.headers.clone();
        if let Ok(v) = HeaderValue::from_str(&range::content_range(x, y, total)) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(y - x + 1));
        answer::set(&mut headers, CACHE_STATUS.clone(), status);
        let slice = entry.body.slice((x - lo) as usize..=(y - lo) as usize);
        let mut resp = Response::new(if lookup.head {
            Body::empty()
        } else {
            Body::full(slice)
        });
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        *resp.headers_mut() = headers;
        Ok((resp, f.outcome(CacheResult::Miss)))
    }
}

/// True when `headers` carry a strong `ETag` (what joining responses needs, §3.4).
fn strong_etag(headers: &HeaderMap) -> bool {
    headers
        .get(header::ETAG)
        .is_some_and(|e| e.as_bytes().first() == Some(&b'"'))
}

fn concat(a: &[u8], b: &[u8]) -> Bytes {
    let mut out = bytes::BytesMut::with_capacity(a.len() + b.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out.freeze()
}

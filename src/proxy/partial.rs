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
        let pq = &keyed.key.path_and_query;
        let (conn, host) = (keyed.conn, &keyed.host_value);
        let Some(mut up) = self.range_request(client, (m0, m1), pq, conn, host, parts.version)
        else {
            return refuse(ProxyError::InvalidTarget);
        };
        if let Some(etag) = extent.headers.get(header::ETAG) {
            up.headers.insert(header::IF_RANGE, etag.clone());
        }
        let request_time = SystemTime::now();
        let candidates = self.candidates(keyed.site, keyed.conn, client);
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
            let detail = "fwd=partial; detail=extent-dropped";
            let resp = self.passed_on(rparts, rbody, keyed.head, detail);
            return (resp, outcome(CacheResult::Miss));
        }
        let timeout = self.origins[origin].config.timeout;
        let Some(buf) = read_exactly(&mut rbody, m1 - m0 + 1, timeout).await else {
            let error = respond::error(ProxyError::OriginCutOff);
            return (error, outcome(CacheResult::Error));
        };
        let (lo, hi, body) = if m0 < a {
            (m0, b, concat(&buf, &extent.body))
        } else {
            (a, m1, concat(&extent.body, &buf))
        };
        let settings = self.config.sites[keyed.site].settings(keyed.rule);
        let decision = self.judged_as_get(client, &rparts.headers, settings, response_time);
        let Ok(decision) = decision else {
            // The origin says not to store it any more: nor the extent. This client is still
            // answered what it asked for, from the joined bytes, stored nowhere.
            self.drop_extent(&key);
            let temp = Part {
                lo,
                hi,
                total,
                headers: rparts.headers,
                body,
                vary: extent.vary.clone(),
                response_time,
                initial_age: Duration::ZERO,
                decision: StoreDecision::fresh_for(Duration::ZERO),
                tags: Box::new([]),
            }
            .into_extent(&key);
            let status = self.cache_status("fwd=partial; detail=not-stored");
            return match self.use_extent(&temp, client, keyed.head, SystemTime::now(), status) {
                Use::Answer(resp) => (resp, outcome(CacheResult::Miss)),
                _ => (
                    respond::error(ProxyError::OriginFailed),
                    outcome(CacheResult::Error),
                ),
            };
        };
        let (headers, tags) = self.shared_copy(rparts.headers, &decision.strip);
        let part = Part {
            lo,
            hi,
            total,
            initial_age: policy::corrected_initial_age(&headers, request_time, response_time),
            headers,
            body,
            vary: extent.vary.clone(),
            response_time,
            decision,
            tags,
        };
        let status = self.cache_status("fwd=partial; stored");
        match self.keep_part(&keyed.key, keyed.hash, part, client, keyed.head, status) {
            Ok(resp) => (resp, outcome(CacheResult::Miss)),
            Err(_) => (
                respond::error(ProxyError::OriginFailed),
                outcome(CacheResult::Error),
            ),
        }
    }

    /// Keeps `part` of the object `key` names (its own key hash `hash`): as the object when
    /// it is whole (the extent dropped), else as the URL's extent; and answers `client` from
    /// it. `Err` with the stored extent when it does not hold what the client asked for.
    fn keep_part(
        &self,
        key: &OwnedKey,
        hash: u64,
        mut part: Part,
        client: &HeaderMap,
        head: bool,
        status: HeaderValue,
    ) -> Result<Response<Body>, Arc<Entry>> {
        let now = SystemTime::now();
        let parts = key.parts();
        if part.lo == 0 && part.hi + 1 == part.total {
            // Whole: a complete response, as if fetched with one GET.
            part.headers.remove(header::CONTENT_RANGE);
            let entry = Entry::new(
                key.clone(),
                part.vary,
                StatusCode::OK,
                part.headers,
                part.body,
                part.response_time,
                part.initial_age,
                part.decision,
                part.tags,
            );
            let entry = self.store.insert_shared(hash, entry);
            self.drop_extent(&parts);
            return Ok(self.answer_from_entry(&entry, client, head, now, status));
        }
        self.store.note_partial();
        let extent = part.into_extent(&parts);
        let hash = self.store.hash(&extent.key.parts());
        let entry = self.store.insert_shared(hash, extent);
        match self.use_extent(&entry, client, head, now, status) {
            Use::Answer(resp) => Ok(resp),
            _ => Err(entry),
        }
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
    /// answered from; given back, to be passed on as it came, when it cannot be.
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
        let settings = lookup.settings(&self.config);
        let decision = self.judged_as_get(client, &rparts.headers, settings, response_time);
        let decision = match decision {
            Ok(d) if expected <= self.config.cache.max_object_size => d,
            _ => return Err(Box::new((rparts, rbody))),
        };
        let timeout = self.origins[f.origin].config.timeout;
        let Some(body) = read_exactly(&mut rbody, expected, timeout).await else {
            let error = respond::error(ProxyError::OriginCutOff);
            return Ok((error, f.outcome(CacheResult::Error)));
        };
        let (headers, tags) = self.shared_copy(rparts.headers, &decision.strip);
        let part = Part {
            lo: a,
            hi: b,
            total,
            vary: VaryKey::from_response(&headers, client).with_extra(lookup.extra.clone()),
            initial_age: policy::corrected_initial_age(&headers, f.request_time, response_time),
            headers,
            body,
            response_time,
            decision,
            tags,
        };
        let part = self.joined_to_stored(lookup, part);
        let status = self.cache_status(&format!("{}; stored; detail=partial", f.base));
        match self.keep_part(
            &lookup.key,
            lookup.hash,
            part,
            client,
            lookup.head,
            status.clone(),
        ) {
            Ok(resp) => Ok((resp, f.outcome(CacheResult::Miss))),
            // The client wanted bytes the extent lacks: it gets what the origin sent.
            Err(extent) => {
                let resp = origin_bytes(&extent, (a, b, total), lookup.head, status);
                Ok((resp, f.outcome(CacheResult::Miss)))
            }
        }
    }

    /// `part` joined to the URL's stored extent when they overlap or adjoin and are the same
    /// representation (same length and strong `ETag`), within `max_object_size`; the newer
    /// bytes win where both have them. As it is otherwise.
    fn joined_to_stored(&self, lookup: &Lookup, mut part: Part) -> Part {
        let key = lookup.key.parts();
        let client = &lookup.parts.headers;
        let Some((_, old)) = self.extent(&key, lookup.extra.as_deref(), client) else {
            return part;
        };
        let Some((oa, ob, ot)) = slice::content_range(&old.headers) else {
            return part;
        };
        let (a, b) = (part.lo, part.hi);
        let same = ot == part.total
            && strong_etag(&part.headers)
            && old.headers.get(header::ETAG) == part.headers.get(header::ETAG);
        let (lo, hi) = (oa.min(a), ob.max(b));
        let fits = hi - lo < self.config.cache.max_object_size;
        if !(same && fits && oa <= b + 1 && a <= ob + 1) {
            return part;
        }
        let mut joined = bytes::BytesMut::with_capacity((hi - lo + 1) as usize);
        if oa < a {
            joined.extend_from_slice(&old.body[..(a - oa) as usize]);
        }
        joined.extend_from_slice(&part.body);
        if ob > b {
            joined.extend_from_slice(&old.body[(b + 1 - oa) as usize..]);
        }
        part.body = joined.freeze();
        (part.lo, part.hi) = (lo, hi);
        part
    }
}

/// Bytes `lo..=hi` of an object of `total`, ready to keep: the response's fields as stored
/// and the decision they were stored under.
struct Part {
    lo: u64,
    hi: u64,
    total: u64,
    headers: HeaderMap,
    body: Bytes,
    vary: VaryKey,
    response_time: SystemTime,
    initial_age: Duration,
    decision: StoreDecision,
    tags: Box<[Box<str>]>,
}

impl Part {
    /// The extent entry of the URL `key` names, its `Content-Range` saying what it holds.
    fn into_extent(mut self, key: &KeyParts<'_>) -> Entry {
        let range = range::content_range(self.lo, self.hi, self.total);
        if let Ok(v) = HeaderValue::from_str(&range) {
            self.headers.insert(header::CONTENT_RANGE, v);
        }
        let path = Store::partial_path(key.path_and_query);
        let p = KeyParts {
            path_and_query: &path,
            ..*key
        };
        Entry::new(
            OwnedKey::new(&p),
            self.vary,
            StatusCode::PARTIAL_CONTENT,
            self.headers,
            self.body,
            self.response_time,
            self.initial_age,
            self.decision,
            self.tags,
        )
    }
}

/// The bytes `a..=b` of an object of `total` that the origin sent, cut from `extent` (which
/// holds them): a 206 for a client whose range the extent could not answer.
fn origin_bytes(
    extent: &Entry,
    (a, b, total): (u64, u64, u64),
    head: bool,
    status: HeaderValue,
) -> Response<Body> {
    let lo = slice::content_range(&extent.headers).map_or(a, |(lo, _, _)| lo);
    let mut headers = extent.headers.clone();
    if let Ok(v) = HeaderValue::from_str(&range::content_range(a, b, total)) {
        headers.insert(header::CONTENT_RANGE, v);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
    answer::set(&mut headers, CACHE_STATUS.clone(), status);
    let bytes = extent.body.slice((a - lo) as usize..=(b - lo) as usize);
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::full(bytes)
    });
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    *resp.headers_mut() = headers;
    resp
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

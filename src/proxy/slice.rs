//! The `slice` stage: objects under a rule with `slice = "4MiB"` are fetched from the origin
//! in slices with `Range` requests, as nginx's slice module does. Each slice is an entry of
//! its own (keyed `URL#slice=N`, see `Store::slice_path`), fetched once however many clients
//! want it (collapsed per slice through the fills map), and a client's range, or the whole
//! object, is sent by joining the slices it touches as they arrive: a client seeking into a
//! 2 GiB video costs the origin the slices it reads, not the file from byte zero.
//!
//! The slices of one object share its validators: every slice sent in one response must
//! carry the `ETag` and `Last-Modified` of the first. A stored slice that differs is fetched
//! again; if the origin's copy differs too, the object changed under us: every slice of the
//! URL is purged and the response is cut (its head, with the old length, has gone already),
//! and the next request starts over from the new version. A purge by URL reaches every
//! slice (`Store::note_slice`); by prefix, tag or all, slices are entries like any other.

use super::*;
use tokio::sync::mpsc;

/// Where one slice came from.
enum Got {
    /// The slice, stored or fetched: `how` it was had, for `Cache-Status` and the log.
    Slice { entry: Arc<Entry>, how: How },
    /// The origin answered the slice's request with something else (a 200 with the whole
    /// object: it does not do ranges; an error status; 416): passed to the client as it came.
    Other(Response<Incoming>, Outcome_),
}

enum How {
    Hit,
    Collapsed,
    Fetched(Outcome_),
}

/// What every slice fetch of one request needs.
struct Ctx {
    site: usize,
    rule: usize,
    size: u64,
    https: bool,
    host: String,
    /// The path and query as keyed.
    pq: String,
    /// The site's extra key material (headers and cookies it keys on).
    extra: Option<Box<str>>,
    /// The URL's own key hash (what `Store::note_slice` files slices under).
    url_hash: u64,
    host_value: HeaderValue,
    conn: ConnInfo,
    /// The client's request head.
    parts: RequestParts,
}

/// The validators every slice of one response must share.
#[derive(PartialEq, Eq)]
struct Validators(Option<HeaderValue>, Option<HeaderValue>);

impl Validators {
    fn of(headers: &HeaderMap) -> Validators {
        Validators(
            headers.get(header::ETAG).cloned(),
            headers.get(header::LAST_MODIFIED).cloned(),
        )
    }
}

impl Proxy {
    /// Answers a GET or HEAD under a slicing rule from the slices its range touches.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn sliced(
        self: Arc<Self>,
        parts: RequestParts,
        conn: ConnInfo,
        site: usize,
        rule: usize,
        size: u64,
        host: String,
        pq: String,
    ) -> Answer {
        let s = &self.config.sites[site];
        let extra = key_extra(&parts.headers, &s.cache.key_headers, &s.cache.key_cookies);
        let url_hash = self.store.hash(&KeyParts {
            https: conn.https,
            host: &host,
            path_and_query: &pq,
        });
        let ctx = Arc::new(Ctx {
            site,
            rule,
            size,
            https: conn.https,
            host_value: host_value(&host),
            host,
            pq,
            extra,
            url_hash,
            conn,
            parts,
        });
        match self.first_slice(&ctx).await {
            Ok((first, index, how)) => self.answer_slices(ctx, first, index, how),
            Err(answer) => answer,
        }
    }

    /// The slice a request needs first, with its index and how it was had; or the answer
    /// when there is no slice to start from (the origin's own, or an error).
    async fn first_slice(&self, ctx: &Ctx) -> Result<(Arc<Entry>, u32, How), Answer> {
        let client = &ctx.parts.headers;
        let head = ctx.parts.method == Method::HEAD;
        let size = ctx.size;
        // Where the client's range starts, if it says before the length is known: the slice
        // fetched first is the one it needs first (a suffix range needs the length: slice 0).
        let start = client
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(first_position)
            .unwrap_or(0);
        let mut first_index = u32::try_from(start / size).unwrap_or(u32::MAX);
        let mut got = self.slice(ctx, first_index, false).await;
        if first_index > 0 && matches!(got, Ok(Got::Other(..))) {
            // The range starts past the end (or the origin would not cut there): slice 0
            // says what the object is, and the client's range is judged against it.
            first_index = 0;
            got = self.slice(ctx, 0, false).await;
        }
        match got {
            Ok(Got::Slice { entry, how }) => Ok((entry, first_index, how)),
            Ok(Got::Other(resp, outcome)) => {
                // An empty object has no byte 0 to cut: the origin's 416 `bytes */0` means
                // an empty 200 for a client that did not ask for a range.
                let empty = resp.status() == StatusCode::RANGE_NOT_SATISFIABLE
                    && resp
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .is_some_and(|v| v.as_bytes() == b"bytes */0");
                if empty && !client.contains_key(header::RANGE) {
                    let mut r = Response::new(Body::empty());
                    r.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                    let status = self.cache_status("fwd=uri-miss; detail=not-sliced");
                    r.headers_mut().insert(CACHE_STATUS.clone(), status);
                    return Err((r, outcome));
                }
                let (rparts, rbody) = resp.into_parts();
                let detail = "fwd=uri-miss; detail=not-sliced";
                Err((self.passed_on(rparts, rbody, head, detail), outcome))
            }
            Err(e) => Err((respond::error(e), Outcome_::local(CacheResult::Error))),
        }
    }

    /// The answer from the slices after `first` (slice `first_index`): the head from its
    /// fields and length, preconditions and the client's range judged against them, and a
    /// task sending the slices' bytes as the body.
    fn answer_slices(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        first: Arc<Entry>,
        first_index: u32,
        how: How,
    ) -> Answer {
        let client = &ctx.parts.headers;
        let head = ctx.parts.method == Method::HEAD;
        let Some(total) = content_range_total(&first.headers) else {
            return (
                respond::error(ProxyError::OriginFailed),
                Outcome_::local(CacheResult::Error),
            );
        };
        let (status, outcome) = match how {
            How::Hit => (self.hit.clone(), Outcome_::local(CacheResult::Hit)),
            How::Collapsed => (
                self.miss_status("fwd=uri-miss", true),
                Outcome_::local(CacheResult::Collapsed),
            ),
            How::Fetched(o) => (self.miss_status("fwd=uri-miss", false), o),
        };
        let status = answer::chain_status(first.upstream_status.as_ref(), status);
        let now = SystemTime::now();
        let age = headers::age_value(first.age(now).as_secs());
        let mut stored = first.headers.clone();
        stored.remove(header::CONTENT_RANGE);
        let mut range = client.get(header::RANGE).and_then(|v| v.to_str().ok());
        match policy::evaluate_preconditions(client, &stored) {
            Precondition::NotModified => {
                return (answer::not_modified(&stored, age, status), outcome)
            }
            Precondition::Failed => {
                let mut r = respond::error(ProxyError::PreconditionFailed);
                r.headers_mut().insert(CACHE_STATUS.clone(), status);
                return (r, outcome);
            }
            Precondition::IgnoreRange => range = None,
            Precondition::Proceed => {}
        }
        let (code, lo, hi) = match range.map(|r| range::parse(r, total)) {
            Some(range::Ranges::Unsatisfiable) => {
                let mut resp = respond::error(ProxyError::RangeNotSatisfiable);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                resp.headers_mut().insert(CACHE_STATUS.clone(), status);
                return (resp, outcome);
            }
            // One range: 206. Several are answered whole (a server may ignore Range).
            Some(range::Ranges::Satisfiable(r)) if r.len() == 1 => {
                (StatusCode::PARTIAL_CONTENT, r[0].0, r[0].1)
            }
            _ => (StatusCode::OK, 0, total.saturating_sub(1)),
        };
        let length = if total == 0 { 0 } else { hi - lo + 1 };
        let mut headers = stored;
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if code == StatusCode::PARTIAL_CONTENT {
            if let Ok(v) = HeaderValue::from_str(&range::content_range(lo, hi, total)) {
                headers.insert(header::CONTENT_RANGE, v);
            }
        }
        answer::set(&mut headers, header::AGE, age);
        answer::set(&mut headers, CACHE_STATUS.clone(), status);
        let body = if head || length == 0 {
            Body::empty()
        } else {
            let (tx, rx) = mpsc::channel(2);
            let this = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                this.send_slices(&ctx, first, first_index, (lo, hi, total), tx)
                    .await;
            });
            Body::channel(rx, length)
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        (resp, outcome)
    }

    /// Sends bytes `lo..=hi` of an object of `total` bytes, slice by slice, on `tx`, every
    /// slice checked against the validators of `first` (slice `first_index`). Stops when the
    /// client goes; ends the body with an error when a slice cannot be had or the object
    /// changed.
    async fn send_slices(
        &self,
        ctx: &Ctx,
        first: Arc<Entry>,
        first_index: u32,
        (lo, hi, total): (u64, u64, u64),
        tx: mpsc::Sender<Result<Bytes, body::BoxError>>,
    ) {
        let size = ctx.size;
        let want = Validators::of(&first.headers);
        let (from, to) = (lo / size, hi / size);
        for index in from..=to {
            let Ok(index) = u32::try_from(index) else {
                let _ = tx.send(Err("object too large to slice".into())).await;
                return;
            };
            let entry = if index == first_index {
                first.clone()
            } else {
                match self.slice_matching(ctx, index, &want).await {
                    Ok(e) => e,
                    Err(why) => {
                        tracing::warn!(url = %format!("{}{}", ctx.host, ctx.pq), slice = index, %why, "slice unavailable: response cut");
                        let _ = tx.send(Err(why.into())).await;
                        return;
                    }
                }
            };
            let start = u64::from(index) * size;
            let expected = size.min(total.saturating_sub(start));
            if entry.body.len() as u64 != expected
                || content_range_total(&entry.headers) != Some(total)
            {
                tracing::warn!(url = %format!("{}{}", ctx.host, ctx.pq), slice = index, "slice of another length: response cut, slices purged");
                self.purge_slices(ctx);
                let _ = tx.send(Err("slice length changed".into())).await;
                return;
            }
            let a = lo.max(start) - start;
            let b = hi.min(start + expected - 1) - start;
            let chunk = entry.body.slice(a as usize..=b as usize);
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    }

    /// Slice `index`, with the validators `want`: as stored, else fetched again; when the
    /// origin's copy differs too, the object has changed: every slice is purged.
    async fn slice_matching(
        &self,
        ctx: &Ctx,
        index: u32,
        want: &Validators,
    ) -> Result<Arc<Entry>, &'static str> {
        for force in [false, true] {
            match self.slice(ctx, index, force).await {
                Ok(Got::Slice { entry, .. }) if Validators::of(&entry.headers) == *want => {
                    return Ok(entry)
                }
                Ok(Got::Slice { .. }) => continue,
                Ok(Got::Other(..)) => return Err("the origin did not answer the slice's range"),
                Err(_) => return Err("the slice's fetch failed"),
            }
        }
        self.purge_slices(ctx);
        Err("the object changed between slices")
    }

    /// Removes every stored slice of the URL (the object changed under them).
    fn purge_slices(&self, ctx: &Ctx) {
        self.store.purge(
            &PurgeTarget::Url {
                host: &ctx.host,
                path_and_query: &ctx.pq,
            },
            false,
        );
    }

    /// Slice `index`: from the store when fresh (unless `force`), else fetched, collapsed
    /// with every other request for it.
    async fn slice(&self, ctx: &Ctx, index: u32, force: bool) -> Result<Got, ProxyError> {
        let path = Store::slice_path(&ctx.pq, index);
        let parts = KeyParts {
            https: ctx.https,
            host: &ctx.host,
            path_and_query: &path,
        };
        let hash = self.store.hash(&parts);
        let client = &ctx.parts.headers;
        let extra = ctx.extra.as_deref();
        // Personal requests fetch alone, as in `collapse`.
        let solo = client.contains_key(header::AUTHORIZATION);
        if !solo {
            for _ in 0..3 {
                if !force {
                    if let Some(e) = self.store.get(hash, &parts, extra, client) {
                        if e.is_fresh(SystemTime::now()) {
                            return Ok(Got::Slice {
                                entry: e,
                                how: How::Hit,
                            });
                        }
                    }
                }
                let (fill, leader) = self.fills.join(hash);
                if leader {
                    return self.fetch_slice(ctx, index, &parts, hash, fill, true).await;
                }
                match fill.wait(false).await.0 {
                    // The leader's slice is for the leader's variant: only a match is ours.
                    Outcome::Ready(e) if e.vary.matches(client, extra) => {
                        return Ok(Got::Slice {
                            entry: e,
                            how: How::Collapsed,
                        })
                    }
                    Outcome::Failed(e) => return Err(e),
                    _ => continue,
                }
            }
        }
        let fill = Arc::new(Fill::default());
        self.fetch_slice(ctx, index, &parts, hash, fill, false)
            .await
    }

    /// The origin request for slice `index` (its byte range, the client's fields without
    /// conditionals, range and `Accept-Encoding`: slices are byte ranges of one
    /// representation), read whole, stored when the policy allows, and published on `fill`.
    async fn fetch_slice(
        &self,
        ctx: &Ctx,
        index: u32,
        parts: &KeyParts<'_>,
        hash: u64,
        fill: Arc<Fill>,
        registered: bool,
    ) -> Result<Got, ProxyError> {
        let mut guard = SliceGuard {
            proxy: self,
            hash,
            fill,
            registered,
            armed: true,
        };
        let from = u64::from(index) * ctx.size;
        let to = from + ctx.size - 1;
        let client = &ctx.parts.headers;
        let (conn, host, version) = (ctx.conn, &ctx.host_value, ctx.parts.version);
        let Some(mut up) = self.range_request(client, (from, to), &ctx.pq, conn, host, version)
        else {
            return guard.fail(ProxyError::InvalidTarget);
        };
        up.headers.remove(header::ACCEPT_ENCODING);
        let candidates = self.candidates(ctx.site, ctx.conn, client);
        let request_time = SystemTime::now();
        let Some(Sent {
            origin,
            ms,
            result,
            route,
        }) = self.send(candidates, up).await
        else {
            return guard.fail(ProxyError::InvalidTarget);
        };
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                let name = &self.origins[origin].config.name;
                tracing::warn!(origin = %name, error = %ErrorChain(&e), "origin request failed");
                return guard.fail(ProxyError::from(&e));
            }
        };
        let response_time = SystemTime::now();
        let (mut rparts, mut body) = resp.into_parts();
        self.relay_head(&mut rparts);
        let outcome = Outcome_::origin(CacheResult::Miss, origin, ms, route);
        let range = content_range(&rparts.headers);
        if rparts.status != StatusCode::PARTIAL_CONTENT || range.is_none_or(|(a, _, _)| a != from) {
            guard.publish(Outcome::Uncacheable);
            return Ok(Got::Other(Response::from_parts(rparts, body), outcome));
        }
        let expected = range.map_or(0, |(a, b, _)| b - a + 1);
        if expected > ctx.size {
            return guard.fail(ProxyError::OriginFailed);
        }
        let timeout = self.origins[origin].config.timeout;
        let buf = read_exactly(&mut body, expected, timeout).await;
        let Some(buf) = buf else {
            return guard.fail(ProxyError::OriginCutOff);
        };
        let times = (request_time, response_time);
        let (entry, stored) = self.slice_entry(ctx, parts, rparts.headers, buf, times);
        let entry = if stored {
            self.store.note_slice(ctx.url_hash, index);
            let e = self.store.insert_shared(hash, entry);
            guard.publish(Outcome::Ready(e.clone()));
            e
        } else {
            // Not stored, so not shared: followers fetch for themselves.
            guard.publish(Outcome::Uncacheable);
            Arc::new(entry)
        };
        Ok(Got::Slice {
            entry,
            how: How::Fetched(outcome),
        })
    }
}

impl Proxy {
    /// The entry for a slice that arrived with `headers` and `body` (keyed by `parts`),
    /// judged as the object it is part of would be, and whether it may be stored. A slice
    /// is bytes of an object, shared by whoever reads them: never given a cookie.
    fn slice_entry(
        &self,
        ctx: &Ctx,
        parts: &KeyParts<'_>,
        headers: HeaderMap,
        body: Bytes,
        (request_time, response_time): (SystemTime, SystemTime),
    ) -> (Entry, bool) {
        let client = &ctx.parts.headers;
        let settings = self.config.sites[ctx.site].settings(Some(ctx.rule));
        let decision = self.judged_as_get(client, &headers, settings, response_time);
        let strip = decision
            .as_ref()
            .map(|d| d.strip.clone())
            .unwrap_or_default();
        let (headers, tags) = self.shared_copy(headers, &strip);
        let vary = VaryKey::from_response(&headers, client).with_extra(ctx.extra.clone());
        let initial_age = policy::corrected_initial_age(&headers, request_time, response_time);
        let stored = decision.is_ok();
        let entry = Entry::new(
            OwnedKey::new(parts),
            vary,
            StatusCode::PARTIAL_CONTENT,
            headers,
            body,
            response_time,
            initial_age,
            decision.unwrap_or_else(|_| StoreDecision::fresh_for(Duration::ZERO)),
            tags,
        );
        (entry, stored)
    }
}

/// Publishes `Retry` for the followers of a slice fill if its leader goes away first.
struct SliceGuard<'a> {
    proxy: &'a Proxy,
    hash: u64,
    fill: Arc<Fill>,
    registered: bool,
    armed: bool,
}

impl SliceGuard<'_> {
    fn publish(&mut self, outcome: Outcome) {
        self.fill.publish(outcome);
        self.armed = false;
        if self.registered {
            self.proxy.fills.remove(self.hash, &self.fill);
        }
    }

    fn fail(&mut self, error: ProxyError) -> Result<Got, ProxyError> {
        self.publish(Outcome::Failed(error));
        Err(error)
    }
}

impl Drop for SliceGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.publish(Outcome::Retry);
        }
    }
}

/// The first byte position of a `Range` value that names one (`bytes=N-` or `bytes=N-M`);
/// `None` for a suffix range or anything else.
fn first_position(value: &str) -> Option<u64> {
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let first = set.split(',').next()?.trim();
    let (a, _) = first.split_once('-')?;
    a.trim().parse().ok()
}

/// A `Content-Range: bytes A-B/TOTAL` value, as `(A, B, TOTAL)`.
pub(super) fn content_range(headers: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, total) = (
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (a <= b && b < total).then_some((a, b, total))
}

/// The whole object's length from a slice's `Content-Range`.
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    content_range(headers).map(|(_, _, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_starts_and_content_ranges() {
        assert_eq!(first_position("bytes=100-199"), Some(100));
        assert_eq!(first_position("bytes=5000-"), Some(5000));
        assert_eq!(first_position("Bytes = 7-9, 20-30"), Some(7));
        assert_eq!(first_position("bytes=-500"), None);
        assert_eq!(first_position("items=1-2"), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 0-99/1000"),
        );
        assert_eq!(content_range(&h), Some((0, 99, 1000)));
        assert_eq!(content_range_total(&h), Some(1000));
        for bad in ["bytes 5-4/10", "bytes 0-10/10", "bytes */10", "0-9/10"] {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(bad));
            assert_eq!(content_range(&h), None, "{bad}");
        }
    }
}

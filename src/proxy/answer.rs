//! The `answer` stage: a response made from a stored entry (preconditions, ranges, `Age`,
//! `Cache-Status` on prepared headers) or from a fill still arriving.

use super::*;
use crate::compress::{self, Coding};

impl Proxy {
    /// Answers from a stored response: the form for the client's `Accept-Encoding`
    /// (`compress`), then preconditions (304/412), ranges (206/416), HEAD.
    pub(super) fn answer_from_entry(
        &self,
        entry: &Entry,
        request: &HeaderMap,
        head: bool,
        now: SystemTime,
        status: HeaderValue,
    ) -> Response<Body> {
        // An object stored as it came (most are) costs no negotiation. A range is cut from
        // the identity body only, as nginx does: one set of offsets for every client.
        if !entry.codings.is_empty() && !request.contains_key(header::RANGE) {
            if let Some(i) = compress::negotiate(request, &entry.codings) {
                let form = &entry.forms[i];
                return self.answer_with(
                    entry,
                    &form.headers,
                    &form.body,
                    request,
                    head,
                    now,
                    status,
                );
            }
        }
        if let Some(coding) = entry.decodable {
            if !compress::accepts(request, coding) {
                return self.decoded(entry, coding, request, head, now, status);
            }
        }
        self.answer_with(
            entry,
            &entry.headers,
            &entry.body,
            request,
            head,
            now,
            status,
        )
    }

    /// [`Proxy::answer_from_entry`] for one stored form: `stored` and `body` are the
    /// entry's own or one of its encoded forms'.
    #[allow(clippy::too_many_arguments)]
    fn answer_with(
        &self,
        entry: &Entry,
        stored: &HeaderMap,
        body: &Bytes,
        request: &HeaderMap,
        head: bool,
        now: SystemTime,
        status: HeaderValue,
    ) -> Response<Body> {
        let status = chain_status(entry.upstream_status.as_ref(), status);
        let age = headers::age_value(entry.age(now).as_secs());
        let ok = entry.status == StatusCode::OK;
        match policy::evaluate_preconditions(request, stored) {
            Precondition::NotModified if ok || stored.contains_key(header::ETAG) => {
                return not_modified(stored, age, status);
            }
            Precondition::Failed => {
                let mut r = respond::error(ProxyError::PreconditionFailed);
                r.headers_mut().insert(CACHE_STATUS.clone(), status);
                return r;
            }
            Precondition::IgnoreRange => {
                return whole(entry.status, stored, body, head, age, status)
            }
            Precondition::NotModified | Precondition::Proceed => {}
        }
        if let (true, Some(r)) = (ok, request.get(header::RANGE).and_then(|v| v.to_str().ok())) {
            let len = body.len() as u64;
            match range::parse(r, len) {
                range::Ranges::Ignore => {}
                range::Ranges::Unsatisfiable => {
                    let mut resp = respond::error(ProxyError::RangeNotSatisfiable);
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        resp.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    resp.headers_mut().insert(CACHE_STATUS.clone(), status);
                    return resp;
                }
                range::Ranges::Satisfiable(ranges) => {
                    let mut headers = stored.clone();
                    headers.insert(header::AGE, age);
                    headers.insert(CACHE_STATUS.clone(), status);
                    let (body, length) = if let [(first, last)] = ranges[..] {
                        if let Ok(v) =
                            HeaderValue::from_str(&range::content_range(first, last, len))
                        {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                        let b = body.slice(first as usize..=last as usize);
                        let n = b.len() as u64;
                        (b, n)
                    } else {
                        let ct = stored
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok());
                        // HEAD gets the length a GET would, with no body built.
                        let (b, n) = if head {
                            let n = range::multipart_len(len, &ranges, ct, &self.boundary);
                            (Bytes::new(), n)
                        } else {
                            let b = range::multipart(body, &ranges, ct, &self.boundary);
                            let n = b.len() as u64;
                            (b, n)
                        };
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            "multipart/byteranges; boundary={}",
                            self.boundary
                        )) {
                            headers.insert(header::CONTENT_TYPE, v);
                        }
                        (b, n)
                    };
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                    let mut resp = Response::new(if head {
                        Body::empty()
                    } else {
                        Body::full(body)
                    });
                    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                    *resp.headers_mut() = headers;
                    return resp;
                }
            }
        }
        whole(entry.status, stored, body, head, age, status)
    }

    /// A stored body in `coding` sent decoded to a client that does not accept the coding
    /// (nginx's `gunzip`): chunked, with a weak `ETag`; preconditions as for the stored
    /// form, ranges ignored (the offsets would be the encoded body's).
    fn decoded(
        &self,
        entry: &Entry,
        coding: Coding,
        request: &HeaderMap,
        head: bool,
        now: SystemTime,
        status: HeaderValue,
    ) -> Response<Body> {
        let status = chain_status(entry.upstream_status.as_ref(), status);
        let age = headers::age_value(entry.age(now).as_secs());
        match policy::evaluate_preconditions(request, &entry.headers) {
            Precondition::NotModified => return not_modified(&entry.headers, age, status),
            Precondition::Failed => {
                let mut r = respond::error(ProxyError::PreconditionFailed);
                r.headers_mut().insert(CACHE_STATUS.clone(), status);
                return r;
            }
            Precondition::IgnoreRange | Precondition::Proceed => {}
        }
        let mut headers = entry.headers.clone();
        headers.remove(header::CONTENT_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        if let Some(etag) = headers.get(header::ETAG) {
            let weak = compress::weak_etag(etag);
            headers.insert(header::ETAG, weak);
        }
        set(&mut headers, header::AGE, age);
        set(&mut headers, CACHE_STATUS.clone(), status);
        let body = if head {
            Body::empty()
        } else {
            Body::decode(compress::Decoder::new(coding, entry.body.clone()))
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = headers;
        resp
    }

    /// The body of a response that is not stored, compressed as it streams when the site
    /// says so (`compression.stream`), the response is compressible and `client` accepts
    /// one of the site's codings; else passed as it comes. HEAD answers get the headers a
    /// GET would.
    pub(super) fn streamed(
        &self,
        site: usize,
        client: &HeaderMap,
        rparts: &mut http::response::Parts,
        rbody: Incoming,
        head: bool,
    ) -> Body {
        let c = &self.config.sites[site].compression;
        let length = rparts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        if c.stream && c.plan(rparts.status, &rparts.headers, length) == compress::Plan::Encode {
            compress::add_vary(&mut rparts.headers);
            let chosen = compress::negotiate(client, &c.encodings)
                .and_then(|i| c.encodings.get(i).copied())
                .and_then(|coding| Some((coding, compress::Encoder::new(coding, &c.levels)?)));
            if let Some((coding, encoder)) = chosen {
                let h = &mut rparts.headers;
                h.insert(header::CONTENT_ENCODING, coding.header_value());
                h.remove(header::CONTENT_LENGTH);
                h.remove(header::ACCEPT_RANGES);
                if let Some(etag) = h.get(header::ETAG) {
                    let weak = compress::weak_etag(etag);
                    h.insert(header::ETAG, weak);
                }
                return if head {
                    Body::empty()
                } else {
                    Body::encode(rbody, encoder)
                };
            }
        }
        if head {
            Body::empty()
        } else {
            Body::stream(rbody)
        }
    }

    /// Answers from a fill that is still arriving.
    pub(super) fn answer_from_fill(
        &self,
        head: &FillHead,
        reader: Option<crate::cache::fill::FillReader<ProxyError>>,
        request: &HeaderMap,
        head_only: bool,
        status: HeaderValue,
    ) -> Response<Body> {
        let status = after_upstream(&head.headers, status);
        if head.status == StatusCode::OK
            && matches!(
                policy::evaluate_preconditions(request, &head.headers),
                Precondition::NotModified
            )
        {
            return not_modified(&head.headers, HeaderValue::from_static("0"), status);
        }
        let mut headers = head.headers.clone();
        headers.insert(CACHE_STATUS.clone(), status);
        let body = match (head_only, reader) {
            (false, Some(r)) => Body::fill(r),
            _ => Body::empty(),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// The whole stored response; only `Age` and `Cache-Status` are added per hit.
fn whole(
    code: StatusCode,
    stored: &HeaderMap,
    body: &Bytes,
    head: bool,
    age: HeaderValue,
    status: HeaderValue,
) -> Response<Body> {
    let mut headers = stored.clone();
    // The stored map holds both fields already (placeholders): replacing a value in place
    // skips the capacity check and the old value's return that `insert` does.
    set(&mut headers, header::AGE, age);
    set(&mut headers, CACHE_STATUS.clone(), status);
    let body = if head {
        Body::empty()
    } else {
        Body::full(body.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    *resp.headers_mut() = headers;
    resp
}

/// A 304 built from stored headers (RFC 9110 §15.4.5).
pub(super) fn not_modified(
    stored: &HeaderMap,
    age: HeaderValue,
    status: HeaderValue,
) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let h = resp.headers_mut();
    for name in &policy::NOT_MODIFIED_FIELDS {
        for v in stored.get_all(name) {
            h.append(name.clone(), v.clone());
        }
    }
    for v in stored.get_all(header::VIA) {
        h.append(header::VIA, v.clone());
    }
    h.insert(header::AGE, age);
    h.insert(CACHE_STATUS.clone(), status);
    resp
}

/// Sets a field that a stored map holds exactly once (`Age` and `Cache-Status`, which
/// `cache::entry::prepare` puts there as placeholders); inserts it where it is missing.
pub(super) fn set(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    match headers.get_mut(&name) {
        Some(v) => *v = value,
        None => {
            headers.insert(name, value);
        }
    }
}

/// Our `Cache-Status` member after those of the caches behind us, when there are any
/// (RFC 9211 §2); our value alone, with no allocation, when there are none.
pub(super) fn chain_status(upstream: Option<&HeaderValue>, ours: HeaderValue) -> HeaderValue {
    let Some(up) = upstream else {
        return ours;
    };
    let mut v = Vec::with_capacity(up.len() + 2 + ours.len());
    v.extend_from_slice(up.as_bytes());
    v.extend_from_slice(b", ");
    v.extend_from_slice(ours.as_bytes());
    HeaderValue::from_bytes(&v).unwrap_or(ours)
}

/// Our `Cache-Status` member after those `headers` arrived with from the origin.
pub(super) fn after_upstream(headers: &HeaderMap, ours: HeaderValue) -> HeaderValue {
    chain_status(upstream_status(headers).as_ref(), ours)
}

/// Remaining freshness in seconds, negative when stale (RFC 9211 `ttl`).
pub(super) fn ttl(entry: &Entry, now: SystemTime) -> i64 {
    let lifetime = entry.lifetime().as_secs() as i64;
    lifetime - entry.age(now).as_secs() as i64
}

//! Answers that edgecache makes itself: refusals and origin failures, from one table.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::Body;
use crate::origin;

/// A short plain-text answer. `close` asks HTTP/1 clients to close the connection (used when
/// the request's framing cannot be trusted).
pub(crate) fn simple(status: StatusCode, message: &'static str, close: bool) -> Response<Body> {
    let mut resp = Response::new(Body::full(bytes::Bytes::from_static(message.as_bytes())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The answer for a failed origin request: 504 when it timed out, 503 when every origin was
/// at its connection limit, 502 otherwise.
pub(crate) fn origin_error(e: &origin::Error) -> Response<Body> {
    if e.is_timeout() {
        simple(
            StatusCode::GATEWAY_TIMEOUT,
            "edgecache: the origin did not answer in time\n",
            false,
        )
    } else if e.is_saturated() {
        simple(
            StatusCode::SERVICE_UNAVAILABLE,
            "edgecache: every origin is at its connection limit\n",
            false,
        )
    } else if e.is_connect() {
        simple(
            StatusCode::BAD_GATEWAY,
            "edgecache: the origin could not be reached\n",
            false,
        )
    } else {
        simple(
            StatusCode::BAD_GATEWAY,
            "edgecache: the origin failed to answer\n",
            false,
        )
    }
}

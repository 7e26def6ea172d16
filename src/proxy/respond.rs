//! Answers that edgecache makes itself: refusals and origin failures, from one table.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::Body;
use super::error::ProxyError;

/// A short plain-text answer. `close` asks HTTP/1 clients to close the connection (used when
/// the request's framing cannot be trusted).
fn simple(status: StatusCode, message: String, close: bool) -> Response<Body> {
    let mut resp = Response::new(Body::full(bytes::Bytes::from(message)));
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

/// The answer for a request that failed: status and `Connection: close` from the one table
/// in [`ProxyError::status`] and [`ProxyError::closes`], the message from its `Display`.
pub(crate) fn error(e: ProxyError) -> Response<Body> {
    simple(e.status(), format!("edgecache: {e}\n"), e.closes())
}

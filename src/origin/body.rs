//! The body of a request sent upstream: a prefix already read from the client (so that a
//! malformed or stalled upload is refused before any origin sees it), then the rest streamed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request body: buffered prefix, optional trailers seen while buffering, streamed rest.
pub struct UpstreamBody {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
}

impl UpstreamBody {
    /// No body.
    pub fn empty() -> UpstreamBody {
        UpstreamBody {
            prefix: None,
            trailers: None,
            rest: None,
        }
    }

    /// `prefix` first, then `trailers` if the client's body already ended with them, then
    /// whatever `rest` still holds.
    pub fn new(prefix: Bytes, trailers: Option<HeaderMap>, rest: Option<Incoming>) -> UpstreamBody {
        UpstreamBody {
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers,
            rest,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let p = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(p),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    out.set_upper(u + p);
                }
                out
            }
        }
    }
}

//! The response body sent to clients: a stored `Bytes` (hits, generated answers), an origin
//! stream passed through, or a reader of an in-flight fill shared with other clients. It also
//! carries the access-log record, written when the body is finished or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::error::ProxyError;
use crate::telemetry::AccessLog;

type FillReader = crate::cache::fill::FillReader<ProxyError>;

/// Errors a response body can end with (the client then sees a cut connection or stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Kind {
    Full(Option<Bytes>),
    Stream(Incoming),
    Fill(FillReader),
}

/// The body type of every response edgecache sends.
pub struct Body {
    kind: Kind,
    sent: u64,
    log: Option<Box<AccessLog>>,
}

impl Body {
    pub(crate) fn full(bytes: Bytes) -> Body {
        Body::with(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub(crate) fn empty() -> Body {
        Body::with(Kind::Full(None))
    }

    pub(crate) fn stream(inner: Incoming) -> Body {
        Body::with(Kind::Stream(inner))
    }

    pub(crate) fn fill(reader: FillReader) -> Body {
        Body::with(Kind::Fill(reader))
    }

    fn with(kind: Kind) -> Body {
        Body {
            kind,
            sent: 0,
            log: None,
        }
    }

    pub(crate) fn set_log(&mut self, log: Option<Box<AccessLog>>) {
        self.log = log;
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Kind::Fill(reader) => Pin::new(reader)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.sent += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(log) = &mut this.log {
                    log.aborted = true;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream(inner) => inner.is_end_stream(),
            Kind::Fill(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(inner) => inner.size_hint(),
            Kind::Fill(reader) => reader.size_hint(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            let complete = self.is_end_stream();
            log.emit(self.sent, complete);
        }
    }
}

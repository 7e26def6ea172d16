//! The response body sent to clients: a stored `Bytes` (hits, generated answers), an origin
//! stream passed through, or a reader of an in-flight fill shared with other clients. It also
//! carries the access-log record, written when the body is finished or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::error::ProxyError;
use crate::compress::{Decoder, Encoder};
use crate::telemetry::AccessLog;

type FillReader = crate::cache::fill::FillReader<ProxyError>;

/// Errors a response body can end with (the client then sees a cut connection or stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Kind {
    Full(Option<Bytes>),
    Stream(Incoming),
    Fill(FillReader),
    /// A stored body sent decoded (`None` once ended).
    Decode(Option<Decoder>),
    /// Bytes sent by a task (a sliced object, `proxy::slice`), `remaining` of them still to
    /// come; `true` once ended.
    Channel(
        tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
        u64,
        bool,
    ),
    /// An origin stream compressed as it passes (`None` once the encoder is finished); the
    /// encoder boxed, so that every response's body stays as small as before.
    Encode(Incoming, Option<Box<Encoder>>),
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

    pub(crate) fn channel(
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
        length: u64,
    ) -> Body {
        Body::with(Kind::Channel(rx, length, false))
    }

    pub(crate) fn decode(decoder: Decoder) -> Body {
        Body::with(Kind::Decode(Some(decoder)))
    }

    pub(crate) fn encode(inner: Incoming, encoder: Encoder) -> Body {
        Body::with(Kind::Encode(inner, Some(Box::new(encoder))))
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
            Kind::Decode(decoder) => Poll::Ready(decoded(decoder)),
            Kind::Channel(rx, remaining, ended) => match rx.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    *remaining = remaining.saturating_sub(data.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Poll::Ready(Some(Err(e))) => {
                    *ended = true;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    *ended = true;
                    if *remaining > 0 {
                        // The sender went without saying why: the body is short.
                        Poll::Ready(Some(Err("body ended early".into())))
                    } else {
                        Poll::Ready(None)
                    }
                }
            },
            Kind::Encode(inner, encoder) => encoded(inner, encoder, cx),
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
            Kind::Decode(decoder) => decoder.is_none(),
            Kind::Channel(_, remaining, ended) => *ended || *remaining == 0,
            Kind::Encode(_, encoder) => encoder.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(inner) => inner.size_hint(),
            Kind::Fill(reader) => reader.size_hint(),
            Kind::Channel(_, remaining, _) => SizeHint::with_exact(*remaining),
            Kind::Decode(_) | Kind::Encode(..) => SizeHint::default(),
        }
    }
}

/// The next decoded chunk (a bounded amount of work, done in the poll: at most 32 KiB out).
fn decoded(decoder: &mut Option<Decoder>) -> Option<Result<Frame<Bytes>, BoxError>> {
    let d = decoder.as_mut()?;
    match d.next_chunk() {
        Ok(Some(chunk)) => Some(Ok(Frame::data(chunk))),
        Ok(None) => {
            *decoder = None;
            None
        }
        Err(e) => {
            *decoder = None;
            Some(Err(BoxError::from(e)))
        }
    }
}

/// The origin's next chunk, compressed; the encoder's last bytes at the end. Trailers are
/// dropped (they would describe the identity bytes).
fn encoded(
    inner: &mut Incoming,
    encoder: &mut Option<Box<Encoder>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    loop {
        let Some(enc) = encoder.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Err(e))) => {
                *encoder = None;
                return Poll::Ready(Some(Err(BoxError::from(e))));
            }
            Poll::Ready(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                match enc.push(&data) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                    Err(e) => {
                        *encoder = None;
                        return Poll::Ready(Some(Err(BoxError::from(e))));
                    }
                }
            }
            Poll::Ready(None) => {
                let Some(enc) = encoder.take() else {
                    return Poll::Ready(None);
                };
                return Poll::Ready(match enc.finish() {
                    Ok(out) => Some(Ok(Frame::data(out))),
                    Err(e) => Some(Err(BoxError::from(e))),
                });
            }
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

//! The response body sent to clients: a stored `Bytes` (hits, generated answers) or the
//! origin's stream, optionally copied into the cache as it passes (stream-while-caching).
//! It also carries the access-log record, written when the body is finished or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::cache::{Entry, OwnedKey, Store, VaryKey};
use crate::telemetry::AccessLog;

/// What the store needs, besides the body, to keep a response once it has fully arrived.
pub(crate) struct PendingEntry {
    pub(crate) store: Store,
    pub(crate) hash: u64,
    pub(crate) key: OwnedKey,
    pub(crate) vary: VaryKey,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) response_time: SystemTime,
    pub(crate) initial_age: std::time::Duration,
    pub(crate) lifetime: std::time::Duration,
    /// `cache.max_object_size`: past this many bytes the copy is abandoned.
    pub(crate) limit: u64,
}

struct Tee {
    pending: PendingEntry,
    chunks: Vec<Bytes>,
    len: u64,
}

impl Tee {
    fn push(&mut self, data: &Bytes) -> bool {
        self.len += data.len() as u64;
        if self.len > self.pending.limit {
            return false;
        }
        self.chunks.push(data.clone());
        true
    }

    fn finish(self: Box<Self>) {
        let this = *self;
        let body = match this.chunks.len() {
            0 => Bytes::new(),
            1 => this.chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut buf = BytesMut::with_capacity(this.len as usize);
                for c in &this.chunks {
                    buf.extend_from_slice(c);
                }
                buf.freeze()
            }
        };
        let mut p = this.pending;
        // The stored object's length is known now, whatever framing the origin used.
        p.headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(body.len()),
        );
        p.store.insert(
            p.hash,
            Entry {
                key: p.key,
                vary: p.vary,
                status: p.status,
                headers: p.headers,
                body,
                response_time: p.response_time,
                initial_age: p.initial_age,
                lifetime: p.lifetime,
            },
        );
    }
}

enum Kind {
    Full(Option<Bytes>),
    Stream {
        inner: Incoming,
        tee: Option<Box<Tee>>,
    },
}

/// The body type of every response edgecache sends.
pub struct Body {
    kind: Kind,
    sent: u64,
    log: Option<Box<AccessLog>>,
}

impl Body {
    pub(crate) fn full(bytes: Bytes) -> Body {
        Body {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            sent: 0,
            log: None,
        }
    }

    pub(crate) fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
            sent: 0,
            log: None,
        }
    }

    pub(crate) fn stream(inner: Incoming, pending: Option<PendingEntry>) -> Body {
        let tee = pending.map(|pending| {
            Box::new(Tee {
                pending,
                chunks: Vec::new(),
                len: 0,
            })
        });
        let mut body = Body {
            kind: Kind::Stream { inner, tee },
            sent: 0,
            log: None,
        };
        body.finish_if_complete();
        body
    }

    pub(crate) fn set_log(&mut self, log: Option<Box<AccessLog>>) {
        self.log = log;
    }

    /// Stores the copied body once the origin's stream has ended cleanly.
    fn finish_if_complete(&mut self) {
        if let Kind::Stream { inner, tee } = &mut self.kind {
            if inner.is_end_stream() {
                if let Some(t) = tee.take() {
                    t.finish();
                }
            }
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(data) => {
                let frame = data.take().map(|d| {
                    this.sent += d.len() as u64;
                    Ok(Frame::data(d))
                });
                Poll::Ready(frame)
            }
            Kind::Stream { inner, tee } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            this.sent += data.len() as u64;
                            if let Some(t) = tee {
                                if !t.push(data) {
                                    *tee = None;
                                }
                            }
                        }
                        this.finish_if_complete();
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(None) => {
                        if let Some(t) = tee.take() {
                            t.finish();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // An aborted transfer is never stored.
                        *tee = None;
                        if let Some(log) = &mut this.log {
                            log.aborted = true;
                        }
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            let complete = match &self.kind {
                Kind::Full(d) => d.is_none(),
                Kind::Stream { inner, .. } => inner.is_end_stream(),
            };
            log.emit(self.sent, complete);
        }
    }
}

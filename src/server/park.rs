//! Idle HTTP/1 keep-alive connections give their buffers back.
//!
//! hyper's HTTP/1 connection holds an 8 KiB read buffer and an 8 KiB buffer for response
//! heads for as long as the connection is open, kept-alive and idle included; with the
//! connection's own state that made an idle browser connection cost about 44 KiB (nginx: half
//! a KiB, as it frees its buffers once a kept-alive connection has nothing to read). Here a
//! connection that has been waiting for its next request for a tick of its guard (at most a
//! second, `drain`) is *parked*: hyper's connection is closed without touching the socket
//! (`graceful_shutdown` on an idle connection, polled with `poll_without_shutdown`), its
//! parts are taken back (`into_parts`: the stream, anything hyper had read and not parsed,
//! and the service), and the task waits for the socket to become readable holding only those.
//! The next request starts a new hyper connection on the same stream.
//!
//! A connection is parked only when nothing can be lost: its last response is done and was
//! flushed to the socket, no byte was read since, hyper's last read found nothing to read,
//! and its last request had no body (hyper might still be reading one). Bytes hyper read
//! ahead (a pipelined head) come back in the parts and are served first ([`Parkable`]'s
//! prefix). Busy connections are not parked: the tick finds them mid-request, and one park per
//! tick costs a new hyper connection per second at most.
//!
//! This is written here because hyper offers no way to release its buffers between requests,
//! and no crate wraps hyper's connection this way.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::plain::Plain;
use super::tracked::{Activity, Tracked};

/// A stream whose socket can be waited on for readability without reading from it.
pub(super) trait Readiness {
    /// Ready when the socket has bytes (or an end, or an error) to read.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Readiness for Tracked<Plain> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().tcp().poll_read_ready(cx)
    }
}

/// Under TLS the socket's readiness is the one to wait for: a connection is parked only after
/// a read found nothing, and tokio-rustls returns that only once rustls holds no plaintext
/// and the socket had nothing more to read.
impl Readiness for tokio_rustls::server::TlsStream<Tracked<TcpStream>> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.get_ref().poll_read_ready(cx)
    }
}

impl<T: Readiness> Readiness for Box<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// The stream hyper's HTTP/1 connection reads and writes, as the connection's [`Activity`]
/// needs it to judge when the connection may be parked (`Activity::parkable`), with the bytes
/// a parked hyper connection had read and not parsed served first.
pub(super) struct Parkable<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Read by an earlier hyper connection on this stream and not parsed by it.
    prefix: Bytes,
}

impl<S> Parkable<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Parkable {
            inner,
            activity,
            prefix: Bytes::new(),
        }
    }

    /// What a parked connection had read and not parsed: served before the stream's bytes.
    /// hyper hands it back as a view of its whole read buffer, so it is copied out (or, as
    /// is usual, dropped empty) to let that buffer go.
    pub(super) fn set_prefix(&mut self, prefix: Bytes) {
        self.prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&prefix)
        };
    }

    pub(super) fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl<S: Readiness> Parkable<S> {
    /// Waits until the socket has something to read.
    pub(super) async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.inner.poll_read_ready(cx)).await
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Parkable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.activity.note_read(true);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &res {
            Poll::Pending => this.activity.note_read_blocked(),
            Poll::Ready(Ok(())) => this.activity.note_read(buf.filled().len() > before),
            Poll::Ready(Err(_)) => this.activity.note_read(false),
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Parkable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.note_written();
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.note_written();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(res, Poll::Ready(Ok(()))) {
            // hyper flushes the stream only once its own write buffer is empty.
            self.activity.note_flushed();
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The stream as hyper holds it.
pub(super) type H1Io<S> = TokioIo<Parkable<S>>;

/// A stream an HTTP/1 connection that parks is served over.
pub(super) trait H1Stream:
    Readiness + AsyncRead + AsyncWrite + Unpin + Send + 'static
{
}

impl<T: Readiness + AsyncRead + AsyncWrite + Unpin + Send + 'static> H1Stream for T {}

/// A service an HTTP/1 connection that parks is served with: what hyper's connection needs,
/// and `Unpin` besides for `poll_without_shutdown`.
pub(super) trait H1Service:
    hyper::service::HttpService<
        hyper::body::Incoming,
        ResBody = Self::Body,
        Error = Infallible,
        Future: Unpin + Send + 'static,
    > + Unpin
    + Send
    + 'static
{
    type Body: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> H1Service for S
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B, Error = Infallible>
        + Unpin
        + Send
        + 'static,
    S::Future: Unpin + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Body = B;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A hyper HTTP/1 connection that can be parked: polled without hyper's shutdown of the
/// stream, so that once [`H1Conn::park`] has closed it, its parts can be taken back
/// ([`H1Conn::take_parked`]). A connection that ends otherwise (the client closed it, asked for
/// `Connection: close`, or a drain) has its stream shut down here, as hyper would have.
pub(super) struct H1Conn<S: H1Stream, Svc: H1Service> {
    state: H1State<S, Svc>,
    parking: bool,
}

enum H1State<S: H1Stream, Svc: H1Service> {
    /// Boxed, so that a parked connection's task holds none of hyper's connection state.
    Serving(Box<http1::Connection<H1Io<S>, Svc>>),
    /// The connection ended: its stream is being shut down.
    ShuttingDown(H1Io<S>),
    /// Parked: what a new connection resumes from.
    Parked(http1::Parts<H1Io<S>, Svc>),
    Done,
}

impl<S: H1Stream, Svc: H1Service> H1Conn<S, Svc> {
    pub(super) fn new(conn: http1::Connection<H1Io<S>, Svc>) -> Self {
        H1Conn {
            state: H1State::Serving(Box::new(conn)),
            parking: false,
        }
    }

    /// Closes hyper's connection, which is idle, leaving the stream open.
    pub(super) fn park(&mut self) {
        if let H1State::Serving(conn) = &mut self.state {
            self.parking = true;
            Pin::new(&mut **conn).graceful_shutdown();
        }
    }

    /// Asks hyper to finish the request in flight, if any, and close.
    pub(super) fn graceful_shutdown(&mut self) {
        self.parking = false;
        if let H1State::Serving(conn) = &mut self.state {
            Pin::new(&mut **conn).graceful_shutdown();
        }
    }

    /// The parts of a connection that was parked, once it ended.
    pub(super) fn take_parked(&mut self) -> Option<http1::Parts<H1Io<S>, Svc>> {
        match std::mem::replace(&mut self.state, H1State::Done) {
            H1State::Parked(parts) => Some(parts),
            other => {
                self.state = other;
                None
            }
        }
    }
}

impl<S: H1Stream, Svc: H1Service> Future for H1Conn<S, Svc> {
    type Output = Result<(), hyper::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                H1State::Serving(conn) => {
                    if let Err(e) = std::task::ready!(conn.poll_without_shutdown(cx)) {
                        this.state = H1State::Done;
                        return Poll::Ready(Err(e));
                    }
                    let H1State::Serving(conn) = std::mem::replace(&mut this.state, H1State::Done)
                    else {
                        unreachable!("matched above");
                    };
                    let parts = conn.into_parts();
                    this.state = if this.parking {
                        H1State::Parked(parts)
                    } else {
                        H1State::ShuttingDown(parts.io)
                    };
                }
                H1State::ShuttingDown(io) => {
                    // As hyper's own connection ends: a FIN (or TLS close_notify) after the
                    // last response; an error here changes nothing for the client.
                    let _ = std::task::ready!(Pin::new(io.inner_mut()).poll_shutdown(cx));
                    this.state = H1State::Done;
                    return Poll::Ready(Ok(()));
                }
                H1State::Parked(_) | H1State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

//! Per-origin connection limits (`max_connections`, like nginx's `max_conns`).
//!
//! The connector takes a semaphore permit before it opens a connection, and the connection
//! holds the permit until it is closed, idle ones in the pool included. When every permit is
//! taken, a new connection waits up to the origin's connect timeout: meanwhile hyper's pool
//! hands the request any connection that comes back idle, and past the wait the request fails
//! as [`Saturated`] and the proxy tries the next origin. hyper-util's pool has no such bound
//! itself (only one on idle connections), hence this small wrapper.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every connection the origin may have is open and busy.
#[derive(Debug, thiserror::Error)]
#[error("all {limit} connections to the origin are busy")]
pub struct Saturated {
    pub limit: usize,
}

/// A connector that opens at most `limit` connections at once.
#[derive(Clone)]
pub struct Limited<C> {
    inner: C,
    permits: Option<Arc<Semaphore>>,
    limit: usize,
    wait: Duration,
}

impl<C> Limited<C> {
    /// `limit` of `None` means no bound.
    pub fn new(inner: C, limit: Option<usize>, wait: Duration) -> Limited<C> {
        Limited {
            inner,
            permits: limit.map(|n| Arc::new(Semaphore::new(n))),
            limit: limit.unwrap_or(0),
            wait,
        }
    }
}

impl<C> tower_service::Service<Uri> for Limited<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = LimitedIo<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The connector that was polled ready makes the call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.permits.clone();
        let (limit, wait) = (self.limit, self.wait);
        Box::pin(async move {
            let permit = match permits {
                None => None,
                Some(p) => match tokio::time::timeout(wait, p.acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => return Err(Box::new(Saturated { limit }) as BoxError),
                },
            };
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(LimitedIo {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection that gives its permit back when it is dropped.
pub struct LimitedIo<T> {
    io: T,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T: Read + Unpin> Read for LimitedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for LimitedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for LimitedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

//! One client connection: optional TLS handshake, then hyper serving HTTP/1.1 or HTTP/2 with
//! the configured limits, an idle timeout, and graceful drain on shutdown.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::Server as ServerConfig;
use crate::proxy::{ConnInfo, Proxy};

/// hyper connection builders prepared once from the configuration.
pub struct Builders {
    auto: auto::Builder<TokioExecutor>,
    h2_only: auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
    handshake_timeout: Duration,
}

impl Builders {
    pub fn new(cfg: &ServerConfig) -> Builders {
        let make = |h2_only: bool| {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.header_read_timeout)
                .max_buf_size(cfg.max_header_bytes.max(8192))
                .keep_alive(true);
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(cfg.h2_max_concurrent_streams)
                .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
                .max_pending_accept_reset_streams(cfg.h2_max_pending_resets)
                .max_local_error_reset_streams(1024)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            if h2_only {
                b = b.http2_only();
            }
            b
        };
        Builders {
            auto: make(false),
            h2_only: make(true),
            idle_timeout: cfg.idle_timeout,
            handshake_timeout: cfg.header_read_timeout,
        }
    }
}

/// Serves one accepted TCP connection until it ends, idles out, or shutdown drains it.
pub async fn serve(
    stream: TcpStream,
    info: ConnInfo,
    tls: Option<TlsAcceptor>,
    builders: Arc<Builders>,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let epoch = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    match tls {
        None => {
            let io = Tracked::new(stream, activity.clone());
            drive(
                io,
                info,
                &builders.auto,
                builders.idle_timeout,
                activity,
                epoch,
                proxy,
                &mut shutdown,
            )
            .await
        }
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(builders.handshake_timeout, acceptor.accept(stream)).await;
            let tls_stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %info.peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let builder = if h2 {
                &builders.h2_only
            } else {
                &builders.auto
            };
            let io = Tracked::new(tls_stream, activity.clone());
            drive(
                io,
                info,
                builder,
                builders.idle_timeout,
                activity,
                epoch,
                proxy,
                &mut shutdown,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive<I>(
    io: I,
    info: ConnInfo,
    builder: &auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    proxy: Arc<Proxy>,
    shutdown: &mut watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, info).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = *shutdown.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    // Idle detection without a clock read per I/O: the stream counts its reads and writes,
    // and a timer looks at the count four times per idle_timeout. A connection is closed once
    // the count has not moved for idle_timeout (so at most a quarter late).
    let tick = (idle_timeout / 4).max(Duration::from_millis(1));
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet_since = epoch;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep(tick), if !draining => {
                let count = activity.load(Ordering::Relaxed);
                if count != seen {
                    seen = count;
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle_timeout {
                    tracing::debug!(peer = %info.peer, "closing idle connection");
                    // Lets an in-flight response finish, then closes.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// An I/O stream that counts the reads and writes that moved bytes, for the idle timeout.
struct Tracked<S> {
    inner: S,
    activity: Arc<AtomicU64>,
}

impl<S> Tracked<S> {
    fn new(inner: S, activity: Arc<AtomicU64>) -> Self {
        Tracked { inner, activity }
    }

    /// Counts one read or write. Only this stream writes the counter, so a plain load and
    /// store (no locked instruction) is enough.
    fn touch(&self) {
        let n = self.activity.load(Ordering::Relaxed);
        self.activity.store(n.wrapping_add(1), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
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
            self.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

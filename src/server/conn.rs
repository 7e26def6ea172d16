//! One client connection: optional TLS handshake, then hyper serving HTTP/1.1 or HTTP/2 with
//! the configured limits, an idle timeout, and graceful drain on shutdown.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::Server as ServerConfig;
use crate::proxy::{ConnInfo, Proxy};

/// What an HTTP/2 client sends first (RFC 9113 §3.4); on a plain port it asks for h2c.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper connection builders prepared once from the configuration.
///
/// The protocol is chosen before hyper sees the connection (ALPN on TLS, a peek at the first
/// bytes on plain ports) and the connection is handed to hyper's own HTTP/1 or HTTP/2 server.
/// hyper-util's `auto` builder would do the same sniffing, but it then reads every request
/// of the connection through its rewind buffer and its own connection future, which
/// measured as about 2% of a 1 KiB hit's instructions.
pub struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    handshake_timeout: Duration,
}

impl Builders {
    pub fn new(cfg: &ServerConfig) -> Builders {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(cfg.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(cfg.h2_max_pending_resets)
            .max_local_error_reset_streams(1024)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Builders {
            http1: h1,
            http2: h2,
            idle_timeout: cfg.idle_timeout,
            handshake_timeout: cfg.header_read_timeout,
        }
    }
}

/// True when a plain connection opens with the HTTP/2 preface. Looks without consuming:
/// hyper then reads the bytes itself. A client that sends part of the preface and stops is
/// waited for with a growing pause (the caller bounds the whole wait).
async fn opens_with_h2_preface(stream: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
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
    let service = service_fn(move |req| proxy.handle(req, info));
    let conns = Conns {
        builders: &builders,
        activity: activity.clone(),
        epoch,
        peer: info.peer,
    };
    match tls {
        None => {
            let h2 = match tokio::time::timeout(
                builders.handshake_timeout,
                opens_with_h2_preface(&stream),
            )
            .await
            {
                Ok(Ok(h2)) => h2,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %info.peer, error = %e, "connection failed before a request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %info.peer, "no request before header_read_timeout");
                    return;
                }
            };
            let io = TokioIo::new(Tracked::new(stream, activity));
            conns.serve(io, h2, service, &mut shutdown).await
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
            // RFC 9113 §3.2: over TLS, HTTP/2 is chosen by ALPN only.
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(Tracked::new(tls_stream, activity));
            conns.serve(io, h2, service, &mut shutdown).await
        }
    }
}

/// What serving one connection needs besides its stream and service.
struct Conns<'a> {
    builders: &'a Builders,
    activity: Arc<AtomicU64>,
    epoch: Instant,
    peer: std::net::SocketAddr,
}

impl Conns<'_> {
    async fn serve<I, S>(self, io: I, h2: bool, service: S, shutdown: &mut watch::Receiver<bool>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<
                hyper::body::Incoming,
                ResBody = crate::proxy::body::Body,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let idle = self.builders.idle_timeout;
        if h2 {
            let conn = self.builders.http2.serve_connection(io, service);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                idle,
                &self.activity,
                self.epoch,
                self.peer,
                shutdown,
            )
            .await
        } else {
            let conn = self.builders.http1.serve_connection(io, service);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                idle,
                &self.activity,
                self.epoch,
                self.peer,
                shutdown,
            )
            .await
        }
    }
}

/// Runs a hyper connection to its end, closing it gracefully (`drain`) on shutdown or once
/// it has been idle for `idle_timeout`.
async fn drive<C, D>(
    conn: C,
    mut drain: D,
    idle_timeout: Duration,
    activity: &AtomicU64,
    epoch: Instant,
    peer: std::net::SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
    D: FnMut(Pin<&mut C>),
{
    tokio::pin!(conn);
    let mut draining = *shutdown.borrow();
    if draining {
        drain(conn.as_mut());
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
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    drain(conn.as_mut());
                }
            }
            _ = tokio::time::sleep(tick), if !draining => {
                let count = activity.load(Ordering::Relaxed);
                if count != seen {
                    seen = count;
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle_timeout {
                    tracing::debug!(peer = %peer, "closing idle connection");
                    // Lets an in-flight response finish, then closes.
                    draining = true;
                    drain(conn.as_mut());
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

//! One client connection: optional TLS handshake, then hyper serving HTTP/1.1 or HTTP/2 with
//! the configured limits, an idle timeout, and graceful drain on shutdown.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::plain::Plain;
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
    // The plain stream counts the bytes it sends from memory files in the proxy's metrics.
    let owner = proxy.clone();
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
            let io = TokioIo::new(Tracked::new(Plain::new(stream, owner), activity));
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
        if h2 {
            let conn = self.builders.http2.serve_connection(io, service);
            self.drive(conn, |c| c.graceful_shutdown(), shutdown).await
        } else {
            let conn = self.builders.http1.serve_connection(io, service);
            self.drive(conn, |c| c.graceful_shutdown(), shutdown).await
        }
    }

    /// Runs a hyper connection to its end, closing it gracefully (`drain`) on shutdown or
    /// once it has been idle for `idle_timeout`.
    async fn drive<C, D>(&self, conn: C, drain: D, shutdown: &mut watch::Receiver<bool>)
    where
        C: std::future::Future<Output = Result<(), hyper::Error>>,
        D: FnOnce(Pin<&mut C>),
    {
        tokio::pin!(conn);
        let idle_timeout = self.builders.idle_timeout;
        let ended = if *shutdown.borrow() {
            None
        } else {
            // Idle detection without a clock read per I/O: the stream counts its reads and
            // writes, and a timer looks at the count four times per idle_timeout. A
            // connection is closed once the count has not moved for idle_timeout (so at most
            // a quarter late).
            let tick = (idle_timeout / 4).max(Duration::from_millis(1));
            let guard = async {
                let mut seen = self.activity.load(Ordering::Relaxed);
                let mut quiet_since = self.epoch;
                loop {
                    tokio::select! {
                        biased;
                        changed = shutdown.changed() => {
                            if changed.is_err() || *shutdown.borrow() {
                                return;
                            }
                        }
                        _ = tokio::time::sleep(tick) => {
                            let count = self.activity.load(Ordering::Relaxed);
                            if count != seen {
                                seen = count;
                                quiet_since = Instant::now();
                            } else if quiet_since.elapsed() >= idle_timeout {
                                tracing::debug!(peer = %self.peer, "closing idle connection");
                                return;
                            }
                        }
                    }
                }
            };
            tokio::pin!(guard);
            Guarded::new(conn.as_mut(), guard).await
        };
        let res = match ended {
            Some(res) => res,
            None => {
                // Lets an in-flight response finish, then closes.
                drain(conn.as_mut());
                conn.await
            }
        };
        if let Err(e) = res {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}

/// Polls a connection until it ends (`Some(result)`) or its guard completes (`None`).
///
/// The guard (shutdown signal, idle tick) is polled only after it has woken the task itself:
/// a `select!` over the three would poll the watch channel and the timer on every wake of
/// the connection, once or twice per request. The guard is given its own waker, which notes
/// that it fired and wakes the connection's task.
struct Guarded<'a, C, G> {
    conn: Pin<&'a mut C>,
    guard: Pin<&'a mut G>,
    signal: Arc<GuardSignal>,
    /// The task waker last handed to `signal`, to notice when the task's waker changes
    /// without taking the lock on every poll.
    task: Option<Waker>,
}

/// The guard's waker: remembers that the guard woke, then wakes the connection's task.
struct GuardSignal {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for GuardSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = match self.task.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(t) = task {
            t.wake();
        }
    }
}

impl<'a, C, G> Guarded<'a, C, G> {
    fn new(conn: Pin<&'a mut C>, guard: Pin<&'a mut G>) -> Self {
        Guarded {
            conn,
            guard,
            // Woken at the start, so the guard's first poll registers its timer and watch.
            signal: Arc::new(GuardSignal {
                woken: AtomicBool::new(true),
                task: Mutex::new(None),
            }),
            task: None,
        }
    }
}

impl<C, G> std::future::Future for Guarded<'_, C, G>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
    G: std::future::Future<Output = ()>,
{
    type Output = Option<Result<(), hyper::Error>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(res) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            match this.signal.task.lock() {
                Ok(mut t) => *t = Some(waker.clone()),
                Err(poisoned) => *poisoned.into_inner() = Some(waker.clone()),
            }
            this.task = Some(waker);
        }
        // A relaxed look first: the swap (a locked instruction) only when it is likely set.
        if this.signal.woken.load(Ordering::Relaxed)
            && this.signal.woken.swap(false, Ordering::Acquire)
        {
            let waker = Waker::from(this.signal.clone());
            if this
                .guard
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
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

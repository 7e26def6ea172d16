//! One client connection: optional TLS handshake, then hyper serving HTTP/1.1 or HTTP/2 with
//! the configured limits, a header-read timeout, an idle timeout, a send timeout, and graceful
//! drain on shutdown.
//!
//! hyper's own HTTP/1 `header_read_timeout` starts when the connection begins to wait for a
//! head, so between keep-alive requests it cut connections idle for longer than it (10 s)
//! though `idle_timeout` allows more. Here the wait for a kept-alive connection's next request
//! is `idle_timeout`'s (nginx's `keepalive_timeout`), and `header_read_timeout` runs from the
//! first byte of a head ([`HeadTimer`]); the first request of a connection is waited for with
//! `header_read_timeout`, as nginx's `client_header_timeout`.
//!
//! hyper has neither an idle timeout nor a send timeout for servers, so the connection's
//! socket counts what it moves ([`Activity`]) and a timer ([`Watch`]) looks at the counts a
//! few times per timeout; no clock is read per I/O. A connection that stalls while it has
//! bytes to send, or that does not finish after graceful shutdown, is dropped: that drops
//! its response bodies, and with them any fill reader (`cache::fill`) that would otherwise
//! hold back the other readers of an abandoned fill.

use std::convert::Infallible;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::rt::bounds::Http2ServerConnExec;
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
use crate::proxy::body::Body;
use crate::proxy::{ConnInfo, Handling, Proxy};
use crate::telemetry::metrics::Metrics;

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
    /// HTTP/1 with hyper's own header-read timeout, for streams that do not time heads
    /// themselves (the admin listener's): stricter between keep-alive requests, which is no
    /// loss for probes and scrapes.
    http1_hyper_timed: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    limits: Limits,
    /// `header_read_timeout`: bounds the TLS handshake, a plain connection's wait for its first
    /// bytes, and each HTTP/1 request head.
    header_read: Duration,
    shutdown_grace: Duration,
}

impl Builders {
    pub fn new(cfg: &ServerConfig) -> Builders {
        let mut h1 = http1::Builder::new();
        // Request heads are timed by the stream (`HeadTimer`): hyper's timeout would also run
        // while a kept-alive connection waits for its next request.
        h1.header_read_timeout(None)
            .max_buf_size(cfg.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut h1_timed = http1::Builder::new();
        h1_timed
            .timer(TokioTimer::new())
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
            http1_hyper_timed: h1_timed,
            http2: h2,
            limits: Limits {
                idle: cfg.idle_timeout,
                send: cfg.send_timeout,
            },
            header_read: cfg.header_read_timeout,
            shutdown_grace: cfg.shutdown_grace,
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

/// Whether a plain connection asks for h2c, learned within `header_read_timeout`; `None`
/// (logged) when the client failed or sent nothing usable in that time.
async fn plain_protocol(stream: &TcpStream, builders: &Builders, peer: SocketAddr) -> Option<bool> {
    match tokio::time::timeout(builders.header_read, opens_with_h2_preface(stream)).await {
        Ok(Ok(h2)) => Some(h2),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "connection failed before a request");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "no request before header_read_timeout");
            None
        }
    }
}

/// Serves one plain TCP connection with `service` under the data listeners' limits: the
/// same builders (header-read timeout, header size, HTTP/2 settings), the idle and send
/// timeouts, and a drain bounded by `shutdown_grace` once `shutdown` is set. For listeners
/// other than the proxy's (admin), so the stream is not the proxy's sendfile-capable
/// [`Plain`], and HTTP/2 bodies do not report flow-control waits (small answers).
pub async fn serve_plain<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    builders: Arc<Builders>,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: HttpBody + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    let _ = stream.set_nodelay(true);
    let Some(h2) = plain_protocol(&stream, &builders, peer).await else {
        return;
    };
    let activity = Arc::new(Activity::default());
    let conns = Conns {
        builders: &builders,
        activity: activity.clone(),
        epoch: Instant::now(),
        peer,
    };
    let io = TokioIo::new(Tracked::new(stream, activity));
    let proto = if h2 {
        Proto::Http2
    } else {
        Proto::Http1HyperTimed
    };
    conns.run(io, proto, service, &mut shutdown).await
}

/// Serves one accepted TCP connection until it ends, idles out, stalls, or shutdown drains it.
pub async fn serve(
    stream: TcpStream,
    info: ConnInfo,
    tls: Option<TlsAcceptor>,
    builders: Arc<Builders>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let epoch = Instant::now();
    let activity = Arc::new(Activity::default());
    let conns = Conns {
        builders: &builders,
        activity: activity.clone(),
        epoch,
        peer: info.peer,
    };
    match tls {
        None => {
            let Some(h2) = plain_protocol(&stream, &builders, info.peer).await else {
                return;
            };
            // The plain stream counts the bytes it sends from memory files in the node's
            // metrics. It is tracked from outside: its sendfile calls are its writes.
            let plain = Plain::new(stream, metrics);
            let mut tracked = Tracked::new(plain, activity);
            if !h2 {
                tracked.time_heads(builders.header_read);
            }
            let io = TokioIo::new(tracked);
            conns.serve(io, h2, proxy, info, &mut shutdown).await
        }
        Some(acceptor) => {
            // Tracked under TLS: what counts is what reaches the socket (TLS records included),
            // and a refused write is seen even while rustls still takes plaintext into its
            // buffer.
            let tracked = Tracked::new(stream, activity);
            let handshake =
                tokio::time::timeout(builders.header_read, acceptor.accept(tracked)).await;
            let mut tls_stream = match handshake {
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
            if !h2 {
                // Heads are timed below TLS: a head's first record starts its time.
                tls_stream.get_mut().0.time_heads(builders.header_read);
            }
            let io = TokioIo::new(tls_stream);
            conns.serve(io, h2, proxy, info, &mut shutdown).await
        }
    }
}

/// Which hyper connection serves a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http2,
    /// HTTP/1 whose stream times request heads (`HeadTimer`).
    Http1,
    /// HTTP/1 timed by hyper's own header-read timeout.
    Http1HyperTimed,
}

/// What serving one connection needs besides its stream and service.
struct Conns<'a> {
    builders: &'a Builders,
    activity: Arc<Activity>,
    epoch: Instant,
    peer: SocketAddr,
}

impl Conns<'_> {
    async fn serve<I>(
        self,
        io: I,
        h2: bool,
        proxy: Arc<Proxy>,
        info: ConnInfo,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if h2 {
            // Flow control can stop an HTTP/2 response with the socket writable, so its body
            // reports when hyper holds a chunk of it (`Watched`). HTTP/1 needs no such
            // report: a response it cannot send is a write the socket refuses.
            let activity = self.activity.clone();
            let service = service_fn(move |req| {
                Reporting::<Watched>::new(proxy.handle(req, info), activity.clone())
            });
            self.run(io, Proto::Http2, service, shutdown).await
        } else {
            // A head read starts a request; its response's body, once hyper is done with it,
            // marks the connection as waiting for the next head (`Answered`).
            let activity = self.activity.clone();
            let service = service_fn(move |req| {
                activity.set_cycle(Cycle::Request);
                Reporting::<Answered>::new(proxy.handle(req, info), activity.clone())
            });
            self.run(io, Proto::Http1, service, shutdown).await
        }
    }

    /// Serves `io` with hyper's HTTP/2 (`h2`) or HTTP/1 connection and `service`, under
    /// [`Conns::drive`].
    async fn run<I, S, B>(
        self,
        io: I,
        proto: Proto,
        service: S,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: HttpBody + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        TokioExecutor: Http2ServerConnExec<S::Future, B>,
    {
        match proto {
            Proto::Http2 => {
                let conn = self.builders.http2.serve_connection(io, service);
                self.drive(conn, |c| c.graceful_shutdown(), shutdown).await
            }
            Proto::Http1 | Proto::Http1HyperTimed => {
                let builder = if proto == Proto::Http1 {
                    &self.builders.http1
                } else {
                    &self.builders.http1_hyper_timed
                };
                let conn = builder.serve_connection(io, service);
                self.drive(conn, |c| c.graceful_shutdown(), shutdown).await
            }
        }
    }

    /// Runs a hyper connection to its end. It is closed gracefully (`drain`: an in-flight
    /// response finishes) on node shutdown or once idle for `idle_timeout`, and dropped when
    /// it has bytes to send and sends none for `send_timeout`, when a drain moves no byte for
    /// `send_timeout`, or when `shutdown_grace` has passed since node shutdown. Dropping it
    /// drops its response bodies.
    async fn drive<C, D>(&self, conn: C, drain: D, shutdown: &mut watch::Receiver<bool>)
    where
        C: std::future::Future<Output = Result<(), hyper::Error>>,
        D: FnOnce(Pin<&mut C>),
    {
        tokio::pin!(conn);
        let mut drain = Some(drain);
        let mut watch = Watch::new(self.activity.snapshot(), self.epoch);
        let mut draining = None;
        if *shutdown.borrow() {
            draining = Some(self.shutdown_drain());
            if let Some(d) = drain.take() {
                d(conn.as_mut());
            }
        }
        loop {
            let guard = self.guard(&mut watch, draining, shutdown);
            tokio::pin!(guard);
            let verdict = match Guarded::new(conn.as_mut(), guard).await {
                Ended::Conn(res) => {
                    if let Err(e) = res {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                Ended::Guard(verdict) => verdict,
            };
            match verdict {
                Verdict::Drain(d) => {
                    draining = Some(d);
                    if let Some(d) = drain.take() {
                        d(conn.as_mut());
                    }
                }
                Verdict::Close(why) => {
                    tracing::debug!(peer = %self.peer, reason = why.as_str(), "dropping connection");
                    return;
                }
            }
        }
    }

    /// A drain begun by node shutdown: it ends with `shutdown_grace` at the latest.
    fn shutdown_drain(&self) -> Draining {
        let now = Instant::now();
        Draining {
            since: now,
            until: Some(now + self.builders.shutdown_grace),
        }
    }

    /// Completes when the connection should be drained or dropped: on node shutdown, when
    /// `shutdown_grace` ends, or when a tick of the [`Watch`] says so. Ticks four times per
    /// the shorter of `idle_timeout` and `send_timeout`, so each acts at most a quarter late.
    async fn guard(
        &self,
        watch: &mut Watch,
        draining: Option<Draining>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Verdict {
        let limits = self.builders.limits;
        let tick = (limits.idle.min(limits.send) / 4).max(Duration::from_millis(1));
        let grace_end = async move {
            match draining.and_then(|d| d.until) {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(grace_end);
        loop {
            tokio::select! {
                biased;
                // Also while an idle drain runs, so that shutdown_grace bounds it too.
                changed = shutdown.changed(), if draining.is_none_or(|d| d.until.is_none()) => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Verdict::Drain(self.shutdown_drain());
                    }
                }
                () = &mut grace_end => return Verdict::Close(Close::Grace),
                () = tokio::time::sleep(tick) => {
                    let now = Instant::now();
                    if let Some(v) = watch.look(self.activity.snapshot(), now, limits, draining) {
                        return v;
                    }
                }
            }
        }
    }
}

/// The timeouts a [`Watch`] applies.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// No byte moved either way, nothing waiting to be sent: drain.
    idle: Duration,
    /// Bytes waiting to be sent and none sent: drop. Also: draining and no byte moved.
    send: Duration,
}

/// A connection asked to finish (hyper's graceful shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Draining {
    since: Instant,
    /// Node shutdown: dropped at this time (`shutdown_grace`) if still open.
    until: Option<Instant>,
}

/// What the guard decided.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Close gracefully.
    Drain(Draining),
    /// Drop the connection now.
    Close(Close),
}

/// Why a connection was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// It had bytes to send and sent none for `send_timeout`: the client stopped reading.
    Stalled,
    /// Draining, it moved no byte for `send_timeout`.
    Drain,
    /// Still open when `shutdown_grace` ended.
    Grace,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::Stalled => "client took no bytes for send_timeout",
            Close::Drain => "draining connection moved no bytes for send_timeout",
            Close::Grace => "still open when shutdown_grace ended",
        }
    }
}

/// The counts a tick reads off a connection's [`Activity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snapshot {
    /// Reads that moved bytes.
    reads: u64,
    /// Writes that moved bytes, plus chunks hyper took from HTTP/2 response bodies.
    sent: u64,
    /// Bytes wait to be sent: the socket refused a write, or an HTTP/2 response body has a
    /// chunk in hyper's hands that flow control keeps from being sent.
    waiting: bool,
}

/// The idle and send timeouts, judged from snapshots a few times per timeout (so without a
/// clock read per I/O).
#[derive(Debug)]
struct Watch {
    last: Snapshot,
    /// When a tick last saw bytes move either way.
    quiet_since: Instant,
    /// When a tick last saw bytes sent, or first saw the connection waiting to send.
    sent_since: Instant,
}

impl Watch {
    fn new(first: Snapshot, since: Instant) -> Watch {
        Watch {
            last: first,
            quiet_since: since,
            sent_since: since,
        }
    }

    /// Takes one tick's snapshot `now`, taken at `at`; says what to do, if anything.
    fn look(
        &mut self,
        now: Snapshot,
        at: Instant,
        limits: Limits,
        draining: Option<Draining>,
    ) -> Option<Verdict> {
        let sent = now.sent != self.last.sent;
        if sent || now.reads != self.last.reads {
            self.quiet_since = at;
        }
        // The send timeout runs from the last byte sent or from when waiting began, so a
        // client that reads again after a long idle pause gets the whole timeout.
        if sent || (now.waiting && !self.last.waiting) {
            self.sent_since = at;
        }
        self.last = now;
        if now.waiting && at.saturating_duration_since(self.sent_since) >= limits.send {
            return Some(Verdict::Close(Close::Stalled));
        }
        match draining {
            // A connection waiting to send is not idle: the send timeout governs it.
            None if !now.waiting
                && at.saturating_duration_since(self.quiet_since) >= limits.idle =>
            {
                Some(Verdict::Drain(Draining {
                    since: at,
                    until: None,
                }))
            }
            Some(d)
                if at.saturating_duration_since(self.quiet_since.max(d.since)) >= limits.send =>
            {
                Some(Verdict::Close(Close::Drain))
            }
            _ => None,
        }
    }
}

/// What a connection reports to its [`Watch`]. The stream, used by one task, counts its reads
/// and writes and sets `refused` with plain loads and stores (no locked instruction); HTTP/2
/// response bodies, polled on their streams' own tasks, count `held` and `taken` with atomic
/// adds.
#[derive(Debug, Default)]
struct Activity {
    reads: AtomicU64,
    writes: AtomicU64,
    /// A write or flush returned `Pending` (the socket is full); cleared by the next write
    /// that moves bytes.
    refused: AtomicBool,
    /// HTTP/2: response bodies that handed hyper a chunk and have not been asked for the next.
    held: AtomicUsize,
    /// HTTP/2: chunks hyper took from response bodies.
    taken: AtomicU64,
    /// HTTP/1: where the connection is in its request cycle (a [`Cycle`]), for [`HeadTimer`].
    /// Written and read on the connection's task only.
    cycle: AtomicU8,
}

impl Activity {
    fn cycle(&self) -> Cycle {
        match self.cycle.load(Ordering::Relaxed) {
            1 => Cycle::Waiting,
            2 => Cycle::Head,
            _ => Cycle::Request,
        }
    }

    fn set_cycle(&self, cycle: Cycle) {
        self.cycle.store(cycle as u8, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        let writes = self.writes.load(Ordering::Relaxed);
        Snapshot {
            reads: self.reads.load(Ordering::Relaxed),
            sent: writes.wrapping_add(self.taken.load(Ordering::Relaxed)),
            waiting: self.refused.load(Ordering::Relaxed) || self.held.load(Ordering::Relaxed) > 0,
        }
    }
}

/// Where an HTTP/1 connection is between request heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cycle {
    /// A head was read: its request and response run (the idle and send timeouts govern).
    /// Also an HTTP/2 connection's, which has no head timer.
    Request = 0,
    /// The last response is done; no byte of the next head has arrived (`idle_timeout`
    /// governs, as nginx's `keepalive_timeout`).
    Waiting = 1,
    /// A head is arriving: its first byte came, or it is the connection's first request.
    /// `header_read_timeout` governs.
    Head = 2,
}

/// How [`Guarded`] ended.
enum Ended<V> {
    /// The connection finished.
    Conn(Result<(), hyper::Error>),
    /// The guard completed first, with this value.
    Guard(V),
}

/// Polls a connection until it ends or its guard completes.
///
/// The guard (shutdown signal, timeout ticks) is polled only after it has woken the task
/// itself: a `select!` over the three would poll the watch channel and the timer on every
/// wake of the connection, once or twice per request. The guard is given its own waker, which
/// notes that it fired and wakes the connection's task.
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
    G: std::future::Future,
{
    type Output = Ended<G::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(res) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Ended::Conn(res));
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
            if let Poll::Ready(v) = this.guard.as_mut().poll(&mut Context::from_waker(&waker)) {
                return Poll::Ready(Ended::Guard(v));
            }
        }
        Poll::Pending
    }
}

/// An I/O stream that reports to its connection's [`Activity`]: reads and writes that moved
/// bytes, and writes the socket refused. On HTTP/1 it also times request heads.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    head: Option<HeadTimer>,
}

impl<S> Tracked<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            head: None,
        }
    }

    /// Times HTTP/1 request heads from here on, the first from now.
    fn time_heads(&mut self, timeout: Duration) {
        self.activity.set_cycle(Cycle::Head);
        self.head = Some(HeadTimer {
            timeout,
            deadline: None,
        });
    }

    /// Counts one read or write. Only this stream writes the counters, so a plain load and
    /// store (no locked instruction) is enough.
    fn bump(counter: &AtomicU64) {
        let n = counter.load(Ordering::Relaxed);
        counter.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Notes how a write went: bytes moved, or the socket refused it (`Pending`: a client
    /// that does not read fills the socket's buffers).
    fn wrote(&self, res: &Poll<io::Result<usize>>) {
        match res {
            Poll::Ready(Ok(n)) if *n > 0 => {
                Self::bump(&self.activity.writes);
                if self.activity.refused.load(Ordering::Relaxed) {
                    self.activity.refused.store(false, Ordering::Relaxed);
                }
            }
            Poll::Pending => self.activity.refused.store(true, Ordering::Relaxed),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            Self::bump(&this.activity.reads);
            if let Some(head) = &mut this.head {
                head.arrived(&this.activity);
            }
        }
        let activity = &this.activity;
        if res.is_pending() && this.head.as_mut().is_some_and(|h| h.expired(cx, activity)) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within header_read_timeout",
            )));
        }
        res
    }
}

/// `header_read_timeout` for HTTP/1 request heads, run by the connection's stream: from the
/// first byte of a head on a kept-alive connection, and from the start for the first request
/// (after the TLS handshake, or after the first bytes were peeked at on a plain connection),
/// until hyper has read the whole head (its service is called: [`Cycle::Request`]).
///
/// The deadline is set at the first read of a head that finds nothing more to read: hyper,
/// having read the start of a head it cannot parse yet, reads again at once, so that is when
/// the first byte came; a head that arrives in one read sets none. It is checked on every
/// such read: hyper reads whenever its task wakes while it waits for a head, and the timer
/// wakes it. One clock read and timer per head that does not arrive whole; hyper's own took
/// both (and a boxed sleep) for every head.
///
/// Not timed: a partial head that hyper read ahead while it was sending the previous response
/// (pipelining) and that then stalls; `idle_timeout` closes that connection.
struct HeadTimer {
    timeout: Duration,
    /// Set while a head that did not arrive whole is awaited.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HeadTimer {
    /// Bytes were read: the first after a response ended starts a head.
    fn arrived(&mut self, activity: &Activity) {
        if activity.cycle() == Cycle::Waiting {
            activity.set_cycle(Cycle::Head);
            self.deadline = None;
        }
    }

    /// A read found nothing: true when a head has been arriving for `timeout`.
    fn expired(&mut self, cx: &mut Context<'_>, activity: &Activity) -> bool {
        if activity.cycle() != Cycle::Head {
            // Dropping the sleep takes it off the timer: no wake for a head already read.
            self.deadline = None;
            return false;
        }
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        std::future::Future::poll(deadline.as_mut(), cx).is_ready()
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&res);
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if res.is_pending() {
            self.activity.refused.store(true, Ordering::Relaxed);
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_shutdown(cx);
        if res.is_pending() {
            self.activity.refused.store(true, Ordering::Relaxed);
        }
        res
    }
}

/// A response body that reports to its connection's [`Activity`].
trait Reports {
    fn new(body: Body, activity: Arc<Activity>) -> Self;
}

/// [`Proxy::handle`]'s future, its response's body wrapped as a `B` that reports to the
/// connection's [`Activity`].
struct Reporting<B> {
    handling: Handling,
    activity: Option<Arc<Activity>>,
    body: PhantomData<fn() -> B>,
}

impl<B> Reporting<B> {
    fn new(handling: Handling, activity: Arc<Activity>) -> Self {
        Reporting {
            handling,
            activity: Some(activity),
            body: PhantomData,
        }
    }
}

impl<B: Reports> std::future::Future for Reporting<B> {
    type Output = Result<hyper::Response<B>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let resp = match std::task::ready!(Pin::new(&mut this.handling).poll(cx)) {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        let activity = this
            .activity
            .take()
            .expect("hyper polls a service future only until it is ready");
        Poll::Ready(Ok(resp.map(|body| B::new(body, activity))))
    }
}

/// An HTTP/1 response body that, once hyper is done with it (all sent, or given up), marks
/// its connection as waiting for the next request head ([`Cycle::Waiting`]). hyper reads the
/// next head only after that, so bytes it reads before (a request body, or a pipelined head
/// read ahead) start no head.
struct Answered {
    body: Body,
    activity: Arc<Activity>,
}

impl Reports for Answered {
    fn new(body: Body, activity: Arc<Activity>) -> Self {
        Answered { body, activity }
    }
}

impl HttpBody for Answered {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        self.activity.set_cycle(Cycle::Waiting);
    }
}

/// An HTTP/2 response body that tells its connection's [`Activity`] when hyper holds a chunk
/// of it without asking for the next: hyper takes the next chunk only once the last one has
/// send window, so a body left holding is a response that flow control stopped (the client's
/// stream or connection window is spent), with no write refused. Each chunk taken counts as
/// progress.
struct Watched {
    body: Body,
    activity: Arc<Activity>,
    /// The last poll handed out a chunk (counted in `Activity::held`).
    holding: bool,
}

impl Reports for Watched {
    fn new(body: Body, activity: Arc<Activity>) -> Self {
        Watched {
            body,
            activity,
            holding: false,
        }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.body).poll_frame(cx);
        let data = matches!(&res, Poll::Ready(Some(Ok(f))) if f.is_data());
        if data {
            this.activity.taken.fetch_add(1, Ordering::Relaxed);
        }
        if data != this.holding {
            this.holding = data;
            if data {
                this.activity.held.fetch_add(1, Ordering::Relaxed);
            } else {
                this.activity.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.holding {
            self.activity.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// idle_timeout 4 s, send_timeout 2 s.
    const LIMITS: Limits = Limits {
        idle: Duration::from_secs(4),
        send: Duration::from_secs(2),
    };

    /// Ticks a [`Watch`] every 500 ms for 20 s; `at(ms)` gives the counts a tick reads then
    /// (reads, sent, waiting). Drained from `drain_at` ms on, or when the watch says so.
    /// Returns the verdicts as (ms, what), up to the first drop.
    fn check(
        limits: Limits,
        drain_at: Option<u64>,
        at: impl Fn(u64) -> (u64, u64, bool),
    ) -> Vec<(u64, &'static str)> {
        let start = Instant::now();
        let snap = |ms| {
            let (reads, sent, waiting) = at(ms);
            Snapshot {
                reads,
                sent,
                waiting,
            }
        };
        let mut watch = Watch::new(snap(0), start);
        let mut draining = None;
        let mut out = Vec::new();
        for ms in (500..=20_000).step_by(500) {
            let now = start + Duration::from_millis(ms);
            if drain_at == Some(ms) {
                draining = Some(Draining {
                    since: now,
                    until: None,
                });
            }
            match watch.look(snap(ms), now, limits, draining) {
                None => {}
                Some(Verdict::Drain(d)) => {
                    assert_eq!(d.since, now);
                    draining = Some(d);
                    out.push((ms, "drain"));
                }
                Some(Verdict::Close(why)) => {
                    out.push((ms, why.as_str()));
                    break;
                }
            }
        }
        out
    }

    /// A stream timing heads with `header_read_timeout = 1s`, the client's end, and its
    /// connection's activity.
    fn timed() -> (
        Tracked<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Activity>,
    ) {
        let (server, client) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::default());
        let mut stream = Tracked::new(server, activity.clone());
        stream.time_heads(Duration::from_secs(1));
        (stream, client, activity)
    }

    /// Reads until the stream fails or `limit` passes: the error kind and when, or `None`.
    async fn read_fails(
        stream: &mut Tracked<tokio::io::DuplexStream>,
        limit: Duration,
    ) -> Option<(io::ErrorKind, Duration)> {
        use tokio::io::AsyncReadExt;
        let start = Instant::now();
        let mut buf = [0u8; 64];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => panic!("the client's end closed"),
                    Ok(_) => {}
                    Err(e) => return (e.kind(), start.elapsed()),
                }
            }
        })
        .await
        .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_cut_at_header_read_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut stream, _client, _) = timed();
        assert_eq!(
            read_fails(&mut stream, Duration::from_secs(60)).await,
            Some((io::ErrorKind::TimedOut, Duration::from_secs(1))),
            "nothing sent"
        );
        let (mut stream, mut client, _) = timed();
        client
            .write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("write");
        assert_eq!(
            read_fails(&mut stream, Duration::from_secs(60)).await,
            Some((io::ErrorKind::TimedOut, Duration::from_secs(1))),
            "half a head"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_waits_for_its_next_head_untimed_then_times_the_head() {
        use tokio::io::AsyncWriteExt;
        let (mut stream, mut client, activity) = timed();
        // A head was read and answered.
        activity.set_cycle(Cycle::Request);
        assert_eq!(read_fails(&mut stream, Duration::from_secs(5)).await, None);
        activity.set_cycle(Cycle::Waiting);
        assert_eq!(
            read_fails(&mut stream, Duration::from_secs(3600)).await,
            None
        );
        // The next head's first byte starts its time; a byte 900 ms later does not restart it.
        client.write_all(b"G").await.expect("write");
        assert_eq!(
            read_fails(&mut stream, Duration::from_millis(900)).await,
            None
        );
        client.write_all(b"E").await.expect("write");
        assert_eq!(
            read_fails(&mut stream, Duration::from_secs(60)).await,
            Some((io::ErrorKind::TimedOut, Duration::from_millis(100)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_read_whole_leaves_no_deadline_behind() {
        use tokio::io::AsyncWriteExt;
        let (mut stream, mut client, activity) = timed();
        client.write_all(b"GET / HT").await.expect("write");
        // The head's deadline is set...
        assert_eq!(
            read_fails(&mut stream, Duration::from_millis(500)).await,
            None
        );
        // ...and the rest arrives: hyper calls the service, the response is sent, and the
        // next head is waited for long past the first head's deadline.
        client.write_all(b"TP/1.1\r\n\r\n").await.expect("write");
        activity.set_cycle(Cycle::Request);
        assert_eq!(read_fails(&mut stream, Duration::from_secs(5)).await, None);
        activity.set_cycle(Cycle::Waiting);
        assert_eq!(read_fails(&mut stream, Duration::from_secs(60)).await, None);
        // A head that starts then gets its own full second.
        client.write_all(b"GET").await.expect("write");
        assert_eq!(
            read_fails(&mut stream, Duration::from_secs(60)).await,
            Some((io::ErrorKind::TimedOut, Duration::from_secs(1)))
        );
    }

    const STALLED: &str = "client took no bytes for send_timeout";
    const DRAIN_TIMEOUT: &str = "draining connection moved no bytes for send_timeout";

    #[test]
    fn a_quiet_connection_is_drained_after_idle_timeout_then_dropped_after_send_timeout() {
        // Nothing in flight would have closed at once; something stuck gets send_timeout
        // from the drain, not from when it went quiet.
        assert_eq!(
            check(LIMITS, None, |_| (0, 0, false)),
            [(4000, "drain"), (6000, DRAIN_TIMEOUT)]
        );
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_send_timeout_after_the_last_byte() {
        assert_eq!(
            check(LIMITS, None, |ms| (1, ms.min(3000), ms >= 3000)),
            [(5000, STALLED)]
        );
    }

    #[test]
    fn a_slow_reader_that_keeps_taking_bytes_is_kept() {
        // Refused writes all along, but a byte taken every 1.5 s (under send_timeout).
        assert_eq!(check(LIMITS, None, |ms| (1, ms / 1500, true)), []);
    }

    #[test]
    fn waiting_after_a_long_pause_gets_the_whole_send_timeout() {
        // A request trickles in (so not idle); the response is refused from 10 s.
        assert_eq!(
            check(LIMITS, None, |ms| (ms / 1000, 0, ms >= 10_000)),
            [(12_000, STALLED)]
        );
    }

    #[test]
    fn a_connection_waiting_to_send_is_not_idle() {
        let limits = Limits {
            idle: Duration::from_secs(1),
            send: Duration::from_secs(3),
        };
        assert_eq!(check(limits, None, |_| (0, 0, true)), [(3000, STALLED)]);
    }

    #[test]
    fn a_draining_connection_that_moves_bytes_is_left_to_finish() {
        assert_eq!(check(LIMITS, Some(1000), |ms| (0, ms / 1000, false)), []);
    }

    #[test]
    fn a_draining_connection_that_stalls_is_dropped_by_the_send_timeout() {
        // Reads move (the client sends), but nothing it is sent is taken.
        assert_eq!(
            check(LIMITS, Some(500), |ms| (ms / 1000, 0, true)),
            [(2000, STALLED)]
        );
    }
}

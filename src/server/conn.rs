//! One client connection: optional TLS handshake, then hyper serving HTTP/1.1 or HTTP/2 with
//! the configured limits, a header-read timeout, an idle timeout, a send timeout, and graceful
//! drain on shutdown. Entry points: [`serve`] (the data listeners) and [`serve_plain`] (the
//! admin listener), with the [`Builders`] made once from the configuration.
//!
//! hyper's own HTTP/1 `header_read_timeout` starts when the connection begins to wait for a
//! head, so between keep-alive requests it cut connections idle for longer than it (10 s)
//! though `idle_timeout` allows more. Here the wait for a kept-alive connection's next request
//! is `idle_timeout`'s (nginx's `keepalive_timeout`), and `header_read_timeout` runs from the
//! first byte of a head (`tracked::HeadTimer`); the first request of a connection is waited
//! for with `header_read_timeout`, as nginx's `client_header_timeout`.
//!
//! hyper has neither an idle timeout nor a send timeout for servers, so the connection's
//! socket counts what it moves (`tracked::Activity`) and a timer (`timeouts::Watch`) looks at
//! the counts a few times per timeout; no clock is read per I/O. A connection that stalls
//! while it has bytes to send, or that does not finish after graceful shutdown, is dropped
//! (`drain`): that drops its response bodies, and with them any fill reader (`cache::fill`)
//! that would otherwise hold back the other readers of an abandoned fill.
//!
//! The parts, each in a file of its own under `server`: `sniff` (HTTP/2 preface on plain
//! ports), `tracked` (the stream that counts I/O and times heads), `timeouts` (the idle and
//! send timeouts judged from its counts), `drain` (a hyper connection driven to its end under
//! that judgement, graceful shutdown included) and `reporting` (response bodies that report
//! to the connection).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body::Body as HttpBody;
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::park::{H1Conn, H1Io, H1Service, H1Stream, Parkable, Readiness};
use super::plain::Plain;
use super::reporting::{Answered, Reporting, Watched};
use super::sniff::plain_protocol;
use super::timeouts::{Limits, Watch};
use super::tracked::{Activity, Tracked};
use crate::config::Server as ServerConfig;
use crate::proxy::{ConnInfo, Live};
use crate::telemetry::metrics::Metrics;

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
    pub(super) limits: Limits,
    /// `header_read_timeout`: bounds the TLS handshake, a plain connection's wait for its first
    /// bytes, and each HTTP/1 request head.
    pub(super) header_read: Duration,
    pub(super) shutdown_grace: Duration,
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
        metrics: None,
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
    mut info: ConnInfo,
    tls: Option<TlsAcceptor>,
    builders: Arc<Builders>,
    proxy: Arc<Live>,
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
        metrics: Some(metrics.clone()),
    };
    match tls {
        None => {
            // Boxed, as what comes after it: the task keeps room for its largest state.
            let Some(h2) = Box::pin(plain_protocol(&stream, &builders, info.peer)).await else {
                return;
            };
            // The plain stream counts the bytes it sends from memory files in the node's
            // metrics. It is tracked from outside: its sendfile calls are its writes.
            let plain = Plain::new(stream, metrics);
            let mut tracked = Tracked::new(plain, activity);
            if !h2 {
                tracked.time_heads(builders.header_read);
            }
            // Boxed here and below: the task's future is as large as its largest state, kept
            // for as long as the connection lives, idle included (see `park`).
            Box::pin(conns.serve(tracked, h2, proxy, info, &mut shutdown)).await
        }
        Some(acceptor) => {
            // Tracked under TLS: what counts is what reaches the socket (TLS records included),
            // and a refused write is seen even while rustls still takes plaintext into its
            // buffer.
            let tracked = Tracked::new(stream, activity);
            let Some(mut tls_stream) =
                handshake(acceptor, tracked, builders.header_read, info.peer).await
            else {
                return;
            };
            // RFC 9113 §3.2: over TLS, HTTP/2 is chosen by ALPN only.
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            info.tls_version = tls_stream
                .get_ref()
                .1
                .protocol_version()
                .map(tls_version_name);
            if !h2 {
                // Heads are timed below TLS: a head's first record starts its time.
                tls_stream.get_mut().0.time_heads(builders.header_read);
            }
            Box::pin(conns.serve(tls_stream, h2, proxy, info, &mut shutdown)).await
        }
    }
}

/// The TLS handshake, within `header_read_timeout`; `None` (logged) when it failed or timed out.
/// The stream comes boxed, as rustls's state is large: unboxed, it would be stored again in
/// each future it moves through, for as long as the connection lives.
async fn handshake(
    acceptor: TlsAcceptor,
    tracked: Tracked<TcpStream>,
    timeout: Duration,
    peer: SocketAddr,
) -> Option<Box<tokio_rustls::server::TlsStream<Tracked<TcpStream>>>> {
    match tokio::time::timeout(timeout, Box::pin(acceptor.accept(tracked))).await {
        Ok(Ok(s)) => Some(Box::new(s)),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            None
        }
    }
}

/// The access log's name of a TLS version, as nginx's `$ssl_protocol` writes it.
fn tls_version_name(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        // rustls negotiates nothing older; named should it ever.
        rustls::ProtocolVersion::TLSv1_1 => "TLSv1.1",
        rustls::ProtocolVersion::TLSv1_0 => "TLSv1",
        _ => "TLS",
    }
}

/// Which hyper connection serves a stream without parking (`Conns::run`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http2,
    /// HTTP/1 timed by hyper's own header-read timeout (the admin listener's).
    Http1HyperTimed,
}

/// What serving one connection needs besides its stream and service.
pub(super) struct Conns<'a> {
    pub(super) builders: &'a Builders,
    pub(super) activity: Arc<Activity>,
    pub(super) epoch: Instant,
    pub(super) peer: SocketAddr,
    /// Where parked connections are counted (the data listeners').
    pub(super) metrics: Option<Arc<Metrics>>,
}

impl Conns<'_> {
    async fn serve<X>(
        self,
        stream: X,
        h2: bool,
        proxy: Arc<Live>,
        info: ConnInfo,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        X: H1Stream,
    {
        let proxy = proxy.current();
        if h2 {
            // Flow control can stop an HTTP/2 response with the socket writable, so its body
            // reports when hyper holds a chunk of it (`Watched`). HTTP/1 needs no such
            // report: a response it cannot send is a write the socket refuses.
            let activity = self.activity.clone();
            let service = service_fn(move |req| {
                Reporting::<Watched>::new(proxy.handle(req, info), activity.clone())
            });
            // Boxed, as HTTP/1's serving state is (`serve_h1`): the task stays small.
            Box::pin(self.run(TokioIo::new(stream), Proto::Http2, service, shutdown)).await
        } else {
            // A head read starts a request; its response's body, once hyper is done with it,
            // marks the connection as waiting for the next head (`Answered`).
            let activity = self.activity.clone();
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                activity.begin_request(!req.body().is_end_stream());
                Reporting::<Answered>::new(proxy.handle(req, info), activity.clone())
            });
            self.serve_h1(stream, service, shutdown).await
        }
    }

    /// Serves HTTP/1 on `stream` with hyper's connection, parking it whenever it idles
    /// (`park`): hyper's connection is closed, the stream kept and waited on with no buffers,
    /// and a new hyper connection takes the next request. A parked connection is closed when
    /// `idle_timeout` passes or the node shuts down.
    async fn serve_h1<X, S>(self, stream: X, service: S, shutdown: &mut watch::Receiver<bool>)
    where
        X: H1Stream,
        S: H1Service,
    {
        let mut watch = Watch::new(self.activity.snapshot(), self.epoch);
        let mut io = TokioIo::new(Parkable::new(stream, self.activity.clone()));
        let mut service = service;
        loop {
            // Boxed: a parked connection's task then keeps no room for the serving state.
            let parked = Box::pin(self.serve_h1_once(io, service, &mut watch, shutdown)).await;
            let Some(http1::Parts {
                io: parked_io,
                read_buf,
                service: parked_service,
                ..
            }) = parked
            else {
                return;
            };
            io = parked_io;
            service = parked_service;
            io.inner_mut().set_prefix(read_buf);
            if let Some(m) = &self.metrics {
                m.connection_parked();
            }
            let resume = self.parked(io.inner(), &watch, shutdown).await;
            if let Some(m) = &self.metrics {
                m.connection_unparked();
            }
            if !resume {
                // As hyper closes an idle connection: FIN, or TLS close_notify first.
                let grace = self.builders.limits.send;
                let _ = tokio::time::timeout(grace, io.inner_mut().shutdown()).await;
                return;
            }
        }
    }

    /// One hyper connection on `io`, to its end; its parts when it was parked.
    async fn serve_h1_once<X, S>(
        &self,
        io: H1Io<X>,
        service: S,
        watch: &mut Watch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<http1::Parts<H1Io<X>, S>>
    where
        X: H1Stream,
        S: H1Service,
    {
        let mut conn = H1Conn::new(self.builders.http1.serve_connection(io, service));
        self.drive(
            Pin::new(&mut conn),
            |c| c.get_mut().graceful_shutdown(),
            Some(|c: Pin<&mut H1Conn<X, S>>| c.get_mut().park()),
            watch,
            shutdown,
        )
        .await;
        conn.take_parked()
    }

    /// A parked connection's wait: true when its next request begins (bytes, or the client's
    /// end, to be read), false when it is to be closed (`idle_timeout`, node shutdown).
    async fn parked<X: Readiness>(
        &self,
        io: &Parkable<X>,
        watch: &Watch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        if io.has_prefix() {
            return true;
        }
        let idle_end = watch.idle_deadline(self.builders.limits);
        loop {
            if *shutdown.borrow() {
                // Idle connections close at once on shutdown, as nginx's do.
                return false;
            }
            tokio::select! {
                ready = io.readable() => return ready.is_ok(),
                () = tokio::time::sleep_until(idle_end) => return false,
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
    }

    /// Serves `io` with hyper's HTTP/2 (`h2`) or HTTP/1 connection and `service`, under
    /// `Conns::drive` (`drain`), with no parking (HTTP/2, and the admin listener's HTTP/1).
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
        let mut watch = Watch::new(self.activity.snapshot(), self.epoch);
        // Boxed: the task keeps its size for as long as the connection lives.
        match proto {
            Proto::Http2 => {
                let mut conn = Box::pin(self.builders.http2.serve_connection(io, service));
                let no_park = None::<fn(Pin<&mut _>)>;
                self.drive(
                    conn.as_mut(),
                    |c| c.graceful_shutdown(),
                    no_park,
                    &mut watch,
                    shutdown,
                )
                .await
            }
            Proto::Http1HyperTimed => {
                let conn = self
                    .builders
                    .http1_hyper_timed
                    .serve_connection(io, service);
                let mut conn = Box::pin(conn);
                let no_park = None::<fn(Pin<&mut _>)>;
                self.drive(
                    conn.as_mut(),
                    |c| c.graceful_shutdown(),
                    no_park,
                    &mut watch,
                    shutdown,
                )
                .await
            }
        }
    }
}

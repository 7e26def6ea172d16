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
use std::sync::Arc;
use std::time::Duration;

use http_body::Body as HttpBody;
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::plain::Plain;
use super::reporting::{Answered, Reporting, Watched};
use super::sniff::plain_protocol;
use super::timeouts::Limits;
use super::tracked::{Activity, Cycle, Tracked};
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
            info.tls_version = tls_stream
                .get_ref()
                .1
                .protocol_version()
                .map(tls_version_name);
            if !h2 {
                // Heads are timed below TLS: a head's first record starts its time.
                tls_stream.get_mut().0.time_heads(builders.header_read);
            }
            let io = TokioIo::new(tls_stream);
            conns.serve(io, h2, proxy, info, &mut shutdown).await
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
pub(super) struct Conns<'a> {
    pub(super) builders: &'a Builders,
    pub(super) activity: Arc<Activity>,
    pub(super) epoch: Instant,
    pub(super) peer: SocketAddr,
}

impl Conns<'_> {
    async fn serve<I>(
        self,
        io: I,
        h2: bool,
        proxy: Arc<Live>,
        info: ConnInfo,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
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
    /// `Conns::drive` (`drain`).
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
}

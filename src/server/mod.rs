//! Sockets: listeners, the accept loop with the connection limits (in all, and per client
//! address in `limit`), TLS, and connection drain.
//!
//! Only this module touches sockets and TLS. It hands every request to [`Proxy::handle`] and
//! counts what it does itself (connections refused at accept, bytes sent with `sendfile`) in
//! telemetry's `Metrics`; the admin listener runs the same accept loop ([`accept_with`]) and
//! connection handling ([`conn::serve_plain`]) with its own service.

pub mod conn;
mod drain;
pub mod limit;
mod park;
pub mod plain;
mod reporting;
mod sniff;
mod timeouts;
pub mod tls;
mod tracked;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::proxy::{ConnInfo, Live};
use crate::telemetry::metrics::Metrics;
use conn::Builders;

/// Counts open connections so shutdown can wait for them to drain.
#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Arc<(AtomicUsize, Notify)>,
}

/// Held by a connection task; dropping it marks the connection closed.
pub struct ConnGuard(ConnTracker);

impl ConnTracker {
    pub fn enter(&self) -> ConnGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self.clone())
    }

    pub fn open(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.1.notify_waiters();
        }
    }
}

/// What every accept loop shares.
#[derive(Clone)]
pub struct Shared {
    /// The proxy in service; each request loads the current one (a reload swaps it).
    pub proxy: Arc<Live>,
    /// Where connections refused at accept and bytes sent with `sendfile` are counted.
    pub metrics: Arc<Metrics>,
    /// The `[server]` timeouts and protocol settings new connections are served with (a
    /// reload swaps them; a connection keeps the ones it was accepted with).
    pub builders: Arc<ArcSwap<Builders>>,
    /// `max_connections`: one permit per open connection ([`resize_limit`] on a reload).
    pub limit: Arc<Semaphore>,
    /// `max_connections_per_client` (a reload changes it in place).
    pub per_client: Arc<limit::PerClient>,
    pub tracker: ConnTracker,
    pub shutdown: watch::Receiver<bool>,
}

/// Accepts connections on one listener until `stop` turns true (the node shuts down, or a
/// reload removed the listener); its connections drain with the node's shutdown. `tls` is
/// set for HTTPS listeners.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<tls::LiveTls>>,
    shared: Shared,
    stop: watch::Receiver<bool>,
) {
    accept_requests(listener, tls, shared, stop, false).await
}

/// The peer listener (`cluster.listen`): the data listeners' loop, its requests marked as
/// coming from a member (see `ConnInfo::from_peer`).
pub async fn peer_accept_loop(listener: TcpListener, shared: Shared, stop: watch::Receiver<bool>) {
    accept_requests(listener, None, shared, stop, true).await
}

async fn accept_requests(
    listener: TcpListener,
    tls: Option<Arc<tls::LiveTls>>,
    shared: Shared,
    stop: watch::Receiver<bool>,
    from_peer: bool,
) {
    let Shared {
        proxy,
        metrics,
        builders,
        limit,
        per_client,
        tracker,
        shutdown,
    } = shared;
    let https = tls.is_some();
    accept_with(listener, limit, stop, move |stream, peer| {
        let peer = canonical(peer);
        // `max_connections_per_client`: a peer at its cap has the new connection reset at
        // once, unanswered (see `limit`).
        let slot = per_client.enter(peer.ip()).ok_or(());
        let work = match slot {
            Ok(slot) => {
                let info = if from_peer {
                    ConnInfo::peer_listener(peer)
                } else {
                    ConnInfo::new(peer, https, None)
                };
                let guard = tracker.enter();
                // Boxed: the spawned future then holds a pointer, not a second copy of the
                // connection's state.
                let task = Box::pin(conn::serve(
                    stream,
                    info,
                    // The certificates in service when the connection came: a reload
                    // serves new ones to new handshakes only.
                    tls.as_ref().map(|t| TlsAcceptor::from(t.load_full())),
                    builders.load_full(),
                    proxy.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                Some((task, guard, slot))
            }
            Err(()) => {
                tracing::debug!(peer = %peer, "connection refused: max_connections_per_client");
                metrics.connection_refused();
                limit::refuse(stream);
                None
            }
        };
        async move {
            if let Some((task, guard, slot)) = work {
                task.await;
                drop(guard);
                drop(slot);
            }
        }
    })
    .await
}

/// The accept loop every listener runs (the data listeners and the admin listener): until
/// `shutdown`, takes a slot from `limit`, accepts, and runs `serve(stream, peer)` on its own
/// task, which holds the slot until it ends.
///
/// The slot is taken before `accept`, so clients beyond the limit wait in the listen backlog
/// rather than being accepted and left unserved. An accept error (out of file descriptors and
/// the like) is logged and followed by a short pause, so the loop does not spin on it.
pub async fn accept_with<F, Fut>(
    listener: TcpListener,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let task = serve(stream, peer);
        tokio::spawn(async move {
            task.await;
            drop(permit);
        });
    }
    tracing::debug!(listener = ?local, "stopped accepting");
}

/// Changes how many connections `limit` admits from `from` to `to` (a reload changed
/// `max_connections`). More: at once. Fewer: the free permits are withdrawn at once, and
/// what is still held by open connections is withdrawn as they close, so the node settles
/// at the new limit without closing any connection.
pub fn resize_limit(limit: &Arc<Semaphore>, from: usize, to: usize) {
    if to >= from {
        limit.add_permits(to - from);
        return;
    }
    let rest = (from - to) - limit.forget_permits(from - to);
    if rest == 0 {
        return;
    }
    let limit = limit.clone();
    tokio::spawn(async move {
        let rest = u32::try_from(rest).unwrap_or(u32::MAX);
        if let Ok(permits) = limit.acquire_many_owned(rest).await {
            permits.forget();
        }
    });
}

/// How long the accept loop pauses after a failed `accept` (EMFILE, ENFILE, ENOBUFS...):
/// long enough not to spin on a condition that lasts, short enough that a freed descriptor
/// is used soon.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The peer as everything downstream sees it: on a dual-stack `[::]` listener an IPv4
/// client arrives as `::ffff:a.b.c.d`, which no IPv4 network in the configuration
/// (`trusted_proxies`, `purge_allow`, geo networks and routes) would contain, and which would
/// be written as such into `X-Forwarded-For` and the access log.
fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Binds a listener with `SO_REUSEADDR` so a restart does not wait for TIME_WAIT sockets.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_resized_limit_settles_at_the_new_number_without_closing_anything() {
        let limit = Arc::new(Semaphore::new(4));
        let held: Vec<_> = (0..3)
            .map(|_| limit.clone().try_acquire_owned().expect("permit"))
            .collect();
        resize_limit(&limit, 4, 2);
        assert_eq!(
            limit.available_permits(),
            0,
            "the free one withdrawn at once"
        );
        drop(held);
        // One of the three held is withdrawn as it comes back; two remain.
        let mut seen = 0;
        for _ in 0..1000 {
            seen = limit.available_permits();
            if seen == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(seen, 2);
        resize_limit(&limit, 2, 5);
        assert_eq!(limit.available_permits(), 5);
    }

    #[test]
    fn ipv4_mapped_peers_are_recorded_as_ipv4() {
        let check = |peer: &str, expected: &str| {
            let peer: SocketAddr = peer.parse().expect("peer");
            assert_eq!(
                canonical(peer),
                expected.parse().expect("expected"),
                "{peer}"
            );
        };
        check("[::ffff:192.0.2.7]:4711", "192.0.2.7:4711");
        check("[::ffff:127.0.0.1]:80", "127.0.0.1:80");
        check("192.0.2.7:4711", "192.0.2.7:4711");
        check("[::1]:80", "[::1]:80");
        check("[2001:db8::1]:443", "[2001:db8::1]:443");
        // IPv4-compatible (deprecated, ::a.b.c.d) addresses are IPv6 addresses, not clients
        // of a dual-stack socket.
        check("[::192.0.2.7]:80", "[::c000:207]:80");
    }
}

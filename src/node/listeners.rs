//! Listening sockets: bound here, or inherited from the process before (a binary upgrade),
//! and offered to the process after.

use super::*;

/// A listener for every address of `addrs`, in order, with its bound address: the one the
/// process before handed over for it (a binary upgrade), else bound here.
pub(super) fn bind_all(
    addrs: &[SocketAddr],
    kind: upgrade::Kind,
    inherited: &mut upgrade::Inherited,
) -> Result<Vec<(TcpListener, SocketAddr)>, Error> {
    addrs
        .iter()
        .map(|&addr| {
            let l = match inherited.take(kind, addr) {
                Some(l) => l,
                None => server::bind(addr),
            }
            .map_err(|source| Error::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Ok((l, bound))
        })
        .collect()
}

/// With `server.upgrade_socket`: the listeners of the process running before, if one answers
/// there (a binary upgrade). Without an answer, none: everything is bound anew.
/// The flag says whether there was one.
pub(super) async fn inherit(config: &Config) -> (upgrade::Inherited, bool) {
    let Some(path) = &config.server.upgrade_socket else {
        return (upgrade::Inherited::default(), false);
    };
    match upgrade::take_over(path).await {
        Ok(Some(inherited)) => {
            tracing::info!(socket = %path.display(), "took the listening sockets over from the running edgecache");
            (inherited, true)
        }
        Ok(None) => (upgrade::Inherited::default(), false),
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "upgrade socket: no listeners taken over; binding them anew");
            (upgrade::Inherited::default(), false)
        }
    }
}

/// A duplicate of `l`'s descriptor, kept to hand the listener to the next process when
/// `keep` (the node has an upgrade socket). Dropped with the listener's entry when a reload
/// closes it, so a closed listener is not held open for an upgrade.
pub(super) fn handover_fd(
    keep: bool,
    l: &TcpListener,
    bound: SocketAddr,
) -> Result<Option<OwnedFd>, Error> {
    if !keep {
        return Ok(None);
    }
    l.as_fd()
        .try_clone_to_owned()
        .map(Some)
        .map_err(|source| Error::Bind {
            addr: bound,
            source,
        })
}

/// With `server.upgrade_socket`: offers the node's listeners to the next process there, as
/// they are when it asks (those a reload opened included, those it closed not). The receiver
/// turns true once they are handed over (the node should then drain and stop).
pub(super) fn offer_listeners(config: &Config, reloader: Arc<Reloader>) -> watch::Receiver<bool> {
    let (done, handed) = watch::channel(false);
    let Some(path) = config.server.upgrade_socket.clone() else {
        return handed;
    };
    tokio::spawn(async move {
        match upgrade::offer(&path, || reloader.handover()).await {
            Ok(()) => {
                tracing::info!("listening sockets handed to a new edgecache: draining");
                let _ = done.send(true);
            }
            Err(e) => {
                tracing::error!(socket = %path.display(), error = %e, "upgrade socket unusable: a new process cannot take the listeners over");
                // Kept open (never true) so the node is not told to stop.
                std::future::pending::<()>().await;
            }
        }
    });
    handed
}

/// One open data listener.
pub(super) struct Listening {
    pub(super) kind: upgrade::Kind,
    /// Its address as configured (port 0 included): what a reload compares.
    pub(super) configured: SocketAddr,
    pub(super) bound: SocketAddr,
    pub(super) stop: watch::Sender<bool>,
    /// What is handed to the next process in a binary upgrade ([`handover_fd`]).
    pub(super) fd: Option<OwnedFd>,
}

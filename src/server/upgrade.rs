//! Binary upgrade by socket handover (`server.upgrade_socket`): a running node hands its
//! listening sockets to a new edgecache process over a Unix socket, as pingora does, so the
//! ports never stop accepting. Both processes hold the same listening sockets for a moment;
//! a connection waiting in the kernel's queue is accepted by whichever calls `accept` next,
//! and none is refused. The old process then stops accepting and drains.
//!
//! The exchange, one per upgrade: the new process connects and sends [`HELLO`]; the old one
//! answers with one message whose text has a line per listener, `KIND CONFIGURED BOUND`
//! (`http 0.0.0.0:80 0.0.0.0:80`), in the order of the descriptors the message carries
//! (`SCM_RIGHTS`). The new process takes each listener its own configuration names with the
//! same kind and configured address; it binds the others itself.
//!
//! Written here because no maintained crate does this handover for tokio listeners; rustix
//! gives the system calls (`sendmsg`/`recvmsg` with descriptors), as it does for sendfile.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// What a new process says first.
const HELLO: &[u8] = b"edgecache-upgrade 1\n";

/// Listeners handed over in one message at most (the kernel allows 253 descriptors).
const MAX_LISTENERS: usize = 64;

/// The description of the listeners in one message, at most.
const MAX_TEXT: usize = 16 << 10;

/// Which kind of listener a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Https,
    /// The admin listener: handed over too, so the new process never fails on its port
    /// after the old one has begun to drain.
    Admin,
    /// A fleet's peer listener (`cluster.listen`).
    Peer,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Https => "https",
            Kind::Admin => "admin",
            Kind::Peer => "peer",
        }
    }
}

/// A listening socket as offered or received: its kind, the address the configuration
/// gives (port 0 included), and the descriptor.
#[derive(Debug)]
pub struct Handed {
    pub kind: Kind,
    pub configured: SocketAddr,
    pub fd: OwnedFd,
}

/// Listeners received from the process that ran before, taken one by one as the
/// configuration names them.
#[derive(Debug, Default)]
pub struct Inherited(Vec<Handed>);

impl Inherited {
    /// The listener for `kind` on `configured`, if the old process had one; as a tokio
    /// listener.
    pub fn take(&mut self, kind: Kind, configured: SocketAddr) -> Option<io::Result<TcpListener>> {
        let i = self
            .0
            .iter()
            .position(|h| h.kind == kind && h.configured == configured)?;
        let h = self.0.remove(i);
        let std = std::net::TcpListener::from(h.fd);
        Some(
            std.set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std)),
        )
    }

    /// Listeners the old process had and this configuration does not name.
    pub fn unused(&self) -> usize {
        self.0.len()
    }
}

/// Asks the process serving on `path` for its listeners. `Ok(None)` when none answers there
/// (no file, or a file left by a process that is gone): the caller binds as usual.
pub async fn take_over(path: &Path) -> io::Result<Option<Inherited>> {
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.write_all(HELLO).await?;
    let mut text = vec![0u8; MAX_TEXT];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    let (n, fds) = loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                stream.as_fd(),
                &mut [io::IoSliceMut::new(&mut text)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            let mut fds = Vec::new();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            Ok((msg.bytes, fds))
        });
        match got {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let text = std::str::from_utf8(&text[..n])
        .map_err(|_| invalid("the old process's description is not text"))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != fds.len() {
        return Err(invalid("descriptors and their description do not agree"));
    }
    let mut handed = Vec::with_capacity(fds.len());
    for (line, fd) in lines.into_iter().zip(fds) {
        let mut parts = line.split(' ');
        let kind = match parts.next() {
            Some("http") => Kind::Http,
            Some("https") => Kind::Https,
            Some("admin") => Kind::Admin,
            Some("peer") => Kind::Peer,
            _ => return Err(invalid("an unknown listener kind")),
        };
        let configured = parts
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| invalid("a listener without its address"))?;
        handed.push(Handed {
            kind,
            configured,
            fd,
        });
    }
    Ok(Some(Inherited(handed)))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Listens on `path` (replacing a file left there) and hands the listeners `listeners` gives
/// at that moment (each with its bound address, for the description) to the first process
/// that asks. Returns once one has them:
/// the caller then stops accepting and drains. A peer that does not speak the exchange is
/// dropped and the next one waited for.
pub async fn offer(
    path: &Path,
    listeners: impl Fn() -> Vec<(Handed, SocketAddr)>,
) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let server = UnixListener::bind(path)?;
    loop {
        let (mut peer, _) = server.accept().await?;
        let mut hello = [0u8; HELLO.len()];
        let said = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            peer.read_exact(&mut hello),
        )
        .await;
        if !matches!(said, Ok(Ok(_))) || hello != HELLO {
            tracing::warn!(socket = %path.display(), "upgrade socket: a peer that is not an edgecache upgrade; ignored");
            continue;
        }
        match send(&peer, &listeners()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: handing the listeners over failed; still serving");
            }
        }
    }
}

async fn send(peer: &UnixStream, listeners: &[(Handed, SocketAddr)]) -> io::Result<()> {
    let mut text = String::new();
    for (h, bound) in listeners {
        text.push_str(&format!("{} {} {bound}\n", h.kind.as_str(), h.configured));
    }
    if listeners.len() > MAX_LISTENERS || text.len() > MAX_TEXT {
        return Err(invalid("too many listeners to hand over in one message"));
    }
    let fds: Vec<_> = listeners.iter().map(|(h, _)| h.fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LISTENERS))];
    loop {
        peer.writable().await?;
        let sent = peer.try_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(invalid("the descriptors do not fit in one message"));
            }
            Ok(rustix::net::sendmsg(
                peer.as_fd(),
                &[io::IoSlice::new(text.as_bytes())],
                &mut control,
                SendFlags::NOSIGNAL,
            )?)
        });
        match sent {
            Ok(n) if n == text.len() => return Ok(()),
            Ok(_) => return Err(invalid("the description was cut short")),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

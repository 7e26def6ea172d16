//! The plain-TCP stream that hyper serves over: a `TcpStream`, except that a slice hyper
//! writes which lies inside a stored body's memory file (`cache::mapped`) is sent with
//! `sendfile(2)`, from the file's pages, without copying it through user memory.
//!
//! hyper writes a response as one vectored write of [head, body] (and, once the socket is
//! full, of what is left). When a slice is found inside a memory file, the slices before it
//! (the head) go first with `MSG_MORE`, so that the kernel holds them back and sends them
//! in the same segments as the body, as nginx's `tcp_nopush` does; the found slice then
//! goes with `sendfile`. Each call makes one system call and reports what it sent, so hyper
//! advances its buffers exactly as after a partial `writev`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::telemetry::metrics::Metrics;

/// A client connection without TLS.
pub struct Plain {
    tcp: TcpStream,
    /// Where the bytes sent from files are counted.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    metrics: Arc<Metrics>,
}

impl Plain {
    pub fn new(tcp: TcpStream, metrics: Arc<Metrics>) -> Plain {
        Plain { tcp, metrics }
    }

    pub(super) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// One system call on the socket once it is writable; `WouldBlock` waits for the next
    /// readiness, as tokio's own writes do.
    #[cfg(target_os = "linux")]
    fn poll_raw(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_io(tokio::io::Interest::WRITABLE, &mut op) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return Poll::Ready(res),
            }
        }
    }

    /// Sends from a memory file when one of `bufs` lies in one; `None` leaves the write to
    /// the socket's own `writev`.
    #[cfg(target_os = "linux")]
    fn poll_from_file(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        use rustix::net::{SendAncillaryBuffer, SendFlags};

        let (at, fd, offset) = bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| crate::cache::mapped::find(b).map(|(fd, off)| (i, fd, off)))?;
        if at > 0 {
            // What comes before the body (the head): held back until the body follows.
            let head = &bufs[..at];
            return Some(self.poll_raw(cx, || {
                rustix::net::sendmsg(
                    &self.tcp,
                    head,
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::MORE | SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            }));
        }
        let len = bufs[0].len();
        let sent = self.poll_raw(cx, || {
            let mut off = offset;
            match rustix::fs::sendfile(&self.tcp, &*fd, Some(&mut off), len) {
                // The file is sealed and at least offset + len long, so 0 cannot mean its end;
                // report it as the failed write it would be.
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                other => other.map_err(io::Error::from),
            }
        });
        if let Poll::Ready(Ok(n)) = sent {
            self.metrics.sent_from_file(n as u64);
        }
        Some(sent)
    }
}

impl AsyncRead for Plain {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if let Some(res) = self.poll_from_file(cx, bufs) {
            return res;
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

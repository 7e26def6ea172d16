//! The connection's stream, wrapped ([`Tracked`]) to count what it moves and note writes the
//! socket refused in the connection's [`Activity`], which the idle and send timeouts read
//! (`timeouts`); on HTTP/1 it also times request heads ([`HeadTimer`], `header_read_timeout`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::timeouts::Snapshot;

/// What a connection reports to its [`Watch`](super::timeouts::Watch). The stream, used by one
/// task, counts its reads and writes and sets `refused` with plain loads and stores (no
/// locked instruction); HTTP/2 response bodies, polled on their streams' own tasks, count
/// `held` and `taken` with atomic adds.
#[derive(Debug, Default)]
pub(super) struct Activity {
    reads: AtomicU64,
    writes: AtomicU64,
    /// A write or flush returned `Pending` (the socket is full); cleared by the next write
    /// that moves bytes.
    refused: AtomicBool,
    /// HTTP/2: response bodies that handed hyper a chunk and have not been asked for the next.
    pub(super) held: AtomicUsize,
    /// HTTP/2: chunks hyper took from response bodies.
    pub(super) taken: AtomicU64,
    /// HTTP/1: where the connection is in its request cycle (a [`Cycle`]), for [`HeadTimer`].
    /// Written and read on the connection's task only.
    cycle: AtomicU8,
    /// HTTP/1, for parking (`park`), all on the connection's task: hyper's last read of the
    /// stream found nothing to read.
    read_blocked: AtomicBool,
    /// The last response was flushed to the socket and nothing moved either way since.
    clean: AtomicBool,
    /// The request in flight or last served came with a body (hyper may still read it).
    body: AtomicBool,
}

impl Activity {
    pub(super) fn cycle(&self) -> Cycle {
        match self.cycle.load(Ordering::Relaxed) {
            1 => Cycle::Waiting,
            2 => Cycle::Head,
            _ => Cycle::Request,
        }
    }

    pub(super) fn set_cycle(&self, cycle: Cycle) {
        self.cycle.store(cycle as u8, Ordering::Relaxed);
    }

    /// hyper's service was called with a request head (HTTP/1): `has_body` when the request
    /// has a body to read.
    pub(super) fn begin_request(&self, has_body: bool) {
        self.set_cycle(Cycle::Request);
        self.body.store(has_body, Ordering::Relaxed);
    }

    /// A read of the HTTP/1 stream returned; `data` when it brought bytes.
    pub(super) fn note_read(&self, data: bool) {
        self.read_blocked.store(false, Ordering::Relaxed);
        if data {
            self.clean.store(false, Ordering::Relaxed);
        }
    }

    /// A read of the HTTP/1 stream found nothing to read.
    pub(super) fn note_read_blocked(&self) {
        self.read_blocked.store(true, Ordering::Relaxed);
    }

    /// A write to the HTTP/1 stream moved bytes.
    pub(super) fn note_written(&self) {
        self.clean.store(false, Ordering::Relaxed);
    }

    /// hyper flushed the HTTP/1 stream, which it does once its write buffer is empty: after
    /// the last response ended, that response is on the socket.
    pub(super) fn note_flushed(&self) {
        if self.cycle() == Cycle::Waiting {
            self.clean.store(true, Ordering::Relaxed);
        }
    }

    /// True when hyper's HTTP/1 connection can be closed and its stream kept with nothing
    /// lost (`park`): the last response is done and on the socket, nothing was read since,
    /// hyper waits for bytes, and no request body may still be arriving.
    pub(super) fn parkable(&self) -> bool {
        self.cycle() == Cycle::Waiting
            && self.clean.load(Ordering::Relaxed)
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.body.load(Ordering::Relaxed)
    }

    pub(super) fn snapshot(&self) -> Snapshot {
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
pub(super) enum Cycle {
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

/// An I/O stream that reports to its connection's [`Activity`]: reads and writes that moved
/// bytes, and writes the socket refused. On HTTP/1 it also times request heads.
pub(super) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    head: Option<HeadTimer>,
}

impl<S> Tracked<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            head: None,
        }
    }

    pub(super) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Times HTTP/1 request heads from here on, the first from now.
    pub(super) fn time_heads(&mut self, timeout: Duration) {
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

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

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
}

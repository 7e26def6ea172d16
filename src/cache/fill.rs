//! In-flight fills: concurrent misses for one key share one origin response.
//!
//! The first request for a key becomes the *leader* and fetches; later ones *follow* the same
//! [`Fill`] and wait for its outcome. A storable response is published as a head plus a body
//! that grows as the origin sends it; every follower reads it from the start at its own pace
//! ([`FillReader`]), so all clients are served as bytes arrive, not when the transfer ends.
//! An uncacheable response releases the followers at once to fetch for themselves.
//!
//! Written here rather than with a broadcast channel: readers that join late must replay from
//! byte zero, and once a response turns out too large to store the retained bytes must be
//! trimmed to what the slowest reader still needs (with the fetch slowed to match), so memory
//! stays flat for bodies of any size.

use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use super::entry::Entry;
use super::key::{PrehashedKey, VaryKey};

/// The head of a storable response being filled.
#[derive(Debug)]
pub struct FillHead {
    pub status: StatusCode,
    /// Headers ready for clients (without `Cache-Status` and `Age`).
    pub headers: HeaderMap,
    pub vary: VaryKey,
    pub content_length: Option<u64>,
}

/// What a fill turned into. `F` is what a failed fetch tells followers (the request path's
/// error): this module only carries it.
#[derive(Debug, Clone)]
pub enum Outcome<F> {
    /// The leader has not heard from the origin yet.
    Pending,
    /// A storable response is arriving: read it with [`Fill::reader`].
    Streaming(Arc<FillHead>),
    /// The response may not be shared: fetch for yourself.
    Uncacheable,
    /// The stored response was revalidated (or is otherwise ready): serve it.
    Ready(Arc<Entry>),
    /// The fetch failed: followers get the leader's error itself.
    Failed(F),
    /// The leader went away before an answer: join again.
    Retry,
}

#[derive(Debug)]
struct State<F> {
    outcome: Option<Outcome<F>>,
    chunks: VecDeque<Bytes>,
    /// Offset of the first retained chunk.
    base: u64,
    /// Bytes received so far.
    len: u64,
    /// Bytes readers may see (the last bytes are held back until the object is stored, so a
    /// client never finishes reading before the object is findable).
    visible: u64,
    /// `Some(true)` complete, `Some(false)` aborted.
    done: Option<bool>,
    /// Not being stored: bytes every reader has passed may be dropped.
    abandoned: bool,
    /// Cursor of each reader (by id); `None` for a finished slot.
    readers: Vec<Option<u64>>,
    wakers: Vec<Option<Waker>>,
}

/// One in-flight origin response shared by every request for its key.
#[derive(Debug)]
pub struct Fill<F> {
    state: Mutex<State<F>>,
    /// Woken when the outcome is set.
    outcome_set: Notify,
    /// Woken when a reader advances or leaves (the pump waits on it once abandoned).
    progress: Notify,
}

impl<F> Default for State<F> {
    fn default() -> Self {
        State {
            outcome: None,
            chunks: VecDeque::new(),
            base: 0,
            len: 0,
            visible: 0,
            done: None,
            abandoned: false,
            readers: Vec::new(),
            wakers: Vec::new(),
        }
    }
}

impl<F> Default for Fill<F> {
    fn default() -> Self {
        Fill {
            state: Mutex::default(),
            outcome_set: Notify::new(),
            progress: Notify::new(),
        }
    }
}

impl<F> Fill<F> {
    fn lock(&self) -> MutexGuard<'_, State<F>> {
        // A panic while holding this lock cannot leave the state inconsistent in a way that
        // matters more than losing the fill, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<F: Clone> Fill<F> {
    /// Sets the outcome (once) and wakes everyone waiting for it.
    pub fn publish(&self, outcome: Outcome<F>) {
        {
            let mut st = self.lock();
            if st.outcome.is_some() {
                return;
            }
            st.outcome = Some(outcome);
        }
        self.outcome_set.notify_waiters();
    }

    /// True once an outcome is set.
    pub fn is_published(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Waits for the outcome. For a streaming outcome, a reader is registered at the same
    /// moment, so no byte can be trimmed before it starts.
    pub async fn wait(self: &Arc<Self>, want_reader: bool) -> (Outcome<F>, Option<FillReader<F>>) {
        loop {
            let notified = self.outcome_set.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                match &st.outcome {
                    None => {}
                    Some(Outcome::Streaming(head)) => {
                        let head = head.clone();
                        if st.abandoned && st.base > 0 {
                            // Too late to replay from the start.
                            return (Outcome::Uncacheable, None);
                        }
                        let reader = want_reader.then(|| self.register(&mut st));
                        return (Outcome::Streaming(head), reader);
                    }
                    Some(other) => return (other.clone(), None),
                }
            }
            notified.await;
        }
    }

    fn register(self: &Arc<Self>, st: &mut State<F>) -> FillReader<F> {
        let id = st.readers.len();
        st.readers.push(Some(st.base));
        st.wakers.push(None);
        FillReader {
            fill: self.clone(),
            id,
            pos: st.base,
            done: false,
        }
    }

    /// A reader from byte zero, for the leader after it publishes a streaming outcome.
    pub fn reader(self: &Arc<Self>) -> Option<FillReader<F>> {
        let mut st = self.lock();
        (st.base == 0).then(|| self.register(&mut st))
    }

    /// Appends body bytes and wakes readers.
    pub fn push(&self, data: Bytes) {
        self.push_hidden(data);
        self.reveal();
    }

    /// Appends body bytes that readers see only after [`Fill::reveal`] or [`Fill::finish`].
    pub fn push_hidden(&self, data: Bytes) {
        let mut st = self.lock();
        st.len += data.len() as u64;
        st.chunks.push_back(data);
    }

    /// Makes every received byte visible and wakes readers.
    pub fn reveal(&self) {
        let wakers = {
            let mut st = self.lock();
            st.visible = st.len;
            take_wakers(&mut st)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// True when no bytes were received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the body: `complete` false means the transfer was cut and readers get an error.
    pub fn finish(&self, complete: bool) {
        let wakers = {
            let mut st = self.lock();
            st.done = Some(complete);
            st.visible = st.len;
            take_wakers(&mut st)
        };
        wakers.into_iter().for_each(Waker::wake);
        self.outcome_set.notify_waiters();
        self.progress.notify_waiters();
    }

    /// The whole body in one exact-size `Bytes`; `None` once bytes were trimmed. A body of at
    /// least `map_from` bytes goes into a sealed memory file (`mapped`) when the kernel allows,
    /// so that plain HTTP/1.1 hits can send it with `sendfile`.
    pub fn collect(&self, map_from: Option<u64>) -> Option<Bytes> {
        let mut st = self.lock();
        if st.base != 0 {
            return None;
        }
        let len = st.len;
        let body = if map_from.is_some_and(|min| len >= min) {
            // Writing a memory file is system calls: done without the lock, on handles to the
            // chunks (reference counts). Only this task adds bytes, and it has stopped.
            let chunks: Vec<Bytes> = st.chunks.iter().cloned().collect();
            drop(st);
            let body = map_body(&chunks, len);
            drop(chunks);
            st = self.lock();
            if st.base != 0 || st.len != len {
                return None;
            }
            body
        } else {
            None
        };
        // Always one exact-size copy: a chunk handed up by the connection may be a slice of a
        // much larger read buffer, and storing the slice would pin the whole buffer for as long
        // as the object lives. One memcpy per stored object is the price of honest memory use.
        let body = body.unwrap_or_else(|| {
            let mut buf = BytesMut::with_capacity(len as usize);
            for c in &st.chunks {
                buf.extend_from_slice(c);
            }
            buf.freeze()
        });
        // Readers continue from the single copy, so the chunks are not held twice.
        st.chunks.clear();
        st.chunks.push_back(body.clone());
        Some(body)
    }

    /// Stops keeping bytes for storage: from now on they are kept only until every reader has
    /// passed them.
    pub fn abandon(&self) {
        let mut st = self.lock();
        st.abandoned = true;
        trim(&mut st);
    }

    /// Once abandoned, waits until readers are within `window` bytes of the fetch. Returns
    /// false when no reader is left (the fetch can stop).
    pub async fn wait_for_readers(&self, window: u64) -> bool {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                let active: Vec<u64> = st.readers.iter().flatten().copied().collect();
                if active.is_empty() {
                    return false;
                }
                let slowest = active.into_iter().min().unwrap_or(st.len);
                if st.len.saturating_sub(slowest) <= window {
                    return true;
                }
            }
            notified.await;
        }
    }

    /// Waits until the body is complete (true) or aborted (false).
    pub async fn wait_done(&self) -> bool {
        loop {
            let notified = self.outcome_set.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                match (&st.outcome, st.done) {
                    (_, Some(done)) => return done,
                    (Some(Outcome::Streaming(_)), None) | (None, None) => {}
                    (Some(_), None) => return false,
                }
            }
            notified.await;
        }
    }
}

fn take_wakers<F>(st: &mut State<F>) -> Vec<Waker> {
    st.wakers.iter_mut().filter_map(Option::take).collect()
}

fn trim<F>(st: &mut State<F>) {
    if !st.abandoned {
        return;
    }
    let slowest = st.readers.iter().flatten().copied().min().unwrap_or(st.len);
    while let Some(front) = st.chunks.front() {
        let end = st.base + front.len() as u64;
        if end > slowest {
            break;
        }
        st.base = end;
        st.chunks.pop_front();
    }
}

/// A client's view of a fill's body, from byte zero, at its own pace.
#[derive(Debug)]
pub struct FillReader<F> {
    fill: Arc<Fill<F>>,
    id: usize,
    pos: u64,
    done: bool,
}

/// The body ended early: the origin's transfer was cut.
#[derive(Debug, thiserror::Error)]
#[error("the origin's response was cut off")]
pub struct Aborted;

impl<F: Clone> Body for FillReader<F> {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let fill = self.fill.clone();
        let mut st = fill.lock();
        if self.pos < st.visible {
            // Find the chunk holding `pos` and hand out the rest of it, without copying.
            let mut offset = st.base;
            let mut found = None;
            for c in &st.chunks {
                let end = offset + c.len() as u64;
                if self.pos < end {
                    found = Some(c.slice((self.pos - offset) as usize..));
                    break;
                }
                offset = end;
            }
            let Some(mut data) = found else {
                // Our bytes were trimmed: cannot happen while we are registered.
                self.done = true;
                return Poll::Ready(Some(Err(Aborted)));
            };
            let visible_here = (st.visible - self.pos) as usize;
            if data.len() > visible_here {
                data.truncate(visible_here);
            }
            self.pos += data.len() as u64;
            let id = self.id;
            if let Some(slot) = st.readers.get_mut(id) {
                *slot = Some(self.pos);
            }
            trim(&mut st);
            drop(st);
            fill.progress.notify_waiters();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match st.done {
            Some(true) => {
                self.done = true;
                Poll::Ready(None)
            }
            Some(false) => {
                self.done = true;
                Poll::Ready(Some(Err(Aborted)))
            }
            None => {
                let id = self.id;
                if let Some(w) = st.wakers.get_mut(id) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let st = self.fill.lock();
        st.done == Some(true) && self.pos >= st.visible
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.fill.lock();
        if let (Some(Outcome::Streaming(head)), false) = (&st.outcome, self.done) {
            if let Some(n) = head.content_length {
                return SizeHint::with_exact(n.saturating_sub(self.pos));
            }
        }
        SizeHint::default()
    }
}

impl<F> Drop for FillReader<F> {
    fn drop(&mut self) {
        {
            let mut st = self.fill.lock();
            let id = self.id;
            if let Some(slot) = st.readers.get_mut(id) {
                *slot = None;
            }
            if let Some(w) = st.wakers.get_mut(id) {
                *w = None;
            }
            trim(&mut st);
        }
        self.fill.progress.notify_waiters();
    }
}

/// The map of in-flight fills by primary key (a keyed hash already: not hashed again), and
/// the budget of body bytes they may hold for storing.
#[derive(Debug)]
pub struct Fills<F> {
    map: Mutex<HashMap<u64, Arc<Fill<F>>, PrehashedKey>>,
    /// Body bytes held by fills that are still to be stored.
    held: AtomicU64,
    /// Bound on `held` (`cache.fill_memory`; a reload may change it).
    budget: AtomicU64,
    /// Fills given up because the budget was full.
    refused: AtomicU64,
}

impl<F> Default for Fills<F> {
    fn default() -> Self {
        Fills::new(u64::MAX)
    }
}

impl<F> Fills<F> {
    /// No fill map yet; fills may hold `budget` body bytes in all for storing.
    pub fn new(budget: u64) -> Fills<F> {
        Fills {
            map: Mutex::default(),
            held: AtomicU64::new(0),
            budget: AtomicU64::new(budget),
            refused: AtomicU64::new(0),
        }
    }

    /// Counts `n` more bytes held for storing. False when that passes the budget: the
    /// caller gives up storing its fill and gives back what it charged.
    pub fn charge(&self, n: u64) -> bool {
        let held = self.held.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        let ok = held <= self.budget.load(Ordering::Relaxed);
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Sets a new bound (a configuration reload); bytes held now stay counted.
    pub fn set_budget(&self, budget: u64) {
        self.budget.store(budget, Ordering::Relaxed);
    }

    /// Fills given up because the budget was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Gives back bytes counted by [`Fills::charge`].
    pub fn uncharge(&self, n: u64) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            });
    }

    /// Body bytes held for storing by fills in flight.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Joins the fill for `hash`, creating it if there is none. `true` means the caller created
    /// it and must lead (fetch and publish).
    pub fn join(&self, hash: u64) -> (Arc<Fill<F>>, bool) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.entry(hash) {
            Slot::Occupied(e) => (e.get().clone(), false),
            Slot::Vacant(e) => {
                let f = Arc::new(Fill::default());
                e.insert(f.clone());
                (f, true)
            }
        }
    }

    /// Removes `fill` from the map if it is still the one registered for `hash`.
    pub fn remove(&self, hash: u64, fill: &Arc<Fill<F>>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Slot::Occupied(e) = map.entry(hash) {
            if Arc::ptr_eq(e.get(), fill) {
                e.remove();
            }
        }
    }

    /// Fills in flight.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The body in a memory file (Linux only); `None` keeps it on the heap.
#[cfg(target_os = "linux")]
fn map_body(chunks: &[Bytes], len: u64) -> Option<Bytes> {
    super::mapped::store(chunks, usize::try_from(len).ok()?)
}

#[cfg(not(target_os = "linux"))]
fn map_body(_: &[Bytes], _: u64) -> Option<Bytes> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The next data frame a reader gets.
    async fn next_data(r: &mut FillReader<()>) -> Bytes {
        r.frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data")
    }

    fn head() -> Outcome<()> {
        Outcome::Streaming(Arc::new(FillHead {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            vary: VaryKey::default(),
            content_length: None,
        }))
    }

    #[tokio::test]
    async fn late_readers_replay_from_zero_and_all_see_every_byte() {
        let fill = Arc::new(Fill::<()>::default());
        fill.publish(head());
        let early = fill.reader().expect("reader");
        fill.push(Bytes::from_static(b"hello "));
        let (_, late) = fill.wait(true).await;
        fill.push(Bytes::from_static(b"world"));
        fill.finish(true);
        let a = early.collect().await.expect("body").to_bytes();
        let b = late
            .expect("reader")
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&a[..], b"hello world");
        assert_eq!(&b[..], b"hello world");
        assert_eq!(fill.collect(None).as_deref(), Some(&b"hello world"[..]));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_large_body_is_collected_into_a_memory_file_and_readers_go_on_from_it() {
        let fill = Arc::new(Fill::<()>::default());
        fill.publish(head());
        let mut early = fill.reader().expect("reader");
        let a: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..30_000u32).map(|i| (i % 241) as u8).collect();
        fill.push(Bytes::from(a.clone()));
        let first = next_data(&mut early).await;
        assert_eq!(&first[..], &a[..]);
        fill.push_hidden(Bytes::from(b.clone()));
        // Below the threshold: on the heap; at or above it: in a memory file.
        let heap = fill.collect(Some(70_001)).expect("collected");
        assert!(crate::cache::mapped::find(&heap).is_none());
        let body = fill.collect(Some(70_000)).expect("collected");
        assert!(crate::cache::mapped::find(&body).is_some());
        assert_eq!(&body[..40_000], &a[..]);
        assert_eq!(&body[40_000..], &b[..]);
        fill.finish(true);
        // The reader that had the first chunk gets the rest, now read from the file.
        let rest = early.collect().await.expect("body").to_bytes();
        assert_eq!(&rest[..], &b[..]);
        let late = fill
            .reader()
            .expect("reader")
            .collect()
            .await
            .expect("body");
        assert_eq!(late.to_bytes(), body);
    }

    #[tokio::test]
    async fn abandoned_fill_trims_what_readers_have_passed() {
        let fill = Arc::new(Fill::<()>::default());
        fill.publish(head());
        let mut r = fill.reader().expect("reader");
        fill.push(Bytes::from(vec![1u8; 100]));
        fill.push(Bytes::from(vec![2u8; 100]));
        fill.abandon();
        let first = next_data(&mut r).await;
        assert_eq!(first.len(), 100);
        assert_eq!(fill.lock().base, 100, "the first chunk was dropped");
        assert!(fill.collect(None).is_none());
        assert!(fill.wait_for_readers(100).await);
        drop(r);
        assert!(!fill.wait_for_readers(100).await, "no reader left");
    }

    #[tokio::test]
    async fn aborted_transfer_is_an_error_for_readers() {
        let fill = Arc::new(Fill::<()>::default());
        fill.publish(head());
        let r = fill.reader().expect("reader");
        fill.push(Bytes::from_static(b"part"));
        fill.finish(false);
        assert!(r.collect().await.is_err());
    }

    #[test]
    fn the_fill_budget_counts_and_gives_back() {
        let fills = Fills::<()>::new(100);
        assert!(fills.charge(60));
        assert!(fills.charge(40));
        assert!(!fills.charge(1), "past the budget");
        fills.uncharge(41);
        assert_eq!(fills.held(), 60);
        fills.uncharge(1000);
        assert_eq!(fills.held(), 0, "never below zero");
    }

    #[tokio::test]
    async fn followers_wait_for_the_outcome() {
        let fills = Fills::<()>::default();
        let (a, lead) = fills.join(7);
        assert!(lead);
        let (b, lead2) = fills.join(7);
        assert!(!lead2 && Arc::ptr_eq(&a, &b));
        let waiter = tokio::spawn(async move { b.wait(false).await.0 });
        a.publish(Outcome::Uncacheable);
        assert!(matches!(waiter.await.expect("join"), Outcome::Uncacheable));
        fills.remove(7, &a);
        assert!(fills.is_empty());
    }
}

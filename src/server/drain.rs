//! A hyper connection driven to its end under its guard: closed gracefully (an in-flight
//! response finishes) on node shutdown or when the [`Watch`] finds it idle, and dropped when
//! it stalls, when a drain makes no progress, or when `shutdown_grace` has passed since node
//! shutdown. The guard (shutdown signal and timeout ticks) is polled only when it woke the
//! task itself ([`Guarded`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::conn::Conns;
use super::timeouts::{Close, Draining, Verdict, Watch};

/// How often a connection that can park (`park`) is looked at while it is served: an idle
/// kept-alive connection gives back hyper's buffers within this, and a busy one pays for at
/// most one new hyper connection per this.
const PARK_TICK: Duration = Duration::from_secs(1);

/// What the guard decided.
enum Step {
    Act(Verdict),
    /// The connection waits for its next request and can be parked.
    Park,
}

impl Conns<'_> {
    /// Runs a hyper connection to its end. It is closed gracefully (`drain`: an in-flight
    /// response finishes) on node shutdown or once idle for `idle_timeout`, and dropped when
    /// it has bytes to send and sends none for `send_timeout`, when a drain moves no byte for
    /// `send_timeout`, or when `shutdown_grace` has passed since node shutdown. Dropping it
    /// drops its response bodies. With `park`, a tick that finds the connection parkable
    /// (`Activity::parkable`) calls it, and the connection then ends with its parts kept.
    /// `watch` carries the idle and send timeouts over from an earlier connection on the
    /// same stream.
    pub(super) async fn drive<C, D, P>(
        &self,
        mut conn: Pin<&mut C>,
        drain: D,
        mut park: Option<P>,
        watch: &mut Watch,
        shutdown: &mut watch::Receiver<bool>,
    ) where
        C: std::future::Future<Output = Result<(), hyper::Error>>,
        D: FnOnce(Pin<&mut C>),
        P: FnMut(Pin<&mut C>),
    {
        let mut drain = Some(drain);
        let mut draining = None;
        if *shutdown.borrow() {
            draining = Some(self.shutdown_drain());
            if let Some(d) = drain.take() {
                d(conn.as_mut());
            }
        }
        loop {
            let parks = park.is_some() && draining.is_none();
            let guard = self.guard(watch, draining, parks, shutdown);
            tokio::pin!(guard);
            let step = match Guarded::new(conn.as_mut(), guard).await {
                Ended::Conn(res) => {
                    if let Err(e) = res {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                Ended::Guard(step) => step,
            };
            match step {
                Step::Park => {
                    if let Some(p) = park.as_mut() {
                        p(conn.as_mut());
                    }
                    // Parked once: the connection ends at its next poll.
                    park = None;
                }
                Step::Act(Verdict::Drain(d)) => {
                    draining = Some(d);
                    if let Some(d) = drain.take() {
                        d(conn.as_mut());
                    }
                }
                Step::Act(Verdict::Close(why)) => {
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
    /// `shutdown_grace` ends, or when a tick of the [`Watch`] says so; with `parks`, also
    /// when a tick finds it parkable. Ticks four times per the shorter of `idle_timeout` and
    /// `send_timeout` (so each acts at most a quarter late), and at least every
    /// [`PARK_TICK`] with `parks`.
    async fn guard(
        &self,
        watch: &mut Watch,
        draining: Option<Draining>,
        parks: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Step {
        let limits = self.builders.limits;
        let mut tick = (limits.idle.min(limits.send) / 4).max(Duration::from_millis(1));
        if parks {
            tick = tick.min(PARK_TICK);
        }
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
                        return Step::Act(Verdict::Drain(self.shutdown_drain()));
                    }
                }
                () = &mut grace_end => return Step::Act(Verdict::Close(Close::Grace)),
                () = tokio::time::sleep(tick) => {
                    let now = Instant::now();
                    if let Some(v) = watch.look(self.activity.snapshot(), now, limits, draining) {
                        return Step::Act(v);
                    }
                    if parks && self.activity.parkable() {
                        return Step::Park;
                    }
                }
            }
        }
    }
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

//! The idle and send timeouts, judged from a connection's I/O counts a few times per timeout
//! ([`Watch`]): no clock is read per I/O. Pure: the counts and the time are parameters.

use std::time::Duration;

use tokio::time::Instant;

/// The timeouts a [`Watch`] applies.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// No byte moved either way, nothing waiting to be sent: drain.
    pub(super) idle: Duration,
    /// Bytes waiting to be sent and none sent: drop. Also: draining and no byte moved.
    pub(super) send: Duration,
}

/// A connection asked to finish (hyper's graceful shutdown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Draining {
    pub(super) since: Instant,
    /// Node shutdown: dropped at this time (`shutdown_grace`) if still open.
    pub(super) until: Option<Instant>,
}

/// What the guard decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Close gracefully.
    Drain(Draining),
    /// Drop the connection now.
    Close(Close),
}

/// Why a connection was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Close {
    /// It had bytes to send and sent none for `send_timeout`: the client stopped reading.
    Stalled,
    /// Draining, it moved no byte for `send_timeout`.
    Drain,
    /// Still open when `shutdown_grace` ended.
    Grace,
}

impl Close {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Close::Stalled => "client took no bytes for send_timeout",
            Close::Drain => "draining connection moved no bytes for send_timeout",
            Close::Grace => "still open when shutdown_grace ended",
        }
    }
}

/// The counts a tick reads off a connection's [`Activity`](super::tracked::Activity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// Reads that moved bytes.
    pub(super) reads: u64,
    /// Writes that moved bytes, plus chunks hyper took from HTTP/2 response bodies.
    pub(super) sent: u64,
    /// Bytes wait to be sent: the socket refused a write, or an HTTP/2 response body has a
    /// chunk in hyper's hands that flow control keeps from being sent.
    pub(super) waiting: bool,
}

/// The idle and send timeouts, judged from snapshots a few times per timeout (so without a
/// clock read per I/O).
#[derive(Debug)]
pub(super) struct Watch {
    last: Snapshot,
    /// When a tick last saw bytes move either way.
    quiet_since: Instant,
    /// When a tick last saw bytes sent, or first saw the connection waiting to send.
    sent_since: Instant,
}

impl Watch {
    pub(super) fn new(first: Snapshot, since: Instant) -> Watch {
        Watch {
            last: first,
            quiet_since: since,
            sent_since: since,
        }
    }

    /// Takes one tick's snapshot `now`, taken at `at`; says what to do, if anything.
    /// When the connection is idle for `limits.idle` if no byte moves from now on: as a tick
    /// would find it, give or take one tick.
    pub(super) fn idle_deadline(&self, limits: Limits) -> Instant {
        self.quiet_since + limits.idle
    }

    pub(super) fn look(
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

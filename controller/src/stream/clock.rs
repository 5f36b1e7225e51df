//! The fan-out clock: when the agent streams of a replica send their deltas.
//!
//! Every stream message costs about the same whatever it carries (a wake-up of the task that
//! writes the response, HTTP/2 framing, one `writev`), so under churn the replica's cost is set by
//! how many messages it sends, not by how many changes they carry. The clock turns the cache's
//! changes into *ticks*: at each tick every stream that is current wakes once and sends everything
//! after its cursor as one message (one write per stream per tick); between ticks, changes only
//! accumulate. A stream that is behind (a snapshot, a slow client) sends as soon as it can and
//! then follows the ticks too.
//!
//! The ticks are self-clocked by the fan-out they cause. The clock measures how long the streams
//! took to answer the last tick (the *fan-out time* F: from the tick until the last stream that
//! was waiting for it has built its message) and spaces the next tick at least F / *share* after
//! it, never more than [`MAX_GAP`], where the share (`--fanout-share`, default
//! [`DEFAULT_SHARE`]) is the most of a core the fan-out may take under churn. An idle replica
//! ticks at once when a change arrives (F is tiny with few streams: 3 agents get a move within
//! microseconds of the cache); a replica with a thousand streams under churn spends at most about
//! the share of a core on fan-out and folds everything that arrives meanwhile into the next tick.
//! The added delay is at most the gap plus one fan-out: a higher share buys lower convergence
//! latency with CPU (more ticks, so more messages, for the same changes).
//!
//! A stream whose client does not read is not polled (HTTP/2 flow control holds its body), so it
//! cannot answer a tick until the client reads again: the fan-out counts as done once all but
//! 1/[`STRAGGLERS`] of the streams woken have answered, so a few stuck clients do not hold every
//! tick to [`MAX_GAP`].
//!
//! The clock runs on the control runtime (`server/control.rs`), not on the one whose workers
//! run the streams. Woken from another runtime's thread, the streams are queued on the main
//! runtime's global queue in the order they parked, so each keeps about its place in the round
//! from one tick to the next and a change waits about one round for the stream that just
//! answered. Woken from a worker of the main runtime, a thousand wake-ups overflow that worker's
//! local queue (256 tasks) into the global queue half a queue at a time, and the worker runs the
//! latest woken first: the order is reshuffled every round, and a stream served early in one
//! round may come last in the next (up to two rounds' wait; the fan-out p99 was ~15 % higher).
//!
//! The clock also keeps the heartbeat message shared by idle streams ([`FanoutClock::heartbeat`]):
//! encoded once, not once per stream.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::{SyncPhase, SyncUpdate};
use victor_store::Revision;

use super::encoded;
use crate::cache::Cache;
use crate::metrics::Metrics;

/// Default most of a core the fan-out may take under churn: the next tick comes at least two
/// fan-out times after the previous one.
pub const DEFAULT_SHARE: f64 = 0.5;
/// Longest gap between two ticks while changes are waiting (the clock's share of convergence).
pub const MAX_GAP: Duration = Duration::from_millis(25);
/// One woken stream in this many may still be unanswered when the fan-out counts as done.
pub const STRAGGLERS: i64 = 64;
/// How long a shared heartbeat may be reused (its `sent_at` is at most this old).
const HEARTBEAT_REUSE: Duration = Duration::from_millis(10);

/// One tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tick {
    /// Increases with every tick.
    pub seq: u64,
    /// The replica is shutting down: streams end.
    pub shutdown: bool,
}

/// The replica's fan-out clock (see the module doc).
#[derive(Debug)]
pub struct FanoutClock {
    tick: watch::Sender<Tick>,
    /// Streams waiting for the next tick.
    parked: AtomicI64,
    /// Streams woken by the last tick that have not answered it yet.
    pending: AtomicI64,
    /// How many of them may still be unanswered when the fan-out counts as done.
    stragglers: AtomicI64,
    /// When the last stream answered the last tick (CLOCK_MONOTONIC ns).
    answered_ns: AtomicU64,
    all_answered: Notify,
    heartbeat: Mutex<Option<SharedHeartbeat>>,
    /// The next tick comes at least this many fan-out times after the previous one (1 / share).
    gap_per_fanout: f64,
}

#[derive(Debug)]
struct SharedHeartbeat {
    revision: Revision,
    built: Instant,
    bytes: Bytes,
}

/// A stream's place among the streams waiting for a tick; dropping it leaves.
pub struct Parked<'a>(&'a FanoutClock);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for FanoutClock {
    fn default() -> Self {
        FanoutClock {
            tick: watch::channel(Tick::default()).0,
            parked: AtomicI64::new(0),
            pending: AtomicI64::new(0),
            stragglers: AtomicI64::new(0),
            answered_ns: AtomicU64::new(0),
            all_answered: Notify::new(),
            heartbeat: Mutex::new(None),
            gap_per_fanout: 1.0 / DEFAULT_SHARE,
        }
    }
}

impl FanoutClock {
    /// A clock that does not tick until [`FanoutClock::run`] drives it.
    pub fn new() -> FanoutClock {
        FanoutClock::default()
    }

    /// [`FanoutClock::new`] whose fan-out takes at most `share` of a core under churn (clamped
    /// to 0.05–1).
    pub fn with_share(share: f64) -> FanoutClock {
        FanoutClock { gap_per_fanout: 1.0 / share.clamp(0.05, 1.0), ..FanoutClock::default() }
    }

    /// The ticks, for one stream.
    pub fn subscribe(&self) -> watch::Receiver<Tick> {
        self.tick.subscribe()
    }

    /// Marks the caller as waiting for the next tick until the guard is dropped.
    pub fn park(&self) -> Parked<'_> {
        self.parked.fetch_add(1, Ordering::AcqRel);
        Parked(self)
    }

    /// A stream woken by a tick has sent what it had (or had nothing to send).
    pub fn answered(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) - 1 == self.stragglers.load(Ordering::Acquire) {
            self.answered_ns.store(monotonic_ns(), Ordering::Release);
            self.all_answered.notify_one();
        }
    }

    /// The heartbeat message at `revision` (gRPC-framed `SyncUpdate`, phase HEARTBEAT), built
    /// once for every idle stream at that revision within [`HEARTBEAT_REUSE`].
    pub fn heartbeat(&self, revision: Revision) -> Bytes {
        let mut shared = self.heartbeat.lock().expect("heartbeat lock");
        if let Some(h) = shared.as_ref()
            && h.revision == revision
            && h.built.elapsed() < HEARTBEAT_REUSE
        {
            return h.bytes.clone();
        }
        let header = SyncUpdate {
            phase: SyncPhase::Heartbeat as i32,
            revision,
            sent_at_unix_nanos: unix_nanos(),
            ..Default::default()
        };
        let bytes = encoded::framed(&header, &[]);
        *shared = Some(SharedHeartbeat { revision, built: Instant::now(), bytes: bytes.clone() });
        bytes
    }

    /// Ticks whenever the cache has new frames, spaced by the measured fan-out time, until
    /// `shutdown`; then publishes a last tick that ends every stream.
    pub async fn run(&self, cache: &Cache, metrics: &Metrics, mut shutdown: watch::Receiver<bool>) {
        let mut revisions = cache.subscribe();
        let mut ticked = cache.latest_frame_revision();
        let mut last_tick = Instant::now();
        let mut last_tick_ns = monotonic_ns();
        let mut fanout = Duration::ZERO;
        loop {
            // Wait for a frame newer than the last tick.
            while cache.latest_frame_revision() <= ticked {
                tokio::select! {
                    changed = revisions.changed() => if changed.is_err() { return },
                    _ = super::shutting_down(&mut shutdown) => return self.stop(),
                }
            }
            // Let the last tick's fan-out finish (at most until MAX_GAP after it) and measure it.
            let answered = self.all_answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if self.unanswered() {
                tokio::select! {
                    _ = &mut answered => {}
                    _ = tokio::time::sleep_until(last_tick + MAX_GAP) => {}
                    _ = super::shutting_down(&mut shutdown) => return self.stop(),
                }
            }
            let sample = if self.unanswered() {
                last_tick.elapsed()
            } else {
                Duration::from_nanos(self.answered_ns.load(Ordering::Acquire).saturating_sub(last_tick_ns))
            };
            // Quick to rise, slow to decay: one light tick does not shrink the gap of a busy replica.
            fanout = sample.max(fanout * 7 / 8);
            let earliest = last_tick + fanout.mul_f64(self.gap_per_fanout).min(MAX_GAP);
            if Instant::now() < earliest {
                tokio::select! {
                    _ = tokio::time::sleep_until(earliest) => {}
                    _ = super::shutting_down(&mut shutdown) => return self.stop(),
                }
            }
            ticked = cache.latest_frame_revision();
            last_tick = Instant::now();
            last_tick_ns = monotonic_ns();
            let woken = self.parked.load(Ordering::Acquire);
            self.stragglers.store(woken / STRAGGLERS, Ordering::Release);
            self.pending.store(woken, Ordering::Release);
            self.tick.send_modify(|t| t.seq += 1);
            metrics.fanout_ticks.inc();
            metrics.fanout_seconds.observe(sample.as_secs_f64());
        }
    }

    /// The last tick's fan-out is not done: more streams than the stragglers allowed have not
    /// answered it.
    fn unanswered(&self) -> bool {
        self.pending.load(Ordering::Acquire) > self.stragglers.load(Ordering::Acquire)
    }

    fn stop(&self) {
        self.tick.send_modify(|t| {
            t.seq += 1;
            t.shutdown = true;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_answer_is_noticed_once() {
        let clock = FanoutClock::new();
        {
            let _a = clock.park();
            let _b = clock.park();
            clock.pending.store(clock.parked.load(Ordering::Acquire), Ordering::Release);
        }
        assert_eq!(clock.parked.load(Ordering::Acquire), 0, "guards leave");
        clock.answered();
        assert_eq!(clock.answered_ns.load(Ordering::Acquire), 0);
        clock.answered();
        assert!(clock.answered_ns.load(Ordering::Acquire) > 0);
    }

    #[test]
    fn a_few_stragglers_do_not_hold_the_fan_out() {
        let clock = FanoutClock::new();
        let woken = 128;
        clock.stragglers.store(woken / STRAGGLERS, Ordering::Release);
        clock.pending.store(woken, Ordering::Release);
        for _ in 0..woken - 3 {
            clock.answered();
        }
        assert!(clock.unanswered(), "3 unanswered of 128, 2 allowed");
        assert_eq!(clock.answered_ns.load(Ordering::Acquire), 0);
        clock.answered();
        assert!(!clock.unanswered());
        assert!(clock.answered_ns.load(Ordering::Acquire) > 0, "done with 2 stragglers left");
    }

    #[test]
    fn a_heartbeat_is_built_once_per_revision() {
        let clock = FanoutClock::new();
        let a = clock.heartbeat(7);
        let b = clock.heartbeat(7);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same bytes are shared");
        let c = clock.heartbeat(8);
        assert_ne!(a, c);
        let msg = <SyncUpdate as prost::Message>::decode(&c[5..]).unwrap();
        assert_eq!((msg.phase, msg.revision), (SyncPhase::Heartbeat as i32, 8));
        assert_eq!(u32::from_be_bytes([c[1], c[2], c[3], c[4]]) as usize, c.len() - 5);
    }
}

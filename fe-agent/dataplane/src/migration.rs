//! Announced migrations in the data plane: which VMs an orchestrator said are moving to which FE
//! (`Binding.pending_fe_id`), and the packets held here for a VM that is about to arrive.
//!
//! The window this closes: a live-migrated VM resumes at the new FE while the other FEs still
//! tunnel its traffic to the old one, which delivers it to the VM's old port, where nobody
//! reads any more. Until every FE has heard of the move (the new FE's capture, move hint or
//! delta: ~0.6 ms at best, several ms on a busy host), those packets are lost. During an
//! *announced* migration:
//! * the old FE (the VM is [`crate::fib::Action::Local`] there, the announcement names another
//!   FE) sends the announced FE a copy of every tunnel packet it delivers to the VM — not of
//!   those that came from that FE, so nothing loops ([`Verdict::DeliverAndCopy`]);
//! * the announced FE holds such a copy while the VM is not local there yet ([`Verdict::Hold`]):
//!   without the VM its kernel would route the packet back into the tunnel towards the binding
//!   FE;
//! * when the VM becomes local there ([`crate::fib::Fib::set`] with `Local`: its host route is
//!   installed), the forwarder writes into TUN what it holds for the VM that arrived at most
//!   [`Migrations::hold_window`] before, and drops the older rest (it was sent before the VM
//!   stopped, or during its pause: delivering it would duplicate what the VM already had).
//!
//! Copies cost underlay bandwidth only for announced VMs, and only while the announcement
//! stands; everything else pays one pointer load per received batch. Copies reach the VM twice
//! at most for packets it received in the last [`Migrations::hold_window`] before it stopped
//! (a pause shorter than the window). What this cannot cover: packets that enter the network at
//! the old FE itself (the kernel routes them to the VM port without the forwarder), and the
//! kernel backend (no userspace on its path).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;

/// How long a held packet stays deliverable by default: it covers the time from the VM's
/// resuming to its host route at the new FE (0.3–4.2 ms measured next to two TCG guests on two
/// cores) while keeping packets the VM got before it stopped out, unless its pause was shorter.
pub const DEFAULT_HOLD_WINDOW: Duration = Duration::from_millis(5);
/// At most this many packets are held (all VMs together); the oldest go first.
pub const MAX_HELD_PACKETS: usize = 1024;
/// At most this many bytes are held (all VMs together); the oldest go first.
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// What to do with a decapsulated packet for an announced VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it into TUN as usual.
    Deliver,
    /// Write it into TUN and send a copy to this FE (the announced one).
    DeliverAndCopy(Ipv4Addr),
    /// Keep it until the VM is local here ([`Migrations::hold`]).
    Hold,
}

/// A packet held for a VM about to arrive (the inner packet, as decapsulated).
#[derive(Debug, Clone)]
pub struct HeldPacket {
    /// When it was held.
    pub at: Instant,
    /// Its destination.
    pub vm: IpAddr,
    /// The IPv4 or IPv6 packet.
    pub packet: Vec<u8>,
}

/// Packets released for delivery by [`Migrations::release`]: those still within the window,
/// and how many were too old.
#[derive(Debug, Default)]
pub struct Released {
    /// To write into TUN, oldest first.
    pub packets: Vec<HeldPacket>,
    /// Held longer than the window: dropped.
    pub expired: u64,
}

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// Copies sent to announced FEs.
    pub copied: u64,
    /// Packets held for a VM about to arrive.
    pub held: u64,
    /// Held packets written into TUN once the VM arrived.
    pub released: u64,
    /// Held packets dropped: too old when the VM arrived, pushed out by newer ones, or never
    /// claimed.
    pub expired: u64,
}

#[derive(Debug, Default)]
struct Held {
    packets: VecDeque<HeldPacket>,
    bytes: usize,
}

impl Held {
    fn pop_front(&mut self) -> Option<HeldPacket> {
        let p = self.packets.pop_front()?;
        self.bytes -= p.packet.len();
        Some(p)
    }
}

type Targets = HashMap<IpAddr, Ipv4Addr, RandomState>;

/// The announced migrations and held packets of one FE. Lives in [`crate::fib::Fib`]
/// ([`crate::fib::Fib::migrations`]); every method takes `&self`.
#[derive(Debug)]
pub struct Migrations {
    targets: ArcSwap<Targets>,
    held: Mutex<Held>,
    /// Packets in `held` (read without the lock by [`Migrations::release`]'s callers).
    held_count: AtomicUsize,
    released: Mutex<Released>,
    wake: tokio::sync::Notify,
    hold_window_us: AtomicU64,
    copied: AtomicU64,
    held_total: AtomicU64,
    released_total: AtomicU64,
    expired_total: AtomicU64,
}

impl Default for Migrations {
    fn default() -> Self {
        Migrations {
            targets: ArcSwap::from_pointee(Targets::default()),
            held: Mutex::default(),
            held_count: AtomicUsize::new(0),
            released: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            hold_window_us: AtomicU64::new(DEFAULT_HOLD_WINDOW.as_micros() as u64),
            copied: AtomicU64::new(0),
            held_total: AtomicU64::new(0),
            released_total: AtomicU64::new(0),
            expired_total: AtomicU64::new(0),
        }
    }
}

impl Migrations {
    /// Records that `vm` is announced to migrate to the FE with underlay address `to`, or (None)
    /// that no migration of it is announced any more. Copy-on-write: announcements are few.
    pub fn set_target(&self, vm: impl Into<IpAddr>, to: Option<Ipv4Addr>) {
        let vm = vm.into();
        if self.target(vm) == to {
            return;
        }
        let mut next = Targets::clone(&self.targets.load());
        match to {
            Some(to) => next.insert(vm, to),
            None => next.remove(&vm),
        };
        self.targets.store(Arc::new(next));
    }

    /// Replaces every announcement (full sync).
    pub fn replace_targets<I: IntoIterator<Item = (IpAddr, Ipv4Addr)>>(&self, targets: I) {
        self.targets.store(Arc::new(targets.into_iter().collect()));
    }

    /// The FE `vm` is announced to migrate to.
    pub fn target(&self, vm: impl Into<IpAddr>) -> Option<Ipv4Addr> {
        self.targets.load().get(&vm.into()).copied()
    }

    /// Every announcement (unordered).
    pub fn targets(&self) -> Vec<(IpAddr, Ipv4Addr)> {
        self.targets.load().iter().map(|(&vm, &to)| (vm, to)).collect()
    }

    /// True when no migration is announced (the forwarder's per-batch check).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.targets.load().is_empty()
    }

    /// What to do with a packet for `vm` that arrived from the FE `from`, given the VM's binding
    /// here (`local`: it is [`crate::fib::Action::Local`]) and this FE's underlay address `me`.
    pub fn verdict(&self, vm: IpAddr, from: Ipv4Addr, local: bool, me: Ipv4Addr) -> Verdict {
        match self.target(vm) {
            Some(to) if to == me && !local => Verdict::Hold,
            Some(to) if to != me && to != from && local => Verdict::DeliverAndCopy(to),
            _ => Verdict::Deliver,
        }
    }

    /// How long a held packet stays deliverable.
    pub fn hold_window(&self) -> Duration {
        Duration::from_micros(self.hold_window_us.load(Relaxed))
    }

    /// Sets [`Migrations::hold_window`] (default [`DEFAULT_HOLD_WINDOW`]).
    pub fn set_hold_window(&self, window: Duration) {
        self.hold_window_us.store(window.as_micros().try_into().unwrap_or(u64::MAX), Relaxed);
    }

    /// Holds `packet` (for `vm`, received `now`); drops what is older than the window or beyond
    /// [`MAX_HELD_PACKETS`] / [`MAX_HELD_BYTES`], oldest first.
    pub fn hold(&self, vm: IpAddr, packet: impl Into<Vec<u8>>, now: Instant) {
        let packet = packet.into();
        let window = self.hold_window();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        while let Some(first) = held.packets.front() {
            let full = held.packets.len() >= MAX_HELD_PACKETS || held.bytes + packet.len() > MAX_HELD_BYTES;
            if !full && now.saturating_duration_since(first.at) <= window {
                break;
            }
            held.pop_front();
            dropped += 1;
        }
        if packet.len() <= MAX_HELD_BYTES {
            held.bytes += packet.len();
            held.packets.push_back(HeldPacket { at: now, vm, packet });
            self.held_total.fetch_add(1, Relaxed);
        } else {
            dropped += 1;
        }
        self.held_count.store(held.packets.len(), Relaxed);
        self.expired_total.fetch_add(dropped, Relaxed);
    }

    /// The VM arrived (its host route is installed): moves what is held for it to the released
    /// queue and wakes a forwarder worker ([`Migrations::released`]). Cheap when nothing is held.
    pub fn release(&self, vm: IpAddr, now: Instant) {
        if self.held_count.load(Relaxed) == 0 {
            return;
        }
        let window = self.hold_window();
        let mut fresh = Vec::new();
        let mut expired = 0;
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let mut kept = VecDeque::with_capacity(held.packets.len());
            while let Some(p) = held.pop_front() {
                if p.vm != vm {
                    kept.push_back(p);
                } else if now.saturating_duration_since(p.at) <= window {
                    fresh.push(p);
                } else {
                    expired += 1;
                }
            }
            held.bytes = kept.iter().map(|p| p.packet.len()).sum();
            held.packets = kept;
            self.held_count.store(held.packets.len(), Relaxed);
        }
        self.expired_total.fetch_add(expired, Relaxed);
        if fresh.is_empty() {
            return;
        }
        self.released.lock().unwrap_or_else(|e| e.into_inner()).packets.extend(fresh);
        self.wake.notify_one();
    }

    /// Waits until [`Migrations::release`] queued packets (returns at once if it did since the
    /// last wait).
    pub async fn released(&self) {
        self.wake.notified().await;
    }

    /// Takes the released packets for writing into TUN.
    pub fn take_released(&self) -> Vec<HeldPacket> {
        let packets = std::mem::take(&mut self.released.lock().unwrap_or_else(|e| e.into_inner()).packets);
        self.released_total.fetch_add(packets.len() as u64, Relaxed);
        packets
    }

    /// Counts `n` copies sent to announced FEs.
    pub fn copied(&self, n: u64) {
        self.copied.fetch_add(n, Relaxed);
    }

    /// Packets held now.
    pub fn held_now(&self) -> usize {
        self.held_count.load(Relaxed)
    }

    /// Totals since start.
    pub fn stats(&self) -> MigrationStats {
        MigrationStats {
            copied: self.copied.load(Relaxed),
            held: self.held_total.load(Relaxed),
            released: self.released_total.load(Relaxed),
            expired: self.expired_total.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
    const OLD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const INGRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn vm(n: u8) -> IpAddr {
        IpAddr::from([10, 10, 0, n])
    }

    #[test]
    fn verdicts_copy_at_the_old_fe_and_hold_at_the_announced_one() {
        let m = Migrations::default();
        assert!(m.is_empty());
        assert_eq!(m.verdict(vm(1), INGRESS, true, OLD), Verdict::Deliver);
        m.set_target(vm(1), Some(ME));
        assert!(!m.is_empty());
        // At the old FE (VM local there): copy to the announced FE, unless it came from there.
        assert_eq!(m.verdict(vm(1), INGRESS, true, OLD), Verdict::DeliverAndCopy(ME));
        assert_eq!(m.verdict(vm(1), ME, true, OLD), Verdict::Deliver, "no copy back to its sender");
        // At the announced FE: hold until the VM is local, then deliver.
        assert_eq!(m.verdict(vm(1), OLD, false, ME), Verdict::Hold);
        assert_eq!(m.verdict(vm(1), OLD, true, ME), Verdict::Deliver);
        // Elsewhere, and for other VMs: as usual.
        assert_eq!(m.verdict(vm(1), OLD, false, INGRESS), Verdict::Deliver);
        assert_eq!(m.verdict(vm(2), INGRESS, true, OLD), Verdict::Deliver);
        m.set_target(vm(1), None);
        assert!(m.is_empty());
        m.replace_targets([(vm(3), ME), (vm(4), OLD)]);
        assert_eq!(m.target(vm(4)), Some(OLD));
        assert_eq!(m.targets().len(), 2);
    }

    #[test]
    fn release_delivers_what_arrived_within_the_window_and_drops_the_rest() {
        let m = Migrations::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        m.hold(vm(1), b"old", t0);
        m.hold(vm(2), b"other", ms(4));
        m.hold(vm(1), b"new", ms(4));
        assert_eq!(m.held_now(), 3);
        m.release(vm(1), ms(7));
        let released = m.take_released();
        assert_eq!(released.iter().map(|p| &p.packet[..]).collect::<Vec<_>>(), vec![&b"new"[..]]);
        assert_eq!(m.held_now(), 1, "the other VM's packet stays");
        assert_eq!(m.stats(), MigrationStats { copied: 0, held: 3, released: 1, expired: 1 });
        // Holding later ages out the other VM's packet.
        m.hold(vm(3), b"x", ms(20));
        assert_eq!(m.held_now(), 1);
        assert_eq!(m.stats().expired, 2);
        m.release(vm(9), ms(21));
        assert!(m.take_released().is_empty());
    }

    #[test]
    fn holding_is_bounded() {
        let m = Migrations::default();
        m.set_hold_window(Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..MAX_HELD_PACKETS + 10 {
            m.hold(vm(1), [0; 100], now);
        }
        assert_eq!(m.held_now(), MAX_HELD_PACKETS);
        assert_eq!(m.stats().expired, 10);
        let big = vec![0; MAX_HELD_BYTES / 2 + 1];
        m.hold(vm(1), big.clone(), now);
        m.hold(vm(1), big, now);
        assert_eq!(m.held_now(), 1, "bytes bound the queue too");
    }

    #[tokio::test]
    async fn release_wakes_a_waiting_worker() {
        let m = Arc::new(Migrations::default());
        let waiter = tokio::spawn({
            let m = m.clone();
            async move {
                m.released().await;
                m.take_released().len()
            }
        });
        tokio::task::yield_now().await;
        let now = Instant::now();
        m.hold(vm(1), b"p", now);
        m.release(vm(1), now);
        assert_eq!(waiter.await.unwrap(), 1);
    }
}

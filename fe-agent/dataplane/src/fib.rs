//! Forwarding state shared by the agent (writer) and the packet workers (readers on every
//! packet): VM IP → [`Action`], the set of registered tunnel peers, and this FE's underlay
//! address.
//!
//! Layout and why:
//! * Bindings live in [`SHARDS`] shards, each an `RwLock<HashMap<u32, u32>>` with foldhash: an
//!   entry is 8 bytes (IP, encoded action) plus hashbrown's 1 control byte, so ~19 bytes per
//!   binding at 1,000,000 bindings including the table's spare capacity (measured by
//!   `tests/fib_memory.rs`). A lookup takes one shard's read lock — an uncontended atomic
//!   increment/decrement pair, never blocked except during the microseconds a writer holds that
//!   one shard. A copy-on-write snapshot (`arc-swap` of the whole map) would make every agent
//!   update cost O(bindings); a lock-free map (`papaya`) costs one heap node (~40+ bytes) per
//!   entry and epoch bookkeeping per read; `dashmap` is this same sharded-`RwLock` design as a
//!   dependency, with nothing more to offer for 8-byte entries.
//! * Peers change rarely and are read per received tunnel packet: an immutable set behind
//!   `arc-swap`, replaced whole on update (wait-free reads).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;

/// Number of binding shards (a power of two).
pub const SHARDS: usize = 64;

/// What to do with a packet for a VM IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// The VM is behind this FE: the kernel delivers it by its /32 route to the VM port (a packet
    /// for it that still arrives in the TUN device had no such route and is dropped).
    Local,
    /// The VM is behind the FE with this underlay address: encapsulate and send there.
    Remote(Ipv4Addr),
}

/// A binding the table refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FibError {
    /// The remote peer address cannot be a tunnel endpoint.
    #[error("binding {vm}: peer {peer} is not a unicast address; use the binding FE's underlay IPv4")]
    InvalidPeer {
        /// VM IP.
        vm: Ipv4Addr,
        /// Refused peer.
        peer: Ipv4Addr,
    },
    /// The remote peer is this FE itself (would loop); use [`Action::Local`].
    #[error("binding {vm}: peer {peer} is this FE's own underlay address; use Action::Local")]
    PeerIsSelf {
        /// VM IP.
        vm: Ipv4Addr,
        /// Refused peer.
        peer: Ipv4Addr,
    },
}

type Shard = HashMap<u32, u32, RandomState>;

const LOCAL: u32 = 0;

fn encode(action: Action) -> u32 {
    match action {
        Action::Local => LOCAL,
        Action::Remote(peer) => u32::from(peer),
    }
}

fn decode(raw: u32) -> Action {
    if raw == LOCAL { Action::Local } else { Action::Remote(Ipv4Addr::from(raw)) }
}

fn shard_of(ip: u32) -> usize {
    // Fibonacci hashing spreads sequential VM addresses over all shards.
    (ip.wrapping_mul(0x9e37_79b9) >> (32 - SHARDS.trailing_zeros())) as usize
}

/// The forwarding table. Share it as `Arc<Fib>`; every method takes `&self`.
pub struct Fib {
    local_underlay: Ipv4Addr,
    shards: Box<[RwLock<Shard>]>,
    peers: ArcSwap<HashSet<Ipv4Addr, RandomState>>,
}

impl std::fmt::Debug for Fib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fib")
            .field("local_underlay", &self.local_underlay)
            .field("bindings", &self.len())
            .field("peers", &self.peers.load().len())
            .finish()
    }
}

impl Fib {
    /// An empty table for the FE whose underlay address is `local_underlay`.
    pub fn new(local_underlay: Ipv4Addr) -> Self {
        Self::with_capacity(local_underlay, 0)
    }

    /// An empty table with room for `bindings` entries (avoids rehashing during a bulk load).
    pub fn with_capacity(local_underlay: Ipv4Addr, bindings: usize) -> Self {
        let per_shard = bindings.div_ceil(SHARDS);
        let shards = (0..SHARDS)
            .map(|_| RwLock::new(Shard::with_capacity_and_hasher(per_shard, RandomState::default())))
            .collect();
        Fib { local_underlay, shards, peers: ArcSwap::from_pointee(HashSet::default()) }
    }

    /// This FE's underlay address (outer source of our tunnel packets).
    pub fn local_underlay(&self) -> Ipv4Addr {
        self.local_underlay
    }

    fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave a HashMap half-updated in a way that
        // matters to readers (insert/remove are the only writes), so poisoning is ignored.
        self.shards[shard].read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, shard: usize) -> RwLockWriteGuard<'_, Shard> {
        self.shards[shard].write().unwrap_or_else(|e| e.into_inner())
    }

    /// The action for `vm`, or `None` (no binding: drop).
    #[inline]
    pub fn lookup(&self, vm: Ipv4Addr) -> Option<Action> {
        let key = u32::from(vm);
        self.read(shard_of(key)).get(&key).copied().map(decode)
    }

    fn validate(&self, vm: Ipv4Addr, action: Action) -> Result<u32, FibError> {
        if let Action::Remote(peer) = action {
            if peer == self.local_underlay {
                return Err(FibError::PeerIsSelf { vm, peer });
            }
            if peer.is_unspecified() || peer.is_broadcast() || peer.is_multicast() || peer.is_loopback() {
                return Err(FibError::InvalidPeer { vm, peer });
            }
        }
        Ok(encode(action))
    }

    /// Sets the binding of `vm`; returns the previous action.
    pub fn set(&self, vm: Ipv4Addr, action: Action) -> Result<Option<Action>, FibError> {
        let raw = self.validate(vm, action)?;
        let key = u32::from(vm);
        Ok(self.write(shard_of(key)).insert(key, raw).map(decode))
    }

    /// Removes the binding of `vm` (its packets are dropped from now on); returns what it was.
    pub fn remove(&self, vm: Ipv4Addr) -> Option<Action> {
        let key = u32::from(vm);
        self.write(shard_of(key)).remove(&key).map(decode)
    }

    /// Inserts many bindings, taking each shard's lock once. Validates everything first, so on
    /// error nothing is changed. Returns how many bindings were new.
    pub fn extend<I>(&self, bindings: I) -> Result<usize, FibError>
    where
        I: IntoIterator<Item = (Ipv4Addr, Action)>,
    {
        let mut by_shard: Vec<Vec<(u32, u32)>> = vec![Vec::new(); SHARDS];
        for (vm, action) in bindings {
            let raw = self.validate(vm, action)?;
            let key = u32::from(vm);
            by_shard[shard_of(key)].push((key, raw));
        }
        let mut added = 0;
        for (i, entries) in by_shard.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            let mut shard = self.write(i);
            shard.reserve(entries.len());
            for (key, raw) in entries {
                added += usize::from(shard.insert(key, raw).is_none());
            }
        }
        Ok(added)
    }

    /// Replaces the whole table with `bindings` (full sync from a snapshot). Validates first; on
    /// error nothing is changed. Each shard is swapped under its lock, so readers see either the
    /// old or the new binding of any one VM, never none when both have one.
    pub fn replace_all<I>(&self, bindings: I) -> Result<(), FibError>
    where
        I: IntoIterator<Item = (Ipv4Addr, Action)>,
    {
        let mut by_shard: Vec<Shard> = (0..SHARDS).map(|_| Shard::default()).collect();
        for (vm, action) in bindings {
            let raw = self.validate(vm, action)?;
            let key = u32::from(vm);
            by_shard[shard_of(key)].insert(key, raw);
        }
        for (i, fresh) in by_shard.into_iter().enumerate() {
            *self.write(i) = fresh;
        }
        Ok(())
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.read(i).len()).sum()
    }

    /// True when there is no binding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All bindings (unordered), e.g. for the reconciler's diff or an admin dump.
    pub fn bindings(&self) -> Vec<(Ipv4Addr, Action)> {
        let mut out = Vec::with_capacity(self.len());
        for i in 0..SHARDS {
            out.extend(self.read(i).iter().map(|(&k, &v)| (Ipv4Addr::from(k), decode(v))));
        }
        out
    }

    /// Heap bytes held by the binding tables (capacity-based estimate of hashbrown's layout:
    /// 8 bytes per slot + 1 control byte per slot + 16 trailing control bytes per table).
    pub fn heap_bytes(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                let cap = self.read(i).capacity();
                if cap == 0 {
                    return 0;
                }
                let buckets = (cap * 8 / 7).next_power_of_two();
                buckets * (std::mem::size_of::<(u32, u32)>() + 1) + 16
            })
            .sum()
    }

    /// Replaces the set of registered peers (underlay addresses of all FEs we accept tunnel
    /// packets from).
    pub fn set_peers<I: IntoIterator<Item = Ipv4Addr>>(&self, peers: I) {
        self.peers.store(Arc::new(peers.into_iter().collect()));
    }

    /// Adds one peer (copy-on-write; peers are few).
    pub fn add_peer(&self, peer: Ipv4Addr) {
        self.peers.rcu(|cur| {
            let mut next = HashSet::clone(cur);
            next.insert(peer);
            next
        });
    }

    /// Removes one peer.
    pub fn remove_peer(&self, peer: Ipv4Addr) {
        self.peers.rcu(|cur| {
            let mut next = HashSet::clone(cur);
            next.remove(&peer);
            next
        });
    }

    /// True when tunnel packets from `addr` are accepted.
    #[inline]
    pub fn is_peer(&self, addr: Ipv4Addr) -> bool {
        self.peers.load().contains(&addr)
    }

    /// The current peers (unordered).
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.peers.load().iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    #[test]
    fn set_lookup_remove() {
        let fib = Fib::new(ME);
        let vm = Ipv4Addr::new(10, 10, 0, 11);
        assert_eq!(fib.lookup(vm), None);
        assert_eq!(fib.set(vm, Action::Local), Ok(None));
        assert_eq!(fib.lookup(vm), Some(Action::Local));
        assert_eq!(fib.set(vm, Action::Remote(PEER)), Ok(Some(Action::Local)));
        assert_eq!(fib.lookup(vm), Some(Action::Remote(PEER)));
        assert_eq!(fib.len(), 1);
        assert_eq!(fib.remove(vm), Some(Action::Remote(PEER)));
        assert_eq!(fib.lookup(vm), None);
        assert!(fib.is_empty());
    }

    #[test]
    fn refuses_bad_peers_without_partial_updates() {
        let fib = Fib::new(ME);
        let vm = Ipv4Addr::new(10, 10, 0, 11);
        assert_eq!(fib.set(vm, Action::Remote(ME)), Err(FibError::PeerIsSelf { vm, peer: ME }));
        let zero = Ipv4Addr::UNSPECIFIED;
        assert!(matches!(fib.set(vm, Action::Remote(zero)), Err(FibError::InvalidPeer { .. })));
        let batch = [(vm, Action::Local), (Ipv4Addr::new(10, 10, 0, 12), Action::Remote(ME))];
        assert!(fib.extend(batch).is_err());
        assert!(fib.replace_all(batch).is_err());
        assert!(fib.is_empty(), "a refused batch changes nothing");
    }

    #[test]
    fn extend_and_replace_all() {
        let fib = Fib::new(ME);
        let n = 10_000u32;
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
        let added = fib.extend((0..n).map(|i| (Ipv4Addr::from(base + i), Action::Remote(PEER)))).unwrap();
        assert_eq!(added, n as usize);
        assert_eq!(fib.len(), n as usize);
        assert_eq!(fib.lookup(Ipv4Addr::from(base + 777)), Some(Action::Remote(PEER)));
        fib.replace_all([(Ipv4Addr::from(base + 1), Action::Local)]).unwrap();
        assert_eq!(fib.len(), 1);
        assert_eq!(fib.bindings(), vec![(Ipv4Addr::from(base + 1), Action::Local)]);
    }

    #[test]
    fn peers_swap_atomically() {
        let fib = Fib::new(ME);
        assert!(!fib.is_peer(PEER));
        fib.set_peers([PEER]);
        assert!(fib.is_peer(PEER));
        let third = Ipv4Addr::new(198, 51, 100, 3);
        fib.add_peer(third);
        assert!(fib.is_peer(third));
        fib.remove_peer(PEER);
        assert!(!fib.is_peer(PEER));
        assert_eq!(fib.peers(), vec![third]);
    }

    #[test]
    fn concurrent_readers_never_miss_a_binding_being_flipped() {
        let fib = Arc::new(Fib::new(ME));
        let vm = Ipv4Addr::new(10, 10, 0, 11);
        fib.set(vm, Action::Local).unwrap();
        let reader = {
            let fib = fib.clone();
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    assert!(fib.lookup(vm).is_some(), "a flipped binding is never absent");
                }
            })
        };
        for i in 0..20_000 {
            let action = if i % 2 == 0 { Action::Remote(PEER) } else { Action::Local };
            fib.set(vm, action).unwrap();
        }
        reader.join().unwrap();
    }
}

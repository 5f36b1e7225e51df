//! Forwarding state shared by the agent (writer) and the packet workers (readers on every
//! packet): VM IP → [`Action`] for IPv4 (/32) and IPv6 (/128) bindings, the set of registered
//! tunnel peers, and this FE's underlay address.
//!
//! Layout and why:
//! * Bindings live in two tables (one per address family) of [`SHARDS`] shards each, every shard
//!   an `RwLock<HashMap<key, u32>>` with foldhash. An IPv4 entry is 8 bytes (IP, encoded action)
//!   plus hashbrown's 1 control byte, so ~19 bytes per binding at 1,000,000 bindings including the
//!   table's spare capacity (measured by `tests/fib_scale.rs`); an IPv6 entry is 20 bytes (the
//!   address as `[u8; 16]`, 4-byte aligned — a `u128` key would pad the entry to 32). A lookup
//!   takes one shard's read lock — an uncontended atomic increment/decrement pair, never blocked
//!   except during the microseconds a writer holds that one shard. A copy-on-write snapshot
//!   (`arc-swap` of the whole map) would make every agent update cost O(bindings); a lock-free map
//!   (`papaya`) costs one heap node (~40+ bytes) per entry and epoch bookkeeping per read;
//!   `dashmap` is this same sharded-`RwLock` design as a dependency, with nothing more to offer
//!   for 8-byte entries.
//! * The methods are generic over [`FibAddr`] — [`Ipv4Addr`], [`Ipv6Addr`] or [`IpAddr`] — so a
//!   call with an `Ipv4Addr` compiles to the IPv4 table directly, and the agent can pass an
//!   `IpAddr` from the desired state. IPv6 VMs are tunnelled over the IPv4 underlay (6in4), so
//!   [`Action::Remote`] names an IPv4 peer for both families.
//! * Announced migrations ([`Migrations`]) live beside the bindings: the workers consult them
//!   only while one is announced.
//! * Peers change rarely and are read per received tunnel packet: an immutable set behind
//!   `arc-swap`, replaced whole on update (wait-free reads).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;

use crate::migration::Migrations;

/// Number of binding shards per family (a power of two).
pub const SHARDS: usize = 64;

/// What to do with a packet for a VM IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// The VM is behind this FE: the kernel delivers it by its host route to the VM port (a packet
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
        vm: IpAddr,
        /// Refused peer.
        peer: Ipv4Addr,
    },
    /// The remote peer is this FE itself (would loop); use [`Action::Local`].
    #[error("binding {vm}: peer {peer} is this FE's own underlay address; use Action::Local")]
    PeerIsSelf {
        /// VM IP.
        vm: IpAddr,
        /// Refused peer.
        peer: Ipv4Addr,
    },
}

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

/// The key of a binding in its family's table.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Key {
    V4(u32),
    V6([u8; 16]),
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::net::Ipv4Addr {}
    impl Sealed for std::net::Ipv6Addr {}
    impl Sealed for std::net::IpAddr {}
}

/// An address the table is keyed by: [`Ipv4Addr`], [`Ipv6Addr`] or [`IpAddr`] (sealed).
pub trait FibAddr: Copy + Into<IpAddr> + sealed::Sealed {
    /// Whether a batch of this type covers the IPv4 and the IPv6 table ([`Fib::replace_all`]).
    #[doc(hidden)]
    const FAMILIES: (bool, bool);
    #[doc(hidden)]
    fn key(self) -> Key;
}

impl FibAddr for Ipv4Addr {
    const FAMILIES: (bool, bool) = (true, false);
    #[inline]
    fn key(self) -> Key {
        Key::V4(u32::from(self))
    }
}

impl FibAddr for Ipv6Addr {
    const FAMILIES: (bool, bool) = (false, true);
    #[inline]
    fn key(self) -> Key {
        Key::V6(self.octets())
    }
}

impl FibAddr for IpAddr {
    const FAMILIES: (bool, bool) = (true, true);
    #[inline]
    fn key(self) -> Key {
        match self {
            IpAddr::V4(a) => a.key(),
            IpAddr::V6(a) => a.key(),
        }
    }
}

/// A table key: spread over the shards.
trait ShardKey: Copy + Eq + Hash {
    fn shard(&self) -> usize;
}

fn fibonacci_shard(x: u32) -> usize {
    // Fibonacci hashing spreads sequential VM addresses over all shards.
    (x.wrapping_mul(0x9e37_79b9) >> (32 - SHARDS.trailing_zeros())) as usize
}

impl ShardKey for u32 {
    #[inline]
    fn shard(&self) -> usize {
        fibonacci_shard(*self)
    }
}

impl ShardKey for [u8; 16] {
    #[inline]
    fn shard(&self) -> usize {
        // The interface identifier's low bits vary most between VMs of one prefix; fold in the
        // rest so /64s of sequential hosts spread too.
        let w = |i: usize| u32::from_be_bytes([self[i], self[i + 1], self[i + 2], self[i + 3]]);
        fibonacci_shard(w(12) ^ w(8) ^ w(4).rotate_left(7) ^ w(0).rotate_left(13))
    }
}

type Shard<K> = HashMap<K, u32, RandomState>;

/// One family's sharded table.
struct Table<K> {
    shards: Box<[RwLock<Shard<K>>]>,
}

impl<K: ShardKey> Table<K> {
    fn with_capacity(bindings: usize) -> Self {
        let per_shard = bindings.div_ceil(SHARDS);
        let shards = (0..SHARDS)
            .map(|_| RwLock::new(Shard::with_capacity_and_hasher(per_shard, RandomState::default())))
            .collect();
        Table { shards }
    }

    fn read(&self, shard: usize) -> RwLockReadGuard<'_, Shard<K>> {
        // A panic while holding a shard lock cannot leave a HashMap half-updated in a way that
        // matters to readers (insert/remove are the only writes), so poisoning is ignored.
        self.shards[shard].read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, shard: usize) -> RwLockWriteGuard<'_, Shard<K>> {
        self.shards[shard].write().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    fn get(&self, key: &K) -> Option<u32> {
        self.read(key.shard()).get(key).copied()
    }

    fn insert(&self, key: K, raw: u32) -> Option<u32> {
        self.write(key.shard()).insert(key, raw)
    }

    fn remove(&self, key: &K) -> Option<u32> {
        self.write(key.shard()).remove(key)
    }

    fn empty_batch() -> Vec<Shard<K>> {
        (0..SHARDS).map(|_| Shard::default()).collect()
    }

    fn push(batch: &mut [Shard<K>], key: K, raw: u32) {
        batch[key.shard()].insert(key, raw);
    }

    /// Inserts a batch, one lock per shard; returns how many entries were new.
    fn extend(&self, batch: Vec<Shard<K>>) -> usize {
        let mut added = 0;
        for (i, entries) in batch.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            let mut shard = self.write(i);
            shard.reserve(entries.len());
            for (key, raw) in entries {
                added += usize::from(shard.insert(key, raw).is_none());
            }
        }
        added
    }

    /// Swaps every shard for the batch's.
    fn replace(&self, batch: Vec<Shard<K>>) {
        for (i, fresh) in batch.into_iter().enumerate() {
            *self.write(i) = fresh;
        }
    }

    fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.read(i).len()).sum()
    }

    fn entries(&self) -> Vec<(K, Action)> {
        let mut out = Vec::with_capacity(self.len());
        for i in 0..SHARDS {
            out.extend(self.read(i).iter().map(|(&k, &v)| (k, decode(v))));
        }
        out
    }

    /// Heap bytes (capacity-based estimate of hashbrown's layout: one entry + 1 control byte per
    /// bucket + 16 trailing control bytes per table).
    fn heap_bytes(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                let cap = self.read(i).capacity();
                if cap == 0 {
                    return 0;
                }
                let buckets = (cap * 8 / 7).next_power_of_two();
                buckets * (std::mem::size_of::<(K, u32)>() + 1) + 16
            })
            .sum()
    }
}

/// The forwarding table. Share it as `Arc<Fib>`; every method takes `&self`.
pub struct Fib {
    local_underlay: Ipv4Addr,
    v4: Table<u32>,
    v6: Table<[u8; 16]>,
    peers: ArcSwap<HashSet<Ipv4Addr, RandomState>>,
    migrations: Migrations,
}

impl std::fmt::Debug for Fib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fib")
            .field("local_underlay", &self.local_underlay)
            .field("bindings_v4", &self.v4.len())
            .field("bindings_v6", &self.v6.len())
            .field("peers", &self.peers.load().len())
            .finish()
    }
}

/// Batches of validated entries, per family.
struct Batches {
    v4: Vec<Shard<u32>>,
    v6: Vec<Shard<[u8; 16]>>,
}

impl Fib {
    /// An empty table for the FE whose underlay address is `local_underlay`.
    pub fn new(local_underlay: Ipv4Addr) -> Self {
        Self::with_capacity(local_underlay, 0)
    }

    /// An empty table with room for `bindings` IPv4 entries (avoids rehashing during a bulk
    /// load); the IPv6 table grows as needed.
    pub fn with_capacity(local_underlay: Ipv4Addr, bindings: usize) -> Self {
        Fib {
            local_underlay,
            v4: Table::with_capacity(bindings),
            v6: Table::with_capacity(0),
            peers: ArcSwap::from_pointee(HashSet::default()),
            migrations: Migrations::default(),
        }
    }

    /// This FE's underlay address (outer source of our tunnel packets).
    pub fn local_underlay(&self) -> Ipv4Addr {
        self.local_underlay
    }

    /// The action for `vm`, or `None` (no binding: drop).
    #[inline]
    pub fn lookup<A: FibAddr>(&self, vm: A) -> Option<Action> {
        match vm.key() {
            Key::V4(k) => self.v4.get(&k),
            Key::V6(k) => self.v6.get(&k),
        }
        .map(decode)
    }

    fn validate(&self, vm: IpAddr, action: Action) -> Result<u32, FibError> {
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

    /// Sets the binding of `vm`; returns the previous action. Setting it `Local` releases the
    /// packets held for it during an announced migration ([`Migrations::release`]).
    pub fn set<A: FibAddr>(&self, vm: A, action: Action) -> Result<Option<Action>, FibError> {
        let raw = self.validate(vm.into(), action)?;
        let previous = match vm.key() {
            Key::V4(k) => self.v4.insert(k, raw),
            Key::V6(k) => self.v6.insert(k, raw),
        }
        .map(decode);
        if action == Action::Local {
            self.migrations.release(vm.into(), Instant::now());
        }
        Ok(previous)
    }

    /// The announced migrations and the packets held for VMs about to arrive.
    pub fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    /// Removes the binding of `vm` (its packets are dropped from now on); returns what it was.
    pub fn remove<A: FibAddr>(&self, vm: A) -> Option<Action> {
        match vm.key() {
            Key::V4(k) => self.v4.remove(&k),
            Key::V6(k) => self.v6.remove(&k),
        }
        .map(decode)
    }

    fn batches<A: FibAddr, I: IntoIterator<Item = (A, Action)>>(&self, bindings: I) -> Result<Batches, FibError> {
        let (v4, v6) = A::FAMILIES;
        let mut b = Batches {
            v4: if v4 { Table::empty_batch() } else { Vec::new() },
            v6: if v6 { Table::empty_batch() } else { Vec::new() },
        };
        for (vm, action) in bindings {
            let raw = self.validate(vm.into(), action)?;
            match vm.key() {
                Key::V4(k) => Table::push(&mut b.v4, k, raw),
                Key::V6(k) => Table::push(&mut b.v6, k, raw),
            }
        }
        Ok(b)
    }

    /// Inserts many bindings, taking each shard's lock once. Validates everything first, so on
    /// error nothing is changed. Returns how many bindings were new.
    pub fn extend<A: FibAddr, I: IntoIterator<Item = (A, Action)>>(&self, bindings: I) -> Result<usize, FibError> {
        let b = self.batches(bindings)?;
        Ok(self.v4.extend(b.v4) + self.v6.extend(b.v6))
    }

    /// Replaces the table of the families `A` covers — the IPv4 table for [`Ipv4Addr`] items, the
    /// IPv6 table for [`Ipv6Addr`], both for [`IpAddr`] — with `bindings` (full sync from a
    /// snapshot). Validates first; on error nothing is changed. Each shard is swapped under its
    /// lock, so readers see either the old or the new binding of any one VM, never none when both
    /// have one.
    pub fn replace_all<A: FibAddr, I: IntoIterator<Item = (A, Action)>>(&self, bindings: I) -> Result<(), FibError> {
        let b = self.batches(bindings)?;
        let (v4, v6) = A::FAMILIES;
        if v4 {
            self.v4.replace(b.v4);
        }
        if v6 {
            self.v6.replace(b.v6);
        }
        Ok(())
    }

    /// Number of bindings (both families).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Number of IPv6 bindings.
    pub fn len_v6(&self) -> usize {
        self.v6.len()
    }

    /// True when there is no binding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All IPv4 bindings (unordered), e.g. for the reconciler's diff or an admin dump.
    pub fn bindings(&self) -> Vec<(Ipv4Addr, Action)> {
        self.v4.entries().into_iter().map(|(k, a)| (Ipv4Addr::from(k), a)).collect()
    }

    /// All IPv6 bindings (unordered).
    pub fn bindings_v6(&self) -> Vec<(Ipv6Addr, Action)> {
        self.v6.entries().into_iter().map(|(k, a)| (Ipv6Addr::from(k), a)).collect()
    }

    /// Heap bytes held by the binding tables of both families.
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }

    /// Replaces the set of registered peers (underlay addresses of all FEs we accept tunnel
    /// packets from, IP-in-IP and 6in4 alike).
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
    fn a_vm_becoming_local_releases_what_was_held_for_it() {
        let fib = Fib::new(ME);
        let vm = Ipv4Addr::new(10, 10, 0, 11);
        fib.migrations().set_target(vm, Some(ME));
        fib.set(vm, Action::Remote(PEER)).unwrap();
        fib.migrations().hold(vm.into(), b"held", Instant::now());
        assert!(fib.migrations().take_released().is_empty(), "not while the VM is elsewhere");
        fib.set(vm, Action::Local).unwrap();
        assert_eq!(fib.migrations().take_released().len(), 1);
        assert_eq!(fib.migrations().held_now(), 0);
    }

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
        assert_eq!(fib.set(vm, Action::Remote(ME)), Err(FibError::PeerIsSelf { vm: vm.into(), peer: ME }));
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
    fn ipv6_bindings_live_beside_ipv4() {
        let fib = Fib::new(ME);
        let v6: Ipv6Addr = "2001:db8:10::11".parse().unwrap();
        let v4 = Ipv4Addr::new(10, 10, 0, 11);
        fib.set(v4, Action::Local).unwrap();
        assert_eq!(fib.set(v6, Action::Remote(PEER)), Ok(None));
        assert_eq!(fib.lookup(v6), Some(Action::Remote(PEER)));
        assert_eq!(fib.lookup(IpAddr::V6(v6)), Some(Action::Remote(PEER)), "IpAddr reaches the same entry");
        assert_eq!(fib.lookup("2001:db8:10::12".parse::<Ipv6Addr>().unwrap()), None);
        assert_eq!((fib.len(), fib.len_v6()), (2, 1));
        assert_eq!(fib.bindings_v6(), vec![(v6, Action::Remote(PEER))]);
        assert_eq!(fib.bindings(), vec![(v4, Action::Local)]);
        assert_eq!(
            fib.set(IpAddr::V6(v6), Action::Remote(ME)),
            Err(FibError::PeerIsSelf { vm: IpAddr::V6(v6), peer: ME })
        );

        // A full sync of one family leaves the other alone; an IpAddr sync replaces both.
        let other: Ipv6Addr = "2001:db8:10::99".parse().unwrap();
        fib.replace_all([(other, Action::Local)]).unwrap();
        assert_eq!(
            (fib.lookup(v6), fib.lookup(other), fib.lookup(v4)),
            (None, Some(Action::Local), Some(Action::Local))
        );
        fib.replace_all([(IpAddr::V6(v6), Action::Local)]).unwrap();
        assert_eq!((fib.lookup(other), fib.lookup(v4), fib.len()), (None, None, 1));
        assert_eq!(
            fib.extend((1..=100u16).map(|i| (Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, i), Action::Remote(PEER)))),
            Ok(99)
        );
        assert_eq!(fib.remove(v6), Some(Action::Remote(PEER)), "::11 was in the batch: overwritten");
        assert!(fib.heap_bytes() > 0);
    }

    #[test]
    fn ipv6_keys_spread_over_the_shards() {
        let mut used = HashSet::new();
        for i in 0..256u16 {
            used.insert(Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, i).octets().shard());
        }
        assert!(used.len() > SHARDS / 2, "{} of {SHARDS} shards used", used.len());
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

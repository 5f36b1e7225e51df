//! Pure packet codecs: no IO, no allocation on the forwarding fast path, every parser total
//! (never panics, typed error with a counter label on bad input).
//!
//! * [`checksum`] — Internet checksum and RFC 1624 incremental update;
//! * [`arp`] — Ethernet/ARP frames (request, reply, gratuitous, probe; one 802.1Q tag);
//! * [`ipv4`] — IPv4 validation, TTL decrement, IP-in-IP encapsulation/decapsulation;
//! * [`icmp`] — time exceeded and fragmentation needed, with the "never answer" rules;
//! * [`gso`] — the TUN virtio-net header, and splitting TCP/UDP super-packets into segments;
//! * [`gro`] — coalescing received TCP segments into super-packets for a TUN write.

pub mod arp;
pub mod checksum;
pub mod gro;
pub mod gso;
pub mod icmp;
pub mod ipv4;

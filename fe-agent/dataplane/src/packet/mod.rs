//! Pure packet codecs: no IO, no allocation on the forwarding fast path, every parser total
//! (never panics, typed error with a counter label on bad input).
//!
//! * [`checksum`] — Internet checksum, IPv4/IPv6 pseudo-headers, RFC 1624 incremental update;
//! * [`eth`] — Ethernet framing (MAC addresses, one 802.1Q tag) shared by the frame codecs;
//! * [`arp`] — Ethernet/ARP frames (request, reply, gratuitous, probe);
//! * [`rarp`] — Ethernet/RARP frames (what QEMU's `announce-self` sends after a migration);
//! * [`ndp`] — Ethernet/IPv6 Neighbor Discovery (NS, NA incl. DAD and unsolicited, RS, RA);
//! * [`ipv4`] — IPv4 validation, TTL decrement, IP-in-IP encapsulation/decapsulation;
//! * [`ipv6`] — IPv6 validation, extension-header walk, hop limit, building packets;
//! * [`sixin4`] — IPv6 in IPv4 (6in4, protocol 41) encapsulation/decapsulation;
//! * [`icmp`] — ICMP time exceeded and fragmentation needed, with the "never answer" rules;
//! * [`icmp6`] — ICMPv6 checksum, echo, packet too big and time exceeded, with RFC 4443's rules;
//! * [`gso`] — the TUN virtio-net header, and splitting TCP/UDP super-packets into segments;
//! * [`gro`] — coalescing received TCP segments into super-packets for a TUN write.

pub mod arp;
pub mod checksum;
pub mod eth;
pub mod gro;
pub mod gso;
pub mod icmp;
pub mod icmp6;
pub mod ipv4;
pub mod ipv6;
pub mod ndp;
pub mod rarp;
pub mod sixin4;

//! The agent's own wire formats, pure: bytes from the network in, values out, and back. Each
//! decoder takes any input without panicking (fuzzed in `fuzz/`), and whatever decodes encodes
//! to the same value (property tests). The frame formats of the data plane (Ethernet/ARP, IPv4,
//! IP-in-IP, ICMP) are the `victor_dataplane` crate's `packet` module.
//!
//! * [`bgp`] — BGP-4 messages, as much as a route injector needs;
//! * [`hint`] — the move-hint datagram and its HMAC.

pub mod bgp;
pub mod hint;

//! Steering received tunnel packets to workers by inner flow, so each flow is handled by one
//! worker (one TUN queue) and TCP sees no reordering.
//!
//! Every raw IP-in-IP (and every 6in4) socket bound to the FE's address receives a copy of every
//! tunnel packet of its protocol; with several workers, worker `i`'s sockets carry a classic BPF
//! filter that keeps only the packets whose inner-flow hash modulo the number of workers is `i`
//! (the others are dropped by the filter, before any queueing). The hash covers the inner
//! addresses and, for unfragmented TCP/UDP (IPv6: TCP/UDP directly after the fixed header), the
//! ports; packets too short to hash go to worker 0 (which counts them as malformed).
//! [`flow_hash`] and [`flow_hash6`] are the same functions in Rust, for tests.

use std::io;
use std::os::fd::RawFd;

use crate::bpf::{
    self, ADD, ALU, AND, B, H, IND, Insn, JEQ, JGE, JMP, JSET, K, LD, LDX, LEN, LSH, MEM, MISC, MOD, MSH, RET, RSH, ST,
    TAX, TXA, W, X, XOR,
};

/// Bytes a matching packet keeps (all of it: the largest IPv4 packet and more).
const ACCEPT: u32 = 0x40000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    Ports,
    Fold,
    Accept,
    Reject,
}

fn assemble(program: &[Insn<Label>]) -> Vec<libc::sock_filter> {
    bpf::assemble(program, Label::Next)
}

/// The common tail: fold the hash in M[0] and accept when it selects worker `index`.
fn fold(index: u32, workers: u32) -> [Insn<Label>; 14] {
    use Insn::*;
    use Label::*;
    [
        Mark(Fold),
        Op(LD | MEM, 0),
        Op(MISC | TAX, 0),
        Op(ALU | RSH | K, 16),
        Op(ALU | XOR | X, 0),
        Op(MISC | TAX, 0),
        Op(ALU | RSH | K, 8),
        Op(ALU | XOR | X, 0),
        Op(ALU | MOD | K, workers),
        Jump(JMP | JEQ | K, index, Accept, Reject),
        Mark(Reject),
        Op(RET | K, 0),
        Mark(Accept),
        Op(RET | K, ACCEPT),
    ]
}

/// The filter for worker `index` of `workers` (≥ 2) on the IP-in-IP socket. Scratch memory:
/// M[0] the running hash, M[1] the offset of the inner transport header.
fn program(index: u32, workers: u32) -> Vec<libc::sock_filter> {
    use Insn::*;
    use Label::*;
    let short = if index == 0 { Accept } else { Reject };
    let outer_len = Op(LDX | B | MSH, 0); // X = 4 * (P[0] & 0xf)
    let mut program = vec![
        outer_len,
        Op(MISC | TXA, 0),
        Op(ALU | ADD | K, 20),
        Op(MISC | TAX, 0),
        Op(LD | W | LEN, 0),
        Jump(JMP | JGE | X, 0, Next, short), // room for the inner IPv4 header
        outer_len,
        Op(LD | W | IND, 12), // inner source
        Op(ST, 0),
        Op(LD | W | IND, 16), // inner destination
        Op(MISC | TAX, 0),
        Op(LD | MEM, 0),
        Op(ALU | XOR | X, 0),
        Op(ST, 0),
        outer_len,
        Op(LD | H | IND, 6),
        Jump(JMP | JSET | K, 0x3fff, Fold, Next), // a fragment: no ports
        Op(LD | B | IND, 9),
        Jump(JMP | JEQ | K, 6, Ports, Next),
        Jump(JMP | JEQ | K, 17, Ports, Fold),
        Mark(Ports),
        Op(LD | B | IND, 0),
        Op(ALU | AND | K, 0xf),
        Op(ALU | LSH | K, 2),
        Op(ALU | ADD | X, 0), // A = outer + inner header length
        Op(ST, 1),
        Op(ALU | ADD | K, 4),
        Op(MISC | TAX, 0),
        Op(LD | W | LEN, 0),
        Jump(JMP | JGE | X, 0, Next, Fold), // room for the ports
        Op(LDX | MEM, 1),
        Op(LD | W | IND, 0),
        Op(MISC | TAX, 0),
        Op(LD | MEM, 0),
        Op(ALU | XOR | X, 0),
        Op(ST, 0),
    ];
    program.extend(fold(index, workers));
    assemble(&program)
}

/// The filter for worker `index` of `workers` (≥ 2) on the 6in4 socket: the same hash over the
/// inner IPv6 addresses (eight words) and, when the inner next header is TCP/UDP, the ports.
fn program6(index: u32, workers: u32) -> Vec<libc::sock_filter> {
    use Insn::*;
    use Label::*;
    let short = if index == 0 { Accept } else { Reject };
    let outer_len = Op(LDX | B | MSH, 0);
    let mut program = vec![
        outer_len,
        Op(MISC | TXA, 0),
        Op(ALU | ADD | K, 40),
        Op(MISC | TAX, 0),
        Op(LD | W | LEN, 0),
        Jump(JMP | JGE | X, 0, Next, short), // room for the inner IPv6 header
        outer_len,
        Op(LD | W | IND, 8),
        Op(ST, 0),
    ];
    for word in 1..8u32 {
        // M[0] ^= the inner address word at 8 + 4 * word.
        program.extend([
            outer_len,
            Op(LD | W | IND, 8 + 4 * word),
            Op(MISC | TAX, 0),
            Op(LD | MEM, 0),
            Op(ALU | XOR | X, 0),
            Op(ST, 0),
        ]);
    }
    program.extend([
        outer_len,
        Op(LD | B | IND, 6),
        Jump(JMP | JEQ | K, 6, Ports, Next),
        Jump(JMP | JEQ | K, 17, Ports, Fold),
        Mark(Ports),
        Op(MISC | TXA, 0),
        Op(ALU | ADD | K, 44),
        Op(MISC | TAX, 0),
        Op(LD | W | LEN, 0),
        Jump(JMP | JGE | X, 0, Next, Fold), // room for the ports
        outer_len,
        Op(LD | W | IND, 40),
        Op(MISC | TAX, 0),
        Op(LD | MEM, 0),
        Op(ALU | XOR | X, 0),
        Op(ST, 0),
    ]);
    program.extend(fold(index, workers));
    assemble(&program)
}

#[cfg(test)]
/// The worker (`0..workers`) that handles the tunnel packet `packet` (outer header first): what
/// the filters compute.
pub(crate) fn worker_for(packet: &[u8], workers: u32) -> u32 {
    let hash =
        if packet.get(9) == Some(&crate::packet::ipv4::PROTO_IPV6) { flow_hash6(packet) } else { flow_hash(packet) };
    hash.map_or(0, |h| h % workers)
}

#[cfg(test)]
/// The inner-flow hash of a tunnel packet, `None` when it is too short to have one.
pub(crate) fn flow_hash(packet: &[u8]) -> Option<u32> {
    let be32 = |at: usize| packet.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let outer = usize::from(packet.first()? & 0xf) * 4;
    if packet.len() < outer + 20 {
        return None;
    }
    let mut h = be32(outer + 12)? ^ be32(outer + 16)?;
    let frag = u16::from_be_bytes([packet[outer + 6], packet[outer + 7]]) & 0x3fff;
    if frag == 0 && matches!(packet[outer + 9], 6 | 17) {
        let l4 = outer + usize::from(packet[outer] & 0xf) * 4;
        if let Some(ports) = be32(l4) {
            h ^= ports;
        }
    }
    h ^= h >> 16;
    h ^= h >> 8;
    Some(h)
}

#[cfg(test)]
/// The inner-flow hash of a 6in4 packet, `None` when it is too short to have one.
pub(crate) fn flow_hash6(packet: &[u8]) -> Option<u32> {
    let be32 = |at: usize| packet.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let outer = usize::from(packet.first()? & 0xf) * 4;
    if packet.len() < outer + 40 {
        return None;
    }
    let mut h = (0..8).map(|w| be32(outer + 8 + 4 * w).expect("inside the inner header")).fold(0, |a, b| a ^ b);
    if matches!(packet[outer + 6], 6 | 17)
        && let Some(ports) = be32(outer + 40)
    {
        h ^= ports;
    }
    h ^= h >> 16;
    h ^= h >> 8;
    Some(h)
}

/// Attaches worker `index`'s filter (of `workers`) to the raw socket `fd` of the IP-in-IP
/// (`six_in_four` false) or the 6in4 underlay socket; no-op with one worker.
pub(crate) fn attach(fd: RawFd, index: u32, workers: u32, six_in_four: bool) -> io::Result<()> {
    if workers <= 1 {
        return Ok(());
    }
    let filter = if six_in_four { program6(index, workers) } else { program(index, workers) };
    bpf::attach(fd, &filter)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::packet::ipv4;

    fn run(prog: &[libc::sock_filter], p: &[u8]) -> u32 {
        crate::bpf::run(prog, p, 0)
    }

    fn tunnel_packet(inner: &[u8]) -> Vec<u8> {
        let t = ipv4::Tunnel { src: Ipv4Addr::new(198, 51, 100, 1), dst: Ipv4Addr::new(198, 51, 100, 2), ttl: 64 };
        ipv4::encapsulate(inner, &t, 0).unwrap()
    }

    fn inner(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = ipv4::build_packet(src.into(), dst.into(), proto, 64, 0, false, l4);
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        ipv4::fix_checksum(&mut p);
        p
    }

    /// Exactly one worker's filter accepts each packet, the one `worker_for` names.
    fn check(p: &[u8], workers: u32) {
        let six = p.get(9) == Some(&ipv4::PROTO_IPV6);
        let prog = |i| if six { program6(i, workers) } else { program(i, workers) };
        let accepting: Vec<u32> = (0..workers).filter(|&i| run(&prog(i), p) == ACCEPT).collect();
        assert_eq!(accepting, vec![worker_for(p, workers)], "{p:?}");
    }

    fn tunnel6_packet(inner: &[u8]) -> Vec<u8> {
        let t = ipv4::Tunnel { src: Ipv4Addr::new(198, 51, 100, 1), dst: Ipv4Addr::new(198, 51, 100, 2), ttl: 64 };
        crate::packet::sixin4::encapsulate(inner, &t, 0)
            .unwrap_or_else(|_| ipv4::build_packet(t.src, t.dst, ipv4::PROTO_IPV6, 64, 0, false, inner))
    }

    proptest! {
        #[test]
        fn v6_filters_partition_packets_like_the_reference(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), next in prop_oneof![Just(6u8), Just(17u8), Just(58u8), Just(0u8)],
            l4 in proptest::collection::vec(any::<u8>(), 0..12), workers in 2u32..5, cut in 0usize..80,
        ) {
            let inner = crate::packet::ipv6::build_packet(src.into(), dst.into(), next, 64, 0, &l4);
            let mut p = tunnel6_packet(&inner);
            check(&p, workers);
            // Truncated 6in4 packets (shorter than their inner header or ports) too.
            p.truncate(cut.max(20).min(p.len()));
            check(&p, workers);
        }

        #[test]
        fn filters_partition_packets_like_the_reference(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), proto in prop_oneof![Just(6u8), Just(17u8), Just(1u8)],
            frag in prop_oneof![Just(0u16), Just(0x2000u16), Just(0x0005u16), Just(0x4000u16)],
            l4 in proptest::collection::vec(any::<u8>(), 0..12), workers in 2u32..5,
        ) {
            check(&tunnel_packet(&inner(src, dst, proto, frag, &l4)), workers);
        }
    }

    #[test]
    fn ports_spread_flows_and_short_packets_go_to_worker_zero() {
        let flows: Vec<u32> = (0..64u16)
            .map(|port| {
                let mut l4 = [0u8; 20];
                l4[0..2].copy_from_slice(&(40000 + port).to_be_bytes());
                worker_for(&tunnel_packet(&inner([10, 0, 0, 1], [10, 0, 0, 2], 6, 0x4000, &l4)), 2)
            })
            .collect();
        assert!(flows.contains(&0) && flows.contains(&1), "{flows:?}");
        for short in [
            vec![0x45u8; 10],
            vec![0x45; 39],
            tunnel_packet(&inner([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, &[0; 20]))[..30].to_vec(),
        ] {
            check(&short, 3);
            assert_eq!(worker_for(&short, 3), 0);
        }
    }
}

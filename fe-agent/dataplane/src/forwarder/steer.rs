//! Steering received tunnel packets to workers by inner flow, so each flow is handled by one
//! worker (one TUN queue) and TCP sees no reordering.
//!
//! Every raw IP-in-IP socket bound to the FE's address receives a copy of every tunnel packet;
//! with several workers, worker `i`'s socket carries a classic BPF filter that keeps only the
//! packets whose inner-flow hash modulo the number of workers is `i` (the others are dropped by
//! the filter, before any queueing). The hash covers the inner addresses and, for unfragmented
//! TCP/UDP, the ports; packets too short to hash go to worker 0 (which counts them as
//! malformed). [`flow_hash`] is the same function in Rust, for tests.

use std::io;
use std::os::fd::RawFd;

// Classic BPF encoding (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const MSH: u16 = 0xa0;
const ADD: u16 = 0x00;
const AND: u16 = 0x50;
const LSH: u16 = 0x60;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const K: u16 = 0x00;
const X: u16 = 0x08;
const JEQ: u16 = 0x10;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;

/// Bytes a matching packet keeps (all of it: the largest IPv4 packet and more).
const ACCEPT: u32 = 0x40000;

/// One instruction, with jump targets as labels until [`assemble`] resolves them.
#[derive(Debug, Clone, Copy)]
enum Insn {
    Op(u16, u32),
    /// Conditional jump: code, k, label if true, label if false.
    Jump(u16, u32, Label, Label),
    Mark(Label),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    Ports,
    Fold,
    Accept,
    Reject,
}

fn assemble(program: &[Insn]) -> Vec<libc::sock_filter> {
    let code: Vec<&Insn> = program.iter().filter(|i| !matches!(i, Insn::Mark(_))).collect();
    let position = |label: Label| -> usize {
        let mut pos = 0;
        for insn in program {
            match insn {
                Insn::Mark(l) if *l == label => return pos,
                Insn::Mark(_) => {}
                _ => pos += 1,
            }
        }
        panic!("BPF label {label:?} not placed")
    };
    code.iter()
        .enumerate()
        .map(|(pc, insn)| match **insn {
            Insn::Op(op, k) => libc::sock_filter { code: op, jt: 0, jf: 0, k },
            Insn::Jump(op, k, t, f) => {
                let rel = |l: Label| if l == Label::Next { 0 } else { (position(l) - pc - 1) as u8 };
                libc::sock_filter { code: op, jt: rel(t), jf: rel(f), k }
            }
            Insn::Mark(_) => unreachable!("filtered out"),
        })
        .collect()
}

/// The filter for worker `index` of `workers` (≥ 2). Scratch memory: M[0] the running hash,
/// M[1] the offset of the inner transport header.
fn program(index: u32, workers: u32) -> Vec<libc::sock_filter> {
    use Insn::*;
    use Label::*;
    let short = if index == 0 { Accept } else { Reject };
    let outer_len = Op(LDX | B | MSH, 0); // X = 4 * (P[0] & 0xf)
    assemble(&[
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
    ])
}

#[cfg(test)]
/// The worker (`0..workers`) that handles the tunnel packet `packet` (outer header first): what
/// the filters compute.
pub(crate) fn worker_for(packet: &[u8], workers: u32) -> u32 {
    flow_hash(packet).map_or(0, |h| h % workers)
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

/// Attaches worker `index`'s filter to the raw socket `fd` (no-op with one worker).
pub(crate) fn attach(fd: RawFd, index: u32, workers: u32) -> io::Result<()> {
    if workers <= 1 {
        return Ok(());
    }
    let mut filter = program(index, workers);
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::packet::ipv4;

    /// A classic BPF interpreter for the instructions [`program`] uses, with the kernel's rule
    /// that a load beyond the packet ends the program with 0.
    fn run(prog: &[libc::sock_filter], p: &[u8]) -> u32 {
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0;
        let load = |at: usize, n: usize| -> Option<u32> {
            p.get(at..at + n).map(|b| b.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let k = i.k;
            match i.code {
                c if c == LDX | B | MSH => match load(k as usize, 1) {
                    Some(v) => x = (v & 0xf) * 4,
                    None => return 0,
                },
                c if c == LD | W | LEN => a = p.len() as u32,
                c if c & 0x07 == LD && c & 0xe0 == IND => {
                    let n = match c & 0x18 {
                        W => 4,
                        H => 2,
                        _ => 1,
                    };
                    match load((x + k) as usize, n) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                c if c == LD | MEM => a = m[k as usize],
                c if c == LDX | MEM => x = m[k as usize],
                ST => m[k as usize] = a,
                c if c == MISC | TAX => x = a,
                c if c == MISC | TXA => a = x,
                c if c & 0x07 == ALU => {
                    let v = if c & X != 0 { x } else { k };
                    a = match c & 0xf0 {
                        ADD => a.wrapping_add(v),
                        AND => a & v,
                        LSH => a << v,
                        RSH => a >> v,
                        MOD => a % v,
                        XOR => a ^ v,
                        op => panic!("ALU op {op:#x}"),
                    }
                }
                c if c & 0x07 == JMP => {
                    let v = if c & X != 0 { x } else { k };
                    let taken = match c & 0xf0 {
                        JEQ => a == v,
                        JGE => a >= v,
                        JSET => a & v != 0,
                        op => panic!("JMP op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == RET | K => return k,
                c => panic!("opcode {c:#x}"),
            }
        }
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
        let accepting: Vec<u32> = (0..workers).filter(|&i| run(&program(i, workers), p) == ACCEPT).collect();
        assert_eq!(accepting, vec![worker_for(p, workers)], "{p:?}");
    }

    proptest! {
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

//! Classic BPF socket filters: the opcodes (linux/filter.h, linux/bpf_common.h), a tiny assembler
//! with symbolic jump labels, attaching a program to a socket, and (in tests) an interpreter with
//! the kernel's semantics for the instructions our programs use, so every filter is checked
//! against a Rust reference without a kernel.
//!
//! Used by the forwarder's per-worker flow steering ([`crate::forwarder`]) and by the capture
//! filter of the VM ports ([`crate::neigh_io`]).

use std::fmt::Debug;
use std::io;
use std::os::fd::RawFd;

pub(crate) const LD: u16 = 0x00;
pub(crate) const LDX: u16 = 0x01;
pub(crate) const ST: u16 = 0x02;
pub(crate) const ALU: u16 = 0x04;
pub(crate) const JMP: u16 = 0x05;
pub(crate) const RET: u16 = 0x06;
pub(crate) const MISC: u16 = 0x07;
pub(crate) const W: u16 = 0x00;
pub(crate) const H: u16 = 0x08;
pub(crate) const B: u16 = 0x10;
pub(crate) const ABS: u16 = 0x20;
pub(crate) const IND: u16 = 0x40;
pub(crate) const MEM: u16 = 0x60;
pub(crate) const LEN: u16 = 0x80;
pub(crate) const MSH: u16 = 0xa0;
pub(crate) const ADD: u16 = 0x00;
pub(crate) const AND: u16 = 0x50;
pub(crate) const LSH: u16 = 0x60;
pub(crate) const RSH: u16 = 0x70;
pub(crate) const MOD: u16 = 0x90;
pub(crate) const XOR: u16 = 0xa0;
pub(crate) const K: u16 = 0x00;
pub(crate) const X: u16 = 0x08;
pub(crate) const JEQ: u16 = 0x10;
pub(crate) const JGE: u16 = 0x30;
pub(crate) const JSET: u16 = 0x40;
pub(crate) const TAX: u16 = 0x00;
pub(crate) const TXA: u16 = 0x80;
/// Base of the ancillary-data loads (`SKF_AD_OFF`).
pub(crate) const SKF_AD_OFF: u32 = 0xffff_f000;
/// Ancillary load: the packet type (`PACKET_HOST`, `PACKET_OUTGOING`, ...).
pub(crate) const SKF_AD_PKTTYPE: u32 = 4;

/// One instruction, with jump targets as labels until [`assemble`] resolves them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Insn<L> {
    Op(u16, u32),
    /// Conditional jump: code, k, label if true, label if false.
    Jump(u16, u32, L, L),
    Mark(L),
}

/// Resolves the labels of `program` into relative jumps (`next` means the next instruction).
/// Panics on a label that is never placed or a jump too far (programs are built from constants:
/// a bug, caught by the tests).
pub(crate) fn assemble<L: Copy + PartialEq + Debug>(program: &[Insn<L>], next: L) -> Vec<libc::sock_filter> {
    let position = |label: L| -> usize {
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
    program
        .iter()
        .filter(|i| !matches!(i, Insn::Mark(_)))
        .enumerate()
        .map(|(pc, insn)| match *insn {
            Insn::Op(op, k) => libc::sock_filter { code: op, jt: 0, jf: 0, k },
            Insn::Jump(op, k, t, f) => {
                let rel = |l: L| {
                    if l == next {
                        0
                    } else {
                        u8::try_from(position(l) - pc - 1).expect("BPF jump within 255 instructions")
                    }
                };
                libc::sock_filter { code: op, jt: rel(t), jf: rel(f), k }
            }
            Insn::Mark(_) => unreachable!("filtered out"),
        })
        .collect()
}

/// Attaches `program` to the socket `fd` (`SO_ATTACH_FILTER`).
pub(crate) fn attach(fd: RawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `program`, both alive for the call; the kernel copies the program.
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

/// Runs `prog` on packet `p` received with packet type `pkttype`, with the kernel's rule that a
/// load beyond the packet ends the program with 0. Returns the accepted length (0: dropped).
#[cfg(test)]
pub(crate) fn run(prog: &[libc::sock_filter], p: &[u8], pkttype: u32) -> u32 {
    let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0;
    let load = |at: usize, n: usize| -> Option<u32> {
        p.get(at..at + n).map(|b| b.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
    };
    let width = |c: u16| match c & 0x18 {
        W => 4,
        H => 2,
        _ => 1,
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
            c if c == LD | W | ABS && k == SKF_AD_OFF + SKF_AD_PKTTYPE => a = pkttype,
            c if c & 0x07 == LD && c & 0xe0 == ABS => match load(k as usize, width(c)) {
                Some(v) => a = v,
                None => return 0,
            },
            c if c & 0x07 == LD && c & 0xe0 == IND => match load((x + k) as usize, width(c)) {
                Some(v) => a = v,
                None => return 0,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum L {
        Next,
        Yes,
        No,
    }

    #[test]
    fn labels_resolve_to_relative_jumps() {
        use Insn::*;
        let prog = assemble(
            &[
                Op(LD | B | ABS, 0),
                Jump(JMP | JEQ | K, 7, L::Yes, L::Next),
                Jump(JMP | JEQ | K, 8, L::Yes, L::No),
                Mark(L::No),
                Op(RET | K, 0),
                Mark(L::Yes),
                Op(RET | K, 99),
            ],
            L::Next,
        );
        assert_eq!((prog[1].jt, prog[1].jf, prog[2].jt, prog[2].jf), (2, 0, 1, 0));
        assert_eq!(run(&prog, &[7], 0), 99);
        assert_eq!(run(&prog, &[8], 0), 99);
        assert_eq!(run(&prog, &[9], 0), 0);
        assert_eq!(run(&prog, &[], 0), 0, "a load beyond the packet drops");
    }
}

//! The move-hint datagram and its authentication, pure: encoding, decoding and HMAC-SHA256
//! signing/verification with the cluster's hint keys (ring's HMAC, constant-time verification;
//! ring is already in the agent for TLS).
//!
//! Layout (big-endian, one UDP datagram, 81–143 bytes for an IPv4 VM; an IPv6 VM's hint is the
//! same with a 16-byte address, every later field 12 bytes further on):
//!
//! ```text
//!  0  4  magic "VMH" + version 1
//!  4  1  kind: 1 = move, 2 = cancel; + 0x10 when the VM address is IPv6
//!  5  1  length n of the new FE's id (1..=63)
//!  6  4  VM IPv4 address (IPv6: 16 bytes, and the offsets below + 12)
//! 10  6  VM MAC
//! 16  8  move_seq: the binding version this move follows (the move makes move_seq + 1)
//! 24  8  observation time of the capture (wall ns, as in the claim)
//! 32  8  send time (wall ns): receivers refuse hints outside their replay window
//! 40  8  nonce (random): receivers refuse a nonce they have seen inside the window
//! 48  n  the new FE's id (the sender)
//! 48+n 32 HMAC-SHA256 over bytes 0..48+n
//! ```
//!
//! Keys: a key file holds one or more keys, one per line as hex (at least 16 bytes; comments
//! after `#` and blank lines are ignored). The first key signs; every key verifies, so keys rotate
//! without a flag day (add the new key second everywhere, then first, then drop the old one).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::hmac;

/// Magic and version.
pub const MAGIC: [u8; 4] = *b"VMH\x01";
/// Bytes before the FE id (IPv4 VM).
const HEADER: usize = 48;
/// The kind byte's flag for an IPv6 VM address.
const KIND_IPV6: u8 = 0x10;

/// Bytes before the FE id for a VM address of `len` bytes (4 or 16).
const fn header(addr_len: usize) -> usize {
    HEADER - 4 + addr_len
}
/// HMAC-SHA256 tag length.
const TAG: usize = 32;
/// Longest FE id (as the agent's `--fe-id` rule).
pub const MAX_FE_ID: usize = 63;
/// Shortest key accepted (bytes).
pub const MIN_KEY_BYTES: usize = 16;

/// What a hint announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The VM moved to the sender, after binding version `move_seq`.
    Move,
    /// The sender's claim for that move was rejected: forget the hint.
    Cancel,
}

impl Kind {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Move => "move",
            Kind::Cancel => "cancel",
        }
    }
}

/// One hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// Move or cancel.
    pub kind: Kind,
    /// The new FE (the sender).
    pub fe_id: String,
    /// VM IP (either family).
    pub vm_ip: IpAddr,
    /// VM MAC.
    pub mac: [u8; 6],
    /// The binding version the move follows.
    pub move_seq: u64,
    /// Capture time of the VM's ARP at the new FE (wall ns).
    pub observed_at: i64,
    /// Send time (wall ns).
    pub sent_at: i64,
    /// Random per datagram.
    pub nonce: u64,
}

/// Why a datagram is not a valid hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short, too long, bad magic/kind/lengths.
    #[error("malformed move hint: {0}")]
    Malformed(&'static str),
    /// No configured key produces its tag.
    #[error("move hint authentication failed (HMAC does not verify with any configured key)")]
    BadHmac,
}

/// Why a key file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A line is not hex or too short.
    #[error(
        "line {line}: expected a key of at least {MIN_KEY_BYTES} bytes written as hex (e.g. the output of `openssl rand -hex 32`)"
    )]
    BadKey {
        /// 1-based line number.
        line: usize,
    },
    /// No key at all.
    #[error("no key in the file; put one hex key per line (e.g. the output of `openssl rand -hex 32`)")]
    Empty,
}

/// The hint keys: the first signs, every one verifies.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys").field("count", &self.keys.len()).finish()
    }
}

impl Keys {
    /// Keys from raw bytes (the first signs).
    pub fn new(keys: &[&[u8]]) -> Result<Keys, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(i) = keys.iter().position(|k| k.len() < MIN_KEY_BYTES) {
            return Err(KeyError::BadKey { line: i + 1 });
        }
        Ok(Keys { keys: keys.iter().map(|k| hmac::Key::new(hmac::HMAC_SHA256, k)).collect() })
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Keys, KeyError> {
        let mut raw = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match from_hex(line) {
                Some(k) if k.len() >= MIN_KEY_BYTES => raw.push(k),
                _ => return Err(KeyError::BadKey { line: i + 1 }),
            }
        }
        let refs: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
        Keys::new(&refs)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true (a key set has at least one key).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes().chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

/// Encodes and signs `hint` with the first key.
pub fn encode(hint: &Hint, keys: &Keys) -> Vec<u8> {
    let id = hint.fe_id.as_bytes();
    debug_assert!(!id.is_empty() && id.len() <= MAX_FE_ID, "FE ids are validated at start");
    let id = &id[..id.len().min(MAX_FE_ID)];
    let mut out = Vec::with_capacity(header(16) + id.len() + TAG);
    out.extend_from_slice(&MAGIC);
    let family = if hint.vm_ip.is_ipv6() { KIND_IPV6 } else { 0 };
    out.push(
        family
            | match hint.kind {
                Kind::Move => 1,
                Kind::Cancel => 2,
            },
    );
    out.push(id.len() as u8);
    match hint.vm_ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
    out.extend_from_slice(&hint.mac);
    out.extend_from_slice(&hint.move_seq.to_be_bytes());
    out.extend_from_slice(&hint.observed_at.to_be_bytes());
    out.extend_from_slice(&hint.sent_at.to_be_bytes());
    out.extend_from_slice(&hint.nonce.to_be_bytes());
    out.extend_from_slice(id);
    seal(out, keys)
}

/// Appends the tag of `signed` (HMAC-SHA256 with the first key): the datagram [`decode`] verifies.
pub fn seal(mut signed: Vec<u8>, keys: &Keys) -> Vec<u8> {
    let tag = hmac::sign(&keys.keys[0], &signed);
    signed.extend_from_slice(tag.as_ref());
    signed
}

/// Decodes `datagram` and verifies its tag against every key.
pub fn decode(datagram: &[u8], keys: &Keys) -> Result<Hint, WireError> {
    if datagram.len() < HEADER + 1 + TAG {
        return Err(WireError::Malformed("too short"));
    }
    if datagram[..4] != MAGIC {
        return Err(WireError::Malformed("bad magic or version"));
    }
    let id_len = usize::from(datagram[5]);
    if id_len == 0 || id_len > MAX_FE_ID {
        return Err(WireError::Malformed("bad FE id length"));
    }
    let addr_len = if datagram[4] & KIND_IPV6 != 0 { 16 } else { 4 };
    let head = header(addr_len);
    if datagram.len() != head + id_len + TAG {
        return Err(WireError::Malformed("length does not match the FE id length"));
    }
    let (signed, tag) = datagram.split_at(head + id_len);
    if !keys.keys.iter().any(|k| hmac::verify(k, signed, tag).is_ok()) {
        return Err(WireError::BadHmac);
    }
    // Authenticated from here on.
    let kind = match datagram[4] & !KIND_IPV6 {
        1 => Kind::Move,
        2 => Kind::Cancel,
        _ => return Err(WireError::Malformed("unknown kind")),
    };
    let at = addr_len - 4; // every field after the address moves with its length
    let u64_at = |o: usize| u64::from_be_bytes(datagram[at + o..at + o + 8].try_into().expect("8 bytes"));
    let fe_id = std::str::from_utf8(&datagram[head..head + id_len])
        .map_err(|_| WireError::Malformed("FE id is not UTF-8"))?
        .to_owned();
    let addr = &datagram[6..6 + addr_len];
    let vm_ip = match <[u8; 16]>::try_from(addr) {
        Ok(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
        Err(_) => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
    };
    Ok(Hint {
        kind,
        fe_id,
        vm_ip,
        mac: datagram[at + 10..at + 16].try_into().expect("6 bytes"),
        move_seq: u64_at(16),
        observed_at: u64_at(24) as i64,
        sent_at: u64_at(32) as i64,
        nonce: u64_at(40),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hint() -> Hint {
        Hint {
            kind: Kind::Move,
            fe_id: "fe3".into(),
            vm_ip: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11)),
            mac: [2, 0, 0, 0, 0, 0x11],
            move_seq: 7,
            observed_at: 1_700_000_000_123_456_789,
            sent_at: 1_700_000_000_123_999_000,
            nonce: 0xdead_beef_0bad_cafe,
        }
    }

    fn keys(text: &str) -> Keys {
        Keys::parse(text).unwrap()
    }

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "ffeeddccbbaa99887766554433221100";

    #[test]
    fn round_trip_for_both_kinds() {
        let k = keys(K1);
        for kind in [Kind::Move, Kind::Cancel] {
            let h = Hint { kind, ..hint() };
            let bytes = encode(&h, &k);
            assert_eq!(bytes.len(), 48 + 3 + 32);
            assert_eq!(decode(&bytes, &k), Ok(h));
        }
    }

    #[test]
    fn ipv6_vms_round_trip_with_their_16_byte_address() {
        let k = keys(K1);
        for kind in [Kind::Move, Kind::Cancel] {
            let h = Hint { kind, vm_ip: "fd00:10::11".parse().unwrap(), ..hint() };
            let bytes = encode(&h, &k);
            assert_eq!(bytes.len(), 60 + 3 + 32);
            assert_eq!(bytes[4] & KIND_IPV6, KIND_IPV6);
            assert_eq!(decode(&bytes, &k), Ok(h));
        }
        // The family flag is authenticated: flipped, the length no longer matches.
        let mut bad = encode(&hint(), &k);
        bad[4] ^= KIND_IPV6;
        assert_eq!(decode(&bad, &k), Err(WireError::Malformed("length does not match the FE id length")));
    }

    #[test]
    fn any_flipped_bit_or_another_key_fails_authentication() {
        let k = keys(K1);
        let bytes = encode(&hint(), &k);
        for i in 6..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad, &k), Err(WireError::BadHmac), "byte {i}");
        }
        assert_eq!(decode(&bytes, &keys(K2)), Err(WireError::BadHmac));
    }

    #[test]
    fn rotation_every_key_verifies_the_first_signs() {
        let old = keys(K1);
        let both = keys(&format!("# rotating\n{K2}\n\n{K1}  # old key\n"));
        assert_eq!(both.len(), 2);
        let from_old = encode(&hint(), &old);
        assert_eq!(decode(&from_old, &both), Ok(hint()), "a sender still on the old key is accepted");
        let from_new = encode(&hint(), &both);
        assert_eq!(decode(&from_new, &old), Err(WireError::BadHmac), "the first key signs");
        assert_eq!(decode(&from_new, &keys(K2)), Ok(hint()));
    }

    #[test]
    fn malformed_datagrams_are_refused_before_any_parsing() {
        let k = keys(K1);
        let good = encode(&hint(), &k);
        assert_eq!(decode(&good[..50], &k), Err(WireError::Malformed("too short")));
        let mut bad = good.clone();
        bad[3] = 2;
        assert_eq!(decode(&bad, &k), Err(WireError::Malformed("bad magic or version")));
        let mut bad = good.clone();
        bad[5] = 0;
        assert_eq!(decode(&bad, &k), Err(WireError::Malformed("bad FE id length")));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(decode(&long, &k), Err(WireError::Malformed("length does not match the FE id length")));
        // An unknown kind is only reported once the tag verified (a forger learns nothing).
        let mut h = encode(&hint(), &k);
        h.truncate(h.len() - TAG);
        h[4] = 9;
        assert_eq!(decode(&seal(h, &k), &k), Err(WireError::Malformed("unknown kind")));
    }

    #[test]
    fn key_files_say_what_is_wrong() {
        assert_eq!(Keys::parse("").unwrap_err(), KeyError::Empty);
        assert_eq!(Keys::parse("# only a comment\n").unwrap_err(), KeyError::Empty);
        assert_eq!(Keys::parse(&format!("{K1}\nnot-hex\n")).unwrap_err(), KeyError::BadKey { line: 2 });
        assert_eq!(Keys::parse("0011223344").unwrap_err(), KeyError::BadKey { line: 1 }, "too short");
        assert_eq!(Keys::parse("abc").unwrap_err(), KeyError::BadKey { line: 1 }, "odd length");
        assert!(Keys::parse(&K1.to_uppercase()).is_ok());
        assert!(!format!("{:?}", keys(K1)).contains("0001"), "Debug never shows key material");
    }

    fn any_hint() -> impl Strategy<Value = Hint> {
        (
            any::<bool>(),
            "[a-z0-9][a-z0-9.-]{0,62}",
            prop_oneof![
                any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
                any::<u128>().prop_map(|a| IpAddr::V6(a.into()))
            ],
            any::<[u8; 6]>(),
            any::<u64>(),
            any::<i64>(),
            any::<i64>(),
            any::<u64>(),
        )
            .prop_map(|(cancel, fe_id, ip, mac, move_seq, observed_at, sent_at, nonce)| Hint {
                kind: if cancel { Kind::Cancel } else { Kind::Move },
                fe_id,
                vm_ip: ip,
                mac,
                move_seq,
                observed_at,
                sent_at,
                nonce,
            })
    }

    proptest! {
        #[test]
        fn every_hint_round_trips(h in any_hint()) {
            let k = keys(K1);
            let bytes = encode(&h, &k);
            prop_assert_eq!(bytes.len(), header(if h.vm_ip.is_ipv6() { 16 } else { 4 }) + h.fe_id.len() + TAG);
            prop_assert_eq!(decode(&bytes, &k), Ok(h));
        }

        /// Whatever decodes from authenticated bytes encodes back to exactly those bytes.
        #[test]
        fn authenticated_bytes_that_decode_encode_back_identically(
            body in prop::collection::vec(any::<u8>(), 0..140),
            magic in any::<bool>(),
        ) {
            let k = keys(K1);
            let mut body = body;
            if magic && body.len() >= 6 {
                body[..4].copy_from_slice(&MAGIC);
                body[4] = 1 + body[4] % 2;
                body[5] = body.len().saturating_sub(HEADER).clamp(1, MAX_FE_ID) as u8;
                body.iter_mut().skip(HEADER).for_each(|b| *b &= 0x7f);
            }
            let datagram = seal(body, &k);
            if let Ok(h) = decode(&datagram, &k) {
                prop_assert_eq!(encode(&h, &k), datagram);
            }
        }
    }
}

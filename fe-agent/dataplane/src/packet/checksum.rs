//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! The sum runs 8 bytes at a time with an end-around carry (RFC 1071 §2: the one's-complement
//! sum does not depend on the word size or the byte order it is computed in, as long as the
//! result is folded and swapped back), so checksumming a 1500-byte segment costs about as much
//! as copying it.

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd trailing byte padded
/// with zero), folded to 16 bits. Sums of pieces that start at even offsets add up (with
/// [`add`]) to the sum of their concatenation.
pub fn sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunks of 8"));
        let (s, carry) = acc.overflowing_add(word);
        acc = s + u64::from(carry);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        // Zero padding keeps every byte at its offset parity, so the tail is summed like the rest.
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(last));
        acc = s + u64::from(carry);
    }
    let mut folded = (acc >> 32) + (acc & 0xffff_ffff);
    folded = (folded >> 32) + (folded & 0xffff_ffff);
    folded = (folded >> 16) + (folded & 0xffff);
    folded = (folded >> 16) + (folded & 0xffff);
    // Summed in native byte order: swap back to network order on little-endian hosts.
    u16::from_be(folded as u16)
}

/// One's-complement addition of two partial sums.
pub fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Adds `data` as big-endian 16-bit words to the running one's-complement sum `acc`
/// (an odd trailing byte is padded with zero).
pub fn accumulate(data: &[u8], acc: u32) -> u32 {
    acc.wrapping_add(u32::from(sum(data)))
}

/// The IPv4 pseudo-header sum (RFC 793 §3.1, RFC 768) for a transport segment of `len` bytes.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> u16 {
    let mut acc = u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u32::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u32::from(protocol)
        + u32::from(len);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) for an upper-layer packet of `len` bytes with
/// next header `next_header` (ICMPv6, TCP, UDP over IPv6).
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, len: u32) -> u16 {
    let mut acc = u32::from(sum(src)) + u32::from(sum(dst)) + (len >> 16) + (len & 0xffff) + u32::from(next_header);
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Folds a running sum to 16 bits and complements it: the value to store in a checksum field.
pub fn finish(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data` (with its checksum field zeroed, to compute one; as is, to
/// verify one: a correct packet gives 0).
pub fn checksum(data: &[u8]) -> u16 {
    finish(accumulate(data, 0))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed from
/// `old_word` to `new_word`: `HC' = ~(~HC + ~m + m')`.
pub fn update_word(old_checksum: u16, old_word: u16, new_word: u16) -> u16 {
    let acc = u32::from(!old_checksum) + u32::from(!old_word) + u32::from(new_word);
    finish(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum = !ddf2).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), checksum(&[0x12, 0x34, 0x56, 0x00]));
    }

    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            acc += u32::from(word);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest::proptest! {
        #[test]
        fn fast_sum_matches_the_word_by_word_definition(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            // 0 and 0xffff are the same one's-complement number.
            let (fast, slow) = (sum(&data), naive(&data));
            proptest::prop_assert!(fast == slow || (fast % 0xffff == 0 && slow % 0xffff == 0), "{fast:#x} {slow:#x}");
        }

        #[test]
        fn sums_of_even_pieces_add_up(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 2..3000), cut in 0usize..1500) {
            let cut = (cut * 2).min(data.len() & !1);
            let whole = finish(u32::from(sum(&data)));
            let pieces = finish(u32::from(add(sum(&data[..cut]), sum(&data[cut..]))));
            proptest::prop_assert_eq!(whole, pieces);
        }
    }

    #[test]
    fn pseudo_header_matches_summing_its_bytes() {
        let (src, dst) = ([192, 0, 2, 10], [10, 10, 0, 11]);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src);
        bytes.extend_from_slice(&dst);
        bytes.extend_from_slice(&[0, 6, 0x05, 0xb4]);
        assert_eq!(pseudo_header(src, dst, 6, 1460), naive(&bytes));
    }

    #[test]
    fn v6_pseudo_header_matches_summing_its_bytes() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let dst = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd, 0, 1];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src);
        bytes.extend_from_slice(&dst);
        bytes.extend_from_slice(&0x0001_0020u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 58]);
        assert_eq!(pseudo_header_v6(&src, &dst, 58, 0x0001_0020), naive(&bytes));
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut data = [0x45u8, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01];
        let before = checksum(&data);
        let old = u16::from_be_bytes([data[8], data[9]]);
        data[8] -= 1;
        let new = u16::from_be_bytes([data[8], data[9]]);
        assert_eq!(update_word(before, old, new), checksum(&data));
    }
}

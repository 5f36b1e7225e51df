//! Move-hint datagram codec on arbitrary bytes from the underlay: decoding never panics, and an
//! authenticated datagram that decodes encodes back to exactly its bytes. The first byte chooses
//! what the rest is: a raw datagram (the fuzzer cannot forge a tag: this covers the checks before
//! authentication), or the signed part of one, sealed here with the key (this covers the parsing
//! behind authentication).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use victor_fe_agent::codec::hint::{self, Keys};

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys::new(&[&[7u8; 32]]).expect("a 32-byte key"));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let datagram = if mode & 1 == 0 { rest.to_vec() } else { hint::seal(rest.to_vec(), &KEYS) };
    if let Ok(h) = hint::decode(&datagram, &KEYS) {
        assert_eq!(hint::encode(&h, &KEYS), datagram);
    }
});

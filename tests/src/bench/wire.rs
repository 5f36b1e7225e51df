//! A lean decoder of `victor.v1.SyncUpdate` for the simulated agents: the same bytes as the real
//! message, decoded without one heap allocation per entry (the generated type allocates the IP,
//! the FE id and the MAC of every binding). A thousand simulated agents share two cores with the
//! controller and etcd, so this is what keeps the benchmark measuring the controller rather than
//! the agents' allocator. Pure: no IO.
//!
//! FE ids are not kept as strings: each is reduced to a 64-bit hash ([`fe_key`]) that the agent
//! maps to its FE table; the final consistency check of the benchmark compares every agent's
//! state with the truth, so a collision could not go unnoticed.

use std::hash::{BuildHasher, Hasher};

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, merge_loop, skip_field};
use prost::{DecodeError, Message};

/// One binding upsert as the simulated agent needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeanBinding {
    /// IPv4 address as a number (0 when the entry was not IPv4).
    pub ip: u32,
    /// [`fe_key`] of the binding FE.
    pub fe: u64,
    /// VM MAC.
    pub mac: [u8; 6],
    /// Move sequence.
    pub move_seq: u64,
    /// Store revision.
    pub revision: u64,
}

/// One binding removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeanRemoval {
    /// IPv4 address as a number.
    pub ip: u32,
    /// Revision of the removal.
    pub revision: u64,
}

/// `SyncUpdate` with only what a simulated agent applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeanSyncUpdate {
    /// `SyncPhase` value.
    pub phase: i32,
    /// The agent is current up to this revision after applying the message.
    pub revision: u64,
    /// First snapshot message.
    pub reset: bool,
    /// Binding upserts.
    pub upserts: Vec<LeanBinding>,
    /// Binding removals.
    pub removals: Vec<LeanRemoval>,
    /// FE upserts and removals (counted, not applied: FEs do not change during the benchmark).
    pub fe_changes: u32,
    /// Entries that were not IPv4 or had malformed fields.
    pub malformed: u32,
    /// Encoded size of the message.
    pub encoded_bytes: usize,
}

/// The key an FE id is reduced to (stable within one process).
pub fn fe_key(fe_id: &[u8]) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x5eed_f0e5).build_hasher();
    h.write(fe_id);
    h.finish()
}

fn read_len(buf: &mut impl Buf) -> Result<usize, DecodeError> {
    let len = decode_varint(buf)?;
    if len > buf.remaining() as u64 {
        // prost has no public constructor for this error kind any more; the message is ours.
        #[allow(deprecated)]
        return Err(DecodeError::new("buffer underflow"));
    }
    Ok(len as usize)
}

/// Reads a length-delimited field of at most `N` bytes into `out`; returns its length, or `None`
/// (field skipped) when longer.
fn read_small<const N: usize>(buf: &mut impl Buf, out: &mut [u8; N]) -> Result<Option<usize>, DecodeError> {
    let len = read_len(buf)?;
    if len > N {
        buf.advance(len);
        return Ok(None);
    }
    buf.copy_to_slice(&mut out[..len]);
    Ok(Some(len))
}

fn ipv4(bytes: &[u8], len: Option<usize>) -> Option<u32> {
    (len == Some(4)).then(|| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A length-delimited IPv4 address (None if it is not 4 bytes).
fn read_ipv4(buf: &mut impl Buf) -> Result<Option<u32>, DecodeError> {
    let mut ip = [0u8; 16];
    let len = read_small(buf, &mut ip)?;
    Ok(ipv4(&ip, len))
}

fn merge_binding(
    entry: &mut LeanBinding,
    ok: &mut bool,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let (tag, wire) = decode_key(buf)?;
    match (tag, wire) {
        (1, WireType::LengthDelimited) => match read_ipv4(buf)? {
            Some(v) => entry.ip = v,
            None => *ok = false,
        },
        (2, WireType::LengthDelimited) => {
            let mut name = [0u8; 255];
            match read_small(buf, &mut name)? {
                Some(len) => entry.fe = fe_key(&name[..len]),
                None => *ok = false,
            }
        }
        (3, WireType::LengthDelimited) => {
            let mut mac = [0u8; 6];
            if read_small(buf, &mut mac)? == Some(6) {
                entry.mac = mac;
            } else {
                *ok = false;
            }
        }
        (4, WireType::Varint) => entry.move_seq = decode_varint(buf)?,
        (5, WireType::Varint) => entry.revision = decode_varint(buf)?,
        _ => skip_field(wire, tag, buf, ctx)?,
    }
    Ok(())
}

fn merge_removal(
    entry: &mut LeanRemoval,
    ok: &mut bool,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let (tag, wire) = decode_key(buf)?;
    match (tag, wire) {
        (1, WireType::LengthDelimited) => match read_ipv4(buf)? {
            Some(v) => entry.ip = v,
            None => *ok = false,
        },
        (2, WireType::Varint) => entry.revision = decode_varint(buf)?,
        _ => skip_field(wire, tag, buf, ctx)?,
    }
    Ok(())
}

impl Message for LeanSyncUpdate {
    fn encode_raw(&self, _buf: &mut impl BufMut) {
        // Decode-only: the simulated agents never send a SyncUpdate.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let before = buf.remaining();
        match (tag, wire_type) {
            (1, WireType::Varint) => self.phase = decode_varint(buf)? as i32,
            (2, WireType::Varint) => self.revision = decode_varint(buf)?,
            (3, WireType::Varint) => self.reset = decode_varint(buf)? != 0,
            (4 | 5, WireType::LengthDelimited) => {
                self.fe_changes += 1;
                skip_field(wire_type, tag, buf, ctx)?;
            }
            (6, WireType::LengthDelimited) => {
                let mut entry = LeanBinding::default();
                let mut ok = true;
                merge_loop(&mut entry, buf, ctx, |e, b, c| merge_binding(e, &mut ok, b, c))?;
                if ok {
                    self.upserts.push(entry);
                } else {
                    self.malformed += 1;
                }
            }
            (7, WireType::LengthDelimited) => {
                let mut entry = LeanRemoval::default();
                let mut ok = true;
                merge_loop(&mut entry, buf, ctx, |e, b, c| merge_removal(e, &mut ok, b, c))?;
                if ok {
                    self.removals.push(entry);
                } else {
                    self.malformed += 1;
                }
            }
            _ => skip_field(wire_type, tag, buf, ctx)?,
        }
        // The field key is not counted here; add its length so the total matches the wire size.
        self.encoded_bytes += before - buf.remaining() + prost::encoding::key_len(tag);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = LeanSyncUpdate::default();
    }
}

/// Decodes one encoded `SyncUpdate` (without the gRPC frame header).
pub fn decode(bytes: &[u8]) -> Result<LeanSyncUpdate, DecodeError> {
    LeanSyncUpdate::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_proto::v1::{BindingEntry, BindingRemoval, FeEntry, SyncPhase, SyncUpdate};

    fn entry(ip: [u8; 4], fe: &str, seq: u64, rev: u64) -> BindingEntry {
        BindingEntry {
            vm_ip: ip.to_vec(),
            fe_id: fe.into(),
            mac: vec![2, 0, 0, 0, 0, ip[3]],
            move_seq: seq,
            revision: rev,
            pending_fe_id: String::new(),
        }
    }

    #[test]
    fn decodes_what_the_generated_type_encodes() {
        let msg = SyncUpdate {
            phase: SyncPhase::Delta as i32,
            revision: 99,
            reset: true,
            fe_upserts: vec![FeEntry { fe_id: "fe1".into(), underlay_addr: vec![1, 2, 3, 4], ..Default::default() }],
            binding_upserts: vec![entry([10, 0, 0, 1], "fe1", 3, 90), entry([10, 0, 0, 2], "fe-two", 0, 91)],
            binding_removals: vec![BindingRemoval { vm_ip: vec![10, 0, 0, 3], revision: 92 }],
            mobile_prefixes: vec!["10.0.0.0/8".into()],
            sent_at_unix_nanos: 12345,
            ..Default::default()
        };
        let bytes = msg.encode_to_vec();
        let lean = decode(&bytes).unwrap();
        assert_eq!((lean.phase, lean.revision, lean.reset), (SyncPhase::Delta as i32, 99, true));
        assert_eq!(lean.fe_changes, 1);
        assert_eq!(lean.malformed, 0);
        assert_eq!(lean.encoded_bytes, bytes.len());
        assert_eq!(
            lean.upserts,
            vec![
                LeanBinding { ip: 0x0a00_0001, fe: fe_key(b"fe1"), mac: [2, 0, 0, 0, 0, 1], move_seq: 3, revision: 90 },
                LeanBinding {
                    ip: 0x0a00_0002,
                    fe: fe_key(b"fe-two"),
                    mac: [2, 0, 0, 0, 0, 2],
                    move_seq: 0,
                    revision: 91
                },
            ]
        );
        assert_eq!(lean.removals, vec![LeanRemoval { ip: 0x0a00_0003, revision: 92 }]);
    }

    #[test]
    fn concatenated_messages_merge_like_protobuf() {
        // The wire contract allows a server to concatenate encoded messages; repeated fields append.
        let a =
            SyncUpdate { revision: 5, binding_upserts: vec![entry([10, 0, 0, 1], "a", 0, 4)], ..Default::default() };
        let b =
            SyncUpdate { revision: 7, binding_upserts: vec![entry([10, 0, 0, 1], "b", 1, 7)], ..Default::default() };
        let mut bytes = a.encode_to_vec();
        bytes.extend(b.encode_to_vec());
        let lean = decode(&bytes).unwrap();
        assert_eq!(lean.revision, 7);
        assert_eq!(lean.upserts.len(), 2);
    }

    #[test]
    fn ipv6_and_short_fields_are_counted_as_malformed_not_applied() {
        let msg = SyncUpdate {
            binding_upserts: vec![
                BindingEntry { vm_ip: vec![0; 16], fe_id: "a".into(), mac: vec![0; 6], ..Default::default() },
                BindingEntry { vm_ip: vec![10, 0, 0, 1], fe_id: "a".into(), mac: vec![0; 5], ..Default::default() },
            ],
            ..Default::default()
        };
        let lean = decode(&msg.encode_to_vec()).unwrap();
        assert!(lean.upserts.is_empty());
        assert_eq!(lean.malformed, 2);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let msg = SyncUpdate { binding_upserts: vec![entry([10, 0, 0, 1], "fe1", 3, 90)], ..Default::default() };
        let bytes = msg.encode_to_vec();
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    }
}

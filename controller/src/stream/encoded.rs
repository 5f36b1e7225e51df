//! Agent stream messages as pre-encoded bytes, so that a change fanned out to a thousand agents
//! is encoded once, not once per stream.
//!
//! The wire contract lets a server concatenate encoded `SyncUpdate`s: protobuf appends repeated
//! fields, and agents keep the highest revision per key whatever the order. So every cache
//! [`Frame`] is encoded once, lazily, as the repeated-field records of its changes
//! ([`frame_bytes`]), and a stream's delta is a small header (phase, revision, ...) followed by
//! the shared bytes of its frames ([`EncodedSync`]), copied once into the gRPC-framed buffer the
//! connection writes ([`framed`]). A key changed in several frames of one message is sent once
//! per frame (the agent keeps the newest): the price of sharing the encoding. Pure: no IO.

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use victor_proto::types::ip_to_bytes;
use victor_proto::v1::{BindingRemoval, FeEntry, FeRemoval, SyncUpdate};
use victor_store::Revision;

use crate::cache::{BindingView, CacheChange, Frame};
use crate::wire;

/// `SyncUpdate` field numbers of the repeated fields.
const FE_UPSERTS: u32 = 4;
const FE_REMOVALS: u32 = 5;
const BINDING_UPSERTS: u32 = 6;
const BINDING_REMOVALS: u32 = 7;

/// One stream message: the header fields as a (small) message, then pre-encoded repeated fields.
#[derive(Debug, Clone, Default)]
pub struct EncodedSync {
    /// Phase, revision, reset, mobile prefixes, send time (no entries).
    pub header: SyncUpdate,
    /// Encoded repeated-field records, concatenated after the header.
    pub parts: Vec<Bytes>,
}

impl EncodedSync {
    /// Encoded size.
    pub fn encoded_len(&self) -> usize {
        self.header.encoded_len() + self.parts.iter().map(Bytes::len).sum::<usize>()
    }

    /// The whole message as one buffer (tests, and the decoded view).
    pub fn to_bytes(&self) -> Vec<u8> {
        framed(&self.header, &self.parts)[GRPC_PREFIX_LEN..].to_vec()
    }

    /// The message with its gRPC prefix, as the connection writes it.
    pub fn framed(&self) -> Bytes {
        framed(&self.header, &self.parts)
    }
}

/// A binding upsert by field, as the agents need it (`BindingEntry`).
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    /// VM IP.
    pub ip: IpAddr,
    /// The binding FE.
    pub fe_id: &'a str,
    /// VM MAC.
    pub mac: [u8; 6],
    /// Move sequence.
    pub move_seq: u64,
    /// Store revision.
    pub revision: Revision,
    /// The announced migration target ("" if none).
    pub pending_fe_id: &'a str,
}

impl<'a> EntryRef<'a> {
    /// The entry of a cached binding.
    pub fn of(ip: IpAddr, view: &'a BindingView) -> Self {
        EntryRef {
            ip,
            fe_id: &view.fe_id,
            mac: view.mac.octets(),
            move_seq: view.move_seq,
            revision: view.revision,
            pending_fe_id: view.pending_fe_id(),
        }
    }
}

fn put_bytes_field(buf: &mut BytesMut, tag: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

fn put_varint_field(buf: &mut BytesMut, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn bytes_field_len(len: usize) -> usize {
    if len == 0 { 0 } else { 1 + encoded_len_varint(len as u64) + len }
}

fn varint_field_len(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + encoded_len_varint(value) }
}

/// Length of the body of one `binding_upserts` record.
fn binding_body_len(e: &EntryRef<'_>) -> usize {
    let ip_len = if e.ip.is_ipv4() { 4 } else { 16 };
    bytes_field_len(ip_len)
        + bytes_field_len(e.fe_id.len())
        + bytes_field_len(e.mac.len())
        + varint_field_len(e.move_seq)
        + varint_field_len(e.revision)
        + bytes_field_len(e.pending_fe_id.len())
}

/// Bytes [`put_binding`] appends for `e` (tag and length prefix included).
pub fn binding_len(e: &EntryRef<'_>) -> usize {
    let body = binding_body_len(e);
    1 + encoded_len_varint(body as u64) + body
}

/// Bytes one cache change takes in a `SyncUpdate` (what [`encode_changes`] writes for it).
pub fn change_len(change: &CacheChange) -> usize {
    use prost::encoding::message::encoded_len;
    match change {
        CacheChange::Binding { ip, view: Some(view), .. } => binding_len(&EntryRef::of(*ip, view)),
        CacheChange::Binding { ip, revision, view: None } => {
            encoded_len(BINDING_REMOVALS, &BindingRemoval { vm_ip: ip_to_bytes(*ip), revision: *revision })
        }
        CacheChange::Fe { view: Some(view), .. } => encoded_len(FE_UPSERTS, &wire::fe_entry(view)),
        CacheChange::Fe { fe_id, revision, view: None } => {
            encoded_len(FE_REMOVALS, &FeRemoval { fe_id: fe_id.to_string(), revision: *revision })
        }
    }
}

/// Appends one `binding_upserts` record, byte for byte what prost writes for the same
/// `BindingEntry`, without building one (no allocation per entry).
pub fn put_binding(buf: &mut BytesMut, e: &EntryRef<'_>) {
    let mut ip_buf = [0u8; 16];
    let ip: &[u8] = match e.ip {
        IpAddr::V4(v4) => {
            ip_buf[..4].copy_from_slice(&v4.octets());
            &ip_buf[..4]
        }
        IpAddr::V6(v6) => {
            ip_buf = v6.octets();
            &ip_buf
        }
    };
    let len = binding_body_len(e);
    encode_key(BINDING_UPSERTS, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_bytes_field(buf, 1, ip);
    put_bytes_field(buf, 2, e.fe_id.as_bytes());
    put_bytes_field(buf, 3, &e.mac);
    put_varint_field(buf, 4, e.move_seq);
    put_varint_field(buf, 5, e.revision);
    put_bytes_field(buf, 6, e.pending_fe_id.as_bytes());
}

/// The repeated-field records of a list of cache changes, in order.
pub fn encode_changes(changes: &[CacheChange]) -> Bytes {
    let mut buf = BytesMut::with_capacity(changes.len() * 40);
    for change in changes {
        match change {
            CacheChange::Binding { ip, view: Some(view), .. } => put_binding(&mut buf, &EntryRef::of(*ip, view)),
            CacheChange::Binding { ip, revision, view: None } => {
                let removal = BindingRemoval { vm_ip: ip_to_bytes(*ip), revision: *revision };
                prost::encoding::message::encode(BINDING_REMOVALS, &removal, &mut buf);
            }
            CacheChange::Fe { view: Some(view), .. } => {
                prost::encoding::message::encode(FE_UPSERTS, &wire::fe_entry(view), &mut buf);
            }
            CacheChange::Fe { fe_id, revision, view: None } => {
                let removal = FeRemoval { fe_id: fe_id.to_string(), revision: *revision };
                prost::encoding::message::encode(FE_REMOVALS, &removal, &mut buf);
            }
        }
    }
    buf.freeze()
}

/// The encoded changes of a frame, computed by the first stream that needs them and shared by
/// all others.
pub fn frame_bytes(frame: &Frame) -> Bytes {
    frame.encoded.get_or_init(|| encode_changes(&frame.changes)).clone()
}

/// `fe_upserts` records.
pub fn encode_fes(fes: &[FeEntry]) -> Bytes {
    let mut buf = BytesMut::new();
    for fe in fes {
        prost::encoding::message::encode(FE_UPSERTS, fe, &mut buf);
    }
    buf.freeze()
}

/// Length of the gRPC message prefix (compression flag, big-endian length).
pub const GRPC_PREFIX_LEN: usize = 5;

/// A gRPC length-prefixed message of `header` followed by `body_len` bytes that `body` appends,
/// in one buffer of exactly the right size.
pub fn framed_with(header: &SyncUpdate, body_len: usize, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let len = header.encoded_len() + body_len;
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX_LEN + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("stream messages are far below 4 GiB"));
    header.encode(&mut buf).expect("the buffer has room");
    body(&mut buf);
    debug_assert_eq!(buf.len(), GRPC_PREFIX_LEN + len, "body_len matches what body wrote");
    buf.freeze()
}

/// A gRPC length-prefixed message: `header`, then the pre-encoded `parts`.
pub fn framed(header: &SyncUpdate, parts: &[Bytes]) -> Bytes {
    framed_with(header, parts.iter().map(Bytes::len).sum(), |buf| {
        for part in parts {
            buf.put_slice(part);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::{BindingView, FeView};
    use crate::records::FeRecord;
    use victor_proto::Mac;
    use victor_proto::v1::{BindingEntry, SyncPhase};

    fn view(fe: &str, move_seq: u64, revision: Revision) -> BindingView {
        BindingView {
            fe_id: Arc::from(fe),
            mac: Mac([2, 0, 0, 0, 0, 7]),
            frozen: false,
            source: 1,
            move_seq,
            revision,
            observed_at: 1,
            committed_at: 2,
            observed_revision: 0,
            removed: false,
            extra: None,
        }
    }

    #[test]
    fn binding_records_match_prost_byte_for_byte() {
        for (ip, fe, seq, rev, pending) in [
            ("10.0.0.1", "fe1", 0, 0, ""),
            ("10.0.0.2", "a-much-longer-fe-name-for-the-length-varint", 300, 1 << 40, ""),
            ("2001:db8::1", "", 1, 5, ""),
            ("10.0.0.3", "fe1", 2, 9, "fe2"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut ours = BytesMut::new();
            let entry = EntryRef {
                ip,
                fe_id: fe,
                mac: [2, 0, 0, 0, 0, 7],
                move_seq: seq,
                revision: rev,
                pending_fe_id: pending,
            };
            put_binding(&mut ours, &entry);
            assert_eq!(binding_len(&entry), ours.len(), "{ip} {fe}");
            let msg = SyncUpdate {
                binding_upserts: vec![BindingEntry {
                    vm_ip: ip_to_bytes(ip),
                    fe_id: fe.into(),
                    mac: vec![2, 0, 0, 0, 0, 7],
                    move_seq: seq,
                    revision: rev,
                    pending_fe_id: pending.into(),
                }],
                ..Default::default()
            };
            assert_eq!(ours.as_ref(), msg.encode_to_vec().as_slice(), "{ip} {fe}");
        }
    }

    #[test]
    fn an_announced_migration_travels_with_the_binding() {
        use crate::cache::state::BindingExtra;
        let ip: IpAddr = "10.0.0.4".parse().unwrap();
        let extra = BindingExtra { pending_fe_id: "fe3".into(), pending_until: 99, ..Default::default() };
        let announced = BindingView { extra: Some(Box::new(extra)), ..view("fe1", 2, 8) };
        let change = CacheChange::Binding { ip, revision: 8, view: Some(announced.clone()) };
        let bytes = encode_changes(std::slice::from_ref(&change));
        assert_eq!(change_len(&change), bytes.len());
        let decoded = SyncUpdate::decode(bytes.as_ref()).unwrap();
        assert_eq!(decoded.binding_upserts, vec![wire::binding_entry(ip, &announced)]);
        assert_eq!(
            (decoded.binding_upserts[0].fe_id.as_str(), decoded.binding_upserts[0].pending_fe_id.as_str()),
            ("fe1", "fe3")
        );
        let plain = SyncUpdate::decode(
            encode_changes(&[CacheChange::Binding { ip, revision: 9, view: Some(view("fe1", 2, 9)) }]).as_ref(),
        )
        .unwrap();
        assert_eq!(plain.binding_upserts[0].pending_fe_id, "", "no announcement: the field is absent");
    }

    #[test]
    fn frames_concatenate_into_one_valid_message() {
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let fe = FeView {
            fe_id: Arc::from("fe9"),
            underlay: "192.0.2.9".parse().unwrap(),
            record: FeRecord { site: "s".into(), ..Default::default() },
            revision: 3,
            session_revision: 4,
        };
        let a = encode_changes(&[
            CacheChange::Binding { ip: ip1, revision: 5, view: Some(view("fe1", 0, 5)) },
            CacheChange::Fe { fe_id: Arc::from("fe9"), revision: 4, view: Some(fe.clone()) },
        ]);
        let b = encode_changes(&[
            CacheChange::Binding { ip: ip1, revision: 6, view: Some(view("fe2", 1, 6)) },
            CacheChange::Binding { ip: ip2, revision: 6, view: None },
            CacheChange::Fe { fe_id: Arc::from("fe8"), revision: 6, view: None },
        ]);
        let header = SyncUpdate {
            phase: SyncPhase::Delta as i32,
            revision: 6,
            mobile_prefixes: vec!["10.0.0.0/8".into()],
            sent_at_unix_nanos: 77,
            ..Default::default()
        };
        let changes_a = [
            CacheChange::Binding { ip: ip1, revision: 5, view: Some(view("fe1", 0, 5)) },
            CacheChange::Fe { fe_id: Arc::from("fe9"), revision: 4, view: Some(fe.clone()) },
        ];
        assert_eq!(changes_a.iter().map(change_len).sum::<usize>(), a.len(), "lengths match the encoding");
        let removals = [
            CacheChange::Binding { ip: ip2, revision: 6, view: None },
            CacheChange::Fe { fe_id: Arc::from("fe8"), revision: 6, view: None },
        ];
        assert_eq!(removals.iter().map(change_len).sum::<usize>(), encode_changes(&removals).len());
        let msg = EncodedSync { header: header.clone(), parts: vec![a, b] };
        let bytes = msg.to_bytes();
        assert_eq!(bytes.len(), msg.encoded_len());
        let decoded = SyncUpdate::decode(bytes.as_slice()).unwrap();
        assert_eq!((decoded.phase, decoded.revision, decoded.sent_at_unix_nanos), (header.phase, 6, 77));
        assert_eq!(decoded.mobile_prefixes, header.mobile_prefixes);
        let upserts: Vec<_> =
            decoded.binding_upserts.iter().map(|e| (e.fe_id.as_str(), e.move_seq, e.revision)).collect();
        assert_eq!(upserts, vec![("fe1", 0, 5), ("fe2", 1, 6)], "both frames' entries, in order");
        assert_eq!(decoded.binding_removals, vec![BindingRemoval { vm_ip: ip_to_bytes(ip2), revision: 6 }]);
        assert_eq!(decoded.fe_upserts, vec![wire::fe_entry(&fe)]);
        assert_eq!(decoded.fe_removals, vec![FeRemoval { fe_id: "fe8".into(), revision: 6 }]);
    }
}

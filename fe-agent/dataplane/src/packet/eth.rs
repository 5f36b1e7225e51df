//! Ethernet II framing shared by the ARP, RARP and NDP codecs: MAC addresses, the MAC header
//! with at most one 802.1Q tag (stacked tags — QinQ, 0x88a8 or a second 0x8100 — are refused),
//! and writing a header in front of a payload.

use std::fmt;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Length of an Ethernet header without a tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Minimum Ethernet frame length without FCS; shorter frames are padded with zeros.
pub const MIN_FRAME_LEN: usize = 60;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00 (the target MAC of an ARP request).
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// True for a group (multicast or broadcast) address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a [`MacAddr`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex bytes like 02:00:00:00:00:01")]
pub struct MacParseError(pub String);

impl std::str::FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

/// A parsed Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthHeader {
    /// Destination.
    pub dst: MacAddr,
    /// Source.
    pub src: MacAddr,
    /// 802.1Q VLAN id, if the frame carried one tag.
    pub vlan: Option<u16>,
    /// EtherType of the payload (after the tag).
    pub ethertype: u16,
    /// Where the payload starts (14, or 18 when tagged).
    pub payload_at: usize,
}

/// Why a frame has no usable Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EthError {
    /// Shorter than the header (+ tag).
    #[error("frame of {len} bytes is shorter than its {needed}-byte Ethernet header")]
    TooShort {
        /// Frame length.
        len: usize,
        /// Header bytes needed.
        needed: usize,
    },
    /// Two or more VLAN tags.
    #[error("stacked VLAN tags (QinQ) are not supported")]
    StackedVlan,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn mac_at(b: &[u8], at: usize) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    MacAddr(m)
}

/// Parses the MAC header of `frame` (without FCS).
pub fn parse(frame: &[u8]) -> Result<EthHeader, EthError> {
    if frame.len() < ETH_HEADER_LEN {
        return Err(EthError::TooShort { len: frame.len(), needed: ETH_HEADER_LEN });
    }
    let mut ethertype = be16(frame, 12);
    let mut payload_at = ETH_HEADER_LEN;
    let mut vlan = None;
    if ethertype == ETHERTYPE_QINQ {
        return Err(EthError::StackedVlan);
    }
    if ethertype == ETHERTYPE_VLAN {
        if frame.len() < ETH_HEADER_LEN + VLAN_TAG_LEN {
            return Err(EthError::TooShort { len: frame.len(), needed: ETH_HEADER_LEN + VLAN_TAG_LEN });
        }
        vlan = Some(be16(frame, 14) & 0x0fff);
        ethertype = be16(frame, 16);
        payload_at += VLAN_TAG_LEN;
        if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
            return Err(EthError::StackedVlan);
        }
    }
    Ok(EthHeader { dst: mac_at(frame, 0), src: mac_at(frame, 6), vlan, ethertype, payload_at })
}

/// Appends a MAC header (tagged when `vlan` is set) to `out`.
pub fn write_header(out: &mut Vec<u8>, dst: MacAddr, src: MacAddr, vlan: Option<u16>, ethertype: u16) {
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    if let Some(vid) = vlan {
        out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// Pads `frame` with zeros to the Ethernet minimum.
pub fn pad(frame: &mut Vec<u8>) {
    frame.resize(frame.len().max(MIN_FRAME_LEN), 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_roundtrip_with_and_without_tag() {
        let (dst, src) = (MacAddr::BROADCAST, MacAddr([2, 0, 0, 0, 0, 1]));
        for vlan in [None, Some(42)] {
            let mut f = Vec::new();
            write_header(&mut f, dst, src, vlan, ETHERTYPE_IPV6);
            let h = parse(&f).unwrap();
            assert_eq!((h.dst, h.src, h.vlan, h.ethertype), (dst, src, vlan, ETHERTYPE_IPV6));
            assert_eq!(h.payload_at, f.len());
        }
    }

    #[test]
    fn short_and_stacked_frames_are_refused() {
        assert_eq!(parse(&[0; 13]), Err(EthError::TooShort { len: 13, needed: 14 }));
        let mut tagged = Vec::new();
        write_header(&mut tagged, MacAddr::BROADCAST, MacAddr::ZERO, Some(7), ETHERTYPE_VLAN);
        assert_eq!(parse(&tagged), Err(EthError::StackedVlan));
        assert_eq!(parse(&tagged[..16]), Err(EthError::TooShort { len: 16, needed: 18 }));
        let mut qinq = tagged.clone();
        qinq[12..14].copy_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
        assert_eq!(parse(&qinq), Err(EthError::StackedVlan));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = parse(&bytes) {
                prop_assert!(h.payload_at <= bytes.len());
            }
        }
    }
}

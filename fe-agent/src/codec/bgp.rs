//! BGP-4 messages, as much of them as a route injector needs: OPEN with capabilities (RFC 4271,
//! RFC 5492; multiprotocol extensions RFC 4760; 4-octet AS numbers RFC 6793), UPDATE with
//! ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF and COMMUNITIES (RFC 1997) for IPv4 unicast in the
//! classic fields and IPv6 unicast in MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 4760; global and
//! link-local next hop, RFC 2545), KEEPALIVE, NOTIFICATION and ROUTE-REFRESH. Pure: bytes in,
//! values out. Every decoding error names the NOTIFICATION (code, subcode, data) RFC 4271 §6 says
//! to answer it with.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Length of the message header (marker, length, type).
pub const HEADER_LEN: usize = 19;
/// Largest BGP message without the extended-message capability.
pub const MAX_LEN: usize = 4096;
/// The 2-octet AS number that stands for a 4-octet one (RFC 6793).
pub const AS_TRANS: u16 = 23456;

const MARKER: [u8; 16] = [0xff; 16];
const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_FOUR_OCTET_AS: u8 = 65;
const OPT_PARAM_CAPABILITIES: u8 = 2;

const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED: u8 = 0x10;
const AS_SEQUENCE: u8 = 2;

/// Address family IPv4.
pub const AFI_IPV4: u16 = 1;
/// Address family IPv6.
pub const AFI_IPV6: u16 = 2;
/// Unicast SAFI.
pub const SAFI_UNICAST: u8 = 1;

/// A BGP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// NOTIFICATION.
    Notification(Notification),
    /// KEEPALIVE.
    Keepalive,
    /// ROUTE-REFRESH (RFC 2918).
    RouteRefresh {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
}

/// An OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Protocol version (4).
    pub version: u8,
    /// The sender's AS: from the 4-octet AS capability if present, else the 2-octet field.
    pub asn: u32,
    /// Proposed hold time (s); 0 = no keepalives.
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// True if the sender supports 4-octet AS numbers.
    pub fn four_octet_as(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// Encodes the message (4-octet AS and IPv4 unicast capabilities are always sent).
    pub fn encode(&self) -> Vec<u8> {
        let mut caps = Vec::new();
        for cap in &self.capabilities {
            let (code, value) = match cap {
                Capability::Multiprotocol { afi, safi } => {
                    let a = afi.to_be_bytes();
                    (CAP_MULTIPROTOCOL, vec![a[0], a[1], 0, *safi])
                }
                Capability::FourOctetAs(asn) => (CAP_FOUR_OCTET_AS, asn.to_be_bytes().to_vec()),
                Capability::Other { code, value } => (*code, value.clone()),
            };
            caps.push(code);
            caps.push(value.len() as u8);
            caps.extend_from_slice(&value);
        }
        let mut body = vec![self.version];
        let short = u16::try_from(self.asn).unwrap_or(AS_TRANS);
        body.extend_from_slice(&short.to_be_bytes());
        body.extend_from_slice(&self.hold_time.to_be_bytes());
        body.extend_from_slice(&self.router_id.octets());
        body.push((caps.len() + 2) as u8);
        body.push(OPT_PARAM_CAPABILITIES);
        body.push(caps.len() as u8);
        body.extend_from_slice(&caps);
        frame(OPEN, &body)
    }

    fn decode(body: &[u8]) -> Result<Open, DecodeError> {
        let bad = |what: &str| DecodeError::new(ErrorCode::Open, 0, Vec::new(), format!("OPEN: {what}"));
        if body.len() < 10 {
            return Err(bad("shorter than 10 bytes"));
        }
        let version = body[0];
        let short_as = u16::from_be_bytes([body[1], body[2]]);
        let hold_time = u16::from_be_bytes([body[3], body[4]]);
        let router_id = Ipv4Addr::new(body[5], body[6], body[7], body[8]);
        let opt_len = usize::from(body[9]);
        let mut params = body.get(10..10 + opt_len).ok_or_else(|| bad("optional parameters overrun the message"))?;
        let mut capabilities = Vec::new();
        while !params.is_empty() {
            let [kind, len, ref rest @ ..] = *params else {
                return Err(bad("truncated optional parameter"));
            };
            let value = rest.get(..usize::from(len)).ok_or_else(|| bad("optional parameter overruns"))?;
            params = &rest[usize::from(len)..];
            if kind != OPT_PARAM_CAPABILITIES {
                // RFC 4271 §6.2: unsupported optional parameter.
                return Err(DecodeError::new(
                    ErrorCode::Open,
                    4,
                    Vec::new(),
                    format!("OPEN: optional parameter type {kind}"),
                ));
            }
            let mut caps = value;
            while !caps.is_empty() {
                let [code, len, ref rest @ ..] = *caps else {
                    return Err(bad("truncated capability"));
                };
                let value = rest.get(..usize::from(len)).ok_or_else(|| bad("capability overruns"))?;
                caps = &rest[usize::from(len)..];
                capabilities.push(match (code, value) {
                    (CAP_MULTIPROTOCOL, [a0, a1, _, safi]) => {
                        Capability::Multiprotocol { afi: u16::from_be_bytes([*a0, *a1]), safi: *safi }
                    }
                    (CAP_FOUR_OCTET_AS, [a, b, c, d]) => Capability::FourOctetAs(u32::from_be_bytes([*a, *b, *c, *d])),
                    (CAP_MULTIPROTOCOL | CAP_FOUR_OCTET_AS, _) => {
                        return Err(bad(&format!("capability {code} has length {len}")));
                    }
                    _ => Capability::Other { code, value: value.to_vec() },
                });
            }
        }
        let asn = capabilities
            .iter()
            .find_map(|c| if let Capability::FourOctetAs(a) = c { Some(*a) } else { None })
            .unwrap_or(u32::from(short_as));
        Ok(Open { version, asn, hold_time, router_id, capabilities })
    }
}

/// A capability of an OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions for one (AFI, SAFI).
    Multiprotocol {
        /// Address family.
        afi: u16,
        /// Subsequent address family.
        safi: u8,
    },
    /// 4-octet AS numbers, with the sender's AS.
    FourOctetAs(u32),
    /// Anything else (kept, ignored).
    Other {
        /// Capability code.
        code: u8,
        /// Its value.
        value: Vec<u8>,
    },
}

/// The path attributes of an UPDATE that we send or read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// ORIGIN (0 = IGP).
    pub origin: Option<u8>,
    /// AS_PATH as one AS_SEQUENCE (empty for iBGP).
    pub as_path: Vec<u32>,
    /// NEXT_HOP.
    pub next_hop: Option<Ipv4Addr>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// LOCAL_PREF (iBGP only).
    pub local_pref: Option<u32>,
    /// COMMUNITIES.
    pub communities: Vec<Community>,
}

/// An UPDATE message: IPv4 unicast in the classic fields, IPv6 unicast in the multiprotocol
/// attributes (other families are skipped when decoding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// Withdrawn IPv4 routes.
    pub withdrawn: Vec<Ipv4Net>,
    /// Path attributes (meaningful only with `nlri` or `reach6`).
    pub attributes: Attributes,
    /// Announced IPv4 routes.
    pub nlri: Vec<Ipv4Net>,
    /// Announced IPv6 routes with their next hop (MP_REACH_NLRI), if the UPDATE has them.
    pub reach6: Option<Reach6>,
    /// Withdrawn IPv6 routes (MP_UNREACH_NLRI; empty in an IPv6 End-of-RIB).
    pub unreach6: Vec<Ipv6Net>,
}

/// The IPv6 unicast part of an MP_REACH_NLRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach6 {
    /// Where the routes lead.
    pub next_hop: NextHop6,
    /// The announced prefixes.
    pub nlri: Vec<Ipv6Net>,
}

/// The next hop of IPv6 routes (RFC 2545): a global address, and the link-local address of the
/// same interface when the peer shares that link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop6 {
    /// Global address.
    pub global: Ipv6Addr,
    /// Link-local address (sent only to a peer on the same link).
    pub link_local: Option<Ipv6Addr>,
}

impl fmt::Display for NextHop6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.link_local {
            Some(ll) => write!(f, "{} ({ll})", self.global),
            None => write!(f, "{}", self.global),
        }
    }
}

impl Update {
    /// Encodes UPDATEs announcing `prefixes` with `attributes`, as many messages as needed to
    /// stay within [`MAX_LEN`]. `four_octet`: the session negotiated 4-octet AS numbers.
    pub fn announce(prefixes: &[Ipv4Net], attributes: &Attributes, four_octet: bool) -> Vec<Vec<u8>> {
        let attrs = encode_attributes(attributes, four_octet);
        let fixed = HEADER_LEN + 2 + 2 + attrs.len();
        chunks(prefixes, MAX_LEN - fixed)
            .map(|nlri| {
                let mut body = vec![0, 0];
                body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
                body.extend_from_slice(&attrs);
                body.extend_from_slice(&nlri);
                frame(UPDATE, &body)
            })
            .collect()
    }

    /// Encodes UPDATEs withdrawing `prefixes` (as many as needed).
    pub fn withdraw(prefixes: &[Ipv4Net]) -> Vec<Vec<u8>> {
        chunks(prefixes, MAX_LEN - HEADER_LEN - 4)
            .map(|withdrawn| {
                let mut body = (withdrawn.len() as u16).to_be_bytes().to_vec();
                body.extend_from_slice(&withdrawn);
                body.extend_from_slice(&[0, 0]);
                frame(UPDATE, &body)
            })
            .collect()
    }

    /// Encodes UPDATEs announcing the IPv6 `prefixes` via `next_hop` in MP_REACH_NLRI, with
    /// `attributes` (whose IPv4 `next_hop` is not sent), as many as needed. MP_REACH_NLRI comes
    /// first (RFC 7606 §5.1) and always with an extended length, as BIRD and FRR write it.
    pub fn announce6(
        prefixes: &[Ipv6Net],
        attributes: &Attributes,
        next_hop: NextHop6,
        four_octet: bool,
    ) -> Vec<Vec<u8>> {
        let attrs = encode_attributes(&Attributes { next_hop: None, ..attributes.clone() }, four_octet);
        let mut head = mp_family(AFI_IPV6);
        head.push(if next_hop.link_local.is_some() { 32 } else { 16 });
        head.extend_from_slice(&next_hop.global.octets());
        if let Some(ll) = next_hop.link_local {
            head.extend_from_slice(&ll.octets());
        }
        head.push(0); // reserved (formerly the number of SNPAs)
        let fixed = HEADER_LEN + 2 + 2 + MP_ATTR_HEADER + head.len() + attrs.len();
        chunks(prefixes, MAX_LEN - fixed)
            .map(|nlri| {
                let mut all = Vec::with_capacity(MP_ATTR_HEADER + head.len() + nlri.len() + attrs.len());
                push_attribute(&mut all, FLAG_OPTIONAL | FLAG_EXTENDED, ATTR_MP_REACH, &[&head[..], &nlri].concat());
                all.extend_from_slice(&attrs);
                frame(UPDATE, &path_attributes_only(&all))
            })
            .collect()
    }

    /// Encodes UPDATEs withdrawing the IPv6 `prefixes` in MP_UNREACH_NLRI (as many as needed).
    pub fn withdraw6(prefixes: &[Ipv6Net]) -> Vec<Vec<u8>> {
        let family = mp_family(AFI_IPV6);
        chunks(prefixes, MAX_LEN - HEADER_LEN - 2 - 2 - MP_ATTR_HEADER - family.len())
            .map(|nlri| {
                let mut attr = Vec::with_capacity(MP_ATTR_HEADER + family.len() + nlri.len());
                push_attribute(
                    &mut attr,
                    FLAG_OPTIONAL | FLAG_EXTENDED,
                    ATTR_MP_UNREACH,
                    &[&family[..], &nlri].concat(),
                );
                frame(UPDATE, &path_attributes_only(&attr))
            })
            .collect()
    }

    fn decode(body: &[u8], four_octet: bool) -> Result<Update, DecodeError> {
        let bad = |what: &str| DecodeError::new(ErrorCode::Update, 1, Vec::new(), format!("UPDATE: {what}"));
        let wlen = usize::from(u16::from_be_bytes(*body.first_chunk().ok_or_else(|| bad("shorter than 4 bytes"))?));
        let withdrawn = body.get(2..2 + wlen).ok_or_else(|| bad("withdrawn routes overrun the message"))?;
        let rest = &body[2 + wlen..];
        let alen = usize::from(u16::from_be_bytes(*rest.first_chunk().ok_or_else(|| bad("no attribute length"))?));
        let attrs = rest.get(2..2 + alen).ok_or_else(|| bad("path attributes overrun the message"))?;
        let nlri = &rest[2 + alen..];
        let prefixes = |data: &[u8]| decode_prefixes(data).ok_or_else(invalid_prefix);
        let (attributes, reach6, unreach6) = decode_attributes(attrs, four_octet)?;
        Ok(Update { withdrawn: prefixes(withdrawn)?, attributes, nlri: prefixes(nlri)?, reach6, unreach6 })
    }
}

/// The UPDATE body of path attributes `attrs` without classic routes.
fn path_attributes_only(attrs: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + attrs.len());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(attrs);
    body
}

/// AFI and SAFI (unicast) as they open an MP_(UN)REACH_NLRI.
fn mp_family(afi: u16) -> Vec<u8> {
    let a = afi.to_be_bytes();
    vec![a[0], a[1], SAFI_UNICAST]
}

/// Flags, type and 2-byte length of an extended-length attribute.
const MP_ATTR_HEADER: usize = 4;

/// A NOTIFICATION: why a session is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: u8,
    /// Error subcode.
    pub subcode: u8,
    /// Data.
    pub data: Vec<u8>,
}

impl Notification {
    /// Cease / Administrative Shutdown (RFC 4486): we stop on purpose.
    pub fn admin_shutdown() -> Notification {
        Notification { code: ErrorCode::Cease as u8, subcode: 2, data: Vec::new() }
    }

    /// Hold Timer Expired.
    pub fn hold_timer_expired() -> Notification {
        Notification { code: ErrorCode::HoldTimer as u8, subcode: 0, data: Vec::new() }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = vec![self.code, self.subcode];
        body.extend_from_slice(&self.data);
        frame(NOTIFICATION, &body)
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            1 => "message header error",
            2 => "OPEN message error",
            3 => "UPDATE message error",
            4 => "hold timer expired",
            5 => "finite state machine error",
            6 => "cease",
            _ => "unknown error",
        };
        let sub = match (self.code, self.subcode) {
            (2, 1) => " (unsupported version number)",
            (2, 2) => " (bad peer AS)",
            (2, 3) => " (bad BGP identifier)",
            (2, 4) => " (unsupported optional parameter)",
            (2, 6) => " (unacceptable hold time)",
            (2, 7) => " (unsupported capability)",
            (6, 1) => " (maximum number of prefixes reached)",
            (6, 2) => " (administrative shutdown)",
            (6, 3) => " (peer de-configured)",
            (6, 4) => " (administrative reset)",
            (6, 5) => " (connection rejected)",
            (6, 6) => " (other configuration change)",
            (6, 7) => " (connection collision resolution)",
            (6, 8) => " (out of resources)",
            _ => "",
        };
        write!(f, "{code}{sub} [{}/{}]", self.code, self.subcode)
    }
}

/// KEEPALIVE.
pub fn keepalive() -> Vec<u8> {
    frame(KEEPALIVE, &[])
}

/// NOTIFICATION error codes (RFC 4271 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// Message Header Error.
    Header = 1,
    /// OPEN Message Error.
    Open = 2,
    /// UPDATE Message Error.
    Update = 3,
    /// Hold Timer Expired.
    HoldTimer = 4,
    /// Finite State Machine Error.
    Fsm = 5,
    /// Cease.
    Cease = 6,
}

/// A message we cannot accept, with the NOTIFICATION to answer it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct DecodeError {
    /// The NOTIFICATION for the peer.
    pub notification: Notification,
    /// What is wrong.
    pub what: String,
}

impl DecodeError {
    fn new(code: ErrorCode, subcode: u8, data: Vec<u8>, what: String) -> DecodeError {
        DecodeError { notification: Notification { code: code as u8, subcode, data }, what }
    }
}

/// The length of the message at the start of `buf`, once its header is complete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != MARKER {
        return Err(DecodeError::new(
            ErrorCode::Header,
            1,
            Vec::new(),
            "message header: marker is not all ones".into(),
        ));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    if !(HEADER_LEN..=MAX_LEN).contains(&len) {
        return Err(DecodeError::new(
            ErrorCode::Header,
            2,
            buf[16..18].to_vec(),
            format!("message header: length {len}"),
        ));
    }
    Ok(Some(len))
}

/// Decodes one complete message (as delimited by [`frame_len`]). `four_octet`: the session
/// negotiated 4-octet AS numbers (for AS_PATH).
pub fn decode(msg: &[u8], four_octet: bool) -> Result<Message, DecodeError> {
    let len = frame_len(msg)?.filter(|l| *l == msg.len()).ok_or_else(|| {
        DecodeError::new(ErrorCode::Header, 2, Vec::new(), format!("message of {} bytes is not one frame", msg.len()))
    })?;
    let kind = msg[18];
    let body = &msg[HEADER_LEN..len];
    let bad_len = || DecodeError::new(ErrorCode::Header, 2, msg[16..18].to_vec(), format!("type {kind}: length {len}"));
    match kind {
        OPEN => Open::decode(body).map(Message::Open),
        UPDATE => Update::decode(body, four_octet).map(Message::Update),
        NOTIFICATION => match body {
            [code, subcode, data @ ..] => {
                Ok(Message::Notification(Notification { code: *code, subcode: *subcode, data: data.to_vec() }))
            }
            _ => Err(bad_len()),
        },
        KEEPALIVE if body.is_empty() => Ok(Message::Keepalive),
        ROUTE_REFRESH => match body {
            [a0, a1, _, safi] => Ok(Message::RouteRefresh { afi: u16::from_be_bytes([*a0, *a1]), safi: *safi }),
            _ => Err(bad_len()),
        },
        KEEPALIVE => Err(bad_len()),
        other => Err(DecodeError::new(ErrorCode::Header, 3, vec![other], format!("message type {other}"))),
    }
}

/// A standard community `ASN:VALUE` (RFC 1997).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Community(pub u32);

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

impl FromStr for Community {
    type Err = String;

    fn from_str(s: &str) -> Result<Community, String> {
        let err = || format!("community {s:?} must be ASN:VALUE with both parts in 0..=65535 (e.g. 65010:100)");
        let (a, v) = s.split_once(':').ok_or_else(err)?;
        let a: u16 = a.parse().map_err(|_| err())?;
        let v: u16 = v.parse().map_err(|_| err())?;
        Ok(Community(u32::from(a) << 16 | u32::from(v)))
    }
}

impl serde::Serialize for Community {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    debug_assert!(len <= MAX_LEN, "BGP message of {len} bytes");
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Prefixes (IPv4 or IPv6) encoded back to back, cut into pieces of at most `room` bytes.
fn chunks<P: Copy + Into<IpNet>>(prefixes: &[P], room: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut rest = prefixes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        while let Some((p, tail)) = rest.split_first() {
            let p: IpNet = (*p).into();
            let bytes = usize::from(p.prefix_len()).div_ceil(8);
            if !out.is_empty() && out.len() + 1 + bytes > room {
                break;
            }
            out.push(p.prefix_len());
            match p.network() {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..bytes]),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..bytes]),
            }
            rest = tail;
        }
        Some(out)
    })
}

/// A prefix type of the NLRI encoding (length in bits, then as many address bytes as it needs).
trait Prefix: Sized {
    /// Bytes of the address.
    const BYTES: usize;
    /// The prefix of `len` bits whose address starts with `octets` (zero-padded), host bits
    /// cleared.
    fn from_octets(octets: &[u8], len: u8) -> Option<Self>;
}

impl Prefix for Ipv4Net {
    const BYTES: usize = 4;
    fn from_octets(octets: &[u8], len: u8) -> Option<Self> {
        let mut a = [0u8; 4];
        a[..octets.len()].copy_from_slice(octets);
        Some(Ipv4Net::new(Ipv4Addr::from(a), len).ok()?.trunc())
    }
}

impl Prefix for Ipv6Net {
    const BYTES: usize = 16;
    fn from_octets(octets: &[u8], len: u8) -> Option<Self> {
        let mut a = [0u8; 16];
        a[..octets.len()].copy_from_slice(octets);
        Some(Ipv6Net::new(Ipv6Addr::from(a), len).ok()?.trunc())
    }
}

/// Prefixes back to back; None if one is longer than the address or overruns.
fn decode_prefixes<P: Prefix>(mut data: &[u8]) -> Option<Vec<P>> {
    let mut out = Vec::new();
    while let [len, rest @ ..] = data {
        let bytes = usize::from(*len).div_ceil(8);
        if bytes > P::BYTES || rest.len() < bytes {
            return None;
        }
        out.push(P::from_octets(&rest[..bytes], *len)?);
        data = &rest[bytes..];
    }
    Some(out)
}

fn invalid_prefix() -> DecodeError {
    DecodeError::new(ErrorCode::Update, 10, Vec::new(), "UPDATE: invalid prefix".into())
}

/// The IPv6 unicast routes of an MP_(UN)REACH_NLRI, with the next hop of an MP_REACH_NLRI.
type Mp6 = (Option<NextHop6>, Vec<Ipv6Net>);

/// The IPv6 unicast content of an MP_REACH_NLRI (`reach`: its next hop and prefixes) or an
/// MP_UNREACH_NLRI (no next hop); None for another family, which a route injector skips.
fn decode_mp(value: &[u8], reach: bool) -> Result<Option<Mp6>, DecodeError> {
    let name = if reach { "MP_REACH_NLRI" } else { "MP_UNREACH_NLRI" };
    // RFC 4271 §6.3: a malformed optional attribute is an Optional Attribute Error.
    let bad = |what: &str| DecodeError::new(ErrorCode::Update, 9, Vec::new(), format!("UPDATE: {name}: {what}"));
    let [a0, a1, safi, ref rest @ ..] = *value else {
        return Err(bad("shorter than its address family"));
    };
    if (u16::from_be_bytes([a0, a1]), safi) != (AFI_IPV6, SAFI_UNICAST) {
        return Ok(None);
    }
    let (next_hop, nlri) = if reach {
        let [nh_len, ref rest @ ..] = *rest else {
            return Err(bad("no next hop length"));
        };
        let nh = rest.get(..usize::from(nh_len)).ok_or_else(|| bad("the next hop overruns"))?;
        let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
        let next_hop = match nh.len() {
            16 => NextHop6 { global: addr(nh), link_local: None },
            32 => NextHop6 { global: addr(&nh[..16]), link_local: Some(addr(&nh[16..])) },
            n => return Err(bad(&format!("IPv6 next hop of {n} bytes (16 or 32)"))),
        };
        // One reserved byte (formerly the number of SNPAs) between the next hop and the routes.
        let nlri = rest.get(usize::from(nh_len) + 1..).ok_or_else(|| bad("no reserved byte after the next hop"))?;
        (Some(next_hop), nlri)
    } else {
        (None, rest)
    };
    Ok(Some((next_hop, decode_prefixes(nlri).ok_or_else(invalid_prefix)?)))
}

/// Writes one path attribute; with an extended (2-byte) length if `flags` asks for it or the
/// value needs it.
fn push_attribute(out: &mut Vec<u8>, flags: u8, kind: u8, value: &[u8]) {
    if flags & FLAG_EXTENDED != 0 || value.len() > 255 {
        out.push(flags | FLAG_EXTENDED);
        out.push(kind);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(flags);
        out.push(kind);
        out.push(value.len() as u8);
    }
    out.extend_from_slice(value);
}

fn encode_attributes(a: &Attributes, four_octet: bool) -> Vec<u8> {
    let mut out = Vec::new();
    push_attribute(&mut out, FLAG_TRANSITIVE, ATTR_ORIGIN, &[a.origin.unwrap_or(0)]);
    let mut path = Vec::new();
    for segment in a.as_path.chunks(255) {
        path.push(AS_SEQUENCE);
        path.push(segment.len() as u8);
        for asn in segment {
            if four_octet {
                path.extend_from_slice(&asn.to_be_bytes());
            } else {
                path.extend_from_slice(&u16::try_from(*asn).unwrap_or(AS_TRANS).to_be_bytes());
            }
        }
    }
    push_attribute(&mut out, FLAG_TRANSITIVE, ATTR_AS_PATH, &path);
    if let Some(nh) = a.next_hop {
        push_attribute(&mut out, FLAG_TRANSITIVE, ATTR_NEXT_HOP, &nh.octets());
    }
    if let Some(med) = a.med {
        push_attribute(&mut out, FLAG_OPTIONAL, ATTR_MED, &med.to_be_bytes());
    }
    if let Some(pref) = a.local_pref {
        push_attribute(&mut out, FLAG_TRANSITIVE, ATTR_LOCAL_PREF, &pref.to_be_bytes());
    }
    if !a.communities.is_empty() {
        let value: Vec<u8> = a.communities.iter().flat_map(|c| c.0.to_be_bytes()).collect();
        push_attribute(&mut out, FLAG_OPTIONAL | FLAG_TRANSITIVE, ATTR_COMMUNITIES, &value);
    }
    out
}

/// The attributes of an UPDATE with the IPv6 routes of its MP_REACH_NLRI / MP_UNREACH_NLRI.
type DecodedAttributes = (Attributes, Option<Reach6>, Vec<Ipv6Net>);

fn decode_attributes(mut data: &[u8], four_octet: bool) -> Result<DecodedAttributes, DecodeError> {
    let bad = |subcode: u8, what: String| DecodeError::new(ErrorCode::Update, subcode, Vec::new(), what);
    let mut a = Attributes::default();
    let (mut reach6, mut unreach6) = (None, Vec::new());
    while !data.is_empty() {
        let [flags, kind, ref rest @ ..] = *data else {
            return Err(bad(1, "UPDATE: truncated path attribute".into()));
        };
        let (len, rest) = if flags & FLAG_EXTENDED != 0 {
            let l = rest.first_chunk::<2>().ok_or_else(|| bad(1, "UPDATE: truncated attribute length".into()))?;
            (usize::from(u16::from_be_bytes(*l)), &rest[2..])
        } else {
            let l = rest.first().ok_or_else(|| bad(1, "UPDATE: truncated attribute length".into()))?;
            (usize::from(*l), &rest[1..])
        };
        let value = rest.get(..len).ok_or_else(|| bad(5, format!("UPDATE: attribute {kind} overruns")))?;
        data = &rest[len..];
        let word = || value.try_into().map(u32::from_be_bytes).map_err(|_| bad(5, format!("attribute {kind} length")));
        match kind {
            ATTR_ORIGIN => a.origin = Some(*value.first().ok_or_else(|| bad(5, "ORIGIN length".into()))?),
            ATTR_AS_PATH => {
                let width = if four_octet { 4 } else { 2 };
                let mut seg = value;
                while let [_kind, count, ref rest @ ..] = *seg {
                    let n = usize::from(count) * width;
                    let asns = rest.get(..n).ok_or_else(|| bad(11, "UPDATE: malformed AS_PATH".into()))?;
                    a.as_path.extend(asns.chunks(width).map(|c| match *c {
                        [h, l] => u32::from(u16::from_be_bytes([h, l])),
                        [b0, b1, b2, b3] => u32::from_be_bytes([b0, b1, b2, b3]),
                        _ => unreachable!("chunks of the AS width"),
                    }));
                    seg = &rest[n..];
                }
                if !seg.is_empty() {
                    return Err(bad(11, "UPDATE: malformed AS_PATH".into()));
                }
            }
            ATTR_NEXT_HOP => a.next_hop = Some(Ipv4Addr::from(word()?)),
            ATTR_MED => a.med = Some(word()?),
            ATTR_LOCAL_PREF => a.local_pref = Some(word()?),
            ATTR_COMMUNITIES if value.len() % 4 == 0 => {
                a.communities =
                    value.chunks(4).map(|c| Community(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))).collect()
            }
            ATTR_COMMUNITIES => return Err(bad(5, "COMMUNITIES length".into())),
            ATTR_MP_REACH => {
                if let Some((Some(next_hop), nlri)) = decode_mp(value, true)? {
                    reach6 = Some(Reach6 { next_hop, nlri });
                }
            }
            ATTR_MP_UNREACH => {
                if let Some((_, nlri)) = decode_mp(value, false)? {
                    unreach6 = nlri;
                }
            }
            _ => {}
        }
    }
    Ok((a, reach6, unreach6))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn open(asn: u32) -> Open {
        Open {
            version: 4,
            asn,
            hold_time: 9,
            router_id: Ipv4Addr::new(198, 51, 100, 2),
            capabilities: vec![
                Capability::Multiprotocol { afi: AFI_IPV4, safi: SAFI_UNICAST },
                Capability::FourOctetAs(asn),
            ],
        }
    }

    #[test]
    fn open_round_trips_and_uses_as_trans_for_large_asns() {
        for asn in [65010, 4_200_000_001] {
            let bytes = open(asn).encode();
            assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
            assert_eq!(decode(&bytes, true).unwrap(), Message::Open(open(asn)));
            let short = u16::from_be_bytes([bytes[20], bytes[21]]);
            assert_eq!(u32::from(short), if asn > 65535 { u32::from(AS_TRANS) } else { asn });
        }
    }

    #[test]
    fn open_from_a_real_router_with_unknown_capabilities() {
        // An OPEN as BIRD 2 sends it: MP IPv4 unicast, route refresh, graceful restart, 4-octet
        // AS 65000, enhanced route refresh, long-lived graceful restart.
        let caps: &[u8] = &[1, 4, 0, 1, 0, 1, 2, 0, 64, 2, 0, 120, 65, 4, 0, 0, 0xfd, 0xe8, 70, 0, 71, 0];
        let mut body = vec![4, 0xfd, 0xe8, 0, 240, 203, 0, 113, 1, (caps.len() + 2) as u8, 2, caps.len() as u8];
        body.extend_from_slice(caps);
        let Message::Open(o) = decode(&frame(OPEN, &body), false).unwrap() else { panic!() };
        assert_eq!((o.asn, o.hold_time, o.router_id), (65000, 240, Ipv4Addr::new(203, 0, 113, 1)));
        assert!(o.four_octet_as());
        assert_eq!(o.capabilities.len(), 6);
    }

    #[test]
    fn update_announce_and_withdraw_round_trip() {
        let attrs = Attributes {
            origin: Some(0),
            as_path: vec![65010],
            next_hop: Some(Ipv4Addr::new(203, 0, 113, 2)),
            med: None,
            local_pref: None,
            communities: vec!["65010:100".parse().unwrap()],
        };
        let prefixes = [net("10.10.0.0/16"), net("192.0.2.128/25"), net("0.0.0.0/0"), net("10.1.2.3/32")];
        let msgs = Update::announce(&prefixes, &attrs, true);
        assert_eq!(msgs.len(), 1);
        let Message::Update(u) = decode(&msgs[0], true).unwrap() else { panic!() };
        assert_eq!(u, Update { attributes: attrs.clone(), nlri: prefixes.to_vec(), ..Update::default() });
        // 2-octet AS_PATH when the session did not negotiate 4-octet AS numbers.
        let msgs = Update::announce(&prefixes[..1], &attrs, false);
        let Message::Update(u) = decode(&msgs[0], false).unwrap() else { panic!() };
        assert_eq!(u.attributes.as_path, vec![65010]);

        let msgs = Update::withdraw(&prefixes);
        let Message::Update(u) = decode(&msgs[0], true).unwrap() else { panic!() };
        assert_eq!(u, Update { withdrawn: prefixes.to_vec(), ..Update::default() });
    }

    #[test]
    fn many_prefixes_are_split_into_messages_within_4096_bytes() {
        let prefixes: Vec<Ipv4Net> = (0..3000u32).map(|i| Ipv4Net::new(Ipv4Addr::from(i << 8), 24).unwrap()).collect();
        for msgs in [Update::announce(&prefixes, &Attributes::default(), true), Update::withdraw(&prefixes)] {
            assert!(msgs.len() > 1);
            let mut seen = Vec::new();
            for m in &msgs {
                assert!(m.len() <= MAX_LEN, "{}", m.len());
                let Message::Update(u) = decode(m, true).unwrap() else { panic!() };
                seen.extend(u.nlri);
                seen.extend(u.withdrawn);
            }
            assert_eq!(seen, prefixes);
        }
    }

    /// `2001:db8:1::/48` via 2001:db8::1 and fe80::1, eBGP from AS 65010 (4-octet), computed by
    /// hand from RFC 4760 §3 and RFC 2545 §3; netgauze-bgp-pkt writes the same 84 bytes
    /// (`fuzz/corpus/bgp_message/update_ipv6_announce` behind the fuzzer's flag byte).
    #[rustfmt::skip]
    const IPV6_ANNOUNCE: [u8; 84] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // marker
        0x00, 0x54, 0x02, // length 84, UPDATE
        0x00, 0x00, // no withdrawn IPv4 routes
        0x00, 0x3d, // 61 bytes of path attributes
        0x90, 0x0e, 0x00, 0x2c, // MP_REACH_NLRI: optional, extended length, 44 bytes
        0x00, 0x02, 0x01, 0x20, // AFI 2 (IPv6), SAFI 1 (unicast), next hop of 32 bytes:
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // global 2001:db8::1
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // link-local fe80::1
        0x00, // reserved
        0x30, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, // 2001:db8:1::/48
        0x40, 0x01, 0x01, 0x00, // ORIGIN IGP
        0x40, 0x02, 0x06, 0x02, 0x01, 0x00, 0x00, 0xfd, 0xf2, // AS_PATH: AS_SEQUENCE of one, 65010
    ];

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn ebgp_attrs() -> Attributes {
        Attributes { origin: Some(0), as_path: vec![65010], ..Attributes::default() }
    }

    #[test]
    fn ipv6_announcement_matches_the_hand_computed_bytes() {
        let next_hop =
            NextHop6 { global: "2001:db8::1".parse().unwrap(), link_local: Some("fe80::1".parse().unwrap()) };
        let p = net6("2001:db8:1::/48");
        // The IPv4 NEXT_HOP of the attributes is not written: the MP_REACH_NLRI has the next hop.
        let attrs = Attributes { next_hop: Some(Ipv4Addr::new(192, 0, 2, 1)), ..ebgp_attrs() };
        assert_eq!(Update::announce6(&[p], &attrs, next_hop, true), vec![IPV6_ANNOUNCE.to_vec()]);
        let want =
            Update { attributes: ebgp_attrs(), reach6: Some(Reach6 { next_hop, nlri: vec![p] }), ..Update::default() };
        assert_eq!(decode(&IPV6_ANNOUNCE, true).unwrap(), Message::Update(want.clone()));
        // The same with a 1-byte attribute length (flags 0x80): 83 bytes, same meaning.
        let mut short = IPV6_ANNOUNCE.to_vec();
        short.remove(25);
        short[23] = 0x80;
        short[17] = 83;
        short[22] = 60;
        assert_eq!(decode(&short, true).unwrap(), Message::Update(want));
        // Global next hop only: 16 bytes.
        let global = NextHop6 { link_local: None, ..next_hop };
        let Message::Update(u) = decode(&Update::announce6(&[p], &attrs, global, true)[0], true).unwrap() else {
            panic!()
        };
        assert_eq!(u.reach6, Some(Reach6 { next_hop: global, nlri: vec![p] }));
    }

    #[test]
    fn ipv6_withdrawal_matches_the_hand_computed_bytes() {
        #[rustfmt::skip]
        let want = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, 0x25, 0x02, // length 37, UPDATE
            0x00, 0x00, 0x00, 0x0e, // no withdrawn IPv4 routes, 14 bytes of attributes
            0x90, 0x0f, 0x00, 0x0a, // MP_UNREACH_NLRI, extended length 10
            0x00, 0x02, 0x01, // IPv6 unicast
            0x30, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x01, // 2001:db8:1::/48
        ];
        let p = net6("2001:db8:1::/48");
        assert_eq!(Update::withdraw6(&[p]), vec![want.to_vec()]);
        assert_eq!(decode(&want, false).unwrap(), Message::Update(Update { unreach6: vec![p], ..Update::default() }));
        // BIRD's IPv6 End-of-RIB (RFC 4724): an empty MP_UNREACH_NLRI.
        let eor = frame(UPDATE, &[0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1]);
        assert_eq!(decode(&eor, true).unwrap(), Message::Update(Update::default()));
    }

    #[test]
    fn bird_open_offers_ipv4_and_ipv6_unicast() {
        // BIRD 2.0.12's OPEN on a session with an ipv4 and an ipv6 channel
        // (`fuzz/corpus/bgp_message/open_bird_dual_stack`).
        #[rustfmt::skip]
        let caps: &[u8] = &[
            1, 4, 0, 1, 0, 1, // multiprotocol IPv4 unicast
            1, 4, 0, 2, 0, 1, // multiprotocol IPv6 unicast
            2, 0, // route refresh
            64, 2, 0, 120, // graceful restart
            65, 4, 0, 0, 0xfd, 0xe8, // 4-octet AS 65000
            70, 0, // enhanced route refresh
            71, 0, // long-lived graceful restart
        ];
        let mut body = vec![4, 0xfd, 0xe8, 0, 9, 192, 0, 2, 1, (caps.len() + 2) as u8, 2, caps.len() as u8];
        body.extend_from_slice(caps);
        let bytes = frame(OPEN, &body);
        assert_eq!(bytes.len(), 59);
        let Message::Open(o) = decode(&bytes, false).unwrap() else { panic!() };
        assert_eq!((o.asn, o.hold_time, o.router_id), (65000, 9, Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(
            o.capabilities[..2],
            [
                Capability::Multiprotocol { afi: AFI_IPV4, safi: SAFI_UNICAST },
                Capability::Multiprotocol { afi: AFI_IPV6, safi: SAFI_UNICAST }
            ]
        );
    }

    #[test]
    fn malformed_multiprotocol_attributes_name_their_notification() {
        let update = |attrs: &[u8]| {
            let mut body = vec![0, 0];
            body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            body.extend_from_slice(attrs);
            decode(&frame(UPDATE, &body), true)
        };
        let code = |r: Result<Message, DecodeError>| {
            let e = r.unwrap_err();
            (e.notification.code, e.notification.subcode)
        };
        // Next hop of 3 bytes; next hop overrunning; no reserved byte; family cut short.
        assert_eq!(code(update(&[0x80, 14, 8, 0, 2, 1, 3, 1, 2, 3, 0])), (3, 9));
        assert_eq!(code(update(&[0x80, 14, 6, 0, 2, 1, 16, 0, 0])), (3, 9));
        let mut no_reserved = vec![0x80, 14, 20, 0, 2, 1, 16];
        no_reserved.extend([0; 16]);
        assert_eq!(code(update(&no_reserved)), (3, 9));
        assert_eq!(code(update(&[0x80, 15, 2, 0, 2])), (3, 9));
        // A /129 and a prefix that overruns.
        assert_eq!(code(update(&[0x80, 15, 5, 0, 2, 1, 129, 0])), (3, 10));
        assert_eq!(code(update(&[0x80, 15, 5, 0, 2, 1, 48, 0x20])), (3, 10));
        // Another family (IPv4 flowspec) is skipped, whatever it holds.
        let Message::Update(u) = update(&[0x80, 14, 5, 0, 1, 133, 0xff, 0xff]).unwrap() else { panic!() };
        assert_eq!(u, Update::default());
    }

    #[test]
    fn many_ipv6_prefixes_are_split_into_messages_within_4096_bytes() {
        let prefixes: Vec<Ipv6Net> = (0..3000u128)
            .map(|i| Ipv6Net::new(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 16)), 112).unwrap())
            .collect();
        let next_hop =
            NextHop6 { global: "2001:db8::1".parse().unwrap(), link_local: Some("fe80::1".parse().unwrap()) };
        let announced = updates(&Update::announce6(&prefixes, &ebgp_attrs(), next_hop, true), true);
        assert!(announced.len() > 1);
        let nlri: Vec<Ipv6Net> = announced.into_iter().flat_map(|u| u.reach6.unwrap().nlri).collect();
        assert_eq!(nlri, prefixes);
        let withdrawn = updates(&Update::withdraw6(&prefixes), true);
        assert!(withdrawn.len() > 1);
        assert_eq!(withdrawn.into_iter().flat_map(|u| u.unreach6).collect::<Vec<_>>(), prefixes);
    }

    #[test]
    fn keepalive_notification_route_refresh() {
        assert_eq!(decode(&keepalive(), true).unwrap(), Message::Keepalive);
        let n = Notification::admin_shutdown();
        assert_eq!(decode(&n.encode(), true).unwrap(), Message::Notification(n.clone()));
        assert_eq!(n.to_string(), "cease (administrative shutdown) [6/2]");
        assert_eq!(
            decode(&frame(ROUTE_REFRESH, &[0, 1, 0, 1]), true).unwrap(),
            Message::RouteRefresh { afi: AFI_IPV4, safi: SAFI_UNICAST }
        );
    }

    #[test]
    fn malformed_input_names_the_notification_to_send() {
        let mut bad_marker = keepalive();
        bad_marker[3] = 0;
        assert_eq!(frame_len(&bad_marker).unwrap_err().notification.subcode, 1);
        let mut long = keepalive();
        long[16..18].copy_from_slice(&5000u16.to_be_bytes());
        let e = frame_len(&long).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode), (1, 2));
        assert_eq!(frame_len(&keepalive()[..10]).unwrap(), None);
        let e = decode(&frame(9, &[]), true).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode, e.notification.data.clone()), (1, 3, vec![9]));
        let e = decode(&frame(KEEPALIVE, &[0]), true).unwrap_err();
        assert_eq!(e.notification.code, 1);
        // UPDATE whose withdrawn length overruns, and a /33 prefix.
        let e = decode(&frame(UPDATE, &[0, 9, 0, 0]), true).unwrap_err();
        assert_eq!(e.notification.code, 3);
        let e = decode(&frame(UPDATE, &[0, 2, 33, 1, 0, 0]), true).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode), (3, 10));
        // OPEN with an optional parameter that is not a capability.
        let e = decode(&frame(OPEN, &[4, 0, 1, 0, 9, 1, 2, 3, 4, 3, 1, 1, 0]), true).unwrap_err();
        assert_eq!((e.notification.code, e.notification.subcode), (2, 4));
    }

    #[test]
    fn communities_parse_and_print() {
        let c: Community = "65010:100".parse().unwrap();
        assert_eq!(c.0, (65010 << 16) | 100);
        assert_eq!(c.to_string(), "65010:100");
        for bad in ["65010", "65536:1", "a:b", "1:2:3"] {
            assert!(bad.parse::<Community>().unwrap_err().contains("ASN:VALUE"), "{bad}");
        }
    }

    /// Arbitrary values for the round trips.
    mod strategy {
        use super::*;

        pub(super) fn prefix() -> impl Strategy<Value = Ipv4Net> {
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc())
        }

        pub(super) fn prefix6() -> impl Strategy<Value = Ipv6Net> {
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
        }

        pub(super) fn next_hop6() -> impl Strategy<Value = NextHop6> {
            (any::<u128>(), prop::option::of(any::<u64>())).prop_map(|(global, ll)| NextHop6 {
                global: Ipv6Addr::from(global),
                link_local: ll.map(|l| Ipv6Addr::from((0xfe80u128 << 112) | u128::from(l))),
            })
        }

        pub(super) fn capability() -> impl Strategy<Value = Capability> {
            prop_oneof![
                (any::<u16>(), any::<u8>()).prop_map(|(afi, safi)| Capability::Multiprotocol { afi, safi }),
                (any::<u8>(), prop::collection::vec(any::<u8>(), 0..16))
                    .prop_filter("codes with a meaning of their own", |(code, _)| {
                        *code != CAP_MULTIPROTOCOL && *code != CAP_FOUR_OCTET_AS
                    })
                    .prop_map(|(code, value)| Capability::Other { code, value }),
            ]
        }

        /// An OPEN as it decodes: its AS is the 4-octet capability's when there is one, else a
        /// 2-octet number.
        pub(super) fn open() -> impl Strategy<Value = Open> {
            (
                any::<u8>(),
                any::<u32>(),
                any::<bool>(),
                any::<u16>(),
                any::<u32>(),
                prop::collection::vec(capability(), 0..8),
            )
                .prop_map(|(version, asn, four_octet, hold_time, id, mut capabilities)| {
                    let asn = if four_octet { asn } else { asn & 0xffff };
                    if four_octet {
                        capabilities.push(Capability::FourOctetAs(asn));
                    }
                    Open { version, asn, hold_time, router_id: Ipv4Addr::from(id), capabilities }
                })
        }

        /// Attributes as they decode (ORIGIN always present) and fit one UPDATE with room for
        /// prefixes; AS numbers fit the session's width.
        pub(super) fn attributes(four_octet: bool) -> impl Strategy<Value = Attributes> {
            let asn = if four_octet { any::<u32>().boxed() } else { any::<u16>().prop_map(u32::from).boxed() };
            (
                any::<u8>(),
                prop::collection::vec(asn, 0..300),
                prop::option::of(any::<u32>()),
                prop::option::of(any::<u32>()),
                prop::option::of(any::<u32>()),
                prop::collection::vec(any::<u32>().prop_map(Community), 0..80),
            )
                .prop_map(|(origin, as_path, next_hop, med, local_pref, communities)| Attributes {
                    origin: Some(origin),
                    as_path,
                    next_hop: next_hop.map(Ipv4Addr::from),
                    med,
                    local_pref,
                    communities,
                })
        }
    }

    fn updates(messages: &[Vec<u8>], four_octet: bool) -> Vec<Update> {
        messages
            .iter()
            .map(|m| {
                assert!(m.len() <= MAX_LEN, "{} bytes", m.len());
                assert_eq!(frame_len(m).unwrap(), Some(m.len()));
                match decode(m, four_octet).unwrap() {
                    Message::Update(u) => u,
                    other => panic!("not an UPDATE: {other:?}"),
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn open_round_trips(open in strategy::open()) {
            let bytes = open.encode();
            prop_assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
            prop_assert_eq!(decode(&bytes, true).unwrap(), Message::Open(open));
        }

        #[test]
        fn announcements_round_trip_across_as_many_updates_as_needed(
            (four_octet, attributes) in any::<bool>().prop_flat_map(|f| (Just(f), strategy::attributes(f))),
            prefixes in prop::collection::vec(strategy::prefix(), 1..1500),
        ) {
            let decoded = updates(&Update::announce(&prefixes, &attributes, four_octet), four_octet);
            for u in &decoded {
                prop_assert_eq!(&u.attributes, &attributes);
                prop_assert!(u.withdrawn.is_empty() && !u.nlri.is_empty());
            }
            let nlri: Vec<Ipv4Net> = decoded.into_iter().flat_map(|u| u.nlri).collect();
            prop_assert_eq!(nlri, prefixes);
        }

        #[test]
        fn ipv6_announcements_round_trip_across_as_many_updates_as_needed(
            (four_octet, attributes) in any::<bool>().prop_flat_map(|f| (Just(f), strategy::attributes(f))),
            next_hop in strategy::next_hop6(),
            prefixes in prop::collection::vec(strategy::prefix6(), 1..800),
        ) {
            let decoded = updates(&Update::announce6(&prefixes, &attributes, next_hop, four_octet), four_octet);
            let mut nlri = Vec::new();
            for u in decoded {
                // Everything but the IPv4 NEXT_HOP, which an IPv6 announcement leaves out.
                prop_assert_eq!(&u.attributes, &Attributes { next_hop: None, ..attributes.clone() });
                prop_assert!(u.withdrawn.is_empty() && u.nlri.is_empty() && u.unreach6.is_empty());
                let reach = u.reach6.expect("MP_REACH_NLRI in every UPDATE");
                prop_assert_eq!(reach.next_hop, next_hop);
                prop_assert!(!reach.nlri.is_empty());
                nlri.extend(reach.nlri);
            }
            prop_assert_eq!(nlri, prefixes);
        }

        #[test]
        fn ipv6_withdrawals_round_trip(prefixes in prop::collection::vec(strategy::prefix6(), 1..800)) {
            let decoded = updates(&Update::withdraw6(&prefixes), true);
            prop_assert!(decoded.iter().all(|u| u.reach6.is_none() && u.withdrawn.is_empty() && !u.unreach6.is_empty()));
            let withdrawn: Vec<Ipv6Net> = decoded.into_iter().flat_map(|u| u.unreach6).collect();
            prop_assert_eq!(withdrawn, prefixes);
        }

        #[test]
        fn withdrawals_round_trip(prefixes in prop::collection::vec(strategy::prefix(), 1..1500)) {
            let decoded = updates(&Update::withdraw(&prefixes), true);
            prop_assert!(decoded.iter().all(|u| u.nlri.is_empty() && u.attributes == Attributes::default()));
            let withdrawn: Vec<Ipv4Net> = decoded.into_iter().flat_map(|u| u.withdrawn).collect();
            prop_assert_eq!(withdrawn, prefixes);
        }

        #[test]
        fn notifications_round_trip(
            code in any::<u8>(),
            subcode in any::<u8>(),
            data in prop::collection::vec(any::<u8>(), 0..(MAX_LEN - HEADER_LEN - 2)),
        ) {
            let n = Notification { code, subcode, data };
            prop_assert_eq!(decode(&n.encode(), false).unwrap(), Message::Notification(n));
        }

        /// Arbitrary bytes behind a valid header: a message or the NOTIFICATION to answer, never
        /// a panic.
        #[test]
        fn any_body_decodes_or_names_its_notification(
            kind in 0u8..8,
            body in prop::collection::vec(any::<u8>(), 0..512),
            four_octet in any::<bool>(),
        ) {
            if let Err(e) = decode(&frame(kind, &body), four_octet) {
                prop_assert!((1..=6).contains(&e.notification.code), "{e:?}");
            }
        }
    }
}

//! The controller's key layout in the store. Everything lives under one configurable prefix:
//!
//! | key                          | value            | notes                                  |
//! |------------------------------|------------------|----------------------------------------|
//! | `{p}/b/4/<8 hex>`            | `BindingRecord`  | one per bound VM IP (IPv6: `/b/6/<32 hex>`) |
//! | `{p}/v/4/<8 hex>`            | `VmRecord`       | declared VMs                           |
//! | `{p}/f/<fe_id>`              | `FeRecord`       | registered FEs                         |
//! | `{p}/s/<fe_id>`              | `SessionRecord`  | FE liveness, attached to the FE's lease |
//! | `{p}/e/housekeeper`          | replica id       | housekeeping election, leased          |
//! | `{p}/r/<replica_id>`         | `ReplicaRecord`  | live replicas, leased; also the cache's load fence |
//! | `{p}/m/fence/<replica_id>`   | revision text    | backfill fence (`cache::backfill`), ignored by caches |
//! | `{p}/m/tombstone-horizon`    | `HorizonRecord`  | highest removal revision of collected tombstones (`registry::rules`) |
//!
//! IPs are hex-encoded so that byte order equals numeric order (listing pages come out in IP
//! order) and keys stay short (etcd stores every key once per revision).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a key under the prefix denotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// A binding, by VM IP.
    Binding(IpAddr),
    /// A declared VM, by IP.
    Vm(IpAddr),
    /// A registered FE, by id.
    Fe(String),
    /// An FE's liveness session, by FE id.
    Session(String),
    /// The housekeeping election key.
    Election,
    /// A live controller replica, by id.
    Replica(String),
    /// The tombstone horizon.
    TombstoneHorizon,
}

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `/victor`; no trailing slash).
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.trim_end_matches('/').to_owned() }
    }

    /// Everything VICTOR stores (what each replica's cache watches).
    pub fn root(&self) -> Vec<u8> {
        format!("{}/", self.prefix).into_bytes()
    }

    /// The binding key of `ip`.
    pub fn binding(&self, ip: IpAddr) -> Vec<u8> {
        self.ip_key('b', ip)
    }

    /// Prefix of all bindings.
    pub fn bindings(&self) -> Vec<u8> {
        format!("{}/b/", self.prefix).into_bytes()
    }

    /// The declaration key of `ip`.
    pub fn vm(&self, ip: IpAddr) -> Vec<u8> {
        self.ip_key('v', ip)
    }

    /// Prefix of all declared VMs.
    pub fn vms(&self) -> Vec<u8> {
        format!("{}/v/", self.prefix).into_bytes()
    }

    /// The registration key of an FE.
    pub fn fe(&self, fe_id: &str) -> Vec<u8> {
        format!("{}/f/{fe_id}", self.prefix).into_bytes()
    }

    /// The session key of an FE.
    pub fn session(&self, fe_id: &str) -> Vec<u8> {
        format!("{}/s/{fe_id}", self.prefix).into_bytes()
    }

    /// The housekeeping election key.
    pub fn election(&self) -> Vec<u8> {
        format!("{}/e/housekeeper", self.prefix).into_bytes()
    }

    /// The presence key of a replica.
    pub fn replica(&self, replica_id: &str) -> Vec<u8> {
        format!("{}/r/{replica_id}", self.prefix).into_bytes()
    }

    /// A replica's backfill fence key (not one of the kinds a cache tracks).
    pub fn fence(&self, replica_id: &str) -> Vec<u8> {
        format!("{}/m/fence/{replica_id}", self.prefix).into_bytes()
    }

    /// The tombstone horizon key.
    pub fn tombstone_horizon(&self) -> Vec<u8> {
        format!("{}/m/tombstone-horizon", self.prefix).into_bytes()
    }

    /// Classifies a key read from the store; `None` for keys we do not own.
    pub fn parse(&self, key: &[u8]) -> Option<KeyKind> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let (kind, tail) = rest.split_once('/')?;
        match kind {
            "b" => parse_ip(tail).map(KeyKind::Binding),
            "v" => parse_ip(tail).map(KeyKind::Vm),
            "f" if !tail.is_empty() => Some(KeyKind::Fe(tail.to_owned())),
            "s" if !tail.is_empty() => Some(KeyKind::Session(tail.to_owned())),
            "e" if tail == "housekeeper" => Some(KeyKind::Election),
            "r" if !tail.is_empty() => Some(KeyKind::Replica(tail.to_owned())),
            "m" if tail == "tombstone-horizon" => Some(KeyKind::TombstoneHorizon),
            _ => None,
        }
    }

    fn ip_key(&self, kind: char, ip: IpAddr) -> Vec<u8> {
        let mut s = String::with_capacity(self.prefix.len() + 40);
        s.push_str(&self.prefix);
        s.push('/');
        s.push(kind);
        match ip {
            IpAddr::V4(v4) => {
                s.push_str("/4/");
                for b in v4.octets() {
                    let _ = write!(s, "{b:02x}");
                }
            }
            IpAddr::V6(v6) => {
                s.push_str("/6/");
                for b in v6.octets() {
                    let _ = write!(s, "{b:02x}");
                }
            }
        }
        s.into_bytes()
    }
}

fn parse_ip(tail: &str) -> Option<IpAddr> {
    let (family, hex) = tail.split_once('/')?;
    let bytes = decode_hex(hex)?;
    match (family, bytes.len()) {
        ("4", 4) => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        ("6", 16) => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
        _ => None,
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_stable() {
        let k = Keys::new("/victor");
        assert_eq!(k.binding("10.10.0.11".parse().unwrap()), b"/victor/b/4/0a0a000b".to_vec());
        assert_eq!(k.fe("fe1"), b"/victor/f/fe1".to_vec());
        assert_eq!(k.parse(b"/victor/s/fe2"), Some(KeyKind::Session("fe2".into())));
        assert_eq!(k.parse(b"/victor/e/housekeeper"), Some(KeyKind::Election));
        assert_eq!(k.parse(&k.tombstone_horizon()), Some(KeyKind::TombstoneHorizon));
        assert_eq!(k.parse(&k.fence("r1")), None, "fences are not the caches' business");
        assert_eq!(k.parse(b"/other/b/4/0a0a000b"), None);
        assert_eq!(k.parse(b"/victor/b/4/0A0A000B"), None);
        assert_eq!(k.parse(b"/victor/b/4/0a0a00"), None);
    }

    proptest! {
        #[test]
        fn binding_keys_roundtrip_and_sort_numerically(a in any::<u32>(), b in any::<u32>(), v6 in any::<u128>()) {
            let k = Keys::new("/p");
            let ia = IpAddr::V4(Ipv4Addr::from(a));
            let ib = IpAddr::V4(Ipv4Addr::from(b));
            prop_assert_eq!(k.parse(&k.binding(ia)), Some(KeyKind::Binding(ia)));
            prop_assert_eq!(k.binding(ia).cmp(&k.binding(ib)), a.cmp(&b));
            let i6 = IpAddr::V6(Ipv6Addr::from(v6));
            prop_assert_eq!(k.parse(&k.vm(i6)), Some(KeyKind::Vm(i6)));
        }
    }
}

//! Value types shared by the controller and the agents: MAC addresses and the byte/text
//! encodings of IP addresses used on the wire.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a wire value could not be turned into a typed value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    /// An IP address field did not hold 4 or 16 bytes.
    #[error("IP address must be 4 (IPv4) or 16 (IPv6) bytes, got {0}")]
    IpLength(usize),
    /// A MAC address field did not hold 6 bytes.
    #[error("MAC address must be 6 bytes, got {0}")]
    MacLength(usize),
    /// A MAC address text could not be parsed.
    #[error("invalid MAC address {0:?}: expected six hex octets like 02:00:0a:0a:00:0b")]
    MacText(String),
    /// An IP address text could not be parsed.
    #[error("invalid IP address {0:?}: expected e.g. 10.10.0.11")]
    IpText(String),
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero address (never a valid VM MAC).
    pub const ZERO: Mac = Mac([0; 6]);
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Reads a MAC from exactly six bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TypeError> {
        <[u8; 6]>::try_from(bytes).map(Mac).map_err(|_| TypeError::MacLength(bytes.len()))
    }

    /// The six bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Multicast (and broadcast) addresses have the group bit set; they never identify a VM.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for addresses a VM's NIC can have: not zero, not multicast/broadcast.
    pub fn is_unicast(&self) -> bool {
        *self != Mac::ZERO && !self.is_multicast()
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = TypeError;

    /// Accepts `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TypeError::MacText(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

/// Reads an IP address from its wire form (4 or 16 bytes).
pub fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, TypeError> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("length checked")))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("length checked")))),
        n => Err(TypeError::IpLength(n)),
    }
}

/// The wire form of an IP address (4 or 16 bytes).
pub fn ip_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Parses an IP address given as text, with an error that says what was expected.
pub fn parse_ip(text: &str) -> Result<IpAddr, TypeError> {
    text.trim().parse().map_err(|_| TypeError::IpText(text.to_owned()))
}

/// What is wrong with `text` as a CIDR prefix (`10.10.1.0/24`, `2001:db8::/64`), said so that
/// the fix is obvious; `None` when it is one. Host bits are not a problem (`10.10.1.7/24`). The
/// text is never quoted back, so the caller decides how much of it to show.
pub fn prefix_problem(text: &str) -> Option<String> {
    let Some((addr, len)) = text.split_once('/') else {
        return Some(match text.parse::<IpAddr>() {
            Ok(ip) => format!(
                "has no prefix length: write {ip}/{} for this address alone, or a network like 10.10.1.0/24",
                if ip.is_ipv4() { 32 } else { 128 }
            ),
            Err(_) => "is not a CIDR prefix: write an address, '/' and a length, like 10.10.1.0/24".into(),
        });
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Some("is not a CIDR prefix: the part before '/' is not an IP address (write e.g. 10.10.1.0/24)".into());
    };
    let (family, max) = if ip.is_ipv4() { (4, 32) } else { (6, 128) };
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!(
            "has a prefix length that is not a number; write a number from 0 to {max} after the '/' (e.g. {ip}/24)"
        ));
    }
    match len.parse::<u32>() {
        Ok(n) if n <= max => None,
        Ok(n) => Some(format!("has prefix length {n}, longer than {max} (the most an IPv{family} prefix has)")),
        Err(_) => Some(format!("has a prefix length longer than {max} (the most an IPv{family} prefix has)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_problems_say_what_to_write() {
        for good in ["10.10.1.0/24", "10.10.1.7/24", "0.0.0.0/0", "10.10.0.11/32", "2001:db8::/64", "::/0"] {
            assert_eq!(prefix_problem(good), None, "{good}");
        }
        for (bad, says) in [
            ("10.10.230.0/33", "has prefix length 33, longer than 32 (the most an IPv4 prefix has)"),
            ("2001:db8::/129", "longer than 128 (the most an IPv6 prefix has)"),
            ("10.10.0.0/x", "not a number; write a number from 0 to 32 after the '/' (e.g. 10.10.0.0/24)"),
            ("10.10.0.0/", "not a number"),
            ("10.10.0.0/+24", "not a number"),
            ("10.10.0.0/99999999999", "longer than 32"),
            ("10.10.0.0", "has no prefix length: write 10.10.0.0/32 for this address alone"),
            ("10.10.0.300/24", "the part before '/' is not an IP address"),
            ("fe1", "is not a CIDR prefix: write an address, '/' and a length"),
        ] {
            let problem = prefix_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(problem.contains(says), "{bad}: {problem}");
        }
    }

    #[test]
    fn mac_text_forms() {
        let mac: Mac = "02:00:0A:0a:00:0b".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 10, 10, 0, 11]);
        assert_eq!(mac.to_string(), "02:00:0a:0a:00:0b");
        assert_eq!("02-00-0a-0a-00-0b".parse::<Mac>().unwrap(), mac);
        for bad in ["", "02:00:0a:0a:00", "02:00:0a:0a:00:0b:0c", "2:00:0a:0a:00:0b", "zz:00:0a:0a:00:0b"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn mac_classes() {
        assert!(!Mac::ZERO.is_unicast());
        assert!(!Mac::BROADCAST.is_unicast());
        assert!(!Mac([1, 0, 0x5e, 0, 0, 1]).is_unicast());
        assert!(Mac([2, 0, 0, 0, 0, 1]).is_unicast());
    }

    #[test]
    fn ip_bytes_reject_bad_lengths() {
        assert_eq!(ip_from_bytes(&[1, 2, 3]), Err(TypeError::IpLength(3)));
        assert_eq!(ip_from_bytes(&[10, 10, 0, 11]).unwrap().to_string(), "10.10.0.11");
    }

    proptest! {
        #[test]
        fn mac_roundtrip(bytes in any::<[u8; 6]>()) {
            let mac = Mac(bytes);
            prop_assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
            prop_assert_eq!(Mac::from_bytes(&mac.octets()).unwrap(), mac);
        }

        #[test]
        fn ip_roundtrip(v4 in any::<[u8; 4]>(), v6 in any::<[u8; 16]>()) {
            let a = IpAddr::from(v4);
            let b = IpAddr::from(v6);
            prop_assert_eq!(ip_from_bytes(&ip_to_bytes(a)).unwrap(), a);
            prop_assert_eq!(ip_from_bytes(&ip_to_bytes(b)).unwrap(), b);
        }
    }
}

//! Request validation shared by both services: addresses, prefixes, identifiers and sizes.
//! Every error says what was wrong and what is expected.

use std::net::IpAddr;

use ipnet::IpNet;
use victor_proto::Mac;
use victor_proto::types::prefix_problem;

use super::error::{ApiError, ApiResult};

/// Longest FE id / site name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest VM description.
pub const MAX_DESCRIPTION_LEN: usize = 256;
/// Most sites in a site policy.
pub const MAX_POLICY_SITES: usize = 64;
/// Largest page of a listing.
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// Page size when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// Characters of an offending value an error message quotes; the rest is elided, so a huge
/// field never turns into a huge status header.
pub const QUOTED_CHARS: usize = 40;

/// `value` quoted for an error message: at most [`QUOTED_CHARS`] characters, and when it is
/// longer, how long it was (`"aaaa…" (1048576 bytes)`).
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?} ({} bytes)", format!("{}…", &value[..cut]), value.len()),
    }
}

/// The controller's mobile prefixes.
#[derive(Debug, Clone)]
pub struct MobilePrefixes(Vec<IpNet>);

impl MobilePrefixes {
    /// Wraps the configured prefixes.
    pub fn new(prefixes: Vec<IpNet>) -> Self {
        MobilePrefixes(prefixes)
    }

    /// The prefixes.
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }

    /// The prefixes as text.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// Checks that `ip` can be a VM: inside a mobile prefix, and not its network or broadcast
    /// address.
    pub fn check_vm_ip(&self, ip: IpAddr) -> Result<(), String> {
        if is_host_in(ip, &self.0) {
            Ok(())
        } else {
            Err(format!("{ip} is outside the mobile prefixes {}", self.list()))
        }
    }

    /// Checks that `net` lies inside one mobile prefix.
    pub fn check_subnet(&self, net: &IpNet) -> Result<(), String> {
        if self.0.iter().any(|p| p.contains(net)) {
            Ok(())
        } else {
            Err(format!("prefix {net} is not inside the mobile prefixes {}", self.list()))
        }
    }

    fn list(&self) -> String {
        self.to_strings().join(", ")
    }
}

/// Whether `ip` is a usable host address inside one of `prefixes` (not the network or broadcast
/// address of an IPv4 prefix shorter than /31).
pub fn is_host_in(ip: IpAddr, prefixes: &[IpNet]) -> bool {
    let Some(net) = prefixes.iter().find(|p| p.contains(&ip)) else { return false };
    !matches!(net, IpNet::V4(v4) if v4.prefix_len() < 31 && (ip == IpAddr::V4(v4.network()) || ip == IpAddr::V4(v4.broadcast())))
}

/// Parses a VM IP given as text and checks it against the mobile prefixes.
pub fn vm_ip(text: &str, mobile: &MobilePrefixes) -> ApiResult<IpAddr> {
    let ip: IpAddr = text.trim().parse().map_err(|_| {
        ApiError::InvalidArgument(format!("vm_ip {} is not an IP address (expected e.g. 10.10.0.11)", quoted(text)))
    })?;
    mobile.check_vm_ip(ip).map_err(|m| {
        ApiError::InvalidArgument(format!(
            "vm_ip {m}; only addresses inside them can be bound (network and broadcast addresses excluded)"
        ))
    })?;
    Ok(ip)
}

/// Parses an FE's underlay (tunnel endpoint) address: a unicast address other FEs can reach,
/// outside the mobile prefixes (the FEs would route it as a VM).
pub fn underlay(text: &str, mobile: &MobilePrefixes) -> ApiResult<IpAddr> {
    let ip: IpAddr = text.trim().parse().map_err(|_| {
        ApiError::InvalidArgument(format!(
            "underlay_addr {} is not an IP address; give the address other FEs send IP-in-IP packets to",
            quoted(text)
        ))
    })?;
    let ip = ip.to_canonical();
    let problem = match ip {
        _ if ip.is_unspecified() => Some("is unspecified"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        _ if ip.is_multicast() => Some("is a multicast address"),
        _ if ip.is_loopback() => Some("is a loopback address, which other FEs cannot reach"),
        _ => None,
    };
    if let Some(problem) = problem {
        return Err(ApiError::InvalidArgument(format!(
            "underlay_addr {ip} {problem}; give this FE's unicast address on the underlay network (the one \
             other FEs send IP-in-IP packets to)"
        )));
    }
    if let Some(prefix) = mobile.as_slice().iter().find(|p| p.contains(&ip)) {
        return Err(ApiError::InvalidArgument(format!(
            "underlay_addr {ip} lies inside the mobile prefix {prefix}; tunnel endpoints must be outside the \
             mobile prefixes (use the FE's underlay address, not a VM-side one)"
        )));
    }
    Ok(ip)
}

/// Parses a VM MAC given as text.
pub fn vm_mac(text: &str) -> ApiResult<Mac> {
    let mac: Mac = text.parse().map_err(|_| {
        ApiError::InvalidArgument(format!(
            "mac {} is not a MAC address: expected six hex octets like 02:00:0a:0a:00:0b",
            quoted(text)
        ))
    })?;
    if !mac.is_unicast() {
        return Err(ApiError::InvalidArgument(format!(
            "mac {mac} is not a unicast address (zero, broadcast and multicast MACs cannot belong to a VM)"
        )));
    }
    Ok(mac)
}

/// Checks an FE id or site name: 1–63 bytes of letters, digits, `-`, `_`, `.`.
pub fn name(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is required")));
    }
    if value.len() > MAX_NAME_LEN
        || !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ApiError::InvalidArgument(format!(
            "{field} {} is invalid: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.'",
            quoted(value)
        )));
    }
    Ok(())
}

/// Parses an optional filter prefix (empty = no filter). Host bits are dropped (`10.10.1.7/24` is
/// 10.10.1.0/24), so any address inside the network names it; every other mistake is refused
/// with what to write instead.
pub fn filter_prefix(field: &str, text: &str) -> ApiResult<Option<IpNet>> {
    if text.is_empty() {
        return Ok(None);
    }
    let trimmed = text.trim();
    let problem = prefix_problem(trimmed);
    match (problem, trimmed.parse::<IpNet>()) {
        (None, Ok(net)) => Ok(Some(net.trunc())),
        (problem, _) => Err(ApiError::InvalidArgument(format!(
            "{field} {} {}",
            quoted(text),
            problem.unwrap_or_else(|| "is not a CIDR prefix like 10.10.1.0/24".into())
        ))),
    }
}

/// Validates a page size (0 = default).
pub fn page_size(requested: u32) -> ApiResult<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => {
            Err(ApiError::InvalidArgument(format!("page_size {n} is too large; at most {MAX_PAGE_SIZE}")))
        }
        n => Ok(n as usize),
    }
}

/// Parses a page token (the last IP of the previous page).
pub fn page_token(token: &str) -> ApiResult<Option<IpAddr>> {
    if token.is_empty() {
        return Ok(None);
    }
    token.parse().map(Some).map_err(|_| {
        ApiError::InvalidArgument(format!(
            "page_token {} is invalid; pass next_page_token from the previous response",
            quoted(token)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mobile() -> MobilePrefixes {
        MobilePrefixes::new(vec!["10.10.0.0/16".parse().unwrap()])
    }

    #[test]
    fn vm_ips_must_be_usable_hosts_in_the_mobile_prefixes() {
        assert!(vm_ip("10.10.0.11", &mobile()).is_ok());
        for (bad, hint) in
            [("10.11.0.1", "outside"), ("10.10.0.0", "outside"), ("10.10.255.255", "outside"), ("ten", "not an IP")]
        {
            let err = vm_ip(bad, &mobile()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.to_string().contains(hint), "{bad}: {err}");
        }
    }

    #[test]
    fn names_and_macs() {
        assert!(name("fe_id", "fe-1.site_a").is_ok());
        assert!(name("fe_id", "").unwrap_err().to_string().contains("required"));
        assert!(name("fe_id", "fe 1").is_err());
        assert!(name("fe_id", &"x".repeat(64)).is_err());
        assert!(vm_mac("02:00:00:00:00:01").is_ok());
        assert!(vm_mac("ff:ff:ff:ff:ff:ff").unwrap_err().to_string().contains("unicast"));
        assert!(vm_mac("02:00").unwrap_err().to_string().contains("six hex octets"));
        assert!(page_size(10_001).is_err());
        assert_eq!(page_size(0).unwrap(), 500);
        assert!(page_token("x").is_err());
    }

    #[test]
    fn filter_prefixes_say_what_to_fix() {
        assert_eq!(filter_prefix("prefix", "").unwrap(), None);
        assert_eq!(filter_prefix("prefix", "10.10.1.7/24").unwrap().unwrap().to_string(), "10.10.1.0/24");
        assert_eq!(filter_prefix("prefix", "2001:db8::1/64").unwrap().unwrap().to_string(), "2001:db8::/64");
        for (bad, hint) in [
            ("10.10.230.0/33", "prefix length 33, longer than 32 (the most an IPv4 prefix has)"),
            ("10.10.0.0/x", "not a number; write a number from 0 to 32"),
            ("10.10.0.0", "has no prefix length: write 10.10.0.0/32 for this address alone"),
            ("10.10.0.300/24", "the part before '/' is not an IP address"),
            ("fe1", "is not a CIDR prefix: write an address, '/' and a length"),
        ] {
            let err = filter_prefix("prefix", bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.to_string().starts_with(&format!("prefix {bad:?} ")), "{bad}: {err}");
            assert!(err.to_string().contains(hint), "{bad}: {err}");
        }
    }

    #[test]
    fn underlay_addresses_must_be_reachable_unicast_outside_the_mobile_prefixes() {
        assert_eq!(underlay("192.0.2.1", &mobile()).unwrap(), "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(underlay("2001:db8::1", &mobile()).unwrap(), "2001:db8::1".parse::<IpAddr>().unwrap());
        for (bad, hint) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.5", "multicast"),
            ("ff02::1", "multicast"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("10.10.3.4", "inside the mobile prefix 10.10.0.0/16"),
            ("fe1", "not an IP address"),
        ] {
            let err = underlay(bad, &mobile()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.to_string().contains(hint), "{bad}: {err}");
        }
    }

    #[test]
    fn long_values_are_quoted_short() {
        assert_eq!(quoted("fe1"), "\"fe1\"");
        let huge = "x".repeat(1 << 20);
        let q = quoted(&huge);
        assert!(q.len() < 80 && q.contains("(1048576 bytes)"), "{q}");
        let err = name("fe_id", &huge).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        let multibyte = "é".repeat(100);
        assert!(quoted(&multibyte).contains("(200 bytes)"));
    }
}

//! Request validation shared by both services: addresses, prefixes, identifiers and sizes.
//! Every error says what was wrong and what is expected.

use std::net::IpAddr;

use ipnet::IpNet;
use victor_proto::Mac;

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
        ApiError::InvalidArgument(format!("vm_ip {text:?} is not an IP address (expected e.g. 10.10.0.11)"))
    })?;
    mobile.check_vm_ip(ip).map_err(|m| {
        ApiError::InvalidArgument(format!(
            "vm_ip {m}; only addresses inside them can be bound (network and broadcast addresses excluded)"
        ))
    })?;
    Ok(ip)
}

/// Parses a VM MAC given as text.
pub fn vm_mac(text: &str) -> ApiResult<Mac> {
    let mac: Mac = text.parse().map_err(|e: victor_proto::TypeError| ApiError::InvalidArgument(format!("mac: {e}")))?;
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
            "{field} {value:?} is invalid: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
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
            "page_token {token:?} is invalid; pass next_page_token from the previous response"
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
}

//! The lab's address plan: the client network, the mobile prefix with the VMs' gateway, and the
//! FEs' underlay addresses. Plain constants, used by the topology, the agents' command lines and
//! the BGP upstream alike.

use std::net::Ipv4Addr;

/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The client's gateway on the client network: fe1's address, or the upstream router's.
pub const CLIENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The client network.
pub const CLIENT_NET: &str = "192.0.2.0/24";
/// The mobile prefix of the lab.
pub const MOBILE: &str = "10.10.0.0/16";
/// The VMs' default gateway (answered by whichever FE a VM sits behind).
pub const GATEWAY: &str = "10.10.0.1";
/// The shared virtual router MAC every FE uses on its VM ports (so a VM keeps its gateway's MAC).
pub const GATEWAY_MAC: &str = "02:00:5e:10:00:01";

/// Underlay address of FE `n`.
pub fn fe_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n as u8)
}

/// Underlay address of the hypervisor at FE `n` (`victor-lab migrate --vm qemu`: QEMU's
/// migration stream runs between these).
pub fn hypervisor_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 100 + n as u8)
}

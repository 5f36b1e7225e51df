//! How the moved VM announces itself in `victor-lab migrate` (`--announce`) and which address
//! families it has (`--family`):
//! * `garp` — the VM's gratuitous ARP, repeated until the binding moved (every 10 ms, then every
//!   100 ms), as a guest with virtio-net's guest-announce does; a dual-stack VM sends an
//!   unsolicited Neighbor Advertisement for its IPv6 address with each, as Linux does on the
//!   same notification (`NETDEV_NOTIFY_PEERS`);
//! * `rarp` — the frames and timing of unmodified QEMU's `announce-self` (`net/announce.c`): five
//!   RARP frames naming the VM's MAC and no IP, at 0, 50, 200, 450 and 800 ms, and nothing after;
//! * `na` — an unsolicited Neighbor Advertisement (override flag) for the VM's IPv6 address,
//!   repeated like the GARP (needs `--family ipv6|dual`).
//!
//! With `--family ipv6|dual` the agents also serve [`MOBILE6`] with the gateway [`GATEWAY6`]
//! (NDP learning, proxy NDP, 6in4 between FEs); the lab stops with a clear message when the VM's
//! IPv6 binding does not appear.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use victor_dataplane::packet::arp::MacAddr;
use victor_dataplane::packet::{ndp, rarp};

use super::probe::{garp_frame, rarp_announce_frame};
use super::topology::VmSpec;

/// The lab's IPv6 mobile prefix (beside [`super::addressing::MOBILE`]).
pub const MOBILE6: &str = "fd00:10::/64";
/// The VMs' IPv6 gateway (answered by every FE's agent: proxy NDP, beside [`super::addressing::GATEWAY`]).
pub const GATEWAY6: &str = "fd00:10::1";

/// How the moved VM announces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Announce {
    /// Gratuitous ARP for its IPv4 address, repeated until bound.
    Garp,
    /// QEMU's announce-self: five RARP frames (0, 50, 200, 450, 800 ms), MAC only.
    Rarp,
    /// Unsolicited Neighbor Advertisement for its IPv6 address, repeated until bound (needs
    /// `--family ipv6|dual` and the agent's IPv6 learning).
    Na,
}

/// The VM's address families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4 only.
    Ipv4,
    /// IPv6 only (the client pings its IPv6 address).
    Ipv6,
    /// Both; the client pings both addresses and losses are reported per family.
    Dual,
}

impl Family {
    /// Whether the VM has an IPv4 address the client pings.
    pub fn v4(self) -> bool {
        self != Family::Ipv6
    }

    /// Whether the VM has an IPv6 address the client pings.
    pub fn v6(self) -> bool {
        self != Family::Ipv4
    }

    /// The name users type.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
            Family::Dual => "dual",
        }
    }
}

impl Announce {
    /// The name users type.
    pub fn as_str(self) -> &'static str {
        match self {
            Announce::Garp => "garp",
            Announce::Rarp => "rarp",
            Announce::Na => "na",
        }
    }

    /// Refuses combinations that cannot work: an NA needs an IPv6 address, a GARP an IPv4 one.
    pub fn check(self, family: Family) -> Result<()> {
        match (self, family) {
            (Announce::Na, Family::Ipv4) => bail!("--announce na announces an IPv6 address: use --family ipv6 or dual"),
            (Announce::Garp, Family::Ipv6) => {
                bail!("--announce garp announces an IPv4 address: use --family ipv4 or dual, or --announce na|rarp")
            }
            _ => Ok(()),
        }
    }
}

/// The IPv6 address of a lab VM: the host number of its IPv4 address, written the same, in
/// [`MOBILE6`] (10.10.0.11 → fd00:10::11).
pub fn vm_ipv6(vm: &VmSpec) -> Ipv6Addr {
    let host = u16::from_str_radix(&vm.ip.octets()[3].to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, host)
}

/// The addresses of `vm` the client pings under `family`.
pub fn addresses(vm: &VmSpec, family: Family) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if family.v4() {
        out.push(IpAddr::V4(vm.ip));
    }
    if family.v6() {
        out.push(IpAddr::V6(vm_ipv6(vm)));
    }
    out
}

/// The frames of one announcement, in order, with the time to wait for the binding after each.
#[derive(Debug)]
pub struct Announcer {
    kind: Announce,
    frame: Vec<u8>,
    /// Sent right after each frame: a dual-stack guest's NA beside its GARP.
    companion: Option<Vec<u8>>,
    sent: u32,
}

impl Announcer {
    /// The announcement of `vm` by `kind` (one address family's frame).
    pub fn new(kind: Announce, vm: &VmSpec) -> Result<Announcer> {
        let frame = match kind {
            Announce::Garp => garp_frame(&vm.mac, vm.ip)?,
            Announce::Rarp => rarp_announce_frame(&vm.mac)?,
            Announce::Na => unsolicited_na(vm)?,
        };
        Ok(Announcer { kind, frame, companion: None, sent: 0 })
    }

    /// The announcement of a VM with `family`'s addresses: a dual-stack guest that announces
    /// itself (`garp`) also advertises its IPv6 address.
    pub fn for_family(kind: Announce, vm: &VmSpec, family: Family) -> Result<Announcer> {
        let mut announcer = Announcer::new(kind, vm)?;
        if kind == Announce::Garp && family == Family::Dual {
            announcer.companion = Some(unsolicited_na(vm)?);
        }
        Ok(announcer)
    }

    /// The frame to send right after each of [`Announcer::step`]'s.
    pub fn companion(&self) -> Option<&[u8]> {
        self.companion.as_deref()
    }

    /// The next frame to send now (None: this announcement sends nothing more, e.g. after QEMU's
    /// fifth round) and how long to wait for the binding before asking again.
    pub fn step(&mut self) -> (Option<&[u8]>, Duration) {
        let k = self.sent as usize;
        match self.kind {
            Announce::Rarp => {
                let offsets = rarp::QEMU_ANNOUNCE_OFFSETS_MS;
                if k >= offsets.len() {
                    return (None, Duration::from_millis(100));
                }
                self.sent += 1;
                let wait = offsets.get(k + 1).map_or(100, |next| next - offsets[k]);
                (Some(&self.frame), Duration::from_millis(wait))
            }
            // Every 10 ms at first, then every 100 ms (a loaded machine may take a while to open
            // the capture on the new port).
            Announce::Garp | Announce::Na => {
                self.sent += 1;
                (Some(&self.frame), Duration::from_millis(if k < 49 { 10 } else { 100 }))
            }
        }
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }
}

/// `vm`'s unsolicited Neighbor Advertisement (override) for its IPv6 address.
fn unsolicited_na(vm: &VmSpec) -> Result<Vec<u8>> {
    let mac: MacAddr = vm.mac.parse().map_err(|_| anyhow::anyhow!("bad MAC {}", vm.mac))?;
    Ok(ndp::build_frame(&ndp::unsolicited_advertisement(mac, vm_ipv6(vm), false, None)))
}

/// The message for a VM whose IPv6 binding never appeared.
pub fn no_ipv6_binding(ip: Ipv6Addr, fe: &str, waited: Duration) -> String {
    format!(
        "the VM's IPv6 address {ip} was not bound to {fe} within {waited:?}: the agent did not learn it from \
         the VM's Neighbor Advertisement (see its log; an agent built without IPv6 support cannot: use --family ipv4)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_follows_qemus_schedule_and_stops() {
        let vm = VmSpec::numbered(1);
        let mut a = Announcer::new(Announce::Rarp, &vm).unwrap();
        let mut waits = Vec::new();
        for _ in 0..5 {
            let (frame, wait) = a.step();
            assert_eq!(frame.map(<[u8]>::len), Some(60));
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, vec![50, 150, 250, 350, 100]);
        assert!(a.step().0.is_none(), "QEMU sends five frames, then nothing");
        assert_eq!(a.sent(), 5);
    }

    #[test]
    fn garp_and_na_repeat_and_families_are_checked() {
        let vm = VmSpec::numbered(1);
        let mut a = Announcer::new(Announce::Na, &vm).unwrap();
        let (frame, wait) = a.step();
        let na = ndp::parse_frame(frame.unwrap()).unwrap();
        assert_eq!(
            (na.kind(), na.target(), wait),
            (ndp::NdpKind::UnsolicitedAdvertisement, Some(vm_ipv6(&vm)), Duration::from_millis(10))
        );
        assert!(Announce::Na.check(Family::Ipv4).is_err());
        assert!(Announce::Garp.check(Family::Ipv6).is_err());
        assert!(Announce::Rarp.check(Family::Ipv6).is_ok() && Announce::Na.check(Family::Dual).is_ok());
        assert_eq!(addresses(&vm, Family::Dual), vec![IpAddr::from(vm.ip), "fd00:10::11".parse().unwrap()]);
    }

    #[test]
    fn a_dual_stack_guest_advertises_its_ipv6_address_with_each_garp() {
        let vm = VmSpec::numbered(1);
        let na = |a: &Announcer| ndp::parse_frame(a.companion().unwrap()).unwrap().target();
        assert_eq!(na(&Announcer::for_family(Announce::Garp, &vm, Family::Dual).unwrap()), Some(vm_ipv6(&vm)));
        assert!(Announcer::for_family(Announce::Garp, &vm, Family::Ipv4).unwrap().companion().is_none());
        assert!(Announcer::for_family(Announce::Rarp, &vm, Family::Dual).unwrap().companion().is_none());
    }
}

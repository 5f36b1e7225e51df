//! Whether this FE may attract traffic: it has a complete desired state and a controller stream
//! (or has been headless for less than `--headless-grace`), and its data-plane device — the TUN
//! device of the userspace forwarder, or the kernel's ipip device — exists, is up and is still the
//! one the agent created (the forwarder's device vanishes with the forwarder). [`judge`] is the
//! pure verdict; [`DeviceProbe`] reads the device from the kernel.

use std::fmt;

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::LinkFlags;

/// Why the FE must not attract traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No complete desired state from a controller yet.
    Starting,
    /// Headless for longer than the grace period.
    Headless,
    /// The data plane cannot forward.
    Dataplane,
    /// The agent is stopping.
    Shutdown,
}

impl Cause {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Starting => "starting",
            Cause::Headless => "headless",
            Cause::Dataplane => "dataplane",
            Cause::Shutdown => "shutdown",
        }
    }
}

/// Healthy, or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Announce.
    Healthy,
    /// Withdraw.
    Unhealthy {
        /// The cause.
        cause: Cause,
        /// For the log.
        detail: String,
    },
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Healthy => f.write_str("healthy"),
            Verdict::Unhealthy { detail, .. } => f.write_str(detail),
        }
    }
}

/// The data-plane device as the kernel shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// Present with this index, administratively up or not.
    Present {
        /// Interface index.
        ifindex: u32,
        /// IFF_UP.
        up: bool,
    },
    /// No such device.
    Missing,
    /// The kernel could not be asked.
    Unknown(String),
}

/// The verdict from the controller side (`synced`, and `readiness` = the `/readyz` check) and the
/// data-plane device `name`, which must be the device with index `expected` (the first index seen).
pub fn judge(synced: bool, readiness: Result<(), String>, name: &str, device: &Device, expected: u32) -> Verdict {
    let unhealthy = |cause, detail: String| Verdict::Unhealthy { cause, detail };
    if !synced {
        return unhealthy(Cause::Starting, "no complete desired state from a controller yet".into());
    }
    if let Err(why) = readiness {
        return unhealthy(Cause::Headless, why);
    }
    match device {
        Device::Present { ifindex, up: true } if *ifindex == expected => Verdict::Healthy,
        Device::Present { up: true, ifindex } => unhealthy(
            Cause::Dataplane,
            format!("data-plane device {name} was replaced (index {ifindex}, the agent's was {expected})"),
        ),
        Device::Present { up: false, .. } => unhealthy(Cause::Dataplane, format!("data-plane device {name} is down")),
        Device::Missing => unhealthy(Cause::Dataplane, format!("data-plane device {name} is gone")),
        // A netlink error says nothing about the device: the controller side decides, the next
        // probe looks again.
        Device::Unknown(_) => Verdict::Healthy,
    }
}

/// Reads one device by name through rtnetlink.
#[derive(Debug, Clone)]
pub struct DeviceProbe {
    handle: Handle,
    name: String,
}

impl DeviceProbe {
    /// A probe of device `name`.
    pub fn new(handle: Handle, name: String) -> DeviceProbe {
        DeviceProbe { handle, name }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device now.
    pub async fn probe(&self) -> Device {
        match self.handle.link().get().match_name(self.name.clone()).execute().try_next().await {
            Ok(Some(link)) => {
                Device::Present { ifindex: link.header.index, up: link.header.flags.contains(LinkFlags::Up) }
            }
            Ok(None) => Device::Missing,
            Err(rtnetlink::Error::NetlinkError(e)) if e.code.is_some_and(|c| -c.get() == libc::ENODEV) => {
                Device::Missing
            }
            Err(e) => Device::Unknown(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause(v: Verdict) -> Option<Cause> {
        match v {
            Verdict::Healthy => None,
            Verdict::Unhealthy { cause, .. } => Some(cause),
        }
    }

    #[test]
    fn verdicts() {
        let up = Device::Present { ifindex: 7, up: true };
        assert_eq!(judge(true, Ok(()), "vtun1", &up, 7), Verdict::Healthy);
        assert_eq!(cause(judge(false, Ok(()), "vtun1", &up, 7)), Some(Cause::Starting));
        assert_eq!(cause(judge(true, Err("headless for 6 s".into()), "vtun1", &up, 7)), Some(Cause::Headless));
        for (device, needle) in [
            (Device::Missing, "gone"),
            (Device::Present { ifindex: 7, up: false }, "down"),
            (Device::Present { ifindex: 9, up: true }, "replaced"),
        ] {
            let v = judge(true, Ok(()), "vtun1", &device, 7);
            assert!(v.to_string().contains(needle) && v.to_string().contains("vtun1"), "{v}");
            assert_eq!(cause(v), Some(Cause::Dataplane));
        }
        assert_eq!(judge(true, Ok(()), "vtun1", &Device::Unknown("EBUSY".into()), 7), Verdict::Healthy);
    }
}

//! The recorder of the userspace data plane: writes the remote VMs' restart records
//! ([`super::tun`], one route per remote VM in the inert [`RECORD_TABLE`]) off the forwarding
//! path, and owns the records' table, metrics and route messages.
//!
//! **Both families.** An IPv4 VM's record is `VM/32 via PEER dev TUN onlink`. An IPv6 VM's is
//! `VM/128 via ::ffff:PEER dev TUN onlink`: its next hop is the peer FE's IPv4 underlay address
//! (6in4), written as an IPv4-mapped IPv6 gateway. The natural form, an IPv4 gateway on an IPv6
//! route (`RTA_VIA`, `ip -6 route add … via inet PEER`), is refused by the kernel ("IPv6 does not
//! support RTA_VIA attribute", checked on Linux 6.18), while a mapped gateway with `onlink` is
//! stored as given; the route is inert either way, the gateway only carries the peer. The kernel
//! stores an IPv6 route's metric 0 as [`IPV6_DEFAULT_METRIC`]; `metric_read` reads it back as
//! the [`BINDING_METRIC`] it was written with.
//!
//! The forwarding table changes at once; the record follows, written by one task that keeps many
//! netlink requests in flight ([`IN_FLIGHT`]). Changes queued meanwhile are coalesced per VM (the
//! latest wins) and one VM's record is never written twice in one round, so its writes cannot
//! reorder. A failed write is retried after [`RETRY`] unless a newer change of that VM came in
//! (an IPv6 record the kernel refuses because IPv6 is off is not: a warning says so).
//! What this trades: a record may lag its forwarding entry by the time of one round (milliseconds;
//! a million records take seconds), so an agent killed in that window leaves its standby and its
//! next run a record that is one change behind until the controller's snapshot corrects it. What
//! it buys: a full sync of 1,000,000 remote bindings no longer waits for 1,000,000 netlink round
//! trips before the agent is ready.
//!
//! Registered FEs' records (a handful, IPv4 underlay addresses) are still written in line by
//! [`super::tun::TunPlane`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope};

use crate::netlink::{Kernel, NetlinkError};

/// The routing table of the records (no `ip rule` points at it: its routes route nothing). Shown
/// by `ip route show table 1986618228`.
pub const RECORD_TABLE: u32 = 0x7669_6374;

/// Metric of a remote VM's record (`VM/32 via PEER dev TUN onlink`; IPv6: `VM/128 via
/// ::ffff:PEER dev TUN onlink`, which the kernel shows with metric [`IPV6_DEFAULT_METRIC`]).
pub const BINDING_METRIC: u32 = 0;

/// Metric of a registered FE's record (`FE/32 dev TUN`).
pub const PEER_METRIC: u32 = 1;

/// The metric the kernel gives an IPv6 route written with metric 0 (`IP6_RT_PRIO_USER`).
pub const IPV6_DEFAULT_METRIC: u32 = 1024;

/// Netlink requests the recorder keeps in flight.
pub const IN_FLIGHT: usize = 256;

/// How long a failed write waits before it is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// What a remote VM's record must become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `VM/32 via FE` (IPv6: `VM/128 via ::ffff:FE`): the VM is behind that FE.
    Via(Ipv4Addr),
    /// No record (the one via that FE goes: the VM is local now, or unbound).
    Gone(Ipv4Addr),
}

/// The handle on the recorder task. Dropping it lets the task write what is queued, then stop.
#[derive(Debug)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<(IpAddr, Record)>,
}

impl Recorder {
    /// Starts the recorder of the TUN device with index `tun`.
    pub fn start(kernel: Kernel, tun: u32) -> Recorder {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(kernel, tun, rx));
        Recorder { tx }
    }

    /// Queues the record of `ip`.
    pub fn record(&self, ip: IpAddr, record: Record) {
        // The task only stops once every sender is gone, so this cannot fail while `self` lives.
        let _ = self.tx.send((ip, record));
    }
}

/// The task: rounds of coalesced writes until the handle is dropped and the queue is empty.
async fn run(kernel: Kernel, tun: u32, mut rx: mpsc::UnboundedReceiver<(IpAddr, Record)>) {
    let mut pending: HashMap<IpAddr, Record> = HashMap::new();
    // Records written since the heap was last given back.
    let mut since_release = 0usize;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some((ip, record)) => {
                    pending.insert(ip, record);
                }
                None => return,
            }
        }
        while let Ok((ip, record)) = rx.try_recv() {
            pending.insert(ip, record);
        }
        // The round consumes the map (no copy of it, and its capacity goes with it).
        let round = std::mem::take(&mut pending);
        since_release += round.len();
        let failed: Vec<(IpAddr, Record, NetlinkError)> = futures::stream::iter(round)
            .map(|(ip, record)| {
                let kernel = &kernel;
                async move { write(kernel, tun, ip, record).await.err().map(|e| (ip, record, e)) }
            })
            .buffer_unordered(IN_FLIGHT)
            .filter_map(std::future::ready)
            .collect()
            .await;
        if since_release >= BIG_BACKLOG && pending.is_empty() && rx.is_empty() {
            // A full sync queued a record per remote VM at once: give what that took back to the
            // system once it is all written (1,000,000 bindings: ~80 MB the allocator kept).
            release_freed_memory();
            since_release = 0;
        }
        // IPv6 refused by the kernel here (no IPv6 on the host or on the device): retrying cannot
        // help; those VMs' entries return with the controller's snapshot after a restart.
        let (refused, failed): (Vec<_>, Vec<_>) =
            failed.into_iter().partition(|(ip, _, err)| ip.is_ipv6() && ipv6_refused(err));
        if let Some((ip, _, err)) = refused.first() {
            tracing::warn!(refused = refused.len(), first = %ip, error = %err, "IPv6 restart records cannot be written here; not retried");
        }
        if let Some((ip, _, err)) = failed.first() {
            tracing::warn!(failed = failed.len(), first = %ip, error = %err, "writing restart records failed; will retry");
            tokio::time::sleep(RETRY).await;
            // Changes queued meanwhile are newer than the failed writes: they win.
            while let Ok((ip, record)) = rx.try_recv() {
                pending.insert(ip, record);
            }
            for (ip, record, _) in failed {
                pending.entry(ip).or_insert(record);
            }
        }
    }
}

/// The kernel's answer when IPv6 is off: on the device (`disable_ipv6`: EACCES, "IPv6 is
/// disabled on nexthop device") or on the host (`ipv6.disable=1`: no IPv6 handler, EOPNOTSUPP;
/// EAFNOSUPPORT too, to be safe).
fn ipv6_refused(err: &NetlinkError) -> bool {
    matches!(err.errno(), Some(libc::EACCES | libc::EOPNOTSUPP | libc::EAFNOSUPPORT))
}

/// After this many records (a full sync's), the heap is given back once the queue is empty.
const BIG_BACKLOG: usize = 65_536;

/// Returns the heap's free memory to the system (glibc keeps it otherwise, and the agent's
/// resident memory would stay at its peak).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Writes one record.
async fn write(kernel: &Kernel, tun: u32, ip: IpAddr, record: Record) -> Result<(), NetlinkError> {
    match record {
        Record::Via(peer) => {
            let msg = record_route(kernel, ip, Some(peer), BINDING_METRIC, tun);
            kernel.handle().route().add(msg).replace().execute().await.map_err(|source| NetlinkError {
                what: format!("record {ip} via {peer} in table {RECORD_TABLE}"),
                source,
            })
        }
        Record::Gone(peer) => {
            let msg = record_route(kernel, ip, Some(peer), BINDING_METRIC, tun);
            delete(kernel, msg, format!("delete the record of {ip}")).await
        }
    }
}

/// `ip route … table RECORD_TABLE proto P metric M dev TUN` for `VM/32` (IPv6: `VM/128`) — with
/// `via PEER onlink` for a remote VM (IPv6: `via ::ffff:PEER onlink`, see the module doc), scope
/// link without.
pub(super) fn record_route(kernel: &Kernel, ip: IpAddr, via: Option<Ipv4Addr>, metric: u32, tun: u32) -> RouteMessage {
    match ip {
        IpAddr::V4(ip) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(ip, 32);
            let b = match via {
                Some(peer) => b.gateway(peer),
                None => b,
            };
            finish(kernel, b, via.is_some(), metric, tun)
        }
        IpAddr::V6(ip) => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(ip, 128);
            let b = match via {
                Some(peer) => b.gateway(peer.to_ipv6_mapped()),
                None => b,
            };
            finish(kernel, b, via.is_some(), metric, tun)
        }
    }
}

/// The part of a record's route message both families share.
fn finish<T>(kernel: &Kernel, b: RouteMessageBuilder<T>, onlink: bool, metric: u32, tun: u32) -> RouteMessage {
    let b = b
        .output_interface(tun)
        .table_id(RECORD_TABLE)
        .priority(metric)
        .protocol(RouteProtocol::from(kernel.protocol()));
    if onlink { b.onlink().scope(RouteScope::Universe).build() } else { b.scope(RouteScope::Link).build() }
}

/// The peer FE a record's gateway names: an IPv4 gateway, or an IPv4-mapped IPv6 one.
pub(super) fn peer_of(gateway: IpAddr) -> Option<Ipv4Addr> {
    match gateway {
        IpAddr::V4(peer) => Some(peer),
        IpAddr::V6(mapped) => mapped.to_ipv4_mapped(),
    }
}

/// A dumped route's metric as it was written: an IPv6 route's [`IPV6_DEFAULT_METRIC`] is the
/// kernel's name for metric 0.
pub(super) fn metric_read(dst: IpAddr, metric: u32) -> u32 {
    if dst.is_ipv6() && metric == IPV6_DEFAULT_METRIC { BINDING_METRIC } else { metric }
}

/// Deletes a route; one already gone is not an error.
pub(super) async fn delete(kernel: &Kernel, msg: RouteMessage, what: String) -> Result<(), NetlinkError> {
    match kernel.handle().route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(source) => {
            let err = NetlinkError { what, source };
            if err.is_not_found() { Ok(()) } else { Err(err) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::ErrorMessage;

    fn answered(errno: i32) -> NetlinkError {
        let mut msg = ErrorMessage::default();
        msg.code = std::num::NonZeroI32::new(-errno);
        NetlinkError { what: "record".into(), source: rtnetlink::Error::NetlinkError(msg) }
    }

    /// IPv6 off (on the device: "IPv6 is disabled on nexthop device", EACCES, as `ip -6 route
    /// add … dev TUN` answers with `disable_ipv6=1`; on the host) is not retried; a failure that
    /// may pass is.
    #[test]
    fn ipv6_off_is_told_from_a_failure_worth_retrying() {
        for errno in [libc::EACCES, libc::EOPNOTSUPP, libc::EAFNOSUPPORT] {
            assert!(ipv6_refused(&answered(errno)), "errno {errno}");
        }
        for errno in [libc::ENOBUFS, libc::ENODEV, libc::EBUSY] {
            assert!(!ipv6_refused(&answered(errno)), "errno {errno}");
        }
    }
}

//! The VM ports: which interfaces of the namespace are VM-facing (by the `--vm-port` names), with
//! their index and MAC. VM links come and go while the agent runs (a migrating VM's link is moved
//! into another FE's namespace), so the table is kept current from rtnetlink link notifications.
//! The watcher task owns the writes; the ARP path reads, and resolves an interface it has not
//! heard of yet itself (ioctl by index) so a frame on a link that arrived a moment ago is not lost.
//! With `--gateway-mac`, the watcher sets that MAC on every VM port it sees.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::sync::mpsc;

use crate::netlink::{Kernel, Link};

/// A VM port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Interface index.
    pub ifindex: u32,
    /// Name.
    pub name: String,
    /// MAC (the gateway MAC when one is configured).
    pub mac: [u8; 6],
}

/// A change of the VM port set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEvent {
    /// A VM port appeared (or changed).
    Up(Port),
    /// A VM port disappeared (kernel routes through it are gone with it).
    Gone(u32),
}

type Matcher = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The VM port table, shared by the watcher (writer) and the ARP path (reader).
pub struct PortTable {
    /// ifindex → Some(port) for VM ports, None for interfaces known not to be VM ports.
    known: RwLock<HashMap<u32, Option<Port>>>,
    matcher: Matcher,
    gateway_mac: Option<[u8; 6]>,
}

impl std::fmt::Debug for PortTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortTable").field("ports", &self.ports()).finish_non_exhaustive()
    }
}

impl PortTable {
    /// An empty table recognising VM ports by `matcher`.
    pub fn new(matcher: impl Fn(&str) -> bool + Send + Sync + 'static, gateway_mac: Option<[u8; 6]>) -> Self {
        PortTable { known: RwLock::new(HashMap::new()), matcher: Arc::new(matcher), gateway_mac }
    }

    /// The VM port with index `ifindex`; an index never seen is looked up in the kernel at once.
    pub fn get(&self, ifindex: u32) -> Option<Port> {
        if let Some(known) = self.known.read().expect("port lock").get(&ifindex) {
            return known.clone();
        }
        let port = lookup_by_index(ifindex).filter(|p| (self.matcher)(&p.name)).map(|mut p| {
            if let Some(mac) = self.gateway_mac {
                p.mac = mac;
            }
            p
        });
        self.known.write().expect("port lock").insert(ifindex, port.clone());
        port
    }

    /// Every VM port.
    pub fn ports(&self) -> Vec<Port> {
        let mut ports: Vec<Port> = self.known.read().expect("port lock").values().flatten().cloned().collect();
        ports.sort_by_key(|p| p.ifindex);
        ports
    }

    /// True if `name` is a VM port name.
    pub fn matches(&self, name: &str) -> bool {
        (self.matcher)(name)
    }

    /// Records `link`; returns the event to publish, if the VM port set changed.
    fn update(&self, link: &Link) -> Option<PortEvent> {
        let port = self.matches(&link.name).then(|| Port {
            ifindex: link.index,
            name: link.name.clone(),
            mac: self.gateway_mac.unwrap_or(link.mac),
        });
        let mut known = self.known.write().expect("port lock");
        let before = known.insert(link.index, port.clone());
        match (before.flatten(), port) {
            (old, Some(new)) if old.as_ref() != Some(&new) => Some(PortEvent::Up(new)),
            (Some(_), None) => Some(PortEvent::Gone(link.index)),
            _ => None,
        }
    }

    fn remove(&self, ifindex: u32) -> Option<PortEvent> {
        let before = self.known.write().expect("port lock").remove(&ifindex);
        before.flatten().map(|_| PortEvent::Gone(ifindex))
    }
}

/// Name and MAC of interface `ifindex` in the calling thread's namespace (ioctl; no netlink round
/// trip on the packet path).
fn lookup_by_index(ifindex: u32) -> Option<Port> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).ok()?;
    // SAFETY: all-zero is a valid ifreq; the name is copied in with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IF_NAMESIZE - 1)) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills `req.ifr_ifru.ifru_hwaddr` of the ifreq we own.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SIOCGIFHWADDR, &mut req) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded, so the union holds the hardware address.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hw.iter()) {
        *m = *b as u8;
    }
    Some(Port { ifindex, name, mac })
}

/// Keeps `table` current and publishes port changes to `events` until the channel closes.
/// Subscribes to link notifications before the initial dump so no change is missed in between.
pub async fn watch(table: Arc<PortTable>, kernel: Kernel, events: mpsc::Sender<PortEvent>) -> anyhow::Result<()> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    tokio::spawn(conn);
    for link in kernel.links().await? {
        handle_link(&table, &kernel, &events, &link).await;
    }
    while let Some((msg, _)) = messages.next().await {
        let event = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => match Link::from_message(&m) {
                Some(link) => {
                    handle_link(&table, &kernel, &events, &link).await;
                    continue;
                }
                None => None,
            },
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => table.remove(m.header.index),
            _ => None,
        };
        if let Some(event) = event
            && events.send(event).await.is_err()
        {
            break;
        }
    }
    Ok(())
}

async fn handle_link(table: &PortTable, kernel: &Kernel, events: &mpsc::Sender<PortEvent>, link: &Link) {
    if table.matches(&link.name)
        && let Some(mac) = table.gateway_mac
        && link.mac != mac
    {
        match kernel.set_mac(link.index, mac).await {
            Ok(()) => {
                tracing::info!(port = %link.name, mac = %victor_proto::Mac(mac), "set the gateway MAC on the VM port")
            }
            Err(err) => tracing::warn!(port = %link.name, %err, "could not set the gateway MAC on the VM port"),
        }
    }
    if let Some(event) = table.update(link) {
        match &event {
            PortEvent::Up(p) => tracing::info!(port = %p.name, ifindex = p.ifindex, "VM port up"),
            PortEvent::Gone(i) => tracing::info!(ifindex = i, "VM port gone"),
        }
        let _ = events.send(event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link { index, name: name.into(), mac: [2, 0, 0, 0, 0, index as u8], mtu: 1500, up: true }
    }

    #[test]
    fn table_tracks_vm_ports_only() {
        let t = PortTable::new(|n| n.starts_with("vm"), None);
        assert_eq!(t.update(&link(5, "eth0")), None);
        let Some(PortEvent::Up(p)) = t.update(&link(6, "vm0")) else { panic!("vm0 is a VM port") };
        assert_eq!((p.ifindex, p.mac), (6, [2, 0, 0, 0, 0, 6]));
        assert_eq!(t.update(&link(6, "vm0")), None, "no change, no event");
        assert_eq!(t.get(6).map(|p| p.name), Some("vm0".into()));
        assert_eq!(t.get(5), None);
        assert_eq!(t.update(&link(6, "x0")), Some(PortEvent::Gone(6)), "renamed away");
        assert_eq!(t.remove(6), None);
        t.update(&link(7, "vm1"));
        assert_eq!(t.remove(7), Some(PortEvent::Gone(7)));
        assert!(t.ports().is_empty());
    }

    #[test]
    fn gateway_mac_replaces_the_port_mac() {
        let gw = [2, 0, 0x5e, 0x10, 0, 1];
        let t = PortTable::new(|n| n == "vm0", Some(gw));
        let Some(PortEvent::Up(p)) = t.update(&link(6, "vm0")) else { panic!() };
        assert_eq!(p.mac, gw);
    }

    #[test]
    fn unknown_index_is_resolved_from_the_kernel() {
        // Loopback exists in every namespace and has index 1.
        let t = PortTable::new(|n| n == "lo", None);
        assert_eq!(t.get(1).map(|p| p.name), Some("lo".into()));
        assert_eq!(t.get(999_999), None);
    }
}

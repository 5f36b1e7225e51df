//! The VM ports: which interfaces of the namespace are VM-facing (by the `--vm-port` names), with
//! their index and MAC. VM links come and go while the agent runs (a migrating VM's link is moved
//! into another FE's namespace), so the table is kept current from rtnetlink link notifications.
//! The watcher task owns the writes (after a seed from the initial link dump); the engine reads.
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

    /// The VM port with index `ifindex`.
    pub fn get(&self, ifindex: u32) -> Option<Port> {
        self.known.read().expect("port lock").get(&ifindex).cloned().flatten()
    }

    /// Records the links of a dump (at start, before the watcher runs).
    pub fn seed(&self, links: &[Link]) {
        for link in links {
            self.update(link);
        }
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

/// Keeps `table` current and publishes port changes to `events` until the channel closes.
/// Subscribes to link notifications before the initial dump so no change is missed in between.
pub async fn watch(table: Arc<PortTable>, kernel: Kernel, events: mpsc::Sender<PortEvent>) -> anyhow::Result<()> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    tokio::spawn(conn);
    // The initial dump announces every VM port, also those the table was seeded with.
    for link in kernel.links().await? {
        handle_link(&table, &kernel, &events, &link, true).await;
    }
    while let Some((msg, _)) = messages.next().await {
        let event = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => match Link::from_message(&m) {
                Some(link) => {
                    handle_link(&table, &kernel, &events, &link, false).await;
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

async fn handle_link(
    table: &PortTable,
    kernel: &Kernel,
    events: &mpsc::Sender<PortEvent>,
    link: &Link,
    announce: bool,
) {
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
    let event = table.update(link).or_else(|| announce.then(|| table.get(link.index).map(PortEvent::Up)).flatten());
    if let Some(event) = event {
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
    fn seeded_from_a_dump() {
        let t = PortTable::new(|n| n.starts_with("vm"), None);
        t.seed(&[link(1, "lo"), link(4, "vm4")]);
        assert_eq!(t.get(4).map(|p| p.name), Some("vm4".into()));
        assert_eq!((t.get(1), t.get(999)), (None, None));
    }
}

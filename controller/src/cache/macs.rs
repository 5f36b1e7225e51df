//! The cache's index MAC → IPs: every VM IP whose live binding has a MAC, or that is declared with
//! it. A MAC claim (`OBSERVATION_KIND_MAC_LEARNED`, a RARP frame seen by an FE) is expanded
//! through it without scanning the bindings. Kept by [`super::CacheState::apply`] as bindings and
//! declarations change; pure data, no IO.

use std::collections::HashMap;
use std::net::IpAddr;

use victor_proto::Mac;

/// The IPs of one MAC: nearly always one (or an IPv4 and an IPv6 address), so a single address
/// is held inline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ips {
    One(IpAddr),
    Many(Vec<IpAddr>),
}

/// MAC → the IPs bound or declared with it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MacIndex {
    map: HashMap<Mac, Ips>,
}

impl MacIndex {
    /// Records that `ip` is bound or declared with `mac` (idempotent).
    pub fn insert(&mut self, mac: Mac, ip: IpAddr) {
        match self.map.get_mut(&mac) {
            None => {
                self.map.insert(mac, Ips::One(ip));
            }
            Some(Ips::One(one)) if *one == ip => {}
            Some(entry @ Ips::One(_)) => {
                let Ips::One(one) = *entry else { unreachable!() };
                *entry = Ips::Many(vec![one, ip]);
            }
            Some(Ips::Many(many)) => {
                if !many.contains(&ip) {
                    many.push(ip);
                }
            }
        }
    }

    /// Forgets that `ip` has `mac` (idempotent).
    pub fn remove(&mut self, mac: Mac, ip: IpAddr) {
        let empty = match self.map.get_mut(&mac) {
            None => return,
            Some(Ips::One(one)) => *one == ip,
            Some(Ips::Many(many)) => {
                many.retain(|x| *x != ip);
                if many.len() == 1 {
                    let last = many[0];
                    self.map.insert(mac, Ips::One(last));
                }
                false
            }
        };
        if empty {
            self.map.remove(&mac);
        }
    }

    /// The IPs with `mac`, IPv4 before IPv6, each family in address order.
    pub fn ips(&self, mac: Mac) -> Vec<IpAddr> {
        let mut ips = match self.map.get(&mac) {
            None => Vec::new(),
            Some(Ips::One(ip)) => vec![*ip],
            Some(Ips::Many(many)) => many.clone(),
        };
        ips.sort_unstable();
        ips
    }

    /// Number of MACs indexed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no MAC is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_each_ip_once_and_forgets_empty_macs() {
        let mut index = MacIndex::default();
        let m = Mac([2, 0, 0, 0, 0, 1]);
        let v4: IpAddr = "10.10.0.11".parse().unwrap();
        let v6: IpAddr = "fd00::11".parse().unwrap();
        let other: IpAddr = "10.10.0.2".parse().unwrap();
        index.insert(m, v6);
        index.insert(m, v4);
        index.insert(m, v4);
        index.insert(m, other);
        assert_eq!(index.ips(m), vec![other, v4, v6], "IPv4 first, in order, no duplicates");
        index.remove(m, other);
        index.remove(m, v6);
        assert_eq!(index.ips(m), vec![v4]);
        assert_eq!(index.map[&m], Ips::One(v4), "a single address goes back inline");
        index.remove(m, v4);
        index.remove(m, v4);
        assert!(index.is_empty() && index.ips(m).is_empty());
    }
}

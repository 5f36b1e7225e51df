//! The BGP session state machine of a route injector (RFC 4271 §8, the part an active speaker
//! that announces a few prefixes and accepts none needs): OpenSent → OpenConfirm → Established,
//! the checks of the peer's OPEN, hold-time and address-family negotiation (IPv4 and IPv6
//! unicast, RFC 4760: a family is announced only if both sides offered it), and the UPDATEs that
//! announce or withdraw our prefixes with the attributes the session calls for (eBGP: our AS in
//! the path; iBGP: empty path and LOCAL_PREF). Pure: bytes in, reactions out; the peer task owns
//! the socket and the timers.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::codec::bgp::{
    AFI_IPV4, AFI_IPV6, Attributes, Capability, Community, ErrorCode, Message, NextHop6, Notification, Open,
    SAFI_UNICAST, Update, decode,
};

/// What this side of the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Our AS.
    pub local_as: u32,
    /// The AS the peer must have.
    pub peer_as: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// Hold time we propose (s; 0 = none, else ≥ 3).
    pub hold_time: u16,
    /// The address families we offer (those we have prefixes of).
    pub families: Families,
}

/// A set of the unicast address families the advertiser speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    /// IPv4 unicast.
    pub ipv4: bool,
    /// IPv6 unicast.
    pub ipv6: bool,
}

impl Families {
    /// The families a peer's OPEN offers: its multiprotocol capabilities, or IPv4 unicast alone
    /// if it has none (RFC 4760 §8).
    pub fn offered(open: &Open) -> Families {
        let all: Vec<(u16, u8)> = open
            .capabilities
            .iter()
            .filter_map(|c| if let Capability::Multiprotocol { afi, safi } = c { Some((*afi, *safi)) } else { None })
            .collect();
        if all.is_empty() {
            return Families { ipv4: true, ipv6: false };
        }
        Families { ipv4: all.contains(&(AFI_IPV4, SAFI_UNICAST)), ipv6: all.contains(&(AFI_IPV6, SAFI_UNICAST)) }
    }

    /// The families in both.
    pub fn and(self, other: Families) -> Families {
        Families { ipv4: self.ipv4 && other.ipv4, ipv6: self.ipv6 && other.ipv6 }
    }

    /// No family.
    pub fn is_empty(self) -> bool {
        !self.ipv4 && !self.ipv6
    }

    fn capabilities(self) -> impl Iterator<Item = Capability> {
        [(self.ipv4, AFI_IPV4), (self.ipv6, AFI_IPV6)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, afi)| Capability::Multiprotocol { afi, safi: SAFI_UNICAST })
    }
}

impl fmt::Display for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.ipv4, self.ipv6) {
            (true, true) => "IPv4 and IPv6 unicast",
            (true, false) => "IPv4 unicast",
            (false, true) => "IPv6 unicast",
            (false, false) => "no unicast family",
        })
    }
}

/// What one session announces: the prefixes of each family and their next hop. A family without
/// a next hop (no address of that family towards the peer) is not announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// IPv4 prefixes.
    pub v4: Vec<Ipv4Net>,
    /// Their NEXT_HOP.
    pub next_hop4: Option<Ipv4Addr>,
    /// IPv6 prefixes.
    pub v6: Vec<Ipv6Net>,
    /// Their next hop (in MP_REACH_NLRI).
    pub next_hop6: Option<NextHop6>,
}

impl Params {
    /// Internal BGP (same AS on both sides).
    pub fn is_ibgp(&self) -> bool {
        self.local_as == self.peer_as
    }
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Our OPEN is sent; waiting for the peer's.
    OpenSent,
    /// OPENs exchanged; waiting for the peer's KEEPALIVE.
    OpenConfirm,
    /// Routes may be exchanged.
    Established,
}

/// What both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Hold time (s; 0 = no hold timer and no keepalives).
    pub hold_time: u16,
    /// 4-octet AS numbers in AS_PATH.
    pub four_octet: bool,
    /// The peer's BGP identifier.
    pub peer_id: Ipv4Addr,
    /// The families both sides offered.
    pub families: Families,
}

impl Negotiated {
    /// How long the peer may stay silent.
    pub fn hold(&self) -> Option<Duration> {
        (self.hold_time > 0).then(|| Duration::from_secs(u64::from(self.hold_time)))
    }

    /// How often we send a KEEPALIVE (a third of the hold time).
    pub fn keepalive(&self) -> Option<Duration> {
        self.hold().map(|h| h / 3)
    }
}

/// What the connection must do after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Nothing.
    None,
    /// The peer's OPEN is accepted: send a KEEPALIVE (and start the timers).
    Keepalive,
    /// The session is established: send our routes.
    Established,
    /// The peer asked for our routes again.
    Refresh,
}

/// Why a session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent a NOTIFICATION.
    #[error("the peer closed the session: {0}")]
    Notified(Notification),
    /// The peer broke the protocol or its OPEN is unacceptable; send `notification`.
    #[error("{reason}")]
    Protocol {
        /// What is wrong.
        reason: String,
        /// What to tell the peer.
        notification: Notification,
    },
}

impl SessionError {
    fn protocol(code: ErrorCode, subcode: u8, data: Vec<u8>, reason: String) -> SessionError {
        SessionError::Protocol { reason, notification: Notification { code: code as u8, subcode, data } }
    }
}

/// One BGP session, from our OPEN on.
#[derive(Debug, Clone)]
pub struct Session {
    params: Params,
    state: State,
    negotiated: Option<Negotiated>,
}

impl Session {
    /// A session whose OPEN ([`Session::open`]) is about to be sent.
    pub fn new(params: Params) -> Session {
        Session { params, state: State::OpenSent, negotiated: None }
    }

    /// Our OPEN: a multiprotocol capability per family we offer, and 4-octet AS numbers.
    pub fn open(&self) -> Vec<u8> {
        let mut capabilities: Vec<Capability> = self.params.families.capabilities().collect();
        capabilities.push(Capability::FourOctetAs(self.params.local_as));
        Open {
            version: 4,
            asn: self.params.local_as,
            hold_time: self.params.hold_time,
            router_id: self.params.router_id,
            capabilities,
        }
        .encode()
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// What was negotiated (after the peer's OPEN).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Handles one complete message from the peer.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Reaction, SessionError> {
        let four_octet = self.negotiated.is_some_and(|n| n.four_octet);
        let msg = decode(bytes, four_octet)
            .map_err(|e| SessionError::Protocol { reason: e.what, notification: e.notification })?;
        let fsm = |subcode: u8, what: &str| {
            SessionError::protocol(
                ErrorCode::Fsm,
                subcode,
                Vec::new(),
                format!("unexpected {what} in {:?}", self.state),
            )
        };
        match (self.state, msg) {
            (_, Message::Notification(n)) => Err(SessionError::Notified(n)),
            (State::OpenSent, Message::Open(open)) => {
                self.negotiated = Some(self.check_open(&open)?);
                self.state = State::OpenConfirm;
                Ok(Reaction::Keepalive)
            }
            (State::OpenSent, _) => Err(fsm(1, "message")),
            (State::OpenConfirm, Message::Keepalive) => {
                self.state = State::Established;
                Ok(Reaction::Established)
            }
            (State::OpenConfirm, _) => Err(fsm(2, "message")),
            (State::Established, Message::Keepalive | Message::Update(_)) => Ok(Reaction::None),
            (State::Established, Message::RouteRefresh { afi: AFI_IPV4 | AFI_IPV6, safi: SAFI_UNICAST }) => {
                Ok(Reaction::Refresh)
            }
            (State::Established, Message::RouteRefresh { .. }) => Ok(Reaction::None),
            (State::Established, Message::Open(_)) => Err(fsm(3, "OPEN")),
        }
    }

    fn check_open(&self, open: &Open) -> Result<Negotiated, SessionError> {
        let p = &self.params;
        if open.version != 4 {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                1,
                vec![0, 4],
                format!("the peer speaks BGP version {}, not 4", open.version),
            ));
        }
        if open.asn != p.peer_as {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                2,
                Vec::new(),
                format!("the peer is in AS {}, not {} as configured (--bgp-peer-as)", open.asn, p.peer_as),
            ));
        }
        if open.router_id.is_unspecified() || (p.is_ibgp() && open.router_id == p.router_id) {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                3,
                Vec::new(),
                format!("the peer's BGP identifier {} is invalid or equal to ours", open.router_id),
            ));
        }
        if matches!(open.hold_time, 1 | 2) {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                6,
                Vec::new(),
                format!("the peer proposes a hold time of {} s (must be 0 or at least 3)", open.hold_time),
            ));
        }
        let four_octet = open.four_octet_as();
        if p.local_as > 65535 && !four_octet {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                7,
                Vec::new(),
                format!("the peer does not support 4-octet AS numbers, which our AS {} needs", p.local_as),
            ));
        }
        let offered = Families::offered(open);
        let families = p.families.and(offered);
        if families.is_empty() {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                7,
                Vec::new(),
                format!("the peer accepts none of our address families: we offer {}, it offers {offered}", p.families),
            ));
        }
        let hold_time = if open.hold_time == 0 || p.hold_time == 0 { 0 } else { open.hold_time.min(p.hold_time) };
        Ok(Negotiated { hold_time, four_octet, peer_id: open.router_id, families })
    }

    /// The families of `routes` this session carries: negotiated, with prefixes and a next hop.
    pub fn sendable(&self, routes: &Routes) -> Families {
        let negotiated = self.negotiated.map(|n| n.families).unwrap_or_default();
        negotiated.and(Families {
            ipv4: !routes.v4.is_empty() && routes.next_hop4.is_some(),
            ipv6: !routes.v6.is_empty() && routes.next_hop6.is_some(),
        })
    }

    /// The UPDATEs announcing the [sendable](Session::sendable) part of `routes`.
    pub fn announce(&self, routes: &Routes, communities: &[Community]) -> Vec<Vec<u8>> {
        let ibgp = self.params.is_ibgp();
        let attributes = Attributes {
            origin: Some(0),
            as_path: if ibgp { Vec::new() } else { vec![self.params.local_as] },
            next_hop: routes.next_hop4,
            med: None,
            local_pref: ibgp.then_some(100),
            communities: communities.to_vec(),
        };
        let four_octet = self.negotiated.is_some_and(|n| n.four_octet);
        let send = self.sendable(routes);
        let mut out = Vec::new();
        if send.ipv4 {
            out.extend(Update::announce(&routes.v4, &attributes, four_octet));
        }
        if let (true, Some(next_hop)) = (send.ipv6, routes.next_hop6) {
            out.extend(Update::announce6(&routes.v6, &attributes, next_hop, four_octet));
        }
        out
    }

    /// The UPDATEs withdrawing what [`Session::announce`] announces of `routes`.
    pub fn withdraw(&self, routes: &Routes) -> Vec<Vec<u8>> {
        let send = self.sendable(routes);
        let mut out = Vec::new();
        if send.ipv4 {
            out.extend(Update::withdraw(&routes.v4));
        }
        if send.ipv6 {
            out.extend(Update::withdraw6(&routes.v6));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bgp::keepalive;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    const V4: Families = Families { ipv4: true, ipv6: false };
    const V6: Families = Families { ipv4: false, ipv6: true };
    const DUAL: Families = Families { ipv4: true, ipv6: true };

    fn params(local_as: u32, peer_as: u32) -> Params {
        Params { local_as, peer_as, router_id: ME, hold_time: 9, families: V4 }
    }

    fn peer_open_offering(asn: u32, hold_time: u16, four_octet: bool, families: Families) -> Vec<u8> {
        let mut capabilities: Vec<Capability> = families.capabilities().collect();
        if four_octet {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        Open { version: 4, asn, hold_time, router_id: PEER, capabilities }.encode()
    }

    fn peer_open(asn: u32, hold_time: u16, four_octet: bool) -> Vec<u8> {
        peer_open_offering(asn, hold_time, four_octet, V4)
    }

    fn established_offering(p: Params, peer: Families) -> Session {
        let mut s = Session::new(p);
        assert_eq!(s.receive(&peer_open_offering(p.peer_as, 240, true, peer)).unwrap(), Reaction::Keepalive);
        assert_eq!(s.receive(&keepalive()).unwrap(), Reaction::Established);
        s
    }

    fn established(p: Params) -> Session {
        established_offering(p, V4)
    }

    fn dual_routes() -> Routes {
        Routes {
            v4: vec!["10.10.0.0/16".parse().unwrap()],
            next_hop4: Some(Ipv4Addr::new(203, 0, 113, 2)),
            v6: vec!["2001:db8:a::/48".parse().unwrap()],
            next_hop6: Some(NextHop6 {
                global: "2001:db8:ff:1::2".parse().unwrap(),
                link_local: Some("fe80::2".parse().unwrap()),
            }),
        }
    }

    /// The IPv4 and IPv6 routes that `messages` announce (or withdraw).
    fn routes_in(messages: &[Vec<u8>]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for m in messages {
            let Message::Update(u) = decode(m, true).unwrap() else { panic!("not an UPDATE") };
            v4.extend(u.nlri.into_iter().chain(u.withdrawn));
            v6.extend(u.reach6.map(|r| r.nlri).unwrap_or_default().into_iter().chain(u.unreach6));
        }
        (v4, v6)
    }

    #[test]
    fn open_keepalive_established_with_the_smaller_hold_time() {
        let mut s = Session::new(params(65010, 65000));
        let Message::Open(ours) = decode(&s.open(), true).unwrap() else { panic!() };
        assert_eq!((ours.asn, ours.hold_time, ours.router_id), (65010, 9, ME));
        assert!(ours.four_octet_as());
        assert_eq!(s.receive(&peer_open(65000, 240, true)).unwrap(), Reaction::Keepalive);
        assert_eq!(s.state(), State::OpenConfirm);
        let n = s.negotiated().unwrap();
        assert_eq!((n.hold_time, n.four_octet, n.peer_id), (9, true, PEER));
        assert_eq!(n.keepalive(), Some(Duration::from_secs(3)));
        assert_eq!(s.receive(&keepalive()).unwrap(), Reaction::Established);
        assert_eq!(s.receive(&keepalive()).unwrap(), Reaction::None);
        assert_eq!(s.receive(&Update::withdraw(&["10.0.0.0/8".parse().unwrap()])[0]).unwrap(), Reaction::None);
        assert_eq!(s.state(), State::Established);
    }

    #[test]
    fn families_are_the_ones_both_sides_offer() {
        // Our OPEN offers the families we have prefixes of.
        for ours in [V4, V6, DUAL] {
            let s = Session::new(Params { families: ours, ..params(65010, 65000) });
            let Message::Open(open) = decode(&s.open(), true).unwrap() else { panic!() };
            assert_eq!(Families::offered(&open), ours);
            assert!(open.four_octet_as());
        }
        // A peer without multiprotocol capabilities speaks IPv4 unicast only (RFC 4760 §8).
        let bare = Open { version: 4, asn: 65000, hold_time: 9, router_id: PEER, capabilities: vec![] };
        assert_eq!(Families::offered(&bare), V4);
        for (ours, theirs, agreed) in [(DUAL, DUAL, DUAL), (DUAL, V4, V4), (DUAL, V6, V6), (V6, DUAL, V6)] {
            let s = established_offering(Params { families: ours, ..params(65010, 65000) }, theirs);
            assert_eq!(s.negotiated().unwrap().families, agreed, "{ours} with a peer offering {theirs}");
        }
        // Nothing in common: refused with Unsupported Capability.
        for (ours, theirs) in [(V4, V6), (V6, V4)] {
            let mut s = Session::new(Params { families: ours, ..params(65010, 65000) });
            let err = s.receive(&peer_open_offering(65000, 9, true, theirs)).unwrap_err();
            let SessionError::Protocol { reason, notification } = &err else { panic!("{err:?}") };
            assert_eq!((notification.code, notification.subcode), (2, 7));
            assert!(reason.contains(&format!("we offer {ours}, it offers {theirs}")), "{reason}");
        }
        // A route refresh for either family re-sends our routes.
        let mut s = established_offering(Params { families: DUAL, ..params(65010, 65000) }, DUAL);
        for afi in [AFI_IPV4, AFI_IPV6] {
            let mut refresh = keepalive();
            refresh[16..19].copy_from_slice(&[0, 23, 5]);
            refresh.extend(afi.to_be_bytes().into_iter().chain([0, SAFI_UNICAST]));
            assert_eq!(s.receive(&refresh).unwrap(), Reaction::Refresh);
        }
    }

    #[test]
    fn only_negotiated_families_with_a_next_hop_are_announced_and_withdrawn() {
        let routes = dual_routes();
        let p = Params { families: DUAL, ..params(65010, 65000) };
        let s = established_offering(p, DUAL);
        assert_eq!(s.sendable(&routes), DUAL);
        assert_eq!(routes_in(&s.announce(&routes, &[])), (routes.v4.clone(), routes.v6.clone()));
        assert_eq!(routes_in(&s.withdraw(&routes)), (routes.v4.clone(), routes.v6.clone()));
        // The IPv6 routes carry the global and link-local next hop, our AS and no IPv4 NEXT_HOP.
        let msgs = s.announce(&routes, &[]);
        let Message::Update(u) = decode(msgs.last().unwrap(), true).unwrap() else { panic!() };
        assert_eq!(u.reach6.unwrap().next_hop, routes.next_hop6.unwrap());
        assert_eq!((u.attributes.as_path, u.attributes.next_hop), (vec![65010], None));

        // The peer did not negotiate IPv6: IPv4 only, both ways.
        let s = established_offering(p, V4);
        assert_eq!(routes_in(&s.announce(&routes, &[])), (routes.v4.clone(), vec![]));
        assert_eq!(routes_in(&s.withdraw(&routes)), (routes.v4.clone(), vec![]));
        // No IPv6 next hop towards this peer: IPv4 only; no IPv4 one: IPv6 only.
        let s = established_offering(p, DUAL);
        let no6 = Routes { next_hop6: None, ..routes.clone() };
        assert_eq!(routes_in(&s.announce(&no6, &[])), (routes.v4.clone(), vec![]));
        assert_eq!(routes_in(&s.withdraw(&no6)), (routes.v4.clone(), vec![]));
        let no4 = Routes { next_hop4: None, ..routes.clone() };
        assert_eq!(s.sendable(&no4), V6);
        assert_eq!(routes_in(&s.announce(&no4, &[])), (vec![], routes.v6.clone()));
        // Before the session is established nothing is sendable.
        assert!(Session::new(p).sendable(&routes).is_empty());
    }

    #[test]
    fn zero_hold_time_means_no_timers() {
        let mut s = Session::new(params(65010, 65000));
        s.receive(&peer_open(65000, 0, true)).unwrap();
        assert_eq!(s.negotiated().unwrap().keepalive(), None);
    }

    #[test]
    fn unacceptable_opens_are_refused_with_the_right_notification() {
        let cases = [
            (params(65010, 65000), peer_open(65001, 90, true), (2, 2), "AS 65001, not 65000"),
            (params(65010, 65000), peer_open(65000, 2, true), (2, 6), "hold time"),
            (params(4_200_000_000, 65000), peer_open(65000, 90, false), (2, 7), "4-octet"),
            (
                params(65010, 65000),
                Open { version: 4, asn: 65000, hold_time: 90, router_id: Ipv4Addr::UNSPECIFIED, capabilities: vec![] }
                    .encode(),
                (2, 3),
                "identifier",
            ),
        ];
        for (p, open, (code, subcode), needle) in cases {
            let err = Session::new(p).receive(&open).unwrap_err();
            let SessionError::Protocol { reason, notification } = &err else { panic!("{err:?}") };
            assert_eq!((notification.code, notification.subcode), (code, subcode), "{reason}");
            assert!(reason.contains(needle), "{reason}");
        }
    }

    #[test]
    fn out_of_order_messages_are_fsm_errors_and_notifications_end_the_session() {
        let mut s = Session::new(params(65010, 65000));
        let err = s.receive(&keepalive()).unwrap_err();
        assert!(matches!(err, SessionError::Protocol { ref notification, .. } if notification.code == 5));
        let mut s = established(params(65010, 65000));
        let err = s.receive(&peer_open(65000, 90, true)).unwrap_err();
        assert!(matches!(err, SessionError::Protocol { ref notification, .. } if notification.subcode == 3));
        let mut s = established(params(65010, 65000));
        let err = s.receive(&Notification::admin_shutdown().encode()).unwrap_err();
        assert_eq!(err.to_string(), "the peer closed the session: cease (administrative shutdown) [6/2]");
    }

    #[test]
    fn ebgp_and_ibgp_routes_carry_the_right_attributes() {
        let prefixes = vec!["10.10.0.0/16".parse().unwrap()];
        let nh = Ipv4Addr::new(203, 0, 113, 2);
        let routes = Routes { v4: prefixes.clone(), next_hop4: Some(nh), ..Routes::default() };
        let community: Community = "65010:7".parse().unwrap();
        let s = established(params(65010, 65000));
        let Message::Update(u) = decode(&s.announce(&routes, &[community])[0], true).unwrap() else { panic!() };
        assert_eq!(u.nlri, prefixes);
        assert_eq!(u.attributes.as_path, vec![65010]);
        assert_eq!((u.attributes.next_hop, u.attributes.local_pref), (Some(nh), None));
        assert_eq!(u.attributes.communities, vec![community]);
        let s = established(params(65010, 65010));
        let Message::Update(u) = decode(&s.announce(&routes, &[])[0], true).unwrap() else { panic!() };
        assert!(u.attributes.as_path.is_empty());
        assert_eq!(u.attributes.local_pref, Some(100));
        let Message::Update(u) = decode(&s.withdraw(&routes)[0], true).unwrap() else { panic!() };
        assert_eq!((u.withdrawn, u.nlri), (prefixes, vec![]));
        // iBGP IPv6 routes: empty path, LOCAL_PREF too.
        let s = established_offering(Params { families: DUAL, ..params(65010, 65010) }, DUAL);
        let msgs = s.announce(&dual_routes(), &[community]);
        let Message::Update(u) = decode(&msgs[1], true).unwrap() else { panic!() };
        assert!(u.reach6.is_some() && u.attributes.as_path.is_empty());
        assert_eq!((u.attributes.local_pref, u.attributes.communities), (Some(100), vec![community]));
    }
}

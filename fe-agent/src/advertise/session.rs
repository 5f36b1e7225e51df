//! The BGP session state machine of a route injector (RFC 4271 §8, the part an active speaker
//! that announces a few prefixes and accepts none needs): OpenSent → OpenConfirm → Established,
//! the checks of the peer's OPEN, hold-time negotiation, and the UPDATEs that announce or withdraw
//! our prefixes with the attributes the session calls for (eBGP: our AS in the path; iBGP: empty
//! path and LOCAL_PREF). Pure: bytes in, reactions out; the peer task owns the socket and the
//! timers.

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::codec::bgp::{
    AFI_IPV4, Attributes, Capability, Community, ErrorCode, Message, Notification, Open, SAFI_UNICAST, Update, decode,
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

    /// Our OPEN: IPv4 unicast and 4-octet AS capabilities.
    pub fn open(&self) -> Vec<u8> {
        Open {
            version: 4,
            asn: self.params.local_as,
            hold_time: self.params.hold_time,
            router_id: self.params.router_id,
            capabilities: vec![
                Capability::Multiprotocol { afi: AFI_IPV4, safi: SAFI_UNICAST },
                Capability::FourOctetAs(self.params.local_as),
            ],
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
            (State::Established, Message::RouteRefresh { afi: AFI_IPV4, safi: SAFI_UNICAST }) => Ok(Reaction::Refresh),
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
        let families: Vec<_> = open
            .capabilities
            .iter()
            .filter_map(|c| if let Capability::Multiprotocol { afi, safi } = c { Some((*afi, *safi)) } else { None })
            .collect();
        if !families.is_empty() && !families.contains(&(AFI_IPV4, SAFI_UNICAST)) {
            return Err(SessionError::protocol(
                ErrorCode::Open,
                7,
                Vec::new(),
                format!("the peer does not accept IPv4 unicast routes (it offers {families:?})"),
            ));
        }
        let hold_time = if open.hold_time == 0 || p.hold_time == 0 { 0 } else { open.hold_time.min(p.hold_time) };
        Ok(Negotiated { hold_time, four_octet, peer_id: open.router_id })
    }

    /// The UPDATEs announcing `prefixes` via `next_hop`.
    pub fn announce(&self, prefixes: &[Ipv4Net], next_hop: Ipv4Addr, communities: &[Community]) -> Vec<Vec<u8>> {
        let ibgp = self.params.is_ibgp();
        let attributes = Attributes {
            origin: Some(0),
            as_path: if ibgp { Vec::new() } else { vec![self.params.local_as] },
            next_hop: Some(next_hop),
            med: None,
            local_pref: ibgp.then_some(100),
            communities: communities.to_vec(),
        };
        Update::announce(prefixes, &attributes, self.negotiated.is_some_and(|n| n.four_octet))
    }

    /// The UPDATEs withdrawing `prefixes`.
    pub fn withdraw(&self, prefixes: &[Ipv4Net]) -> Vec<Vec<u8>> {
        Update::withdraw(prefixes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::bgp::keepalive;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    fn params(local_as: u32, peer_as: u32) -> Params {
        Params { local_as, peer_as, router_id: ME, hold_time: 9 }
    }

    fn peer_open(asn: u32, hold_time: u16, four_octet: bool) -> Vec<u8> {
        let mut capabilities = vec![Capability::Multiprotocol { afi: AFI_IPV4, safi: SAFI_UNICAST }];
        if four_octet {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        Open { version: 4, asn, hold_time, router_id: PEER, capabilities }.encode()
    }

    fn established(p: Params) -> Session {
        let mut s = Session::new(p);
        assert_eq!(s.receive(&peer_open(p.peer_as, 240, true)).unwrap(), Reaction::Keepalive);
        assert_eq!(s.receive(&keepalive()).unwrap(), Reaction::Established);
        s
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
        let prefixes = ["10.10.0.0/16".parse().unwrap()];
        let nh = Ipv4Addr::new(203, 0, 113, 2);
        let community: Community = "65010:7".parse().unwrap();
        let s = established(params(65010, 65000));
        let Message::Update(u) = decode(&s.announce(&prefixes, nh, &[community])[0], true).unwrap() else { panic!() };
        assert_eq!(u.nlri, prefixes);
        assert_eq!(u.attributes.as_path, vec![65010]);
        assert_eq!((u.attributes.next_hop, u.attributes.local_pref), (Some(nh), None));
        assert_eq!(u.attributes.communities, vec![community]);
        let s = established(params(65010, 65010));
        let Message::Update(u) = decode(&s.announce(&prefixes, nh, &[])[0], true).unwrap() else { panic!() };
        assert!(u.attributes.as_path.is_empty());
        assert_eq!(u.attributes.local_pref, Some(100));
        let Message::Update(u) = decode(&s.withdraw(&prefixes)[0], true).unwrap() else { panic!() };
        assert_eq!((u.withdrawn, u.nlri), (prefixes.to_vec(), vec![]));
    }
}

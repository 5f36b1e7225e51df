//! Move hints: an authenticated FE-to-FE fast path for make-before-break (docs/design.md,
//! invariant I5). The controller stays authoritative; a hint only lets the other FEs act on a
//! move *before* its delta arrives, for a bounded time.
//!
//! When this FE installs a VM locally from a captured ARP (a claim, before the controller
//! answers) and the VM's desired binding is at another FE, it sends a hint — VM IP and MAC, this
//! FE, the binding's move_seq ("the move after this version"), the capture's observation time —
//! over UDP to every other registered FE that is up. A receiver that accepts it ([`accept`])
//! points the VM at this FE in its data plane (the old FE's local route goes, tunnel first, as
//! for a real move) until the stream delivers a newer binding version, the sender cancels (its
//! claim was rejected), or a timeout passes ([`overrides`]).
//!
//! Trust model: the FEs that may send each other IP-in-IP (the registered underlay addresses)
//! plus a cluster-wide shared secret, as BGP sessions are protected with TCP-MD5/TCP-AO keys.
//! Every datagram carries an HMAC-SHA256 ([`crate::codec::hint`]); the UDP source must be the
//! registered underlay address of the FE the hint names (an FE speaks only for itself); a send
//! time (judged against that sender's usual clock offset, never against the receiver's clock) and
//! a nonce bound replays to a window in which the hinted binding version must still be current;
//! per-sender rate limits and a cap on overrides bound the damage of a compromised FE to what
//! it could already do by claiming VMs through ARP — and the controller's answer ends it.
//! Without a key (`--move-hint-key-file`) hints are off.
//!
//! Parts: the datagram and its HMAC are [`crate::codec::hint`]; here [`accept`] (replay window,
//! acceptance rules), [`overrides`] (receiver state machine), [`outbox`] (sender state), [`io`]
//! (the socket task) — all but [`io`] pure. [`Hints`] ties them to the engine.

pub mod accept;
pub mod io;
pub mod outbox;
pub mod overrides;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use rand::Rng;
use victor_proto::clock::monotonic_ns;

use crate::clock::WallClock;
use crate::codec::hint::{Hint, Keys, Kind};
use crate::events::EventLog;
use crate::metrics::Metrics;
use crate::state::desired::DesiredState;
use crate::state::local::LocalVms;
use accept::{Reject, check_move, check_sender};
use io::{HintSocket, Received};
use outbox::{Outbox, Sent};
use overrides::{End, Override, Overrides};

/// Most overrides in force at once.
const MAX_OVERRIDES: usize = 65_536;

/// Move-hint settings (`--move-hint-*`).
#[derive(Debug, Clone)]
pub struct HintConfig {
    /// The cluster's keys.
    pub keys: Keys,
    /// UDP port on every FE's underlay address.
    pub port: u16,
    /// An unconfirmed override ends after this long (ns).
    pub timeout_ns: u64,
    /// Replay window (ns, by the sender's clock).
    pub max_age_ns: u64,
    /// Hints per second accepted from one FE.
    pub rate: u32,
    /// This FE's wall clock (send times).
    pub clock: WallClock,
}

/// The engine's handle on move hints: what it sent, the overrides in force, and the socket (none
/// when hints are off: then nothing is sent and nothing overrides).
#[derive(Debug)]
pub struct Hints {
    me: String,
    socket: Option<HintSocket>,
    overrides: Overrides,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    events: Arc<Mutex<EventLog>>,
    clock: WallClock,
}

impl Hints {
    /// Hints off.
    pub fn disabled(me: &str, metrics: Arc<Metrics>, events: Arc<Mutex<EventLog>>) -> Hints {
        Hints {
            me: me.to_owned(),
            socket: None,
            overrides: Overrides::new(0, 0),
            outbox: Outbox::new(0),
            metrics,
            events,
            clock: WallClock::default(),
        }
    }

    /// Hints on, sending through `socket` with send times on `clock`; overrides end after
    /// `timeout_ns` unconfirmed.
    pub fn enabled(
        me: &str,
        socket: HintSocket,
        timeout_ns: u64,
        clock: WallClock,
        metrics: Arc<Metrics>,
        events: Arc<Mutex<EventLog>>,
    ) -> Hints {
        Hints {
            me: me.to_owned(),
            socket: Some(socket),
            overrides: Overrides::new(timeout_ns, MAX_OVERRIDES),
            // A claim unanswered for twice the receivers' timeout has nothing left to cancel.
            outbox: Outbox::new(timeout_ns.saturating_mul(2)),
            metrics,
            events,
            clock,
        }
    }

    /// The tunnel peer an override puts in front of the desired state for `ip`.
    pub fn peer(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        self.overrides.peer(ip)
    }

    /// This FE just installed `ip` locally for a new claim (observed at `observed_at`): if the VM
    /// is bound to another FE, tell every other FE that is up.
    pub fn claimed(&mut self, ip: IpAddr, mac: [u8; 6], observed_at: i64, desired: &DesiredState) {
        let Some(socket) = &self.socket else { return };
        let Some(b) = desired.binding(ip).filter(|b| b.fe != desired.me()) else { return };
        let hint = Hint {
            kind: Kind::Move,
            fe_id: self.me.clone(),
            vm_ip: ip,
            mac,
            move_seq: b.move_seq,
            observed_at,
            sent_at: self.clock.now(),
            nonce: rand::rng().random(),
        };
        // Stamped before the datagrams leave: a receiver may read one before send() returns.
        let now = monotonic_ns();
        let sent = socket.send(&hint, &recipients(desired));
        self.outbox.sent(ip, Sent { mac, move_seq: b.move_seq, observed_at, sent_mono: now });
        self.metrics.hint_sent(Kind::Move.label(), sent);
        self.events.lock().expect("events").hint_sent(ip, b.move_seq + 1, now);
        tracing::debug!(%ip, move_seq = b.move_seq, to = sent, "move hint sent");
    }

    /// The claim of `ip` observed at `observed_at` was answered; a rejected one is cancelled.
    pub fn claim_answered(&mut self, ip: IpAddr, observed_at: i64, rejected: bool, desired: &DesiredState) {
        let Some(socket) = &self.socket else { return };
        let Some(s) = self.outbox.resolved(ip, observed_at, rejected) else { return };
        let hint = Hint {
            kind: Kind::Cancel,
            fe_id: self.me.clone(),
            vm_ip: ip,
            mac: s.mac,
            move_seq: s.move_seq,
            observed_at,
            sent_at: self.clock.now(),
            nonce: rand::rng().random(),
        };
        let sent = socket.send(&hint, &recipients(desired));
        self.metrics.hint_sent(Kind::Cancel.label(), sent);
        tracing::info!(%ip, move_seq = s.move_seq, to = sent, "claim rejected: move hint cancelled");
    }

    /// A hint that passed the socket's screening. Returns the VM to reconcile when it changed
    /// this FE's target for it.
    pub fn received(&mut self, r: Received, desired: &DesiredState, local: &LocalVms) -> Option<IpAddr> {
        let Received { hint, src, received_mono } = r;
        let ip = hint.vm_ip;
        let outcome = match hint.kind {
            Kind::Move => self.offer(&hint, src, desired, local, received_mono),
            Kind::Cancel => check_sender(&hint, src, desired)
                .and_then(|fe| self.overrides.cancel(ip, fe, hint.move_seq))
                .map(|o| self.ended(ip, &o, End::Cancelled)),
        };
        match outcome {
            Ok(()) => {
                self.metrics.hint_accepted(hint.kind.label());
                self.metrics.hint_overrides.set(self.overrides.len() as i64);
                Some(ip)
            }
            Err(reason) => {
                let (kind, reason_label) = (hint.kind.label(), reason.label());
                tracing::debug!(%ip, fe = %hint.fe_id, %src, kind, reason = reason_label, "move hint rejected");
                self.metrics.hint_rejected(reason.label());
                None
            }
        }
    }

    fn offer(
        &mut self,
        hint: &Hint,
        src: Ipv4Addr,
        desired: &DesiredState,
        local: &LocalVms,
        received_mono: u64,
    ) -> Result<(), Reject> {
        let ip = hint.vm_ip;
        let local_claim = local.get(ip).is_some_and(|vm| vm.is_ours() && vm.overrides());
        let fe = check_move(hint, src, desired, local_claim)?;
        let o = Override {
            fe,
            fe_id: Arc::from(hint.fe_id.as_str()),
            peer: src,
            move_seq: hint.move_seq,
            observed_at: hint.observed_at,
            accepted_mono: 0,
            expires: 0,
        };
        if let Some(replaced) = self.overrides.offer(ip, o, monotonic_ns())? {
            self.ended(ip, &replaced, End::Replaced);
        }
        self.events.lock().expect("events").hint_received(ip, hint.move_seq + 1, &hint.fe_id, received_mono);
        tracing::debug!(%ip, fe = %hint.fe_id, move_seq = hint.move_seq, "move hint accepted");
        Ok(())
    }

    /// The change a hint made to `ip` is in the data plane now.
    pub fn applied(&self, ip: IpAddr, at: u64) {
        if let Some(o) = self.overrides.get(ip) {
            self.events.lock().expect("events").hint_applied(ip, o.move_seq + 1, at);
        }
    }

    /// The desired binding of `ip` changed: an override past its version ends.
    pub fn desired_changed(&mut self, ip: IpAddr, desired: &DesiredState) {
        if self.overrides.is_empty() {
            return;
        }
        let binding = desired.binding(ip).map(|b| (b.fe, b.move_seq));
        if let Some((o, how)) = self.overrides.desired_changed(ip, binding) {
            self.ended(ip, &o, how);
        }
    }

    /// FEs changed: overrides whose sender is no longer registered, up and at the same underlay
    /// address end. Returns their VMs.
    pub fn senders_changed(&mut self, desired: &DesiredState) -> Vec<IpAddr> {
        if self.overrides.is_empty() {
            return Vec::new();
        }
        let valid = |fe, peer| desired.fes().get(fe).is_some_and(|f| f.present && f.up && f.underlay == Some(peer));
        let gone = self.overrides.senders_changed(valid);
        self.end_all(gone, End::PeerDown)
    }

    /// Timers: overrides unconfirmed for too long end (returns their VMs); old hints are forgotten.
    pub fn tick(&mut self, now: u64) -> Vec<IpAddr> {
        self.outbox.expire(now);
        let expired = self.overrides.expire(now);
        self.end_all(expired, End::Expired)
    }

    fn end_all(&mut self, ended: Vec<(IpAddr, Override)>, how: End) -> Vec<IpAddr> {
        ended
            .into_iter()
            .map(|(ip, o)| {
                self.ended(ip, &o, how);
                ip
            })
            .collect()
    }

    fn ended(&self, ip: IpAddr, o: &Override, how: End) {
        self.metrics.hint_override_ended(how.label());
        self.metrics.hint_overrides.set(self.overrides.len() as i64);
        self.events.lock().expect("events").hint_ended(ip, o.move_seq + 1, how.label(), monotonic_ns());
        let level_info = matches!(how, End::Expired | End::Cancelled | End::PeerDown);
        if level_info {
            tracing::info!(%ip, fe = %o.fe_id, move_seq = o.move_seq, how = how.label(), "move hint override ended");
        } else {
            tracing::debug!(%ip, fe = %o.fe_id, move_seq = o.move_seq, how = how.label(), "move hint override ended");
        }
    }
}

/// Underlay addresses of every other registered FE that is up.
fn recipients(desired: &DesiredState) -> Vec<Ipv4Addr> {
    let me = desired.me();
    let mut to: Vec<Ipv4Addr> = desired
        .fes()
        .iter()
        .filter(|(idx, f)| *idx != me && f.present && f.up)
        .filter_map(|(_, f)| f.underlay)
        .collect();
    to.sort_unstable();
    to.dedup();
    to
}

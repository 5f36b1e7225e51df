//! Why the registry refuses a request: a machine-readable [`Reason`] (counted in metrics, sent to
//! agents), the kind of refusal ([`Refusal`], which the API layer turns into a status code) and a
//! message saying what to fix. Plain data: no IO, no wire types.

/// Why an observation or command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No specific reason (the refusal of an operator command, e.g. "not frozen").
    Unspecified,
    /// The IP or MAC is malformed, or the IP is a network/broadcast/multicast address.
    Malformed,
    /// The IP is outside the mobile prefixes (of the controller or of the reporting FE).
    OutsideMobilePrefix,
    /// The VM is declared with another MAC (anti-spoofing, docs/design.md invariant I3).
    MacMismatch,
    /// The VM's site policy does not allow the site (invariant I3).
    SitePolicy,
    /// The observation cannot be ordered after the current binding or removal (invariant I2):
    /// it may be older. The rejection names the revision the FE must know before it observes
    /// again.
    Stale,
    /// Flap damping froze the binding (invariant I4).
    Damped,
    /// A GONE observation for a binding that points to another FE.
    NotBoundHere,
    /// The controller requires declared VMs and this one is not declared.
    Undeclared,
    /// The observation time is unusable (not positive).
    BadTimestamp,
    /// A MAC claim for a MAC that no binding and no declaration has.
    UnknownMac,
    /// A MAC claim for a MAC with more IPs than one claim moves ([`crate::registry::MAX_MAC_IPS`]).
    TooManyIps,
}

impl Reason {
    /// Every reason, for exhaustive tests of the mappings.
    pub const ALL: [Reason; 12] = [
        Reason::Unspecified,
        Reason::Malformed,
        Reason::OutsideMobilePrefix,
        Reason::MacMismatch,
        Reason::SitePolicy,
        Reason::Stale,
        Reason::Damped,
        Reason::NotBoundHere,
        Reason::Undeclared,
        Reason::BadTimestamp,
        Reason::UnknownMac,
        Reason::TooManyIps,
    ];

    /// The snake-case name (the `reason` label of `victor_claims_rejected`).
    pub fn label(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::Malformed => "malformed",
            Reason::OutsideMobilePrefix => "outside_mobile_prefix",
            Reason::MacMismatch => "mac_mismatch",
            Reason::SitePolicy => "site_policy",
            Reason::Stale => "stale",
            Reason::Damped => "damped",
            Reason::NotBoundHere => "not_bound_here",
            Reason::Undeclared => "undeclared",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::UnknownMac => "unknown_mac",
            Reason::TooManyIps => "too_many_ips",
        }
    }
}

/// What kind of refusal a rejection is; the API answers a single-item request with the status
/// that matches it (and tells agents that status in each rejected claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The request itself is unusable (bad MAC, bad timestamp, bad address).
    Invalid,
    /// What it refers to does not exist (no binding, no declaration, unknown FE).
    Absent,
    /// The current state does not allow it (stale, frozen, bound elsewhere, undeclared).
    Precondition,
    /// Identity or policy forbids it (declared MAC, site policy).
    Forbidden,
}

/// A refusal: nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable reason.
    pub reason: Reason,
    /// The kind of refusal.
    pub refusal: Refusal,
    /// Human-readable explanation (what to fix).
    pub message: String,
    /// For [`Reason::Stale`]: the store revision the reporting FE must have applied before an
    /// observation of it orders after the current state (0 = none).
    pub revision: u64,
}

impl Rejection {
    /// A rejection.
    pub fn new(reason: Reason, refusal: Refusal, message: impl Into<String>) -> Self {
        Rejection { reason, refusal, message: message.into(), revision: 0 }
    }

    /// The same, naming the revision an observation must know (see [`Rejection::revision`]).
    pub fn needing(mut self, revision: u64) -> Self {
        self.revision = revision;
        self
    }
}

//! The VICTOR forwarding-element agent (`victor-fe-agent`).
//!
//! The crate reads bottom-up, in layers: a layer uses only the layers listed before it (inside the
//! IO layer, `forwarding`, `reconcile` and `ports` build on `netlink`, `reconcile` on `forwarding`,
//! `neigh` on `ports`):
//!
//! * pure parts —
//!   [`clock`] (the agent's wall clock and observation stamps),
//!   [`codec`] (the BGP and move-hint wire formats), [`ratelimit`] (per-source token buckets),
//!   [`metrics`] (named counters; modules give them labels), [`readiness`], [`events`] (per-move
//!   timestamps), [`state`] (desired state from the stream, VMs seen here and their claims,
//!   targets);
//! * kernel and IO —
//!   [`netlink`] (routes, neighbours, links), [`forwarding`] (the IP-in-IP / 6in4 data plane:
//!   userspace TUN forwarder or kernel ipip), [`reconcile`] (desired vs programmed → minimal
//!   ordered changes, through its effects), [`ports`] (the VM port table and its watcher),
//!   [`neigh`] (ARP/RARP/NDP capture on VM ports, what to learn and answer), [`hint`] (move hints:
//!   authenticated FE-to-FE notices of a move, acted on before the controller's update arrives),
//!   [`link`] (the link to the controller cluster and the reporter of observed VMs),
//!   [`advertise`] (BGP: announces the mobile prefixes while healthy), [`admin`] (HTTP),
//!   [`service`] (what systemd is told: ready, healthy, status);
//! * [`engine`] — the task that owns the state and drives the reconciler;
//! * [`config`] and [`agent`] — flags, and the wiring that starts every task.

pub mod clock;
pub mod codec;
pub mod events;
pub mod metrics;
pub mod ratelimit;
pub mod readiness;
pub mod state;

pub mod forwarding;
pub mod hint;
pub mod link;
pub mod neigh;
pub mod netlink;
pub mod ports;
pub mod reconcile;

pub mod admin;
pub mod advertise;
pub mod service;

pub mod engine;

pub mod agent;
pub mod config;

//! The VICTOR forwarding-element agent (`victor-fe-agent`).
//!
//! Module map (each module's `//!` doc says what it owns):
//! * [`config`] — flags, `VICTOR_*` env and TOML file.
//! * [`agent`] — wiring: starts every task below and waits.
//! * [`link`] — the link to the controller cluster (register, heartbeat, Sync stream,
//!   failover) and the [`link::reporter`] of observed VMs.
//! * [`core`] — the task that owns the state and drives the reconciler.
//! * [`state`] — pure: desired state from the stream, VMs seen here and their claims, targets.
//! * [`reconcile`] — desired vs programmed → minimal ordered kernel/data-plane changes.
//! * [`arp`] — ARP capture on VM ports, rate limiting, what to learn and answer.
//! * [`ports`] — the VM port table, kept current from link notifications.
//! * [`netlink`] — the rtnetlink operations (routes, neighbours, links).
//! * [`dataplane`] — the IP-in-IP backend (userspace TUN forwarder or kernel ipip).
//! * [`advertise`] — BGP: announces the mobile prefixes to the site's routers while healthy.
//! * [`hint`] — move hints: authenticated FE-to-FE notices of a move, acted on before the
//!   controller's update arrives (bounded by it and by a timeout).
//! * [`events`] / [`metrics`] / [`admin`] — observability.

pub mod admin;
pub mod advertise;
pub mod agent;
pub mod arp;
pub mod config;
pub mod core;
pub mod dataplane;
pub mod events;
pub mod hint;
pub mod link;
pub mod metrics;
pub mod netlink;
pub mod ports;
pub mod reconcile;
pub mod state;

//! The VICTOR controller: a stateless replica over a [`victor_store::Store`].
//!
//! Module map, bottom-up (each module's `//!` doc says what it owns; a module uses only those
//! above it in this list):
//! * [`config`] — flags, env and config file.
//! * [`keys`] / [`records`] — the key layout and the stored values.
//! * [`lease`] — leases this replica keeps alive.
//! * [`cache`] — the watch-fed replica cache and its history of frames.
//! * [`filter`] — which bindings a listing or a watch selects, and paging with a scan budget.
//! * [`metrics`] / [`move_timeline`] — counters, and per-move stage timestamps.
//! * [`registry`] — binding rules (pure) and their application to the store (CAS); no gRPC.
//! * [`replica`] — what the parts of one replica share (registry, cache, status).
//! * [`wire`] — the controller's types as `victor.v1` messages and status codes.
//! * [`stream`] — the agents' desired-state streams and the orchestrators' binding watches, their
//!   admission (stream limits) and the paced snapshot lane.
//! * [`api`] — the gRPC services, a thin skin over the replica.
//! * [`housekeeping`] — timers run by the one elected replica.
//! * [`admin`] — the HTTP admin port (health, metrics, status page).
//! * [`server`] — wires one replica together: the control runtime (leases, housekeeping, cache
//!   loader) and the connection gate of both servers (caps, handshake and idle timeouts).

pub mod admin;
pub mod api;
pub mod cache;
pub mod config;
pub mod filter;
pub mod housekeeping;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod move_timeline;
pub mod records;
pub mod registry;
pub mod replica;
pub mod server;
pub mod stream;
pub mod wire;

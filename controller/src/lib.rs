//! The VICTOR controller: a stateless replica over a [`victor_store::Store`].
//!
//! Module map (each module's `//!` doc says what it owns):
//! * [`config`] — flags, env and config file.
//! * [`keys`] / [`records`] — the key layout and the stored values.
//! * [`registry`] — binding rules (pure) and their application to the store (CAS).
//! * [`cache`] — the watch-fed replica cache and its history of frames.
//! * [`lease`] — leases this replica keeps alive.

pub mod admin;
pub mod api;
pub mod cache;
pub mod config;
pub mod housekeeping;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod records;
pub mod registry;
pub mod server;
pub mod stream;
pub mod trace;

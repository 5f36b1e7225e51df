//! End-to-end tests of VICTOR and the `victor-lab` testbed.
//!
//! * [`lab`] — the migration testbed of BRIEF §3 (`up`, `down`, `migrate`).
//! * [`bench`] — the controller scale benchmark with simulated agents (`bench`).

pub mod bench;
pub mod lab;

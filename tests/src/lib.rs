//! End-to-end tests of VICTOR and the `victor-lab` testbed.
//!
//! * [`lab`] — the migration testbed of docs/design.md §6 (`up`, `down`, `migrate`).
//! * [`bench`] — the controller scale benchmark with simulated agents (`bench`).
//! * [`faults`] — fault injection for the fault suite (`tests/faults.rs`).

pub mod bench;
pub mod faults;
pub mod lab;

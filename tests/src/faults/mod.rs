//! The fault suite's machinery (`tests/tests/faults.rs`; what each fault proves: `docs/faults.md`).
//!
//! During continuous migrations across thousands of bindings, a test breaks one thing — a
//! controller replica, an etcd member, the whole etcd cluster, an agent, an agent's controller
//! link, a replica's store link under a compaction — and then checks, against etcd itself, that
//! nothing acknowledged was lost, nothing half-written remains, and every agent's state equals the
//! store within a bounded time, with no route flaps on the way.
//!
//! * [`cluster`] — real etcd and controller processes to kill, pause, restart and cut off;
//! * [`proxy`] — a partitionable TCP proxy for cutting one link;
//! * [`agent`] — simulated agents that run the fe-agent's own controller link and record every
//!   session, snapshot, removal and re-send;
//! * [`churn`] — the continuous migrations and the truth they leave;
//! * [`lab`] — real fe-agents in the namespace lab, with traffic, on the same controllers;
//! * [`store`] — the bindings read from etcd and the checks against them;
//! * [`rig`] — one scenario assembled, and its verification.

pub mod agent;
pub mod churn;
pub mod cluster;
pub mod lab;
pub mod proxy;
pub mod rig;
pub mod store;

//! The VICTOR data plane.

mod aio;
pub mod arp_io;
pub mod counters;
pub mod fib;
pub mod forwarder;
pub mod kernel;
pub mod packet;

//! `victorctl`: command-line client of the VICTOR controller cluster (the binary is a thin
//! `main` over this library).
//!
//! * [`cli`] — flags and subcommands (clap);
//! * [`client`] — connections, TLS, token and fail-over between controllers;
//! * [`commands`] — one function per subcommand;
//! * [`render`] — tables and JSON;
//! * [`error`] — messages and exit codes (0 ok, 1 refused/unreachable, 2 usage).

pub mod cli;
pub mod client;
pub mod commands;
pub mod error;
pub mod render;

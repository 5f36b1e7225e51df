//! `victor-fe-agent`: runs the forwarding-element agent until SIGINT/SIGTERM.

use std::process::ExitCode;

use victor_fe_agent::config::Config;

fn main() -> ExitCode {
    victor_daemon::main("victor-fe-agent", Config::load(), victor_fe_agent::agent::run)
}

//! `victor-controller`: runs one controller replica until SIGINT/SIGTERM.

use std::process::ExitCode;

use victor_controller::config::Config;
use victor_controller::server::Server;

fn main() -> ExitCode {
    victor_daemon::main("victor-controller", Config::load(), run)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut server = Server::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        err = server.failed() => return Err(err),
    }
    server.shutdown().await
}

//! `victor-controller`: runs one controller replica until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use victor_controller::config::Config;
use victor_controller::server::Server;
use victor_daemon::systemd::{AdminProbe, Service};

fn main() -> ExitCode {
    victor_daemon::main("victor-controller", Config::load(), run)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut server = Server::start(config).await?;
    // Under systemd (Type=notify): READY=1 when /readyz says so, as Kubernetes judges it; the
    // watchdog is pinged while /healthz answers.
    let service = Service::start(AdminProbe::new(server.http_addr, Duration::from_secs(5)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        err = server.failed() => return Err(err),
    }
    service.stopping();
    server.shutdown().await
}

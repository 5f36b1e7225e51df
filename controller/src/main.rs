//! `victor-controller`: runs one controller replica until SIGINT/SIGTERM.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use victor_controller::config::{Config, ConfigError, LogFormat};
use victor_controller::server::Server;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(ConfigError::Clap(err)) => err.exit(),
        Err(err) => {
            eprintln!("victor-controller: {err}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        println!("{}", serde_json::to_string_pretty(&config).expect("config serialises"));
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("victor-controller: {err:#}");
            ExitCode::FAILURE
        }
    }
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

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|err| {
        eprintln!("victor-controller: --log {:?} is not a valid filter ({err}); using info", config.log);
        EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

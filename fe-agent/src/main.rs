//! `victor-fe-agent`: runs the forwarding-element agent until SIGINT/SIGTERM.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use victor_fe_agent::config::{Config, ConfigError, LogFormat};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(ConfigError::Clap(err)) => err.exit(),
        Err(err) => {
            eprintln!("victor-fe-agent: {err}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        println!("{}", serde_json::to_string_pretty(&config).expect("config serialises"));
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(victor_fe_agent::agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("victor-fe-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|err| {
        eprintln!("victor-fe-agent: --log {:?} is not a valid filter ({err}); using info", config.log);
        EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

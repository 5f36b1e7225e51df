//! What every VICTOR daemon does the same way, so it is written once:
//! * [`config_file`] — `--config FILE` (TOML whose keys are the long flag names), merged under the
//!   command line: flags > config file > `VICTOR_*` environment > defaults;
//! * [`duration`] — `180s`-style durations for flags and their JSON form;
//! * [`logging`] — text or JSON logs on stderr with an `EnvFilter`;
//! * [`backoff`] — exponential backoff between retries;
//! * [`task`] — a task aborted when its owner goes ([`task::AbortOnDrop`]);
//! * [`systemd`] — `Type=notify` units: readiness, status and a watchdog pinged only while the
//!   daemon is healthy (sd_notify);
//! * [`main`] — the `main` of a daemon: load the config (exit 2 with what to fix), `--check-config`,
//!   logging, the tokio runtime, and exit codes.

pub mod backoff;
pub mod config_file;
pub mod duration;
pub mod logging;
pub mod systemd;
pub mod task;

use std::future::Future;
use std::process::ExitCode;

pub use backoff::Backoff;
pub use config_file::ConfigError;
pub use logging::LogFormat;

/// What [`main`] needs from a daemon's configuration.
pub trait DaemonConfig: serde::Serialize {
    /// `--check-config` was given.
    fn check_config(&self) -> bool;
    /// The `--log` filter.
    fn log_filter(&self) -> &str;
    /// The `--log-format`.
    fn log_format(&self) -> LogFormat;
}

/// Implements [`DaemonConfig`] for a config struct with the usual fields `check_config: bool`,
/// `log: String` and `log_format: LogFormat`.
#[macro_export]
macro_rules! impl_daemon_config {
    ($config:ty) => {
        impl $crate::DaemonConfig for $config {
            fn check_config(&self) -> bool {
                self.check_config
            }

            fn log_filter(&self) -> &str {
                &self.log
            }

            fn log_format(&self) -> $crate::LogFormat {
                self.log_format
            }
        }
    };
}

/// Runs a daemon: reports a bad configuration (exit 2), prints it for `--check-config` (exit 0),
/// sets up logging, runs `run` on a multi-threaded runtime and maps its result to the exit code.
pub fn main<C, F>(program: &str, loaded: Result<C, ConfigError>, run: impl FnOnce(C) -> F) -> ExitCode
where
    C: DaemonConfig,
    F: Future<Output = anyhow::Result<()>>,
{
    let config = match loaded {
        Ok(config) => config,
        Err(ConfigError::Clap(err)) => err.exit(),
        Err(err) => {
            eprintln!("{program}: {err}");
            return ExitCode::from(2);
        }
    };
    if config.check_config() {
        // A closed stdout (e.g. `| head`) is not an error worth a panic.
        let json = serde_json::to_string_pretty(&config).expect("a configuration serialises to JSON");
        return match std::io::Write::write_all(&mut std::io::stdout(), format!("{json}\n").as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    logging::init(program, config.log_filter(), config.log_format());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("{program}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

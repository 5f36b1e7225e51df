//! Logs on stderr: human-readable text (colours only on a terminal) or one JSON object per line.

use clap::ValueEnum;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (fields such as fe_id and vm_ip as keys).
    Json,
}

/// Installs the global subscriber. An invalid `filter` falls back to `info` with a warning.
pub fn init(program: &str, filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|err| {
        eprintln!("{program}: --log {filter:?} is not a valid filter ({err}); using info");
        EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

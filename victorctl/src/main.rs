//! `victorctl`: command-line client of the VICTOR controller cluster (see the library docs).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match victorctl::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help/--version print and exit 0; usage errors print and exit 2.
        Err(err) => err.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("victorctl: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let what = cli.command.describe();
    match runtime.block_on(victorctl::commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is_closed_output() => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("victorctl: {what}: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

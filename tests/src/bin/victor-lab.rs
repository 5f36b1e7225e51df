//! `victor-lab`: the paper's migration testbed in network namespaces (`up`, `down`, `migrate`)
//! and the controller scale benchmark with simulated agents (`bench`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// victor-lab: reproduce the VICTOR migration experiment and benchmark the controller.
#[derive(Debug, Parser)]
#[command(name = "victor-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the lab topology (client, fe1-fe3, VMs, underlay, controllers, etcd) and leave it running.
    Up(victor_tests::lab::UpArgs),
    /// Tear down everything a previous `up` created (also after a crash).
    Down(victor_tests::lab::DownArgs),
    /// Move a VM between fe2 and fe3 while the client pings it; report loss and convergence.
    Migrate(victor_tests::lab::MigrateArgs),
    /// Drive the controller cluster with simulated agents; report throughput, convergence, memory.
    Bench(victor_tests::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Bench(args) = &cli.command
        && let Some(workers) = victor_tests::bench::runtime_workers(args)
    {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => victor_tests::lab::up(args).await,
            Command::Down(args) => victor_tests::lab::down(args).await,
            Command::Migrate(args) => victor_tests::lab::migrate(args).await,
            Command::Bench(args) => victor_tests::bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("victor-lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}

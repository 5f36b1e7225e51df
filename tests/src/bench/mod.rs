//! The controller scale benchmark (BRIEF §4). Being implemented.

use anyhow::{Result, bail};
use clap::Args;

/// `victor-lab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Simulated FEs.
    #[arg(long, default_value_t = 3)]
    pub fes: usize,
}

/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> Result<()> {
    bail!("victor-lab bench is not implemented yet")
}

//! The migration testbed (BRIEF §3). Being implemented.

use anyhow::{Result, bail};
use clap::Args;

/// `victor-lab up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// etcd members: 0 = embedded store, 1 or 3.
    #[arg(long, default_value_t = 1)]
    pub etcd_members: usize,
}

/// `victor-lab down`.
#[derive(Debug, Args)]
pub struct DownArgs {}

/// `victor-lab migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Number of moves.
    #[arg(long, default_value_t = 10)]
    pub moves: usize,
}

/// Builds the lab.
pub async fn up(_args: UpArgs) -> Result<()> {
    bail!("victor-lab up is not implemented yet")
}

/// Tears the lab down.
pub async fn down(_args: DownArgs) -> Result<()> {
    bail!("victor-lab down is not implemented yet")
}

/// Runs the migration experiment.
pub async fn migrate(_args: MigrateArgs) -> Result<()> {
    bail!("victor-lab migrate is not implemented yet")
}

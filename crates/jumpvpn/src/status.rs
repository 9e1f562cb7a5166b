//! `jumpvpn status` (being written).

use crate::cli::AdminArgs;
use crate::Status;

/// Runs `jumpvpn status`.
pub fn run(_args: &AdminArgs) -> anyhow::Result<Status> {
    anyhow::bail!("status: not built yet")
}

//! `jumpvpn client` (being written).

use crate::cli::ConfigArgs;
use crate::Status;

/// Runs `jumpvpn client --config FILE`.
pub fn run(_args: &ConfigArgs) -> anyhow::Result<Status> {
    anyhow::bail!("client: not built yet")
}

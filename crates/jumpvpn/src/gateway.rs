//! `jumpvpn gateway` (being written).

use crate::cli::ConfigArgs;
use crate::Status;

/// Runs `jumpvpn gateway --config FILE`.
pub fn run(_args: &ConfigArgs) -> anyhow::Result<Status> {
    anyhow::bail!("gateway: not built yet")
}

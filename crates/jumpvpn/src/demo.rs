//! `jumpvpn demo` (being written).

use crate::cli::DemoArgs;
use crate::Status;

/// Runs `jumpvpn demo`.
pub fn run(_args: &DemoArgs) -> anyhow::Result<Status> {
    anyhow::bail!("demo: not built yet")
}

//! Jumping VPN: the drivers, configuration, admin API and commands behind the `jumpvpn`
//! binary (SPEC §9). The protocol itself is the sans-IO `jumpvpn-core`; the stores are
//! `jumpvpn-store`.

pub mod admin;
pub mod admin_client;
pub mod audit_cmd;
pub mod audit_log;
pub mod cli;
pub mod client;
pub mod config;
mod datapath;
pub mod debug_cmd;
pub mod demo;
mod driver;
pub mod gateway;
pub mod keys;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod status;
pub mod table;
pub mod tun;

use std::process::ExitCode;

/// How a command that ran to its end went. (A command that could not run returns an error,
/// which is exit code 2.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Exit 0.
    Success,
    /// Exit 1: a check found what it looks for (violations, or nothing to show).
    Findings,
}

impl Status {
    /// The process exit code of SPEC §9.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Status::Success => ExitCode::SUCCESS,
            Status::Findings => ExitCode::from(1),
        }
    }
}

/// A configuration or usage error, as an error for `main` (which prints it and exits 2).
pub(crate) fn usage_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// Log lines to stderr. `JUMPVPN_LOG` sets the level (`error`, `warn`, `info` (the default),
/// `debug`, `trace`).
pub(crate) fn init_logging() {
    let level = std::env::var("JUMPVPN_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

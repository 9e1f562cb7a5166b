//! `jumpvpn`, the command-line binary of Jumping VPN (SPEC §9).
//!
//! `main` parses the command line ([`cli`]), runs one command and turns its outcome into the
//! documented exit code: 0 success, 1 a check found violations, 2 usage or configuration error.
//! Errors are printed once, here, as `jumpvpn: <what went wrong>`.

mod audit_cmd;
mod cli;
mod keys;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{AuditCommand, Cli, Command};

fn main() -> ExitCode {
    // Usage errors (and --help, --version) are handled by clap, which exits 2 (or 0) itself.
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
        Command::Audit(AuditCommand::Verify(args)) => audit_cmd::verify(args),
        Command::Audit(AuditCommand::Timeline(args)) => audit_cmd::timeline(args),
    };
    match outcome {
        Ok(status) => status.exit_code(),
        Err(error) => {
            // `{:#}` prints the chain on one line: "cannot open FILE: No such file …".
            eprintln!("jumpvpn: {error:#}");
            ExitCode::from(2)
        }
    }
}

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

//! `jumpvpn`, the command-line binary of Jumping VPN (SPEC §9).
//!
//! `main` parses the command line ([`cli`]), runs one command and turns its outcome into the
//! documented exit code: 0 success, 1 a check found violations, 2 usage or configuration error.
//! Errors are printed once, here, as `jumpvpn: <what went wrong>`.

use std::process::ExitCode;

use clap::Parser;

use jumpvpn::cli::{AuditCommand, Cli, Command};
use jumpvpn::{audit_cmd, client, debug_cmd, demo, gateway, keys, status};

fn main() -> ExitCode {
    // Usage errors (and --help, --version) are handled by clap, which exits 2 (or 0) itself.
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
        Command::Gateway(args) => gateway::run(args),
        Command::Client(args) => client::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Status(args) => status::run(args),
        Command::Debug(command) => debug_cmd::run(command),
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

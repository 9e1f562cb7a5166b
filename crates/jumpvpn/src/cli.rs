//! The command line of SPEC §9, as clap types. Only the parsing lives here; the commands are
//! in their own modules.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Shown under every `--help`.
const EXIT_CODES: &str = "\
Exit codes: 0 success, 1 a check found violations, 2 usage or configuration error.
Errors are printed to stderr as `jumpvpn: <what went wrong>`.";

/// Jumping VPN: a VPN whose identity is a session, not a socket.
#[derive(Debug, Parser)]
#[command(name = "jumpvpn", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a new private key (X25519, base64), as `wg genkey` does.
    Genkey,
    /// Read a private key on standard input and print its public key, as `wg pubkey` does.
    Pubkey,
    /// Run a gateway in the foreground; SIGTERM drains its sessions, then exits.
    Gateway(ConfigArgs),
    /// Run a client in the foreground.
    Client(ConfigArgs),
    /// A self-contained local demonstration: two network namespaces, a gateway and a client,
    /// and three path changes under a live ping and TCP stream (needs root).
    Demo(DemoArgs),
    /// Print the sessions of a gateway as a table.
    Status(AdminArgs),
    /// Instruments for the demo and the end-to-end tests.
    #[command(subcommand, hide = true)]
    Debug(crate::debug_cmd::DebugCommand),
    /// Check and read audit streams (the JSONL files that gateways write, one per node).
    #[command(subcommand, after_help = EXIT_CODES)]
    Audit(AuditCommand),
}

/// `jumpvpn audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit invariants over the merged streams of all nodes.
    #[command(
        long_about = "\
Verify the invariants of the audit stream (SPEC §8) over the merged streams of all nodes.

The streams are merged by timestamp. The clocks of the nodes may disagree, so each session's
STATE_CHANGE events are checked in version order. Checked, per session:
  1. versions 1, 2, 3, ... with none committed twice (a fork: dual-active) and none missing
     unless an AUDIT_GAP accounts for it; one committing node per owner epoch
  2. owner_epoch never decreases
  3. ownership changes only by MIGRATION, DRAIN or FAILOVER, and bumps the epoch by 1
  4. nothing is accepted after the session terminated
  5. a rejection never changes the version
  6. ATTACHED has exactly one binding, RECOVERING none
and that every transition is one SPEC §3 allows. Lines that are not well-formed events are
reported too, and checking goes on past them.

Each violation is printed to stdout as soon as it is found, one line each:
  FILE:LINE: session ID version N invariant K (name): what is wrong
A summary goes to stderr at the end. Files are read line by line, never whole.",
        after_help = EXIT_CODES
    )]
    Verify(VerifyArgs),

    /// Print one session's life, in version order, across nodes.
    #[command(
        long_about = "\
Print one session's life, in version order, across nodes.

Every event of the session found in the files is printed as one row, sorted by state_version,
then ts_ms, then file (in the order given) and line: version, owner epoch, timestamp, node,
event type, reason code, a short detail, and where it was read (FILE:LINE). Lines that are
not well-formed events are skipped; `jumpvpn audit verify` reports them.

Exits 1 when no event of the session is found.",
        after_help = EXIT_CODES
    )]
    Timeline(TimelineArgs),
}

/// Arguments of `jumpvpn audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Audit streams (JSONL), typically one per node.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// Arguments of `jumpvpn audit timeline`.
#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// The session: 32 lowercase hex characters.
    // Kept as text and parsed by the command, so that a bad ID is reported in the
    // `jumpvpn: …` form of every other error rather than clap's.
    #[arg(value_name = "SESSION_ID")]
    pub session: String,

    /// Audit streams (JSONL) to search, typically one per node.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// Arguments of `jumpvpn gateway` and `jumpvpn client`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file (TOML, SPEC §9).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of the commands that talk to a gateway's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The gateway's admin API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:51900")]
    pub admin: String,
}

/// Arguments of `jumpvpn demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's directory (configurations, keys, audit logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

//! `jumpvpn status [--admin URL]`: the sessions of a gateway as a table, read from its admin
//! API (`GET /v1/sessions`).
//!
//! Columns: SESSION (32 hex characters), STATE, VERSION, EPOCH (owner epoch), OWNER, PROTO and
//! CLIENT (of the binding), TUNNEL_IP and AGE (since birth, e.g. `5m12s`), aligned with two
//! spaces between columns, numbers to the right.
//!
//! A session without a binding shows `-` for PROTO and CLIENT; a frozen one shows its state
//! as `ATTACHED*`. Quiet otherwise: an empty gateway prints the header alone.

use std::io::Write as _;

use crate::admin::{SessionList, SessionView};
use crate::admin_client::AdminClient;
use crate::audit_log::now_ms;
use crate::cli::AdminArgs;
use crate::Status;

/// Runs `jumpvpn status`.
pub fn run(args: &AdminArgs) -> anyhow::Result<Status> {
    let list = fetch(&AdminClient::new(&args.admin)?)?;
    let table = render_table(&list.sessions, now_ms());
    let mut out = std::io::stdout().lock();
    match out.write_all(table.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(error).context("cannot write to stdout"))
        }
        _ => Ok(Status::Success),
    }
}

/// The sessions of the gateway behind `client`.
pub fn fetch(client: &AdminClient) -> anyhow::Result<SessionList> {
    // No added context: the client's errors already read "cannot reach admin API at URL: …"
    // or "admin API at URL answered 503 for /v1/sessions: …".
    client.get_json("/v1/sessions")
}

/// The table `jumpvpn status` prints: a header and one aligned row per session, ages counted
/// to `now_ms`.
pub fn render_table(sessions: &[SessionView], now_ms: u64) -> String {
    const HEADER: [&str; 9] = [
        "SESSION",
        "STATE",
        "VERSION",
        "EPOCH",
        "OWNER",
        "PROTO",
        "CLIENT",
        "TUNNEL_IP",
        "AGE",
    ];
    // Numbers are right-aligned, text left-aligned.
    const RIGHT: [bool; 9] = [false, false, true, true, false, false, false, false, true];
    let rows: Vec<[String; 9]> = sessions
        .iter()
        .map(|s| {
            let state = if s.frozen {
                format!("{}*", s.state)
            } else {
                s.state.to_string()
            };
            [
                s.session_id.to_string(),
                state,
                s.state_version.to_string(),
                s.owner_epoch.to_string(),
                s.owner.to_string(),
                s.binding
                    .map_or_else(|| "-".to_owned(), |b| b.proto.to_string()),
                s.binding
                    .map_or_else(|| "-".to_owned(), |b| b.client_addr.to_string()),
                s.tunnel_ip.to_string(),
                age(now_ms.saturating_sub(s.created_ms)),
            ]
        })
        .collect();
    crate::table::render(HEADER, RIGHT, &rows)
}

/// `42s`, `5m12s`, `3h04m`, `2d07h`: two units at most.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if d > 0 {
        format!("{d}d{:02}h", h % 24)
    } else if h > 0 {
        format!("{h}h{:02}m", m % 60)
    } else if m > 0 {
        format!("{m}m{:02}s", s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_two_units_at_most() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(312_000), "5m12s");
        assert_eq!(age(3 * 3_600_000 + 4 * 60_000 + 5_000), "3h04m");
        assert_eq!(age(2 * 86_400_000 + 7 * 3_600_000), "2d07h");
    }
}

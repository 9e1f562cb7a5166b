//! `jumpvpn audit verify` and `jumpvpn audit timeline`: the driver side of the audit checker.
//!
//! The rules live in `jumpvpn_core::audit::check`; this module opens the files, feeds their
//! lines (as bytes, one at a time: a file is never read whole, and a line that is not UTF-8 is
//! just a malformed event) and prints what comes back.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use jumpvpn_core::audit::check::{self, Checker, Source};
use jumpvpn_core::{AuditEvent, EventKind, NodeId, SessionId, TransportId};

use crate::cli::{TimelineArgs, VerifyArgs};
use crate::Status;

/// The longest line read whole. A longer one is cut there (and so reported as malformed) and
/// the rest of it skipped, so one runaway line cannot exhaust memory. Real events are a few
/// hundred bytes.
const MAX_LINE: u64 = 1 << 20;

/// `jumpvpn audit verify FILE...`: prints each violation to stdout as it is found and a summary
/// to stderr; [`Status::Findings`] when there is any violation.
pub fn verify(args: &VerifyArgs) -> Result<Status> {
    // Open every file before checking any, so that a bad argument fails before any output.
    let sources = args
        .files
        .iter()
        .map(|path| {
            let lines = open(path)?;
            Ok(Source {
                name: path.display().to_string(),
                lines,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut out = io::stdout().lock();
    let mut write_failed: Option<io::Error> = None;
    let summary = check::verify(sources, |violation| {
        // The checker cannot be stopped from the sink: after a failed write, keep checking
        // (the exit code still depends on the violations) but stop printing.
        if write_failed.is_none() {
            if let Err(error) = writeln!(out, "{violation}") {
                write_failed = Some(error);
            }
        }
    })
    .map_err(|e| anyhow::Error::new(e.error).context(format!("cannot read {}", e.name)))?;
    let flushed = out.flush();
    if let Some(error) = write_failed.or(flushed.err()) {
        // A closed pipe (`… | head`) means the reader has seen enough; anything else is real.
        if error.kind() != io::ErrorKind::BrokenPipe {
            return Err(anyhow::Error::new(error).context("cannot write to stdout"));
        }
    }

    let mut line = format!(
        "audit verify: {} events, {} sessions, {} violations",
        summary.events, summary.sessions, summary.violations
    );
    if summary.dropped > 0 {
        // Writing to a String cannot fail.
        let _ = write!(line, ", {} dropped (AUDIT_GAP)", summary.dropped);
    }
    eprintln!("{line}");
    Ok(if summary.violations > 0 {
        Status::Findings
    } else {
        Status::Success
    })
}

/// `jumpvpn audit timeline SESSION_ID FILE...`: prints every event of one session as a table,
/// in version order; [`Status::Findings`] when there is none.
pub fn timeline(args: &TimelineArgs) -> Result<Status> {
    let session: SessionId = args.session.parse()?;
    let files = args
        .files
        .iter()
        .map(|path| Ok((path.as_path(), open(path)?)))
        .collect::<Result<Vec<_>>>()?;

    // The cheap parse of the checker picks out the session's lines; only those are parsed into
    // full events. A line is skipped if either parse fails: `verify` is where they are reported.
    let mut checker = Checker::new();
    let mut found: Vec<Found> = Vec::new();
    let mut skipped: u64 = 0;
    for (file, (path, lines)) in files.into_iter().enumerate() {
        for (index, line) in (1u64..).zip(lines) {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match checker.parse(text) {
                Ok(event) if event.session == Some(session) => {
                    match serde_json::from_slice::<AuditEvent>(text) {
                        Ok(event) => found.push(Found {
                            event,
                            file,
                            path,
                            line: index,
                        }),
                        Err(_) => skipped += 1,
                    }
                }
                Ok(_) => {}
                Err(_) => skipped += 1,
            }
        }
    }

    if skipped > 0 {
        let s = if skipped == 1 { "" } else { "s" };
        eprintln!(
            "audit timeline: {skipped} malformed line{s} skipped (see `jumpvpn audit verify`)"
        );
    }
    if found.is_empty() {
        let names: Vec<String> = args.files.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "jumpvpn: no events for session {session} in {}",
            names.join(", ")
        );
        return Ok(Status::Findings);
    }
    found.sort_by_key(|f| (f.event.state_version, f.event.ts_ms, f.file, f.line));

    let table = render_table(&found);
    let mut out = io::stdout().lock();
    match out.write_all(table.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(error).context("cannot write to stdout"))
        }
        _ => Ok(Status::Success),
    }
}

/// One event of the session, and where it was read.
struct Found<'a> {
    event: AuditEvent,
    /// Index of its file in the order given, for sorting.
    file: usize,
    path: &'a Path,
    line: u64,
}

/// The header and one aligned row per event.
fn render_table(found: &[Found<'_>]) -> String {
    const HEADER: [&str; 8] = [
        "VERSION", "EPOCH", "TS_MS", "NODE", "EVENT", "REASON", "DETAIL", "AT",
    ];
    // Numbers are right-aligned, text left-aligned.
    const RIGHT: [bool; 8] = [true, true, true, false, false, false, false, false];
    let rows: Vec<[String; 8]> = found
        .iter()
        .map(|f| {
            let e = &f.event;
            [
                e.state_version.to_string(),
                e.owner_epoch.to_string(),
                e.ts_ms.to_string(),
                e.node_id.to_string(),
                e.kind.event_type().to_owned(),
                e.reason_code.to_string(),
                detail(&e.kind),
                format!("{}:{}", f.path.display(), f.line),
            ]
        })
        .collect();
    crate::table::render(HEADER, RIGHT, &rows)
}

/// A short description of what the event says beyond its common fields.
fn detail(kind: &EventKind) -> String {
    let transport =
        |id: Option<TransportId>| id.map_or_else(|| "none".to_owned(), |t| t.to_string());
    let node = |n: &Option<NodeId>| n.as_ref().map_or_else(|| "-".to_owned(), NodeId::to_string);
    match kind {
        EventKind::SessionCreated {
            new_state,
            transport_id,
            proto,
        } => {
            format!("{new_state}, transport {transport_id} {proto}")
        }
        EventKind::StateChange {
            previous_state,
            new_state,
            transport_id,
        } => {
            format!(
                "{previous_state} -> {new_state}, transport {}",
                transport(*transport_id)
            )
        }
        EventKind::TransportSwitch {
            old_transport_id,
            new_transport_id,
            proto,
            switch_latency_ms,
        } => format!(
            "transport {} -> {new_transport_id} {proto}, {switch_latency_ms} ms",
            transport(*old_transport_id)
        ),
        EventKind::ReattachRejected { retryable } => format!("retryable={retryable}"),
        EventKind::EventRejected { event, retryable } => format!("{event}, retryable={retryable}"),
        EventKind::SecurityEvent { violation_type } => violation_type.to_string(),
        EventKind::PolicyEvent {
            policy_name,
            threshold_value,
            observed_value,
        } => {
            format!("{policy_name} threshold {threshold_value} observed {observed_value}")
        }
        EventKind::TerminationEvent {
            total_lifetime_ms,
            total_switches,
        } => {
            format!("lifetime {total_lifetime_ms} ms, {total_switches} switches")
        }
        EventKind::SessionOwnerAcquired {
            previous_owner,
            new_owner,
        }
        | EventKind::SessionOwnerTransferred {
            previous_owner,
            new_owner,
        }
        | EventKind::SessionOwnerRejected {
            previous_owner,
            new_owner,
        }
        | EventKind::SessionOwnerConflict {
            previous_owner,
            new_owner,
        }
        | EventKind::SessionFrozen {
            previous_owner,
            new_owner,
        }
        | EventKind::SessionResumed {
            previous_owner,
            new_owner,
        } => {
            format!("owner {} -> {}", node(previous_owner), node(new_owner))
        }
        EventKind::AuditGap { dropped } => format!("{dropped} events dropped"),
    }
}

/// Opens `path` for reading line by line.
fn open(path: &Path) -> Result<Lines> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Lines {
        reader: BufReader::new(file),
    })
}

/// The lines of a file, as bytes without their line ending, read one at a time with
/// `read_until` (a line that is not UTF-8 is still a line: the checker reports it).
struct Lines {
    reader: BufReader<File>,
}

impl Iterator for Lines {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => None,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                } else if u64::try_from(line.len()).is_ok_and(|n| n >= MAX_LINE) {
                    // Cut at MAX_LINE: drop the rest of this line, keep what was read.
                    if let Err(error) = self.reader.skip_until(b'\n') {
                        return Some(Err(error));
                    }
                }
                Some(Ok(line))
            }
            Err(error) => Some(Err(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_strip_endings_keep_invalid_utf8_and_cut_runaway_lines() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("a.jsonl");
        let long = usize::try_from(MAX_LINE).expect("1 MiB fits in usize") + 10;
        let mut bytes = b"first\r\n\xff\xfe\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', long));
        bytes.extend_from_slice(b"\nlast");
        std::fs::write(&path, bytes).expect("the temporary directory is writable");

        let lines: Vec<Vec<u8>> = open(&path)
            .expect("opens")
            .collect::<io::Result<_>>()
            .expect("reads");
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], b"first");
        assert_eq!(lines[1], b"\xff\xfe");
        assert_eq!(lines[2].len() as u64, MAX_LINE, "cut at the limit");
        assert_eq!(lines[3], b"last", "the line after a cut one is intact");
    }
}

//! `jumpvpn audit verify` and `jumpvpn audit timeline`, run as a process on files in a
//! temporary directory: exit codes, stdout and stderr as SPEC §9 describes them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    AuditEvent, Candidate, NodeId, Policy, Proto, ReasonCode, SessionId, SessionRecord, Timestamp,
    TransportId,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Runs `jumpvpn` with `args`.
fn jumpvpn<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(args)
        .output()
        .expect("the jumpvpn binary runs")
}

/// `jumpvpn audit <command> <extra>... <files>...`
fn audit(command: &str, extra: &[&str], files: &[&Path]) -> Output {
    let mut args: Vec<std::ffi::OsString> = vec!["audit".into(), command.into()];
    args.extend(extra.iter().map(Into::into));
    args.extend(files.iter().map(|f| f.as_os_str().to_owned()));
    jumpvpn(args)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn code(output: &Output) -> Option<i32> {
    output.status.code()
}

/// Writes `lines` (each followed by a newline) to `dir/name`.
fn write_lines(dir: &Path, name: &str, lines: &[Vec<u8>]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
    }
    std::fs::write(&path, bytes).expect("the temporary directory is writable");
    path
}

fn text_lines(lines: &[String]) -> Vec<Vec<u8>> {
    lines.iter().map(|l| l.clone().into_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Streams from the real state machine
// ---------------------------------------------------------------------------------------------

const T0: u64 = 1_700_000_000_000;

/// Applies events with the core state machine and files each audit event under its node.
#[derive(Default)]
struct Cluster {
    streams: BTreeMap<String, Vec<AuditEvent>>,
}

impl Cluster {
    fn step(&mut self, record: &mut SessionRecord, event: SessionEvent, now: u64, node: &str) {
        let node = NodeId::new(node);
        let ctx = Context {
            now: Timestamp(now),
            node: &node,
        };
        let events = match apply(record, &event, &ctx) {
            Outcome::Commit(commit) => {
                *record = commit.record;
                commit.events
            }
            Outcome::Reject(rejection) => rejection.events,
            Outcome::Unchanged => Vec::new(),
        };
        for e in events {
            self.streams
                .entry(e.node_id.to_string())
                .or_default()
                .push(e);
        }
    }

    /// `node`'s stream as JSONL lines, its clock shifted by `skew_ms`.
    fn lines(&self, node: &str, skew_ms: i64) -> Vec<String> {
        let events = self
            .streams
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or_default();
        events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.ts_ms = e.ts_ms.saturating_add_signed(skew_ms);
                e.to_json_line()
            })
            .collect()
    }
}

const SESSION_A: u128 = 0x0a0a_0a0a_0a0a_0a0a_0a0a_0a0a_0a0a_0a0a;
const SESSION_B: u128 = 0x0b0b_0b0b_0b0b_0b0b_0b0b_0b0b_0b0b_0b0b;

fn id(bits: u128) -> String {
    SessionId::from_u128(bits).to_string()
}

fn born(bits: u128, node: &str, now: u64) -> SessionRecord {
    SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(bits),
            owner: NodeId::new(node),
            client_key: [9; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            policy: Policy::default().into(),
            secrets: SealedSecret(vec![1, 2, 3].into()),
        },
        Timestamp(now),
    )
}

fn candidate(transport: u64) -> Candidate {
    Candidate {
        transport_id: TransportId(transport),
        proto: Proto::Udp,
        client_addr: SocketAddr::from(([198, 51, 100, 7], 40_000)),
        gateway_addr: SocketAddr::from(([192, 0, 2, 1], 51_820)),
    }
}

fn reattach(record: &SessionRecord, nonce: u64, transport: u64) -> SessionEvent {
    SessionEvent::Reattach(ReattachAttempt {
        nonce,
        known_version: record.state_version,
        candidate: candidate(transport),
        proof: ProofVerdict::Valid,
    })
}

/// Session A born on gw1, reattached, a replay refused, migrated to gw2 and reattached there,
/// then terminated; session B lives on gw2. gw1's stream also reports an `AUDIT_GAP` of 2
/// events that were lost (none of them a version of A or B).
fn two_nodes() -> Cluster {
    let mut c = Cluster::default();
    let mut a = born(SESSION_A, "gw1", T0);
    c.step(
        &mut a,
        SessionEvent::HandshakeOk {
            candidate: candidate(1),
        },
        T0,
        "gw1",
    );
    let again = reattach(&a, 1, 2);
    c.step(&mut a, again.clone(), T0 + 1_000, "gw1");
    c.step(&mut a, again, T0 + 2_000, "gw1"); // Replayed nonce: REPLAY_DETECTED.
    let freeze = SessionEvent::Freeze {
        reason: ReasonCode::Migration,
    };
    c.step(&mut a, freeze, T0 + 3_000, "gw1");
    let to_gw2 = SessionEvent::Transfer {
        to: NodeId::new("gw2"),
        reason: ReasonCode::Migration,
    };
    c.step(&mut a, to_gw2, T0 + 3_010, "gw1");
    c.streams
        .entry("gw1".to_owned())
        .or_default()
        .push(AuditEvent::gap(T0 + 3_100, NodeId::new("gw1"), 2));
    let event = reattach(&a, 2, 3);
    c.step(&mut a, event, T0 + 3_200, "gw2");
    c.step(&mut a, SessionEvent::TransportDead, T0 + 15_000, "gw2");
    let event = reattach(&a, 3, 4);
    c.step(&mut a, event, T0 + 16_000, "gw2");
    let end = SessionEvent::Terminate {
        reason: ReasonCode::PolicyTermination,
    };
    c.step(&mut a, end, T0 + 20_000, "gw2");

    let mut b = born(SESSION_B, "gw2", T0 + 500);
    c.step(
        &mut b,
        SessionEvent::HandshakeOk {
            candidate: candidate(10),
        },
        T0 + 500,
        "gw2",
    );
    c
}

// ---------------------------------------------------------------------------------------------
// audit verify
// ---------------------------------------------------------------------------------------------

#[test]
fn verify_of_valid_two_node_streams_exits_0_with_no_stdout() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let c = two_nodes();
    let gw1 = write_lines(dir.path(), "gw1.jsonl", &text_lines(&c.lines("gw1", 0)));
    // gw2's clock lags by 5 s: the merge sees its versions before gw1's.
    let gw2 = write_lines(
        dir.path(),
        "gw2.jsonl",
        &text_lines(&c.lines("gw2", -5_000)),
    );
    for files in [[&gw1, &gw2], [&gw2, &gw1]] {
        let out = audit("verify", &[], &files.map(PathBuf::as_path));
        assert_eq!(
            code(&out),
            Some(0),
            "stdout:\n{}stderr:\n{}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(stdout(&out), "");
        let events = c.streams.values().map(Vec::len).sum::<usize>();
        let summary = format!(
            "audit verify: {events} events, 2 sessions, 0 violations, 2 dropped (AUDIT_GAP)\n"
        );
        assert_eq!(stderr(&out), summary);
    }
}

/// Session A: created, then a rejection at a version never committed (line 3), RECOVERING
/// with a binding (line 4) and a version skipped (4 after 2, line 5).
fn violating_lines(session: &str) -> Vec<String> {
    [
        json!({"ts_ms": T0, "node_id": "gw1", "event_type": "STATE_CHANGE",
               "session_id": session, "state_version": 1, "owner_epoch": 1,
               "reason_code": "HANDSHAKE_OK",
               "previous_state": "BIRTH", "new_state": "ATTACHED", "transport_id": 1}),
        json!({"ts_ms": T0, "node_id": "gw1", "event_type": "SESSION_CREATED",
               "session_id": session, "state_version": 1, "owner_epoch": 1,
               "reason_code": "HANDSHAKE_OK",
               "new_state": "ATTACHED", "transport_id": 1, "proto": "udp"}),
        json!({"ts_ms": T0 + 5, "node_id": "gw1", "event_type": "REATTACH_REJECTED",
               "session_id": session, "state_version": 7, "owner_epoch": 1,
               "reason_code": "REPLAY_DETECTED",
               "retryable": false}),
        json!({"ts_ms": T0 + 10, "node_id": "gw1", "event_type": "STATE_CHANGE",
               "session_id": session, "state_version": 2, "owner_epoch": 1,
               "reason_code": "RECOVERY_START",
               "previous_state": "ATTACHED", "new_state": "RECOVERING", "transport_id": 1}),
        json!({"ts_ms": T0 + 20, "node_id": "gw1", "event_type": "STATE_CHANGE",
               "session_id": session, "state_version": 4, "owner_epoch": 1,
               "reason_code": "TRANSPORT_SWITCH_OK",
               "previous_state": "RECOVERING", "new_state": "ATTACHED", "transport_id": 2}),
    ]
    .iter()
    .map(|event| event.to_string())
    .collect()
}

#[test]
fn verify_of_violating_stream_exits_1_with_one_stdout_line_per_violation() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let session = id(SESSION_A);
    let file = write_lines(
        dir.path(),
        "bad.jsonl",
        &text_lines(&violating_lines(&session)),
    );
    let out = audit("verify", &[], &[&file]);
    assert_eq!(code(&out), Some(1), "stderr:\n{}", stderr(&out));
    let stdout = stdout(&out);
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    let name = file.display().to_string();
    let expected = [
        (3, 7, "invariant 5 (rejections)"),
        (4, 2, "invariant 6 (bindings)"),
        (5, 3, "invariant 1 (versions)"),
    ];
    assert_eq!(lines.len(), expected.len(), "{stdout}");
    for (line, (at, version, invariant)) in lines.iter().zip(expected) {
        let start = format!("{name}:{at}: session {session} version {version} {invariant}: ");
        assert!(
            line.starts_with(&start),
            "{line:?} does not start with {start:?}"
        );
    }
    assert!(stderr(&out).contains(", 3 violations"), "{}", stderr(&out));
}

#[test]
fn verify_of_missing_file_exits_2_naming_it_before_any_output() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let session = id(SESSION_A);
    let bad = write_lines(
        dir.path(),
        "bad.jsonl",
        &text_lines(&violating_lines(&session)),
    );
    let missing = dir.path().join("no-such-file.jsonl");
    let out = audit("verify", &[], &[&bad, &missing]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    let expected = format!("jumpvpn: cannot open {}: ", missing.display());
    assert!(err.starts_with(&expected), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert_eq!(
        stdout(&out),
        "",
        "nothing is checked when a file cannot be opened"
    );
}

#[test]
fn verify_without_a_file_is_a_usage_error() {
    let out = jumpvpn(["audit", "verify"]);
    assert_eq!(code(&out), Some(2));
    assert!(stderr(&out).contains("FILE"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}

#[test]
fn verify_reports_a_non_utf8_line_as_malformed_and_checks_the_rest() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let c = two_nodes();
    let mut gw1 = text_lines(&c.lines("gw1", 0));
    gw1.insert(2, b"{\"ts_ms\":1,\"node_id\":\"gw\xff\xfe1\"}".to_vec());
    // The last line repeats gw2's version 6 as if gw1 had committed it: a fork, still found.
    // (gw2's file is given first, so of the two copies with the same ts_ms, gw2's comes first.)
    let gw2 = c.lines("gw2", 0);
    let fork = gw2
        .iter()
        .find(|l| l.contains("\"state_version\":6") && l.contains("STATE_CHANGE"))
        .expect("gw2 commits version 6")
        .replace("\"gw2\"", "\"gw1\"");
    gw1.push(fork.into_bytes());
    let gw1_path = write_lines(dir.path(), "gw1.jsonl", &gw1);
    let gw2_path = write_lines(dir.path(), "gw2.jsonl", &text_lines(&gw2));
    let out = audit("verify", &[], &[&gw2_path, &gw1_path]);
    assert_eq!(code(&out), Some(1), "stderr:\n{}", stderr(&out));
    let stdout = stdout(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    let name = gw1_path.display().to_string();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("{name}:3: malformed event: ")),
        "{}",
        lines[0]
    );
    let fork_at = format!(
        "{name}:{}: session {} version 6 invariant 1",
        gw1.len(),
        id(SESSION_A)
    );
    assert!(
        lines[1].starts_with(&fork_at),
        "{} does not start with {fork_at}",
        lines[1]
    );
}

#[test]
fn verify_help_explains_the_invariants_and_exit_codes() {
    let out = jumpvpn(["audit", "verify", "--help"]);
    assert_eq!(code(&out), Some(0));
    let help = stdout(&out);
    for needle in [
        "AUDIT_GAP",
        "dual-active",
        "RECOVERING",
        "Exit codes: 0 success, 1",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle:?}:\n{help}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// audit timeline
// ---------------------------------------------------------------------------------------------

/// The versions (first column) and the rows of a timeline's stdout, header excluded.
fn timeline_rows(stdout: &str) -> Vec<(u64, String)> {
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("VERSION"), "no header: {stdout}");
    lines
        .map(|row| {
            let version = row.split_whitespace().next().and_then(|v| v.parse().ok());
            (
                version.unwrap_or_else(|| panic!("row without a version: {row:?}")),
                row.to_owned(),
            )
        })
        .collect()
}

#[test]
fn timeline_prints_the_session_across_both_files_in_version_order() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let c = two_nodes();
    let gw1 = write_lines(dir.path(), "gw1.jsonl", &text_lines(&c.lines("gw1", 0)));
    let mut gw2_lines = text_lines(&c.lines("gw2", -5_000));
    gw2_lines.insert(1, b"not an event".to_vec()); // Skipped, not fatal.
    let gw2 = write_lines(dir.path(), "gw2.jsonl", &gw2_lines);
    let session = id(SESSION_A);
    // gw2 first, and its clock behind: only sorting by version gets the order right.
    let out = audit("timeline", &[session.as_str()], &[&gw2, &gw1]);
    assert_eq!(code(&out), Some(0), "stderr:\n{}", stderr(&out));
    let rows = timeline_rows(&stdout(&out));
    let versions: Vec<u64> = rows.iter().map(|(v, _)| *v).collect();
    let mut sorted = versions.clone();
    sorted.sort();
    assert_eq!(versions, sorted, "{}", stdout(&out));
    let mut distinct = versions.clone();
    distinct.dedup();
    assert_eq!(distinct, (1..=8).collect::<Vec<u64>>(), "{}", stdout(&out));
    let expected_rows = c
        .streams
        .values()
        .flatten()
        .filter(|e| e.session_id == Some(SessionId::from_u128(SESSION_A)))
        .count();
    assert_eq!(rows.len(), expected_rows);
    // Both nodes appear, each row says where it was read, and session B is left out.
    let text = stdout(&out);
    assert!(text.contains(" gw1 ") && text.contains(" gw2 "), "{text}");
    assert!(rows
        .iter()
        .all(|(_, row)| row.contains("gw1.jsonl:") || row.contains("gw2.jsonl:")));
    assert!(!text.contains(&id(SESSION_B)));
    // Details: the migration and the refused replay.
    assert!(text.contains("SESSION_OWNER_TRANSFERRED") && text.contains("owner gw1 -> gw2"));
    assert!(text.contains("REATTACH_REJECTED") && text.contains("retryable=false"));
    assert!(text.contains("ATTACHED -> RECOVERING"), "{text}");
    assert!(
        stderr(&out).contains("1 malformed line skipped"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn timeline_of_unknown_session_exits_1() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gw1 = write_lines(
        dir.path(),
        "gw1.jsonl",
        &text_lines(&two_nodes().lines("gw1", 0)),
    );
    let unknown = "00000000000000000000000000000001";
    let out = audit("timeline", &[unknown], &[&gw1]);
    assert_eq!(code(&out), Some(1));
    assert_eq!(stdout(&out), "");
    let expected = format!(
        "jumpvpn: no events for session {unknown} in {}\n",
        gw1.display()
    );
    assert_eq!(stderr(&out), expected);
}

#[test]
fn timeline_with_invalid_session_id_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gw1 = write_lines(
        dir.path(),
        "gw1.jsonl",
        &text_lines(&two_nodes().lines("gw1", 0)),
    );
    let out = audit("timeline", &["NOT-A-SESSION"], &[&gw1]);
    assert_eq!(code(&out), Some(2));
    let err = stderr(&out);
    assert!(
        err.starts_with("jumpvpn: invalid session id \"NOT-A-SESSION\""),
        "{err:?}"
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn timeline_of_missing_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("gone.jsonl");
    let out = audit("timeline", &[id(SESSION_A).as_str()], &[&missing]);
    assert_eq!(code(&out), Some(2));
    let expected = format!("jumpvpn: cannot open {}: ", missing.display());
    assert!(stderr(&out).starts_with(&expected), "{}", stderr(&out));
}

//! The audit writer (SPEC §8): events reach the file in order, a full queue drops and counts
//! without blocking and reports the loss with an exact `AUDIT_GAP`, the result passes the audit
//! checker, and closing flushes everything.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use jumpvpn::audit_log::AuditLog;
use jumpvpn_core::audit::check::{verify, Source, Summary};
use jumpvpn_core::machine::{apply, Context, Outcome, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    AuditEvent, Candidate, EventKind, NodeId, Policy, Proto, ReasonCode, SessionId, SessionRecord,
    Timestamp, TransportId,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn node() -> NodeId {
    NodeId::new("gw1")
}

/// A real session life from the state machine: handshake, then `freezes` freeze/unfreeze
/// pairs (two versions each), then an operator's termination. Returns every audit event in the
/// order the gateway would emit them.
fn session_life(freezes: usize) -> Vec<AuditEvent> {
    let node = node();
    let record = SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(0x00c0_ffee),
            owner: node.clone(),
            client_key: [7; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            policy: Policy::default().into(),
            secrets: SealedSecret::new(vec![0xAA; 48]),
        },
        T0,
    );
    let mut events = Vec::new();
    let mut now = T0;
    let mut step = |record: &SessionRecord, event: SessionEvent, now: Timestamp| match apply(
        record,
        &event,
        &Context { now, node: &node },
    ) {
        Outcome::Commit(commit) => {
            events.extend(commit.events);
            commit.record
        }
        other => panic!("{event:?} was not committed: {other:?}"),
    };
    let candidate = Candidate {
        transport_id: TransportId(1),
        proto: Proto::Udp,
        client_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000),
        gateway_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820),
    };
    let mut record = step(&record, SessionEvent::HandshakeOk { candidate }, now);
    for _ in 0..freezes {
        now = now.plus(10);
        record = step(
            &record,
            SessionEvent::Freeze {
                reason: ReasonCode::Migration,
            },
            now,
        );
        now = now.plus(10);
        record = step(&record, SessionEvent::Unfreeze, now);
    }
    now = now.plus(10);
    step(
        &record,
        SessionEvent::Terminate {
            reason: ReasonCode::PolicyTermination,
        },
        now,
    );
    events
}

/// The file's events, one per line; panics on a line that does not parse.
fn read_events(path: &Path) -> Vec<AuditEvent> {
    let text = std::fs::read_to_string(path).expect("the audit file is readable");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "last line not terminated"
    );
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

/// Runs the checker of `jumpvpn audit verify` over the file; returns its violations as text.
fn check(path: &Path) -> (Vec<String>, Summary) {
    let text = std::fs::read(path).expect("the audit file is readable");
    let lines: Vec<Vec<u8>> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let source = Source {
        name: path.display().to_string(),
        lines: lines.into_iter().map(Ok::<_, Infallible>),
    };
    let mut violations = Vec::new();
    let summary = match verify(vec![source], |v| violations.push(v.to_string())) {
        Ok(summary) => summary,
        Err(e) => match e.error {},
    };
    (violations, summary)
}

/// Waits until the file holds `lines` lines, polling with a deadline (the writer flushes when
/// its queue runs empty, so a reader sees events without a close).
fn wait_for_lines(path: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {lines} lines after 10 s",
            text.lines().count()
        );
        // Polling, not synchronising: the deadline above is what bounds the wait.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn events_are_written_in_order_and_parse_back() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(5);
    let (log, writer) = AuditLog::open(&path, node(), 1024).expect("opens");
    for event in &events {
        log.emit(event.clone());
    }
    writer.close().expect("closes cleanly");

    assert_eq!(read_events(&path), events);
    assert_eq!(log.dropped_total(), 0);
    let (violations, summary) = check(&path);
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(summary.events, events.len() as u64);
}

#[test]
fn a_reader_sees_events_before_close_because_an_idle_writer_flushes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(1);
    let (log, writer) = AuditLog::open(&path, node(), 64).expect("opens");
    for event in &events {
        log.emit(event.clone());
    }
    wait_for_lines(&path, events.len());
    assert_eq!(read_events(&path), events);
    writer.close().expect("closes cleanly");
}

#[test]
fn a_full_queue_drops_counts_and_reports_an_exact_gap_that_the_checker_accepts() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(20);
    let capacity = 8;
    let (first, rest) = events.split_at(capacity + 13);
    let (log, writer) = AuditLog::open(&path, node(), capacity).expect("opens");

    // With the writer held, only `capacity` events fit; the other 13 are dropped, and emit
    // returns at once for every one of them.
    log.pause_writer_for_test(true);
    for event in first {
        log.emit(event.clone());
    }
    assert_eq!(log.dropped_total(), 13);

    // Room again: the gap is written right after the events queued before the loss.
    log.pause_writer_for_test(false);
    wait_for_lines(&path, capacity + 1);
    // The rest in queue-sized steps, each written before the next, so none is dropped.
    let mut lines = capacity + 1;
    for chunk in rest.chunks(capacity) {
        for event in chunk {
            log.emit(event.clone());
        }
        lines += chunk.len();
        wait_for_lines(&path, lines);
    }
    writer.close().expect("closes cleanly");

    let written = read_events(&path);
    assert_eq!(written.len(), capacity + 1 + rest.len());
    assert_eq!(&written[..capacity], &first[..capacity]);
    let gap = &written[capacity];
    assert_eq!(gap.kind, EventKind::AuditGap { dropped: 13 }, "{gap:?}");
    assert_eq!(gap.node_id, node());
    assert_eq!(gap.session_id, None);
    assert_eq!(&written[capacity + 1..], rest);
    assert_eq!(log.dropped_total(), 13, "nothing lost after the gap");

    // Versions are missing from the file, and the gap accounts for them.
    let (violations, summary) = check(&path);
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(summary.dropped, 13);
}

#[test]
fn the_checker_flags_the_same_loss_without_the_gap() {
    // The control for the test above: the checker does catch the missing versions, so its
    // silence there is owed to the AUDIT_GAP.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(20);
    let mut text = String::new();
    for event in events[..8].iter().chain(&events[21..]) {
        text.push_str(&event.to_json_line());
        text.push('\n');
    }
    std::fs::write(&path, text).expect("writable");
    let (violations, _) = check(&path);
    assert!(
        violations.iter().any(|v| v.contains("missing")),
        "{violations:#?}"
    );
}

#[test]
fn close_flushes_everything_queued_even_while_the_writer_was_held() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(3);
    let (log, writer) = AuditLog::open(&path, node(), events.len()).expect("opens");
    log.pause_writer_for_test(true);
    for event in &events {
        log.emit(event.clone());
    }
    writer.close().expect("closes cleanly");
    assert_eq!(read_events(&path), events);

    // After close, events are counted as lost, not written.
    log.emit(events[0].clone());
    assert_eq!(log.dropped_total(), 1);
    assert_eq!(read_events(&path).len(), events.len());
}

#[test]
fn reopening_appends_instead_of_truncating() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(2);
    let (head, tail) = events.split_at(3);
    for part in [head, tail] {
        let (log, writer) = AuditLog::open(&path, node(), 16).expect("opens");
        for event in part {
            log.emit(event.clone());
        }
        drop(writer); // dropping flushes too
    }
    assert_eq!(read_events(&path), events);
}

#[test]
fn opening_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("no-such-dir").join("audit.jsonl");
    let error = AuditLog::open(&path, node(), 16).expect_err("the directory does not exist");
    let message = format!("{error:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn metrics_report_the_audit_writers_losses() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("audit.jsonl");
    let events = session_life(1);
    let (log, writer) = AuditLog::open(&path, node(), 1).expect("opens");
    let metrics = jumpvpn::metrics::Metrics::new(node());
    assert_eq!(metrics.audit_dropped_total(), 0);
    metrics.attach_audit_log(log.clone());
    log.pause_writer_for_test(true);
    for event in events.iter().take(4) {
        log.emit(event.clone());
    }
    assert_eq!(metrics.audit_dropped_total(), 3);
    assert!(metrics
        .render()
        .contains("\njumpvpn_audit_dropped_total{node=\"gw1\"} 3\n"));
    writer.close().expect("closes cleanly");
}

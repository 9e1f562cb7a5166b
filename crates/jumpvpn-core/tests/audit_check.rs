//! Tests of the audit checker (`audit::check`) through its public API: streams produced by the
//! real state machine pass, and each invariant of SPEC §8 is caught on a crafted stream, at the
//! exact file and line that breaks it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::audit::check::{verify, Checker, Invariant, Source, Summary, Violation};
use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    AuditEvent, Candidate, NodeId, Policy, Proto, ReasonCode, SessionId, SessionRecord, Timestamp,
    TransportId,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Runs the checker over named streams of text lines; returns every violation and the summary.
fn check_streams(streams: Vec<(&str, Vec<String>)>) -> (Vec<Violation>, Summary) {
    check_bytes(
        streams
            .into_iter()
            .map(|(name, lines)| (name, lines.into_iter().map(String::into_bytes).collect()))
            .collect(),
    )
}

/// As [`check_streams`], for lines given as raw bytes (which need not be UTF-8).
fn check_bytes(streams: Vec<(&str, Vec<Vec<u8>>)>) -> (Vec<Violation>, Summary) {
    let sources = streams
        .into_iter()
        .map(|(name, lines)| Source {
            name: name.to_owned(),
            lines: lines.into_iter().map(Ok::<_, Infallible>),
        })
        .collect();
    let mut collected = Vec::new();
    let summary = match verify(sources, |v| collected.push(v.clone())) {
        Ok(summary) => summary,
        Err(e) => match e.error {},
    };
    assert_eq!(
        summary.violations,
        collected.len() as u64,
        "summary disagrees with the sink"
    );
    (collected, summary)
}

/// One stream named `a.jsonl`.
fn check_one(lines: Vec<String>) -> Vec<Violation> {
    check_streams(vec![("a.jsonl", lines)]).0
}

/// The violations as sorted `(invariant, file, line)` triples, for exact comparison.
fn found(violations: &[Violation]) -> Vec<(Invariant, String, u64)> {
    let mut out: Vec<_> = violations
        .iter()
        .map(|v| (v.invariant, v.file.clone(), v.line))
        .collect();
    out.sort();
    out
}

fn expect(list: &[(Invariant, &str, u64)]) -> Vec<(Invariant, String, u64)> {
    let mut out: Vec<_> = list
        .iter()
        .map(|(i, f, l)| (*i, (*f).to_owned(), *l))
        .collect();
    out.sort();
    out
}

/// Asserts that the only violation is `invariant` at `a.jsonl:line`, about `version` of [`S`].
fn assert_single(violations: &[Violation], invariant: Invariant, line: u64, version: u64) {
    assert_eq!(
        found(violations),
        expect(&[(invariant, "a.jsonl", line)]),
        "{violations:#?}"
    );
    let v = &violations[0];
    assert_eq!(v.session, Some(sid(S)), "{v}");
    assert_eq!(v.version, Some(version), "{v}");
}

// ---------------------------------------------------------------------------------------------
// Hand-written events
// ---------------------------------------------------------------------------------------------

/// The session of the crafted streams.
const S: &str = "0123456789abcdef0123456789abcdef";
/// A second session.
const S2: &str = "fedcba9876543210fedcba9876543210";

fn sid(text: &str) -> SessionId {
    text.parse().expect("test session ids are well-formed")
}

/// A JSON event under construction.
struct Ev(Value);

impl Ev {
    fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0[key] = value.into();
        self
    }

    fn without(mut self, key: &str) -> Self {
        if let Some(map) = self.0.as_object_mut() {
            map.remove(key);
        }
        self
    }

    fn session(self, id: &str) -> Self {
        self.with("session_id", id)
    }

    fn line(&self) -> String {
        self.0.to_string()
    }
}

/// An event of session [`S`], from a one-line spec, so that a crafted stream reads as a table:
///
/// ```text
/// @OFFSET NODE vVERSION eEPOCH REASON FROM>TO BINDING        STATE_CHANGE (BINDING: id or -)
/// @OFFSET NODE vVERSION eEPOCH REASON SESSION_CREATED ID
/// @OFFSET NODE vVERSION eEPOCH REASON TRANSPORT_SWITCH OLD>NEW
/// @OFFSET NODE vVERSION eEPOCH REASON REATTACH_REJECTED RETRYABLE
/// @OFFSET NODE vVERSION eEPOCH REASON SESSION_OWNER_TRANSFERRED PREVIOUS>NEW
/// @OFFSET NODE vVERSION eEPOCH REASON TERMINATION_EVENT LIFETIME SWITCHES
/// @OFFSET NODE vVERSION eEPOCH REASON AUDIT_GAP DROPPED                 (no session_id)
/// @OFFSET NODE vVERSION eEPOCH REASON TYPE                  any type, required fields only
/// ```
///
/// `@OFFSET` is milliseconds after (or, negative, before) [`T0`].
fn event(spec: &str) -> Ev {
    let fields: Vec<&str> = spec.split_whitespace().collect();
    let [ts, node, version, epoch, reason, rest @ ..] = &fields[..] else {
        panic!("spec {spec:?} does not start `@OFFSET NODE vN eN REASON`");
    };
    let base = |event_type: &str| {
        Ev(json!({
            "ts_ms": T0.saturating_add_signed(number(ts, '@')),
            "node_id": node,
            "event_type": event_type,
            "session_id": S,
            "state_version": number(version, 'v'),
            "owner_epoch": number(epoch, 'e'),
            "reason_code": reason,
        }))
    };
    fn pair(text: &str) -> (&str, &str) {
        text.split_once('>')
            .unwrap_or_else(|| panic!("expected A>B, got {text:?}"))
    }
    let id = |text: &str| -> Option<u64> { text.parse().ok() };
    match rest {
        [states, binding] if states.contains('>') => {
            let (from, to) = pair(states);
            base("STATE_CHANGE")
                .with("previous_state", from)
                .with("new_state", to)
                .with("transport_id", id(binding))
        }
        ["SESSION_CREATED", transport] => base("SESSION_CREATED")
            .with("new_state", "ATTACHED")
            .with("transport_id", id(transport))
            .with("proto", "udp"),
        ["TRANSPORT_SWITCH", ids] => {
            let (old, new) = pair(ids);
            base("TRANSPORT_SWITCH")
                .with("old_transport_id", id(old))
                .with("new_transport_id", id(new))
                .with("proto", "udp")
                .with("switch_latency_ms", 5)
        }
        ["REATTACH_REJECTED", retryable] => {
            base("REATTACH_REJECTED").with("retryable", *retryable == "true")
        }
        ["SESSION_OWNER_TRANSFERRED", owners] => {
            let (previous, new) = pair(owners);
            base("SESSION_OWNER_TRANSFERRED")
                .with("previous_owner", previous)
                .with("new_owner", new)
        }
        ["TERMINATION_EVENT", lifetime, switches] => base("TERMINATION_EVENT")
            .with("total_lifetime_ms", id(lifetime))
            .with("total_switches", id(switches)),
        ["AUDIT_GAP", dropped] => base("AUDIT_GAP")
            .with("dropped", id(dropped))
            .without("session_id"),
        [event_type] => base(event_type),
        _ => panic!("spec {spec:?}: unknown event form"),
    }
}

/// The number in a spec token such as `v4`, `e2` or `@-50`.
fn number(token: &str, prefix: char) -> i64 {
    token
        .strip_prefix(prefix)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected {prefix}<number>, got {token:?}"))
}

/// The lines of a table of specs (see [`event`]).
fn lines(specs: &[&str]) -> Vec<String> {
    specs.iter().map(|spec| event(spec).line()).collect()
}

/// Checks a table of specs as one stream named `a.jsonl`.
fn check_table(specs: &[&str]) -> Vec<Violation> {
    check_one(lines(specs))
}

/// Asserts that a violation's message mentions `text`.
fn assert_mentions(violation: &Violation, text: &str) {
    assert!(
        violation.message.contains(text),
        "{violation} does not mention {text:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Streams from the real state machine
// ---------------------------------------------------------------------------------------------

const T0: u64 = 1_700_000_000_000;

/// A small cluster: applies events with the real state machine and files each audit event under
/// the node that wrote it (its `node_id`).
#[derive(Default)]
struct Cluster {
    streams: BTreeMap<String, Vec<AuditEvent>>,
    committed: u64,
    rejected: u64,
}

impl Cluster {
    /// Applies `event` to `record` on `node` at `now`; a commit replaces the record.
    fn step(&mut self, record: &mut SessionRecord, event: SessionEvent, now: u64, node: &str) {
        let node = NodeId::new(node);
        let ctx = Context {
            now: Timestamp(now),
            node: &node,
        };
        let events = match apply(record, &event, &ctx) {
            Outcome::Commit(commit) => {
                self.committed += 1;
                *record = commit.record;
                commit.events
            }
            Outcome::Reject(rejection) => {
                self.rejected += 1;
                rejection.events
            }
            Outcome::Unchanged => Vec::new(),
        };
        for e in events {
            self.streams
                .entry(e.node_id.to_string())
                .or_default()
                .push(e);
        }
    }

    /// Like [`Cluster::step`], and asserts the outcome was a commit.
    fn commit(&mut self, record: &mut SessionRecord, event: SessionEvent, now: u64, node: &str) {
        let before = self.committed;
        self.step(record, event, now, node);
        assert_eq!(
            self.committed,
            before + 1,
            "expected a commit on {node} at {now}"
        );
    }

    /// Like [`Cluster::step`], and asserts the outcome was a rejection.
    fn reject(&mut self, record: &mut SessionRecord, event: SessionEvent, now: u64, node: &str) {
        let before = self.rejected;
        self.step(record, event, now, node);
        assert_eq!(
            self.rejected,
            before + 1,
            "expected a rejection on {node} at {now}"
        );
    }

    /// Appends an `AUDIT_GAP` to `node`'s stream.
    fn gap(&mut self, node: &str, now: u64, dropped: u64) {
        let event = AuditEvent::gap(now, NodeId::new(node), dropped);
        self.streams.entry(node.to_owned()).or_default().push(event);
    }

    /// `node`'s stream as JSONL, its clock shifted by `skew_ms`.
    fn lines(&self, node: &str, skew_ms: i64) -> Vec<String> {
        self.streams
            .get(node)
            .map(|events| {
                events
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        e.ts_ms = e.ts_ms.saturating_add_signed(skew_ms);
                        e.to_json_line()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn born(id: u128, node: &str, now: u64) -> SessionRecord {
    SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(id),
            owner: NodeId::new(node),
            client_key: [7; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            policy: Policy::default().into(),
            secrets: SealedSecret(vec![1, 2, 3].into()),
        },
        Timestamp(now),
    )
}

fn candidate(transport: u64, proto: Proto) -> Candidate {
    Candidate {
        transport_id: TransportId(transport),
        proto,
        client_addr: SocketAddr::from(([198, 51, 100, 7], 40_000)),
        gateway_addr: SocketAddr::from(([192, 0, 2, 1], 51_820)),
    }
}

fn handshake(transport: u64) -> SessionEvent {
    SessionEvent::HandshakeOk {
        candidate: candidate(transport, Proto::Udp),
    }
}

fn reattach(record: &SessionRecord, nonce: u64, transport: u64, proto: Proto) -> SessionEvent {
    SessionEvent::Reattach(ReattachAttempt {
        nonce,
        known_version: record.state_version,
        candidate: candidate(transport, proto),
        proof: ProofVerdict::Valid,
    })
}

fn migration_to(node: &str) -> SessionEvent {
    SessionEvent::Transfer {
        to: NodeId::new(node),
        reason: ReasonCode::Migration,
    }
}

const FREEZE: SessionEvent = SessionEvent::Freeze {
    reason: ReasonCode::Migration,
};

/// The scenario of the brief: a session born on gw1, reattached, a replayed reattach refused,
/// migrated to gw2, reattached there, its transport lost and recovered, a second session on gw2,
/// the first terminated by policy (and a late reattach refused), plus an `AUDIT_GAP`.
fn two_node_scenario() -> Cluster {
    let mut c = Cluster::default();
    let mut a = born(0xa1, "gw1", T0);
    c.commit(&mut a, handshake(1), T0, "gw1");
    let again = reattach(&a, 1, 2, Proto::Udp);
    c.commit(&mut a, again.clone(), T0 + 1_000, "gw1");
    // The same request again: nonce 1 is no longer fresh.
    c.reject(&mut a, again, T0 + 2_000, "gw1");
    c.commit(&mut a, FREEZE, T0 + 3_000, "gw1");
    c.commit(&mut a, migration_to("gw2"), T0 + 3_010, "gw1");
    c.gap("gw1", T0 + 3_500, 0);
    let event = reattach(&a, 2, 3, Proto::Tcp);
    c.commit(&mut a, event, T0 + 3_200, "gw2");
    c.commit(&mut a, SessionEvent::TransportDead, T0 + 15_000, "gw2");
    let event = reattach(&a, 3, 4, Proto::Udp);
    c.commit(&mut a, event, T0 + 16_000, "gw2");

    let mut b = born(0xb2, "gw2", T0 + 5_000);
    c.commit(&mut b, handshake(10), T0 + 5_000, "gw2");
    let event = reattach(&b, 1, 11, Proto::Udp);
    c.commit(&mut b, event, T0 + 6_000, "gw2");

    let end = SessionEvent::Terminate {
        reason: ReasonCode::PolicyTermination,
    };
    c.commit(&mut a, end, T0 + 20_000, "gw2");
    // After the end: refused at the final version, which changes nothing.
    let event = reattach(&a, 4, 5, Proto::Udp);
    c.reject(&mut a, event, T0 + 21_000, "gw2");
    // A refusal from the former owner, which no longer owns the session.
    let event = reattach(&b, 2, 12, Proto::Udp);
    c.reject(&mut b, event, T0 + 22_000, "gw1");
    c
}

// ---------------------------------------------------------------------------------------------
// Correct streams
// ---------------------------------------------------------------------------------------------

#[test]
fn state_machine_streams_of_two_nodes_have_no_violations() {
    let c = two_node_scenario();
    let gw1 = c.lines("gw1", 0);
    let gw2 = c.lines("gw2", 0);
    assert!(
        gw1.len() >= 10 && gw2.len() >= 10,
        "the scenario writes on both nodes"
    );
    let (violations, summary) =
        check_streams(vec![("gw1.jsonl", gw1.clone()), ("gw2.jsonl", gw2.clone())]);
    assert_eq!(violations, Vec::new());
    assert_eq!(summary.events, (gw1.len() + gw2.len()) as u64);
    assert_eq!(summary.sessions, 2);
    assert_eq!(summary.violations, 0);
}

#[test]
fn state_machine_streams_pass_in_either_order_of_files() {
    let c = two_node_scenario();
    let (violations, _) = check_streams(vec![
        ("gw2.jsonl", c.lines("gw2", 0)),
        ("gw1.jsonl", c.lines("gw1", 0)),
    ]);
    assert_eq!(violations, Vec::new());
}

#[test]
fn state_machine_streams_pass_when_one_node_clock_lags_by_five_seconds() {
    let c = two_node_scenario();
    for skew in [-5_000, 5_000] {
        let (violations, _) = check_streams(vec![
            ("gw1.jsonl", c.lines("gw1", 0)),
            ("gw2.jsonl", c.lines("gw2", skew)),
        ]);
        assert_eq!(violations, Vec::new(), "gw2 skewed by {skew} ms");
        let (violations, _) = check_streams(vec![
            ("gw2.jsonl", c.lines("gw2", skew)),
            ("gw1.jsonl", c.lines("gw1", 0)),
        ]);
        assert_eq!(violations, Vec::new(), "gw2 first, skewed by {skew} ms");
    }
}

#[test]
fn migration_there_and_back_passes_when_the_new_owner_clock_lags() {
    // gw2's clock is 5 s behind, so the merge sees gw2's later versions (including a second
    // epoch change) before gw1's transfer to it. The transfer must still be recognised as
    // sitting on its own epoch change.
    let mut c = Cluster::default();
    let mut a = born(0xc3, "gw1", T0);
    c.commit(&mut a, handshake(1), T0, "gw1");
    c.commit(&mut a, FREEZE, T0 + 1_000, "gw1");
    c.commit(&mut a, migration_to("gw2"), T0 + 1_010, "gw1");
    let event = reattach(&a, 1, 2, Proto::Udp);
    c.commit(&mut a, event, T0 + 1_100, "gw2");
    c.commit(&mut a, FREEZE, T0 + 2_000, "gw2");
    c.commit(&mut a, migration_to("gw1"), T0 + 2_010, "gw2");
    let event = reattach(&a, 2, 3, Proto::Udp);
    c.commit(&mut a, event, T0 + 2_100, "gw1");
    for (first, second) in [("gw1", "gw2"), ("gw2", "gw1")] {
        let skew = |node: &str| if node == "gw2" { -5_000 } else { 0 };
        let (violations, _) = check_streams(vec![
            (first, c.lines(first, skew(first))),
            (second, c.lines(second, skew(second))),
        ]);
        assert_eq!(violations, Vec::new(), "{first} first");
    }
}

#[test]
fn failover_to_another_node_passes() {
    let mut c = Cluster::default();
    let mut a = born(0xd4, "gw1", T0);
    c.commit(&mut a, handshake(1), T0, "gw1");
    c.commit(
        &mut a,
        SessionEvent::Failover {
            to: NodeId::new("gw2"),
        },
        T0 + 9_000,
        "gw2",
    );
    let event = reattach(&a, 1, 2, Proto::Udp);
    c.commit(&mut a, event, T0 + 9_100, "gw2");
    let (violations, _) = check_streams(vec![
        ("gw1.jsonl", c.lines("gw1", 0)),
        ("gw2.jsonl", c.lines("gw2", 0)),
    ]);
    assert_eq!(violations, Vec::new());
}

// ---------------------------------------------------------------------------------------------
// Invariant 1: versions
// ---------------------------------------------------------------------------------------------

#[test]
fn version_committed_on_two_nodes_is_a_fork() {
    let gw1 = lines(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@0  gw1 v1 e1 HANDSHAKE_OK SESSION_CREATED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    let gw2 = lines(&["@20 gw2 v2 e1 TRANSPORT_SWITCH_OK ATTACHED>ATTACHED 9"]);
    let (violations, _) = check_streams(vec![("gw1.jsonl", gw1), ("gw2.jsonl", gw2)]);
    assert_eq!(
        found(&violations),
        expect(&[(Invariant::Versions, "gw2.jsonl", 1)])
    );
    assert_eq!(violations[0].version, Some(2));
    assert_mentions(&violations[0], "dual-active");
}

#[test]
fn version_committed_twice_is_caught_while_it_waits_in_the_reorder_buffer() {
    // The same node's version 3 appears twice in a second file, with timestamps before its
    // predecessors: the second copy arrives while the first still waits for versions 1 and 2.
    let a = lines(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    let b = lines(&[
        "@-50 gw1 v3 e1 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 5",
        "@-40 gw1 v3 e1 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 6",
    ]);
    let (violations, _) = check_streams(vec![("a.jsonl", a), ("b.jsonl", b)]);
    assert_eq!(
        found(&violations),
        expect(&[(Invariant::Versions, "b.jsonl", 2)])
    );
    assert_eq!(violations[0].version, Some(3));
}

#[test]
fn missing_version_without_audit_gap_is_reported_at_the_next_version() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@0  gw1 v1 e1 HANDSHAKE_OK SESSION_CREATED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
        // Version 3 never appears.
        "@30 gw1 v4 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Versions, 4, 3);
    assert_mentions(&violations[0], "missing");
}

#[test]
fn missing_version_is_excused_by_an_audit_gap() {
    let (violations, summary) = check_streams(vec![(
        "a.jsonl",
        lines(&[
            "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
            "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
            "@25 gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 1",
            "@30 gw1 v4 e1 RECOVERY_START ATTACHED>RECOVERING -",
        ]),
    )]);
    assert_eq!(violations, Vec::new());
    assert_eq!(summary.dropped, 1);
}

#[test]
fn audit_gap_excuses_no_more_versions_than_it_dropped() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@5  gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 1",
        // Versions 2 and 3 are both missing, but only one event was dropped.
        "@30 gw1 v4 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Versions, 3, 2);
}

#[test]
fn audit_gap_that_hid_a_transfer_excuses_the_epoch_change_behind_it() {
    // Version 3 (the transfer to gw2, epoch 2) was dropped from gw1's queue; gw2 then
    // reattaches at epoch 2. The gap accounts for it: no version, epoch or transition error.
    let gw1 = lines(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 MIGRATION ATTACHED>ATTACHED 1",
        "@30 gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 1",
    ]);
    let gw2 = lines(&["@40 gw2 v4 e2 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 2"]);
    let (violations, _) = check_streams(vec![("gw1.jsonl", gw1), ("gw2.jsonl", gw2)]);
    assert_eq!(violations, Vec::new());
}

/// Session [`S`] created on gw1, its version 2 (the transfer to gw2, epoch 2) never logged as a
/// `STATE_CHANGE`, then 1100 versions committed by gw2, then gw1's `SESSION_OWNER_TRANSFERRED`
/// for version 2. More versions wait for version 2 than the reorder buffer holds.
fn transfer_lost_before_a_long_run() -> Vec<String> {
    let mut specs = vec!["@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1".to_owned()];
    for v in 3..1103 {
        let ts = v * 10;
        specs.push(if v % 2 == 1 {
            format!("@{ts} gw2 v{v} e2 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED {v}")
        } else {
            format!("@{ts} gw2 v{v} e2 RECOVERY_START ATTACHED>RECOVERING -")
        });
    }
    specs.push("@20000 gw1 v2 e2 MIGRATION SESSION_OWNER_TRANSFERRED gw1>gw2".to_owned());
    specs.iter().map(|spec| event(spec).line()).collect()
}

#[test]
fn version_that_never_arrives_is_declared_missing_when_the_reorder_buffer_is_full() {
    let lines = transfer_lost_before_a_long_run();
    let transferred_at = lines.len() as u64;
    let violations = check_one(lines);
    assert_eq!(
        found(&violations),
        expect(&[
            (Invariant::Versions, "a.jsonl", 2),
            (Invariant::Ownership, "a.jsonl", transferred_at),
        ]),
        "{violations:#?}"
    );
    assert!(
        violations.iter().all(|v| v.version == Some(2)),
        "{violations:#?}"
    );
}

#[test]
fn audit_gap_excuses_a_lost_transfer_and_the_epoch_change_behind_it() {
    let mut lines = transfer_lost_before_a_long_run();
    lines.push(event("@20001 gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 1").line());
    assert_eq!(check_one(lines), Vec::new());
}

#[test]
fn two_nodes_committing_in_the_same_epoch_are_dual_active() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw2 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Versions, 2, 2);
    assert_mentions(
        &violations[0],
        "nodes gw1 and gw2 both commit in owner epoch 1",
    );
}

#[test]
fn session_created_twice_is_a_fork() {
    let violations = check_table(&[
        "@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@0 gw1 v1 e1 HANDSHAKE_OK SESSION_CREATED 1",
        "@5 gw2 v1 e1 HANDSHAKE_OK SESSION_CREATED 4",
    ]);
    assert_single(&violations, Invariant::Versions, 3, 1);
}

#[test]
fn state_change_at_version_zero_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v0 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Versions, 2, 0);
    assert_mentions(&violations[0], "versions start at 1");
}

// ---------------------------------------------------------------------------------------------
// Invariant 2: epochs
// ---------------------------------------------------------------------------------------------

#[test]
fn owner_epoch_that_decreases_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 MIGRATION ATTACHED>ATTACHED 1",
        "@20 gw1 v3 e2 MIGRATION ATTACHED>RECOVERING -",
        "@30 gw2 v4 e2 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 2",
        "@40 gw2 v5 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Epochs, 5, 5);
}

// ---------------------------------------------------------------------------------------------
// Invariant 3: ownership
// ---------------------------------------------------------------------------------------------

#[test]
fn epoch_change_with_a_reason_other_than_migration_drain_or_failover_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
        "@20 gw2 v3 e2 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 2",
    ]);
    assert_single(&violations, Invariant::Ownership, 3, 3);
    assert_mentions(&violations[0], "TRANSPORT_SWITCH_OK");
}

#[test]
fn epoch_change_by_two_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 MIGRATION ATTACHED>ATTACHED 1",
        "@20 gw1 v3 e3 MIGRATION ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Ownership, 3, 3);
}

#[test]
fn owner_transferred_without_an_epoch_change_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 MIGRATION ATTACHED>ATTACHED 1",
        "@10 gw1 v2 e1 MIGRATION SESSION_OWNER_TRANSFERRED gw1>gw2",
    ]);
    assert_single(&violations, Invariant::Ownership, 3, 2);
}

#[test]
fn owner_transferred_at_a_version_never_committed_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v5 e2 DRAIN SESSION_OWNER_TRANSFERRED gw1>gw2",
    ]);
    assert_single(&violations, Invariant::Ownership, 2, 5);
}

// ---------------------------------------------------------------------------------------------
// Invariant 4: termination
// ---------------------------------------------------------------------------------------------

/// Session [`S`] created, then terminated at version 2 (lines 1 to 3).
const TERMINATED_AT_2: [&str; 3] = [
    "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
    "@10 gw1 v2 e1 POLICY_TERMINATION ATTACHED>TERMINATED -",
    "@10 gw1 v2 e1 POLICY_TERMINATION TERMINATION_EVENT 10 0",
];

#[test]
fn state_change_after_termination_is_reported() {
    let violations = check_table(
        &[
            &TERMINATED_AT_2[..],
            &["@20 gw1 v3 e1 TRANSPORT_SWITCH_OK TERMINATED>ATTACHED 2"],
        ]
        .concat(),
    );
    assert_single(&violations, Invariant::Termination, 4, 3);
}

#[test]
fn second_termination_is_reported_once() {
    let violations = check_table(
        &[
            &TERMINATED_AT_2[..],
            &["@20 gw1 v3 e1 POLICY_TERMINATION TERMINATED>TERMINATED -"],
        ]
        .concat(),
    );
    assert_single(&violations, Invariant::Termination, 4, 3);
}

#[test]
fn accepted_event_after_termination_is_reported_even_when_the_end_is_logged_later() {
    // gw2's clock is behind: its TRANSPORT_SWITCH at version 3 is merged before gw1's end.
    let gw1 = lines(&TERMINATED_AT_2);
    let gw2 = lines(&["@-100 gw2 v3 e1 TRANSPORT_SWITCH_OK TRANSPORT_SWITCH 1>2"]);
    let (violations, _) = check_streams(vec![("gw1.jsonl", gw1), ("gw2.jsonl", gw2)]);
    assert_eq!(
        found(&violations),
        expect(&[(Invariant::Termination, "gw2.jsonl", 1)])
    );
}

#[test]
fn rejection_after_termination_is_not_a_violation() {
    let violations = check_table(
        &[
            &TERMINATED_AT_2[..],
            &["@20 gw1 v2 e1 SESSION_EXPIRED REATTACH_REJECTED false"],
        ]
        .concat(),
    );
    assert_eq!(violations, Vec::new());
}

// ---------------------------------------------------------------------------------------------
// Invariant 5: rejections
// ---------------------------------------------------------------------------------------------

#[test]
fn rejection_reporting_an_uncommitted_version_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 REPLAY_DETECTED REATTACH_REJECTED false",
    ]);
    assert_single(&violations, Invariant::Rejections, 2, 2);
}

#[test]
fn rejection_reporting_a_version_committed_later_by_a_lagging_node_is_fine() {
    // gw2's clock is behind, so the merge sees its rejection at version 2 before gw1's commit.
    let gw1 = lines(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    let gw2 = lines(&["@-10 gw2 v2 e1 OWNERSHIP_CONFLICT REATTACH_REJECTED true"]);
    let (violations, _) = check_streams(vec![("gw1.jsonl", gw1), ("gw2.jsonl", gw2)]);
    assert_eq!(violations, Vec::new());
}

#[test]
fn state_change_with_a_rejection_reason_that_is_not_a_termination_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 AUTH_FAIL ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Rejections, 2, 2);
}

#[test]
fn fatal_rejection_that_terminates_is_fine() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v1 e1 VERSION_AHEAD REATTACH_REJECTED false",
        "@10 gw1 v2 e1 VERSION_AHEAD ATTACHED>TERMINATED -",
    ]);
    assert_eq!(violations, Vec::new());
}

// ---------------------------------------------------------------------------------------------
// Invariant 6: bindings
// ---------------------------------------------------------------------------------------------

#[test]
fn attached_without_a_binding_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
        "@20 gw1 v3 e1 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED -",
    ]);
    assert_single(&violations, Invariant::Bindings, 3, 3);
}

#[test]
fn recovering_with_a_binding_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING 1",
    ]);
    assert_single(&violations, Invariant::Bindings, 2, 2);
}

#[test]
fn volatile_that_changes_its_binding_without_a_switch_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 VOLATILITY_SIGNAL ATTACHED>VOLATILE 8",
    ]);
    assert_single(&violations, Invariant::Bindings, 2, 2);
}

// ---------------------------------------------------------------------------------------------
// Transitions
// ---------------------------------------------------------------------------------------------

#[test]
fn transition_that_spec_does_not_allow_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
        "@20 gw1 v3 e1 VOLATILITY_SIGNAL RECOVERING>VOLATILE 1",
    ]);
    assert_single(&violations, Invariant::Transitions, 3, 3);
    assert_mentions(&violations[0], "RECOVERING -> VOLATILE");
}

#[test]
fn state_change_that_does_not_start_where_the_last_one_ended_is_reported() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -",
        // Claims to come from ATTACHED, but version 2 left RECOVERING.
        "@20 gw1 v3 e1 RECOVERY_START ATTACHED>RECOVERING -",
    ]);
    assert_single(&violations, Invariant::Transitions, 3, 3);
}

// ---------------------------------------------------------------------------------------------
// Malformed lines
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_lines_are_reported_and_checking_continues() {
    let no_epoch =
        event("@0 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -").without("owner_epoch");
    let bad_session = event("@0 gw1 v1 e1 AUTH_FAIL REATTACH_REJECTED false").session("0123");
    let lines = vec![
        event("@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1").line(),
        "this is not json".to_owned(),
        no_epoch.line(),
        event("@0 gw1 v2 e1 RECOVERY_START TELEPORTED").line(),
        event("@0 gw1 v1 e1 NOT_A_REASON REATTACH_REJECTED false").line(),
        bad_session.line(),
        String::new(), // Blank: skipped silently, but counted as a line.
        event("@10 gw1 v2 e1 RECOVERY_START ATTACHED>RECOVERING -").line(),
        // A later real violation is still found: version 2 again, from another node.
        event("@20 gw2 v2 e1 TRANSPORT_SWITCH_OK ATTACHED>ATTACHED 5").line(),
    ];
    let violations = check_one(lines);
    assert_eq!(
        found(&violations),
        expect(&[
            (Invariant::Malformed, "a.jsonl", 2),
            (Invariant::Malformed, "a.jsonl", 3),
            (Invariant::Malformed, "a.jsonl", 4),
            (Invariant::Malformed, "a.jsonl", 5),
            (Invariant::Malformed, "a.jsonl", 6),
            (Invariant::Versions, "a.jsonl", 9),
        ])
    );
    // Violations arrive in line order here.
    let mentions = [
        "not a JSON event",
        "owner_epoch",
        "TELEPORTED",
        "NOT_A_REASON",
        "session id",
    ];
    for (violation, text) in violations.iter().zip(mentions) {
        assert_eq!(
            (violation.session, violation.version),
            (None, None),
            "{violation}"
        );
        assert_mentions(violation, text);
    }
}

#[test]
fn non_utf8_line_is_malformed_and_the_rest_is_checked() {
    let rejected = event("@0 gw1 v1 e1 AUTH_FAIL REATTACH_REJECTED false").line();
    // Invalid bytes outside any string.
    let mut bad = rejected.clone().into_bytes();
    bad.splice(1..1, [0xff, 0xfe]);
    // A lone UTF-8 lead byte inside a JSON string (the node name).
    let bad_in_string = rejected.replace("\"gw1\"", "\"gw\u{1}\"");
    let bad_in_string = bad_in_string
        .bytes()
        .map(|b| if b == 1 { 0xc3 } else { b })
        .collect();
    let stream = vec![
        event("@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1")
            .line()
            .into_bytes(),
        bad,
        bad_in_string,
        event("@10 gw2 v2 e1 RECOVERY_START ATTACHED>RECOVERING -")
            .line()
            .into_bytes(),
    ];
    let (violations, _) = check_bytes(vec![("a.jsonl", stream)]);
    assert_eq!(
        found(&violations),
        expect(&[
            (Invariant::Malformed, "a.jsonl", 2),
            (Invariant::Malformed, "a.jsonl", 3),
            (Invariant::Versions, "a.jsonl", 4),
        ])
    );
}

#[test]
fn event_missing_its_type_specific_field_is_malformed() {
    let violations = check_table(&[
        "@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@0 gw1 v1 e1 AUTH_FAIL REATTACH_REJECTED",
        "@0 gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP",
    ]);
    assert_eq!(
        found(&violations),
        expect(&[
            (Invariant::Malformed, "a.jsonl", 2),
            (Invariant::Malformed, "a.jsonl", 3)
        ])
    );
    assert_mentions(&violations[0], "retryable");
    assert_mentions(&violations[1], "dropped");
}

// ---------------------------------------------------------------------------------------------
// Several at once, formatting, scale
// ---------------------------------------------------------------------------------------------

#[test]
fn stream_breaking_several_invariants_reports_each() {
    let mut stream = lines(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        // 2: the epoch moves without a transfer reason, and RECOVERING keeps a binding.
        "@10 gw1 v2 e2 RECOVERY_START ATTACHED>RECOVERING 1",
        // 3: a rejection at a version nobody committed.
        "@20 gw1 v9 e2 STALE_VERSION REATTACH_REJECTED true",
        "@30 gw1 v3 e2 POLICY_TERMINATION RECOVERING>TERMINATED -",
        // 5: committed after the end.
        "@40 gw1 v4 e2 TRANSPORT_SWITCH_OK TERMINATED>ATTACHED 2",
    ]);
    // 6 and 7: a second session whose epoch goes down.
    let second = [
        "@50 gw1 v1 e3 HANDSHAKE_OK BIRTH>ATTACHED 7",
        "@60 gw1 v2 e2 RECOVERY_START ATTACHED>RECOVERING -",
    ];
    stream.extend(second.iter().map(|spec| event(spec).session(S2).line()));
    let violations = check_one(stream);
    assert_eq!(
        found(&violations),
        expect(&[
            (Invariant::Ownership, "a.jsonl", 2),
            (Invariant::Bindings, "a.jsonl", 2),
            (Invariant::Rejections, "a.jsonl", 3),
            (Invariant::Termination, "a.jsonl", 5),
            (Invariant::Epochs, "a.jsonl", 7),
        ]),
        "{violations:#?}"
    );
    let of_second: Vec<_> = violations
        .iter()
        .filter(|v| v.session == Some(sid(S2)))
        .collect();
    assert_eq!(of_second.len(), 1);
}

#[test]
fn violation_display_names_file_line_session_version_and_invariant() {
    let violations = check_table(&[
        "@0  gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@10 gw1 v2 e1 REPLAY_DETECTED REATTACH_REJECTED false",
    ]);
    let text = violations[0].to_string();
    let start = format!("a.jsonl:2: session {S} version 2 invariant 5 (rejections): ");
    assert!(text.starts_with(&start), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn parse_extracts_the_fields_the_checker_needs() {
    let mut checker = Checker::new();
    let line = event("@42 gw7 v3 e2 TRANSPORT_SWITCH_OK RECOVERING>ATTACHED 9").line();
    let event = checker
        .parse(line.as_bytes())
        .expect("a valid STATE_CHANGE parses");
    assert_eq!(event.session, Some(sid(S)));
    assert_eq!((event.ts_ms, event.version, event.epoch), (T0 + 42, 3, 2));
    assert_eq!(event.reason, ReasonCode::TransportSwitchOk);
    assert_eq!(event.transport_id, Some(Some(9)));
    assert_eq!(checker.node_name(event.node), "gw7");
    assert!(checker.parse(b"{}").is_err());
}

#[test]
fn two_hundred_thousand_events_over_two_thousand_sessions_check_clean() {
    // Every session lives on gw1 or gw2 and cycles through transport loss and reattach; every
    // tenth migrates from gw1 to gw2 half-way. Sessions overlap in time, so the merge interleaves
    // them, and gw2's clock runs 3 s behind, which exercises the reorder buffer.
    const SESSIONS: u64 = 2_000;
    const CYCLES: u64 = 33;
    let mut c = Cluster::default();
    for s in 0..SESSIONS {
        let home = if s % 2 == 0 { "gw1" } else { "gw2" };
        let migrates = home == "gw1" && s % 10 == 0;
        let mut now = T0 + s * 37;
        let mut record = born(u128::from(s) + 1, home, now);
        let mut node = home;
        c.commit(&mut record, handshake(s * 1_000), now, node);
        for cycle in 1..=CYCLES {
            if migrates && cycle == CYCLES / 2 {
                now += 500;
                c.commit(&mut record, FREEZE, now, node);
                now += 10;
                c.commit(&mut record, migration_to("gw2"), now, node);
                node = "gw2";
            } else {
                now += 7_000;
                c.commit(&mut record, SessionEvent::TransportDead, now, node);
            }
            now += 1_000;
            let event = reattach(&record, cycle, s * 1_000 + cycle, Proto::Udp);
            c.commit(&mut record, event, now, node);
        }
        if s % 3 == 0 {
            now += 1_000;
            let end = SessionEvent::Terminate {
                reason: ReasonCode::PolicyTermination,
            };
            c.commit(&mut record, end, now, node);
        }
    }
    // Each node writes in its own time order.
    for events in c.streams.values_mut() {
        events.sort_by_key(|e| e.ts_ms);
    }
    let gw1 = c.lines("gw1", 0);
    let gw2 = c.lines("gw2", -3_000);
    let total = (gw1.len() + gw2.len()) as u64;
    assert!(total >= 200_000, "only {total} events");
    let (violations, summary) = check_streams(vec![("gw1.jsonl", gw1), ("gw2.jsonl", gw2)]);
    assert_eq!(violations.first(), None);
    assert_eq!(summary.events, total);
    assert_eq!(summary.sessions, SESSIONS as usize);
}

#[test]
fn summary_counts_events_sessions_and_dropped_events_of_every_gap() {
    let a = lines(&[
        "@0 gw1 v1 e1 HANDSHAKE_OK BIRTH>ATTACHED 1",
        "@1 gw1 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 2",
    ]);
    let b = lines(&["@2 gw2 v0 e0 AUDIT_QUEUE_OVERFLOW AUDIT_GAP 3"]);
    let (violations, summary) = check_streams(vec![("a.jsonl", a), ("b.jsonl", b)]);
    assert_eq!(violations, Vec::new());
    assert_eq!(summary.dropped, 5);
    assert_eq!(summary.sessions, 1);
    assert_eq!(summary.events, 3);
}

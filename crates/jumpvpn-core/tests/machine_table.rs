//! The golden table: every (state, event) pair of SPEC §3, and the reattach validation order of
//! SPEC §4 steps 5–9.

mod common;

use common::*;
use jumpvpn_core::audit::EventKind;
use jumpvpn_core::machine::{
    apply, next_deadline, Context, HealthBreach, HealthMetric, Outcome, ProofVerdict,
    ReattachAttempt, SessionEvent, LAST_USABLE_VERSION,
};
use jumpvpn_core::{
    OwnerEpoch, Policy, ReasonCode, SessionRecord, SessionState, StateVersion, ViolationType,
};

use ReasonCode as R;
use SessionState::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    To(SessionState, ReasonCode),
    Reject(ReasonCode),
    Unchanged,
}
use Expect::*;

const EVENTS: [&str; 12] = [
    "HandshakeOk",
    "HandshakeFail",
    "VolatilitySignal",
    "StabilityRestored",
    "TransportDead",
    "Reattach",
    "Timeout",
    "Terminate",
    "Freeze",
    "Unfreeze",
    "Transfer",
    "Failover",
];

fn event(name: &str, record: &SessionRecord) -> SessionEvent {
    let breach = HealthBreach {
        metric: HealthMetric::RttMs,
        threshold: 300,
        observed: 450,
    };
    match name {
        "HandshakeOk" => SessionEvent::HandshakeOk {
            candidate: candidate(1),
        },
        "HandshakeFail" => SessionEvent::HandshakeFail,
        "VolatilitySignal" => SessionEvent::VolatilitySignal(breach),
        "StabilityRestored" => SessionEvent::StabilityRestored,
        "TransportDead" => SessionEvent::TransportDead,
        "Reattach" => reattach(record.last_nonce + 1, record.state_version, 9),
        "Timeout" => SessionEvent::Timeout,
        "Terminate" => SessionEvent::Terminate {
            reason: R::PolicyTermination,
        },
        "Freeze" => SessionEvent::Freeze {
            reason: R::Migration,
        },
        "Unfreeze" => SessionEvent::Unfreeze,
        "Transfer" => SessionEvent::Transfer {
            to: gw("gw2"),
            reason: R::Migration,
        },
        "Failover" => SessionEvent::Failover { to: gw("gw2") },
        other => panic!("no event {other}"),
    }
}

/// SPEC §3, row by row, for records that are not frozen. Columns follow `EVENTS`.
fn expected(state: SessionState) -> [Expect; 12] {
    let inv = Reject(R::InvalidTransition);
    match state {
        Birth => [
            To(Attached, R::HandshakeOk),
            To(Terminated, R::HandshakeFail),
            inv,
            inv,
            inv,
            inv,
            Unchanged,
            To(Terminated, R::HandshakeFail),
            inv,
            inv,
            inv,
            inv,
        ],
        Attached => [
            inv,
            inv,
            To(Volatile, R::VolatilitySignal),
            inv,
            To(Recovering, R::RecoveryStart),
            To(Attached, R::TransportSwitchOk),
            Unchanged,
            To(Terminated, R::PolicyTermination),
            To(Attached, R::Migration),
            inv,
            inv,
            To(Recovering, R::Failover),
        ],
        Volatile => [
            inv,
            inv,
            inv,
            To(Attached, R::HealthRecovered),
            To(Recovering, R::RecoveryStart),
            To(Attached, R::TransportSwitchOk),
            Unchanged,
            To(Terminated, R::PolicyTermination),
            To(Volatile, R::Migration),
            inv,
            inv,
            To(Recovering, R::Failover),
        ],
        Degraded => [
            inv,
            inv,
            inv,
            To(Attached, R::ExitDegradedMode),
            To(Recovering, R::RecoveryStart),
            To(Attached, R::TransportSwitchOk),
            Unchanged,
            To(Terminated, R::PolicyTermination),
            To(Degraded, R::Migration),
            inv,
            inv,
            To(Recovering, R::Failover),
        ],
        Recovering => [
            inv,
            inv,
            inv,
            inv,
            inv,
            To(Attached, R::TransportSwitchOk),
            Unchanged,
            To(Terminated, R::PolicyTermination),
            To(Recovering, R::Migration),
            inv,
            inv,
            To(Recovering, R::Failover),
        ],
        Terminated => {
            let gone = Reject(R::SessionExpired);
            [
                gone, gone, gone, gone, gone, gone, Unchanged, gone, gone, gone, gone, gone,
            ]
        }
    }
}

/// The same rows for a frozen record: no binding may be made, the transfer may happen.
fn expected_frozen(state: SessionState, unfrozen: [Expect; 12]) -> [Expect; 12] {
    let mut row = unfrozen;
    row[5] = Reject(R::SessionFrozen); // Reattach
    row[8] = Reject(R::SessionFrozen); // Freeze again
    row[9] = To(state, R::MigrationAborted); // Unfreeze
    row[10] = To(Recovering, R::Migration); // Transfer
    row
}

fn check(record: &SessionRecord, name: &str, want: Expect) {
    let node = gw("gw1");
    let now = T0.plus(1_000);
    let ev = event(name, record);
    let outcome = apply(record, &ev, &Context { now, node: &node });
    let at = format!("{} + {name} (frozen: {})", record.state, record.frozen);
    match (want, outcome) {
        (To(state, reason), Outcome::Commit(c)) => {
            let new = &c.record;
            assert_eq!(new.state, state, "{at}: state");
            assert_eq!(c.expected, record.state_version, "{at}: expected version");
            assert_eq!(
                new.state_version.get(),
                record.state_version.get() + 1,
                "{at}: version +1"
            );
            assert!(
                c.refusal.is_none(),
                "{at}: a plain transition refuses nothing"
            );
            let changes: Vec<_> = c
                .events
                .iter()
                .filter(|e| matches!(e.kind, EventKind::StateChange { .. }))
                .collect();
            assert_eq!(changes.len(), 1, "{at}: exactly one STATE_CHANGE");
            let change = changes[0];
            assert_eq!(change.reason_code, reason, "{at}: reason");
            assert_eq!(
                change.kind,
                EventKind::StateChange {
                    previous_state: record.state,
                    new_state: state,
                    transport_id: new.binding.map(|b| b.transport_id),
                },
                "{at}: STATE_CHANGE fields"
            );
            for e in &c.events {
                assert_eq!(
                    e.state_version, new.state_version,
                    "{at}: every event at the new version"
                );
                assert_eq!(
                    e.owner_epoch, new.owner_epoch,
                    "{at}: every event at the new epoch"
                );
                assert_eq!(e.session_id, Some(record.session_id));
            }
            let transfer = matches!(reason, R::Failover)
                || (reason == R::Migration && state == Recovering && record.frozen);
            let want_epoch = if record.state == Birth {
                1
            } else if transfer {
                record.owner_epoch.get() + 1
            } else {
                record.owner_epoch.get()
            };
            assert_eq!(new.owner_epoch, OwnerEpoch(want_epoch), "{at}: epoch");
            if transfer {
                assert_eq!(new.owner, gw("gw2"), "{at}: new owner");
                assert!(!new.frozen, "{at}: the new owner may accept the reattach");
            }
            assert_eq!(
                new.state.has_binding(),
                new.binding.is_some(),
                "{at}: binding rule"
            );
            if state == Terminated {
                assert!(new.termination.is_some(), "{at}: termination recorded");
                assert!(
                    c.events
                        .iter()
                        .any(|e| matches!(e.kind, EventKind::TerminationEvent { .. })),
                    "{at}: TERMINATION_EVENT"
                );
            }
            assert_eq!(
                new.session_id, record.session_id,
                "{at}: identity never changes"
            );
        }
        (Reject(reason), Outcome::Reject(r)) => {
            assert_eq!(r.refusal.reason, reason, "{at}: rejection reason");
            assert!(!r.events.is_empty(), "{at}: a rejection is audited");
            for e in &r.events {
                assert_eq!(
                    e.state_version, record.state_version,
                    "{at}: rejection keeps version"
                );
                assert_eq!(e.reason_code, reason, "{at}");
            }
        }
        (Unchanged, Outcome::Unchanged) => {}
        (want, got) => panic!("{at}: expected {want:?}, got {got:?}"),
    }
}

#[test]
fn every_state_event_pair_matches_the_spec_table() {
    let mut pairs = 0;
    for state in SessionState::ALL {
        let record = record_in(state);
        assert_eq!(record.state, state);
        for (name, want) in EVENTS.iter().zip(expected(state)) {
            check(&record, name, want);
            pairs += 1;
        }
    }
    assert_eq!(pairs, 6 * 12);
}

#[test]
fn every_event_on_a_frozen_session_matches_the_spec_table() {
    for state in [Attached, Volatile, Degraded, Recovering] {
        let record = commit(
            &record_in(state),
            SessionEvent::Freeze {
                reason: R::Migration,
            },
            &gw("gw1"),
            T0.plus(500),
        );
        assert!(record.frozen);
        let row = expected_frozen(state, expected(state));
        for (name, want) in EVENTS.iter().zip(row) {
            check(&record, name, want);
        }
    }
}

#[test]
fn deadlines_end_the_session_with_their_own_reason() {
    let node = gw("gw1");
    let p = Policy::default();
    let timeout = |rec: &SessionRecord, at| match apply(
        rec,
        &SessionEvent::Timeout,
        &Context {
            now: at,
            node: &node,
        },
    ) {
        Outcome::Commit(c) => (c.record.state, c.events[0].reason_code),
        other => panic!("timeout at {at:?} did nothing: {other:?}"),
    };

    let attached = record_in(Attached);
    assert_eq!(next_deadline(&attached), Some(T0.plus(p.session_ttl_ms)));
    assert_eq!(
        timeout(&attached, T0.plus(p.session_ttl_ms)),
        (Terminated, R::TtlSessionExpired)
    );

    let recovering = record_in(Recovering);
    assert_eq!(
        next_deadline(&recovering),
        Some(T0.plus(p.max_recovery_window_ms))
    );
    let just_before = T0.plus(p.max_recovery_window_ms - 1);
    assert_eq!(
        apply(
            &recovering,
            &SessionEvent::Timeout,
            &Context {
                now: just_before,
                node: &node
            }
        ),
        Outcome::Unchanged
    );
    assert_eq!(
        timeout(&recovering, T0.plus(p.max_recovery_window_ms)),
        (Terminated, R::RecoveryBoundsExceeded)
    );

    // With a recovery window longer than the transport-loss TTL, the TTL ends it first.
    let mut long_window = recovering.clone();
    std::sync::Arc::make_mut(&mut long_window.policy).max_recovery_window_ms =
        p.transport_loss_ttl_ms * 2;
    assert_eq!(
        next_deadline(&long_window),
        Some(T0.plus(p.transport_loss_ttl_ms))
    );
    assert_eq!(
        timeout(&long_window, T0.plus(p.transport_loss_ttl_ms)),
        (Terminated, R::TtlTransportLossExpired)
    );

    let volatile = record_in(Volatile);
    assert_eq!(next_deadline(&volatile), Some(T0.plus(p.degraded_after_ms)));
    assert_eq!(
        timeout(&volatile, T0.plus(p.degraded_after_ms)),
        (Degraded, R::EnterDegradedMode)
    );

    let degraded = record_in(Degraded);
    let since = degraded.timestamps.state_changed;
    assert_eq!(
        next_deadline(&degraded),
        Some(since.plus(p.degraded_after_ms))
    );
    assert_eq!(
        timeout(&degraded, since.plus(p.degraded_after_ms)),
        (Terminated, R::PolicyTermination)
    );

    assert_eq!(next_deadline(&record_in(Birth)), None);
    assert_eq!(next_deadline(&record_in(Terminated)), None);
}

#[test]
fn reattach_after_the_recovery_window_terminates_instead_of_binding() {
    let node = gw("gw1");
    let rec = record_in(Recovering);
    let late = T0.plus(rec.policy.max_recovery_window_ms);
    let ev = reattach(1, rec.state_version, 5);
    let Outcome::Commit(c) = apply(
        &rec,
        &ev,
        &Context {
            now: late,
            node: &node,
        },
    ) else {
        panic!("a passed deadline must end the session");
    };
    assert_eq!(c.record.state, Terminated);
    assert_eq!(
        c.record.termination.map(|t| t.reason),
        Some(R::RecoveryBoundsExceeded)
    );
    let refusal = c.refusal.expect("the reattach itself is refused");
    assert_eq!(
        (refusal.reason, refusal.retryable),
        (R::SessionExpired, false)
    );
    assert!(matches!(
        c.events[0].kind,
        EventKind::ReattachRejected { retryable: false }
    ));
    assert_eq!(
        c.events[0].state_version, rec.state_version,
        "the refusal is at the old version"
    );
}

fn outcome_of(rec: &SessionRecord, attempt: ReattachAttempt, node: &str, now_ms: u64) -> Outcome {
    apply(
        rec,
        &SessionEvent::Reattach(attempt),
        &Context {
            now: T0.plus(now_ms),
            node: &gw(node),
        },
    )
}

fn attempt(
    rec: &SessionRecord,
    nonce: u64,
    known: StateVersion,
    proof: ProofVerdict,
) -> ReattachAttempt {
    let _ = rec;
    ReattachAttempt {
        nonce,
        known_version: known,
        candidate: candidate(11),
        proof,
    }
}

fn rejected(outcome: Outcome) -> (ReasonCode, bool, Vec<EventKind>) {
    match outcome {
        Outcome::Reject(r) => (
            r.refusal.reason,
            r.refusal.retryable,
            r.events.into_iter().map(|e| e.kind).collect(),
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn reattach_with_replayed_nonce_is_rejected_without_mutation() {
    let rec = commit(
        &record_in(Recovering),
        reattach(5, StateVersion(2), 3),
        &gw("gw1"),
        T0.plus(1_000),
    );
    assert_eq!(rec.last_nonce, 5);
    for nonce in [0, 4, 5] {
        let (reason, retryable, kinds) = rejected(outcome_of(
            &rec,
            attempt(&rec, nonce, rec.state_version, ProofVerdict::Valid),
            "gw1",
            10_000,
        ));
        assert_eq!(
            (reason, retryable),
            (R::ReplayDetected, false),
            "nonce {nonce}"
        );
        assert!(kinds.contains(&EventKind::SecurityEvent {
            violation_type: ViolationType::ReplayAttempt
        }));
    }
}

#[test]
fn reattach_with_forged_proof_is_rejected_auth_fail_with_security_event() {
    let rec = record_in(Recovering);
    let (reason, _, kinds) = rejected(outcome_of(
        &rec,
        attempt(&rec, 1, rec.state_version, ProofVerdict::Invalid),
        "gw1",
        1_000,
    ));
    assert_eq!(reason, R::AuthFail);
    assert_eq!(kinds[0], EventKind::ReattachRejected { retryable: false });
    assert_eq!(
        kinds[1],
        EventKind::SecurityEvent {
            violation_type: ViolationType::InvalidProof
        }
    );
}

#[test]
fn reattach_checks_run_in_spec_order() {
    let rec = commit(
        &record_in(Recovering),
        reattach(5, StateVersion(2), 3),
        &gw("gw1"),
        T0.plus(1_000),
    );
    let replayed_and_forged = attempt(&rec, 1, rec.state_version, ProofVerdict::Invalid);
    // 5 (ownership) before 6 (proof).
    assert_eq!(
        rejected(outcome_of(&rec, replayed_and_forged, "gw2", 10_000)).0,
        R::OwnershipConflict
    );
    // 6 (proof) before 7 (nonce).
    assert_eq!(
        rejected(outcome_of(&rec, replayed_and_forged, "gw1", 10_000)).0,
        R::AuthFail
    );
    // 7 (nonce) before 8 (version).
    let replayed_stale = attempt(&rec, 5, StateVersion(1), ProofVerdict::Valid);
    assert_eq!(
        rejected(outcome_of(&rec, replayed_stale, "gw1", 10_000)).0,
        R::ReplayDetected
    );
    // 8 (version) before 9 (cooldown: the last switch was 0 ms ago).
    let stale_in_cooldown = attempt(&rec, 6, StateVersion(1), ProofVerdict::Valid);
    let (reason, retryable, _) = rejected(outcome_of(&rec, stale_in_cooldown, "gw1", 1_000));
    assert_eq!((reason, retryable), (R::StaleVersion, true));
    // Frozen (5) before proof (6).
    let frozen = commit(
        &rec,
        SessionEvent::Freeze { reason: R::Drain },
        &gw("gw1"),
        T0.plus(2_000),
    );
    assert_eq!(
        rejected(outcome_of(&frozen, replayed_and_forged, "gw1", 10_000)).0,
        R::SessionFrozen
    );
}

#[test]
fn reattach_inside_the_cooldown_is_rate_limited_and_too_many_switches_are_denied() {
    let node = gw("gw1");
    let rec = record_in(Attached);
    // The handshake is not a switch: an immediate reattach is fine.
    let first = attempt(&rec, 1, rec.state_version, ProofVerdict::Valid);
    let Outcome::Commit(c) = outcome_of(&rec, first, "gw1", 0) else {
        panic!("first switch refused")
    };
    // A second switch 499 ms later is inside the 500 ms cooldown.
    let second = attempt(&c.record, 2, c.record.state_version, ProofVerdict::Valid);
    let (reason, retryable, _) = rejected(outcome_of(&c.record, second, "gw1", 499));
    assert_eq!((reason, retryable), (R::RateLimited, true));
    assert!(matches!(
        outcome_of(&c.record, second, "gw1", 500),
        Outcome::Commit(_)
    ));
    let mut rec = rec;
    let mut now = 1_000;
    for nonce in 1..=10 {
        rec = commit(
            &rec,
            reattach(nonce, rec.state_version, nonce + 10),
            &node,
            T0.plus(now),
        );
        now += rec.policy.switch_cooldown_ms;
    }
    let (reason, _, kinds) = rejected(outcome_of(
        &rec,
        attempt(&rec, 11, rec.state_version, ProofVerdict::Valid),
        "gw1",
        now,
    ));
    assert_eq!(reason, R::PolicyDeny);
    assert!(kinds.iter().any(|k| matches!(
        k,
        EventKind::PolicyEvent {
            threshold_value: 10,
            observed_value: 10,
            ..
        }
    )));
    // A minute after the first of those switches, one more is allowed.
    let later = 1_000 + 60_000;
    assert!(matches!(
        outcome_of(
            &rec,
            attempt(&rec, 11, rec.state_version, ProofVerdict::Valid),
            "gw1",
            later
        ),
        Outcome::Commit(_)
    ));
}

#[test]
fn version_ahead_of_the_store_terminates_the_session() {
    let rec = record_in(Recovering);
    let ahead = attempt(
        &rec,
        1,
        StateVersion(rec.state_version.get() + 3),
        ProofVerdict::Valid,
    );
    let Outcome::Commit(c) = outcome_of(&rec, ahead, "gw1", 1_000) else {
        panic!("expected termination")
    };
    assert_eq!(c.record.state, Terminated);
    assert_eq!(
        c.record.termination.map(|t| t.reason),
        Some(R::VersionAhead)
    );
    assert_eq!(c.refusal.map(|r| r.reason), Some(R::VersionAhead));
}

#[test]
fn an_exhausted_version_counter_ends_the_session_deterministically() {
    let node = gw("gw1");
    let mut rec = record_in(Attached);
    rec.state_version = LAST_USABLE_VERSION;
    let Outcome::Commit(c) = apply(
        &rec,
        &SessionEvent::TransportDead,
        &Context {
            now: T0.plus(10),
            node: &node,
        },
    ) else {
        panic!("expected the terminating commit");
    };
    assert_eq!(c.record.state, Terminated);
    assert_eq!(c.record.state_version, StateVersion(u64::MAX));
    assert_eq!(
        c.record.termination.map(|t| t.reason),
        Some(R::CounterExhausted)
    );
    // And nothing after it.
    assert!(matches!(
        apply(
            &c.record,
            &SessionEvent::TransportDead,
            &Context {
                now: T0.plus(11),
                node: &node
            }
        ),
        Outcome::Reject(_)
    ));

    let mut rec = commit(
        &record_in(Attached),
        SessionEvent::Freeze {
            reason: R::Migration,
        },
        &node,
        T0.plus(5),
    );
    rec.owner_epoch = OwnerEpoch(u64::MAX);
    let transfer = SessionEvent::Transfer {
        to: gw("gw2"),
        reason: R::Migration,
    };
    let Outcome::Commit(c) = apply(
        &rec,
        &transfer,
        &Context {
            now: T0.plus(10),
            node: &node,
        },
    ) else {
        panic!()
    };
    assert_eq!(
        c.record.termination.map(|t| t.reason),
        Some(R::CounterExhausted)
    );
    assert_eq!(
        c.record.owner_epoch,
        OwnerEpoch(u64::MAX),
        "the epoch never wraps"
    );
}

#[test]
fn only_the_owner_mutates_a_session() {
    let rec = record_in(Attached);
    let other = gw("gw2");
    for name in EVENTS
        .iter()
        .filter(|n| !matches!(**n, "Terminate" | "Failover"))
    {
        let ev = event(name, &rec);
        match apply(
            &rec,
            &ev,
            &Context {
                now: T0.plus(1_000),
                node: &other,
            },
        ) {
            Outcome::Reject(r) => assert_eq!(r.refusal.reason, R::OwnershipConflict, "{ev:?}"),
            // A non-owner's timer is not a request: it does nothing.
            Outcome::Unchanged if ev == SessionEvent::Timeout => {}
            other => panic!("{ev:?} by a non-owner: {other:?}"),
        }
    }
    // A termination and a failover may come from another node.
    for name in ["Terminate", "Failover"] {
        let outcome = apply(
            &rec,
            &event(name, &rec),
            &Context {
                now: T0.plus(1_000),
                node: &other,
            },
        );
        assert!(
            matches!(outcome, Outcome::Commit(_)),
            "{name} by another node"
        );
    }
}

#[test]
fn terminate_accepts_only_termination_reasons() {
    let rec = record_in(Attached);
    let ev = SessionEvent::Terminate {
        reason: R::TransportSwitchOk,
    };
    assert!(matches!(
        apply(
            &rec,
            &ev,
            &Context {
                now: T0,
                node: &gw("gw1")
            }
        ),
        Outcome::Reject(_)
    ));
}

#[test]
fn a_planned_move_cannot_claim_to_be_a_failover() {
    // A failover needs the owner's lease to have expired; it is never a freeze or transfer.
    let node = gw("gw1");
    let rec = record_in(Attached);
    let freeze = SessionEvent::Freeze {
        reason: R::Failover,
    };
    assert!(matches!(
        apply(
            &rec,
            &freeze,
            &Context {
                now: T0,
                node: &node
            }
        ),
        Outcome::Reject(_)
    ));
    let frozen = commit(
        &rec,
        SessionEvent::Freeze {
            reason: R::Migration,
        },
        &node,
        T0,
    );
    let transfer = SessionEvent::Transfer {
        to: gw("gw2"),
        reason: R::Failover,
    };
    match apply(
        &frozen,
        &transfer,
        &Context {
            now: T0,
            node: &node,
        },
    ) {
        Outcome::Reject(r) => assert_eq!(r.refusal.reason, R::InvalidTransition),
        other => panic!("a transfer labelled FAILOVER was not refused: {other:?}"),
    }
}

//! Property tests of the state machine over long random event sequences with random time steps.

mod common;

use common::*;
use jumpvpn_core::audit::check::Checker;
use jumpvpn_core::audit::EventKind;
use jumpvpn_core::machine::{
    apply, next_deadline, Context, HealthBreach, HealthMetric, Outcome, ProofVerdict,
    ReattachAttempt, SessionEvent,
};
use jumpvpn_core::{
    AuditEvent, NodeId, Policy, ReasonCode, SessionRecord, SessionState, StateVersion, Timestamp,
};
use proptest::prelude::*;

/// A step: how much time passes, which node acts, and what happens.
#[derive(Debug, Clone)]
struct Step {
    dt_ms: u64,
    node: u8,
    action: Action,
}

#[derive(Debug, Clone)]
enum Action {
    Volatile,
    Stable,
    Dead,
    Reattach {
        nonce: NonceChoice,
        known: KnownChoice,
        forged: bool,
    },
    Timeout,
    Terminate,
    Freeze,
    Unfreeze,
    Transfer(u8),
    Failover(u8),
}

#[derive(Debug, Clone, Copy)]
enum NonceChoice {
    Next,
    Replay,
}

#[derive(Debug, Clone, Copy)]
enum KnownChoice {
    Current,
    Stale,
    Ahead,
}

fn action() -> impl Strategy<Value = Action> {
    let nonce = prop_oneof![9 => Just(NonceChoice::Next), 1 => Just(NonceChoice::Replay)];
    let known = prop_oneof![
        16 => Just(KnownChoice::Current),
        3 => Just(KnownChoice::Stale),
        1 => Just(KnownChoice::Ahead),
    ];
    prop_oneof![
        4 => Just(Action::Volatile),
        3 => Just(Action::Stable),
        4 => Just(Action::Dead),
        10 => (nonce, known, prop::bool::weighted(0.1))
            .prop_map(|(nonce, known, forged)| Action::Reattach { nonce, known, forged }),
        6 => Just(Action::Timeout),
        1 => Just(Action::Terminate),
        2 => Just(Action::Freeze),
        1 => Just(Action::Unfreeze),
        2 => (0u8..3).prop_map(Action::Transfer),
        1 => (0u8..3).prop_map(Action::Failover),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let dt = prop_oneof![6 => 0u64..2_000, 3 => 0u64..40_000, 1 => 0u64..400_000];
    let node = prop_oneof![8 => Just(255u8), 1 => 0u8..3]; // 255: the owner acts
    (dt, node, action()).prop_map(|(dt_ms, node, action)| Step {
        dt_ms,
        node,
        action,
    })
}

fn node_name(i: u8) -> NodeId {
    gw(&format!("gw{}", i + 1))
}

fn to_event(rec: &SessionRecord, action: &Action, transport: u64) -> SessionEvent {
    match action {
        Action::Volatile => SessionEvent::VolatilitySignal(HealthBreach {
            metric: HealthMetric::JitterMs,
            threshold: 80,
            observed: 120,
        }),
        Action::Stable => SessionEvent::StabilityRestored,
        Action::Dead => SessionEvent::TransportDead,
        Action::Reattach {
            nonce,
            known,
            forged,
        } => SessionEvent::Reattach(ReattachAttempt {
            nonce: match nonce {
                NonceChoice::Next => rec.last_nonce.saturating_add(1),
                NonceChoice::Replay => rec.last_nonce,
            },
            known_version: match known {
                KnownChoice::Current => rec.state_version,
                KnownChoice::Stale => StateVersion(rec.last_bound_version.get().saturating_sub(1)),
                KnownChoice::Ahead => StateVersion(rec.state_version.get().saturating_add(1)),
            },
            candidate: candidate(transport),
            proof: if *forged {
                ProofVerdict::Invalid
            } else {
                ProofVerdict::Valid
            },
        }),
        Action::Timeout => SessionEvent::Timeout,
        Action::Terminate => SessionEvent::Terminate {
            reason: ReasonCode::PolicyTermination,
        },
        Action::Freeze => SessionEvent::Freeze {
            reason: ReasonCode::Migration,
        },
        Action::Unfreeze => SessionEvent::Unfreeze,
        Action::Transfer(to) => SessionEvent::Transfer {
            to: node_name(*to),
            reason: ReasonCode::Migration,
        },
        Action::Failover(to) => SessionEvent::Failover { to: node_name(*to) },
    }
}

/// A short policy, so that deadlines are reached within a run.
fn policy() -> Policy {
    Policy {
        session_ttl_ms: 1_200_000,
        max_recovery_window_ms: 30_000,
        transport_loss_ttl_ms: 45_000,
        degraded_after_ms: 20_000,
        ..Policy::default()
    }
}

/// The terminal deadline that has passed, computed independently of the machine.
fn deadline_passed(rec: &SessionRecord, now: Timestamp) -> bool {
    let p = &rec.policy;
    let t = &rec.timestamps;
    if rec.state == SessionState::Birth || rec.is_terminated() {
        return false;
    }
    now.as_millis() >= t.created.as_millis() + p.session_ttl_ms
        || t.transport_lost
            .is_some_and(|l| now.as_millis() >= l.as_millis() + p.transport_loss_ttl_ms)
        || t.recovering_since
            .is_some_and(|r| now.as_millis() >= r.as_millis() + p.max_recovery_window_ms)
        || (rec.state == SessionState::Degraded
            && now.as_millis() >= t.state_changed.as_millis() + p.degraded_after_ms)
}

fn state_changes(events: &[AuditEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StateChange { .. }))
        .count()
}

/// Runs `steps` from a fresh session and checks every step's outcome; returns every audit event.
fn run(steps: &[Step], start_version: Option<u64>) -> Result<Vec<AuditEvent>, TestCaseError> {
    let owner = gw("gw1");
    let mut now = T0;
    let handshake = SessionEvent::HandshakeOk {
        candidate: candidate(1),
    };
    let ctx = Context { now, node: &owner };
    let Outcome::Commit(created) = apply(&birth(42, &owner, policy(), now), &handshake, &ctx)
    else {
        return Err(TestCaseError::fail("the handshake was not committed"));
    };
    let mut rec = created.record;
    let mut audit = created.events;
    if let Some(v) = start_version {
        rec.state_version = StateVersion(v);
        rec.last_bound_version = StateVersion(v);
    }
    let mut terminated_at: Option<StateVersion> = None;
    for (i, step) in steps.iter().enumerate() {
        now = now.plus(step.dt_ms);
        let node = if step.node == 255 {
            rec.owner.clone()
        } else {
            node_name(step.node)
        };
        let event = to_event(&rec, &step.action, 100 + i as u64);
        let ctx = Context { now, node: &node };
        let outcome = apply(&rec, &event, &ctx);

        // Deterministic: the same inputs give the same outcome.
        prop_assert_eq!(&outcome, &apply(&rec, &event, &ctx));

        // The owner's timer armed at next_deadline() is never late, and never fires for nothing.
        let owner_timer = matches!(event, SessionEvent::Timeout) && node == rec.owner;
        if let (true, Some(deadline)) = (owner_timer, next_deadline(&rec)) {
            if now < deadline {
                prop_assert_eq!(&outcome, &Outcome::Unchanged, "timeout before the deadline");
            } else {
                prop_assert!(
                    matches!(outcome, Outcome::Commit(_)),
                    "deadline {:?} missed",
                    deadline
                );
            }
        }

        let expired = deadline_passed(&rec, now);
        match outcome {
            Outcome::Commit(c) => {
                let new = &c.record;
                prop_assert!(!rec.is_terminated(), "TERMINATED is absorbing");
                prop_assert_eq!(c.expected, rec.state_version);
                prop_assert_eq!(new.state_version.get(), rec.state_version.get() + 1);
                prop_assert_eq!(state_changes(&c.events), 1);
                for e in &c.events {
                    let at_new = e.state_version == new.state_version;
                    let refusal_at_old = e.state_version == rec.state_version
                        && matches!(
                            e.kind,
                            EventKind::ReattachRejected { .. } | EventKind::EventRejected { .. }
                        );
                    prop_assert!(
                        at_new || refusal_at_old,
                        "event at a foreign version: {:?}",
                        e
                    );
                }
                // Epochs only move on an ownership change, by one.
                let transfer = matches!(
                    event,
                    SessionEvent::Transfer { .. } | SessionEvent::Failover { .. }
                );
                if transfer && new.state != SessionState::Terminated {
                    prop_assert_eq!(new.owner_epoch.get(), rec.owner_epoch.get() + 1);
                } else {
                    prop_assert_eq!(new.owner_epoch, rec.owner_epoch);
                    prop_assert_eq!(&new.owner, &rec.owner);
                }
                // No deadline is missed: after expiry, the only accepted change is the end.
                if expired {
                    prop_assert_eq!(
                        new.state,
                        SessionState::Terminated,
                        "accepted after a deadline"
                    );
                }
                // Single-binding rule.
                prop_assert_eq!(new.state.has_binding(), new.binding.is_some());
                prop_assert!(new.state_version >= new.last_bound_version);
                prop_assert!(new.last_nonce >= rec.last_nonce);
                if new.is_terminated() {
                    terminated_at = Some(new.state_version);
                }
                audit.extend(c.events);
                rec = c.record;
            }
            Outcome::Reject(r) => {
                // A rejection changes nothing (the record is not replaced) and is audited at the
                // current version.
                prop_assert!(!r.events.is_empty());
                for e in &r.events {
                    prop_assert_eq!(e.state_version, rec.state_version);
                    prop_assert_eq!(e.owner_epoch, rec.owner_epoch);
                }
                prop_assert_eq!(state_changes(&r.events), 0);
                audit.extend(r.events);
            }
            Outcome::Unchanged => {
                prop_assert!(
                    !expired || rec.is_terminated(),
                    "a passed deadline was ignored"
                );
            }
        }
        if let Some(end) = terminated_at {
            prop_assert_eq!(rec.state_version, end, "nothing after termination");
        }
    }
    Ok(audit)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_invariant(steps in prop::collection::vec(step(), 1..300)) {
        let audit = run(&steps, None)?;
        // The audit the machine emits passes the independent checker.
        let mut checker = Checker::new();
        let file = checker.add_source("machine.jsonl");
        for (i, e) in audit.iter().enumerate() {
            let line = e.to_json_line();
            let parsed = checker.parse(line.as_bytes());
            prop_assert!(parsed.is_ok(), "{:?} on {}", parsed, line);
            if let Ok(event) = parsed {
                checker.feed(event, file, i as u64 + 1);
            }
        }
        let summary = checker.finish();
        let violations: Vec<String> = checker.drain_violations().map(|v| v.to_string()).collect();
        prop_assert!(violations.is_empty(), "{:#?}", violations);
        prop_assert_eq!(summary.violations, 0);
    }

    #[test]
    fn sequences_near_the_end_of_the_version_counter_terminate_cleanly(
        steps in prop::collection::vec(step(), 1..40),
        headroom in 0u64..20,
    ) {
        run(&steps, Some(u64::MAX - 1 - headroom))?;
    }
}

//! The session state machine (SPEC §3): one pure function from (record, event, now) to either a
//! new record plus the audit events it emits, or a reason-coded rejection that leaves the record
//! untouched.
//!
//! ```text
//!            HandshakeOk                 VolatilitySignal           degraded_after_ms
//!   BIRTH ──────────────▶ ATTACHED ─────────────────▶ VOLATILE ───────────────▶ DEGRADED
//!     │                    ▲  │  ◀─────────────────────  │ ◀──── StabilityRestored ─┘ │
//!     │ HandshakeFail      │  │     StabilityRestored    │                           │
//!     ▼                    │  ▼ TransportDead            ▼ TransportDead             │ bound again
//!  TERMINATED ◀─────── RECOVERING ◀──────────────────────┴───────────────────────────┘
//!        ▲   window / TTL   │  Reattach (accepted) ──▶ ATTACHED
//! ```
//!
//! The policy applied is the snapshot in the record (`record.policy`). Every accepted mutation
//! increments `state_version` by exactly one and emits exactly one `STATE_CHANGE`; descriptive
//! events share its version. A terminal deadline that has passed (session TTL, transport-loss
//! TTL, recovery window, degraded bound) wins over whatever event arrives, so no event is ever
//! accepted after its session should have ended.

use std::borrow::Cow;

use crate::audit::{AuditEvent, EventKind};
use crate::ids::{NodeId, OwnerEpoch, StateVersion, Timestamp};
use crate::reason::{ReasonCode, ViolationType};
use crate::record::{Candidate, SessionRecord, SessionState, Termination};
use crate::replay::control_nonce_is_fresh;

/// The highest version a non-terminal mutation may take: one is always kept in reserve so that a
/// session whose version counter is exhausted can still be terminated deterministically.
pub const LAST_USABLE_VERSION: StateVersion = StateVersion(u64::MAX - 1);

/// What happened to a session, as seen by the node applying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The Noise handshake completed over `candidate`.
    HandshakeOk {
        /// The transport the handshake arrived on.
        candidate: Candidate,
    },
    /// The handshake failed.
    HandshakeFail,
    /// The health monitor saw a threshold crossed.
    VolatilitySignal(HealthBreach),
    /// The health monitor saw health within bounds for long enough.
    StabilityRestored,
    /// The binding is dead (no packet for `server_dead_after_ms`, or the TCP stream closed).
    TransportDead,
    /// A client asks to bind a new transport.
    Reattach(ReattachAttempt),
    /// A timer fired: apply whichever deadline has passed (see [`next_deadline`]).
    Timeout,
    /// Explicit end: client, operator, policy, or an integrity violation.
    Terminate {
        /// One of the termination reasons (see [`is_termination_reason`]).
        reason: ReasonCode,
    },
    /// Freeze for a controlled migration or a drain: no new binding until transfer or unfreeze.
    Freeze {
        /// `MIGRATION` or `DRAIN`.
        reason: ReasonCode,
    },
    /// Undo a freeze whose transfer did not commit.
    Unfreeze,
    /// Hand a frozen session to `to`: owner := `to`, epoch + 1, binding cleared (RECOVERING).
    Transfer {
        /// The new owner.
        to: NodeId,
        /// `MIGRATION` or `DRAIN`.
        reason: ReasonCode,
    },
    /// Take the session from an owner whose lease has expired: owner := `to`, epoch + 1.
    /// Whether the lease has expired is decided by the ownership rules before this is applied.
    Failover {
        /// The new owner.
        to: NodeId,
    },
}

impl SessionEvent {
    /// A stable name for audit events that refuse this event.
    pub const fn name(&self) -> &'static str {
        match self {
            SessionEvent::HandshakeOk { .. } => "HANDSHAKE_OK",
            SessionEvent::HandshakeFail => "HANDSHAKE_FAIL",
            SessionEvent::VolatilitySignal(_) => "VOLATILITY_SIGNAL",
            SessionEvent::StabilityRestored => "STABILITY_RESTORED",
            SessionEvent::TransportDead => "TRANSPORT_DEAD",
            SessionEvent::Reattach(_) => "REATTACH",
            SessionEvent::Timeout => "TIMEOUT",
            SessionEvent::Terminate { .. } => "TERMINATE",
            SessionEvent::Freeze { .. } => "FREEZE",
            SessionEvent::Unfreeze => "UNFREEZE",
            SessionEvent::Transfer { .. } => "TRANSFER",
            SessionEvent::Failover { .. } => "FAILOVER",
        }
    }
}

/// A health threshold crossed: which one, its value and what was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthBreach {
    /// The metric.
    pub metric: HealthMetric,
    /// The policy threshold.
    pub threshold: u64,
    /// The observed value.
    pub observed: u64,
}

/// The health metrics of SPEC §6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthMetric {
    /// Loss, percent.
    LossPct,
    /// Round-trip time, ms.
    RttMs,
    /// Jitter, ms.
    JitterMs,
}

impl HealthMetric {
    /// The policy key of the metric's threshold.
    pub const fn policy_name(self) -> &'static str {
        match self {
            HealthMetric::LossPct => "volatility.loss_pct",
            HealthMetric::RttMs => "volatility.rtt_ms",
            HealthMetric::JitterMs => "volatility.jitter_ms",
        }
    }
}

/// A decoded `REATTACH_REQUEST`, with the verdict on its proof already computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReattachAttempt {
    /// Control-plane nonce; must be greater than the record's `last_nonce`.
    pub nonce: u64,
    /// The highest version the client has been told.
    pub known_version: StateVersion,
    /// The transport the request arrived on.
    pub candidate: Candidate,
    /// Whether the proof of possession verified (compared in constant time by the crypto
    /// layer). Carried as a verdict so that the state machine applies the checks in the order
    /// of SPEC §4 without holding the master secret.
    pub proof: ProofVerdict,
}

/// The outcome of verifying a proof of possession.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofVerdict {
    /// The MAC verified.
    Valid,
    /// It did not.
    Invalid,
}

/// Who applies the event, and when.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The current time.
    pub now: Timestamp,
    /// The node applying the event.
    pub node: &'a NodeId,
}

/// The result of [`apply`].
///
/// Not boxed: an outcome is matched right away, and moving a record costs less than the
/// allocation a box would add to every transition.
#[allow(clippy::large_enum_variant)]
#[must_use = "an outcome must be committed or reported"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The record changed: compare-and-swap the store from `expected` to `commit.record`, then
    /// emit `commit.events`.
    Commit(Commit),
    /// Refused; nothing changed. Emit `events`.
    Reject(Rejection),
    /// Nothing to do (a timer fired early).
    Unchanged,
}

/// An accepted mutation.
#[must_use = "a commit must be written to the store"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The version the stored record must still have for the write to apply.
    pub expected: StateVersion,
    /// The new record: `expected + 1`.
    pub record: SessionRecord,
    /// Audit events, all carrying the new version; the `STATE_CHANGE` first.
    pub events: Vec<AuditEvent>,
    /// Set when the request that caused the commit is itself refused: a fatal rejection
    /// terminates the session (e.g. `VERSION_AHEAD`), a reattach after a deadline ends it.
    pub refusal: Option<Refusal>,
}

/// A refused request.
#[must_use = "a rejection must be reported"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub refusal: Refusal,
    /// Audit events, carrying the unchanged version.
    pub events: Vec<AuditEvent>,
}

/// The reply to a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The primary cause.
    pub reason: ReasonCode,
    /// Whether the client may retry (on this or another transport).
    pub retryable: bool,
}

/// Whether `reason` may end a session through [`SessionEvent::Terminate`].
pub const fn is_termination_reason(reason: ReasonCode) -> bool {
    matches!(
        reason,
        ReasonCode::HandshakeFail
            | ReasonCode::SessionSuperseded
            | ReasonCode::PolicyTermination
            | ReasonCode::FatalProtocolError
            | ReasonCode::OwnershipConflict
            | ReasonCode::OwnerLost
            | ReasonCode::PartitionTerminated
            | ReasonCode::VersionAhead
            | ReasonCode::CommitUnknown
            | ReasonCode::CounterExhausted
            | ReasonCode::TtlSessionExpired
            | ReasonCode::TtlTransportLossExpired
            | ReasonCode::RecoveryBoundsExceeded
    )
}

/// Whether `reason` names a planned move (a freeze and transfer). `FAILOVER` is not one: a
/// failover needs the owner's lease to have expired and goes through
/// [`SessionEvent::Failover`] only.
const fn is_planned_move(reason: ReasonCode) -> bool {
    matches!(reason, ReasonCode::Migration | ReasonCode::Drain)
}

/// A refusal with its audit event (of type `kind`) at the record's unchanged version: the one
/// way refusals are built, here and by layers that refuse before [`apply`] (the ownership
/// rules).
pub fn refuse(
    record: &SessionRecord,
    ctx: &Context<'_>,
    refusal: Refusal,
    kind: EventKind,
) -> Rejection {
    Rejection {
        refusal,
        events: vec![event_at(record, ctx, refusal.reason, kind)],
    }
}

/// Applies `event` to `record` at `ctx.now`. Pure: the same inputs give the same outcome.
pub fn apply(record: &SessionRecord, event: &SessionEvent, ctx: &Context<'_>) -> Outcome {
    if record.is_terminated() {
        // A timer may still fire after the end; that is not a request to refuse.
        if *event == SessionEvent::Timeout {
            return Outcome::Unchanged;
        }
        return reject(record, event, ctx, ReasonCode::SessionExpired, false, None);
    }
    if let Some(expired) = passed_terminal_deadline(record, ctx.now) {
        let refusal = match event {
            SessionEvent::Timeout | SessionEvent::Terminate { .. } => None,
            _ => Some(Refusal {
                reason: ReasonCode::SessionExpired,
                retryable: false,
            }),
        };
        let mut draft = Draft::begin(record, ctx);
        if let Some(refusal) = refusal {
            draft.push_refusal_of(event, refusal);
        }
        draft.terminate(expired.reason);
        if let Some((policy_name, threshold, observed)) = expired.policy {
            draft.push(
                ReasonCode::PolicyTermination,
                EventKind::PolicyEvent {
                    policy_name: Cow::Borrowed(policy_name),
                    threshold_value: threshold,
                    observed_value: observed,
                },
            );
        }
        return draft.finish(refusal);
    }

    // SPEC §4 step 5 and §7.1: only the owner mutates a session. Failover is how another node
    // becomes owner (the ownership rules decide when it is allowed), and a termination may come
    // from any node (e.g. `on_owner_loss = "terminate"`): it ends the session, binds nothing.
    let open_to_all = matches!(
        event,
        SessionEvent::Terminate { .. } | SessionEvent::Failover { .. }
    );
    if record.state != SessionState::Birth && !open_to_all && record.owner != *ctx.node {
        if *event == SessionEvent::Timeout {
            return Outcome::Unchanged;
        }
        let kind = match event {
            SessionEvent::Freeze { .. }
            | SessionEvent::Unfreeze
            | SessionEvent::Transfer { .. } => Some(EventKind::SessionOwnerRejected {
                previous_owner: Some(record.owner.clone()),
                new_owner: Some(ctx.node.clone()),
            }),
            _ => None,
        };
        return reject(
            record,
            event,
            ctx,
            ReasonCode::OwnershipConflict,
            true,
            kind,
        );
    }

    use SessionState::*;
    match (record.state, event) {
        (Birth, SessionEvent::HandshakeOk { candidate }) => {
            let mut d = Draft::begin(record, ctx);
            d.rec.owner_epoch = OwnerEpoch(1);
            d.rec.owner = ctx.node.clone();
            d.bind(*candidate);
            d.set_state(Attached, ReasonCode::HandshakeOk);
            d.push(
                ReasonCode::HandshakeOk,
                EventKind::SessionCreated {
                    new_state: Attached,
                    transport_id: candidate.transport_id,
                    proto: candidate.proto,
                },
            );
            d.push(
                ReasonCode::OwnerCreated,
                EventKind::SessionOwnerAcquired {
                    previous_owner: None,
                    new_owner: Some(ctx.node.clone()),
                },
            );
            d.finish(None)
        }
        (Birth, SessionEvent::HandshakeFail | SessionEvent::Terminate { .. }) => {
            let mut d = Draft::begin(record, ctx);
            d.rec.owner_epoch = OwnerEpoch(1);
            d.terminate(ReasonCode::HandshakeFail);
            d.finish(None)
        }
        (Birth, SessionEvent::Timeout) => Outcome::Unchanged,
        (Birth, _) => reject(
            record,
            event,
            ctx,
            ReasonCode::InvalidTransition,
            false,
            None,
        ),

        (Attached, SessionEvent::VolatilitySignal(breach)) => {
            let mut d = Draft::begin(record, ctx);
            d.set_state(Volatile, ReasonCode::VolatilitySignal);
            d.push(
                ReasonCode::VolatilitySignal,
                EventKind::PolicyEvent {
                    policy_name: Cow::Borrowed(breach.metric.policy_name()),
                    threshold_value: breach.threshold,
                    observed_value: breach.observed,
                },
            );
            d.finish(None)
        }
        (Volatile | Degraded, SessionEvent::StabilityRestored) => {
            let reason = if record.state == Volatile {
                ReasonCode::HealthRecovered
            } else {
                ReasonCode::ExitDegradedMode
            };
            let mut d = Draft::begin(record, ctx);
            d.set_state(Attached, reason);
            d.finish(None)
        }
        (Attached | Volatile | Degraded, SessionEvent::TransportDead) => {
            let mut d = Draft::begin(record, ctx);
            d.unbind();
            d.rec.timestamps.recovering_since = Some(ctx.now);
            d.set_state(Recovering, ReasonCode::RecoveryStart);
            d.finish(None)
        }
        (Attached | Volatile | Degraded | Recovering, SessionEvent::Reattach(attempt)) => {
            reattach(record, event, attempt, ctx)
        }
        (Volatile | Degraded, SessionEvent::Timeout) => degraded_bound(record, ctx),
        (Attached | Recovering, SessionEvent::Timeout) => Outcome::Unchanged,
        (_, SessionEvent::Terminate { reason }) if is_termination_reason(*reason) => {
            let mut d = Draft::begin(record, ctx);
            d.terminate(*reason);
            d.finish(None)
        }
        (_, SessionEvent::Freeze { reason }) if is_planned_move(*reason) => {
            if record.frozen {
                return reject(record, event, ctx, ReasonCode::SessionFrozen, false, None);
            }
            let mut d = Draft::begin(record, ctx);
            d.rec.frozen = true;
            d.set_state(record.state, *reason);
            d.push(*reason, d.owner_kind(OwnerEventKind::Frozen, None));
            d.finish(None)
        }
        (_, SessionEvent::Unfreeze) if record.frozen => {
            let mut d = Draft::begin(record, ctx);
            d.rec.frozen = false;
            d.set_state(record.state, ReasonCode::MigrationAborted);
            let owner = Some(record.owner.clone());
            d.push(
                ReasonCode::MigrationAborted,
                d.owner_kind(OwnerEventKind::Resumed, owner),
            );
            d.finish(None)
        }
        (_, SessionEvent::Transfer { to, reason })
            if record.frozen && *to != record.owner && is_planned_move(*reason) =>
        {
            change_owner(record, ctx, to, *reason)
        }
        (_, SessionEvent::Failover { to }) if *to != record.owner => {
            change_owner(record, ctx, to, ReasonCode::Failover)
        }
        (_, SessionEvent::Freeze { .. } | SessionEvent::Transfer { .. })
        | (_, SessionEvent::Failover { .. }) => {
            let kind = EventKind::SessionOwnerRejected {
                previous_owner: Some(record.owner.clone()),
                new_owner: match event {
                    SessionEvent::Transfer { to, .. } | SessionEvent::Failover { to } => {
                        Some(to.clone())
                    }
                    _ => None,
                },
            };
            reject(
                record,
                event,
                ctx,
                ReasonCode::InvalidTransition,
                false,
                Some(kind),
            )
        }
        _ => reject(
            record,
            event,
            ctx,
            ReasonCode::InvalidTransition,
            false,
            None,
        ),
    }
}

/// The earliest time at which [`apply`]ing [`SessionEvent::Timeout`] can change `record`, so a
/// driver can arm a single timer. `None` when no deadline is pending (BIRTH, TERMINATED).
pub fn next_deadline(record: &SessionRecord) -> Option<Timestamp> {
    deadlines(record)
        .into_iter()
        .flatten()
        .map(|(at, _)| at)
        .min()
}

/// A deadline of the record, and what passing it means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Deadline {
    SessionTtl,
    TransportLoss,
    RecoveryWindow,
    /// VOLATILE → DEGRADED, or DEGRADED → TERMINATED.
    DegradedBound,
}

/// The record's pending deadlines, in priority order.
fn deadlines(record: &SessionRecord) -> [Option<(Timestamp, Deadline)>; 4] {
    if matches!(record.state, SessionState::Birth | SessionState::Terminated) {
        return [None; 4];
    }
    let p = &record.policy;
    let t = &record.timestamps;
    let degrading = matches!(
        record.state,
        SessionState::Volatile | SessionState::Degraded
    );
    [
        Some((record.expires_at(), Deadline::SessionTtl)),
        t.transport_lost
            .map(|lost| (lost.plus(p.transport_loss_ttl_ms), Deadline::TransportLoss)),
        t.recovering_since.map(|since| {
            (
                since.plus(p.max_recovery_window_ms),
                Deadline::RecoveryWindow,
            )
        }),
        degrading.then(|| {
            (
                t.state_changed.plus(p.degraded_after_ms),
                Deadline::DegradedBound,
            )
        }),
    ]
}

/// A deadline that ends the session, with what to report.
struct Expiry {
    reason: ReasonCode,
    /// The policy knob and the observed duration, for a `POLICY_EVENT`.
    policy: Option<(&'static str, u64, u64)>,
}

/// The terminal deadline that has passed at `now`, by priority: session lifetime, transport
/// loss, recovery window, then the degraded bound (terminal only when already DEGRADED).
fn passed_terminal_deadline(record: &SessionRecord, now: Timestamp) -> Option<Expiry> {
    let (_, passed) = deadlines(record)
        .into_iter()
        .flatten()
        .find(|(at, which)| {
            now >= *at
                && (*which != Deadline::DegradedBound || record.state == SessionState::Degraded)
        })?;
    let reason = match passed {
        Deadline::SessionTtl => ReasonCode::TtlSessionExpired,
        Deadline::TransportLoss => ReasonCode::TtlTransportLossExpired,
        Deadline::RecoveryWindow => ReasonCode::RecoveryBoundsExceeded,
        Deadline::DegradedBound => {
            let bound = record.policy.degraded_after_ms;
            let observed = now.since(record.timestamps.state_changed);
            return Some(Expiry {
                reason: ReasonCode::PolicyTermination,
                policy: Some(("degraded_after_ms", bound, observed)),
            });
        }
    };
    Some(Expiry {
        reason,
        policy: None,
    })
}

/// VOLATILE for longer than the bound: DEGRADED. (DEGRADED past it again is terminal and
/// handled by [`passed_terminal_deadline`].)
fn degraded_bound(record: &SessionRecord, ctx: &Context<'_>) -> Outcome {
    let volatile_for = ctx.now.since(record.timestamps.state_changed);
    if record.state != SessionState::Volatile || volatile_for < record.policy.degraded_after_ms {
        return Outcome::Unchanged;
    }
    let mut d = Draft::begin(record, ctx);
    d.set_state(SessionState::Degraded, ReasonCode::EnterDegradedMode);
    d.push(
        ReasonCode::EnterDegradedMode,
        EventKind::PolicyEvent {
            policy_name: Cow::Borrowed("degraded_after_ms"),
            threshold_value: record.policy.degraded_after_ms,
            observed_value: volatile_for,
        },
    );
    d.finish(None)
}

/// SPEC §4 reattach validation, steps 5 to 9 (steps 1 to 4 happen before: decoding, rate limit,
/// lookup, termination; step 10 is the store's CAS of the returned commit).
fn reattach(
    record: &SessionRecord,
    event: &SessionEvent,
    attempt: &ReattachAttempt,
    ctx: &Context<'_>,
) -> Outcome {
    // 5. Ownership (checked in `apply` for every event) and freeze.
    if record.frozen {
        return reject(record, event, ctx, ReasonCode::SessionFrozen, true, None);
    }
    // 6. Proof of possession.
    if attempt.proof == ProofVerdict::Invalid {
        let mut rejection = rejection(record, event, ctx, ReasonCode::AuthFail, false, None);
        rejection.events.push(event_at(
            record,
            ctx,
            ReasonCode::AuthFail,
            EventKind::SecurityEvent {
                violation_type: ViolationType::InvalidProof,
            },
        ));
        return Outcome::Reject(rejection);
    }
    // 7. Control-plane anti-replay: strictly increasing nonce.
    if !control_nonce_is_fresh(record.last_nonce, attempt.nonce) {
        let mut rejection = rejection(record, event, ctx, ReasonCode::ReplayDetected, false, None);
        rejection.events.push(event_at(
            record,
            ctx,
            ReasonCode::ReplayDetected,
            EventKind::SecurityEvent {
                violation_type: ViolationType::ReplayAttempt,
            },
        ));
        return Outcome::Reject(rejection);
    }
    // 8. Versions. Ahead of the store means the store was rolled back: end the session
    // explicitly rather than continue from an older state (SPEC §7.6).
    if attempt.known_version > record.state_version {
        let refusal = Refusal {
            reason: ReasonCode::VersionAhead,
            retryable: false,
        };
        let mut d = Draft::begin(record, ctx);
        d.rec.last_nonce = attempt.nonce;
        d.push_refusal_of(event, refusal);
        d.terminate(ReasonCode::VersionAhead);
        return d.finish(Some(refusal));
    }
    if attempt.known_version < record.last_bound_version {
        // Someone reattached since the client last heard. The reply carries the current
        // version, so a client whose own earlier reattach succeeded unseen can retry.
        return reject(record, event, ctx, ReasonCode::StaleVersion, true, None);
    }
    // 9. Anti-flap.
    let p = &record.policy;
    let recent = record.switches.in_last_minute(ctx.now);
    if recent >= p.max_switches_per_min {
        let mut rejection = rejection(record, event, ctx, ReasonCode::PolicyDeny, true, None);
        rejection.events.push(event_at(
            record,
            ctx,
            ReasonCode::PolicyDeny,
            EventKind::PolicyEvent {
                policy_name: Cow::Borrowed("max_switches_per_min"),
                threshold_value: u64::from(p.max_switches_per_min),
                observed_value: u64::from(recent),
            },
        ));
        return Outcome::Reject(rejection);
    }
    // The cooldown keeps a client from flapping between live transports. A session without a
    // binding (RECOVERING, e.g. right after a migration) has nothing to flap from: refusing it
    // would only prolong the outage, and the per-minute bound above still applies.
    if let (Some(last), Some(_)) = (record.timestamps.last_switch, record.binding) {
        if ctx.now.since(last) < p.switch_cooldown_ms {
            return reject(record, event, ctx, ReasonCode::RateLimited, true, None);
        }
    }

    let old_transport = record
        .binding
        .map(|b| b.transport_id)
        .or(record.last_transport_id);
    let latency = record
        .timestamps
        .transport_lost
        .map_or(0, |lost| ctx.now.since(lost));
    let mut d = Draft::begin(record, ctx);
    d.rec.last_nonce = attempt.nonce;
    d.bind(attempt.candidate);
    d.rec.timestamps.last_switch = Some(ctx.now);
    d.rec.switches.record(ctx.now, p.max_switches_per_min);
    d.set_state(SessionState::Attached, ReasonCode::TransportSwitchOk);
    d.push(
        ReasonCode::TransportSwitchOk,
        EventKind::TransportSwitch {
            old_transport_id: old_transport,
            new_transport_id: attempt.candidate.transport_id,
            proto: attempt.candidate.proto,
            switch_latency_ms: latency,
        },
    );
    d.finish(None)
}

/// Transfer or failover: owner := `to`, epoch + 1, binding cleared, RECOVERING, unfrozen.
fn change_owner(
    record: &SessionRecord,
    ctx: &Context<'_>,
    to: &NodeId,
    reason: ReasonCode,
) -> Outcome {
    let mut d = Draft::begin(record, ctx);
    let Some(epoch) = record.owner_epoch.next() else {
        d.terminate(ReasonCode::CounterExhausted);
        return d.finish(None);
    };
    d.rec.owner = to.clone();
    d.rec.owner_epoch = epoch;
    d.rec.frozen = false;
    d.unbind();
    d.rec.timestamps.recovering_since = Some(ctx.now);
    d.set_state(SessionState::Recovering, reason);
    d.push(
        reason,
        EventKind::SessionOwnerTransferred {
            previous_owner: Some(record.owner.clone()),
            new_owner: Some(to.clone()),
        },
    );
    d.finish(None)
}

fn reject(
    record: &SessionRecord,
    event: &SessionEvent,
    ctx: &Context<'_>,
    reason: ReasonCode,
    retryable: bool,
    kind: Option<EventKind>,
) -> Outcome {
    Outcome::Reject(rejection(record, event, ctx, reason, retryable, kind))
}

fn rejection(
    record: &SessionRecord,
    event: &SessionEvent,
    ctx: &Context<'_>,
    reason: ReasonCode,
    retryable: bool,
    kind: Option<EventKind>,
) -> Rejection {
    let refusal = Refusal { reason, retryable };
    let kind = kind.unwrap_or_else(|| refusal_kind(event, refusal));
    refuse(record, ctx, refusal, kind)
}

/// The audit event that reports `refusal` of `event`.
fn refusal_kind(event: &SessionEvent, refusal: Refusal) -> EventKind {
    match event {
        SessionEvent::Reattach(_) => EventKind::ReattachRejected {
            retryable: refusal.retryable,
        },
        other => EventKind::EventRejected {
            event: Cow::Borrowed(other.name()),
            retryable: refusal.retryable,
        },
    }
}

fn event_at(
    record: &SessionRecord,
    ctx: &Context<'_>,
    reason: ReasonCode,
    kind: EventKind,
) -> AuditEvent {
    AuditEvent {
        ts_ms: ctx.now.as_millis(),
        node_id: ctx.node.clone(),
        session_id: Some(record.session_id),
        state_version: record.state_version,
        owner_epoch: record.owner_epoch,
        reason_code: reason,
        kind,
    }
}

#[derive(Clone, Copy)]
enum OwnerEventKind {
    Frozen,
    Resumed,
}

/// A mutation under construction: a copy of the record at the next version, and its events.
struct Draft<'r, 'c> {
    old: &'r SessionRecord,
    ctx: &'r Context<'c>,
    rec: SessionRecord,
    /// Events that refer to the old version (a refusal that precedes a termination).
    before: Vec<AuditEvent>,
    events: Vec<AuditEvent>,
    state_reason: Option<ReasonCode>,
}

impl<'r, 'c> Draft<'r, 'c> {
    fn begin(old: &'r SessionRecord, ctx: &'r Context<'c>) -> Self {
        let mut rec = old.clone();
        // The caller never passes a terminated record, and the version is kept at or below
        // LAST_USABLE_VERSION for every non-terminal record (see `finish`), so this cannot
        // saturate; saturating keeps it total all the same.
        rec.state_version = StateVersion(old.state_version.0.saturating_add(1));
        Self {
            old,
            ctx,
            rec,
            before: Vec::new(),
            events: Vec::with_capacity(3),
            state_reason: None,
        }
    }

    fn set_state(&mut self, state: SessionState, reason: ReasonCode) {
        if state != self.rec.state {
            self.rec.timestamps.state_changed = self.ctx.now;
        }
        self.rec.state = state;
        self.state_reason = Some(reason);
    }

    fn bind(&mut self, candidate: Candidate) {
        let binding = candidate.bind_at(self.rec.state_version);
        self.rec.binding = Some(binding);
        self.rec.last_bound_version = self.rec.state_version;
        self.rec.last_transport_id = Some(candidate.transport_id);
        self.rec.timestamps.transport_lost = None;
        self.rec.timestamps.recovering_since = None;
    }

    fn unbind(&mut self) {
        if self.rec.binding.take().is_some() {
            self.rec.timestamps.transport_lost = Some(self.ctx.now);
        }
    }

    fn terminate(&mut self, reason: ReasonCode) {
        self.rec.binding = None;
        self.rec.frozen = false;
        self.rec.termination = Some(Termination {
            reason,
            at: self.ctx.now,
        });
        self.rec.timestamps.recovering_since = None;
        self.set_state(SessionState::Terminated, reason);
    }

    fn push(&mut self, reason: ReasonCode, kind: EventKind) {
        let event = event_at(&self.rec, self.ctx, reason, kind);
        self.events.push(event);
    }

    fn push_refusal_of(&mut self, event: &SessionEvent, refusal: Refusal) {
        let kind = refusal_kind(event, refusal);
        self.before
            .push(event_at(self.old, self.ctx, refusal.reason, kind));
    }

    fn owner_kind(&self, which: OwnerEventKind, new_owner: Option<NodeId>) -> EventKind {
        let previous_owner = Some(self.rec.owner.clone());
        match which {
            OwnerEventKind::Frozen => EventKind::SessionFrozen {
                previous_owner,
                new_owner,
            },
            OwnerEventKind::Resumed => EventKind::SessionResumed {
                previous_owner,
                new_owner,
            },
        }
    }

    fn finish(mut self, refusal: Option<Refusal>) -> Outcome {
        if self.rec.state != SessionState::Terminated
            && self.rec.state_version > LAST_USABLE_VERSION
        {
            // The version counter is exhausted: the only mutation left is the end.
            let mut d = Draft::begin(self.old, self.ctx);
            d.before = std::mem::take(&mut self.before);
            d.terminate(ReasonCode::CounterExhausted);
            return d.finish(refusal);
        }
        let reason = self.state_reason.unwrap_or(ReasonCode::InvalidTransition);
        let change = event_at(
            &self.rec,
            self.ctx,
            reason,
            EventKind::StateChange {
                previous_state: self.old.state,
                new_state: self.rec.state,
                transport_id: self.rec.binding.map(|b| b.transport_id),
            },
        );
        // Refusals of the old version first, then the STATE_CHANGE, then what describes it.
        let mut events = self.events;
        events.insert(0, change);
        if !self.before.is_empty() {
            events.splice(0..0, self.before);
        }
        if self.rec.state == SessionState::Terminated {
            let lifetime = self.ctx.now.since(self.rec.timestamps.created);
            let total_switches = self.rec.switches.total();
            events.push(event_at(
                &self.rec,
                self.ctx,
                reason,
                EventKind::TerminationEvent {
                    total_lifetime_ms: lifetime,
                    total_switches,
                },
            ));
        }
        Outcome::Commit(Commit {
            expected: self.old.state_version,
            record: self.rec,
            events,
            refusal,
        })
    }
}

//! Audit events (SPEC §8): one JSON object per line, with exactly the field names of the spec.
//!
//! The core builds these values; a driver serialises them (`serde_json::to_string`) and appends
//! them to its node's stream. [`check`] verifies the invariants over the merged streams of all
//! nodes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, OwnerEpoch, SessionId, StateVersion, TransportId};
use crate::reason::{ReasonCode, ViolationType};
use crate::record::{Proto, SessionState};

pub mod check;

/// One audit event. Serialises to a flat JSON object carrying the required fields (`ts_ms`,
/// `node_id`, `event_type`, `session_id`, `state_version`, `owner_epoch`, `reason_code`) and the
/// extra fields of its type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The node that wrote the event.
    pub node_id: NodeId,
    /// The session; `null` only for node-wide events (`AUDIT_GAP`).
    pub session_id: Option<SessionId>,
    /// The record version the event belongs to: for a `STATE_CHANGE` the new version, for a
    /// rejection the version that was current (and stays so).
    pub state_version: StateVersion,
    /// The owner epoch at that version.
    pub owner_epoch: OwnerEpoch,
    /// The primary cause.
    pub reason_code: ReasonCode,
    /// `event_type` and the fields of that type.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The type of an audit event and its extra fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A session was created by a handshake.
    SessionCreated {
        /// The state it was created in (ATTACHED).
        new_state: SessionState,
        /// Its first binding.
        transport_id: TransportId,
        /// UDP or TCP.
        proto: Proto,
    },
    /// An accepted mutation of the record: exactly one per version.
    StateChange {
        /// State before.
        previous_state: SessionState,
        /// State after (may equal `previous_state`, e.g. for a freeze).
        new_state: SessionState,
        /// The binding after the change, `null` when there is none. (An addition to §8 that
        /// lets the checker verify the single-binding rule.)
        transport_id: Option<TransportId>,
    },
    /// The binding moved to a new transport.
    TransportSwitch {
        /// The binding replaced (or the last one, when the session was RECOVERING).
        old_transport_id: Option<TransportId>,
        /// The new binding.
        new_transport_id: TransportId,
        /// Its protocol.
        proto: Proto,
        /// From loss of the old binding (as the gateway saw it) to the switch.
        switch_latency_ms: u64,
    },
    /// A reattach was refused; nothing changed.
    ReattachRejected {
        /// Whether the client may retry.
        retryable: bool,
    },
    /// Any other refused request; nothing changed. (An addition to §8.)
    EventRejected {
        /// The refused request, e.g. `"TRANSPORT_DEAD"`.
        event: Cow<'static, str>,
        /// Whether it may be retried.
        retryable: bool,
    },
    /// Something that looks like an attack or an integrity problem.
    SecurityEvent {
        /// Which kind.
        violation_type: ViolationType,
    },
    /// A policy bound was crossed.
    PolicyEvent {
        /// The knob, as named in the `[policy]` table.
        policy_name: Cow<'static, str>,
        /// Its value.
        threshold_value: u64,
        /// What was observed.
        observed_value: u64,
    },
    /// The session ended.
    TerminationEvent {
        /// From birth to termination.
        total_lifetime_ms: u64,
        /// Accepted switches over the session's life.
        total_switches: u64,
    },
    /// A node became owner (at creation or by failover).
    SessionOwnerAcquired {
        /// The owner before, if any.
        previous_owner: Option<NodeId>,
        /// The owner now.
        new_owner: Option<NodeId>,
    },
    /// Ownership moved by migration, drain or failover.
    SessionOwnerTransferred {
        /// The owner before.
        previous_owner: Option<NodeId>,
        /// The owner now.
        new_owner: Option<NodeId>,
    },
    /// An ownership operation was refused; nothing changed.
    SessionOwnerRejected {
        /// The current owner.
        previous_owner: Option<NodeId>,
        /// The owner that was asked for.
        new_owner: Option<NodeId>,
    },
    /// Two nodes claimed the session; the loser changed nothing.
    SessionOwnerConflict {
        /// The owner of record.
        previous_owner: Option<NodeId>,
        /// The claimant.
        new_owner: Option<NodeId>,
    },
    /// The session was frozen for a migration.
    SessionFrozen {
        /// The owner.
        previous_owner: Option<NodeId>,
        /// The intended owner, when known.
        new_owner: Option<NodeId>,
    },
    /// A freeze was lifted.
    SessionResumed {
        /// The owner.
        previous_owner: Option<NodeId>,
        /// The owner.
        new_owner: Option<NodeId>,
    },
    /// Events were lost because the audit queue was full.
    AuditGap {
        /// How many.
        dropped: u64,
    },
}

impl EventKind {
    /// The `event_type` string.
    pub const fn event_type(&self) -> &'static str {
        match self {
            EventKind::SessionCreated { .. } => "SESSION_CREATED",
            EventKind::StateChange { .. } => "STATE_CHANGE",
            EventKind::TransportSwitch { .. } => "TRANSPORT_SWITCH",
            EventKind::ReattachRejected { .. } => "REATTACH_REJECTED",
            EventKind::EventRejected { .. } => "EVENT_REJECTED",
            EventKind::SecurityEvent { .. } => "SECURITY_EVENT",
            EventKind::PolicyEvent { .. } => "POLICY_EVENT",
            EventKind::TerminationEvent { .. } => "TERMINATION_EVENT",
            EventKind::SessionOwnerAcquired { .. } => "SESSION_OWNER_ACQUIRED",
            EventKind::SessionOwnerTransferred { .. } => "SESSION_OWNER_TRANSFERRED",
            EventKind::SessionOwnerRejected { .. } => "SESSION_OWNER_REJECTED",
            EventKind::SessionOwnerConflict { .. } => "SESSION_OWNER_CONFLICT",
            EventKind::SessionFrozen { .. } => "SESSION_FROZEN",
            EventKind::SessionResumed { .. } => "SESSION_RESUMED",
            EventKind::AuditGap { .. } => "AUDIT_GAP",
        }
    }
}

impl AuditEvent {
    /// An `AUDIT_GAP` event: `dropped` events of this node were lost.
    pub fn gap(ts_ms: u64, node_id: NodeId, dropped: u64) -> Self {
        Self {
            ts_ms,
            node_id,
            session_id: None,
            state_version: StateVersion(0),
            owner_epoch: OwnerEpoch(0),
            reason_code: ReasonCode::AuditQueueOverflow,
            kind: EventKind::AuditGap { dropped },
        }
    }

    /// The event as one line of JSON (without the newline).
    pub fn to_json_line(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

//! Reason codes (SPEC §10): stable UPPER_SNAKE_CASE strings, one primary cause each, never
//! renamed. New codes may be added; existing strings never change.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    (
        $(#[$doc:meta])* $name:ident { $( $(#[$vdoc:meta])* $variant:ident = $text:literal, )* }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vdoc])* #[serde(rename = $text)] $variant, )*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The stable wire and audit string.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownCode;

            fn from_str(s: &str) -> Result<Self, UnknownCode> {
                match s {
                    $($text => Ok($name::$variant),)*
                    _ => Err(UnknownCode { kind: stringify!($name) }),
                }
            }
        }
    };
}

/// A string that names no known code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownCode {
    kind: &'static str,
}

impl fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {}", self.kind)
    }
}

impl std::error::Error for UnknownCode {}

string_enum! {
    /// The cause of a transition, a rejection or an ownership change.
    ///
    /// Append only: a code's position here is its number on the wire (`wire::reason_id`).
    ReasonCode {
        // Transitions.
        /// The handshake completed: BIRTH → ATTACHED.
        HandshakeOk = "HANDSHAKE_OK",
        /// The handshake failed: BIRTH → TERMINATED.
        HandshakeFail = "HANDSHAKE_FAIL",
        /// A newer handshake from the same client key replaced this session.
        SessionSuperseded = "SESSION_SUPERSEDED",
        /// Health crossed a volatility threshold: ATTACHED → VOLATILE.
        VolatilitySignal = "VOLATILITY_SIGNAL",
        /// Health stayed within bounds long enough: VOLATILE → ATTACHED.
        HealthRecovered = "HEALTH_RECOVERED",
        /// The binding was declared dead: → RECOVERING.
        RecoveryStart = "RECOVERY_START",
        /// A reattach was accepted: → ATTACHED on a new binding.
        TransportSwitchOk = "TRANSPORT_SWITCH_OK",
        /// RECOVERING lasted longer than the recovery window.
        RecoveryBoundsExceeded = "RECOVERY_BOUNDS_EXCEEDED",
        /// VOLATILE lasted longer than its bound: → DEGRADED.
        EnterDegradedMode = "ENTER_DEGRADED_MODE",
        /// Health recovered while DEGRADED: → ATTACHED.
        ExitDegradedMode = "EXIT_DEGRADED_MODE",
        /// The session's lifetime ended.
        TtlSessionExpired = "TTL_SESSION_EXPIRED",
        /// The session went without a binding for longer than the transport-loss TTL.
        TtlTransportLossExpired = "TTL_TRANSPORT_LOSS_EXPIRED",
        /// Ended by the client, an operator or a policy bound.
        PolicyTermination = "POLICY_TERMINATION",
        /// An integrity violation of the protocol.
        FatalProtocolError = "FATAL_PROTOCOL_ERROR",
        /// The owner was lost and `on_owner_loss = "terminate"`.
        OwnerLost = "OWNER_LOST",
        /// Terminated on one side of a partition.
        PartitionTerminated = "PARTITION_TERMINATED",

        // Reattach and handshake outcomes.
        /// A reattach was accepted.
        ReattachAccept = "REATTACH_ACCEPT",
        /// The proof of possession (or a handshake) did not authenticate.
        AuthFail = "AUTH_FAIL",
        /// A handshake timestamp was not newer than the last accepted one.
        FreshnessInvalid = "FRESHNESS_INVALID",
        /// A control nonce was not greater than the last accepted one.
        ReplayDetected = "REPLAY_DETECTED",
        /// The client's known version predates the most recent binding.
        StaleVersion = "STALE_VERSION",
        /// The client's known version is ahead of the stored one (a rolled-back store).
        VersionAhead = "VERSION_AHEAD",
        /// Another node owns the session, or lost a CAS race.
        OwnershipConflict = "OWNERSHIP_CONFLICT",
        /// The owner cannot be reached and failover is not allowed.
        OwnerUnavailable = "OWNER_UNAVAILABLE",
        /// The session is frozen for a migration; retry.
        SessionFrozen = "SESSION_FROZEN",
        /// No such session.
        SessionNotFound = "SESSION_NOT_FOUND",
        /// The session is terminated or its lifetime is over.
        SessionExpired = "SESSION_EXPIRED",
        /// A policy bound (switch rate) refused the request.
        PolicyDeny = "POLICY_DENY",
        /// Too many requests, or a switch within the cooldown.
        RateLimited = "RATE_LIMITED",
        /// The session store cannot be reached: fail closed.
        StoreUnavailable = "STORE_UNAVAILABLE",
        /// A store commit's outcome could not be resolved.
        CommitUnknown = "COMMIT_UNKNOWN",

        // Ownership.
        /// The session was created with its first owner.
        OwnerCreated = "OWNER_CREATED",
        /// Controlled migration (freeze, transfer, resume).
        Migration = "MIGRATION",
        /// Migration of every session off a draining node.
        Drain = "DRAIN",
        /// The owner's lease expired and another node took the session.
        Failover = "FAILOVER",

        // Additions.
        /// An event that the session's current state does not allow.
        InvalidTransition = "INVALID_TRANSITION",
        /// A controlled migration failed to commit and the freeze was undone.
        MigrationAborted = "MIGRATION_ABORTED",
        /// Audit events were dropped because the audit queue was full.
        AuditQueueOverflow = "AUDIT_QUEUE_OVERFLOW",
        /// A counter would overflow: the session ends deterministically.
        CounterExhausted = "COUNTER_EXHAUSTED",
    }
}

impl ReasonCode {
    /// Whether this code names an ownership change (SPEC §7.4: the only three ways).
    pub const fn is_ownership_transfer(self) -> bool {
        matches!(
            self,
            ReasonCode::Migration | ReasonCode::Drain | ReasonCode::Failover
        )
    }

    /// Whether this code can only ever describe a refused request, never an accepted mutation
    /// other than a termination.
    pub const fn is_rejection_only(self) -> bool {
        matches!(
            self,
            ReasonCode::AuthFail
                | ReasonCode::FreshnessInvalid
                | ReasonCode::ReplayDetected
                | ReasonCode::StaleVersion
                | ReasonCode::OwnerUnavailable
                | ReasonCode::SessionFrozen
                | ReasonCode::SessionNotFound
                | ReasonCode::PolicyDeny
                | ReasonCode::RateLimited
                | ReasonCode::StoreUnavailable
                | ReasonCode::InvalidTransition
        )
    }
}

string_enum! {
    /// The kind of a `SECURITY_EVENT` (its `violation_type`).
    ViolationType {
        /// A replayed control message or handshake.
        ReplayAttempt = "SEC_REPLAY_ATTEMPT",
        /// A proof of possession that did not verify.
        InvalidProof = "SEC_INVALID_PROOF",
        /// An attempt to bind a session the sender does not hold.
        SessionFixationAttempt = "SEC_SESSION_FIXATION_ATTEMPT",
        /// Ownership facts that contradict each other.
        OwnershipAnomaly = "SEC_OWNERSHIP_ANOMALY",
        /// Abuse of the control plane (floods, malformed storms).
        AbuseControlPlane = "SEC_ABUSE_CONTROL_PLANE",
        /// A store write whose outcome is unknown or partial.
        PartialWrite = "SEC_PARTIAL_WRITE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_serialise_to_exactly_their_spec_strings() {
        // SPEC §10, verbatim. A rename here is a breaking change to every audit consumer.
        let spec = "HANDSHAKE_OK HANDSHAKE_FAIL SESSION_SUPERSEDED VOLATILITY_SIGNAL \
            HEALTH_RECOVERED RECOVERY_START TRANSPORT_SWITCH_OK RECOVERY_BOUNDS_EXCEEDED \
            ENTER_DEGRADED_MODE EXIT_DEGRADED_MODE TTL_SESSION_EXPIRED TTL_TRANSPORT_LOSS_EXPIRED \
            POLICY_TERMINATION FATAL_PROTOCOL_ERROR OWNER_LOST PARTITION_TERMINATED \
            REATTACH_ACCEPT AUTH_FAIL FRESHNESS_INVALID REPLAY_DETECTED STALE_VERSION \
            VERSION_AHEAD OWNERSHIP_CONFLICT OWNER_UNAVAILABLE SESSION_FROZEN SESSION_NOT_FOUND \
            SESSION_EXPIRED POLICY_DENY RATE_LIMITED STORE_UNAVAILABLE COMMIT_UNKNOWN \
            OWNER_CREATED MIGRATION DRAIN FAILOVER";
        for text in spec.split_whitespace() {
            let code: ReasonCode = text.parse().expect("every spec code parses");
            assert_eq!(code.as_str(), text);
            let json = serde_json::to_string(&code).expect("serialises");
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<ReasonCode>(&json).ok(), Some(code));
        }
        let violations = "SEC_REPLAY_ATTEMPT SEC_INVALID_PROOF SEC_SESSION_FIXATION_ATTEMPT \
            SEC_OWNERSHIP_ANOMALY SEC_ABUSE_CONTROL_PLANE SEC_PARTIAL_WRITE";
        for text in violations.split_whitespace() {
            let v: ViolationType = text.parse().expect("every violation type parses");
            assert_eq!(serde_json::to_string(&v).ok(), Some(format!("\"{text}\"")));
        }
    }

    #[test]
    fn every_code_round_trips_and_is_upper_snake_case() {
        for code in ReasonCode::ALL {
            assert_eq!(code.as_str().parse::<ReasonCode>(), Ok(*code));
            assert!(code
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_'));
        }
        assert!("handshake_ok".parse::<ReasonCode>().is_err());
    }
}

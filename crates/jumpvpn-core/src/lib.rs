//! The sans-IO core of Jumping VPN.
//!
//! Everything that decides what a session may do lives here, and nothing here performs I/O:
//! no sockets, no files, no clock, no random generator. Time (`now`) and randomness (fresh
//! session IDs, keys) are inputs; store writes and audit records are outputs, returned as
//! values for a driver to carry out.
//!
//! ```text
//!   driver (gateway)                          core
//!   ─────────────────                         ────────────────────────────────────────────
//!   packet / timer / admin call ──event──▶    machine::apply(record, event, ctx)
//!                                                 │
//!   store.cas(expected, record)  ◀──Commit────────┤   (record at version + 1, audit events)
//!   audit writer (JSONL)         ◀──events────────┤
//!   reply REATTACH_REJECT        ◀──Rejection─────┘   (nothing changed, audit events)
//!
//!   audit streams of every node ──lines──▶    audit::check::Checker ──▶ violations
//! ```
//!
//! Modules: [`ids`] (newtypes), [`reason`] (SPEC §10 codes), [`policy`] (§6), [`record`] (§2),
//! [`machine`] (§3 and §4 steps 5–9), [`health`] (volatility signals), [`replay`] (data and
//! control anti-replay), [`audit`] (§8 events and the invariant checker), [`ownership`] (§7:
//! who may carry a session, rendezvous routing, migration, drain and failover), [`wire`] (§4
//! codec) and [`crypto`] (§5: proofs, per-binding keys, sealing).

#![forbid(unsafe_code)]

pub mod audit;
pub mod crypto;
pub mod endpoint;
pub mod handshake;
pub mod health;
pub mod ids;
pub mod machine;
pub mod ownership;
pub mod policy;
pub mod reason;
pub mod record;
pub mod replay;
pub mod wire;

pub use audit::{AuditEvent, EventKind};
pub use ids::{NodeId, OwnerEpoch, SessionId, StateVersion, Timestamp, TransportId};
pub use machine::{apply, next_deadline, Commit, Context, Outcome, Rejection, SessionEvent};
pub use policy::Policy;
pub use reason::{ReasonCode, ViolationType};
pub use record::{Binding, Candidate, Proto, SessionRecord, SessionState};

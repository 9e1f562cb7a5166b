//! The session store: where the authoritative [`SessionRecord`]s live, and the contract every
//! backend keeps (SPEC §7).
//!
//! There is no write path without a version compare. A record enters the store with
//! [`SessionStore::create`] (which fails if the session exists) and changes only through
//! [`SessionStore::compare_and_swap`], which applies iff the stored `state_version` equals the
//! expected one — so two nodes racing on one session produce exactly one winner, and the loser
//! learns the current record. Last-write-wins is impossible by construction.
//!
//! Backends:
//! - [`memory::MemoryStore`] — the reference, used by deterministic simulations;
//! - [`embedded::EmbeddedStore`] — redb, durable, with group commit (the default);
//! - [`etcd::EtcdStore`] — a shared, linearizable store for clusters, every write one guarded
//!   transaction, a lost answer decided by reading back and fencing, never by a blind retry.
//!
//! Node liveness ([`Liveness`]) is a lease with a TTL; [`lease::LeaseKeeper`] keeps it alive
//! and computes the *local deadline* of SPEC §7.3, after which a node stops binding and
//! forwarding before the store could let anyone else in.

use std::fmt;
use std::future::Future;

use jumpvpn_core::{NodeId, ReasonCode, SessionId, SessionRecord, StateVersion, Timestamp};

pub mod codec;
pub mod embedded;
pub mod etcd;

pub mod lease;
pub mod memory;

/// The contract of a session store. Every method is one atomic step: it either happens whole
/// or not at all, and an error says which of those is known.
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new record. Fails with [`StoreError::AlreadyExists`] (carrying the stored
    /// record) if the session is present.
    fn create(&self, record: &SessionRecord)
        -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stored record of `session`, if any.
    fn get(
        &self,
        session: SessionId,
    ) -> impl Future<Output = Result<Option<SessionRecord>, StoreError>> + Send;

    /// Replaces the stored record of `record.session_id` with `record` iff the stored version
    /// is `expected`. `record.state_version` must be `expected + 1`.
    ///
    /// On a version mismatch: [`StoreError::Conflict`] with the current record, and nothing
    /// written.
    fn compare_and_swap(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A failover's write (SPEC §7.4): [`SessionStore::compare_and_swap`], applied only if
    /// `previous_owner` holds no live lease *at the moment of the write*. One atomic step: a
    /// liveness check followed by a separate CAS would let the owner renew in between, and the
    /// session would be taken from a node that still acts as its owner.
    ///
    /// If the owner is alive: [`StoreError::OwnerAlive`], and nothing written.
    fn compare_and_swap_if_dead(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        previous_owner: &NodeId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` records owned by `owner` whose ID is greater than `after`, in ID order
    /// (pass the last ID of a page to get the next).
    fn list_by_owner(
        &self,
        owner: &NodeId,
        after: Option<SessionId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SessionRecord>, StoreError>> + Send;

    /// Removes the records of sessions that terminated before `before` (the retention period
    /// is the caller's choice). Returns how many were removed. Live sessions are never removed.
    fn remove_terminated(
        &self,
        before: Timestamp,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A lease held in a store, identifying one node's registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// Node liveness: a key bound to a lease with a TTL (SPEC §7.2, §7.3).
pub trait Liveness: Send + Sync + 'static {
    /// Registers `node` as alive under a new lease of `ttl_ms`.
    fn register(
        &self,
        node: &NodeId,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Renews the lease. `Ok` means the store acknowledged the renewal;
    /// [`StoreError::LeaseExpired`] that it had already expired (the node must register anew,
    /// and it has lost every session the lease covered).
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether `node` holds an unexpired lease in the store.
    fn is_alive(&self, node: &NodeId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease up (on shutdown, after a drain).
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Why a store operation failed. Peer-visible outcomes map to reason codes with
/// [`StoreError::reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The stored version was not the expected one; nothing was written.
    Conflict {
        /// The record as stored now.
        current: Box<SessionRecord>,
    },
    /// `create` of a session that exists; nothing was written.
    AlreadyExists {
        /// The record as stored.
        current: Box<SessionRecord>,
    },
    /// A failover's write was refused because the previous owner's lease is live; nothing was
    /// written.
    OwnerAlive {
        /// The owner whose lease is live.
        node: NodeId,
    },
    /// No record for the session.
    NotFound {
        /// The session asked for.
        session: SessionId,
    },
    /// The store cannot be reached or cannot commit (no quorum, no leader, stopped, I/O
    /// failure before the commit): the operation did not happen.
    Unavailable {
        /// What went wrong.
        detail: String,
    },
    /// A write was sent but whether it applied could not be determined, even by re-reading.
    /// The caller must abort the transition and report `COMMIT_UNKNOWN`.
    CommitUnknown {
        /// The session written.
        session: SessionId,
        /// What went wrong.
        detail: String,
    },
    /// A lease is no longer valid in the store.
    LeaseExpired,
    /// A stored value could not be decoded; names its key.
    Corrupt {
        /// The key (session ID or node name).
        key: String,
        /// Why it does not decode.
        detail: String,
    },
    /// The request itself is wrong (e.g. the new version is not `expected + 1`). A bug in the
    /// caller, never a store condition.
    InvalidRequest {
        /// What is wrong.
        detail: String,
    },
}

impl StoreError {
    /// The reason code a client is told (SPEC §4 step 10).
    pub fn reason(&self) -> ReasonCode {
        match self {
            StoreError::Conflict { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::OwnerAlive { .. } => ReasonCode::OwnershipConflict,
            StoreError::NotFound { .. } => ReasonCode::SessionNotFound,
            StoreError::Unavailable { .. } | StoreError::LeaseExpired => {
                ReasonCode::StoreUnavailable
            }
            StoreError::CommitUnknown { .. } => ReasonCode::CommitUnknown,
            StoreError::Corrupt { .. } | StoreError::InvalidRequest { .. } => {
                ReasonCode::FatalProtocolError
            }
        }
    }

    pub(crate) fn unavailable(detail: impl fmt::Display) -> Self {
        StoreError::Unavailable {
            detail: detail.to_string(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Conflict { current } => write!(
                f,
                "version conflict on session {}: stored version is {}",
                current.session_id, current.state_version
            ),
            StoreError::AlreadyExists { current } => {
                write!(f, "session {} already exists", current.session_id)
            }
            StoreError::NotFound { session } => write!(f, "session {session} not found"),
            StoreError::OwnerAlive { node } => {
                write!(f, "failover refused: owner {node} still holds a live lease")
            }
            StoreError::Unavailable { detail } => write!(f, "store unavailable: {detail}"),
            StoreError::CommitUnknown { session, detail } => {
                write!(f, "commit outcome unknown for session {session}: {detail}")
            }
            StoreError::LeaseExpired => f.write_str("lease expired"),
            StoreError::Corrupt { key, detail } => write!(f, "corrupt value at {key}: {detail}"),
            StoreError::InvalidRequest { detail } => write!(f, "invalid store request: {detail}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Checks what every backend requires of a CAS request before touching the store.
pub(crate) fn check_cas_request(
    expected: StateVersion,
    record: &SessionRecord,
) -> Result<(), StoreError> {
    if expected.next() != Some(record.state_version) {
        return Err(StoreError::InvalidRequest {
            detail: format!(
                "new version {} is not expected version {} + 1",
                record.state_version, expected
            ),
        });
    }
    Ok(())
}

/// Checks what every backend requires of a create request.
pub(crate) fn check_create_request(record: &SessionRecord) -> Result<(), StoreError> {
    if record.state_version == StateVersion(0) {
        return Err(StoreError::InvalidRequest {
            detail: "a BIRTH record (version 0) is never stored".to_owned(),
        });
    }
    Ok(())
}

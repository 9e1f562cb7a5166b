//! Ownership rules (SPEC §7): who may carry a session, and how ownership moves.
//!
//! Pure like the rest of the core: the driver supplies the cluster facts it observed (the
//! member list, the owner's lease as the store reports it, whether this node's own lease is
//! still valid by its local deadline) and the randomness; this module decides. Every record it
//! produces comes from [`machine::apply`], so the transition rules live in one place and the
//! ownership gate of `apply` (only the owner mutates, except `Failover` and `Terminate`) stays
//! the last line of defence.
//!
//! # The reattach decision ([`decide`], SPEC §4 step 5, §7.4, §7.5)
//!
//! Read top to bottom; the first row that matches wins. "lease" is this node's own lease
//! (`local_lease_valid`), "owner's lease" is [`OwnerLiveness`] as the store reports it.
//!
//! | mode   | owner        | lease | owner's lease | on_owner_loss | decision                     |
//! |--------|--------------|-------|---------------|---------------|------------------------------|
//! | any    | (terminated) |   –   |       –       |       –       | `SESSION_EXPIRED`, final     |
//! | single | this         |   –   |       –       |       –       | proceed                      |
//! | single | other        |   –   |       –       |       –       | `OWNERSHIP_CONFLICT`, final  |
//! | sticky | this         |   –   |       –       |       –       | proceed                      |
//! | sticky | other        |   –   |       –       |       –       | `OWNERSHIP_CONFLICT` + hint  |
//! | shared | any          | no    |       –       |       –       | `STORE_UNAVAILABLE`          |
//! | shared | this         | yes   |       –       |       –       | proceed                      |
//! | shared | other        | yes   | alive         |       –       | `OWNERSHIP_CONFLICT` + hint  |
//! | shared | other        | yes   | unknown       |       –       | `STORE_UNAVAILABLE`          |
//! | shared | other        | yes   | expired       | failover      | failover first               |
//! | shared | other        | yes   | expired       | deny          | `OWNER_UNAVAILABLE`          |
//! | shared | other        | yes   | expired       | terminate     | terminate, `OWNER_LOST`      |
//!
//! "proceed" is [`Decision::Proceed`], "failover first" [`Decision::FailoverFirst`], "terminate"
//! [`Decision::Terminate`]; a code is a [`Decision::Reject`] with that reason, retryable unless
//! marked final.
//!
//! A frozen record owned here is "proceed": [`machine::apply`] refuses the reattach with
//! `SESSION_FROZEN`, so the freeze rule is written once. The owner hint is the member whose ID
//! is the record's owner, except in sticky mode where it is the rendezvous owner (the static
//! routing function), falling back to the record's owner when the hash names this node.
//!
//! # Transfers (SPEC §7.4)
//!
//! ```text
//!   migration / drain (old owner A)              failover (new owner B)
//!   ─────────────────────────────────            ─────────────────────────────────────────
//!   Freeze    v → v+1  frozen                    owner's lease expired in the store
//!     │ CAS ok                                     │
//!   Transfer  v+1 → v+2  owner := B, epoch + 1     Failover  v → v+1  owner := B, epoch + 1
//!     │ CAS failed ──▶ Abort (Unfreeze) v+2        │
//!     ▼                                            ▼
//!   A sends REDIRECT, stops forwarding           B validates the reattach as usual
//!   client reattaches to B (decide: proceed)
//! ```
//!
//! # Sticky routing
//!
//! [`rendezvous_owner`] is highest-random-weight hashing over (session ID, member ID) with a
//! hash written here ([`rendezvous_weight`]), so every node of every version computes the same
//! owner. [`mint_session_id`] draws session IDs until one routes to the minting node.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::audit::EventKind;
use crate::ids::{NodeId, SessionId, Timestamp};
use crate::machine::{self, Commit, Context, Outcome, Refusal, Rejection, SessionEvent};
use crate::reason::ReasonCode;
use crate::record::SessionRecord;

/// How the gateways of a deployment share sessions (`cluster.mode`, SPEC §1 and §7.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// One gateway owns every session (`"single"`, the default).
    #[default]
    Single,
    /// The owner is the rendezvous hash of (session ID, static member list); each node keeps
    /// its sessions in its own store (`"sticky"`).
    Sticky,
    /// The owner is whoever holds the session in the shared store, changed only by CAS
    /// (`"shared"`).
    Shared,
}

impl ClusterMode {
    /// The configuration string: `"single"`, `"sticky"` or `"shared"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClusterMode::Single => "single",
            ClusterMode::Sticky => "sticky",
            ClusterMode::Shared => "shared",
        }
    }
}

impl fmt::Display for ClusterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a shared cluster does with a session whose owner's lease has expired
/// (`cluster.on_owner_loss`, SPEC §7.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOwnerLoss {
    /// The node that next receives a reattach takes the session over by a failover CAS, then
    /// validates the reattach (`"failover"`, the default).
    #[default]
    Failover,
    /// Reattach is refused with `OWNER_UNAVAILABLE` until the owner returns or an operator runs
    /// the explicit failover (`"deny"`).
    Deny,
    /// The first node to see the session terminates it with `OWNER_LOST` (`"terminate"`).
    Terminate,
}

impl OnOwnerLoss {
    /// The configuration string: `"failover"`, `"deny"` or `"terminate"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            OnOwnerLoss::Failover => "failover",
            OnOwnerLoss::Deny => "deny",
            OnOwnerLoss::Terminate => "terminate",
        }
    }
}

impl fmt::Display for OnOwnerLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One gateway of the cluster, as listed in `cluster.members` (SPEC §9).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The node's `node_id`.
    pub id: NodeId,
    /// Where clients reach it over UDP.
    #[serde(default)]
    pub udp: Option<SocketAddr>,
    /// Where clients reach it over TCP.
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// Its admin API base URL.
    #[serde(default)]
    pub admin: Option<String>,
}

impl Member {
    /// A member with no addresses (tests, and lists built from node IDs alone).
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            udp: None,
            tcp: None,
            admin: None,
        }
    }
}

/// The liveness of a session's owner as the store reports it (SPEC §7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnerLiveness {
    /// The owner's liveness lease is held.
    Alive,
    /// The store says the owner's lease has expired: the owner has fenced itself.
    LeaseExpired,
    /// The store cannot be reached, or cannot prove either way. Treated as "cannot prove
    /// ownership": fail closed.
    Unknown,
}

/// The cluster facts a decision depends on, observed by the driver.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// `cluster.mode`.
    pub mode: ClusterMode,
    /// `cluster.on_owner_loss`.
    pub on_owner_loss: OnOwnerLoss,
    /// The record owner's lease, as the store reports it (ignored when this node is the owner,
    /// where `local_lease_valid` rules, and outside shared mode).
    pub owner_liveness: OwnerLiveness,
    /// Whether this node's own lease is valid by its local deadline (SPEC §7.3: the time it sent
    /// the last acknowledged keepalive, plus the TTL, minus a drift margin). Shared mode only.
    pub local_lease_valid: bool,
    /// `cluster.members`.
    pub members: &'a [Member],
}

/// What to do with a reattach, before its own checks (see the module's decision table).
#[must_use = "a decision must be acted on"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This node owns the session and may act on it: validate the reattach with
    /// [`machine::apply`] (which still refuses a frozen session with `SESSION_FROZEN`).
    Proceed,
    /// Refuse the reattach; nothing changes. Audit it with [`Decision::rejection`].
    Reject {
        /// The reason code for `REATTACH_REJECT`.
        reason: ReasonCode,
        /// Whether the client may retry (here or elsewhere).
        retryable: bool,
        /// The node the client should try instead, when known.
        owner_hint: Option<Member>,
    },
    /// The owner's lease has expired and `on_owner_loss = "failover"`: commit
    /// [`explicit_failover`] (with [`OwnerLiveness::LeaseExpired`]) first, then decide again on
    /// the new record and validate the reattach.
    FailoverFirst,
    /// The owner's lease has expired and `on_owner_loss = "terminate"`: commit
    /// [`SessionEvent::Terminate`] with `reason` (any node may), and refuse the reattach with
    /// the same reason, not retryable.
    Terminate {
        /// Always `OWNER_LOST`.
        reason: ReasonCode,
    },
}

impl Decision {
    /// The audited refusal of the reattach for a [`Decision::Reject`] (a `REATTACH_REJECTED` event
    /// at the record's unchanged version), or `None` for any other decision.
    pub fn rejection(&self, record: &SessionRecord, ctx: &Context<'_>) -> Option<Rejection> {
        let Decision::Reject {
            reason, retryable, ..
        } = self
        else {
            return None;
        };
        let kind = EventKind::ReattachRejected {
            retryable: *retryable,
        };
        Some(rejection_at(record, ctx, *reason, *retryable, kind))
    }
}

/// Decides whether this node may act on a reattach for `record` (SPEC §4 step 5, §7.4, §7.5).
/// See the module documentation for the table.
pub fn decide(record: &SessionRecord, this: &NodeId, facts: &Facts<'_>) -> Decision {
    // SPEC §4 step 4 precedes ownership: an ended session is final wherever it is asked about.
    if record.is_terminated() {
        return reject(ReasonCode::SessionExpired, false, None);
    }
    let owned_here = record.owner == *this;
    match facts.mode {
        ClusterMode::Single if owned_here => Decision::Proceed,
        // A single gateway that is not the owner (a renamed node, a copied store) never will
        // be: there is nowhere else to go, so the client should start over.
        ClusterMode::Single => reject(
            ReasonCode::OwnershipConflict,
            false,
            member(&record.owner, facts.members).cloned(),
        ),
        // The record in this node's own store is authoritative even if the member list has
        // changed since: no other node has a copy to serve.
        ClusterMode::Sticky if owned_here => Decision::Proceed,
        ClusterMode::Sticky => {
            let hint = rendezvous_owner(record.session_id, facts.members)
                .filter(|m| m.id != *this)
                .or_else(|| member(&record.owner, facts.members));
            reject(ReasonCode::OwnershipConflict, true, hint.cloned())
        }
        // SPEC §7.5: a node cut off from the store (its own lease not provably valid) rejects
        // everything and mutates nothing.
        ClusterMode::Shared if !facts.local_lease_valid => {
            reject(ReasonCode::StoreUnavailable, true, None)
        }
        ClusterMode::Shared if owned_here => Decision::Proceed,
        ClusterMode::Shared => match facts.owner_liveness {
            OwnerLiveness::Alive => reject(
                ReasonCode::OwnershipConflict,
                true,
                member(&record.owner, facts.members).cloned(),
            ),
            OwnerLiveness::Unknown => reject(ReasonCode::StoreUnavailable, true, None),
            OwnerLiveness::LeaseExpired => match facts.on_owner_loss {
                OnOwnerLoss::Failover => Decision::FailoverFirst,
                OnOwnerLoss::Deny => reject(ReasonCode::OwnerUnavailable, true, None),
                OnOwnerLoss::Terminate => Decision::Terminate {
                    reason: ReasonCode::OwnerLost,
                },
            },
        },
    }
}

/// Decides a reattach for a session this node has no record of. In sticky mode another node
/// may own it (each node stores only its own sessions), so the client is pointed at the
/// rendezvous owner; otherwise the session does not exist (`SESSION_NOT_FOUND`, final). The
/// caller is sure the record is absent: a store that cannot be read is `STORE_UNAVAILABLE`.
pub fn decide_unknown_session(session: SessionId, this: &NodeId, facts: &Facts<'_>) -> Decision {
    if facts.mode == ClusterMode::Sticky {
        if let Some(owner) = rendezvous_owner(session, facts.members).filter(|m| m.id != *this) {
            return reject(ReasonCode::OwnershipConflict, true, Some(owner.clone()));
        }
    }
    reject(ReasonCode::SessionNotFound, false, None)
}

/// Whether this node may bind a transport or forward traffic for `record` right now: it is the
/// owner of a live session and, in shared mode, its own lease is valid by its local deadline
/// (SPEC §7.3: it stops before the store can let anyone else in). This is the predicate whose
/// truth on two nodes at once would be dual-active (SPEC §7.1).
///
/// `record` is this node's latest copy. A stale copy (another node took the session over since)
/// is still safe: a failover needs the old owner's lease expired in the store, and the old
/// owner's local deadline passes before that, so `local_lease_valid` is already false. This
/// holds only for the lease the copy was read under: a node that registers a new lease must
/// re-read its records before it forwards again, or a fresh lease would vouch for a stale
/// "owner = me".
pub fn may_forward(
    record: &SessionRecord,
    this: &NodeId,
    local_lease_valid: bool,
    mode: ClusterMode,
) -> bool {
    record.owner == *this
        && !record.is_terminated()
        && (mode != ClusterMode::Shared || local_lease_valid)
}

/// Takes `record` over for `this` node after its owner's lease has expired (SPEC §7.4 way 3):
/// the operator's `cluster failover`, and the first step of [`Decision::FailoverFirst`].
///
/// Refused, with an audited `SESSION_OWNER_REJECTED`, while the owner is
/// [`OwnerLiveness::Alive`] (`OWNERSHIP_CONFLICT`) or its lease cannot be proven expired
/// ([`OwnerLiveness::Unknown`]: `STORE_UNAVAILABLE`). Otherwise the result is
/// [`machine::apply`] of [`SessionEvent::Failover`]: owner := `this`, epoch + 1, reason
/// `FAILOVER`, RECOVERING. A commit may instead end the session (a deadline had passed, or the
/// epoch is exhausted): check `commit.refusal` and the new record's state. This is meant for
/// shared mode; a sticky cluster has no failover (SPEC §7.2).
///
/// `owner_liveness` is the driver's reading, and readings age: the commit must be written with
/// the store's `compare_and_swap_if_dead`, which re-checks the owner's lease in the same atomic
/// step as the version compare. Checking, then writing with a plain CAS, lets the owner renew in
/// between (the model check's `SplitFailover` counter-example).
pub fn explicit_failover(
    record: &SessionRecord,
    this: &NodeId,
    owner_liveness: OwnerLiveness,
    now: Timestamp,
) -> Result<Commit, Rejection> {
    let ctx = Context { now, node: this };
    // A terminated record, or one this node already owns, is refused by `apply` in the order
    // of SPEC §4 (termination first); the liveness gate is only for taking a live record over.
    let takeover = !record.is_terminated() && record.owner != *this;
    if takeover {
        let refused = match owner_liveness {
            OwnerLiveness::LeaseExpired => None,
            OwnerLiveness::Alive => Some(ReasonCode::OwnershipConflict),
            OwnerLiveness::Unknown => Some(ReasonCode::StoreUnavailable),
        };
        if let Some(reason) = refused {
            return Err(owner_rejection(record, &ctx, reason, true, Some(this)));
        }
    }
    match machine::apply(record, &SessionEvent::Failover { to: this.clone() }, &ctx) {
        Outcome::Commit(commit) => Ok(commit),
        Outcome::Reject(rejection) => Err(rejection),
        // `apply` never leaves a failover unanswered; refuse rather than pretend it committed.
        Outcome::Unchanged => Err(owner_rejection(
            record,
            &ctx,
            ReasonCode::InvalidTransition,
            false,
            Some(this),
        )),
    }
}

/// A step of a controlled migration or a drain (SPEC §7.4 ways 1 and 2), applied by the
/// current owner. Each step is one CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationStep {
    /// Freeze the session: no new binding; traffic still flows on the current one.
    Freeze,
    /// Hand the frozen session over: owner := `to`, epoch + 1, binding cleared (RECOVERING).
    /// After it commits, the old owner sends `REDIRECT` and stops forwarding.
    Transfer,
    /// Undo the freeze after the transfer failed to commit (`MIGRATION_ABORTED`).
    Abort,
}

impl MigrationStep {
    /// The step that follows this one, given whether its CAS `committed`: a committed freeze
    /// is followed by the transfer, a failed transfer by the abort; otherwise the migration is
    /// over (done, or never started). A failed abort is retried by the driver on the re-read
    /// record: `apply` refuses it if the freeze is already gone.
    pub const fn next(self, committed: bool) -> Option<MigrationStep> {
        match (self, committed) {
            (MigrationStep::Freeze, true) => Some(MigrationStep::Transfer),
            (MigrationStep::Transfer, false) => Some(MigrationStep::Abort),
            _ => None,
        }
    }
}

/// Applies one migration step to `record` on `ctx.node` (which must be the owner; `apply`
/// refuses anyone else). `reason` is `MIGRATION` or `DRAIN`; `to` must be a member of
/// `members` other than the owner. An invalid `reason` or `to` is refused with
/// `INVALID_TRANSITION` and an audited `SESSION_OWNER_REJECTED` before anything is frozen.
/// [`MigrationStep::Abort`] needs neither: undoing a freeze is always allowed.
pub fn migration_step(
    record: &SessionRecord,
    step: MigrationStep,
    to: &NodeId,
    reason: ReasonCode,
    members: &[Member],
    ctx: &Context<'_>,
) -> Outcome {
    let event = match step {
        MigrationStep::Freeze => SessionEvent::Freeze { reason },
        MigrationStep::Transfer => SessionEvent::Transfer {
            to: to.clone(),
            reason,
        },
        MigrationStep::Abort => SessionEvent::Unfreeze,
    };
    // Termination and the ownership gate come first (SPEC §4 order): leave them to `apply`.
    let checked =
        step != MigrationStep::Abort && !record.is_terminated() && record.owner == *ctx.node;
    let valid = matches!(reason, ReasonCode::Migration | ReasonCode::Drain)
        && *to != record.owner
        && member(to, members).is_some();
    if checked && !valid {
        let rejection =
            owner_rejection(record, ctx, ReasonCode::InvalidTransition, false, Some(to));
        return Outcome::Reject(rejection);
    }
    machine::apply(record, &event, ctx)
}

/// Where a draining node's sessions go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// Each session to migrate (reason `DRAIN`) and its new owner.
    pub moves: Vec<(SessionId, NodeId)>,
    /// Sessions with no live member to go to. They stay in the store: a shared cluster fails
    /// them over once this node's lease expires, a sticky node resumes them when it restarts.
    pub stranded: Vec<SessionId>,
}

/// Plans a drain of `this` node (SPEC §7.4 way 2): every live session it owns goes to the
/// member the routing function picks among the live members other than `this` (rendezvous
/// over that list, so the load spreads evenly and the plan is the same wherever it is
/// computed). Records that are terminated or owned by another node are skipped.
pub fn plan_drain(
    sessions: &[SessionRecord],
    this: &NodeId,
    members: &[Member],
    live: &dyn Fn(&NodeId) -> bool,
) -> DrainPlan {
    let targets: Vec<&Member> = members
        .iter()
        .filter(|m| m.id != *this && live(&m.id))
        .collect();
    let mut plan = DrainPlan::default();
    for record in sessions {
        if record.is_terminated() || record.owner != *this {
            continue;
        }
        match highest_weight(record.session_id, targets.iter().copied()) {
            Some(target) => plan.moves.push((record.session_id, target.id.clone())),
            None => plan.stranded.push(record.session_id),
        }
    }
    plan
}

/// The member that owns `session` in sticky mode: the one with the highest
/// [`rendezvous_weight`] (ties, vanishingly rare, go to the greater node ID, so the result
/// does not depend on the list's order). `None` for an empty list.
///
/// Removing a member moves only the sessions it owned; adding one moves only sessions to it.
pub fn rendezvous_owner(session: SessionId, members: &[Member]) -> Option<&Member> {
    highest_weight(session, members.iter())
}

/// The weight of `member` for `session` in rendezvous hashing: a 64-bit FNV-1a over the
/// session ID's 16 bytes (big-endian, as printed) followed by the UTF-8 bytes of the node ID,
/// then the murmur3 `fmix64` finaliser, which spreads FNV's weak high bits over the whole word.
///
/// Stable by construction (no std hasher, whose output may change between Rust releases):
/// every node of every version computes the same owner. Not a keyed hash: a client that picks
/// its own session ID could aim it at a node, but session IDs are minted by gateways.
pub fn rendezvous_weight(session: SessionId, member: &NodeId) -> u64 {
    let h = fnv1a(FNV_OFFSET_BASIS, &session.to_bytes());
    fmix64(fnv1a(h, member.as_str().as_bytes()))
}

/// Draws session IDs from `random` until one routes to `this` under [`rendezvous_owner`]
/// (SPEC §7.2: a sticky node mints IDs that hash to itself). `None` when `this` is not a
/// member, or after `64 × members` draws (each draw succeeds with probability 1/members, so
/// that happens with probability below e⁻⁶⁴ for good randomness).
pub fn mint_session_id(
    this: &NodeId,
    members: &[Member],
    mut random: impl FnMut() -> [u8; 16],
) -> Option<SessionId> {
    member(this, members)?;
    let attempts = members.len().saturating_mul(MINT_ATTEMPTS_PER_MEMBER);
    (0..attempts)
        .map(|_| SessionId::from_bytes(random()))
        .find(|id| rendezvous_owner(*id, members).is_some_and(|m| m.id == *this))
}

/// The member whose ID is `id`, if listed.
pub fn member<'a>(id: &NodeId, members: &'a [Member]) -> Option<&'a Member> {
    members.iter().find(|m| m.id == *id)
}

/// Draws per member before [`mint_session_id`] gives up.
const MINT_ATTEMPTS_PER_MEMBER: usize = 64;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a, continuing from `state`.
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

/// murmur3's 64-bit finaliser: every input bit affects every output bit.
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

fn highest_weight<'a>(
    session: SessionId,
    members: impl Iterator<Item = &'a Member>,
) -> Option<&'a Member> {
    members.max_by_key(|m| {
        let m: &'a Member = m;
        (rendezvous_weight(session, &m.id), &m.id)
    })
}

fn reject(reason: ReasonCode, retryable: bool, owner_hint: Option<Member>) -> Decision {
    Decision::Reject {
        reason,
        retryable,
        owner_hint,
    }
}

/// A refused ownership operation, audited as `SESSION_OWNER_REJECTED` at the unchanged version.
fn owner_rejection(
    record: &SessionRecord,
    ctx: &Context<'_>,
    reason: ReasonCode,
    retryable: bool,
    new_owner: Option<&NodeId>,
) -> Rejection {
    let kind = EventKind::SessionOwnerRejected {
        previous_owner: Some(record.owner.clone()),
        new_owner: new_owner.cloned(),
    };
    rejection_at(record, ctx, reason, retryable, kind)
}

fn rejection_at(
    record: &SessionRecord,
    ctx: &Context<'_>,
    reason: ReasonCode,
    retryable: bool,
    kind: EventKind,
) -> Rejection {
    crate::machine::refuse(record, ctx, Refusal { reason, retryable }, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (isthe.com/chongo/tech/comp/fnv), 64-bit FNV-1a.
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fmix64_keeps_zero_and_moves_every_input_bit() {
        assert_eq!(fmix64(0), 0);
        // Avalanche: flipping any one input bit flips about half of the output bits.
        let base = fmix64(0x0123_4567_89ab_cdef);
        for bit in 0..64 {
            let flipped = fmix64(0x0123_4567_89ab_cdef ^ (1 << bit));
            let changed = (base ^ flipped).count_ones();
            assert!((16..=48).contains(&changed), "bit {bit}: {changed} bits");
        }
    }

    #[test]
    fn weight_depends_on_every_byte_of_session_and_member() {
        let id = SessionId::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);
        let base = rendezvous_weight(id, &NodeId::new("gw1"));
        for byte in 0..16 {
            let other = SessionId::from_u128(id.as_u128() ^ (1u128 << (8 * byte)));
            assert_ne!(rendezvous_weight(other, &NodeId::new("gw1")), base);
        }
        assert_ne!(rendezvous_weight(id, &NodeId::new("gw2")), base);
        assert_ne!(rendezvous_weight(id, &NodeId::new("gw1 ")), base);
    }
}

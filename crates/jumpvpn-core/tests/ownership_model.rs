//! A model check of the shared-store ownership protocol (SPEC §7.3–§7.5): an exhaustive,
//! deterministic breadth-first search over every interleaving of two gateways, the store and a
//! lossy, reordering network, up to a stated depth and time horizon, with the ownership
//! invariants checked in every reachable state and on every transition.
//!
//! # The model
//!
//! One session in `cluster.mode = "shared"` with `on_owner_loss = "failover"`, two gateways
//! A and B, one store, and a client. Time is discrete: ticks of one second, a lease TTL of 3
//! ticks and a drift margin of 1 ([`TTL`], [`DRIFT`]).
//!
//! ```text
//!        keep-alive (sent at t) ──▶ ┌──────────────────────────────┐
//!   A ◀── ack (of sent at t) ────── │ store: record (real type)    │ ──── ack ──▶ B
//!   │ cached record                 │        lease expiry per node │ ◀── keep-alive
//!   │ local deadline                └──────────────────────────────┘
//!   │ up / crashed                      ▲ CAS (expected == stored version)
//!   └── reattach: decide → apply ───────┘    client ──reattach──▶ A or B
//! ```
//!
//! A state ([`State`]) is: the time; the store's record and, per node, the store-side expiry
//! of its liveness lease; per node whether it is up, the record it last read or wrote, its
//! local lease deadline and whether its clock works; and the messages in flight. The search
//! starts from the session just created on A (the real handshake commit: version 1, epoch 1)
//! with both nodes registered at tick 0, once with both clocks working and once with both
//! clocks stopped (see below).
//!
//! Actions ([`Action`]), any of which may happen next:
//!
//! - `Tick`: time advances by one; the store drops leases whose expiry has come.
//! - `SendKeepalive(X)`: X sends a keep-alive stamped with the time it is sent.
//! - `StoreReceives(ka)`: the store extends X's lease to (time received) + TTL and sends an
//!   ack, but only if the lease is still held (an expired lease cannot be revived, as in etcd).
//! - `NodeReceives(ack)`: X moves its local deadline to (time the acknowledged keep-alive was
//!   SENT) + TTL − DRIFT (SPEC §7.3), if that is later than the one it has.
//! - `Lose(msg)`: the network drops a message. Delivery in any order is the reordering.
//! - `Crash(X)`: X loses its memory (cached record, deadline); its lease lives on in the store
//!   until it expires; its messages in flight may still arrive.
//! - `Restart(X)`: X registers a new lease (expiry now + TTL, local deadline now + TTL − DRIFT)
//!   and re-reads the record.
//! - `Read(X)`: X re-reads the record (a refresh, a redirect).
//! - `Reattach(X)`: the client asks X to bind a new transport. X runs the real
//!   `ownership::decide` on its cached record, with its own lease validity from its local
//!   deadline and the owner's liveness from the store. `Proceed` runs the real
//!   `machine::apply` of the reattach; `FailoverFirst` runs the real
//!   `ownership::explicit_failover` (the client retries the reattach later, as a new action).
//!   A commit is a CAS against the store: it applies only if the expected version is the stored
//!   one; otherwise nothing is written and X re-reads.
//! - `CommitFailover(X)`, in the broken [`Variant::SplitFailover`] only: the CAS of a failover
//!   decided by an earlier `Reattach(X)`.
//!
//! Every record in the store comes from `machine::apply` (directly or through
//! `explicit_failover`); the only hand-edited record is in the deliberately broken
//! [`Variant::NoEpochBump`].
//!
//! ## Stopped clocks
//!
//! The second root has both clocks stopped: neither node ever sees its local deadline pass.
//! That is the worst timing fault there is — a clock running slow by any amount, or a process
//! paused between checking its deadline and forwarding, is a milder version of it, and a node
//! that believes its lease valid can do everything one that does not can — so this one root
//! covers every such fault, on either node, starting at any time. Leases cannot keep two nodes
//! apart under it; the epoch must (SPEC §7.3: "lease timing alone is never trusted"). Without
//! this root, removing the epoch bump would go unnoticed, because with working clocks the
//! leases alone already keep a second node out.
//!
//! # The properties
//!
//! A node *forwards* when it is up and `ownership::may_forward` holds for its cached record,
//! with its lease valid by its local deadline as its own clock reads it.
//!
//! 1. [`Property::SameEpochForwarders`]: never two nodes forwarding with the same cached
//!    `owner_epoch`. Traffic keys derive from the epoch (SPEC §5), so this is what would let two
//!    nodes carry one session's traffic. Checked everywhere, stopped clocks included.
//! 2. [`Property::ExclusiveForwarding`]: never two nodes forwarding at all (SPEC §7.1), while
//!    the clocks work: this is what the leases and the local deadline guarantee.
//! 3. [`Property::StoreRegressed`]: on every transition the stored `state_version` and
//!    `owner_epoch` never decrease, and a write moves the version by exactly one.
//! 4. [`Property::EarlyFailover`]: the stored owner changes only once the previous owner's
//!    lease has expired in the store.
//! 5. The audit events that `machine::apply` and the ownership rules emit along a path pass
//!    [`Checker`]. The checker is not part of the hashed state, so this one is checked by
//!    replaying a deterministic sample of the explored paths (see [`audit_sample`]).
//!
//! # What is abstracted, and why the model is still sound for these properties
//!
//! - Two nodes and one session: the rules of §7 are per session, and every race in them is
//!   between the owner and one contender (an epoch names one owner; a lease belongs to one
//!   node). A third node adds interleavings of the same pairwise races, not a new kind.
//! - Store operations (read, CAS, lease grant, the failover) are atomic, as etcd transactions
//!   are. In particular a failover reads the owner's lease and CASes the record in one step;
//!   the driver must do the same (compare the owner's liveness key in the same transaction):
//!   `a_lease_check_apart_from_the_failover_cas_is_caught` shows what goes wrong otherwise. A node cut off from the store is a node that takes no store action,
//!   which the free choice of actions already covers. A lost CAS reply leaves the writer with
//!   an older copy than the store's, which only makes it forward less (a reattach keeps owner
//!   and epoch; a failover not seen is ownership not used).
//! - Keep-alives are the only messages, with loss, delay and reordering, because the local
//!   deadline is computed from them; the store's lease check on receipt is atomic.
//! - One real clock. Drift between clocks shows up as keep-alive delay and, beyond the margin,
//!   as the stopped clocks.
//! - A lease is one slot per node rather than an etcd lease ID. A stray keep-alive from before
//!   a restart, which etcd would refuse, here extends the new lease; that only delays a
//!   failover, and its ack cannot move the node's deadline (it was sent before the restart).
//!   A lease that has lapsed in the store comes back only through `Restart`, which re-reads
//!   the record (a live node re-registering is a crash and a restart: same states).
//! - The client is honest: it always offers a fresh nonce and the version it was last told
//!   (`last_nonce + 1` and `last_bound_version` of the stored record), and learns the outcome
//!   at once. Its own checks (proof, replay, stale versions) are the state machine's tests'
//!   business; here it drives the writes and the failovers.
//! - The session's own timers (recovery window, TTLs) are far longer than the horizon, so it
//!   does not end by itself; freeze, transfer and terminate are not modelled (freeze and
//!   transfer are owner writes like the reattach; terminate ends the race).
//! - Bounded: time stops at [`Bounds::max_time`] ticks (two lease lifetimes) and the search at
//!   [`Bounds::max_depth`] actions, with at most [`MAX_IN_FLIGHT_PER_NODE`] messages per node
//!   in flight. That depth holds, for example, a lease that lapses, a failover, the old owner's
//!   crash, restart and refused reattach, and the client's reattach to the new owner; it does
//!   not hold a second failover back to A.
//! - States that can no longer differ are merged: a deadline its node will never see as valid
//!   again is kept as 0, and an ack that could only move such a deadline is dropped (the same
//!   as losing it).

mod common;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use common::{birth, candidate, reattach as reattach_event, T0};
use jumpvpn_core::audit::check::Checker;
use jumpvpn_core::machine::{self, Commit, Context, Outcome, Rejection, SessionEvent};
use jumpvpn_core::ownership::{
    decide, explicit_failover, may_forward, ClusterMode, Decision, Facts, Member, OnOwnerLoss,
    OwnerLiveness,
};
use jumpvpn_core::{AuditEvent, NodeId, Policy, SessionRecord, Timestamp};

// ---------------------------------------------------------------------------------------------
// Parameters

/// The liveness lease's TTL, in ticks.
const TTL: u8 = 3;
/// The drift margin of the local deadline, in ticks (SPEC §7.3).
const DRIFT: u8 = 1;
/// Messages in flight per node (keep-alives and acks together).
const MAX_IN_FLIGHT_PER_NODE: usize = 2;
/// The longest time horizon the packed state ([`State::key`]) has room for.
const MAX_HORIZON: u8 = 7;
/// Milliseconds per tick, for the record's timestamps.
const TICK_MS: u64 = 1_000;

/// How far every search goes: 6 ticks (two lease lifetimes) and 12 actions.
///
/// Measured in a debug build on the 2-core development machine, the correct protocol has
/// 2.0 million distinct states within these bounds, explored in 17–23 s (plus 1 s for the
/// audit sample). Each further action multiplies the states by about 2.4: depth 13 would take
/// some 45 s and depth 14 about two minutes, over the minute this file may take. The broken
/// variants use the same bounds and stop at their first violation, within milliseconds.
const BOUNDS: Bounds = Bounds {
    max_time: 6,
    max_depth: 12,
};

/// A floor on the states the correct run explores, so that a change that silently prunes the
/// search (a guard that disables an action, a bound lowered by mistake) fails the test.
const MIN_STATES: usize = 1_000_000;

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn correct_protocol_never_has_two_forwarding_owners() {
    let mut model = Model::new(Variant::Correct, BOUNDS.max_time);
    let run = explore(&mut model, BOUNDS.max_depth);
    eprintln!("{}", run.summary(Variant::Correct));
    if let Some(counterexample) = &run.violation {
        panic!("the correct protocol broke an invariant:\n{counterexample}");
    }

    // Not vacuous: the search went deep enough to see the races that matter.
    assert!(
        run.entries.len() >= MIN_STATES,
        "only {} states explored",
        run.entries.len()
    );
    for flag in [
        PathFlags::FAILOVER,
        PathFlags::CRASH,
        PathFlags::RESTART,
        PathFlags::CAS_CONFLICT,
        PathFlags::REATTACH_AFTER_FAILOVER,
    ] {
        assert!(
            run.did(flag),
            "no explored transition did {}",
            PathFlags(flag).names()
        );
    }
    let crash_restart_failover = PathFlags::FAILOVER | PathFlags::CRASH | PathFlags::RESTART;
    assert!(
        run.reached(crash_restart_failover),
        "no explored path has a crash, a restart and a failover"
    );
    assert!(
        run.stats.fenced_dual_forwarding > 0,
        "never reached a state where stopped clocks left two nodes forwarding (with different \
         epochs): property 1 was never put to the test"
    );

    let audit = audit_sample(&mut model, &run, AUDIT_SAMPLES);
    eprintln!(
        "audit: {} sampled paths ({} through a failover), {} events checked",
        audit.paths, audit.paths_with_failover, audit.events
    );
    assert!(
        audit.paths_with_failover > 0,
        "no sampled path has a failover"
    );
    assert!(
        audit.violations.is_empty(),
        "audit checker violations:\n{}",
        audit.violations.join("\n")
    );
}

#[test]
fn removing_the_epoch_bump_is_caught() {
    let counterexample = expect_violation(Variant::NoEpochBump);
    assert!(
        counterexample
            .violations
            .contains(&Property::SameEpochForwarders),
        "expected two nodes forwarding with one epoch:\n{counterexample}"
    );
}

#[test]
fn removing_the_lease_check_is_caught() {
    let counterexample = expect_violation(Variant::NoLeaseCheck);
    assert!(
        counterexample
            .violations
            .contains(&Property::ExclusiveForwarding)
            && counterexample.violations.contains(&Property::EarlyFailover),
        "expected a failover while the owner's lease was held, and two forwarders:\n\
         {counterexample}"
    );
}

/// Keeping the store's expiry check but forwarding past the local deadline is also caught: the
/// old owner keeps forwarding after its lease lapsed and another node took over.
#[test]
fn forwarding_past_the_local_deadline_is_caught() {
    let counterexample = expect_violation(Variant::NoLocalDeadline);
    assert!(
        counterexample
            .violations
            .contains(&Property::ExclusiveForwarding),
        "expected two forwarders:\n{counterexample}"
    );
}

/// A driver that reads the owner's lease, then CASes the failover in a second store operation,
/// lets the old owner re-register in between: its fresh lease and its re-read record (still its
/// own) say "forward", and the failover lands anyway, on a held lease. The lease check must be
/// part of the failover's transaction (see [`Variant::SplitFailover`]).
#[test]
fn a_lease_check_apart_from_the_failover_cas_is_caught() {
    let counterexample = expect_violation(Variant::SplitFailover);
    assert!(
        counterexample.violations.contains(&Property::EarlyFailover),
        "expected a failover committed while the old owner held a lease:\n{counterexample}"
    );
}

/// Explores `variant` with [`BOUNDS`], asserts that it breaks an invariant and returns
/// the counter-example (printed, so that `--nocapture` shows it).
fn expect_violation(variant: Variant) -> Counterexample {
    let mut model = Model::new(variant, BOUNDS.max_time);
    let run = explore(&mut model, BOUNDS.max_depth);
    eprintln!("{}", run.summary(variant));
    let counterexample = run.violation.unwrap_or_else(|| {
        panic!(
            "{variant:?}: no violation within depth {} ({} states): the model check would not \
             notice this bug",
            BOUNDS.max_depth,
            run.entries.len()
        )
    });
    eprintln!("{counterexample}");
    counterexample
}

// ---------------------------------------------------------------------------------------------
// The model

/// Which protocol is explored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// As specified.
    Correct,
    /// A failover commit keeps the old `owner_epoch` (the record is edited after `apply`).
    NoEpochBump,
    /// Nodes ignore their local deadline (they forward and decide as if their lease were valid)
    /// and a failover does not wait for the owner's lease to expire in the store.
    NoLeaseCheck,
    /// Only the local deadline is ignored; failover still waits for the store.
    NoLocalDeadline,
    /// The failover is decided on the owner's lease as read in one store operation and
    /// committed by a CAS in a later one (`Action::CommitFailover`), instead of one transaction
    /// that compares both. `explicit_failover` takes the liveness as an argument, so this is
    /// a mistake a driver can make.
    SplitFailover,
}

impl Variant {
    fn uses_local_deadline(self) -> bool {
        !matches!(self, Variant::NoLeaseCheck | Variant::NoLocalDeadline)
    }

    fn waits_for_store_expiry(self) -> bool {
        self != Variant::NoLeaseCheck
    }
}

/// How far the search goes.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Time stops here (ticks).
    max_time: u8,
    /// Actions per path.
    max_depth: usize,
}

/// Node A (0) or B (1), as an index.
type Ix = usize;
const NODES: [Ix; 2] = [0, 1];
const NAMES: [&str; 2] = ["A", "B"];

/// An interned [`SessionRecord`] (the record type is not `Hash`; the interner gives every
/// distinct record one small ID, so states stay small and hashable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RecordId(u32);

/// One global state of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    /// The time, in ticks.
    now: u8,
    /// The authoritative record.
    store: RecordId,
    /// Per node, the tick at which its lease expires in the store (`None`: no lease).
    leases: [Option<u8>; 2],
    nodes: [NodeState; 2],
    /// Messages in flight: a set, kept sorted so that equal sets compare equal.
    net: InFlight,
}

impl State {
    /// The state packed into 122 bits: the visited set holds these, which is several times
    /// smaller and faster to hash than the structure. Panics if a field outgrows its width
    /// (more than 2^24 distinct records, or a horizon past [`MAX_HORIZON`] ticks).
    fn key(&self) -> u128 {
        let mut key = Packer::default();
        key.put(self.now.into(), 4);
        key.put(self.store.0.into(), 24);
        for lease in self.leases {
            key.put(lease.map_or(0, |e| u64::from(e) + 1), 4);
        }
        for node in self.nodes {
            key.put(node.up.into(), 1);
            key.put(node.cached.map_or(0, |id| u64::from(id.0) + 1), 24);
            key.put(node.deadline.map_or(0, |d| u64::from(d) + 1), 4);
            key.put(node.clock_stopped.into(), 1);
            key.put(node.failover_pending.into(), 1);
        }
        for slot in self.net.0 {
            let code = slot.map_or(0, |msg| {
                let (kind, sent) = match msg {
                    Msg::KeepAlive { sent, .. } => (0, sent),
                    Msg::Ack { sent, .. } => (1, sent),
                };
                1 + (kind | ((msg.node() as u64) << 1) | (u64::from(sent) << 2))
            });
            key.put(code, 6);
        }
        key.bits
    }
}

/// What one node knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeState {
    up: bool,
    /// The record it last read or wrote (`None` while crashed).
    cached: Option<RecordId>,
    /// Its local lease deadline, in ticks (`None` while crashed). A deadline that can never be
    /// valid again is kept as `Some(0)`, so that states differing only in how long ago a lease
    /// lapsed are one state.
    deadline: Option<u8>,
    /// Its clock has stopped: it never sees its local deadline pass (chosen at the root, see
    /// [`Model::roots`]).
    clock_stopped: bool,
    /// [`Variant::SplitFailover`] only: it found the owner's lease expired and has yet to CAS
    /// the failover of its cached record.
    failover_pending: bool,
}

/// A message between a node and the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Msg {
    /// From `node` to the store, sent at tick `sent`.
    KeepAlive { node: u8, sent: u8 },
    /// From the store to `node`: the keep-alive sent at `sent` extended the lease.
    Ack { node: u8, sent: u8 },
}

impl Msg {
    fn node(self) -> Ix {
        let (Msg::KeepAlive { node, .. } | Msg::Ack { node, .. }) = self;
        Ix::from(node)
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES[self.node()];
        match *self {
            Msg::KeepAlive { sent, .. } => write!(f, "keep-alive({name} sent@{sent})"),
            Msg::Ack { sent, .. } => write!(f, "ack({name} sent@{sent})"),
        }
    }
}

/// A bounded set of messages, sorted (`None` first) so that it has one representation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct InFlight([Option<Msg>; 2 * MAX_IN_FLIGHT_PER_NODE]);

impl InFlight {
    fn iter(&self) -> impl Iterator<Item = Msg> + '_ {
        self.0.iter().flatten().copied()
    }

    fn contains(&self, msg: Msg) -> bool {
        self.iter().any(|m| m == msg)
    }

    /// Adds `msg`; false if it is already in flight or its node has no room.
    fn insert(&mut self, msg: Msg) -> bool {
        let full = self.iter().filter(|m| m.node() == msg.node()).count() >= MAX_IN_FLIGHT_PER_NODE;
        if full || self.contains(msg) {
            return false;
        }
        let Some(slot) = self.0.iter_mut().find(|m| m.is_none()) else {
            return false;
        };
        *slot = Some(msg);
        self.0.sort_unstable();
        true
    }

    fn remove(&mut self, msg: Msg) -> bool {
        let Some(slot) = self.0.iter_mut().find(|m| **m == Some(msg)) else {
            return false;
        };
        *slot = None;
        self.0.sort_unstable();
        true
    }
}

/// One step of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Tick,
    SendKeepalive(Ix),
    StoreReceives(Msg),
    NodeReceives(Msg),
    Lose(Msg),
    Crash(Ix),
    Restart(Ix),
    Read(Ix),
    Reattach(Ix),
    /// [`Variant::SplitFailover`] only: the CAS of a failover decided earlier.
    CommitFailover(Ix),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Tick => f.write_str("tick"),
            Action::SendKeepalive(x) => write!(f, "{} sends a keep-alive", NAMES[x]),
            Action::StoreReceives(m) => write!(f, "store receives {m}"),
            Action::NodeReceives(m) => write!(f, "{} receives {m}", NAMES[m.node()]),
            Action::Lose(m) => write!(f, "network loses {m}"),
            Action::Crash(x) => write!(f, "{} crashes", NAMES[x]),
            Action::Restart(x) => write!(f, "{} restarts (new lease, re-reads)", NAMES[x]),
            Action::Read(x) => write!(f, "{} re-reads the record", NAMES[x]),
            Action::Reattach(x) => write!(f, "client reattaches to {}", NAMES[x]),
            Action::CommitFailover(x) => write!(f, "{} CASes its failover", NAMES[x]),
        }
    }
}

/// An invariant of the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Property {
    /// 1: two nodes forward with the same epoch.
    SameEpochForwarders,
    /// 2: two nodes forward at all, with every clock correct.
    ExclusiveForwarding,
    /// 3: the store's version or epoch went back, or a write skipped a version.
    StoreRegressed,
    /// 4: the owner changed while the previous owner's lease was held.
    EarlyFailover,
}

/// What a transition did, beyond the new state.
#[derive(Default)]
struct Effects {
    /// Audit events of commits that reached the store; collected only when
    /// [`Model::collect_events`] is set. (A refusal changes no state, so it is no transition of
    /// the search; [`Model::refusals`] collects those for the audit.)
    events: Vec<AuditEvent>,
    flags: u16,
}

/// Facts about a path, accumulated from the root (a bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PathFlags(u16);

impl PathFlags {
    const FAILOVER: u16 = 1;
    const CRASH: u16 = 1 << 1;
    const RESTART: u16 = 1 << 2;
    const CAS_CONFLICT: u16 = 1 << 3;
    const REATTACH: u16 = 1 << 4;
    const REATTACH_AFTER_FAILOVER: u16 = 1 << 5;
    const CLOCK_STOPPED: u16 = 1 << 6;

    const NAMES: [&'static str; 7] = [
        "failover",
        "crash",
        "restart",
        "CAS conflict",
        "reattach",
        "reattach after failover",
        "clocks stopped",
    ];

    fn names(self) -> String {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect();
        names.join(" + ")
    }
}

/// Distinct records, by ID.
#[derive(Default)]
struct Interner {
    records: Vec<SessionRecord>,
    /// (version, epoch, last nonce) → IDs of the records with that key.
    index: HashMap<(u64, u64, u64), Vec<u32>>,
}

impl Interner {
    fn intern(&mut self, record: SessionRecord) -> RecordId {
        let key = (
            record.state_version.get(),
            record.owner_epoch.get(),
            record.last_nonce,
        );
        let bucket = self.index.entry(key).or_default();
        let same = |id: &&u32| self.records.get(**id as usize) == Some(&record);
        if let Some(&id) = bucket.iter().find(same) {
            return RecordId(id);
        }
        let id = u32::try_from(self.records.len()).expect("fewer than 2^32 distinct records");
        self.records.push(record);
        bucket.push(id);
        RecordId(id)
    }

    fn get(&self, id: RecordId) -> &SessionRecord {
        // IDs are only made by `intern`, which pushed the record at that index.
        &self.records[id.0 as usize]
    }
}

/// Everything a reattach at a node depends on (see [`Model::reattach`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ReattachInput {
    node: Ix,
    cached: RecordId,
    store: RecordId,
    now: u8,
    local_lease_valid: bool,
    owner_liveness: OwnerLiveness,
}

/// What a reattach did: the stored record and the node's cached record afterwards.
#[derive(Clone, Copy)]
struct ReattachOutput {
    store: RecordId,
    cached: RecordId,
    flags: u16,
    /// [`Variant::SplitFailover`]: a failover was decided, its CAS is still to come.
    failover_pending: bool,
}

/// The protocol of one [`Variant`], with its node IDs and the records seen so far.
struct Model {
    variant: Variant,
    max_time: u8,
    ids: [NodeId; 2],
    members: [Member; 2],
    records: Interner,
    /// Reattach outcomes already computed: `decide` and `apply` are pure, and the search asks
    /// the same question many times.
    reattaches: FastMap<ReattachInput, ReattachOutput>,
    /// Collect audit events (replaying a path) rather than use the memo (searching).
    collect_events: bool,
    /// The state after the handshake, with both clocks right.
    initial: State,
    /// The handshake's events, at the head of every path's audit stream.
    initial_events: Vec<AuditEvent>,
}

impl Model {
    /// The session was just created on A (the real handshake commit, version 1, epoch 1), and
    /// both nodes registered their leases at tick 0.
    fn new(variant: Variant, max_time: u8) -> Self {
        assert!(
            max_time <= MAX_HORIZON,
            "the packed state has room for {MAX_HORIZON} ticks"
        );
        let ids = [NodeId::new(NAMES[0]), NodeId::new(NAMES[1])];
        let members = [Member::new(ids[0].clone()), Member::new(ids[1].clone())];
        let now = at(0);
        let handshake = SessionEvent::HandshakeOk {
            candidate: candidate(1),
        };
        let ctx = Context { now, node: &ids[0] };
        let born = birth(0x5e55, &ids[0], Policy::default(), now);
        let created = match machine::apply(&born, &handshake, &ctx) {
            Outcome::Commit(commit) => commit,
            other => panic!("the handshake did not commit: {other:?}"),
        };
        let mut records = Interner::default();
        let store = records.intern(created.record);
        let registered = NodeState {
            up: true,
            cached: Some(store),
            deadline: Some(TTL - DRIFT),
            clock_stopped: false,
            failover_pending: false,
        };
        let initial = State {
            now: 0,
            store,
            leases: [Some(TTL); 2],
            nodes: [registered; 2],
            net: InFlight::default(),
        };
        Self {
            variant,
            max_time,
            ids,
            members,
            records,
            reattaches: FastMap::default(),
            collect_events: false,
            initial,
            initial_events: created.events,
        }
    }

    /// The roots of the search: both clocks right, or both clocks stopped from the start.
    ///
    /// A stopped clock is the worst timing fault there is: a clock that runs slow by any
    /// amount, or a process that pauses between checking its deadline and forwarding, makes
    /// its node believe its lease valid for longer, and a stopped clock believes it for ever.
    /// A node that believes its lease valid can do everything one that does not can (a refused
    /// reattach changes nothing), so this one root covers every lag, on either node, starting
    /// at any time.
    fn roots(&self) -> Vec<State> {
        let mut faulty = self.initial.clone();
        for node in &mut faulty.nodes {
            node.clock_stopped = true;
        }
        vec![self.initial.clone(), faulty]
    }

    /// Every action that may be tried in `s` (some turn out to change nothing; [`Model::step`]
    /// says so).
    fn actions(&self, s: &State) -> Vec<Action> {
        let mut actions = vec![Action::Tick];
        for x in NODES {
            actions.extend([
                Action::SendKeepalive(x),
                Action::Crash(x),
                Action::Restart(x),
                Action::Read(x),
                Action::Reattach(x),
            ]);
            if self.variant == Variant::SplitFailover {
                actions.push(Action::CommitFailover(x));
            }
        }
        for msg in s.net.iter() {
            actions.push(match msg {
                Msg::KeepAlive { .. } => Action::StoreReceives(msg),
                Msg::Ack { .. } => Action::NodeReceives(msg),
            });
            actions.push(Action::Lose(msg));
        }
        actions
    }

    /// The state after `action`, or `None` if it cannot happen in `s` or changes nothing.
    fn step(&mut self, s: &State, action: Action) -> Option<(State, Effects)> {
        let mut n = s.clone();
        let mut fx = Effects::default();
        match action {
            Action::Tick => {
                if s.now >= self.max_time {
                    return None;
                }
                n.now += 1;
                for lease in &mut n.leases {
                    if lease.is_some_and(|expiry| expiry <= n.now) {
                        *lease = None;
                    }
                }
            }
            Action::SendKeepalive(x) => {
                let msg = Msg::KeepAlive {
                    node: node_byte(x),
                    sent: s.now,
                };
                if !s.nodes[x].up || !n.net.insert(msg) {
                    return None;
                }
            }
            Action::StoreReceives(msg) => {
                let Msg::KeepAlive { sent, .. } = msg else {
                    return None;
                };
                let x = msg.node();
                if !n.net.remove(msg) {
                    return None;
                }
                // As in etcd, a keep-alive of an expired lease fails: nothing is acknowledged.
                if let Some(expiry) = lease_held(s, x) {
                    n.leases[x] = Some(expiry.max(s.now + TTL));
                    n.net.insert(Msg::Ack {
                        node: node_byte(x),
                        sent,
                    });
                }
            }
            Action::NodeReceives(msg) => {
                let Msg::Ack { sent, .. } = msg else {
                    return None;
                };
                if !n.net.remove(msg) {
                    return None;
                }
                let node = &mut n.nodes[msg.node()];
                if node.up {
                    // SPEC §7.3: from the time the acknowledged keep-alive was SENT.
                    node.deadline = node.deadline.max(Some(sent + TTL - DRIFT));
                }
            }
            Action::Lose(msg) => {
                if !n.net.remove(msg) {
                    return None;
                }
            }
            Action::Crash(x) => {
                let node = &mut n.nodes[x];
                if !node.up {
                    return None;
                }
                node.up = false;
                node.cached = None;
                node.deadline = None;
                node.failover_pending = false;
                fx.flags |= PathFlags::CRASH;
            }
            Action::Restart(x) => {
                if s.nodes[x].up {
                    return None;
                }
                n.leases[x] = Some(s.now + TTL);
                let node = &mut n.nodes[x];
                node.up = true;
                node.deadline = Some(s.now + TTL - DRIFT);
                node.cached = Some(s.store);
                fx.flags |= PathFlags::RESTART;
            }
            Action::Read(x) => {
                let node = &mut n.nodes[x];
                if !node.up || node.cached == Some(s.store) {
                    return None;
                }
                node.cached = Some(s.store);
                node.failover_pending = false;
            }
            Action::Reattach(x) => {
                let input = self.reattach_input(s, x)?;
                let out = self.reattach(input, &mut fx.events);
                n.store = out.store;
                let node = &mut n.nodes[x];
                if out.failover_pending {
                    node.failover_pending = true;
                } else if node.cached != Some(out.cached) {
                    node.failover_pending = false;
                }
                node.cached = Some(out.cached);
                fx.flags |= out.flags;
            }
            Action::CommitFailover(x) => {
                let node = s.nodes[x];
                if !node.up || !node.failover_pending {
                    return None;
                }
                let input = self.reattach_input(s, x)?;
                let cached = self.records.get(input.cached);
                // The liveness read when the failover was decided, not now: that is the bug.
                let failover =
                    explicit_failover(cached, &self.ids[x], OwnerLiveness::LeaseExpired, at(s.now));
                let Ok(commit) = failover else {
                    return None;
                };
                let out = self.cas(input, commit, &mut fx.events);
                n.store = out.store;
                n.nodes[x].cached = Some(out.cached);
                n.nodes[x].failover_pending = false;
                fx.flags |= out.flags;
            }
        }
        self.canonicalize(&mut n);
        (n != *s).then_some((n, fx))
    }

    /// Forgets what can no longer matter: a deadline that its node will never see as valid
    /// again (or never look at: a stopped clock), and an ack that could only move such a
    /// deadline. (Losing the ack is an action of its own, so this only merges states with the
    /// same futures.)
    fn canonicalize(&self, s: &mut State) {
        let now = s.now;
        let dead = |deadline: u8, node: NodeState| node.clock_stopped || deadline <= now;
        for node in &mut s.nodes {
            if node.deadline.is_some_and(|d| dead(d, *node)) {
                node.deadline = Some(0);
            }
        }
        let nodes = s.nodes;
        let useless = |m: &Option<Msg>| match *m {
            Some(msg @ Msg::Ack { sent, .. }) => dead(sent + TTL - DRIFT, nodes[msg.node()]),
            _ => false,
        };
        if s.net.0.iter().any(useless) {
            for slot in &mut s.net.0 {
                if useless(slot) {
                    *slot = None;
                }
            }
            s.net.0.sort_unstable();
        }
    }

    /// What a reattach at node `x` depends on in `s`; `None` if `x` is down.
    fn reattach_input(&self, s: &State, x: Ix) -> Option<ReattachInput> {
        let node = s.nodes[x];
        let cached = node.cached.filter(|_| node.up)?;
        Some(ReattachInput {
            node: x,
            cached,
            store: s.store,
            now: s.now,
            local_lease_valid: self.local_lease_valid(s, x),
            owner_liveness: self.owner_liveness(s, cached),
        })
    }

    /// The liveness of `cached`'s owner, as the store reports it now.
    fn owner_liveness(&self, s: &State, cached: RecordId) -> OwnerLiveness {
        if !self.variant.waits_for_store_expiry() {
            return OwnerLiveness::LeaseExpired;
        }
        match self.index_of(&self.records.get(cached).owner) {
            Some(owner) if lease_held(s, owner).is_some() => OwnerLiveness::Alive,
            _ => OwnerLiveness::LeaseExpired,
        }
    }

    /// The client's reattach at a node: the real `decide` on the node's cached record, then the
    /// real `apply` (proceed) or `explicit_failover` (failover first), then a CAS against the
    /// store (SPEC §4 step 10): the write applies only if the stored version is the expected
    /// one; otherwise nothing is written and the node re-reads.
    fn reattach(&mut self, input: ReattachInput, events: &mut Vec<AuditEvent>) -> ReattachOutput {
        if !self.collect_events {
            if let Some(out) = self.reattaches.get(&input) {
                return *out;
            }
        }
        let unchanged = ReattachOutput {
            store: input.store,
            cached: input.cached,
            flags: 0,
            failover_pending: false,
        };
        let cached = self.records.get(input.cached).clone();
        let stored = self.records.get(input.store);
        // The honest client: a fresh nonce and the version its last reattach was acked with.
        let nonce = stored.last_nonce + 1;
        let attempt = reattach_event(nonce, stored.last_bound_version, nonce + 1);
        let facts = Facts {
            mode: ClusterMode::Shared,
            on_owner_loss: OnOwnerLoss::Failover,
            owner_liveness: input.owner_liveness,
            local_lease_valid: input.local_lease_valid,
            members: &self.members,
        };
        let this = &self.ids[input.node];
        let ctx = Context {
            now: at(input.now),
            node: this,
        };
        let refused = |rejection: Rejection, events: &mut Vec<AuditEvent>| {
            events.extend(rejection.events);
            unchanged
        };
        let out = match decide(&cached, this, &facts) {
            Decision::Proceed => match machine::apply(&cached, &attempt, &ctx) {
                Outcome::Commit(commit) => self.cas(input, commit, events),
                Outcome::Reject(rejection) => refused(rejection, events),
                Outcome::Unchanged => unchanged,
            },
            Decision::FailoverFirst if self.variant == Variant::SplitFailover => ReattachOutput {
                failover_pending: true,
                ..unchanged
            },
            Decision::FailoverFirst => {
                match explicit_failover(&cached, this, input.owner_liveness, at(input.now)) {
                    Ok(mut commit) => {
                        if self.variant == Variant::NoEpochBump {
                            // The deliberate bug: the only hand-edited record in this file.
                            commit.record.owner_epoch = cached.owner_epoch;
                        }
                        self.cas(input, commit, events)
                    }
                    Err(rejection) => refused(rejection, events),
                }
            }
            decision @ Decision::Reject { .. } => match decision.rejection(&cached, &ctx) {
                Some(rejection) => refused(rejection, events),
                None => unchanged,
            },
            Decision::Terminate { .. } => {
                panic!("decide chose terminate with on_owner_loss = failover")
            }
        };
        if !self.collect_events {
            self.reattaches.insert(input, out);
        }
        out
    }

    /// The audit events of the reattaches that would be refused in `s`, at either node: not
    /// transitions (nothing changes), but the audit stream must account for them too.
    fn refusals(&mut self, s: &State) -> Vec<AuditEvent> {
        let mut refused = Vec::new();
        for x in NODES {
            let Some(input) = self.reattach_input(s, x) else {
                continue;
            };
            let mut events = Vec::new();
            let out = self.reattach(input, &mut events);
            let unchanged = out.store == input.store && out.cached == input.cached;
            if unchanged && !out.failover_pending {
                refused.extend(events);
            }
        }
        refused
    }

    /// The compare-and-swap of `commit` against the stored record.
    fn cas(
        &mut self,
        input: ReattachInput,
        commit: Commit,
        events: &mut Vec<AuditEvent>,
    ) -> ReattachOutput {
        let stored = self.records.get(input.store);
        if commit.expected != stored.state_version {
            return ReattachOutput {
                store: input.store,
                cached: input.store,
                flags: PathFlags::CAS_CONFLICT,
                failover_pending: false,
            };
        }
        let flags = if commit.record.owner == stored.owner {
            PathFlags::REATTACH
        } else {
            PathFlags::FAILOVER
        };
        events.extend(commit.events);
        let written = self.records.intern(commit.record);
        ReattachOutput {
            store: written,
            cached: written,
            flags,
            failover_pending: false,
        }
    }

    /// Whether node `x` holds its lease valid by its local deadline, read on its own clock.
    fn local_lease_valid(&self, s: &State, x: Ix) -> bool {
        let node = s.nodes[x];
        if !node.up {
            return false;
        }
        if node.clock_stopped || !self.variant.uses_local_deadline() {
            return true;
        }
        node.deadline.is_some_and(|deadline| deadline > s.now)
    }

    /// The epoch node `x` forwards traffic with in `s`, if it forwards.
    fn forwarding(&self, s: &State, x: Ix) -> Option<u64> {
        let node = s.nodes[x];
        let cached = self.records.get(node.cached.filter(|_| node.up)?);
        let valid = self.local_lease_valid(s, x);
        may_forward(cached, &self.ids[x], valid, ClusterMode::Shared)
            .then(|| cached.owner_epoch.get())
    }

    fn index_of(&self, id: &NodeId) -> Option<Ix> {
        NODES.into_iter().find(|&x| self.ids[x] == *id)
    }

    /// Properties 1 and 2 in state `s`.
    fn check_state(&self, s: &State, stats: &mut Stats, found: &mut Vec<Property>) {
        let (Some(a), Some(b)) = (self.forwarding(s, 0), self.forwarding(s, 1)) else {
            return;
        };
        if a == b {
            found.push(Property::SameEpochForwarders);
        }
        if s.nodes.iter().any(|node| node.clock_stopped) {
            // The leases cannot promise exclusivity to a node whose clock is wrong; the epoch
            // (property 1) is what must hold here.
            if a != b {
                stats.fenced_dual_forwarding += 1;
            }
        } else {
            found.push(Property::ExclusiveForwarding);
        }
    }

    /// Properties 3 and 4 on the transition from `s` to `n`.
    fn check_transition(&self, s: &State, n: &State, found: &mut Vec<Property>) {
        if s.store == n.store {
            return;
        }
        let (old, new) = (self.records.get(s.store), self.records.get(n.store));
        if new.state_version.get() != old.state_version.get() + 1
            || new.owner_epoch < old.owner_epoch
        {
            found.push(Property::StoreRegressed);
        }
        if new.owner != old.owner {
            let previous = self.index_of(&old.owner);
            if previous.is_some_and(|p| lease_held(s, p).is_some()) {
                found.push(Property::EarlyFailover);
            }
        }
    }

    /// A one-line picture of `s`.
    fn describe(&self, s: &State) -> String {
        let record = self.records.get(s.store);
        let lease = |x: Ix| s.leases[x].map_or("-".to_owned(), |e| format!("<{e}"));
        let mut out = format!(
            "t={} store[v{} e{} owner={} {:?} lease A{} B{}]",
            s.now,
            record.state_version,
            record.owner_epoch,
            record.owner,
            record.state,
            lease(0),
            lease(1),
        );
        for x in NODES {
            let node = s.nodes[x];
            out.push_str(&format!(" {}[", NAMES[x]));
            match node.cached.filter(|_| node.up) {
                None => out.push_str("down"),
                Some(id) => {
                    let cached = self.records.get(id);
                    let deadline = match node.deadline {
                        _ if node.clock_stopped => String::new(),
                        Some(0) | None => " deadline-".to_owned(),
                        Some(d) => format!(" deadline<{d}"),
                    };
                    out.push_str(&format!(
                        "cache v{} e{} owner={}{deadline}",
                        cached.state_version, cached.owner_epoch, cached.owner,
                    ));
                }
            }
            if node.failover_pending {
                out.push_str(" failover-pending");
            }
            if node.clock_stopped {
                out.push_str(" clock-stopped");
            }
            if let Some(epoch) = self.forwarding(s, x) {
                out.push_str(&format!(" FORWARDING e{epoch}"));
            }
            out.push(']');
        }
        let net: Vec<String> = s.net.iter().map(|m| m.to_string()).collect();
        if !net.is_empty() {
            out.push_str(&format!(" net{{{}}}", net.join(", ")));
        }
        out
    }
}

/// The expiry of `x`'s lease if the store still holds it at `s.now`.
fn lease_held(s: &State, x: Ix) -> Option<u8> {
    s.leases[x].filter(|&expiry| expiry > s.now)
}

/// A node index as stored in a message.
fn node_byte(x: Ix) -> u8 {
    u8::try_from(x).expect("two nodes")
}

/// The timestamp of tick `tick`.
fn at(tick: u8) -> Timestamp {
    T0.plus(u64::from(tick) * TICK_MS)
}

// ---------------------------------------------------------------------------------------------
// The explorer

/// One explored state: how it was first reached (breadth-first, so by a shortest path). The
/// state itself lives in the visited set and the frontier only; a path is replayed to see it
/// again (the model is deterministic).
struct Entry {
    /// Index of the predecessor in [`Run::entries`]; a root points at itself.
    parent: u32,
    /// The action from the predecessor (`None` at a root).
    action: Option<Action>,
    /// What happened on the path from the root.
    flags: PathFlags,
}

/// Counters over the whole search.
#[derive(Default)]
struct Stats {
    transitions: u64,
    /// What some transition did (the union of their [`PathFlags`]).
    did: u16,
    /// States where two nodes forward with different epochs (stopped clocks): the epoch is all
    /// that keeps their traffic apart.
    fenced_dual_forwarding: u64,
}

/// The result of [`explore`].
struct Run {
    /// The roots' states, in the order of the first entries.
    roots: Vec<State>,
    entries: Vec<Entry>,
    /// Actions on the longest path explored.
    depth: usize,
    /// The last level had no new state: every reachable state within the time horizon was
    /// explored.
    exhausted: bool,
    elapsed: Duration,
    stats: Stats,
    violation: Option<Counterexample>,
}

impl Run {
    /// Whether some transition of the search did `flag`.
    fn did(&self, flag: u16) -> bool {
        self.stats.did & flag != 0
    }

    /// Whether the first path to some explored state has every flag of `flags`.
    fn reached(&self, flags: u16) -> bool {
        self.entries.iter().any(|e| e.flags.0 & flags == flags)
    }

    fn summary(&self, variant: Variant) -> String {
        format!(
            "{variant:?}: {} distinct states, {} transitions, depth {}{}, {:.1?}{}",
            self.entries.len(),
            self.stats.transitions,
            self.depth,
            if self.exhausted { " (exhausted)" } else { "" },
            self.elapsed,
            if self.violation.is_some() {
                ", stopped at the first violation"
            } else {
                ""
            },
        )
    }

    /// The root and the actions from it to entry `index`.
    fn path(&self, index: usize) -> (usize, Vec<Action>) {
        let mut path = Vec::new();
        let mut at = index;
        while let Some(action) = self.entries[at].action {
            path.push(action);
            at = self.entries[at].parent as usize;
        }
        path.reverse();
        (at, path)
    }

    /// The states along the path to entry `index`, root first, with the action that led to
    /// each, and the audit events emitted on the way: the handshake's, then, state by state,
    /// the refusals of a reattach the client tries at each node, then the commit of the action
    /// taken.
    fn replay(
        &self,
        model: &mut Model,
        index: usize,
    ) -> (Vec<(Option<Action>, State)>, Vec<AuditEvent>) {
        let (root, path) = self.path(index);
        let mut state = self.roots[root].clone();
        let mut events = model.initial_events.clone();
        let mut states = vec![(None, state.clone())];
        model.collect_events = true;
        for action in path {
            events.extend(model.refusals(&state));
            let (next, effects) = model
                .step(&state, action)
                .expect("an explored path replays: the model is deterministic");
            events.extend(effects.events);
            states.push((Some(action), next.clone()));
            state = next;
        }
        events.extend(model.refusals(&state));
        model.collect_events = false;
        (states, events)
    }
}

/// A path to a state or transition that breaks an invariant.
struct Counterexample {
    violations: Vec<Property>,
    /// Each action with a picture of the state it led to; the first line is the root.
    steps: Vec<String>,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "counter-example ({} actions), breaks {:?}:",
            self.steps.len() - 1,
            self.violations
        )?;
        for step in &self.steps {
            writeln!(f, "  {step}")?;
        }
        Ok(())
    }
}

/// Breadth-first search from the model's roots, at most `max_depth` actions deep, checking
/// every property on every state and transition; stops at the first violation, so a
/// counter-example is a shortest one.
fn explore(model: &mut Model, max_depth: usize) -> Run {
    let started = Instant::now();
    let roots = model.roots();
    let mut run = Run {
        roots: roots.clone(),
        entries: Vec::new(),
        depth: 0,
        exhausted: false,
        elapsed: Duration::ZERO,
        stats: Stats::default(),
        violation: None,
    };
    let mut seen: FastSet<u128> = FastSet::default();
    let mut level: Vec<(State, u32)> = Vec::new();
    for state in roots {
        let index = entry_index(run.entries.len());
        let faulty = state.nodes.iter().any(|node| node.clock_stopped);
        let flags = if faulty { PathFlags::CLOCK_STOPPED } else { 0 };
        run.entries.push(Entry {
            parent: index,
            action: None,
            flags: PathFlags(flags),
        });
        let mut found = Vec::new();
        model.check_state(&state, &mut run.stats, &mut found);
        if !found.is_empty() {
            run.violation = Some(counterexample(model, &run, found));
            return run;
        }
        seen.insert(state.key());
        level.push((state, index));
    }
    while run.depth < max_depth && !level.is_empty() {
        let mut next_level = Vec::new();
        for (state, index) in &level {
            let path_flags = run.entries[*index as usize].flags.0;
            for action in model.actions(state) {
                let Some((next, effects)) = model.step(state, action) else {
                    continue;
                };
                run.stats.transitions += 1;
                run.stats.did |= effects.flags;
                let mut found = Vec::new();
                model.check_transition(state, &next, &mut found);
                let key = next.key();
                let fresh = !seen.contains(&key);
                if fresh {
                    model.check_state(&next, &mut run.stats, &mut found);
                }
                let mut flags = path_flags | effects.flags;
                let after_failover = path_flags & PathFlags::FAILOVER != 0;
                if after_failover && effects.flags & PathFlags::REATTACH != 0 {
                    flags |= PathFlags::REATTACH_AFTER_FAILOVER;
                    run.stats.did |= PathFlags::REATTACH_AFTER_FAILOVER;
                }
                if !fresh && found.is_empty() {
                    continue;
                }
                let next_index = entry_index(run.entries.len());
                run.entries.push(Entry {
                    parent: *index,
                    action: Some(action),
                    flags: PathFlags(flags),
                });
                if !found.is_empty() {
                    run.depth += 1;
                    run.violation = Some(counterexample(model, &run, found));
                    run.elapsed = started.elapsed();
                    return run;
                }
                seen.insert(key);
                next_level.push((next, next_index));
            }
        }
        if next_level.is_empty() {
            run.exhausted = true;
            break;
        }
        run.depth += 1;
        level = next_level;
        eprintln!(
            "  depth {:>2}: {:>9} new states, {:>9} in all, {:.1?}",
            run.depth,
            level.len(),
            run.entries.len(),
            started.elapsed()
        );
    }
    run.elapsed = started.elapsed();
    run
}

/// `len` as an entry index.
fn entry_index(len: usize) -> u32 {
    u32::try_from(len).expect("fewer than 2^32 states")
}

/// The counter-example that ends at the last entry of `run`.
fn counterexample(model: &mut Model, run: &Run, violations: Vec<Property>) -> Counterexample {
    let (states, _) = run.replay(model, run.entries.len() - 1);
    let steps = states
        .iter()
        .enumerate()
        .map(|(i, (action, state))| {
            let what = action.map_or("initial state".to_owned(), |a| a.to_string());
            format!("{i:>2}. {what:<42} → {}", model.describe(state))
        })
        .collect();
    Counterexample { violations, steps }
}

/// Appends fixed-width fields to a `u128`.
#[derive(Default)]
struct Packer {
    bits: u128,
    at: u32,
}

impl Packer {
    fn put(&mut self, value: u64, width: u32) {
        assert!(
            value >> width == 0 && self.at + width <= 128,
            "state field {value} does not fit in {width} bits"
        );
        self.bits |= u128::from(value) << self.at;
        self.at += width;
    }
}

/// A fast hasher for the packed keys and the reattach memo (the default SipHash dominates the
/// search's time in a debug build). Not keyed: the inputs are our own.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(byte.into());
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64);
        self.write_u64((value >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        // murmur3's finaliser, so that every bit of the key reaches the bucket index.
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<KeyHasher>>;

// ---------------------------------------------------------------------------------------------
// Property 5: the audit stream of sampled paths

/// How many explored paths are replayed through the audit checker.
const AUDIT_SAMPLES: usize = 2_000;

/// The outcome of [`audit_sample`].
struct AuditReport {
    paths: usize,
    paths_with_failover: usize,
    events: usize,
    violations: Vec<String>,
}

/// Replays a deterministic sample of the explored paths — half of them through a failover,
/// spread evenly over the breadth-first order (so over the depths) — and runs the audit
/// checker over the events each emits, handshake first.
fn audit_sample(model: &mut Model, run: &Run, samples: usize) -> AuditReport {
    let with_failover: Vec<usize> = (0..run.entries.len())
        .filter(|&i| run.entries[i].flags.0 & PathFlags::FAILOVER != 0)
        .collect();
    let all: Vec<usize> = (0..run.entries.len()).collect();
    let mut chosen: Vec<usize> = spread(&with_failover, samples / 2);
    chosen.extend(spread(&all, samples - chosen.len()));
    chosen.sort_unstable();
    chosen.dedup();

    let mut report = AuditReport {
        paths: chosen.len(),
        paths_with_failover: 0,
        events: 0,
        violations: Vec::new(),
    };
    for index in chosen {
        if run.entries[index].flags.0 & PathFlags::FAILOVER != 0 {
            report.paths_with_failover += 1;
        }
        let (states, events) = run.replay(model, index);
        report.events += events.len();
        for violation in audit_violations(&events) {
            let trace: Vec<String> = states
                .iter()
                .filter_map(|(action, _)| action.map(|a| a.to_string()))
                .collect();
            report
                .violations
                .push(format!("{violation}\n    after: {}", trace.join("; ")));
        }
    }
    report
}

/// At most `n` items of `items`, evenly spaced.
fn spread(items: &[usize], n: usize) -> Vec<usize> {
    if n == 0 || items.is_empty() {
        return Vec::new();
    }
    let stride = items.len().div_ceil(n);
    items.iter().step_by(stride).copied().collect()
}

/// The audit checker's verdict on one node-merged stream, in emission order.
fn audit_violations(events: &[AuditEvent]) -> Vec<String> {
    let mut checker = Checker::new();
    let file = checker.add_source("model.jsonl");
    let mut found = Vec::new();
    for (line, event) in (1u64..).zip(events) {
        let json = event.to_json_line();
        match checker.parse(json.as_bytes()) {
            Ok(parsed) => checker.feed(parsed, file, line),
            Err(why) => found.push(format!("unparsable {json}: {why}")),
        }
    }
    let _summary = checker.finish();
    found.extend(checker.drain_violations().map(|v| v.to_string()));
    found
}

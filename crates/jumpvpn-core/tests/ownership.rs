//! The ownership rules of SPEC §7: the reattach decision table, rendezvous routing and minting,
//! migration, drain and failover, and the audit streams they produce.

mod common;

use std::net::SocketAddr;

use common::*;
use jumpvpn_core::audit::check::Checker;
use jumpvpn_core::audit::EventKind;
use jumpvpn_core::machine::{apply, Context, Outcome, SessionEvent};
use jumpvpn_core::ownership::{
    decide, decide_unknown_session, explicit_failover, may_forward, migration_step,
    mint_session_id, plan_drain, rendezvous_owner, rendezvous_weight, ClusterMode, Decision, Facts,
    Member, MigrationStep, OnOwnerLoss, OwnerLiveness,
};
use jumpvpn_core::{
    AuditEvent, NodeId, OwnerEpoch, Policy, ReasonCode, SessionId, SessionRecord, SessionState,
};
use proptest::prelude::*;

use ReasonCode as R;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A member with addresses, so that a hint pointing at the wrong member is visible.
fn member(name: &str, host: u8) -> Member {
    let addr: SocketAddr = format!("10.0.0.{host}:51820")
        .parse()
        .expect("a literal address");
    Member {
        id: gw(name),
        udp: Some(addr),
        tcp: Some(addr),
        admin: Some(format!("http://10.0.0.{host}:51900")),
    }
}

/// gw1, gw2, gw3 at 10.0.0.1–3.
fn three() -> Vec<Member> {
    vec![member("gw1", 1), member("gw2", 2), member("gw3", 3)]
}

fn ids(names: &[String]) -> Vec<Member> {
    names.iter().map(|n| Member::new(gw(n))).collect()
}

/// A session `id` created on `owner` at `T0`: the ATTACHED record and its creation events.
fn created(id: u128, owner: &NodeId) -> (SessionRecord, Vec<AuditEvent>) {
    let handshake = SessionEvent::HandshakeOk {
        candidate: candidate(1),
    };
    let ctx = Context {
        now: T0,
        node: owner,
    };
    match apply(&birth(id, owner, Policy::default(), T0), &handshake, &ctx) {
        Outcome::Commit(c) => (c.record, c.events),
        other => panic!("handshake not committed: {other:?}"),
    }
}

fn attached(id: u128, owner: &NodeId) -> SessionRecord {
    created(id, owner).0
}

/// The committed outcome, or a panic naming what happened instead.
fn committed(outcome: Outcome, what: &str) -> jumpvpn_core::Commit {
    match outcome {
        Outcome::Commit(c) => c,
        other => panic!("{what} was not committed: {other:?}"),
    }
}

/// Runs the audit checker over `events` (in the order they were produced) and returns its
/// violations.
fn audit_violations(events: &[AuditEvent]) -> Vec<String> {
    let mut checker = Checker::new();
    let file = checker.add_source("merged.jsonl");
    let mut found = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let line = event.to_json_line();
        match checker.parse(line.as_bytes()) {
            Ok(parsed) => checker.feed(parsed, file, i as u64 + 1),
            Err(why) => found.push(format!("unparsable {line}: {why}")),
        }
    }
    let summary = checker.finish();
    found.extend(checker.drain_violations().map(|v| v.to_string()));
    assert_eq!(summary.violations as usize, found.len(), "{found:#?}");
    found
}

fn facts(
    mode: ClusterMode,
    on_owner_loss: OnOwnerLoss,
    owner_liveness: OwnerLiveness,
    local_lease_valid: bool,
    members: &[Member],
) -> Facts<'_> {
    Facts {
        mode,
        on_owner_loss,
        owner_liveness,
        local_lease_valid,
        members,
    }
}

/// The first session ID (counting up from `from`) whose rendezvous owner over `members` is
/// `want`.
fn session_routed_to(want: &str, members: &[Member], from: u128) -> u128 {
    (from..)
        .find(|id| owner_of(SessionId::from_u128(*id), members) == gw(want))
        .expect("some session routes to every member")
}

/// The sticky owner of `id` over a non-empty member list.
fn owner_of(id: SessionId, members: &[Member]) -> NodeId {
    rendezvous_owner(id, members)
        .expect("a non-empty member list has an owner")
        .id
        .clone()
}

/// A deterministic 64-bit generator (splitmix64) for bulk IDs.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_id(state: &mut u64) -> SessionId {
    let hi = u128::from(splitmix(state));
    let lo = u128::from(splitmix(state));
    SessionId::from_u128(hi << 64 | lo)
}

// ---------------------------------------------------------------------------------------------
// The decision table (SPEC §4 step 5, §7.4, §7.5)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    This,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hint {
    None,
    /// The member whose ID is the record's owner.
    RecordOwner,
    /// The sticky routing function's choice.
    Rendezvous,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Proceed,
    Reject(ReasonCode, bool, Hint),
    FailoverFirst,
    TerminateOwnerLost,
}

/// One row: `None` matches anything. The first matching row wins, as in the module's table.
struct Row {
    mode: Option<ClusterMode>,
    owner: Option<Owner>,
    lease: Option<bool>,
    liveness: Option<OwnerLiveness>,
    loss: Option<OnOwnerLoss>,
    want: Want,
}

const fn row(
    mode: Option<ClusterMode>,
    owner: Option<Owner>,
    lease: Option<bool>,
    liveness: Option<OwnerLiveness>,
    loss: Option<OnOwnerLoss>,
    want: Want,
) -> Row {
    Row {
        mode,
        owner,
        lease,
        liveness,
        loss,
        want,
    }
}

#[test]
fn reattach_decision_follows_the_ownership_table_for_every_combination() {
    use ClusterMode::*;
    use OnOwnerLoss as L;
    use Owner::*;
    use OwnerLiveness::*;
    use Want::*;

    #[rustfmt::skip]
    let table = [
        row(Some(Single), Some(This),  None,        None,               None,              Proceed),
        row(Some(Single), Some(Other), None,        None,               None,
            Reject(R::OwnershipConflict, false, Hint::RecordOwner)),
        row(Some(Sticky), Some(This),  None,        None,               None,              Proceed),
        row(Some(Sticky), Some(Other), None,        None,               None,
            Reject(R::OwnershipConflict, true, Hint::Rendezvous)),
        row(Some(Shared), None,        Some(false), None,               None,
            Reject(R::StoreUnavailable, true, Hint::None)),
        row(Some(Shared), Some(This),  Some(true),  None,               None,              Proceed),
        row(Some(Shared), Some(Other), Some(true),  Some(Alive),        None,
            Reject(R::OwnershipConflict, true, Hint::RecordOwner)),
        row(Some(Shared), Some(Other), Some(true),  Some(Unknown),      None,
            Reject(R::StoreUnavailable, true, Hint::None)),
        row(Some(Shared), Some(Other), Some(true),  Some(LeaseExpired), Some(L::Failover),
            FailoverFirst),
        row(Some(Shared), Some(Other), Some(true),  Some(LeaseExpired), Some(L::Deny),
            Reject(R::OwnerUnavailable, true, Hint::None)),
        row(Some(Shared), Some(Other), Some(true),  Some(LeaseExpired), Some(L::Terminate),
            TerminateOwnerLost),
    ];

    let members = three();
    let this = gw("gw1");
    // Owned by gw2 but routed (sticky) to gw3, so a hint from the wrong source is caught.
    let id = session_routed_to("gw3", &members, 1);
    let mine = attached(id, &this);
    let theirs = attached(id, &gw("gw2"));
    let mut used = vec![0usize; table.len()];
    for mode in [Single, Sticky, Shared] {
        for owner in [This, Other] {
            for lease in [true, false] {
                for liveness in [Alive, LeaseExpired, Unknown] {
                    for loss in [L::Failover, L::Deny, L::Terminate] {
                        let matches = |r: &Row| {
                            r.mode.is_none_or(|m| m == mode)
                                && r.owner.is_none_or(|o| o == owner)
                                && r.lease.is_none_or(|l| l == lease)
                                && r.liveness.is_none_or(|l| l == liveness)
                                && r.loss.is_none_or(|l| l == loss)
                        };
                        let case = format!("{mode} {owner:?} lease={lease} {liveness:?} {loss}");
                        let at = table.iter().position(matches).unwrap_or_else(|| {
                            panic!("no row for {case}");
                        });
                        used[at] += 1;
                        let record = if owner == This { &mine } else { &theirs };
                        let f = facts(mode, loss, liveness, lease, &members);
                        let expected = match table[at].want {
                            Proceed => Decision::Proceed,
                            FailoverFirst => Decision::FailoverFirst,
                            TerminateOwnerLost => Decision::Terminate {
                                reason: R::OwnerLost,
                            },
                            Reject(reason, retryable, hint) => Decision::Reject {
                                reason,
                                retryable,
                                owner_hint: match hint {
                                    Hint::None => None,
                                    Hint::RecordOwner => Some(member("gw2", 2)),
                                    Hint::Rendezvous => Some(member("gw3", 3)),
                                },
                            },
                        };
                        assert_eq!(decide(record, &this, &f), expected, "{case}");
                    }
                }
            }
        }
    }
    assert!(used.iter().all(|n| *n > 0), "a row never applies: {used:?}");
}

#[test]
fn a_terminated_session_is_expired_for_every_node_and_every_fact() {
    let members = three();
    let owner = gw("gw1");
    let ended = commit(
        &attached(5, &owner),
        SessionEvent::Terminate {
            reason: R::PolicyTermination,
        },
        &owner,
        T0,
    );
    for this in [gw("gw1"), gw("gw2")] {
        for mode in [
            ClusterMode::Single,
            ClusterMode::Sticky,
            ClusterMode::Shared,
        ] {
            for liveness in [
                OwnerLiveness::Alive,
                OwnerLiveness::LeaseExpired,
                OwnerLiveness::Unknown,
            ] {
                for lease in [true, false] {
                    let f = facts(mode, OnOwnerLoss::Failover, liveness, lease, &members);
                    let expected = Decision::Reject {
                        reason: R::SessionExpired,
                        retryable: false,
                        owner_hint: None,
                    };
                    assert_eq!(decide(&ended, &this, &f), expected);
                }
            }
        }
    }
}

#[test]
fn sticky_hint_falls_back_to_the_record_owner_when_the_hash_names_this_node() {
    let members = three();
    let id = session_routed_to("gw1", &members, 1);
    let record = attached(id, &gw("gw2"));
    let f = facts(
        ClusterMode::Sticky,
        OnOwnerLoss::Failover,
        OwnerLiveness::Alive,
        true,
        &members,
    );
    let Decision::Reject {
        reason, owner_hint, ..
    } = decide(&record, &gw("gw1"), &f)
    else {
        panic!("a non-owner proceeded");
    };
    assert_eq!(reason, R::OwnershipConflict);
    assert_eq!(
        owner_hint,
        Some(member("gw2", 2)),
        "hint must not point back here"
    );
}

#[test]
fn a_frozen_session_owned_here_proceeds_and_the_machine_refuses_it_as_frozen() {
    let members = three();
    let this = gw("gw1");
    let rec = attached(6, &this);
    let ctx = Context {
        now: T0,
        node: &this,
    };
    let frozen = committed(
        migration_step(
            &rec,
            MigrationStep::Freeze,
            &gw("gw2"),
            R::Migration,
            &members,
            &ctx,
        ),
        "freeze",
    )
    .record;
    let f = facts(
        ClusterMode::Shared,
        OnOwnerLoss::Failover,
        OwnerLiveness::Alive,
        true,
        &members,
    );
    assert_eq!(decide(&frozen, &this, &f), Decision::Proceed);
    let attempt = reattach(frozen.last_nonce + 1, frozen.state_version, 9);
    match apply(&frozen, &attempt, &ctx) {
        Outcome::Reject(r) => {
            assert_eq!(r.refusal.reason, R::SessionFrozen);
            assert!(r.refusal.retryable);
        }
        other => panic!("a frozen session took a new binding: {other:?}"),
    }
}

#[test]
fn a_rejected_decision_is_audited_at_the_unchanged_version_and_checks() {
    let members = three();
    let (record, mut audit) = created(7, &gw("gw2"));
    let this = gw("gw1");
    let f = facts(
        ClusterMode::Shared,
        OnOwnerLoss::Deny,
        OwnerLiveness::LeaseExpired,
        true,
        &members,
    );
    let ctx = Context {
        now: T0.plus(10),
        node: &this,
    };
    let decision = decide(&record, &this, &f);
    let rejection = decision
        .rejection(&record, &ctx)
        .expect("a reject is audited");
    assert_eq!(rejection.refusal.reason, R::OwnerUnavailable);
    assert!(rejection.refusal.retryable);
    let [event] = rejection.events.as_slice() else {
        panic!("one event expected: {:?}", rejection.events);
    };
    assert_eq!(event.state_version, record.state_version);
    assert_eq!(event.owner_epoch, record.owner_epoch);
    assert_eq!(event.node_id, this);
    assert_eq!(event.reason_code, R::OwnerUnavailable);
    assert_eq!(event.kind, EventKind::ReattachRejected { retryable: true });
    assert_eq!(Decision::Proceed.rejection(&record, &ctx), None);
    audit.extend(rejection.events);
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
}

#[test]
fn an_unknown_session_is_pointed_at_its_sticky_owner_or_not_found() {
    let members = three();
    let this = gw("gw1");
    let elsewhere = SessionId::from_u128(session_routed_to("gw3", &members, 1));
    let here = SessionId::from_u128(session_routed_to("gw1", &members, 1));
    let sticky = facts(
        ClusterMode::Sticky,
        OnOwnerLoss::Failover,
        OwnerLiveness::Alive,
        true,
        &members,
    );
    assert_eq!(
        decide_unknown_session(elsewhere, &this, &sticky),
        Decision::Reject {
            reason: R::OwnershipConflict,
            retryable: true,
            owner_hint: Some(member("gw3", 3)),
        }
    );
    let not_found = Decision::Reject {
        reason: R::SessionNotFound,
        retryable: false,
        owner_hint: None,
    };
    assert_eq!(decide_unknown_session(here, &this, &sticky), not_found);
    let shared = Facts {
        mode: ClusterMode::Shared,
        ..sticky
    };
    assert_eq!(decide_unknown_session(elsewhere, &this, &shared), not_found);
}

#[test]
fn only_the_owner_with_a_valid_lease_may_forward() {
    let this = gw("gw1");
    let rec = attached(8, &this);
    assert!(may_forward(&rec, &this, true, ClusterMode::Shared));
    assert!(
        !may_forward(&rec, &this, false, ClusterMode::Shared),
        "a fenced node forwarded"
    );
    assert!(!may_forward(&rec, &gw("gw2"), true, ClusterMode::Shared));
    // Without a shared store there is no lease to lose.
    assert!(may_forward(&rec, &this, false, ClusterMode::Single));
    assert!(may_forward(&rec, &this, false, ClusterMode::Sticky));
    assert!(!may_forward(&rec, &gw("gw2"), true, ClusterMode::Sticky));
    let ended = commit(
        &rec,
        SessionEvent::Terminate {
            reason: R::PolicyTermination,
        },
        &this,
        T0,
    );
    assert!(!may_forward(&ended, &this, true, ClusterMode::Single));
}

// ---------------------------------------------------------------------------------------------
// Rendezvous routing and minting (SPEC §7.2)

#[test]
fn rendezvous_weights_are_pinned_so_every_version_routes_alike() {
    // Golden values: a change here re-routes every sticky session of a running cluster.
    let id = SessionId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    assert_eq!(rendezvous_weight(id, &gw("gw1")), GOLDEN_GW1);
    assert_eq!(rendezvous_weight(id, &gw("gw2")), GOLDEN_GW2);
    assert_eq!(
        rendezvous_weight(SessionId::from_u128(0), &gw("")),
        GOLDEN_EMPTY
    );
}

// Computed independently of this crate (a Python transcription of FNV-1a 64 + murmur3 fmix64).
const GOLDEN_GW1: u64 = 0x4411_3c7a_67a5_ed72;
const GOLDEN_GW2: u64 = 0xf6c3_250d_0910_ea24;
const GOLDEN_EMPTY: u64 = 0xa5e0_dba6_c385_580a;

#[test]
fn rendezvous_over_no_members_has_no_owner() {
    assert_eq!(rendezvous_owner(SessionId::from_u128(1), &[]), None);
}

#[test]
fn thirty_thousand_sessions_spread_within_five_percent_over_three_members() {
    let schemes: [[&str; 3]; 3] = [
        ["gw1", "gw2", "gw3"],
        ["10.0.0.1:51820", "10.0.0.2:51820", "10.0.0.3:51820"],
        [
            "edge-a.example.net",
            "edge-b.example.net",
            "edge-c.example.net",
        ],
    ];
    for (seed, names) in schemes.iter().enumerate() {
        let members: Vec<Member> = names.iter().map(|n| Member::new(gw(n))).collect();
        let mut state = seed as u64 * 0x1234_5678 + 1;
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            let owner = owner_of(random_id(&mut state), &members);
            let i = members
                .iter()
                .position(|m| m.id == owner)
                .expect("a member");
            counts[i] += 1;
        }
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{names:?}: {counts:?}");
        }
    }
}

fn member_names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-z0-9.:-]{1,12}", 2..8).prop_map(|s| s.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn removing_a_member_moves_only_the_sessions_it_owned(
        names in member_names(),
        gone in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let members = ids(&names);
        let gone = gone.index(members.len());
        let mut rest = members.clone();
        let removed = rest.remove(gone);
        let mut state = seed;
        for _ in 0..300 {
            let id = random_id(&mut state);
            let before = owner_of(id, &members);
            let after = owner_of(id, &rest);
            if before == removed.id {
                prop_assert_ne!(&after, &removed.id);
            } else {
                prop_assert_eq!(&after, &before, "an unaffected session moved");
            }
        }
    }

    #[test]
    fn adding_a_member_moves_sessions_only_to_it(
        names in member_names(),
        seed in any::<u64>(),
    ) {
        let (newcomer, old) = names.split_last().expect("at least two names");
        let before_list = ids(old);
        let after_list = ids(&names);
        let mut state = seed;
        let mut moved = 0;
        for _ in 0..300 {
            let id = random_id(&mut state);
            let before = owner_of(id, &before_list);
            let after = owner_of(id, &after_list);
            if after != before {
                prop_assert_eq!(after.as_str(), newcomer.as_str());
                moved += 1;
            }
        }
        // The newcomer takes its share (1/n of 300 is at least 37): it is not ignored.
        prop_assert!(moved > 0);
    }

    #[test]
    fn rendezvous_owner_does_not_depend_on_member_order(
        (names, shuffled) in member_names()
            .prop_flat_map(|n| (Just(n.clone()), Just(n).prop_shuffle())),
        seed in any::<u64>(),
    ) {
        let a = ids(&names);
        let b = ids(&shuffled);
        let mut state = seed;
        for _ in 0..100 {
            let id = random_id(&mut state);
            prop_assert_eq!(owner_of(id, &a), owner_of(id, &b));
        }
    }

    #[test]
    fn minted_session_ids_always_route_to_the_minter(
        names in member_names(),
        who in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let members = ids(&names);
        let this = members[who.index(members.len())].id.clone();
        let mut state = seed;
        let minted = mint_session_id(&this, &members, || random_id(&mut state).to_bytes());
        let id = minted.expect("minting with good randomness succeeds");
        prop_assert_eq!(owner_of(id, &members), this);
    }
}

#[test]
fn minting_for_a_node_that_is_not_a_member_is_refused_without_drawing() {
    let members = three();
    let mut draws = 0;
    let minted = mint_session_id(&gw("gw9"), &members, || {
        draws += 1;
        [draws as u8; 16]
    });
    assert_eq!(minted, None);
    assert_eq!(draws, 0);
}

#[test]
fn minting_gives_up_after_sixty_four_draws_per_member() {
    let members = three();
    // Randomness stuck on an ID that routes to gw3: gw1 can never mint from it.
    let stuck = SessionId::from_u128(session_routed_to("gw3", &members, 1)).to_bytes();
    let mut draws = 0;
    let minted = mint_session_id(&gw("gw1"), &members, || {
        draws += 1;
        stuck
    });
    assert_eq!(minted, None);
    assert_eq!(draws, 64 * 3);
    // The same stuck source serves gw3 at the first draw.
    let mut draws = 0;
    let minted = mint_session_id(&gw("gw3"), &members, || {
        draws += 1;
        stuck
    });
    assert_eq!(minted, Some(SessionId::from_bytes(stuck)));
    assert_eq!(draws, 1);
}

// ---------------------------------------------------------------------------------------------
// Migration and drain (SPEC §7.4 ways 1 and 2)

#[test]
fn migration_freeze_transfer_and_reattach_on_the_new_owner_pass_the_audit_checker() {
    for reason in [R::Migration, R::Drain] {
        let members = three();
        let (a, b) = (gw("gw1"), gw("gw2"));
        let (rec, mut audit) = created(11, &a);
        let at = |ms: u64, node| Context {
            now: T0.plus(ms),
            node,
        };

        let freeze = migration_step(
            &rec,
            MigrationStep::Freeze,
            &b,
            reason,
            &members,
            &at(100, &a),
        );
        let freeze = committed(freeze, "freeze");
        assert!(freeze.record.frozen);
        assert_eq!(
            freeze.record.state,
            SessionState::Attached,
            "traffic still flows"
        );
        assert_eq!(freeze.record.owner_epoch, rec.owner_epoch);
        assert_eq!(
            MigrationStep::Freeze.next(true),
            Some(MigrationStep::Transfer)
        );
        audit.extend(freeze.events);

        let transfer = migration_step(
            &freeze.record,
            MigrationStep::Transfer,
            &b,
            reason,
            &members,
            &at(200, &a),
        );
        let transfer = committed(transfer, "transfer");
        let moved = transfer.record;
        assert_eq!(moved.owner, b);
        assert_eq!(moved.owner_epoch, OwnerEpoch(rec.owner_epoch.get() + 1));
        assert_eq!(moved.state, SessionState::Recovering);
        assert!(moved.binding.is_none() && !moved.frozen);
        assert!(transfer.events.iter().any(|e| e.reason_code == reason
            && matches!(e.kind, EventKind::SessionOwnerTransferred { .. })));
        assert_eq!(MigrationStep::Transfer.next(true), None);
        audit.extend(transfer.events);

        // The old owner stops; the new one proceeds.
        assert!(!may_forward(&moved, &a, true, ClusterMode::Shared));
        assert!(may_forward(&moved, &b, true, ClusterMode::Shared));
        let f = facts(
            ClusterMode::Shared,
            OnOwnerLoss::Failover,
            OwnerLiveness::Alive,
            true,
            &members,
        );
        assert_eq!(
            decide(&moved, &a, &f),
            Decision::Reject {
                reason: R::OwnershipConflict,
                retryable: true,
                owner_hint: Some(member("gw2", 2)),
            }
        );
        assert_eq!(decide(&moved, &b, &f), Decision::Proceed);

        // The client, told the new version by REDIRECT, reattaches to B.
        let attempt = reattach(moved.last_nonce + 1, moved.state_version, 20);
        let resumed = committed(apply(&moved, &attempt, &at(300, &b)), "reattach on B");
        assert_eq!(resumed.record.state, SessionState::Attached);
        assert_eq!(resumed.record.owner, b);
        audit.extend(resumed.events);

        assert_eq!(audit_violations(&audit), Vec::<String>::new(), "{reason}");
    }
}

#[test]
fn a_failed_transfer_is_aborted_by_unfreezing_and_the_audit_still_checks() {
    let members = three();
    let (a, b) = (gw("gw1"), gw("gw2"));
    let (rec, mut audit) = created(12, &a);
    let ctx = Context {
        now: T0.plus(50),
        node: &a,
    };
    let freeze = committed(
        migration_step(
            &rec,
            MigrationStep::Freeze,
            &b,
            R::Migration,
            &members,
            &ctx,
        ),
        "freeze",
    );
    audit.extend(freeze.events);
    // The transfer's CAS fails (store unreachable); its commit is discarded.
    let _lost = committed(
        migration_step(
            &freeze.record,
            MigrationStep::Transfer,
            &b,
            R::Migration,
            &members,
            &ctx,
        ),
        "transfer",
    );
    assert_eq!(
        MigrationStep::Transfer.next(false),
        Some(MigrationStep::Abort)
    );
    let abort = committed(
        migration_step(
            &freeze.record,
            MigrationStep::Abort,
            &b,
            R::Migration,
            &members,
            &ctx,
        ),
        "abort",
    );
    let back = &abort.record;
    assert!(!back.frozen);
    assert_eq!(back.owner, a, "the session stays put");
    assert_eq!(back.owner_epoch, rec.owner_epoch);
    assert_eq!(back.state, SessionState::Attached);
    assert_eq!(back.binding, rec.binding);
    assert_eq!(back.state_version.get(), rec.state_version.get() + 2);
    assert!(abort
        .events
        .iter()
        .any(|e| e.reason_code == R::MigrationAborted
            && matches!(e.kind, EventKind::SessionResumed { .. })));
    assert_eq!(MigrationStep::Abort.next(true), None);
    audit.extend(abort.events);
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
}

#[test]
fn migration_to_a_non_member_the_owner_or_for_a_foreign_reason_is_refused_before_freezing() {
    let members = three();
    let a = gw("gw1");
    let (rec, mut audit) = created(13, &a);
    let ctx = Context {
        now: T0.plus(10),
        node: &a,
    };
    let cases = [
        (gw("gw9"), R::Migration, "not a member"),
        (a.clone(), R::Migration, "the owner itself"),
        (gw("gw2"), R::Failover, "failover is not a migration"),
        (gw("gw2"), R::PolicyTermination, "not an ownership reason"),
    ];
    for (to, reason, why) in cases {
        for step in [MigrationStep::Freeze, MigrationStep::Transfer] {
            match migration_step(&rec, step, &to, reason, &members, &ctx) {
                Outcome::Reject(r) => {
                    assert_eq!(r.refusal.reason, R::InvalidTransition, "{why}");
                    assert!(!r.refusal.retryable, "{why}");
                    assert!(r
                        .events
                        .iter()
                        .all(|e| e.state_version == rec.state_version));
                    assert!(matches!(
                        &r.events[0].kind,
                        EventKind::SessionOwnerRejected { new_owner: Some(n), .. } if *n == to
                    ));
                    audit.extend(r.events);
                }
                other => panic!("{why}: {step:?} was not refused: {other:?}"),
            }
        }
    }
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
}

#[test]
fn migration_by_a_node_that_is_not_the_owner_is_an_ownership_conflict() {
    let members = three();
    let rec = attached(14, &gw("gw1"));
    let intruder = gw("gw2");
    let ctx = Context {
        now: T0,
        node: &intruder,
    };
    for step in [
        MigrationStep::Freeze,
        MigrationStep::Transfer,
        MigrationStep::Abort,
    ] {
        // Even with a destination that is not a member, the ownership gate speaks first.
        for to in [gw("gw3"), gw("gw9")] {
            match migration_step(&rec, step, &to, R::Migration, &members, &ctx) {
                Outcome::Reject(r) => assert_eq!(r.refusal.reason, R::OwnershipConflict),
                other => panic!("{step:?} by a non-owner: {other:?}"),
            }
        }
    }
}

fn drain_case() -> impl Strategy<Value = (Vec<String>, Vec<bool>, Vec<(u128, u8)>)> {
    member_names().prop_flat_map(|names| {
        let n = names.len();
        (
            Just(names),
            prop::collection::vec(any::<bool>(), n),
            // (session id, kind): 0–5 live here, 6 terminated here, 7 owned elsewhere.
            prop::collection::vec((any::<u128>(), 0u8..8), 0..40),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn drain_plan_never_targets_this_node_or_a_dead_node(
        (names, alive, sessions) in drain_case()
    ) {
        let members = ids(&names);
        let this = members[0].id.clone();
        let live = |id: &NodeId| {
            members.iter().zip(&alive).any(|(m, up)| m.id == *id && *up)
        };
        let records: Vec<SessionRecord> = sessions
            .iter()
            .map(|(id, kind)| {
                let owner = if *kind == 7 { &members[1].id } else { &this };
                let rec = attached(*id, owner);
                if *kind == 6 {
                    let end = SessionEvent::Terminate { reason: R::PolicyTermination };
                    commit(&rec, end, owner, T0)
                } else {
                    rec
                }
            })
            .collect();
        let plan = plan_drain(&records, &this, &members, &live);

        let targets: Vec<Member> = members
            .iter()
            .filter(|m| m.id != this && live(&m.id))
            .cloned()
            .collect();
        for (id, to) in &plan.moves {
            prop_assert_ne!(to, &this, "drained onto itself");
            prop_assert!(live(to), "drained onto a dead node");
            // The routing function's choice among the live others, not just any live node.
            prop_assert_eq!(to, &owner_of(*id, &targets));
        }
        if targets.is_empty() {
            prop_assert!(plan.moves.is_empty());
        } else {
            prop_assert!(plan.stranded.is_empty());
        }
        // Every live session owned here is planned exactly once; nothing else is.
        let mut planned: Vec<SessionId> =
            plan.moves.iter().map(|(id, _)| *id).chain(plan.stranded.iter().copied()).collect();
        let mut wanted: Vec<SessionId> = records
            .iter()
            .filter(|r| r.owner == this && !r.is_terminated())
            .map(|r| r.session_id)
            .collect();
        planned.sort();
        wanted.sort();
        prop_assert_eq!(planned, wanted);
    }
}

// ---------------------------------------------------------------------------------------------
// Failover and owner loss (SPEC §7.4 way 3)

#[test]
fn explicit_failover_is_refused_while_the_owner_is_alive_or_unprovable() {
    let (rec, mut audit) = created(21, &gw("gw1"));
    let b = gw("gw2");
    for (liveness, reason) in [
        (OwnerLiveness::Alive, R::OwnershipConflict),
        (OwnerLiveness::Unknown, R::StoreUnavailable),
    ] {
        let refused = explicit_failover(&rec, &b, liveness, T0.plus(5))
            .expect_err("failover from a live or unprovable owner");
        assert_eq!(refused.refusal.reason, reason);
        let [event] = refused.events.as_slice() else {
            panic!("one event expected: {:?}", refused.events);
        };
        assert_eq!(event.state_version, rec.state_version);
        assert_eq!(
            event.kind,
            EventKind::SessionOwnerRejected {
                previous_owner: Some(gw("gw1")),
                new_owner: Some(b.clone()),
            }
        );
        audit.extend(refused.events);
    }
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
}

#[test]
fn failover_first_takes_an_expired_owners_session_then_the_reattach_binds_on_the_new_owner() {
    let members = three();
    let (a, b) = (gw("gw1"), gw("gw2"));
    let (rec, mut audit) = created(22, &a);
    let f = facts(
        ClusterMode::Shared,
        OnOwnerLoss::Failover,
        OwnerLiveness::LeaseExpired,
        true,
        &members,
    );
    assert_eq!(decide(&rec, &b, &f), Decision::FailoverFirst);

    let now = T0.plus(6_000);
    let failover = explicit_failover(&rec, &b, OwnerLiveness::LeaseExpired, now)
        .expect("failover after lease expiry");
    assert_eq!(failover.expected, rec.state_version);
    assert_eq!(failover.refusal, None);
    let taken = failover.record;
    assert_eq!(taken.owner, b);
    assert_eq!(taken.owner_epoch, OwnerEpoch(rec.owner_epoch.get() + 1));
    assert_eq!(taken.state_version.get(), rec.state_version.get() + 1);
    assert_eq!(taken.state, SessionState::Recovering);
    assert!(failover
        .events
        .iter()
        .all(|e| e.reason_code == R::Failover && e.node_id == b));
    audit.extend(failover.events);

    // Decided again on the new record, B proceeds and the reattach binds.
    assert_eq!(decide(&taken, &b, &f), Decision::Proceed);
    assert!(!may_forward(&taken, &a, true, ClusterMode::Shared));
    let ctx = Context {
        now: now.plus(1),
        node: &b,
    };
    let attempt = reattach(taken.last_nonce + 1, rec.state_version, 30);
    let bound = committed(apply(&taken, &attempt, &ctx), "reattach after failover");
    assert_eq!(bound.record.state, SessionState::Attached);
    audit.extend(bound.events);
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
}

#[test]
fn explicit_failover_of_an_ended_or_own_session_is_refused_by_the_machine() {
    let a = gw("gw1");
    let rec = attached(23, &a);
    let own = explicit_failover(&rec, &a, OwnerLiveness::LeaseExpired, T0)
        .expect_err("failover onto the owner itself");
    assert_eq!(own.refusal.reason, R::InvalidTransition);
    let ended = commit(
        &rec,
        SessionEvent::Terminate {
            reason: R::PolicyTermination,
        },
        &a,
        T0,
    );
    // Termination is reported before liveness, even while the owner is alive.
    let late = explicit_failover(&ended, &gw("gw2"), OwnerLiveness::Alive, T0)
        .expect_err("failover of a terminated session");
    assert_eq!(late.refusal.reason, R::SessionExpired);
    assert!(!late.refusal.retryable);
}

#[test]
fn owner_loss_with_terminate_ends_the_session_from_a_non_owner_node() {
    let members = three();
    let (a, b) = (gw("gw1"), gw("gw2"));
    let (rec, mut audit) = created(24, &a);
    let f = facts(
        ClusterMode::Shared,
        OnOwnerLoss::Terminate,
        OwnerLiveness::LeaseExpired,
        true,
        &members,
    );
    let Decision::Terminate { reason } = decide(&rec, &b, &f) else {
        panic!("owner loss with terminate did not terminate");
    };
    assert_eq!(reason, R::OwnerLost);
    let end = committed(
        apply(
            &rec,
            &SessionEvent::Terminate { reason },
            &Context {
                now: T0.plus(7_000),
                node: &b,
            },
        ),
        "termination by a non-owner",
    );
    assert_eq!(end.record.state, SessionState::Terminated);
    assert_eq!(
        end.record.owner, a,
        "terminating does not adopt the session"
    );
    assert_eq!(end.record.owner_epoch, rec.owner_epoch);
    audit.extend(end.events);
    assert_eq!(audit_violations(&audit), Vec::<String>::new());
    // Neither node carries it any more.
    assert!(!may_forward(&end.record, &a, true, ClusterMode::Shared));
    assert!(!may_forward(&end.record, &b, true, ClusterMode::Shared));
}

// ---------------------------------------------------------------------------------------------
// Configuration values (SPEC §9)

#[test]
fn cluster_settings_parse_from_their_lowercase_config_strings() {
    for (text, mode) in [
        ("single", ClusterMode::Single),
        ("sticky", ClusterMode::Sticky),
        ("shared", ClusterMode::Shared),
    ] {
        assert_eq!(
            serde_json::from_str::<ClusterMode>(&format!("\"{text}\"")).ok(),
            Some(mode)
        );
        assert_eq!(mode.as_str(), text);
    }
    for (text, loss) in [
        ("failover", OnOwnerLoss::Failover),
        ("deny", OnOwnerLoss::Deny),
        ("terminate", OnOwnerLoss::Terminate),
    ] {
        assert_eq!(
            serde_json::from_str::<OnOwnerLoss>(&format!("\"{text}\"")).ok(),
            Some(loss)
        );
        assert_eq!(loss.to_string(), text);
    }
    assert!(serde_json::from_str::<ClusterMode>("\"Shared\"").is_err());
    assert_eq!(ClusterMode::default(), ClusterMode::Single);
    assert_eq!(OnOwnerLoss::default(), OnOwnerLoss::Failover);
}

#[test]
fn a_member_entry_parses_with_optional_addresses_and_rejects_unknown_keys() {
    let text = r#"{"id":"gw1","udp":"10.0.0.1:51820","tcp":"10.0.0.1:51820",
        "admin":"http://10.0.0.1:51900"}"#;
    let full: Member = serde_json::from_str(text).expect("a full member entry parses");
    assert_eq!(full, member("gw1", 1));
    let bare: Member = serde_json::from_str(r#"{"id":"gw2"}"#).expect("only the id is required");
    assert_eq!(bare, Member::new(gw("gw2")));
    assert!(serde_json::from_str::<Member>(r#"{"id":"gw3","upd":"10.0.0.3:51820"}"#).is_err());
    assert!(serde_json::from_str::<Member>(r#"{"id":"gw3","udp":"not an address"}"#).is_err());
}

//! The conformance suite: the same test code, run against every backend (memory, embedded,
//! etcd). Each function states one property of the store contract and asserts it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jumpvpn_core::record::{NewSession, SealedSecret, Termination};
use jumpvpn_core::{
    NodeId, Policy, ReasonCode, SessionId, SessionRecord, SessionState, StateVersion, Timestamp,
};
use jumpvpn_store::{Liveness, SessionStore, StoreError};

/// A stored-looking record (version 1, ATTACHED) owned by `owner`.
pub fn record(id: u128, owner: &str) -> SessionRecord {
    let mut r = SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(id),
            owner: NodeId::new(owner),
            client_key: [3; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9)),
            policy: Policy::default().into(),
            secrets: SealedSecret::new(vec![0x5A; 48]),
        },
        Timestamp(1_700_000_000_000),
    );
    r.state = SessionState::Attached;
    r.state_version = StateVersion(1);
    r.owner_epoch = jumpvpn_core::OwnerEpoch(1);
    r
}

/// `r` at the next version, marked with `mark` (in `last_nonce`) so a reader can tell whose
/// write it sees.
pub fn bumped(r: &SessionRecord, mark: u64) -> SessionRecord {
    let mut next = r.clone();
    next.state_version = StateVersion(r.state_version.get() + 1);
    next.last_nonce = mark;
    next
}

fn unique(base: u128) -> u128 {
    // Distinct IDs per call, so suites can share one store.
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (base << 64) | u128::from(NEXT.fetch_add(1, Ordering::Relaxed))
}

pub async fn create_twice_is_refused_with_the_stored_record<S: SessionStore>(s: &S) {
    let r = record(unique(1), "gw1");
    s.create(&r).await.expect("first create");
    let mut other = r.clone();
    other.owner = NodeId::new("gw2");
    match s.create(&other).await {
        Err(StoreError::AlreadyExists { current }) => assert_eq!(*current, r),
        other => panic!("second create: {other:?}"),
    }
    assert_eq!(
        s.get(r.session_id).await.expect("get"),
        Some(r),
        "nothing overwritten"
    );
}

pub async fn cas_applies_only_on_the_expected_version<S: SessionStore>(s: &S) {
    let r1 = record(unique(2), "gw1");
    s.create(&r1).await.expect("create");
    let r2 = bumped(&r1, 2);
    s.compare_and_swap(StateVersion(1), &r2)
        .await
        .expect("CAS 1 -> 2");
    assert_eq!(s.get(r1.session_id).await.expect("get"), Some(r2.clone()));

    // A stale writer that still believes version 1 loses and learns the current record.
    let stale = bumped(&r1, 99);
    match s.compare_and_swap(StateVersion(1), &stale).await {
        Err(StoreError::Conflict { current }) => assert_eq!(*current, r2),
        other => panic!("stale CAS: {other:?}"),
    }
    // A writer ahead of the store loses too.
    let ahead = bumped(&bumped(&r2, 0), 98);
    assert!(matches!(
        s.compare_and_swap(StateVersion(3), &ahead).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(
        s.get(r1.session_id).await.expect("get"),
        Some(r2),
        "losers wrote nothing"
    );
}

pub async fn cas_on_a_missing_session_is_not_found<S: SessionStore>(s: &S) {
    let r = record(unique(3), "gw1");
    match s.compare_and_swap(StateVersion(1), &bumped(&r, 1)).await {
        Err(StoreError::NotFound { session }) => assert_eq!(session, r.session_id),
        other => panic!("CAS on missing: {other:?}"),
    }
    assert_eq!(
        s.get(r.session_id).await.expect("get"),
        None,
        "no record created"
    );
}

pub async fn malformed_requests_are_refused_without_writing<S: SessionStore>(s: &S) {
    let r = record(unique(4), "gw1");
    s.create(&r).await.expect("create");
    let mut skip = bumped(&r, 1);
    skip.state_version = StateVersion(5);
    assert!(matches!(
        s.compare_and_swap(StateVersion(1), &skip).await,
        Err(StoreError::InvalidRequest { .. })
    ));
    let mut birth = record(unique(4), "gw1");
    birth.state_version = StateVersion(0);
    assert!(matches!(
        s.create(&birth).await,
        Err(StoreError::InvalidRequest { .. })
    ));
    assert_eq!(s.get(birth.session_id).await.expect("get"), None);
    assert_eq!(s.get(r.session_id).await.expect("get"), Some(r));
}

/// `racers` tasks race `rounds` CAS attempts each on one session: exactly one winner per
/// version, every loser sees a conflict carrying a newer record, and the final record is the
/// last winner's write.
pub async fn racers_have_exactly_one_winner_per_version<S: SessionStore + Clone>(
    s: &S,
    racers: u64,
    rounds: u64,
) {
    let r = record(unique(5), "gw1");
    s.create(&r).await.expect("create");
    let winners: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for racer in 1..=racers {
        let (s, winners, id) = (s.clone(), winners.clone(), r.session_id);
        tasks.push(tokio::spawn(async move {
            let mut current = s.get(id).await.expect("get").expect("exists");
            let mut wins = 0u64;
            for _ in 0..rounds {
                let expected = current.state_version;
                let mine = bumped(&current, racer);
                match s.compare_and_swap(expected, &mine).await {
                    Ok(()) => {
                        let prev = winners
                            .lock()
                            .expect("lock")
                            .insert(mine.state_version.get(), racer);
                        assert_eq!(prev, None, "version {} won twice", mine.state_version);
                        wins += 1;
                        current = mine;
                    }
                    Err(StoreError::Conflict { current: newer }) => {
                        assert!(
                            newer.state_version > expected,
                            "conflict without a newer record"
                        );
                        current = *newer;
                    }
                    Err(other) => panic!("racer {racer}: {other}"),
                }
            }
            wins
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("racer task");
    }
    let winners = winners.lock().expect("lock").clone();
    let last = s.get(r.session_id).await.expect("get").expect("exists");
    assert_eq!(
        last.state_version.get(),
        1 + total,
        "one version per win, none lost"
    );
    assert_eq!(winners.len() as u64, total);
    for v in 2..=last.state_version.get() {
        assert!(winners.contains_key(&v), "version {v} has no winner");
    }
    assert_eq!(
        Some(&last.last_nonce),
        winners.get(&last.state_version.get()),
        "last write is the last winner's"
    );
    assert!(
        total >= rounds,
        "every round someone wins: {total} wins over {rounds} rounds"
    );
}

pub async fn thousands_of_sessions_in_parallel<S: SessionStore + Clone>(
    s: &S,
    sessions: u64,
    tasks: u64,
) {
    let base = unique(6);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in (t..sessions).step_by(tasks as usize) {
                let r = record(base + u128::from(i) * 7919, "gw1");
                s.create(&r).await.expect("create");
                s.compare_and_swap(StateVersion(1), &bumped(&r, i))
                    .await
                    .expect("CAS");
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    for i in (0..sessions).step_by(97) {
        let got = s
            .get(SessionId::from_u128(base + u128::from(i) * 7919))
            .await
            .expect("get");
        assert_eq!(
            got.map(|r| (r.state_version, r.last_nonce)),
            Some((StateVersion(2), i))
        );
    }
}

pub async fn list_by_owner_pages_in_id_order<S: SessionStore>(s: &S) {
    let owner = format!("owner-{}", unique(7));
    let base = unique(7);
    let mut ids = Vec::new();
    for i in 0..25u128 {
        let who = if i % 5 == 0 {
            "someone-else"
        } else {
            owner.as_str()
        };
        let r = record(base + i * 1_000_003, who);
        s.create(&r).await.expect("create");
        if who == owner {
            ids.push(r.session_id);
        }
    }
    ids.sort();
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = s
            .list_by_owner(&NodeId::new(&owner), after, 7)
            .await
            .expect("list");
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        assert!(page.iter().all(|r| r.owner.as_str() == owner));
        after = page.last().map(|r| r.session_id);
        seen.extend(page.into_iter().map(|r| r.session_id));
    }
    assert_eq!(seen, ids, "every owned session once, in ID order");
}

pub async fn remove_terminated_keeps_live_and_recent_sessions<S: SessionStore>(s: &S) {
    let live = record(unique(8), "gw1");
    s.create(&live).await.expect("create");
    let mut old = record(unique(8), "gw1");
    old.state = SessionState::Terminated;
    old.termination = Some(Termination {
        reason: ReasonCode::PolicyTermination,
        at: Timestamp(1_000),
    });
    s.create(&old).await.expect("create");
    let mut recent = record(unique(8), "gw1");
    recent.state = SessionState::Terminated;
    recent.termination = Some(Termination {
        reason: ReasonCode::PolicyTermination,
        at: Timestamp(9_000),
    });
    s.create(&recent).await.expect("create");
    let removed = s.remove_terminated(Timestamp(5_000)).await.expect("remove");
    assert!(removed >= 1);
    assert_eq!(s.get(old.session_id).await.expect("get"), None);
    assert!(s.get(recent.session_id).await.expect("get").is_some());
    assert!(s.get(live.session_id).await.expect("get").is_some());
}

/// Node A registers with `ttl_ms` and stops renewing; node B (another handle) sees it alive,
/// then, after `wait_past_ttl` (which must let the TTL pass), dead. A renewal after expiry is
/// refused.
pub async fn liveness_expiry_is_seen_by_another_node<S, F, Fut>(
    a: &S,
    b: &S,
    ttl_ms: u64,
    wait_past_ttl: F,
) where
    S: Liveness,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let node = NodeId::new(format!("node-{}", unique(9)));
    let lease = a.register(&node, ttl_ms).await.expect("register");
    assert!(
        b.is_alive(&node).await.expect("is_alive"),
        "alive right after registering"
    );
    a.keep_alive(lease).await.expect("renewal while alive");
    assert!(!b
        .is_alive(&NodeId::new("never-registered"))
        .await
        .expect("is_alive"));
    wait_past_ttl().await;
    assert!(
        !b.is_alive(&node).await.expect("is_alive"),
        "expired lease still alive"
    );
    assert_eq!(a.keep_alive(lease).await, Err(StoreError::LeaseExpired));
}

/// A failover's write is refused while the previous owner's lease is live — nothing written —
/// and applies once the lease has expired (`wait_past_ttl` must let it expire).
pub async fn failover_write_waits_for_the_owner_lease_to_expire<S, F, Fut>(
    s: &S,
    ttl_ms: u64,
    wait_past_ttl: F,
) where
    S: SessionStore + Liveness,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let owner = NodeId::new(format!("owner-{}", unique(11)));
    let r = record(unique(11), owner.as_str());
    s.create(&r).await.expect("create");
    let _lease = s
        .register(&owner, ttl_ms)
        .await
        .expect("register the owner");
    let mut taken = bumped(&r, 1);
    taken.owner = NodeId::new("gw-new");
    taken.owner_epoch = jumpvpn_core::OwnerEpoch(2);
    match s
        .compare_and_swap_if_dead(StateVersion(1), &taken, &owner)
        .await
    {
        Err(StoreError::OwnerAlive { node }) => assert_eq!(node, owner),
        other => panic!("failover over a live lease: {other:?}"),
    }
    assert_eq!(
        s.get(r.session_id).await.expect("get"),
        Some(r.clone()),
        "nothing written"
    );
    wait_past_ttl().await;
    s.compare_and_swap_if_dead(StateVersion(1), &taken, &owner)
        .await
        .expect("failover after the lease expired");
    assert_eq!(s.get(r.session_id).await.expect("get"), Some(taken));
}

/// While the store is unavailable, every call fails with a typed error and changes nothing.
pub async fn unavailable_store_fails_closed_and_mutates_nothing<S, B, R, BF, RF>(
    s: &S,
    break_it: B,
    restore: R,
) where
    S: SessionStore,
    B: FnOnce() -> BF,
    R: FnOnce() -> RF,
    BF: std::future::Future<Output = ()>,
    RF: std::future::Future<Output = ()>,
{
    let r = record(unique(10), "gw1");
    s.create(&r).await.expect("create");
    break_it().await;
    let fresh = record(unique(10), "gw1");
    let outcomes = [
        s.compare_and_swap(StateVersion(1), &bumped(&r, 7))
            .await
            .err(),
        s.create(&fresh).await.err(),
        s.get(r.session_id).await.err(),
    ];
    for e in outcomes {
        assert!(
            matches!(
                e,
                Some(StoreError::Unavailable { .. } | StoreError::CommitUnknown { .. })
            ),
            "expected a typed unavailability, got {e:?}"
        );
        assert_eq!(
            e.map(|e| e.reason())
                .map(|r| r == ReasonCode::StoreUnavailable || r == ReasonCode::CommitUnknown),
            Some(true)
        );
    }
    restore().await;
    assert_eq!(
        s.get(r.session_id).await.expect("get"),
        Some(r),
        "nothing mutated"
    );
    assert_eq!(
        s.get(fresh.session_id).await.expect("get"),
        None,
        "nothing created"
    );
}

/// How long a test may wait for a condition.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Generates the conformance tests every backend must pass. `$open` is an async expression
/// giving `(guard, store)`; the guard (a temp dir, a cluster) lives as long as the test.
#[macro_export]
macro_rules! conformance_tests {
    ($open:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn create_twice_is_refused_with_the_stored_record() {
            let (_guard, s) = $open;
            suite::create_twice_is_refused_with_the_stored_record(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cas_applies_only_on_the_expected_version() {
            let (_guard, s) = $open;
            suite::cas_applies_only_on_the_expected_version(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cas_on_a_missing_session_is_not_found() {
            let (_guard, s) = $open;
            suite::cas_on_a_missing_session_is_not_found(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn malformed_requests_are_refused_without_writing() {
            let (_guard, s) = $open;
            suite::malformed_requests_are_refused_without_writing(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn sixteen_racers_have_exactly_one_winner_per_version() {
            let (_guard, s) = $open;
            suite::racers_have_exactly_one_winner_per_version(&s, 16, 200).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn thousands_of_sessions_in_parallel() {
            let (_guard, s) = $open;
            suite::thousands_of_sessions_in_parallel(&s, 2_000, 16).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn list_by_owner_pages_in_id_order() {
            let (_guard, s) = $open;
            suite::list_by_owner_pages_in_id_order(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn remove_terminated_keeps_live_and_recent_sessions() {
            let (_guard, s) = $open;
            suite::remove_terminated_keeps_live_and_recent_sessions(&s).await;
        }
    };
}

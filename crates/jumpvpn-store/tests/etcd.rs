//! The etcd backend against a real three-member etcd cluster (Debian's `etcd-server`): the
//! conformance suite; writes whose answer is lost exactly before or after etcd applied them;
//! then the faults of SPEC §7.5 — a member down, the quorum lost, the leader frozen under
//! concurrent writes, members restarted — and corrupt values.
//!
//! Each test starts its own cluster (about 0.3 s) and kills it at the end, also on failure.

mod etcd_cluster;
mod suite;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use etcd_cluster::{AnswerLoser, Cluster, Loss, MemberState};
use jumpvpn_core::record::Termination;
use jumpvpn_core::{NodeId, ReasonCode, SessionId, SessionRecord, StateVersion, Timestamp};
use jumpvpn_store::etcd::{EtcdStore, EtcdTimeouts, LostAnswers};
use jumpvpn_store::{codec, Liveness, SessionStore, StoreError};
use tokio::time::Instant;

/// Timeouts sized for a loopback cluster with a 500 ms election timeout.
const TIMEOUTS: EtcdTimeouts = EtcdTimeouts {
    connect: Duration::from_millis(300),
    request: Duration::from_millis(1_000),
    resolve: Duration::from_secs(8),
};

async fn connect(cluster: &Cluster, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&cluster.endpoints(), prefix, TIMEOUTS)
        .await
        .expect("connect to the test cluster")
}

async fn started(prefix: &str) -> (Cluster, EtcdStore) {
    let cluster = Cluster::start(3).await;
    let store = connect(&cluster, prefix).await;
    (cluster, store)
}

/// A plain client, to look at what the store wrote.
async fn raw(cluster: &Cluster) -> Client {
    Client::connect(cluster.endpoints(), None)
        .await
        .expect("raw etcd client")
}

// ---------------------------------------------------------------------------------------------
// The conformance suite.

conformance_tests!(started("/conformance/").await);

#[tokio::test]
async fn liveness_expiry_is_seen_by_another_node() {
    let cluster = Cluster::start(3).await;
    // Two connections: two nodes.
    let a = connect(&cluster, "/liveness/").await;
    let b = connect(&cluster, "/liveness/").await;
    let mut client = raw(&cluster).await;
    suite::liveness_expiry_is_seen_by_another_node(&a, &b, 1_000, || async move {
        // The lease is etcd's to expire: wait until etcd has deleted the node's key.
        wait_until_no_node_keys(&mut client, "/liveness/nodes/").await;
    })
    .await;
}

#[tokio::test]
async fn failover_write_waits_for_the_owner_lease_to_expire() {
    let cluster = Cluster::start(3).await;
    let s = connect(&cluster, "/failover/").await;
    let mut client = raw(&cluster).await;
    suite::failover_write_waits_for_the_owner_lease_to_expire(&s, 1_000, || async move {
        wait_until_no_node_keys(&mut client, "/failover/nodes/").await;
    })
    .await;
}

#[tokio::test]
async fn unavailable_store_fails_closed_and_mutates_nothing() {
    let (cluster, s) = started("/conformance/").await;
    let survivor = 0;
    suite::unavailable_store_fails_closed_and_mutates_nothing(
        &s,
        || async {
            cluster.stop(1);
            cluster.stop(2);
            // Until the survivor notices, a write would be proposed and could commit later;
            // that is the in-flight case, tested below. Here: a store that has lost quorum.
            cluster.wait_leaderless(survivor).await;
        },
        || async {
            cluster.restart(1);
            cluster.restart(2);
            cluster.wait_healthy().await;
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Liveness details.

#[tokio::test]
async fn revoked_lease_is_dead_and_cannot_be_renewed() {
    let (_cluster, s) = started("/liveness/").await;
    let node = NodeId::new("gw-revoke");
    let lease = s.register(&node, 1_500).await.expect("register");
    s.keep_alive(lease).await.expect("renew a live lease");
    assert!(s.is_alive(&node).await.expect("is_alive"));
    s.revoke(lease).await.expect("revoke");
    assert!(
        !s.is_alive(&node).await.expect("is_alive"),
        "revoked yet alive"
    );
    assert_eq!(s.keep_alive(lease).await, Err(StoreError::LeaseExpired));
    s.revoke(lease)
        .await
        .expect("revoking twice is not an error");
}

// ---------------------------------------------------------------------------------------------
// Lost answers, made to happen exactly where wanted.

/// A cluster, a proxy in front of member 0 that can lose one answer, and a store that talks
/// only through it.
async fn behind_a_lossy_proxy(timeouts: EtcdTimeouts) -> (Cluster, AnswerLoser, EtcdStore) {
    let cluster = Cluster::start(3).await;
    let proxy = AnswerLoser::start(&cluster.endpoint(0)).await;
    let store = EtcdStore::connect(&[proxy.endpoint()], "/lost/", timeouts)
        .await
        .expect("connect through the proxy");
    (cluster, proxy, store)
}

/// Waits until etcd holds `value` at `key` (seen by a client that bypasses the proxy).
async fn wait_until_stored(client: &mut Client, key: &str, value: &[u8]) {
    let deadline = Instant::now() + suite::PATIENCE;
    loop {
        let answer = client.get(key, None).await.expect("get");
        if answer.kvs().first().is_some_and(|kv| kv.value() == value) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never took the new value");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cas_whose_answer_is_lost_after_it_applied_is_ok_and_applied_once() {
    let (cluster, proxy, s) = behind_a_lossy_proxy(TIMEOUTS).await;
    let mut client = raw(&cluster).await;
    let r = record(1, "gw1");
    s.create(&r).await.expect("create");
    let key = s.session_key(r.session_id);
    let r2 = suite::bumped(&r, 7);

    // The store remembers the revision of its own create, so the CAS sends its transaction
    // at once: it is request 1.
    proxy.arm(1, Loss::AfterEtcd);
    let cas = tokio::spawn({
        let (s, r2) = (s.clone(), r2.clone());
        async move { s.compare_and_swap(StateVersion(1), &r2).await }
    });
    proxy.delivered().await;
    wait_until_stored(&mut client, &key, &codec::encode(&r2)).await;
    proxy.cut(); // the answer, withheld so far, is gone with the connection

    assert_eq!(cas.await.expect("CAS task"), Ok(()), "found applied");
    assert_eq!(
        s.lost_answers(),
        LostAnswers {
            total: 1,
            applied: 1,
            ..LostAnswers::default()
        }
    );
    let (history, rewrites) = record_history(&mut client, &key).await;
    assert_eq!(history, vec![r, r2], "applied exactly once");
    assert_eq!(rewrites, 0, "no fence needed");
}

#[tokio::test]
async fn cas_lost_before_reaching_etcd_is_fenced_off_then_applied_once() {
    let (cluster, proxy, s) = behind_a_lossy_proxy(TIMEOUTS).await;
    let mut client = raw(&cluster).await;
    let r = record(2, "gw1");
    s.create(&r).await.expect("create");
    let r2 = suite::bumped(&r, 7);

    // Request 1: the transaction (the store's own create left its revision cached).
    proxy.arm(1, Loss::BeforeEtcd);
    assert_eq!(
        s.compare_and_swap(StateVersion(1), &r2).await,
        Ok(()),
        "fenced, then tried again"
    );
    assert_eq!(
        s.lost_answers(),
        LostAnswers {
            total: 1,
            not_applied: 1,
            fenced: 1,
            ..LostAnswers::default()
        }
    );
    let (history, rewrites) = record_history(&mut client, &s.session_key(r.session_id)).await;
    assert_eq!(history, vec![r, r2], "applied exactly once");
    assert_eq!(rewrites, 1, "one fence: the same record put back");
}

#[tokio::test]
async fn create_whose_answer_is_lost_after_it_applied_is_ok() {
    let (cluster, proxy, s) = behind_a_lossy_proxy(TIMEOUTS).await;
    let mut client = raw(&cluster).await;
    let r = record(3, "gw1");
    let key = s.session_key(r.session_id);

    proxy.arm(1, Loss::AfterEtcd);
    let create = tokio::spawn({
        let (s, r) = (s.clone(), r.clone());
        async move { s.create(&r).await }
    });
    proxy.delivered().await;
    wait_until_stored(&mut client, &key, &codec::encode(&r)).await;
    proxy.cut();

    assert_eq!(create.await.expect("create task"), Ok(()), "found applied");
    assert_eq!(s.lost_answers().applied, 1);
    assert_eq!(s.get(r.session_id).await.expect("get"), Some(r));
}

#[tokio::test]
async fn create_lost_before_reaching_etcd_is_fenced_off_then_created_once() {
    let (cluster, proxy, s) = behind_a_lossy_proxy(TIMEOUTS).await;
    let mut client = raw(&cluster).await;
    let r = record(4, "gw1");

    proxy.arm(1, Loss::BeforeEtcd);
    assert_eq!(s.create(&r).await, Ok(()), "fenced, then tried again");
    assert_eq!(
        s.lost_answers(),
        LostAnswers {
            total: 1,
            not_applied: 1,
            fenced: 1,
            ..LostAnswers::default()
        }
    );
    let (history, _) = record_history(&mut client, &s.session_key(r.session_id)).await;
    assert_eq!(history, vec![r.clone()], "created exactly once");
    let fence = format!("/lost/fences/{}", r.session_id);
    let fences = client.get(fence.as_str(), None).await.expect("get fence");
    assert_eq!(fences.kvs().len(), 1, "the fence stays");
    match s.create(&r).await {
        Err(StoreError::AlreadyExists { current }) => assert_eq!(*current, r),
        other => panic!("second create: {other:?}"),
    }
}

#[tokio::test]
async fn write_whose_outcome_cannot_be_learned_is_commit_unknown_in_bounded_time() {
    let timeouts = EtcdTimeouts {
        resolve: Duration::from_secs(2),
        ..TIMEOUTS
    };
    let (cluster, proxy, s) = behind_a_lossy_proxy(timeouts).await;
    let mut client = raw(&cluster).await;
    let r = record(5, "gw1");
    s.create(&r).await.expect("create");
    let key = s.session_key(r.session_id);
    let before = snapshot(&mut client, "/lost/").await;

    // The transaction is lost and the store stays out of reach while the CAS tries to learn
    // what happened.
    proxy.arm(1, Loss::BeforeEtcdThenDown);
    let started_at = Instant::now();
    let outcome = s
        .compare_and_swap(StateVersion(1), &suite::bumped(&r, 7))
        .await;
    let elapsed = started_at.elapsed();
    match outcome {
        Err(StoreError::CommitUnknown { session, detail }) => {
            assert_eq!(session, r.session_id);
            assert!(detail.contains(&key), "names the key: {detail}");
        }
        other => panic!("expected CommitUnknown, got {other:?}"),
    }
    let bound = timeouts.resolve + 3 * timeouts.request + Duration::from_secs(1);
    assert!(elapsed < bound, "took {elapsed:?}, bound {bound:?}");
    assert_eq!(s.lost_answers().unknown, 1);

    proxy.heal();
    assert_eq!(
        snapshot(&mut client, "/lost/").await,
        before,
        "nothing was written"
    );
    assert_eq!(s.get(r.session_id).await.expect("get"), Some(r));
}

// ---------------------------------------------------------------------------------------------
// Faults.

/// A record owned by `owner`, at version 1.
#[tokio::test]
async fn a_stale_revision_cache_never_lets_a_write_through() {
    let cluster = Cluster::start(3).await;
    // Two nodes, each with its own connection and its own memory of its last writes.
    let a = connect(&cluster, "/stale/").await;
    let b = connect(&cluster, "/stale/").await;
    let r1 = record(0x57a1e, "gw1");
    a.create(&r1).await.expect("create on a");
    let r2 = suite::bumped(&r1, 2);
    b.compare_and_swap(StateVersion(1), &r2)
        .await
        .expect("b moves it to version 2");
    // a still remembers version 1 at its create's revision: its transaction must fail the
    // compare and learn the current record.
    match a
        .compare_and_swap(StateVersion(1), &suite::bumped(&r1, 99))
        .await
    {
        Err(StoreError::Conflict { current }) => assert_eq!(*current, r2),
        other => panic!("a stale writer got {other:?}"),
    }
    let r3 = suite::bumped(&r2, 3);
    a.compare_and_swap(StateVersion(2), &r3)
        .await
        .expect("a, now current, writes version 3");
    assert_eq!(b.get(r1.session_id).await.expect("get"), Some(r3));
}

/// Waits (bounded) until etcd has deleted every node key under `prefix`: leases are etcd's to
/// expire.
async fn wait_until_no_node_keys(client: &mut Client, prefix: &str) {
    let deadline = Instant::now() + suite::PATIENCE;
    let count = GetOptions::new().with_prefix().with_count_only();
    loop {
        let left = client.get(prefix, Some(count.clone())).await;
        if left.is_ok_and(|r| r.count() == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "node key outlived its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record(id: u128, owner: &str) -> SessionRecord {
    suite::record(id, owner)
}

#[tokio::test]
async fn one_member_down_the_cluster_still_serves() {
    let (cluster, s) = started("/one-down/").await;
    let leader = cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    let mut next_id = 1u128;
    for (down, what) in [(follower, "a follower"), (leader, "the leader")] {
        cluster.stop(down);
        if down == leader {
            // Serving resumes once the other two have elected a new leader.
            cluster.wait_healthy().await;
        }
        // Twenty rounds: the client balances over all three endpoints, so the dead one is
        // picked many times and must cost a retry, not an error.
        for _ in 0..20 {
            let r = record(next_id, "gw1");
            next_id += 1;
            s.create(&r)
                .await
                .unwrap_or_else(|e| panic!("create with {what} down: {e}"));
            let r2 = suite::bumped(&r, 2);
            s.compare_and_swap(StateVersion(1), &r2)
                .await
                .unwrap_or_else(|e| panic!("CAS with {what} down: {e}"));
            assert_eq!(s.get(r.session_id).await.expect("get"), Some(r2));
        }
        cluster.restart(down);
        cluster.wait_healthy().await;
    }
}

#[tokio::test]
async fn two_members_down_every_call_fails_closed_in_bounded_time_and_mutates_nothing() {
    let (cluster, s) = started("/quorum/").await;
    let a = record(0xa, "gw1");
    let b = record(0xb, "gw1");
    let mut old = record(0xc, "gw1");
    old.termination = Some(Termination {
        reason: ReasonCode::PolicyTermination,
        at: Timestamp(1_000),
    });
    for r in [&a, &b, &old] {
        s.create(r).await.expect("create");
    }
    let a2 = suite::bumped(&a, 2);
    s.compare_and_swap(StateVersion(1), &a2).await.expect("CAS");
    let node = NodeId::new("gw1");
    // Long enough not to expire while the test runs (etcd renews leases on a new leader).
    let lease = s.register(&node, 60_000).await.expect("register");
    let mut client = raw(&cluster).await;
    let before = snapshot(&mut client, "/quorum/").await;

    let survivor = cluster.leader().await.expect("a leader");
    for i in (0..3).filter(|&i| i != survivor) {
        cluster.stop(i);
    }
    cluster.wait_leaderless(survivor).await;

    let fresh = record(0xd, "gw2");
    let (a3, b2, gw2) = (
        suite::bumped(&a2, 3),
        suite::bumped(&b, 3),
        NodeId::new("gw2"),
    );
    let started_at = Instant::now();
    let (create, cas, cas_b, get, list, remove, register, renew, alive) = tokio::join!(
        s.create(&fresh),
        s.compare_and_swap(StateVersion(2), &a3),
        s.compare_and_swap(StateVersion(1), &b2),
        s.get(b.session_id),
        s.list_by_owner(&node, None, 10),
        s.remove_terminated(Timestamp(5_000)),
        s.register(&gw2, 5_000),
        s.keep_alive(lease),
        s.is_alive(&node),
    );
    let elapsed = started_at.elapsed();
    let outcomes: [(&str, Option<StoreError>); 9] = [
        ("create", create.err()),
        ("compare-and-swap", cas.err()),
        ("compare-and-swap", cas_b.err()),
        ("get", get.err()),
        ("list sessions of gw1", list.err()),
        ("remove terminated sessions", remove.err()),
        ("grant a lease", register.err()),
        ("keep lease", renew.err()),
        ("is gw1 alive", alive.err()),
    ];
    for (op, outcome) in outcomes {
        match outcome {
            Some(StoreError::Unavailable { detail }) => assert!(
                detail.contains(op),
                "the error names what failed ({op}): {detail}"
            ),
            other => panic!("{op} without a quorum: expected Unavailable, got {other:?}"),
        }
    }
    // Every call was refused before it was proposed: each took at most one request deadline
    // (a CAS: its read), plus scheduling slack.
    let bound = TIMEOUTS.request + Duration::from_millis(1_500);
    assert!(
        elapsed < bound,
        "fail-closed took {elapsed:?}, bound {bound:?}"
    );

    for i in (0..3).filter(|&i| i != survivor) {
        cluster.restart(i);
    }
    cluster.wait_healthy().await;
    let after = snapshot(&mut client, "/quorum/").await;
    assert_eq!(
        after, before,
        "the refused calls wrote nothing: same keys, values and revisions"
    );
    assert_eq!(s.get(a.session_id).await.expect("get"), Some(a2.clone()));
    assert_eq!(s.get(fresh.session_id).await.expect("get"), None);
    s.compare_and_swap(StateVersion(2), &suite::bumped(&a2, 4))
        .await
        .expect("serving again once the quorum is back");
}

/// Every key under `prefix` with its value and revisions, and the store's revision.
async fn snapshot(
    client: &mut Client,
    prefix: &str,
) -> (i64, BTreeMap<Vec<u8>, (Vec<u8>, i64, i64)>) {
    let answer = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("snapshot");
    let revision = answer.header().expect("header").revision();
    let keys = answer
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                (kv.value().to_vec(), kv.mod_revision(), kv.lease()),
            )
        })
        .collect();
    (revision, keys)
}

/// How one CAS attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Conflict,
    Unavailable,
    CommitUnknown,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_stream_through_a_paused_leader_resolves_every_write_and_applies_none_twice() {
    const WRITERS: u64 = 4;
    const ATTEMPTS: u64 = 25;
    let (cluster, s) = started("/pause/").await;
    let first = record(0xfeed, "gw1");
    s.create(&first).await.expect("create");
    let id = first.session_id;

    // (mark, version written, outcome) of every attempt.
    let outcomes: Arc<Mutex<Vec<(u64, StateVersion, Outcome)>>> = Arc::default();
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 1..=WRITERS {
        let (s, outcomes, done) = (s.clone(), outcomes.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            for attempt in 0..ATTEMPTS {
                let current = read_until_it_works(&s, id).await;
                let mine = suite::bumped(&current, w * 1_000 + attempt);
                let outcome = match s.compare_and_swap(current.state_version, &mine).await {
                    Ok(()) => Outcome::Ok,
                    Err(StoreError::Conflict { current: newer }) => {
                        assert!(newer.state_version > current.state_version);
                        Outcome::Conflict
                    }
                    Err(StoreError::Unavailable { .. }) => Outcome::Unavailable,
                    Err(StoreError::CommitUnknown { .. }) => Outcome::CommitUnknown,
                    Err(other) => panic!("writer {w}: unexpected {other}"),
                };
                outcomes.lock().expect("outcomes").push((
                    mine.last_nonce,
                    mine.state_version,
                    outcome,
                ));
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    wait_for(
        || done.load(Ordering::SeqCst) >= 8,
        "writes before the pause",
    )
    .await;
    let leader = cluster.leader().await.expect("a leader");
    cluster.pause(leader);
    let at_pause = done.load(Ordering::SeqCst);
    // Hold the pause until writes went on without the leader and at least one write lost its
    // answer to the frozen member (so the resolution path is part of this run).
    wait_for(
        || done.load(Ordering::SeqCst) >= at_pause + 12 && s.lost_answers().total > 0,
        "writes while the leader is frozen",
    )
    .await;
    cluster.resume(leader);
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(cluster.state(leader), MemberState::Running);
    cluster.wait_healthy().await;

    let outcomes = outcomes.lock().expect("outcomes").clone();
    assert_eq!(
        outcomes.len() as u64,
        WRITERS * ATTEMPTS,
        "every write resolved"
    );
    let mut client = raw(&cluster).await;
    let key = s.session_key(id);
    let (history, rewrites) = record_history(&mut client, &key).await;
    eprintln!(
        "outcomes: {} ok, {} conflict, {} unavailable, {} commit-unknown; {} same-value \
         rewrites (fences); final version {}",
        count(&outcomes, Outcome::Ok),
        count(&outcomes, Outcome::Conflict),
        count(&outcomes, Outcome::Unavailable),
        count(&outcomes, Outcome::CommitUnknown),
        rewrites,
        history.last().map_or(0, |r| r.state_version.get()),
    );
    let lost = s.lost_answers();
    eprintln!("lost answers: {lost:?}");
    assert_eq!(
        lost.total,
        lost.applied + lost.not_applied + lost.unknown,
        "every lost answer resolved one way"
    );
    assert_eq!(
        lost.unknown as usize,
        count(&outcomes, Outcome::CommitUnknown)
    );

    // The history is one version after another: none skipped, none written twice.
    for (i, r) in history.iter().enumerate() {
        assert_eq!(r.state_version.get(), i as u64 + 1, "history: {history:?}");
    }
    let applied: HashMap<u64, StateVersion> = history
        .iter()
        .skip(1)
        .map(|r| (r.last_nonce, r.state_version))
        .collect();
    assert_eq!(applied.len(), history.len() - 1, "a write applied twice");
    let mut unknown_applied = 0;
    for (mark, version, outcome) in &outcomes {
        match outcome {
            Outcome::Ok => assert_eq!(
                applied.get(mark),
                Some(version),
                "acknowledged write {mark} missing"
            ),
            Outcome::Conflict | Outcome::Unavailable => assert_eq!(
                applied.get(mark),
                None,
                "write {mark} reported {outcome:?} but applied"
            ),
            Outcome::CommitUnknown => unknown_applied += usize::from(applied.contains_key(mark)),
        }
    }
    let last = s.get(id).await.expect("get").expect("exists");
    assert_eq!(Some(&last), history.last());
    assert_eq!(
        last.state_version.get(),
        1 + (count(&outcomes, Outcome::Ok) + unknown_applied) as u64,
        "final version = initial + acknowledged writes (+ unknown ones that landed)"
    );
    if count(&outcomes, Outcome::CommitUnknown) == 0 {
        assert_eq!(
            last.state_version.get(),
            1 + count(&outcomes, Outcome::Ok) as u64
        );
    }
}

/// Reads `id` until the store answers (reads change nothing, so retrying them is free).
async fn read_until_it_works(s: &EtcdStore, id: SessionId) -> SessionRecord {
    let deadline = Instant::now() + suite::PATIENCE;
    loop {
        match s.get(id).await {
            Ok(Some(r)) => return r,
            Ok(None) => panic!("session {id} vanished"),
            Err(e) => assert!(Instant::now() < deadline, "no read for {id}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(condition: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(outcomes: &[(u64, StateVersion, Outcome)], which: Outcome) -> usize {
    outcomes.iter().filter(|(_, _, o)| *o == which).count()
}

/// Every value `key` has held since it was created, with same-value rewrites (the fences of
/// lost answers) folded, and how many were folded.
async fn record_history(client: &mut Client, key: &str) -> (Vec<SessionRecord>, usize) {
    let now = client.get(key, None).await.expect("get");
    let kv = now.kvs().first().expect("the key exists");
    let (from, to) = (kv.create_revision(), kv.mod_revision());
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(from)))
        .await
        .expect("watch");
    let mut values: Vec<Vec<u8>> = Vec::new();
    let mut rewrites = 0;
    let deadline = Instant::now() + suite::PATIENCE;
    'read: loop {
        let answer = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("history within patience")
            .expect("watch")
            .expect("watch open");
        assert_eq!(answer.compact_revision(), 0, "history compacted");
        for event in answer.events() {
            assert_eq!(
                event.event_type(),
                EventType::Put,
                "the session was deleted"
            );
            let kv = event.kv().expect("event kv");
            if values.last().is_some_and(|v| v == kv.value()) {
                rewrites += 1;
            } else {
                values.push(kv.value().to_vec());
            }
            if kv.mod_revision() >= to {
                break 'read;
            }
        }
    }
    let records = values
        .iter()
        .map(|v| codec::decode(key, v).expect("decodes"))
        .collect();
    (records, rewrites)
}

#[tokio::test]
async fn members_restarted_one_by_one_and_all_at_once_keep_every_record() {
    let (cluster, s) = started("/restart/").await;
    let mut expected = Vec::new();
    for i in 1..=30u128 {
        let mut r = record(i, if i % 2 == 0 { "gw1" } else { "gw2" });
        s.create(&r).await.expect("create");
        for step in 0..(i % 3) as u64 {
            let next = suite::bumped(&r, step + 1);
            s.compare_and_swap(r.state_version, &next)
                .await
                .expect("CAS");
            r = next;
        }
        expected.push(r);
    }
    let check = |when: &'static str| {
        let (s, expected) = (&s, &expected);
        async move {
            for r in expected {
                let got = read_until_it_works(s, r.session_id).await;
                assert_eq!(&got, r, "{when}: session {} changed", r.session_id);
            }
        }
    };

    for i in 0..3 {
        cluster.stop(i);
        cluster.restart(i);
        cluster.wait_healthy().await;
        check("after a rolling restart").await;
    }
    for i in 0..3 {
        cluster.stop(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy().await;
    check("after a full restart").await;

    let first = &expected[0];
    s.compare_and_swap(first.state_version, &suite::bumped(first, 99))
        .await
        .expect("writes go on after the restarts");
}

#[tokio::test]
async fn corrupt_values_are_reported_with_their_key() {
    let (cluster, s) = started("/corrupt/").await;
    let mut client = raw(&cluster).await;
    let garbled = SessionId::from_u128(0xbad);
    let key = s.session_key(garbled);
    client
        .put(key.as_str(), "{not json", None)
        .await
        .expect("put");
    let misplaced = SessionId::from_u128(0xbad2);
    client
        .put(
            s.session_key(misplaced),
            codec::encode(&record(0x600d, "gw1")),
            None,
        )
        .await
        .expect("put");

    let corrupt_at = |e: Result<_, StoreError>, want: &str| match e {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, want),
        other => panic!("expected Corrupt at {want}, got {other:?}"),
    };
    corrupt_at(s.get(garbled).await.map(drop), &key);
    corrupt_at(
        s.compare_and_swap(StateVersion(1), &suite::bumped(&record(0xbad, "gw1"), 1))
            .await,
        &key,
    );
    corrupt_at(s.get(misplaced).await.map(drop), &s.session_key(misplaced));
    corrupt_at(
        s.list_by_owner(&NodeId::new("gw1"), None, 10)
            .await
            .map(drop),
        &key,
    );
}

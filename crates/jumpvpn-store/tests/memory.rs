//! The conformance suite against the in-memory reference store.

mod suite;

use std::time::Duration;

use jumpvpn_store::memory::MemoryStore;

#[tokio::test]
async fn create_twice_is_refused_with_the_stored_record() {
    suite::create_twice_is_refused_with_the_stored_record(&MemoryStore::new()).await;
}

#[tokio::test]
async fn cas_applies_only_on_the_expected_version() {
    suite::cas_applies_only_on_the_expected_version(&MemoryStore::new()).await;
}

#[tokio::test]
async fn cas_on_a_missing_session_is_not_found() {
    suite::cas_on_a_missing_session_is_not_found(&MemoryStore::new()).await;
}

#[tokio::test]
async fn malformed_requests_are_refused_without_writing() {
    suite::malformed_requests_are_refused_without_writing(&MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_racers_have_exactly_one_winner_per_version() {
    suite::racers_have_exactly_one_winner_per_version(&MemoryStore::new(), 16, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_sessions_in_parallel() {
    suite::thousands_of_sessions_in_parallel(&MemoryStore::new(), 5_000, 16).await;
}

#[tokio::test]
async fn list_by_owner_pages_in_id_order() {
    suite::list_by_owner_pages_in_id_order(&MemoryStore::new()).await;
}

#[tokio::test]
async fn remove_terminated_keeps_live_and_recent_sessions() {
    suite::remove_terminated_keeps_live_and_recent_sessions(&MemoryStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn liveness_expiry_is_seen_by_another_node() {
    let a = MemoryStore::new();
    let b = a.clone();
    suite::liveness_expiry_is_seen_by_another_node(&a, &b, 1_000, || {
        tokio::time::advance(Duration::from_millis(1_001))
    })
    .await;
}

#[tokio::test]
async fn unavailable_store_fails_closed_and_mutates_nothing() {
    let s = MemoryStore::new();
    let (x, y) = (s.clone(), s.clone());
    suite::unavailable_store_fails_closed_and_mutates_nothing(
        &s,
        || async move { x.set_available(false) },
        || async move { y.set_available(true) },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn lease_keeper_stops_at_its_local_deadline_when_the_store_goes_away() {
    use std::sync::Arc;

    use jumpvpn_core::NodeId;
    use jumpvpn_store::lease::{LeaseKeeper, LeaseTiming};
    use jumpvpn_store::Liveness;

    let store = Arc::new(MemoryStore::new());
    let timing = LeaseTiming::from_ttl(Duration::from_millis(3_000));
    let keeper = LeaseKeeper::start(store.clone(), &NodeId::new("gw1"), timing)
        .await
        .expect("start");
    assert!(keeper.is_valid());
    // Renewals keep it valid well past one TTL.
    tokio::time::sleep(Duration::from_millis(9_000)).await;
    assert!(keeper.is_valid(), "renewed by the keep-alive loop");
    // Cut the node off from the store: its own deadline passes before the store's expiry.
    store.set_available(false);
    let deadline = keeper.deadline().expect("a deadline");
    tokio::time::sleep_until(deadline).await;
    assert!(!keeper.is_valid(), "fenced at the local deadline");
    store.set_available(true);
    assert!(
        store.is_alive(&NodeId::new("gw1")).await.expect("is_alive"),
        "the store still holds the lease when the node has already stopped acting"
    );
}

//! The conformance suite against the in-memory reference store.

mod suite;

use std::time::Duration;

use jumpvpn_store::memory::MemoryStore;

conformance_tests!(((), MemoryStore::new()));

#[tokio::test(start_paused = true)]
async fn liveness_expiry_is_seen_by_another_node() {
    let a = MemoryStore::new();
    let b = a.clone();
    suite::liveness_expiry_is_seen_by_another_node(&a, &b, 1_000, || {
        tokio::time::advance(Duration::from_millis(1_001))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn failover_write_waits_for_the_owner_lease_to_expire() {
    suite::failover_write_waits_for_the_owner_lease_to_expire(&MemoryStore::new(), 1_000, || {
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

//! The reference store: everything in one process's memory, behind one lock. Used by
//! deterministic simulations and as the baseline the other backends are measured against.
//!
//! Clones are handles to the same store, so two "nodes" of a test can share it. Faults are
//! injected with [`MemoryStore::set_available`]. Lease time is tokio's clock, so a test can
//! pause and advance it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jumpvpn_core::{NodeId, SessionId, SessionRecord, StateVersion, Timestamp};
use tokio::time::Instant;

use crate::{check_cas_request, check_create_request, LeaseId, Liveness, SessionStore, StoreError};

/// An in-memory session store.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    sessions: BTreeMap<SessionId, SessionRecord>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    unavailable: bool,
}

struct Lease {
    node: NodeId,
    ttl: Duration,
    expires: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation fail with [`StoreError::Unavailable`] (and change nothing) until
    /// called again with `true`.
    pub fn set_available(&self, available: bool) {
        self.lock().unavailable = !available;
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CAS, and when `unless_alive` names a node, only if that node holds no live lease:
    /// both checked under the one lock.
    fn cas(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        unless_alive: Option<&NodeId>,
    ) -> Result<(), StoreError> {
        check_cas_request(expected, record)?;
        let mut inner = self.available()?;
        if let Some(node) = unless_alive {
            let now = Instant::now();
            if inner
                .leases
                .values()
                .any(|l| l.node == *node && now < l.expires)
            {
                return Err(StoreError::OwnerAlive { node: node.clone() });
            }
        }
        let Some(current) = inner.sessions.get_mut(&record.session_id) else {
            return Err(StoreError::NotFound {
                session: record.session_id,
            });
        };
        if current.state_version != expected {
            return Err(StoreError::Conflict {
                current: Box::new(current.clone()),
            });
        }
        *current = record.clone();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied write: every write is a
        // single map insert. So a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn available(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let inner = self.lock();
        if inner.unavailable {
            return Err(StoreError::unavailable("memory store switched off"));
        }
        Ok(inner)
    }
}

impl SessionStore for MemoryStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        check_create_request(record)?;
        let mut inner = self.available()?;
        if let Some(current) = inner.sessions.get(&record.session_id) {
            return Err(StoreError::AlreadyExists {
                current: Box::new(current.clone()),
            });
        }
        inner.sessions.insert(record.session_id, record.clone());
        Ok(())
    }

    async fn get(&self, session: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.available()?.sessions.get(&session).cloned())
    }

    async fn compare_and_swap(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.cas(expected, record, None)
    }

    async fn compare_and_swap_if_dead(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        previous_owner: &NodeId,
    ) -> Result<(), StoreError> {
        self.cas(expected, record, Some(previous_owner))
    }

    async fn list_by_owner(
        &self,
        owner: &NodeId,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let inner = self.available()?;
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        Ok(inner
            .sessions
            .range((from, std::ops::Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| r.owner == *owner)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn remove_terminated(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut inner = self.available()?;
        let old = inner.sessions.len();
        inner
            .sessions
            .retain(|_, r| r.termination.is_none_or(|t| t.at >= before));
        Ok((old - inner.sessions.len()) as u64)
    }
}

impl Liveness for MemoryStore {
    async fn register(&self, node: &NodeId, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        let mut inner = self.available()?;
        inner.next_lease += 1;
        let id = inner.next_lease;
        let ttl = Duration::from_millis(ttl_ms);
        inner.leases.insert(
            id,
            Lease {
                node: node.clone(),
                ttl,
                expires: Instant::now() + ttl,
            },
        );
        Ok(LeaseId(id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.available()?;
        let now = Instant::now();
        match inner.leases.get_mut(&lease.0) {
            Some(l) if now < l.expires => {
                l.expires = now + l.ttl;
                Ok(())
            }
            _ => {
                inner.leases.remove(&lease.0);
                Err(StoreError::LeaseExpired)
            }
        }
    }

    async fn is_alive(&self, node: &NodeId) -> Result<bool, StoreError> {
        let inner = self.available()?;
        let now = Instant::now();
        Ok(inner
            .leases
            .values()
            .any(|l| l.node == *node && now < l.expires))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.available()?.leases.remove(&lease.0);
        Ok(())
    }
}

//! The embedded store (the default): one redb file, durable across crashes.
//!
//! Writes go through one writer thread that practises *group commit*: it takes every request
//! waiting in its queue, applies them in one write transaction (each CAS sees the writes before
//! it in the batch), commits once — one fsync — and then answers every request. A request is
//! acknowledged only after the commit that contains it is durable, so an acknowledged write
//! survives `kill -9`; throughput grows with concurrency instead of stopping at one fsync per
//! write. Reads use redb's MVCC snapshots and never wait for the writer.
//!
//! Liveness is local to the process (the embedded store serves single gateways and sticky
//! clusters, where no other node reads this store).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::thread;

use jumpvpn_core::{NodeId, SessionId, SessionRecord, StateVersion, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::memory::MemoryStore;
use crate::{
    check_cas_request, check_create_request, codec, LeaseId, Liveness, SessionStore, StoreError,
};

/// session ID → encoded record.
const SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("sessions");
/// (owner, session ID) → (), for listing a node's sessions without a scan.
const BY_OWNER: TableDefinition<(&str, u128), ()> = TableDefinition::new("sessions_by_owner");

/// Most requests committed together.
const MAX_BATCH: usize = 1024;

/// A durable session store in one file.
#[derive(Clone)]
pub struct EmbeddedStore {
    path: Arc<PathBuf>,
    open: Arc<RwLock<Option<Open>>>,
    commits: Arc<AtomicU64>,
    leases: MemoryStore,
}

#[derive(Clone)]
struct Open {
    db: Arc<Database>,
    writer: mpsc::Sender<Request>,
    thread: Arc<std::sync::Mutex<Option<thread::JoinHandle<()>>>>,
}

enum Op {
    Create(SessionRecord),
    Cas(StateVersion, SessionRecord),
    RemoveTerminated(Timestamp),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`. Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let store = Self {
            path: Arc::new(path),
            open: Arc::new(RwLock::new(None)),
            commits: Arc::new(AtomicU64::new(0)),
            leases: MemoryStore::new(),
        };
        store.reopen()?;
        Ok(store)
    }

    /// Closes the file: the writer finishes what it has and stops; until [`Self::reopen`],
    /// every call fails with [`StoreError::Unavailable`].
    pub fn close(&self) {
        let Some(open) = self.write_lock().take() else {
            return;
        };
        let Open { db, writer, thread } = open;
        // Without senders the writer ends after its current batch; wait for it, so the file
        // is released when this returns.
        drop(writer);
        let handle = thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        drop(db);
    }

    /// Opens the file again after [`Self::close`] (a no-op when open).
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.write_lock();
        if slot.is_some() {
            return Ok(());
        }
        let db = Database::create(&*self.path).map_err(|e| {
            StoreError::unavailable(format!("cannot open {}: {e}", self.path.display()))
        })?;
        let db = Arc::new(db);
        // Create the tables up front so readers never find them missing.
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?;
            txn.open_table(BY_OWNER)?;
            txn.commit()?;
            Ok(())
        };
        init().map_err(|e| {
            StoreError::unavailable(format!("cannot initialise {}: {e}", self.path.display()))
        })?;
        let (writer, queue) = mpsc::channel();
        let (db2, commits) = (db.clone(), self.commits.clone());
        let handle = thread::Builder::new()
            .name("jumpvpn-store-writer".to_owned())
            .spawn(move || write_loop(&db2, &queue, &commits))
            .map_err(|e| StoreError::unavailable(format!("cannot start the writer: {e}")))?;
        let thread = Arc::new(std::sync::Mutex::new(Some(handle)));
        *slot = Some(Open { db, writer, thread });
        Ok(())
    }

    /// How many commits (each one fsync) the store has made since it was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Option<Open>> {
        // The guarded value is replaced whole; a poisoned lock still holds a consistent one.
        self.open.write().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Result<Open, StoreError> {
        let guard = self.open.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or_else(|| {
            StoreError::unavailable(format!("embedded store {} is closed", self.path.display()))
        })
    }

    async fn submit(&self, op: Op) -> Result<u64, StoreError> {
        let open = self.current()?;
        let (reply, answer) = oneshot::channel();
        open.writer
            .send(Request { op, reply })
            .map_err(|_| StoreError::unavailable("the store's writer has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::unavailable("the store's writer has stopped"))?
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let open = self.current()?;
        let txn = open.db.begin_read().map_err(StoreError::unavailable)?;
        f(&txn)
    }
}

impl SessionStore for EmbeddedStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        check_create_request(record)?;
        self.submit(Op::Create(record.clone())).await.map(drop)
    }

    async fn get(&self, session: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(SESSIONS).map_err(StoreError::unavailable)?;
            let value = table
                .get(session.as_u128())
                .map_err(StoreError::unavailable)?;
            value
                .map(|v| codec::decode(&session.to_string(), v.value()))
                .transpose()
        })
    }

    async fn compare_and_swap(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        check_cas_request(expected, record)?;
        self.submit(Op::Cas(expected, record.clone()))
            .await
            .map(drop)
    }

    async fn list_by_owner(
        &self,
        owner: &NodeId,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let Some(start) = after.map_or(Some(0), |id| id.as_u128().checked_add(1)) else {
            return Ok(Vec::new());
        };
        self.read(|txn| {
            let index = txn.open_table(BY_OWNER).map_err(StoreError::unavailable)?;
            let sessions = txn.open_table(SESSIONS).map_err(StoreError::unavailable)?;
            let range = index
                .range((owner.as_str(), start)..=(owner.as_str(), u128::MAX))
                .map_err(StoreError::unavailable)?;
            let mut out = Vec::new();
            for entry in range.take(limit) {
                let (key, _) = entry.map_err(StoreError::unavailable)?;
                let (_, id) = key.value();
                let key = SessionId::from_u128(id).to_string();
                let value = sessions
                    .get(id)
                    .map_err(StoreError::unavailable)?
                    .ok_or_else(|| StoreError::Corrupt {
                        key: key.clone(),
                        detail: "indexed but absent".into(),
                    })?;
                out.push(codec::decode(&key, value.value())?);
            }
            Ok(out)
        })
    }

    async fn remove_terminated(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.submit(Op::RemoveTerminated(before)).await
    }
}

impl Liveness for EmbeddedStore {
    async fn register(&self, node: &NodeId, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        self.current()?;
        self.leases.register(node, ttl_ms).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.current()?;
        self.leases.keep_alive(lease).await
    }

    async fn is_alive(&self, node: &NodeId) -> Result<bool, StoreError> {
        self.current()?;
        self.leases.is_alive(node).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.leases.revoke(lease).await
    }
}

/// The writer thread: batch, apply, commit once, answer.
fn write_loop(db: &Database, queue: &mpsc::Receiver<Request>, commits: &AtomicU64) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let results = apply_batch(db, &batch);
        match results {
            Ok(results) => {
                commits.fetch_add(1, Ordering::Relaxed);
                for (request, result) in batch.into_iter().zip(results) {
                    // The caller may have gone away; the write stands regardless.
                    let _ = request.reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of the batch is durable: every request failed as a whole.
                for request in batch {
                    let _ = request.reply.send(Err(StoreError::unavailable(&e)));
                }
            }
        }
    }
}

/// Applies a batch in one transaction. The outer error means the transaction did not commit;
/// the inner results are each request's outcome once it has.
fn apply_batch(
    db: &Database,
    batch: &[Request],
) -> Result<Vec<Result<u64, StoreError>>, redb::Error> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut index = txn.open_table(BY_OWNER)?;
        for request in batch {
            let result = match &request.op {
                Op::Create(record) => {
                    let id = record.session_id.as_u128();
                    let existing = sessions.get(id)?.map(|v| v.value().to_vec());
                    match existing {
                        Some(bytes) => Err(already_exists(record.session_id, &bytes)),
                        None => {
                            sessions.insert(id, codec::encode(record).as_slice())?;
                            index.insert((record.owner.as_str(), id), ())?;
                            Ok(1)
                        }
                    }
                }
                Op::Cas(expected, record) => {
                    let id = record.session_id.as_u128();
                    let existing = sessions.get(id)?.map(|v| v.value().to_vec());
                    match existing.map(|b| codec::decode(&record.session_id.to_string(), &b)) {
                        None => Err(StoreError::NotFound {
                            session: record.session_id,
                        }),
                        Some(Err(corrupt)) => Err(corrupt),
                        Some(Ok(current)) if current.state_version != *expected => {
                            Err(StoreError::Conflict {
                                current: Box::new(current),
                            })
                        }
                        Some(Ok(current)) => {
                            sessions.insert(id, codec::encode(record).as_slice())?;
                            if current.owner != record.owner {
                                index.remove((current.owner.as_str(), id))?;
                                index.insert((record.owner.as_str(), id), ())?;
                            }
                            Ok(1)
                        }
                    }
                }
                Op::RemoveTerminated(before) => {
                    let mut doomed = Vec::new();
                    for entry in sessions.iter()? {
                        let (key, value) = entry?;
                        let id = key.value();
                        if let Ok(r) = codec::decode("", value.value()) {
                            if r.termination.is_some_and(|t| t.at < *before) {
                                doomed.push((id, r.owner));
                            }
                        }
                    }
                    for (id, owner) in &doomed {
                        sessions.remove(*id)?;
                        index.remove((owner.as_str(), *id))?;
                    }
                    Ok(doomed.len() as u64)
                }
            };
            results.push(result);
        }
    }
    txn.commit()?;
    Ok(results)
}

fn already_exists(session: SessionId, bytes: &[u8]) -> StoreError {
    match codec::decode(&session.to_string(), bytes) {
        Ok(current) => StoreError::AlreadyExists {
            current: Box::new(current),
        },
        Err(corrupt) => corrupt,
    }
}

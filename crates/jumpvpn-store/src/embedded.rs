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
    /// Serialises lease changes with failover writes, so that checking a lease and writing
    /// the failover are one step (liveness here is in-process).
    liveness_gate: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
struct Open {
    db: Arc<Database>,
    writer: mpsc::Sender<Request>,
    thread: Arc<std::sync::Mutex<Option<thread::JoinHandle<()>>>>,
}

/// A write, encoded by the caller so the single writer thread only compares and copies.
enum Op {
    Create {
        id: SessionId,
        value: Vec<u8>,
    },
    Cas {
        id: SessionId,
        expected: StateVersion,
        value: Vec<u8>,
    },
    RemoveTerminated(Timestamp),
}

/// A stored value: a small header that lets the writer check a CAS and maintain the owner
/// index without decoding the record, then the record itself (`codec`).
///
/// ```text
/// state_version: u64 BE | owner length: u16 BE | owner (UTF-8) | record (JSON)
/// ```
fn encode_value(record: &SessionRecord) -> Vec<u8> {
    let owner = record.owner.as_str().as_bytes();
    let body = codec::encode(record);
    let owner_len = u16::try_from(owner.len()).unwrap_or(u16::MAX);
    let owner = owner.get(..usize::from(owner_len)).unwrap_or(owner);
    let mut value = Vec::with_capacity(10 + owner.len() + body.len());
    value.extend_from_slice(&record.state_version.get().to_be_bytes());
    value.extend_from_slice(&owner_len.to_be_bytes());
    value.extend_from_slice(owner);
    value.extend_from_slice(&body);
    value
}

/// The header of a stored value: (version, owner, record bytes).
fn split_value(bytes: &[u8]) -> Option<(u64, &str, &[u8])> {
    let version = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let owner_len = usize::from(u16::from_be_bytes(bytes.get(8..10)?.try_into().ok()?));
    let owner = std::str::from_utf8(bytes.get(10..10 + owner_len)?).ok()?;
    Some((version, owner, bytes.get(10 + owner_len..)?))
}

fn decode_value(session: SessionId, bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    let key = session.to_string();
    let (_, _, body) = split_value(bytes).ok_or_else(|| StoreError::Corrupt {
        key: key.clone(),
        detail: "bad header".into(),
    })?;
    codec::decode(&key, body)
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
            liveness_gate: Arc::default(),
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
        let op = Op::Create {
            id: record.session_id,
            value: encode_value(record),
        };
        self.submit(op).await.map(drop)
    }

    async fn get(&self, session: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        self.read(|txn| {
            let table = txn.open_table(SESSIONS).map_err(StoreError::unavailable)?;
            let value = table
                .get(session.as_u128())
                .map_err(StoreError::unavailable)?;
            value.map(|v| decode_value(session, v.value())).transpose()
        })
    }

    async fn compare_and_swap(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        check_cas_request(expected, record)?;
        let op = Op::Cas {
            id: record.session_id,
            expected,
            value: encode_value(record),
        };
        self.submit(op).await.map(drop)
    }

    async fn compare_and_swap_if_dead(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        previous_owner: &NodeId,
    ) -> Result<(), StoreError> {
        check_cas_request(expected, record)?;
        let _gate = self.liveness_gate.lock().await;
        if self.leases.is_alive(previous_owner).await? {
            return Err(StoreError::OwnerAlive {
                node: previous_owner.clone(),
            });
        }
        let op = Op::Cas {
            id: record.session_id,
            expected,
            value: encode_value(record),
        };
        self.submit(op).await.map(drop)
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
                out.push(decode_value(SessionId::from_u128(id), value.value())?);
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
        let _gate = self.liveness_gate.lock().await;
        self.leases.register(node, ttl_ms).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.current()?;
        let _gate = self.liveness_gate.lock().await;
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
                Op::Create { id, value } => {
                    let existing = sessions.get(id.as_u128())?.map(|v| v.value().to_vec());
                    match existing {
                        Some(bytes) => Err(already_exists(*id, &bytes)),
                        None => match split_value(value) {
                            Some((_, owner, _)) => {
                                sessions.insert(id.as_u128(), value.as_slice())?;
                                index.insert((owner, id.as_u128()), ())?;
                                Ok(1)
                            }
                            None => Err(bad_request()),
                        },
                    }
                }
                Op::Cas {
                    id,
                    expected,
                    value,
                } => {
                    let existing = sessions.get(id.as_u128())?.map(|v| v.value().to_vec());
                    let header = existing.as_deref().map(split_value);
                    match (header, split_value(value)) {
                        (None, _) => Err(StoreError::NotFound { session: *id }),
                        (_, None) => Err(bad_request()),
                        (Some(None), _) => Err(StoreError::Corrupt {
                            key: id.to_string(),
                            detail: "bad header".into(),
                        }),
                        (Some(Some((stored, _, _))), _) if stored != expected.get() => {
                            let bytes = existing.as_deref().unwrap_or_default();
                            Err(decode_value(*id, bytes)
                                .map(|current| StoreError::Conflict {
                                    current: Box::new(current),
                                })
                                .unwrap_or_else(|corrupt| corrupt))
                        }
                        (Some(Some((_, old_owner, _))), Some((_, new_owner, _))) => {
                            if old_owner != new_owner {
                                index.remove((old_owner, id.as_u128()))?;
                                index.insert((new_owner, id.as_u128()), ())?;
                            }
                            sessions.insert(id.as_u128(), value.as_slice())?;
                            Ok(1)
                        }
                    }
                }
                Op::RemoveTerminated(before) => {
                    let mut doomed = Vec::new();
                    for entry in sessions.iter()? {
                        let (key, value) = entry?;
                        let id = key.value();
                        if let Ok(r) = decode_value(SessionId::from_u128(id), value.value()) {
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

fn bad_request() -> StoreError {
    StoreError::InvalidRequest {
        detail: "value without a header".into(),
    }
}

fn already_exists(session: SessionId, bytes: &[u8]) -> StoreError {
    match decode_value(session, bytes) {
        Ok(current) => StoreError::AlreadyExists {
            current: Box::new(current),
        },
        Err(corrupt) => corrupt,
    }
}

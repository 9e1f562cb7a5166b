//! The shared store: etcd, for clusters in `shared` mode (SPEC §7.2).
//!
//! # Layout
//!
//! ```text
//! {prefix}sessions/{session_id}   encoded SessionRecord (codec::encode, JSON)
//! {prefix}nodes/{node_id}         the node's name, bound to its liveness lease
//! {prefix}fences/{session_id}     left by a create whose answer was lost (see below); tiny,
//!                                 rare, and must stay
//! ```
//!
//! Session IDs are printed as fixed-width hex, so key order is ID order and
//! [`SessionStore::list_by_owner`] is a range scan.
//!
//! # Writes
//!
//! Every write of a session key is one etcd transaction guarded by a compare: `create` compares
//! `create_revision == 0` (the key is absent), `compare_and_swap` reads the record, checks its
//! `state_version`, then compares the key's `mod_revision` with the one it read — so the write
//! applies only if nothing at all was written to the key since the version was checked. There
//! is no unguarded put of a session key anywhere in this module.
//!
//! # When the answer is lost
//!
//! A write whose request may have reached etcd but whose answer did not arrive (timeout,
//! connection reset, leader change) has an unknown outcome, and the proposal may even be
//! sitting in a frozen member's socket or log, to be committed later. It is never retried
//! blindly. Its outcome is *decided*, within [`EtcdTimeouts::resolve`]:
//!
//! ```text
//! CAS:    re-read ──► mod_revision unchanged ──► fence: txn(mod_revision == read) put the same
//!           │                                    bytes back. Once that commits, the lost
//!           │                                    write's compare can never hold again
//!           │                                    ──► did not apply
//!           └───────► mod_revision changed ───► the first change after the read revision (a
//!                                               watch from that revision) is ours?
//!                                               yes ──► applied   no ──► did not apply
//! create: re-read ──► present ──► created with our bytes? ──► applied / AlreadyExists
//!           └───────► absent ───► fence: txn(key absent, fence key unchanged) bump the fence
//!                                 key. Every create also compares the fence key, so the lost
//!                                 one can never apply ──► did not apply
//! ```
//!
//! Only our CAS can be the first change after the read *and* carry our bytes, because it
//! compares `mod_revision == read`. A write found not to have applied is certain never to
//! apply, so it is tried again (that is not a blind retry: the earlier attempt is dead) while
//! the resolution bound lasts, and reported as [`StoreError::Unavailable`] after it. If the
//! store cannot be reached long enough to decide, the answer is [`StoreError::CommitUnknown`].
//!
//! # Bounded, fail-closed calls
//!
//! Requests carry etcd's `require_leader` flag, so a member cut off from the quorum refuses at
//! once with "no leader" instead of holding the request. Every RPC has a client-side deadline
//! ([`EtcdTimeouts::request`]); within it, a request that could not connect is tried on
//! another member, and so is a read whose connection broke. The resolution of lost answers
//! starts no RPC after [`EtcdTimeouts::resolve`]. So every call ends in bounded time: a read
//! or a refused write within about two request deadlines, a write whose answer was lost within
//! about `resolve` plus three request deadlines.
//!
//! # Liveness
//!
//! A node's key is bound to an etcd lease of the requested TTL rounded up to whole seconds
//! (etcd's unit), and etcd may lengthen it further (its minimum TTL, and a renewal on leader
//! change). Every one of these errs on the safe side of SPEC §7.3: the store lets another node
//! in later, never earlier, than the node's own local deadline computed from the requested TTL.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use jumpvpn_core::{NodeId, SessionId, SessionRecord, StateVersion, Timestamp};
use tokio::time::Instant;

use crate::{
    check_cas_request, check_create_request, codec, LeaseId, Liveness, SessionStore, StoreError,
};

/// How long the etcd backend waits for things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdTimeouts {
    /// Establishing a TCP connection to one member.
    pub connect: Duration,
    /// One RPC, from sending the request to the complete answer.
    pub request: Duration,
    /// Deciding the outcome of writes whose answer was lost (and trying again those found not
    /// applied), before giving up.
    pub resolve: Duration,
}

impl Default for EtcdTimeouts {
    /// 1 s to connect, 2 s per request, 5 s to resolve a lost answer: long enough to ride out
    /// an etcd leader election with default timings (1 s election timeout), short enough that a
    /// client's reattach gets a definite answer well within its own retry budget.
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(2),
            resolve: Duration::from_secs(5),
        }
    }
}

/// A session store and liveness registry in an etcd cluster. Clones share one connection pool.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeouts: EtcdTimeouts,
    lost: Arc<LostCounters>,
    revisions: Arc<RevisionCache>,
}

/// The `mod_revision` and record version of this store's own last write to each session.
///
/// A node mostly writes the sessions it owns, one after another. If a key's `mod_revision` is
/// still that of our last write, nothing has written the key since, so it holds our record at
/// the cached version: a CAS can then go straight to its fenced transaction, one round trip
/// instead of a read and a transaction. A stale entry costs nothing in safety — the
/// transaction's compare fails and its else-branch returns the current record, which is then
/// judged as after a read.
#[derive(Default)]
struct RevisionCache {
    entries: std::sync::Mutex<std::collections::HashMap<SessionId, (i64, StateVersion)>>,
}

impl RevisionCache {
    /// Bounds the cache's memory; when full it starts over (entries are only a shortcut).
    const MAX_ENTRIES: usize = 100_000;

    fn get(&self, session: SessionId) -> Option<(i64, StateVersion)> {
        self.lock().get(&session).copied()
    }

    fn remember(&self, session: SessionId, revision: Option<i64>, version: StateVersion) {
        let mut entries = self.lock();
        match revision {
            Some(revision) => {
                if entries.len() >= Self::MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(session, (revision, version));
            }
            None => {
                entries.remove(&session);
            }
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<SessionId, (i64, StateVersion)>> {
        // Each operation is a single map call: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What became of the writes whose answer was lost, since the store was connected (shared by
/// clones). For metrics, and for tests that want to know a fault reached this path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostAnswers {
    /// Writes that may have reached etcd but whose answer did not arrive.
    pub total: u64,
    /// Found applied by reading back.
    pub applied: u64,
    /// Found not applied, and certain never to apply.
    pub not_applied: u64,
    /// Of `not_applied`, how many were made certain by a fence.
    pub fenced: u64,
    /// Left undecided: reported as [`StoreError::CommitUnknown`].
    pub unknown: u64,
}

impl EtcdStore {
    /// The key prefix used when none is configured.
    pub const DEFAULT_PREFIX: &'static str = "/jumpvpn/";

    /// Connects to the cluster at `endpoints` (`host:port` or `http://host:port`), keeping
    /// every key under `prefix` (a `/` is appended if it does not end with one).
    ///
    /// Requests are balanced over all endpoints. One linearizable read is made before
    /// returning, so a cluster that cannot serve (unreachable, no quorum) is reported here as
    /// [`StoreError::Unavailable`] naming the endpoints, rather than on the first request.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeouts: EtcdTimeouts,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidRequest {
                detail: "etcd store needs at least one endpoint".to_owned(),
            });
        }
        if prefix.is_empty() {
            return Err(StoreError::InvalidRequest {
                detail: "etcd key prefix is empty".to_owned(),
            });
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let options = ConnectOptions::new()
            // A member without a leader refuses at once instead of holding the request until
            // the deadline: fail closed, and fast.
            .with_require_leader(true)
            .with_connect_timeout(timeouts.connect)
            // HTTP/2 pings close a connection to a member that stopped answering (crashed
            // host, frozen process) while requests are open on it. etcd closes connections
            // that ping more often than every 5 s or without open streams
            // (--grpc-keepalive-min-time, GOAWAY "too_many_pings"), hence 10 s and not idle.
            // Each request's own deadline is the guard that counts; this is housekeeping.
            .with_keep_alive(Duration::from_secs(10), timeouts.request)
            .with_keep_alive_while_idle(false);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::unavailable(format!(
                    "connecting to etcd at {}: {}",
                    endpoints.join(","),
                    describe(&e)
                ))
            })?;
        let store = Self {
            client,
            prefix,
            timeouts,
            lost: Arc::default(),
            revisions: Arc::default(),
        };
        let probe = GetOptions::new().with_prefix().with_count_only();
        let what = format!("probing etcd at {}", endpoints.join(","));
        store
            .call(what, Retry::IfLostInTransit, || {
                let (mut kv, key, probe) = (
                    store.client.kv_client(),
                    store.prefix.clone(),
                    probe.clone(),
                );
                async move { kv.get(key, Some(probe)).await }
            })
            .await
            .map_err(|e| StoreError::unavailable(e.detail))?;
        Ok(store)
    }

    /// What became of the writes whose answer was lost.
    pub fn lost_answers(&self) -> LostAnswers {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LostAnswers {
            total: get(&self.lost.total),
            applied: get(&self.lost.applied),
            not_applied: get(&self.lost.not_applied),
            fenced: get(&self.lost.fenced),
            unknown: get(&self.lost.unknown),
        }
    }

    /// The key prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd key holding `session`'s record (for operators: `etcdctl get <key>`).
    pub fn session_key(&self, session: SessionId) -> String {
        format!("{}sessions/{session}", self.prefix)
    }

    /// The etcd key that exists while `node` is alive.
    pub fn node_key(&self, node: &NodeId) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    /// The key every create of `session` compares, so that a create whose answer was lost can
    /// be fenced off.
    fn fence_key(&self, session: SessionId) -> String {
        format!("{}fences/{session}", self.prefix)
    }

    fn sessions_prefix(&self) -> String {
        format!("{}sessions/", self.prefix)
    }

    /// Runs one RPC under the request deadline, classifying a failure. `rpc` makes the request;
    /// it is made again (on whichever member the balancer picks next) only as `retry` allows.
    /// A dead member then costs a retry, not an error.
    async fn call<T, F, Fut>(
        &self,
        what: impl Into<String>,
        retry: Retry,
        mut rpc: F,
    ) -> Result<T, RpcError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeouts.request;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match tokio::time::timeout_at(deadline, rpc()).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) if retry.allows(&e) && pace(attempt, deadline).await => {}
                Ok(Err(e)) => return Err(RpcError::from_etcd(what.into(), &e)),
                // The request may be anywhere: in a socket buffer, in a frozen leader's log.
                Err(_) => {
                    return Err(RpcError::new(
                        Sent::Maybe,
                        format!(
                            "{}: no answer within {} ms",
                            what.into(),
                            self.timeouts.request.as_millis()
                        ),
                    ))
                }
            }
        }
    }

    /// A linearizable read of one key, at `revision` (0 = now).
    async fn read_at(&self, key: &str, revision: i64) -> Result<Option<KeyValue>, RpcError> {
        let what = match revision {
            0 => format!("get {key}"),
            r => format!("get {key} at revision {r}"),
        };
        let options = GetOptions::new().with_revision(revision);
        let mut answer = self
            .call(what, Retry::IfLostInTransit, || {
                let (mut kv, key, options) =
                    (self.client.kv_client(), key.to_owned(), options.clone());
                async move { kv.get(key, Some(options)).await }
            })
            .await?;
        Ok(answer.take_kvs().into_iter().next())
    }

    /// A linearizable read of one key.
    async fn read(&self, key: &str) -> Result<Option<KeyValue>, RpcError> {
        self.read_at(key, 0).await
    }

    /// One transaction, sent again only if it never left this process.
    async fn txn(&self, what: impl Into<String>, txn: Txn) -> Result<TxnResponse, RpcError> {
        self.call(what, Retry::IfUnsent, || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Decides the outcome of a CAS whose transaction (`mod_revision(key) == read_rev`, put
    /// `ours`) was possibly sent but not answered. See the module docs.
    #[allow(clippy::too_many_arguments)] // all of them describe the one lost write
    async fn resolve_cas(
        &self,
        key: &str,
        read_rev: i64,
        expected: StateVersion,
        ours: &[u8],
        session: SessionId,
        lost: &str,
        deadline: Instant,
    ) -> Decided {
        let mut resolution = Resolution::new(session, lost, deadline);
        loop {
            let current = match resolution.read(self, key).await {
                Ok(current) => current,
                Err(unknown) => return unknown,
            };
            if let Some(kv) = current.as_ref().filter(|kv| kv.mod_revision() == read_rev) {
                // Nothing has changed since our read, so our write has not applied — yet. Put
                // the same bytes back under the same compare: after that commits the key's
                // mod_revision has moved on and our lost transaction can never apply.
                let fence = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, read_rev)])
                    .and_then([TxnOp::put(key, kv.value(), None)]);
                match self.txn(format!("fence {key}"), fence).await {
                    Ok(answer) if answer.succeeded() => {
                        self.lost.fenced.fetch_add(1, Ordering::Relaxed);
                        return Decided::NotApplied {
                            why: "it did not apply and is now fenced off".to_owned(),
                            fence_rev: 0,
                        };
                    }
                    // The key changed under us (maybe by our own write): read the history.
                    Ok(_) => continue,
                    Err(e) => {
                        // Even if this fence applied, the next round sees a changed key and
                        // reads the history, where the fence shows up as someone else's write.
                        resolution.failed(e.detail);
                        continue;
                    }
                }
            }
            match self.first_change_after(key, read_rev).await {
                Ok(Change::Put(value)) if value == ours => return Decided::Applied,
                // Someone else changed the key first, so our compare failed or will fail.
                Ok(Change::Put(_) | Change::Delete) => {
                    let Some(kv) = current else {
                        return Decided::Answer(StoreError::NotFound { session });
                    };
                    return match decode_session(key, &kv, session) {
                        Err(corrupt) => Decided::Answer(corrupt),
                        // Only rewritten at the same version (another writer's fence).
                        Ok(stored) if stored.state_version == expected => Decided::NotApplied {
                            why: "another writer rewrote the record first".to_owned(),
                            fence_rev: 0,
                        },
                        Ok(stored) => Decided::Answer(StoreError::Conflict {
                            current: Box::new(stored),
                        }),
                    };
                }
                Ok(Change::Compacted) => {
                    return Decided::Answer(StoreError::CommitUnknown {
                        session,
                        detail: format!(
                            "{lost}; the history of {key} after revision {read_rev} was compacted"
                        ),
                    })
                }
                Err(e) => resolution.failed(e.detail),
            }
        }
    }

    /// Decides the outcome of a create of `ours` at `key`, guarded by `fence` being at
    /// `fence_rev`, whose answer was lost. See the module docs.
    #[allow(clippy::too_many_arguments)] // all of them describe the one lost write
    async fn resolve_create(
        &self,
        key: &str,
        fence: &str,
        fence_rev: i64,
        ours: &[u8],
        session: SessionId,
        lost: &str,
        deadline: Instant,
    ) -> Decided {
        let mut resolution = Resolution::new(session, lost, deadline);
        loop {
            let kv = match resolution.read(self, key).await {
                Ok(kv) => kv,
                Err(unknown) => return unknown,
            };
            let Some(kv) = kv else {
                // Not stored (yet). Move the fence key on, under the same compares as the
                // create: once that commits, the lost create's compare can never hold.
                let txn = Txn::new()
                    .when(create_guard(key, fence, fence_rev))
                    .and_then([TxnOp::put(
                        fence,
                        "fence of a create whose answer was lost",
                        None,
                    )])
                    .or_else([TxnOp::get(key, None), TxnOp::get(fence, None)]);
                match self.txn(format!("fence {key}"), txn).await {
                    Ok(answer) if answer.succeeded() => {
                        self.lost.fenced.fetch_add(1, Ordering::Relaxed);
                        return Decided::NotApplied {
                            why: "it did not apply and is now fenced off".to_owned(),
                            // The fence key was written at the transaction's revision.
                            fence_rev: answer.header().map_or(0, |h| h.revision()),
                        };
                    }
                    Ok(answer) => match txn_gets(&answer).as_slice() {
                        // The fence moved on (our own earlier fence, whose answer was lost):
                        // the lost create compared the old revision and can never apply.
                        [None, Some(moved)] if moved.mod_revision() != fence_rev => {
                            return Decided::NotApplied {
                                why: "it did not apply and is fenced off".to_owned(),
                                fence_rev: moved.mod_revision(),
                            };
                        }
                        // The session appeared: the next round decides whose it is.
                        _ => continue,
                    },
                    Err(e) => {
                        resolution.failed(e.detail);
                        continue;
                    }
                }
            };
            if kv.value() == ours {
                return Decided::Applied;
            }
            // The key holds other content: was it created by us and changed since? Read the
            // value it was created with.
            match self.read_at(key, kv.create_revision()).await {
                Ok(Some(created)) if created.value() == ours => return Decided::Applied,
                Ok(Some(_)) => {
                    return Decided::Answer(match decode_session(key, &kv, session) {
                        Ok(current) => StoreError::AlreadyExists {
                            current: Box::new(current),
                        },
                        Err(corrupt) => corrupt,
                    })
                }
                Ok(None) => {
                    return Decided::Answer(StoreError::CommitUnknown {
                        session,
                        detail: format!("{lost}; the creation of {key} is not in the history"),
                    })
                }
                Err(e) => resolution.failed(e.detail),
            }
        }
    }

    /// The first change to `key` after revision `rev`, from etcd's history.
    async fn first_change_after(&self, key: &str, rev: i64) -> Result<Change, RpcError> {
        let what = format!("history of {key} after revision {rev}");
        let find = || async move {
            let options = WatchOptions::new().with_start_revision(rev + 1);
            let mut stream = self.client.watch_client().watch(key, Some(options)).await?;
            loop {
                let Some(answer) = stream.message().await? else {
                    return Err(etcd_client::Error::WatchError(
                        "watch stream closed".to_owned(),
                    ));
                };
                if answer.compact_revision() > 0 {
                    return Ok(Change::Compacted);
                }
                if answer.canceled() {
                    return Err(etcd_client::Error::WatchError(format!(
                        "watch canceled: {}",
                        answer.cancel_reason()
                    )));
                }
                // Events come in revision order; the first one is the first change.
                if let Some(event) = answer.events().first() {
                    return Ok(match event.event_type() {
                        EventType::Put => Change::Put(
                            event.kv().map(|kv| kv.value().to_vec()).unwrap_or_default(),
                        ),
                        EventType::Delete => Change::Delete,
                    });
                }
            }
        };
        self.call(what, Retry::IfLostInTransit, find).await
    }

    /// One page of session records from `start` (inclusive) to the end of the sessions range,
    /// at `revision` (0 = now), for `op`. Returns the records, the revision read, and whether
    /// more remain.
    async fn session_page(
        &self,
        op: &str,
        start: &[u8],
        revision: i64,
        page: usize,
    ) -> Result<(Vec<KeyValue>, i64, bool), StoreError> {
        let end = prefix_end(self.sessions_prefix().as_bytes());
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(page).unwrap_or(i64::MAX))
            .with_revision(revision);
        let what = format!("{op}: scan {}", self.sessions_prefix());
        let mut answer = self
            .call(what, Retry::IfLostInTransit, || {
                let (mut kv, start, options) =
                    (self.client.kv_client(), start.to_vec(), options.clone());
                async move { kv.get(start, Some(options)).await }
            })
            .await
            .map_err(|e| StoreError::unavailable(e.detail))?;
        let at = answer.header().map_or(revision, |h| h.revision());
        let more = answer.more();
        Ok((answer.take_kvs(), at, more))
    }

    /// Decodes a scanned session key, checking the record belongs under it.
    fn decode_scanned(&self, kv: &KeyValue) -> Result<SessionRecord, StoreError> {
        let key = String::from_utf8_lossy(kv.key());
        let record = codec::decode(&key, kv.value())?;
        if self.session_key(record.session_id) != key {
            return Err(StoreError::Corrupt {
                key: key.into_owned(),
                detail: format!("holds the record of session {}", record.session_id),
            });
        }
        Ok(record)
    }
}

/// Records fetched per round trip when scanning.
const SCAN_PAGE: usize = 256;

/// Most transactions one create or CAS sends. Each one after the first needs a definite
/// reason (an earlier attempt certain never to apply, or a concurrent same-version rewrite).
const MAX_WRITE_ROUNDS: usize = 4;

impl EtcdStore {
    /// The CAS; with `unless_alive`, the same transaction also requires that node's
    /// lease-bound key to be absent (its lease expired), so the failover and the liveness check
    /// are one atomic step.
    async fn cas(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        unless_alive: Option<&NodeId>,
    ) -> Result<(), StoreError> {
        check_cas_request(expected, record)?;
        let session = record.session_id;
        let key = self.session_key(session);
        let value = codec::encode(record);
        let read = |key: &str| {
            let key = key.to_owned();
            async move {
                self.read(&key).await.map_err(|e| {
                    StoreError::unavailable(format!("compare-and-swap {key}: {}", e.detail))
                })
            }
        };
        // Our own last write, if still current, stands in for the read.
        let mut stored = match self.revisions.get(session) {
            Some((revision, version)) if version == expected => Known::Revision(revision),
            _ => Known::Read(read(&key).await?),
        };
        let mut resolve_until = None;
        for _ in 0..MAX_WRITE_ROUNDS {
            let read_rev = match stored {
                Known::Revision(revision) => revision,
                Known::Read(None) => return Err(StoreError::NotFound { session }),
                Known::Read(Some(kv)) => {
                    let current = decode_session(&key, &kv, session)?;
                    if current.state_version != expected {
                        return Err(StoreError::Conflict {
                            current: Box::new(current),
                        });
                    }
                    kv.mod_revision()
                }
            };
            let mut guards = vec![Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                read_rev,
            )];
            let mut reads = vec![TxnOp::get(key.as_str(), None)];
            if let Some(node) = unless_alive {
                let node_key = self.node_key(node);
                guards.push(Compare::create_revision(
                    node_key.as_str(),
                    CompareOp::Equal,
                    0,
                ));
                reads.push(TxnOp::get(node_key.as_str(), None));
            }
            let txn = Txn::new()
                .when(guards)
                .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)])
                .or_else(reads);
            let lost = match self.txn(format!("compare-and-swap {key}"), txn).await {
                Ok(answer) if answer.succeeded() => {
                    let revision = answer.header().map(|h| h.revision());
                    self.revisions
                        .remember(session, revision, record.state_version);
                    return Ok(());
                }
                // Changed since our read. If only rewritten at the same version (a fence), we
                // compare again against the fresh revision.
                Ok(answer) => {
                    let mut gets = txn_gets(&answer).into_iter();
                    let current = gets.next().flatten();
                    if let (Some(node), Some(Some(_alive))) = (unless_alive, gets.next()) {
                        return Err(StoreError::OwnerAlive { node: node.clone() });
                    }
                    stored = Known::Read(current);
                    continue;
                }
                Err(e) if e.sent == Sent::No => return Err(StoreError::unavailable(e.detail)),
                Err(e) => e.detail,
            };
            let deadline =
                *resolve_until.get_or_insert_with(|| Instant::now() + self.timeouts.resolve);
            self.lost.total.fetch_add(1, Ordering::Relaxed);
            let decided = self
                .resolve_cas(&key, read_rev, expected, &value, session, &lost, deadline)
                .await;
            // After a lost answer our revision is unknown: the next CAS reads first.
            self.revisions.remember(session, None, record.state_version);
            match self.lost.count(decided) {
                Decided::Applied => return Ok(()),
                Decided::Answer(e) => return Err(e),
                Decided::NotApplied { why, .. } if Instant::now() >= deadline => {
                    return Err(StoreError::unavailable(format!("{lost}; {why}")))
                }
                // Certain that attempt never applies: try again from a fresh read.
                Decided::NotApplied { .. } => stored = Known::Read(read(&key).await?),
            }
        }
        Err(StoreError::unavailable(format!(
            "compare-and-swap {key}: no definite outcome after {MAX_WRITE_ROUNDS} attempts"
        )))
    }
}

/// The paced re-reads of one lost write's resolution: each [`Resolution::read`] waits its turn
/// (backing off) and reads the key again, until the resolve deadline, after which the outcome
/// is [`StoreError::CommitUnknown`] naming the last failure.
struct Resolution<'a> {
    session: SessionId,
    lost: &'a str,
    deadline: Instant,
    attempt: u32,
    last: String,
}

impl<'a> Resolution<'a> {
    fn new(session: SessionId, lost: &'a str, deadline: Instant) -> Self {
        Self {
            session,
            lost,
            deadline,
            attempt: 0,
            last: String::new(),
        }
    }

    /// The key as it is now, or the final answer when time is up.
    async fn read(&mut self, store: &EtcdStore, key: &str) -> Result<Option<KeyValue>, Decided> {
        loop {
            if self.attempt > 0 && !pace(self.attempt, self.deadline).await {
                return Err(Decided::Answer(StoreError::CommitUnknown {
                    session: self.session,
                    detail: format!("{}; could not learn the outcome: {}", self.lost, self.last),
                }));
            }
            self.attempt += 1;
            match store.read(key).await {
                Ok(kv) => return Ok(kv),
                Err(e) => self.last = e.detail,
            }
        }
    }

    /// Notes why a step of this round failed; the next read tries again.
    fn failed(&mut self, detail: String) {
        self.last = detail;
    }
}

/// What a CAS knows of the stored key before its transaction.
enum Known {
    /// The revision of our own last write, at the expected version.
    Revision(i64),
    /// The key as read (absent: `None`).
    Read(Option<KeyValue>),
}

impl SessionStore for EtcdStore {
    async fn create(&self, record: &SessionRecord) -> Result<(), StoreError> {
        check_create_request(record)?;
        let session = record.session_id;
        let key = self.session_key(session);
        let fence = self.fence_key(session);
        let value = codec::encode(record);
        // Where the fence key stands: absent (0) unless an earlier create of this session lost
        // its answer.
        let mut fence_rev = 0;
        let mut resolve_until = None;
        for _ in 0..MAX_WRITE_ROUNDS {
            let txn = Txn::new()
                .when(create_guard(&key, &fence, fence_rev))
                .and_then([TxnOp::put(key.as_str(), value.as_slice(), None)])
                .or_else([
                    TxnOp::get(key.as_str(), None),
                    TxnOp::get(fence.as_str(), None),
                ]);
            let lost = match self.txn(format!("create {key}"), txn).await {
                Ok(answer) if answer.succeeded() => {
                    let revision = answer.header().map(|h| h.revision());
                    self.revisions
                        .remember(session, revision, record.state_version);
                    return Ok(());
                }
                Ok(answer) => match txn_gets(&answer).as_slice() {
                    [Some(current), _] => {
                        return Err(StoreError::AlreadyExists {
                            current: Box::new(decode_session(&key, current, session)?),
                        })
                    }
                    // Refused only because of a fence left by an earlier lost create of this
                    // session, which is certain never to apply: create against the fence.
                    [None, fenced] => {
                        fence_rev = fenced.as_ref().map_or(0, KeyValue::mod_revision);
                        continue;
                    }
                    _ => {
                        return Err(StoreError::unavailable(format!(
                            "create {key}: etcd refused the create without saying why"
                        )))
                    }
                },
                Err(e) if e.sent == Sent::No => return Err(StoreError::unavailable(e.detail)),
                Err(e) => e.detail,
            };
            let deadline =
                *resolve_until.get_or_insert_with(|| Instant::now() + self.timeouts.resolve);
            self.lost.total.fetch_add(1, Ordering::Relaxed);
            let decided = self
                .resolve_create(&key, &fence, fence_rev, &value, session, &lost, deadline)
                .await;
            match self.lost.count(decided) {
                Decided::Applied => return Ok(()),
                Decided::Answer(e) => return Err(e),
                Decided::NotApplied { why, .. } if Instant::now() >= deadline => {
                    return Err(StoreError::unavailable(format!("{lost}; {why}")))
                }
                Decided::NotApplied {
                    fence_rev: moved, ..
                } => fence_rev = moved,
            }
        }
        Err(StoreError::unavailable(format!(
            "create {key}: no definite outcome after {MAX_WRITE_ROUNDS} attempts"
        )))
    }

    async fn get(&self, session: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let key = self.session_key(session);
        match self.read(&key).await {
            Ok(Some(kv)) => decode_session(&key, &kv, session).map(Some),
            Ok(None) => Ok(None),
            // A read changes nothing, whatever happened to it.
            Err(e) => Err(StoreError::unavailable(e.detail)),
        }
    }

    async fn compare_and_swap(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
    ) -> Result<(), StoreError> {
        self.cas(expected, record, None).await
    }

    async fn compare_and_swap_if_dead(
        &self,
        expected: StateVersion,
        record: &SessionRecord,
        previous_owner: &NodeId,
    ) -> Result<(), StoreError> {
        self.cas(expected, record, Some(previous_owner)).await
    }

    async fn list_by_owner(
        &self,
        owner: &NodeId,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let mut found = Vec::new();
        if limit == 0 {
            return Ok(found);
        }
        let mut start = match after {
            // The smallest key after `after`'s key.
            Some(id) => {
                let mut key = self.session_key(id).into_bytes();
                key.push(0);
                key
            }
            None => self.sessions_prefix().into_bytes(),
        };
        let op = format!("list sessions of {owner}");
        // Later pages read at the first page's revision: the listing is one snapshot.
        let mut revision = 0;
        loop {
            let (page, at, more) = self.session_page(&op, &start, revision, SCAN_PAGE).await?;
            revision = at;
            for kv in &page {
                let record = self.decode_scanned(kv)?;
                if record.owner == *owner {
                    found.push(record);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            match page.last() {
                Some(last) if more => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(found),
            }
        }
    }

    async fn remove_terminated(&self, before: Timestamp) -> Result<u64, StoreError> {
        let mut removed = 0u64;
        let mut start = self.sessions_prefix().into_bytes();
        loop {
            let (page, _, more) = self
                .session_page("remove terminated sessions", &start, 0, SCAN_PAGE)
                .await?;
            for kv in &page {
                let record = self.decode_scanned(kv)?;
                if record.termination.is_none_or(|t| t.at >= before) {
                    continue;
                }
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                // Delete only the record we judged: if it changed since, leave it be.
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        kv.key(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([TxnOp::delete(kv.key(), None)]);
                match self.txn(format!("delete {key}"), txn).await {
                    Ok(answer) => removed += u64::from(answer.succeeded()),
                    Err(e) if e.sent == Sent::No => {
                        return Err(StoreError::unavailable(format!(
                            "{} (after removing {removed})",
                            e.detail
                        )))
                    }
                    // Deleting a terminated record twice is harmless, but the count is off.
                    Err(e) => {
                        return Err(StoreError::CommitUnknown {
                            session: record.session_id,
                            detail: format!("{} (after removing {removed})", e.detail),
                        })
                    }
                }
            }
            match page.last() {
                Some(last) if more => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(removed),
            }
        }
    }
}

impl Liveness for EtcdStore {
    async fn register(&self, node: &NodeId, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        let ttl_s = i64::try_from(lease_seconds(ttl_ms)).unwrap_or(i64::MAX);
        // A grant whose answer was lost leaves a lease that holds no key and expires by
        // itself, so granting again is harmless.
        let granted = self
            .call(
                format!("grant a lease for {node}"),
                Retry::IfLostInTransit,
                || {
                    let mut lease = self.client.lease_client();
                    async move { lease.grant(ttl_s, None).await }
                },
            )
            .await
            .map_err(|e| StoreError::unavailable(e.detail))?;
        let id = granted.id();
        let key = self.node_key(node);
        // The node key carries no state, only presence; a plain put binding it to the new
        // lease is what registering means (a restarted node replaces its old registration),
        // and putting it twice is the same as once.
        let put = self
            .call(format!("put {key}"), Retry::IfLostInTransit, || {
                let (mut kv, key, name) = (
                    self.client.kv_client(),
                    key.clone(),
                    node.as_str().to_owned(),
                );
                async move {
                    kv.put(key, name, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            })
            .await;
        if let Err(e) = put {
            // Best effort: an orphaned lease holds no key and expires by itself.
            let _ = self.revoke(LeaseId(id)).await;
            return Err(StoreError::unavailable(e.detail));
        }
        Ok(LeaseId(id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = lease.0;
        // One round trip: the client sends one keep-alive on a fresh stream and waits for its
        // answer. etcd answers an expired or unknown lease with TTL 0, which this client turns
        // into `LeaseKeepAliveError`. Renewing twice is the same as once.
        let renewed = self
            .call(
                format!("keep lease {id:x} alive"),
                Retry::IfLostInTransit,
                || {
                    let mut client = self.client.lease_client();
                    async move { client.keep_alive(id).await.map(drop) }
                },
            )
            .await;
        match renewed {
            Ok(()) => Ok(()),
            Err(e) if e.lease_refused => {
                // Confirm with the server rather than trusting how the refusal was reported.
                let left = self
                    .call(
                        format!("time to live of lease {id:x}"),
                        Retry::IfLostInTransit,
                        || {
                            let mut client = self.client.lease_client();
                            async move { client.time_to_live(id, None).await }
                        },
                    )
                    .await
                    .map_err(|e| StoreError::unavailable(e.detail))?
                    .ttl();
                if left <= 0 {
                    Err(StoreError::LeaseExpired)
                } else {
                    Err(StoreError::unavailable(format!(
                        "{} (yet the lease has {left} s left)",
                        e.detail
                    )))
                }
            }
            Err(e) => Err(StoreError::unavailable(e.detail)),
        }
    }

    async fn is_alive(&self, node: &NodeId) -> Result<bool, StoreError> {
        // etcd deletes the node key when its lease expires or is revoked.
        let key = self.node_key(node);
        let what = format!("is {node} alive: get {key}");
        let answer = self
            .call(what, Retry::IfLostInTransit, || {
                let (mut kv, key) = (self.client.kv_client(), key.clone());
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map_err(|e| StoreError::unavailable(e.detail))?;
        Ok(answer.count() > 0)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let id = lease.0;
        // Revoking twice is the same as once.
        let revoked = self
            .call(
                format!("revoke lease {id:x}"),
                Retry::IfLostInTransit,
                || {
                    let mut client = self.client.lease_client();
                    async move { client.revoke(id).await }
                },
            )
            .await;
        match revoked {
            Ok(_) => Ok(()),
            // Already expired or revoked: the outcome asked for holds.
            Err(e) if e.not_found => Ok(()),
            Err(e) => Err(StoreError::unavailable(e.detail)),
        }
    }
}

/// The compares of every create: the session is absent, and its fence key is where the
/// creator last saw it (0: absent).
fn create_guard(key: &str, fence: &str, fence_rev: i64) -> [Compare; 2] {
    [
        Compare::create_revision(key, CompareOp::Equal, 0),
        Compare::mod_revision(fence, CompareOp::Equal, fence_rev),
    ]
}

/// How the outcome of a write whose answer was lost was decided.
enum Decided {
    /// It applied.
    Applied,
    /// It did not apply and is certain never to apply.
    NotApplied {
        /// How that is known.
        why: String,
        /// For a create: where the fence key stands now.
        fence_rev: i64,
    },
    /// Another definite answer (conflict, not found, already exists, corrupt) or
    /// [`StoreError::CommitUnknown`].
    Answer(StoreError),
}

#[derive(Default)]
struct LostCounters {
    total: AtomicU64,
    applied: AtomicU64,
    not_applied: AtomicU64,
    fenced: AtomicU64,
    unknown: AtomicU64,
}

impl LostCounters {
    /// Counts how a lost answer was decided, and passes the decision on.
    fn count(&self, decided: Decided) -> Decided {
        let counter = match &decided {
            Decided::Applied => &self.applied,
            Decided::Answer(StoreError::CommitUnknown { .. }) => &self.unknown,
            Decided::NotApplied { .. } | Decided::Answer(_) => &self.not_applied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        decided
    }
}

/// Which failed requests [`EtcdStore::call`] makes again, within the request deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Only a request that never left this process (no connection could be made): for
    /// writes that must not apply twice.
    IfUnsent,
    /// Also a request whose connection failed under it: for reads and for writes that may
    /// apply twice (renewals, revocations).
    IfLostInTransit,
}

impl Retry {
    fn allows(self, error: &etcd_client::Error) -> bool {
        match self {
            Retry::IfUnsent => never_connected(error),
            Retry::IfLostInTransit => never_connected(error) || failed_in_transit(error),
        }
    }
}

/// What a failed RPC says about whether a write could have reached etcd's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Refused before it was proposed: it did not and will not apply.
    No,
    /// Possibly proposed: it may have applied, or may still apply.
    Maybe,
}

/// A failed RPC.
#[derive(Debug)]
struct RpcError {
    sent: Sent,
    /// What was attempted and what went wrong.
    detail: String,
    /// etcd said the lease is unknown (expired or revoked).
    lease_refused: bool,
    /// etcd said the thing asked for does not exist.
    not_found: bool,
}

impl RpcError {
    fn new(sent: Sent, detail: String) -> Self {
        Self {
            sent,
            detail,
            lease_refused: false,
            not_found: false,
        }
    }

    fn from_etcd(what: String, error: &etcd_client::Error) -> Self {
        Self {
            sent: classify(error),
            detail: format!("{what}: {}", describe(error)),
            // This client reports a keep-alive answered with TTL 0 (etcd's "unknown lease")
            // this way; it is confirmed with the server before being believed.
            lease_refused: matches!(error, etcd_client::Error::LeaseKeepAliveError(_)),
            not_found: matches!(
                error,
                etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound
            ),
        }
    }
}

/// What happened first to a key after some revision.
enum Change {
    Put(Vec<u8>),
    Delete,
    /// That part of the history is gone.
    Compacted,
}

/// etcd's own error texts (server/etcdserver/api/v3rpc/rpctypes). etcd reports these only as
/// gRPC status messages; its Go client recognises them by text the same way.
const ETCD_NO_LEADER: &str = "etcdserver: no leader";
const ETCD_NOT_CAPABLE: &str = "etcdserver: not capable";

fn classify(error: &etcd_client::Error) -> Sent {
    use tonic::Code;
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            if never_connected(error) {
                // No connection was ever made: the request never left this process.
                return Sent::No;
            }
            match status.code() {
                // etcd validates and admits a request before proposing it; these codes are its
                // refusals (bad request, compacted revision, auth, rate limit) and gRPC's own.
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::ResourceExhausted
                | Code::NotFound
                | Code::AlreadyExists
                | Code::Unimplemented => Sent::No,
                Code::Unavailable
                    if status.message() == ETCD_NO_LEADER
                        || status.message() == ETCD_NOT_CAPABLE =>
                {
                    Sent::No
                }
                // "request timed out", "leader changed", a reset stream, a deadline: the
                // proposal may be in the log.
                _ => Sent::Maybe,
            }
        }
        // Failures while building the request or the channel.
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::InvalidMetadataValue(_)
        | etcd_client::Error::EndpointError(_) => Sent::No,
        _ => Sent::Maybe,
    }
}

/// Whether the request failed because no connection to a member could be made.
fn never_connected(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether the request failed in this process's transport (a broken connection) rather than
/// being answered by etcd. A status etcd sent carries no source error; one made up by the
/// client from a transport failure carries that failure.
fn failed_in_transit(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status).is_some(),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// A short description of an etcd client error (the full status dump is noise).
fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            let mut text = format!("{:?}: {}", status.code(), status.message());
            let mut source = std::error::Error::source(status);
            while let Some(e) = source {
                text.push_str(": ");
                text.push_str(&e.to_string());
                source = e.source();
            }
            text
        }
        other => other.to_string(),
    }
}

/// Decodes the record at `key`, which must be `session`'s.
fn decode_session(
    key: &str,
    kv: &KeyValue,
    session: SessionId,
) -> Result<SessionRecord, StoreError> {
    let record = codec::decode(key, kv.value())?;
    if record.session_id != session {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            detail: format!("holds the record of session {}", record.session_id),
        });
    }
    Ok(record)
}

/// The key-value of each `get` of a transaction's branch, in order (`None`: key absent).
fn txn_gets(answer: &TxnResponse) -> Vec<Option<KeyValue>> {
    answer
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(mut get) => Some(get.take_kvs().into_iter().next()),
            _ => None,
        })
        .collect()
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): no upper bound, which etcd spells "\0".
    vec![0]
}

/// A lease TTL in etcd's whole seconds: rounded up, at least 1.
fn lease_seconds(ttl_ms: u64) -> u64 {
    ttl_ms.div_ceil(1000).max(1)
}

/// Waits before retry number `attempt` (1, 2, ...: 25 ms doubling up to 400 ms), unless that
/// would pass `deadline`. Returns whether to go on. The wait only paces retries against a
/// struggling cluster; nothing depends on its length.
async fn pace(attempt: u32, deadline: Instant) -> bool {
    let wait = Duration::from_millis(25u64 << attempt.saturating_sub(1).min(4));
    if Instant::now() + wait >= deadline {
        return false;
    }
    tokio::time::sleep(wait).await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix_range() {
        assert_eq!(prefix_end(b"/jumpvpn/sessions/"), b"/jumpvpn/sessions0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn lease_ttl_rounds_up_to_whole_seconds() {
        assert_eq!(lease_seconds(0), 1);
        assert_eq!(lease_seconds(1), 1);
        assert_eq!(lease_seconds(1_000), 1);
        assert_eq!(lease_seconds(1_001), 2);
        assert_eq!(lease_seconds(u64::MAX), u64::MAX / 1000 + 1);
    }

    #[test]
    fn only_refusals_before_proposal_count_as_not_sent() {
        assert_eq!(
            classify(&status(tonic::Code::Unavailable, ETCD_NO_LEADER)),
            Sent::No
        );
        assert_eq!(
            classify(&status(
                tonic::Code::InvalidArgument,
                "etcdserver: request is too large"
            )),
            Sent::No
        );
        for maybe in [
            status(tonic::Code::Unavailable, "etcdserver: request timed out"),
            status(tonic::Code::Unavailable, "etcdserver: leader changed"),
            status(tonic::Code::Cancelled, "Timeout expired"),
            status(tonic::Code::Unknown, "connection reset"),
            status(tonic::Code::DeadlineExceeded, "deadline"),
        ] {
            assert_eq!(classify(&maybe), Sent::Maybe, "{maybe}");
        }
    }

    #[test]
    fn writes_are_sent_again_only_if_they_never_left_and_reads_also_after_a_broken_link() {
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
            tonic::ConnectError(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))),
        )));
        let broken = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
            std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        )));
        let answered = status(tonic::Code::Unavailable, "etcdserver: request timed out");
        assert_eq!(classify(&refused), Sent::No);
        assert!(Retry::IfUnsent.allows(&refused));
        assert!(!Retry::IfUnsent.allows(&broken));
        assert!(!Retry::IfUnsent.allows(&answered));
        assert!(Retry::IfLostInTransit.allows(&refused));
        assert!(Retry::IfLostInTransit.allows(&broken));
        assert!(!Retry::IfLostInTransit.allows(&answered));
    }
}

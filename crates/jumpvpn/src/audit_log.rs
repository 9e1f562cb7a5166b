//! The audit writer of SPEC §8: one JSONL file per node, appended without ever blocking the
//! code that reports an event.
//!
//! ```text
//!   gateway tasks ──emit()──▶ bounded queue ──▶ writer thread ──▶ BufWriter ──▶ audit.jsonl
//!                              │ full?                             (flushed whenever the
//!                              └─▶ count the loss                   queue runs empty)
//!                                  ──▶ AUDIT_GAP {dropped: n} as soon as there is room
//! ```
//!
//! [`AuditLog::emit`] takes a mutex held only long enough to push one event (or, by the
//! writer, to swap two buffers); it never waits for I/O, a full queue or the writer. When the
//! queue is full the event is dropped and counted, and the writer reports the loss with an
//! `AUDIT_GAP` event right after the events that were queued before it — the position where the
//! lost events belong — so `jumpvpn audit verify` excuses the versions it cannot see.
//!
//! The writer is a dedicated OS thread, not a tokio task: file writes block, and a slow disk
//! must not stall the runtime that carries packets. [`AuditWriter::close`] (or dropping the
//! writer) flushes everything queued and joins the thread, so a clean shutdown loses nothing.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jumpvpn_core::{AuditEvent, NodeId};

/// The sending side of a node's audit stream: a cheap, cloneable handle that any task may use.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

/// The writing side: owns the writer thread. Close it (or drop it) at shutdown to flush.
pub struct AuditWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl AuditLog {
    /// Opens (creating it if needed, never truncating) the audit stream at `path` for appending,
    /// and starts its writer thread. `capacity` is the number of events the queue holds while
    /// the writer is busy (at least 1; the writer may hold one more batch of that size in hand).
    ///
    /// The parent directory must exist: the error names the path otherwise.
    pub fn open(path: &Path, node: NodeId, capacity: usize) -> anyhow::Result<(Self, AuditWriter)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open audit log {}", path.display()))?;
        let capacity = capacity.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(Queue {
                events: VecDeque::with_capacity(capacity),
                pending_gap: 0,
                closed: false,
                paused: false,
            }),
            wake: Condvar::new(),
            capacity,
            dropped_total: AtomicU64::new(0),
            node,
        });
        let writer_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || write_loop(&writer_shared, BufWriter::new(file)))
            .context("cannot start the audit writer thread")?;
        let log = Self {
            shared: Arc::clone(&shared),
        };
        let writer = AuditWriter {
            shared,
            thread: Some(thread),
        };
        Ok((log, writer))
    }

    /// Queues `event` for writing. Never blocks on I/O and never waits for room: when the queue
    /// is full (or the writer has been closed) the event is dropped and counted, and the loss
    /// is reported by an `AUDIT_GAP` event as soon as the writer has room.
    pub fn emit(&self, event: AuditEvent) {
        let mut queue = self.shared.lock();
        if queue.closed {
            // Nothing can be written any more, not even a gap: count the loss for metrics.
            drop(queue);
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if queue.events.len() >= self.shared.capacity {
            // Full means the writer has a whole queue to take, so it will see the gap soon.
            queue.pending_gap = queue.pending_gap.saturating_add(1);
            drop(queue);
            self.shared.dropped_total.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = queue.events.is_empty();
        queue.events.push_back(event);
        drop(queue);
        if was_empty {
            // The writer only ever sleeps on an empty queue.
            self.shared.wake.notify_one();
        }
    }

    /// Events lost since the stream was opened (queue full, write failures, or emitted after
    /// close): the `jumpvpn_audit_dropped_total` metric.
    pub fn dropped_total(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Relaxed)
    }

    /// The node whose stream this is.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// Test hook: while paused the writer takes nothing from the queue, so a test can fill it
    /// and watch events being dropped without timing games. Closing lifts the pause.
    #[doc(hidden)]
    pub fn pause_writer_for_test(&self, paused: bool) {
        self.shared.lock().paused = paused;
        self.shared.wake.notify_one();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("node", &self.shared.node)
            .field("capacity", &self.shared.capacity)
            .field("dropped_total", &self.dropped_total())
            .finish()
    }
}

impl AuditWriter {
    /// Writes everything still queued (and a final `AUDIT_GAP` if events were dropped), flushes
    /// and syncs the file, and stops the writer thread. Events emitted afterwards are dropped
    /// and counted.
    ///
    /// Returns the first write error the writer met, if any (the events it could not write are
    /// counted as dropped).
    pub fn close(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut queue = self.shared.lock();
            queue.closed = true;
            queue.paused = false;
        }
        self.shared.wake.notify_one();
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err(io::Error::other("the audit writer thread panicked")),
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "audit log: cannot flush on shutdown");
        }
    }
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("node", &self.shared.node)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970): the
/// `ts_ms` of audit events and the `now` the drivers hand to the core.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the handles and the writer thread share.
struct Shared {
    state: Mutex<Queue>,
    /// Signalled when the queue goes from empty to not empty, on close, and on un-pausing.
    wake: Condvar,
    capacity: usize,
    dropped_total: AtomicU64,
    node: NodeId,
}

impl Shared {
    /// The critical sections cannot panic, so a poisoned lock still holds a consistent queue.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Queue {
    events: VecDeque<AuditEvent>,
    /// Dropped since the last `AUDIT_GAP` was handed to the writer.
    pending_gap: u64,
    closed: bool,
    paused: bool,
}

/// The writer thread: take the whole queue at once, write it outside the lock, then the gap
/// that followed it, and flush whenever there is nothing more to take.
fn write_loop(shared: &Shared, mut out: BufWriter<File>) -> io::Result<()> {
    let mut batch: VecDeque<AuditEvent> = VecDeque::with_capacity(shared.capacity);
    let mut first_error: Option<io::Error> = None;
    let mut failing = false;
    let mut dirty = false;
    loop {
        let (gap, closed) = {
            let mut queue = shared.lock();
            loop {
                let has_work = !queue.events.is_empty() || queue.pending_gap > 0;
                if queue.closed || (has_work && !queue.paused) {
                    break;
                }
                if dirty {
                    // Idle: flush outside the lock, then look again.
                    drop(queue);
                    let flushed = out.flush();
                    note(&mut first_error, &mut failing, flushed);
                    dirty = false;
                    queue = shared.lock();
                    continue;
                }
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            // Swapping buffers keeps both allocations: no allocation per batch.
            std::mem::swap(&mut queue.events, &mut batch);
            (std::mem::take(&mut queue.pending_gap), queue.closed)
        };

        // Every event in the batch was queued before the drops counted in `gap` (the queue
        // only drops when full, and only this thread makes room), so the gap goes after them.
        let mut lost: u64 = 0;
        for event in batch.drain(..) {
            if write_event(&mut out, &event, &mut first_error, &mut failing) {
                lost += 1;
            }
        }
        if gap > 0 {
            let event = AuditEvent::gap(now_ms(), shared.node.clone(), gap);
            write_event(&mut out, &event, &mut first_error, &mut failing);
        }
        if lost > 0 {
            shared.dropped_total.fetch_add(lost, Ordering::Relaxed);
            // Report them with a gap on the next round (if writing works again by then; a gap
            // that cannot be written is not retried, so a broken disk cannot spin this loop).
            let mut queue = shared.lock();
            queue.pending_gap = queue.pending_gap.saturating_add(lost);
        }
        dirty = true;

        if closed {
            // `closed` was read in the same critical section that took the batch, and `emit`
            // queues nothing once it is set: nothing is left but, after write errors, a gap.
            let leftover = std::mem::take(&mut shared.lock().pending_gap);
            if leftover > 0 {
                let event = AuditEvent::gap(now_ms(), shared.node.clone(), leftover);
                write_event(&mut out, &event, &mut first_error, &mut failing);
            }
            let flushed = out.flush().and_then(|()| out.get_ref().sync_data());
            note(&mut first_error, &mut failing, flushed);
            return first_error.map_or(Ok(()), Err);
        }
    }
}

/// Writes one event as a line; returns whether it was lost.
fn write_event(
    out: &mut BufWriter<File>,
    event: &AuditEvent,
    first_error: &mut Option<io::Error>,
    failing: &mut bool,
) -> bool {
    let mut line = event.to_json_line();
    line.push('\n');
    let written = out.write_all(line.as_bytes());
    let lost = written.is_err();
    note(first_error, failing, written);
    lost
}

/// Records the outcome of a write: logs the first error of a streak (not one per event) and
/// keeps the first error of all for [`AuditWriter::close`].
fn note(first_error: &mut Option<io::Error>, failing: &mut bool, result: io::Result<()>) {
    match result {
        Ok(()) => {
            if *failing {
                tracing::warn!("audit log: writing works again");
            }
            *failing = false;
        }
        Err(error) => {
            if !*failing {
                tracing::error!(%error, "audit log: cannot write; events are being lost");
            }
            *failing = true;
            if first_error.is_none() {
                *first_error = Some(error);
            }
        }
    }
}

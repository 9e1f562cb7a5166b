//! Keeping a node's liveness lease alive, and the *local deadline* of SPEC §7.3.
//!
//! The store expires a lease `ttl` after it last received a keep-alive. The node cannot know
//! when that was, only when it *sent* the keep-alive that was acknowledged, which is earlier.
//! So the node's own deadline is `sent_at + ttl - drift_margin`: it stops binding and
//! forwarding before the store can possibly let another node take its sessions, whatever the
//! network delay of the acknowledgement and within `drift_margin` of clock-rate difference.

use std::sync::Arc;
use std::time::Duration;

use jumpvpn_core::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{LeaseId, Liveness, StoreError};

/// The last moment a node may act as owner, given when the acknowledged keep-alive was sent.
pub fn local_deadline(sent_at: Instant, ttl: Duration, drift_margin: Duration) -> Instant {
    sent_at + ttl.saturating_sub(drift_margin)
}

/// Timing of a lease.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// The lease TTL in the store.
    pub ttl: Duration,
    /// Subtracted from the TTL for the local deadline.
    pub drift_margin: Duration,
    /// Time between keep-alives; well under `ttl - drift_margin`.
    pub interval: Duration,
}

impl LeaseTiming {
    /// A keep-alive every third of the TTL, and a drift margin of a tenth (at least 50 ms).
    pub fn from_ttl(ttl: Duration) -> Self {
        let drift_margin = (ttl / 10).max(Duration::from_millis(50)).min(ttl / 2);
        Self {
            ttl,
            drift_margin,
            interval: ttl / 3,
        }
    }
}

/// Keeps one node's lease alive in the background and answers "may I still act as owner?".
pub struct LeaseKeeper {
    lease: LeaseId,
    deadline: watch::Receiver<Option<Instant>>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Registers `node` and starts the keep-alive loop. The lease is valid from the moment
    /// registration is acknowledged until its local deadline, renewed by each acknowledged
    /// keep-alive. If the store says the lease expired, the keeper stays invalid for good: a
    /// node that lost its lease has lost its sessions and must register anew.
    pub async fn start<L: Liveness>(
        liveness: Arc<L>,
        node: &NodeId,
        timing: LeaseTiming,
    ) -> Result<Self, StoreError> {
        let ttl_ms = u64::try_from(timing.ttl.as_millis()).unwrap_or(u64::MAX);
        let sent_at = Instant::now();
        let lease = liveness.register(node, ttl_ms).await?;
        let (tx, deadline) = watch::channel(Some(local_deadline(
            sent_at,
            timing.ttl,
            timing.drift_margin,
        )));
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(timing.interval).await;
                let sent_at = Instant::now();
                match liveness.keep_alive(lease).await {
                    Ok(()) => {
                        let next = local_deadline(sent_at, timing.ttl, timing.drift_margin);
                        // Only ever move the deadline forward.
                        tx.send_if_modified(|d| match d {
                            Some(old) if *old >= next => false,
                            _ => {
                                *d = Some(next);
                                true
                            }
                        });
                    }
                    Err(StoreError::LeaseExpired) => {
                        tx.send_replace(None);
                        return;
                    }
                    // Unreachable store: keep trying; the deadline runs out by itself.
                    Err(_) => {}
                }
            }
        });
        Ok(Self {
            lease,
            deadline,
            task,
        })
    }

    /// The lease in the store.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The local deadline, or `None` once the lease is known to be lost.
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.borrow()
    }

    /// Whether the node may act as owner now.
    pub fn is_valid(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// A receiver that sees every change of the deadline.
    pub fn watch(&self) -> watch::Receiver<Option<Instant>> {
        self.deadline.clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! The audit checker: verifies SPEC §8's invariants over the merged streams of every node.
//!
//! Streams are merged by `ts_ms` (a k-way merge that holds one event per stream). Clocks of
//! different nodes may disagree, so per session the checker applies `STATE_CHANGE` events in
//! version order through a small reorder buffer; memory grows with the number of sessions (and
//! the clock skew between nodes), not with the number of events.
//!
//! What is checked, per session:
//!
//! 1. *versions* — `STATE_CHANGE` versions are 1, 2, 3, … with none twice (a version committed
//!    twice, or a second creation, is a fork: dual-active) and none missing unless the streams'
//!    `AUDIT_GAP` events account for it; within one owner epoch a single node commits (the
//!    transfer that opens an epoch and terminations excepted).
//! 2. *epochs* — `owner_epoch` never decreases as the version grows.
//! 3. *ownership* — every epoch change is exactly +1 with reason `MIGRATION`, `DRAIN` or
//!    `FAILOVER`, and every `SESSION_OWNER_TRANSFERRED` sits on such a change.
//! 4. *termination* — nothing is accepted after the session terminated.
//! 5. *rejections* — a rejection never changes the version: it reports a committed version, and
//!    no `STATE_CHANGE` carries a rejection-only reason (except a fatal one, to TERMINATED).
//! 6. *bindings* — ATTACHED (and VOLATILE, DEGRADED) has exactly one binding, RECOVERING and
//!    TERMINATED none (checked where `STATE_CHANGE` carries `transport_id`).
//!
//! In addition, *transitions*: each `STATE_CHANGE` starts from the state the previous version
//! left and is a move that SPEC §3 allows.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use crate::ids::SessionId;
use crate::reason::ReasonCode;
use crate::record::SessionState;

/// How many out-of-order `STATE_CHANGE`s one session may hold before the oldest missing
/// version is declared lost (bounds memory when a version never arrives).
const MAX_PENDING_PER_SESSION: usize = 1024;

/// How many of a session's most recent epoch changes are remembered, to match a
/// `SESSION_OWNER_TRANSFERRED` that is read after later versions were applied (a lagging clock
/// on its node). Bounds memory when a stream changes epochs without end.
const EPOCH_HISTORY: usize = 64;

/// Which rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    /// A line that is not a well-formed event.
    Malformed,
    /// 1: versions 1, 2, 3, … once each.
    Versions,
    /// 2: the epoch never decreases.
    Epochs,
    /// 3: ownership changes only by migration, drain or failover, epoch + 1.
    Ownership,
    /// 4: nothing accepted after termination.
    Termination,
    /// 5: a rejection never changes the version.
    Rejections,
    /// 6: ATTACHED has one binding, RECOVERING none.
    Bindings,
    /// Each change starts where the last left off and is allowed by SPEC §3.
    Transitions,
}

impl Invariant {
    /// A short label for messages: `"invariant 1 (versions)"`.
    pub const fn label(self) -> &'static str {
        match self {
            Invariant::Malformed => "malformed event",
            Invariant::Versions => "invariant 1 (versions)",
            Invariant::Epochs => "invariant 2 (epochs)",
            Invariant::Ownership => "invariant 3 (ownership)",
            Invariant::Termination => "invariant 4 (termination)",
            Invariant::Rejections => "invariant 5 (rejections)",
            Invariant::Bindings => "invariant 6 (bindings)",
            Invariant::Transitions => "transitions",
        }
    }
}

/// One broken rule, with where it was seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The stream's name (its file).
    pub file: String,
    /// 1-based line number in that stream.
    pub line: u64,
    /// The session, when known.
    pub session: Option<SessionId>,
    /// The version concerned, when known.
    pub version: Option<u64>,
    /// The rule.
    pub invariant: Invariant,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(session) = self.session {
            write!(f, "session {session} ")?;
        }
        if let Some(version) = self.version {
            write!(f, "version {version} ")?;
        }
        write!(f, "{}: {}", self.invariant.label(), self.message)
    }
}

/// What a finished check saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Lines read (blank lines excluded).
    pub events: u64,
    /// Distinct sessions.
    pub sessions: usize,
    /// Violations found.
    pub violations: u64,
    /// Events the streams' `AUDIT_GAP`s say were lost.
    pub dropped: u64,
}

/// The type of an event, as far as the checker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `SESSION_CREATED`
    SessionCreated,
    /// `STATE_CHANGE`
    StateChange,
    /// `TRANSPORT_SWITCH`
    TransportSwitch,
    /// `REATTACH_REJECTED`, `EVENT_REJECTED`, `SESSION_OWNER_REJECTED`, `SESSION_OWNER_CONFLICT`
    Rejected,
    /// `SECURITY_EVENT`, `POLICY_EVENT`: descriptive, accept nothing.
    Descriptive,
    /// `TERMINATION_EVENT`
    Termination,
    /// `SESSION_OWNER_TRANSFERRED`
    OwnerTransferred,
    /// `SESSION_OWNER_ACQUIRED`, `SESSION_FROZEN`, `SESSION_RESUMED`: accompany an accepted change.
    Accepted,
    /// `AUDIT_GAP`
    Gap,
}

/// A parsed event: the fields the checker needs, in a compact owned form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `ts_ms`
    pub ts_ms: u64,
    /// Index of `node_id` in the checker's table of node names.
    pub node: u32,
    /// From `event_type`.
    pub kind: Kind,
    /// `session_id` (absent only for `AUDIT_GAP`).
    pub session: Option<SessionId>,
    /// `state_version`
    pub version: u64,
    /// `owner_epoch`
    pub epoch: u64,
    /// `reason_code`
    pub reason: ReasonCode,
    /// `previous_state` (`STATE_CHANGE`).
    pub previous_state: Option<SessionState>,
    /// `new_state` (`STATE_CHANGE`, `SESSION_CREATED`).
    pub new_state: Option<SessionState>,
    /// `transport_id`: `None` when absent, `Some(None)` when `null`.
    pub transport_id: Option<Option<u64>>,
    /// `dropped` (`AUDIT_GAP`).
    pub dropped: u64,
}

#[derive(Deserialize)]
struct Raw<'a> {
    ts_ms: Option<u64>,
    #[serde(borrow)]
    node_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<Cow<'a, str>>,
    state_version: Option<u64>,
    owner_epoch: Option<u64>,
    #[serde(borrow)]
    reason_code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    previous_state: Option<Cow<'a, str>>,
    #[serde(borrow)]
    new_state: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "present")]
    transport_id: Option<Option<u64>>,
    dropped: Option<u64>,
    // Presence of the other type-specific fields of SPEC §8.
    proto: Option<IgnoredAny>,
    #[serde(default, deserialize_with = "present")]
    old_transport_id: Option<Option<u64>>,
    new_transport_id: Option<IgnoredAny>,
    switch_latency_ms: Option<IgnoredAny>,
    retryable: Option<IgnoredAny>,
    violation_type: Option<IgnoredAny>,
    policy_name: Option<IgnoredAny>,
    threshold_value: Option<IgnoredAny>,
    observed_value: Option<IgnoredAny>,
    total_lifetime_ms: Option<IgnoredAny>,
    total_switches: Option<IgnoredAny>,
}

/// Distinguishes a field that is present but `null` (`Some(None)`) from an absent one (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Checks events fed in merged order. Use [`verify`] to check whole streams.
#[derive(Default)]
pub struct Checker {
    files: Vec<String>,
    nodes: Vec<String>,
    node_index: HashMap<String, u32>,
    sessions: HashMap<SessionId, Track>,
    /// Versions declared lost, to be excused by `AUDIT_GAP`s at the end.
    missing: Vec<Missing>,
    dropped: u64,
    events: u64,
    violations: Vec<Violation>,
    violation_count: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    file: u32,
    line: u64,
}

struct Missing {
    session: SessionId,
    from: u64,
    to: u64,
    next_seen: Loc,
}

#[derive(Default)]
struct Track {
    /// The next `STATE_CHANGE` version expected.
    next: u64,
    /// State, epoch and binding left by version `next - 1`.
    state: Option<SessionState>,
    epoch: u64,
    binding: Option<Option<u64>>,
    /// The node that commits in the current epoch, once known.
    epoch_owner: Option<u32>,
    /// The versions at which the epoch changed, oldest first, at most `EPOCH_HISTORY`.
    epoch_changes: VecDeque<u64>,
    /// Whether older entries of `epoch_changes` were forgotten.
    epoch_history_truncated: bool,
    created: bool,
    /// The version at which the session terminated.
    terminated_at: Option<u64>,
    /// The highest version of an accepted-kind event, and where.
    max_accepted: Option<(u64, Loc)>,
    /// Whether versions before `next` were skipped (so continuity cannot be checked).
    after_gap: bool,
    pending: BTreeMap<u64, (Event, Loc)>,
    deferred: Vec<Deferred>,
}

#[derive(Clone, Copy)]
enum DeferredKind {
    Rejection,
    Transfer,
}

#[derive(Clone, Copy)]
struct Deferred {
    kind: DeferredKind,
    version: u64,
    loc: Loc,
}

impl Checker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream by name; events from it are fed with the returned index.
    pub fn add_source(&mut self, name: impl Into<String>) -> u32 {
        self.files.push(name.into());
        u32::try_from(self.files.len() - 1).unwrap_or(u32::MAX)
    }

    /// The name of node `index`, as interned by [`Checker::parse`].
    pub fn node_name(&self, index: u32) -> &str {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.nodes.get(i))
            .map_or("?", String::as_str)
    }

    /// Parses one line into an [`Event`], or says why it is not one.
    pub fn parse(&mut self, line: &[u8]) -> Result<Event, String> {
        let raw: Raw<'_> =
            serde_json::from_slice(line).map_err(|e| format!("not a JSON event: {e}"))?;
        let event_type = raw.event_type.ok_or("missing field `event_type`")?;
        let kind = match &*event_type {
            "SESSION_CREATED" => Kind::SessionCreated,
            "STATE_CHANGE" => Kind::StateChange,
            "TRANSPORT_SWITCH" => Kind::TransportSwitch,
            "REATTACH_REJECTED"
            | "EVENT_REJECTED"
            | "SESSION_OWNER_REJECTED"
            | "SESSION_OWNER_CONFLICT" => Kind::Rejected,
            "SECURITY_EVENT" | "POLICY_EVENT" => Kind::Descriptive,
            "TERMINATION_EVENT" => Kind::Termination,
            "SESSION_OWNER_TRANSFERRED" => Kind::OwnerTransferred,
            "SESSION_OWNER_ACQUIRED" | "SESSION_FROZEN" | "SESSION_RESUMED" => Kind::Accepted,
            "AUDIT_GAP" => Kind::Gap,
            other => return Err(format!("unknown event_type {other:?}")),
        };
        let ts_ms = raw.ts_ms.ok_or("missing field `ts_ms`")?;
        let node = raw.node_id.ok_or("missing field `node_id`")?;
        let version = raw.state_version.ok_or("missing field `state_version`")?;
        let epoch = raw.owner_epoch.ok_or("missing field `owner_epoch`")?;
        let reason = raw.reason_code.ok_or("missing field `reason_code`")?;
        let reason: ReasonCode = reason
            .parse()
            .map_err(|_| format!("unknown reason_code {reason:?}"))?;
        let session = match raw.session_id {
            Some(text) => Some(text.parse::<SessionId>().map_err(|e| e.to_string())?),
            None if kind == Kind::Gap => None,
            None => return Err("missing field `session_id`".to_owned()),
        };
        let state = |name: &'static str, value: Option<Cow<'_, str>>| -> Result<_, String> {
            value
                .map(|v| SessionState::from_name(&v).ok_or(format!("unknown {name} {v:?}")))
                .transpose()
        };
        let previous_state = state("previous_state", raw.previous_state)?;
        let new_state = state("new_state", raw.new_state)?;
        let require = |ok: bool, field: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{event_type} without field `{field}`"))
            }
        };
        match kind {
            Kind::StateChange => {
                require(previous_state.is_some(), "previous_state")?;
                require(new_state.is_some(), "new_state")?;
            }
            Kind::SessionCreated => {
                require(new_state.is_some(), "new_state")?;
                require(matches!(raw.transport_id, Some(Some(_))), "transport_id")?;
                require(raw.proto.is_some(), "proto")?;
            }
            Kind::TransportSwitch => {
                require(raw.old_transport_id.is_some(), "old_transport_id")?;
                require(raw.new_transport_id.is_some(), "new_transport_id")?;
                require(raw.proto.is_some(), "proto")?;
                require(raw.switch_latency_ms.is_some(), "switch_latency_ms")?;
            }
            Kind::Rejected if &*event_type == "REATTACH_REJECTED" => {
                require(raw.retryable.is_some(), "retryable")?;
            }
            Kind::Descriptive if &*event_type == "SECURITY_EVENT" => {
                require(raw.violation_type.is_some(), "violation_type")?;
            }
            Kind::Descriptive => {
                require(raw.policy_name.is_some(), "policy_name")?;
                require(raw.threshold_value.is_some(), "threshold_value")?;
                require(raw.observed_value.is_some(), "observed_value")?;
            }
            Kind::Termination => {
                require(raw.total_lifetime_ms.is_some(), "total_lifetime_ms")?;
                require(raw.total_switches.is_some(), "total_switches")?;
            }
            Kind::Gap => require(raw.dropped.is_some(), "dropped")?,
            _ => {}
        }
        let node = self.intern(&node);
        Ok(Event {
            ts_ms,
            node,
            kind,
            session,
            version,
            epoch,
            reason,
            previous_state,
            new_state,
            transport_id: raw.transport_id,
            dropped: raw.dropped.unwrap_or(0),
        })
    }

    /// Reports a line of stream `file` that did not parse.
    pub fn malformed(&mut self, file: u32, line: u64, why: String) {
        self.events += 1;
        self.report(Loc { file, line }, None, None, Invariant::Malformed, why);
    }

    /// Feeds one parsed event, read at `line` of stream `file`.
    pub fn feed(&mut self, event: Event, file: u32, line: u64) {
        self.events += 1;
        let loc = Loc { file, line };
        let Some(session) = event.session else {
            if event.kind == Kind::Gap {
                self.dropped = self.dropped.saturating_add(event.dropped);
            }
            return;
        };
        match event.kind {
            Kind::StateChange => self.state_change(session, event, loc),
            Kind::SessionCreated => {
                let track = self.track(session);
                let twice = std::mem::replace(&mut track.created, true);
                self.accepted(session, event.version, loc);
                if twice {
                    let msg = "session created twice (fork: dual-active)".to_owned();
                    self.report(
                        loc,
                        Some(session),
                        Some(event.version),
                        Invariant::Versions,
                        msg,
                    );
                } else if event.version != 1 {
                    let msg = format!("SESSION_CREATED at version {}, not 1", event.version);
                    self.report(
                        loc,
                        Some(session),
                        Some(event.version),
                        Invariant::Versions,
                        msg,
                    );
                }
            }
            Kind::TransportSwitch | Kind::Accepted => self.accepted(session, event.version, loc),
            Kind::OwnerTransferred => {
                self.accepted(session, event.version, loc);
                self.defer(session, DeferredKind::Transfer, event.version, loc);
            }
            Kind::Termination => self.terminated(session, event.version, loc),
            Kind::Rejected => self.defer(session, DeferredKind::Rejection, event.version, loc),
            Kind::Descriptive | Kind::Gap => {
                if event.kind == Kind::Gap {
                    self.dropped = self.dropped.saturating_add(event.dropped);
                }
                self.track(session);
            }
        }
    }

    /// Takes the violations found so far, so they can be printed while checking goes on.
    pub fn drain_violations(&mut self) -> std::vec::Drain<'_, Violation> {
        self.violations.drain(..)
    }

    /// Ends the check: resolves what waited for later events and returns the summary. Call
    /// [`Checker::drain_violations`] afterwards for the last violations.
    pub fn finish(&mut self) -> Summary {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        for session in ids {
            while let Some(first) = self.sessions.get(&session).and_then(first_pending) {
                self.skip_to(session, first);
            }
            let deferred = self
                .sessions
                .get_mut(&session)
                .map(|t| std::mem::take(&mut t.deferred))
                .unwrap_or_default();
            for d in deferred {
                let msg = match d.kind {
                    DeferredKind::Rejection => format!(
                        "rejection reports version {}, which no STATE_CHANGE committed",
                        d.version
                    ),
                    DeferredKind::Transfer => format!(
                        "owner transferred at version {}, which no STATE_CHANGE committed",
                        d.version
                    ),
                };
                let invariant = match d.kind {
                    DeferredKind::Rejection => Invariant::Rejections,
                    DeferredKind::Transfer => Invariant::Ownership,
                };
                if !self.excused_by_gap(session, d.version) {
                    self.report(d.loc, Some(session), Some(d.version), invariant, msg);
                }
            }
        }
        let lost: u64 = self.missing.iter().map(|m| m.to - m.from + 1).sum();
        if lost > self.dropped {
            for m in std::mem::take(&mut self.missing) {
                let msg = if m.from == m.to {
                    format!("version {} missing (no AUDIT_GAP accounts for it)", m.from)
                } else {
                    format!(
                        "versions {}..={} missing (no AUDIT_GAP accounts for them)",
                        m.from, m.to
                    )
                };
                self.report(
                    m.next_seen,
                    Some(m.session),
                    Some(m.from),
                    Invariant::Versions,
                    msg,
                );
            }
        }
        Summary {
            events: self.events,
            sessions: self.sessions.len(),
            violations: self.violation_count,
            dropped: self.dropped,
        }
    }

    fn intern(&mut self, node: &str) -> u32 {
        if let Some(index) = self.node_index.get(node) {
            return *index;
        }
        let index = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.nodes.push(node.to_owned());
        self.node_index.insert(node.to_owned(), index);
        index
    }

    fn track(&mut self, session: SessionId) -> &mut Track {
        self.sessions.entry(session).or_insert_with(|| Track {
            next: 1,
            ..Track::default()
        })
    }

    fn report(
        &mut self,
        loc: Loc,
        session: Option<SessionId>,
        version: Option<u64>,
        invariant: Invariant,
        message: String,
    ) {
        let file = usize::try_from(loc.file)
            .ok()
            .and_then(|i| self.files.get(i))
            .cloned()
            .unwrap_or_default();
        self.violation_count += 1;
        self.violations.push(Violation {
            file,
            line: loc.line,
            session,
            version,
            invariant,
            message,
        });
    }

    fn accepted(&mut self, session: SessionId, version: u64, loc: Loc) {
        let track = self.track(session);
        if track.max_accepted.is_none_or(|(v, _)| version > v) {
            track.max_accepted = Some((version, loc));
        }
        if let Some(end) = track.terminated_at.filter(|end| version > *end) {
            let msg = format!("accepted at version {version} after termination at version {end}");
            self.report(
                loc,
                Some(session),
                Some(version),
                Invariant::Termination,
                msg,
            );
        }
    }

    fn terminated(&mut self, session: SessionId, version: u64, loc: Loc) {
        let track = self.track(session);
        match track.terminated_at {
            Some(end) if end != version => {
                let msg = format!("terminated again at version {version} (first at {end})");
                self.report(
                    loc,
                    Some(session),
                    Some(version),
                    Invariant::Termination,
                    msg,
                );
                return;
            }
            Some(_) => return,
            None => track.terminated_at = Some(version),
        }
        if let Some((late, late_loc)) = track.max_accepted.filter(|(v, _)| *v > version) {
            let msg = format!("accepted at version {late} after termination at version {version}");
            self.report(
                late_loc,
                Some(session),
                Some(late),
                Invariant::Termination,
                msg,
            );
        }
    }

    fn defer(&mut self, session: SessionId, kind: DeferredKind, version: u64, loc: Loc) {
        let track = self.track(session);
        let settled = match kind {
            // Version 0: the session did not exist (e.g. SESSION_NOT_FOUND).
            DeferredKind::Rejection => version == 0 || version < track.next,
            DeferredKind::Transfer => false,
        };
        if settled {
            return;
        }
        if version < track.next {
            // A transfer on a version already applied: check it now.
            self.check_transfer(session, version, loc);
        } else {
            track.deferred.push(Deferred { kind, version, loc });
        }
    }

    /// Checks a `SESSION_OWNER_TRANSFERRED` at a version that has been applied (or skipped).
    /// Later versions may have been applied first (its node's clock lags), so it is matched
    /// against the session's recent epoch changes, not only the last one.
    fn check_transfer(&mut self, session: SessionId, version: u64, loc: Loc) {
        let Some(track) = self.sessions.get(&session) else {
            return;
        };
        if track.epoch_changes.contains(&version) {
            return;
        }
        // Too old to tell: its epoch change, if any, has been forgotten.
        let forgotten = track.epoch_history_truncated
            && track
                .epoch_changes
                .front()
                .is_none_or(|oldest| version < *oldest);
        if forgotten {
            return;
        }
        let lost = self
            .missing
            .iter()
            .any(|m| m.session == session && (m.from..=m.to).contains(&version));
        if lost {
            // Its STATE_CHANGE was never seen: `finish` reports it unless an AUDIT_GAP
            // accounts for it.
            if let Some(track) = self.sessions.get_mut(&session) {
                track.deferred.push(Deferred {
                    kind: DeferredKind::Transfer,
                    version,
                    loc,
                });
            }
            return;
        }
        let msg = format!("owner transferred at version {version} without an epoch change");
        self.report(loc, Some(session), Some(version), Invariant::Ownership, msg);
    }

    fn state_change(&mut self, session: SessionId, event: Event, loc: Loc) {
        let track = self.track(session);
        let v = event.version;
        if v == 0 {
            let msg = "STATE_CHANGE at version 0 (BIRTH is never committed; versions start at 1)";
            self.report(
                loc,
                Some(session),
                Some(v),
                Invariant::Versions,
                msg.to_owned(),
            );
            return;
        }
        if v < track.next {
            let msg = format!("version {v} committed twice (fork: dual-active)");
            self.report(loc, Some(session), Some(v), Invariant::Versions, msg);
            return;
        }
        if v > track.next {
            if track.pending.insert(v, (event, loc)).is_some() {
                let msg = format!("version {v} committed twice (fork: dual-active)");
                self.report(loc, Some(session), Some(v), Invariant::Versions, msg);
            } else if track.pending.len() > MAX_PENDING_PER_SESSION {
                if let Some(first) = first_pending(track) {
                    self.skip_to(session, first);
                }
            }
            return;
        }
        self.apply(session, event, loc);
        self.drain_pending(session);
    }

    /// Declares the versions before `first` lost, then applies what follows.
    fn skip_to(&mut self, session: SessionId, first: u64) {
        let Some(track) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some((_, next_seen)) = track.pending.get(&first).copied() else {
            return;
        };
        if first > track.next {
            self.missing.push(Missing {
                session,
                from: track.next,
                to: first - 1,
                next_seen,
            });
            track.next = first;
            track.after_gap = true;
        }
        self.drain_pending(session);
    }

    fn drain_pending(&mut self, session: SessionId) {
        loop {
            let Some(track) = self.sessions.get_mut(&session) else {
                return;
            };
            let next = track.next;
            let Some((event, loc)) = track.pending.remove(&next) else {
                return;
            };
            self.apply(session, event, loc);
        }
    }

    fn excused_by_gap(&self, session: SessionId, version: u64) -> bool {
        self.dropped > 0
            && self
                .missing
                .iter()
                .any(|m| m.session == session && (m.from..=m.to).contains(&version))
    }

    /// Applies the `STATE_CHANGE` at exactly `track.next`.
    fn apply(&mut self, session: SessionId, e: Event, loc: Loc) {
        let v = e.version;
        let mut found: Vec<(Invariant, String)> = Vec::new();
        let Some(track) = self.sessions.get_mut(&session) else {
            return;
        };
        let first = v == 1;
        let prev_state = track.state;
        let new_state = e.new_state.unwrap_or(SessionState::Birth);
        let prev = e.previous_state.unwrap_or(SessionState::Birth);

        // 4: nothing after termination.
        if let Some(end) = track.terminated_at.filter(|end| v > *end) {
            found.push((
                Invariant::Termination,
                format!("state change to {new_state} after termination at version {end}"),
            ));
        }

        // 2 and 3: epochs. Across versions lost to a gap the epoch may have changed in the
        // versions not seen (the gap itself is reported unless an AUDIT_GAP accounts for it), so
        // only a decrease can be judged there.
        let epoch_changed = !first && e.epoch != track.epoch;
        if !first && e.epoch < track.epoch {
            found.push((
                Invariant::Epochs,
                format!("owner_epoch decreased from {} to {}", track.epoch, e.epoch),
            ));
        } else if epoch_changed
            && !track.after_gap
            && (e.epoch != track.epoch.saturating_add(1) || !e.reason.is_ownership_transfer())
        {
            found.push((
                Invariant::Ownership,
                format!(
                    "owner_epoch changed from {} to {} with reason {} (only MIGRATION, DRAIN or \
                     FAILOVER may change it, by exactly 1)",
                    track.epoch, e.epoch, e.reason
                ),
            ));
        }

        // 1: one committing node per epoch.
        if epoch_changed {
            if track.epoch_changes.len() >= EPOCH_HISTORY {
                track.epoch_changes.pop_front();
                track.epoch_history_truncated = true;
            }
            track.epoch_changes.push_back(v);
        }
        if first || epoch_changed {
            track.epoch_owner = first.then_some(e.node);
        } else if new_state != SessionState::Terminated {
            match track.epoch_owner {
                None => track.epoch_owner = Some(e.node),
                Some(owner) if owner != e.node => {
                    let name = |i: u32| {
                        usize::try_from(i)
                            .ok()
                            .and_then(|i| self.nodes.get(i))
                            .map_or("?", |n| n)
                    };
                    found.push((
                        Invariant::Versions,
                        format!(
                            "nodes {} and {} both commit in owner epoch {} (fork: dual-active)",
                            name(owner),
                            name(e.node),
                            e.epoch
                        ),
                    ));
                }
                Some(_) => {}
            }
        }

        // Transitions.
        let expected_prev = if first {
            Some(SessionState::Birth)
        } else {
            prev_state
        };
        if let Some(expected) = expected_prev.filter(|_| !track.after_gap || first) {
            if expected != prev && expected != SessionState::Terminated {
                found.push((
                    Invariant::Transitions,
                    format!(
                        "previous_state {prev}, but version {} left {expected}",
                        v - 1
                    ),
                ));
            }
        }
        if !transition_allowed(prev, new_state) && prev != SessionState::Terminated {
            found.push((
                Invariant::Transitions,
                format!("{prev} -> {new_state} is not a transition SPEC §3 allows"),
            ));
        }

        // 5: a rejection-only reason on a non-terminal change.
        if e.reason.is_rejection_only() && new_state != SessionState::Terminated {
            found.push((
                Invariant::Rejections,
                format!(
                    "state change with rejection reason {}: a rejection changed the version",
                    e.reason
                ),
            ));
        }

        // 6: bindings.
        if let Some(binding) = e.transport_id {
            if new_state.has_binding() && binding.is_none() {
                found.push((
                    Invariant::Bindings,
                    format!("{new_state} without a binding"),
                ));
            }
            if !new_state.has_binding() && binding.is_some() {
                found.push((Invariant::Bindings, format!("{new_state} with a binding")));
            }
            // A binding kept from the version before; unknown after a gap, in which a switch
            // may have been lost.
            let kept = matches!(new_state, SessionState::Volatile | SessionState::Degraded)
                && prev.has_binding()
                && !track.after_gap;
            if let (true, Some(Some(before)), Some(after)) = (kept, track.binding, binding) {
                if before != after {
                    found.push((
                        Invariant::Bindings,
                        format!("{new_state} changed binding {before} to {after} without a switch"),
                    ));
                }
            }
        }

        track.next = v.saturating_add(1);
        track.state = Some(new_state);
        track.epoch = e.epoch;
        track.binding = e.transport_id;
        track.after_gap = false;
        if track.max_accepted.is_none_or(|(m, _)| v > m) {
            track.max_accepted = Some((v, loc));
        }
        let deferred: Vec<Deferred> = {
            let (now, later): (Vec<_>, Vec<_>) =
                track.deferred.iter().partition(|d| d.version == v);
            track.deferred = later;
            now
        };
        // A change after the end is reported above; recording it as a second termination too
        // would report the same line twice.
        let ended_before = found
            .iter()
            .any(|(invariant, _)| *invariant == Invariant::Termination);
        for (invariant, message) in found {
            self.report(loc, Some(session), Some(v), invariant, message);
        }
        if new_state == SessionState::Terminated && !ended_before {
            self.terminated(session, v, loc);
        }
        for d in deferred {
            if let DeferredKind::Transfer = d.kind {
                self.check_transfer(session, d.version, d.loc);
            }
        }
    }
}

fn first_pending(track: &Track) -> Option<u64> {
    track.pending.keys().next().copied()
}

/// The moves of SPEC §3 (a mutation that keeps the state, such as a freeze or a reattach while
/// ATTACHED, is a move to the same state).
pub fn transition_allowed(from: SessionState, to: SessionState) -> bool {
    use SessionState::*;
    match (from, to) {
        (Birth, Attached | Terminated) => true,
        (Birth, _) | (Terminated, _) | (_, Birth) => false,
        (_, Terminated | Recovering | Attached) => true,
        (Attached | Volatile, Volatile) => true,
        (Volatile | Degraded, Degraded) => true,
        _ => false,
    }
}

/// One node's stream: a name for messages (its file) and its lines.
pub struct Source<I> {
    /// Shown in violations as `name:line`.
    pub name: String,
    /// The lines, as bytes (a line that is not UTF-8 is reported as malformed).
    pub lines: I,
}

/// A stream could not be read.
#[derive(Debug)]
pub struct SourceError<E> {
    /// The stream's name.
    pub name: String,
    /// The underlying error.
    pub error: E,
}

/// Merges the streams by `ts_ms` and checks them, handing each violation to `sink` as soon as
/// it is known. Malformed lines are violations; checking continues past them.
pub fn verify<I, E>(
    sources: Vec<Source<I>>,
    mut sink: impl FnMut(&Violation),
) -> Result<Summary, SourceError<E>>
where
    I: Iterator<Item = Result<Vec<u8>, E>>,
{
    let mut checker = Checker::new();
    merge(&mut checker, sources, |checker, event, file, line| {
        checker.feed(event, file, line);
        checker.drain_violations().for_each(|v| sink(&v));
    })?;
    let summary = checker.finish();
    checker.drain_violations().for_each(|v| sink(&v));
    Ok(summary)
}

/// The k-way merge by `(ts_ms, stream, line)`: holds one parsed event per stream.
pub fn merge<I, E>(
    checker: &mut Checker,
    sources: Vec<Source<I>>,
    mut on_event: impl FnMut(&mut Checker, Event, u32, u64),
) -> Result<(), SourceError<E>>
where
    I: Iterator<Item = Result<Vec<u8>, E>>,
{
    struct Stream<I> {
        name: String,
        lines: I,
        line_no: u64,
        file: u32,
    }
    let mut streams: Vec<Stream<I>> = sources
        .into_iter()
        .map(|s| Stream {
            file: checker.add_source(s.name.clone()),
            name: s.name,
            lines: s.lines,
            line_no: 0,
        })
        .collect();
    let mut heads: Vec<Option<Event>> = vec![None; streams.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();

    // Advances stream `i` to its next well-formed event.
    let advance = |checker: &mut Checker,
                   stream: &mut Stream<I>|
     -> Result<Option<(Event, u64)>, SourceError<E>> {
        loop {
            let Some(line) = stream.lines.next() else {
                return Ok(None);
            };
            stream.line_no += 1;
            let line = line.map_err(|error| SourceError {
                name: stream.name.clone(),
                error,
            })?;
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match checker.parse(text) {
                Ok(event) => return Ok(Some((event, stream.line_no))),
                Err(why) => checker.malformed(stream.file, stream.line_no, why),
            }
        }
    };
    for (i, stream) in streams.iter_mut().enumerate() {
        if let Some((event, line)) = advance(checker, stream)? {
            heap.push(Reverse((event.ts_ms, i, line)));
            if let Some(slot) = heads.get_mut(i) {
                *slot = Some(event);
            }
        }
    }
    while let Some(Reverse((_, i, line))) = heap.pop() {
        let (Some(stream), Some(slot)) = (streams.get_mut(i), heads.get_mut(i)) else {
            continue;
        };
        let Some(event) = slot.take() else { continue };
        let file = stream.file;
        on_event(checker, event, file, line);
        if let Some((next, next_line)) = advance(checker, stream)? {
            heap.push(Reverse((next.ts_ms, i, next_line)));
            *slot = Some(next);
        }
    }
    Ok(())
}

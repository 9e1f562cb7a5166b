//! The session record (SPEC §2): the authoritative state of one session, as stored.
//!
//! Per-packet data (counters, replay bitmaps) never lives here: it would turn every packet into
//! a store write.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, OwnerEpoch, SessionId, StateVersion, Timestamp, TransportId};
use crate::policy::Policy;
use crate::reason::ReasonCode;

/// The states of SPEC §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionState {
    /// Handshake in progress; never stored.
    Birth,
    /// One healthy binding.
    Attached,
    /// Bound, but health crossed a threshold.
    Volatile,
    /// Bound, volatile for longer than the policy allows.
    Degraded,
    /// No binding; waiting for the client to reattach.
    Recovering,
    /// Final.
    Terminated,
}

impl SessionState {
    /// Every state, in declaration order.
    pub const ALL: [SessionState; 6] = [
        SessionState::Birth,
        SessionState::Attached,
        SessionState::Volatile,
        SessionState::Degraded,
        SessionState::Recovering,
        SessionState::Terminated,
    ];

    /// The audit string (`"ATTACHED"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionState::Birth => "BIRTH",
            SessionState::Attached => "ATTACHED",
            SessionState::Volatile => "VOLATILE",
            SessionState::Degraded => "DEGRADED",
            SessionState::Recovering => "RECOVERING",
            SessionState::Terminated => "TERMINATED",
        }
    }

    /// Parses the audit string.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether a state of this kind holds exactly one binding (SPEC §3: ATTACHED, VOLATILE and
    /// DEGRADED do; BIRTH, RECOVERING and TERMINATED do not).
    pub const fn has_binding(self) -> bool {
        matches!(
            self,
            SessionState::Attached | SessionState::Volatile | SessionState::Degraded
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol of a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// UDP datagrams.
    Udp,
    /// A TCP stream (the fallback when UDP is blocked).
    Tcp,
}

impl Proto {
    /// `"udp"` or `"tcp"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The single active transport of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Server-assigned transport identifier.
    pub transport_id: TransportId,
    /// UDP or TCP.
    pub proto: Proto,
    /// The client's address as the gateway sees it.
    pub client_addr: SocketAddr,
    /// The gateway address the client reached.
    pub gateway_addr: SocketAddr,
    /// The record version that made this binding.
    pub bound_at_version: StateVersion,
}

/// A transport as proposed by a handshake or a reattach: a binding before it has a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Server-assigned transport identifier.
    pub transport_id: TransportId,
    /// UDP or TCP.
    pub proto: Proto,
    /// The client's address as the gateway sees it.
    pub client_addr: SocketAddr,
    /// The gateway address the client reached.
    pub gateway_addr: SocketAddr,
}

impl Candidate {
    /// The binding this candidate becomes when committed at `version`.
    pub const fn bind_at(self, version: StateVersion) -> Binding {
        Binding {
            transport_id: self.transport_id,
            proto: self.proto,
            client_addr: self.client_addr,
            gateway_addr: self.gateway_addr,
            bound_at_version: version,
        }
    }
}

/// The session master secret, sealed (AEAD) under the gateway's key-encryption key. Opaque to
/// the core; its `Debug` shows only its length. Immutable, so shared between record versions.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret(pub Arc<[u8]>);

impl SealedSecret {
    /// Wraps sealed bytes.
    pub fn new(sealed: impl Into<Arc<[u8]>>) -> Self {
        Self(sealed.into())
    }
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedSecret(<{} bytes>)", self.0.len())
    }
}

/// The times a record keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamps {
    /// When the session was born.
    pub created: Timestamp,
    /// The last accepted change of `state`.
    pub state_changed: Timestamp,
    /// When the session last lost its binding, while it has none.
    pub transport_lost: Option<Timestamp>,
    /// When the session entered RECOVERING, while it is there.
    pub recovering_since: Option<Timestamp>,
    /// The last accepted switch of transport.
    pub last_switch: Option<Timestamp>,
}

/// The anti-flap memory: the times of the most recent accepted switches, at most
/// `max_switches_per_min` of them (so the record's size is bounded by the policy). Rebuilt on
/// each switch and shared otherwise, so other transitions copy no list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchHistory {
    recent: Arc<[Timestamp]>,
    total: u64,
}

impl SwitchHistory {
    /// Accepted switches within the 60 s that end at `now`.
    pub fn in_last_minute(&self, now: Timestamp) -> u32 {
        let n = self
            .recent
            .iter()
            .filter(|t| now.since(**t) < 60_000)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Switches over the whole life of the session.
    pub const fn total(&self) -> u64 {
        self.total
    }

    /// Records a switch at `now`, keeping at most `cap` recent times.
    ///
    /// Times are appended in order, so the ones still inside the minute form a suffix; should
    /// the clock step back, an older time may be kept longer, which only makes the bound
    /// stricter. One allocation: the new list is built at its final size.
    pub(crate) fn record(&mut self, now: Timestamp, cap: u32) {
        let cap = usize::try_from(cap.max(1)).unwrap_or(usize::MAX);
        let live = self
            .recent
            .iter()
            .position(|t| now.since(*t) < 60_000)
            .unwrap_or(self.recent.len());
        let keep_from = live.max(self.recent.len().saturating_sub(cap - 1));
        let kept = self.recent.get(keep_from..).unwrap_or_default();
        self.recent = kept.iter().copied().chain(std::iter::once(now)).collect();
        self.total = self.total.saturating_add(1);
    }
}

/// Why and when a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    /// The primary cause.
    pub reason: ReasonCode,
    /// When.
    pub at: Timestamp,
}

/// The authoritative record of one session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Never changes.
    pub session_id: SessionId,
    /// Current state.
    pub state: SessionState,
    /// +1 on every accepted mutation.
    pub state_version: StateVersion,
    /// The authoritative owner node.
    pub owner: NodeId,
    /// +1 on every ownership change.
    pub owner_epoch: OwnerEpoch,
    /// Set during a controlled migration: no new binding while set.
    pub frozen: bool,
    /// The single active transport, if any.
    pub binding: Option<Binding>,
    /// The version at which the most recent binding was made; kept while no binding is active,
    /// so a client that missed a later reattach is told `STALE_VERSION`.
    pub last_bound_version: StateVersion,
    /// The transport of the most recent binding, kept while none is active.
    pub last_transport_id: Option<TransportId>,
    /// The client's static public key.
    pub client_key: [u8; 32],
    /// The client's address inside the tunnel.
    pub tunnel_ip: IpAddr,
    /// The policy in force for this session: a snapshot, immutable, so shared between versions.
    pub policy: Arc<Policy>,
    /// Times of the session's life.
    pub timestamps: Timestamps,
    /// Anti-flap memory.
    pub switches: SwitchHistory,
    /// Highest accepted control-plane nonce.
    pub last_nonce: u64,
    /// The sealed master secret.
    pub secrets: SealedSecret,
    /// Set once TERMINATED.
    pub termination: Option<Termination>,
}

/// What a new session starts from: everything the handshake establishes.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// Fresh random ID.
    pub session_id: SessionId,
    /// The node that performs the handshake: the first owner.
    pub owner: NodeId,
    /// The client's static public key.
    pub client_key: [u8; 32],
    /// The client's tunnel address.
    pub tunnel_ip: IpAddr,
    /// Policy snapshot for the session, shared with every session born under the same policy.
    pub policy: Arc<Policy>,
    /// The sealed master secret.
    pub secrets: SealedSecret,
}

impl SessionRecord {
    /// A record in BIRTH (version 0, never stored), owned by the node doing the handshake. The
    /// handshake's commit (`SessionEvent::HandshakeOk`) makes version 1 with epoch 1.
    pub fn birth(new: NewSession, now: Timestamp) -> Self {
        Self {
            session_id: new.session_id,
            state: SessionState::Birth,
            state_version: StateVersion(0),
            owner: new.owner,
            owner_epoch: OwnerEpoch(0),
            frozen: false,
            binding: None,
            last_bound_version: StateVersion(0),
            last_transport_id: None,
            client_key: new.client_key,
            tunnel_ip: new.tunnel_ip,
            policy: new.policy,
            timestamps: Timestamps {
                created: now,
                state_changed: now,
                ..Timestamps::default()
            },
            switches: SwitchHistory::default(),
            last_nonce: 0,
            secrets: new.secrets,
            termination: None,
        }
    }

    /// Whether the session has ended.
    pub const fn is_terminated(&self) -> bool {
        matches!(self.state, SessionState::Terminated)
    }

    /// When the session's identity lifetime ends.
    pub fn expires_at(&self) -> Timestamp {
        self.timestamps.created.plus(self.policy.session_ttl_ms)
    }
}

//! The gateway endpoint: handshakes, reattach validation, the data plane, timers.
//!
//! Every mutation of a session goes through [`machine::apply`] and then out as a store request
//! (create, or compare-and-swap from the version it was computed on); the cached record, the
//! traffic keys and the audit events change only when the store says the write happened. While
//! one write of a session is in flight, other mutations of it wait for the next packet or timer.
//!
//! Reattach validation follows SPEC §4: malformed packets are dropped silently (step 1), rate
//! limits (2), the session is found in the cache or read from the store (3), then the state
//! machine checks expiry, ownership, freeze, proof, nonce, version and policy (4–9), then the
//! CAS (10). Only after the CAS does the gateway send `REATTACH_ACK` on the new path.
//!
//! A handshake is answered at once but creates nothing until the client confirms it: the new
//! session stays provisional (in memory only) until the first packet authenticated under its
//! keys arrives, and only then is it written and does it supersede the client's previous
//! session. A replayed `HANDSHAKE_INIT` that passes the timestamp check (the last accepted
//! timestamp is lost with a restart) therefore creates nothing and ends nothing: its sender
//! cannot confirm (SPEC §5).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::audit::{AuditEvent, EventKind};
use crate::crypto::{DirectionalKeys, Kek, MasterSecret};
use crate::endpoint::{
    ip_destination, ip_source, next_control_counter, open_sealed, open_sealed_into, seal_control,
    seal_data, Path, Transmit,
};
use crate::handshake::{Entropy, Responder};
use crate::health::{HealthMonitor, HealthSample, HealthSignal};
use crate::ids::{NodeId, OwnerEpoch, SessionId, StateVersion, Timestamp, TransportId};
use crate::machine::{
    self, apply, next_deadline, Context, Outcome, ProofVerdict, ReattachAttempt, Refusal,
    SessionEvent,
};
use crate::policy::Policy;
use crate::reason::{ReasonCode, ViolationType};
use crate::record::{Candidate, NewSession, SessionRecord};
use crate::replay::{ReplayWindow, Verdict};
use crate::wire::{Control, HandshakeAckPayload, Packet, ReattachRequest, DATA_OVERHEAD};

/// How often the gateway scans its sessions for dead bindings and passed deadlines.
const TICK_MS: u64 = 100;
/// At most one `REATTACH_HINT` per binding of a session in this many ms.
const HINT_INTERVAL_MS: u64 = 100;
/// Reattach requests per session: at most this many per second (SPEC §4 step 2).
const REATTACH_PER_SECOND: u32 = 20;
/// Store reads caused by packets of sessions not in the cache: at most this many per second
/// for the whole gateway (such packets cannot be authenticated before the read).
const LOADS_PER_SECOND: u32 = 200;
/// Control-plane replay window (packets).
const CONTROL_WINDOW: u64 = ReplayWindow::MIN_SIZE;
/// A handshake not confirmed by the client within this many ms is forgotten.
const CONFIRM_MS: u64 = 15_000;
/// After the store failed to write a confirmed handshake, the next try waits this long.
const CONFIRM_RETRY_MS: u64 = 500;
/// A replay window that has accepted nothing for this long is compacted: its bitmap is freed
/// and nothing at or below its highest counter is accepted any more. Far longer than any
/// reordering, so only packets no one waits for are lost.
const COMPACT_AFTER_MS: u64 = 5_000;

/// An authorised client (SPEC §9 `[[peer]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its static public key.
    pub public_key: [u8; 32],
    /// Its address inside the tunnel.
    pub tunnel_ip: IpAddr,
}

/// What a gateway endpoint is made of.
pub struct GatewayConfig {
    /// This node.
    pub node: NodeId,
    /// The gateway's static private key (shared by a cluster).
    pub private_key: Zeroizing<[u8; 32]>,
    /// The policy new sessions get.
    pub policy: Policy,
    /// Authorised clients.
    pub peers: Vec<Peer>,
    /// Seed of the endpoint's generator (session IDs, Noise ephemeral keys).
    pub seed: [u8; 32],
}

/// A request to the session store. The driver performs it and reports the outcome with
/// [`Gateway::handle_store`] and the same `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRequest {
    /// Names the request in [`Gateway::handle_store`].
    pub id: u64,
    /// What to do.
    pub op: StoreOp,
}

/// A store operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Create the record (version 1); fails if the session exists.
    Create(SessionRecord),
    /// Write `record` if the stored version is `expected`.
    CompareAndSwap {
        /// The version the new record was computed from.
        expected: StateVersion,
        /// The whole new record.
        record: SessionRecord,
    },
    /// Read a record.
    Get(SessionId),
}

/// How a store request went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A create or compare-and-swap happened.
    Written,
    /// A read's answer.
    Read(Option<Box<SessionRecord>>),
    /// It did not happen, or it is not known whether it did.
    Failed(StoreFailure),
}

/// Why a store request failed (the store crate's errors, as the core sees them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFailure {
    /// The stored version was not the expected one (someone else wrote first).
    Conflict,
    /// A create found the session already there.
    AlreadyExists,
    /// The store could not be reached: nothing happened.
    Unavailable,
    /// The write may or may not have happened, and re-reading could not tell.
    CommitUnknown,
    /// Anything else (corrupt data, a bad request): nothing happened.
    Other,
}

/// An output of the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum GatewayOutput {
    /// Send bytes on a path.
    Transmit(Transmit),
    /// Write an IP packet to the TUN device.
    Tun(Vec<u8>),
    /// Perform a store request.
    Store(Box<StoreRequest>),
    /// Append an audit event.
    Audit(AuditEvent),
    /// Close a TCP connection (its session moved on, or it sent garbage framing).
    Close(Path),
}

/// Counters of what the gateway dropped and did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Handshakes that created a session.
    pub handshakes: u64,
    /// Handshake inits refused (unknown key, stale timestamp, undecryptable, store failure).
    pub handshakes_rejected: u64,
    /// Handshakes answered but never confirmed by the client (replayed inits among them).
    pub unconfirmed: u64,
    /// Inits refused by their `mac1`, before any Diffie-Hellman (corrupted, random, or made
    /// for another gateway key).
    pub init_mac_failed: u64,
    /// Reattaches accepted.
    pub reattach_accepted: u64,
    /// Reattaches refused.
    pub reattach_rejected: u64,
    /// Packets that did not decode.
    pub malformed: u64,
    /// Packets that did not authenticate.
    pub auth_failed: u64,
    /// Packets refused by a replay window.
    pub replayed: u64,
    /// Data packets from clients delivered to the TUN device.
    pub data_in: u64,
    /// Data packets sent to clients.
    pub data_out: u64,
    /// TUN packets with no session to carry them.
    pub tun_dropped: u64,
    /// `REATTACH_HINT`s sent.
    pub hints: u64,
    /// Store requests that failed.
    pub store_failures: u64,
}

/// The gateway endpoint.
pub struct Gateway {
    node: NodeId,
    /// Opens handshake inits: the static key and what is precomputed from it.
    responder: Responder,
    kek: Kek,
    /// The policy of new sessions: one snapshot that all of them share.
    policy: Arc<Policy>,
    peers: HashMap<[u8; 32], PeerState>,
    /// Boxed: a map keeps up to half of its slots empty, and a slot is the size of its value.
    sessions: HashMap<SessionId, Box<Live>>,
    provisional: HashMap<SessionId, Provisional>,
    by_ip: HashMap<IpAddr, SessionId>,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    entropy: Entropy,
    out: VecDeque<GatewayOutput>,
    last_transport_id: u64,
    next_tick: Option<Timestamp>,
    loads: RateWindow,
    stats: GatewayStats,
}

struct PeerState {
    tunnel_ip: IpAddr,
    /// The last accepted init timestamp (SPEC §5: a replayed init creates nothing).
    last_init: Option<u64>,
    /// The client's live session.
    session: Option<SessionId>,
    /// The client's answered, unconfirmed handshake (at most one: a newer init replaces it).
    provisional: Option<SessionId>,
}

/// A handshake answered but not confirmed: nothing written, nothing superseded yet.
struct Provisional {
    client_key: [u8; 32],
    master: MasterSecret,
    control: DirectionalKeys,
    /// The version-1 record the confirmation commits, with its audit events.
    record: SessionRecord,
    events: Vec<AuditEvent>,
    expires: Timestamp,
    /// After a failed write, confirmations before this time are not tried again (they would
    /// hammer a store that is down: a client may send many packets a second).
    retry_at: Timestamp,
}

/// A session this gateway holds: the committed record and what is derived from it. The master
/// secret is not kept: the record holds it sealed, and a reattach (proof, new binding keys)
/// opens it.
struct Live {
    record: SessionRecord,
    control: DirectionalKeys,
    control_tx: u64,
    control_rx: ReplayWindow,
    /// Client control counters at or below this are refused (after a reload, the highest
    /// accepted reattach nonce: the client draws both from one sequence).
    control_floor: u64,
    data: Option<DataPlane>,
    last_rx: Timestamp,
    health: HealthMonitor,
    busy: bool,
    last_hint: Option<Timestamp>,
    reattaches: RateWindow,
}

/// The traffic state of the current binding.
struct DataPlane {
    bound_at: StateVersion,
    path: Path,
    keys: DirectionalKeys,
    rx: ReplayWindow,
    tx: u64,
    /// When `rx` last accepted a counter (meaningless while it has accepted none).
    last_accepted: Timestamp,
    /// Keys recomputed after a reload: counters are unknown, so nothing is sent or forwarded
    /// under them; an authentic packet only earns the client a `REATTACH_HINT`.
    resumed: bool,
}

enum Pending {
    /// A confirmed handshake being written; back to provisional if the write fails.
    Create {
        session: SessionId,
        handshake: Provisional,
        /// The confirming packet, handled again once the session exists.
        path: Path,
        packet: Vec<u8>,
    },
    Mutate {
        session: SessionId,
        record: SessionRecord,
        events: Vec<AuditEvent>,
        refusal: Option<Refusal>,
        then: Then,
    },
    Load {
        session: SessionId,
        then: AfterLoad,
    },
}

/// What to do once a mutation committed.
enum Then {
    Nothing,
    /// Answer a reattach on its path.
    AckReattach {
        path: Path,
    },
}

/// What a read was for.
enum AfterLoad {
    Reattach {
        request: ReattachRequest,
        path: Path,
    },
    Cache,
}

/// A fixed one-second window counter.
#[derive(Clone, Copy, Default)]
struct RateWindow {
    start: Timestamp,
    count: u32,
}

impl RateWindow {
    fn allow(&mut self, now: Timestamp, per_second: u32) -> bool {
        if now.since(self.start) >= 1000 {
            self.start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= per_second
    }
}

impl Gateway {
    /// A gateway with no sessions (a restarted gateway reads them from the store on demand).
    pub fn new(config: GatewayConfig) -> Self {
        let kek = Kek::derive(&config.private_key);
        let peers = config
            .peers
            .iter()
            .map(|p| {
                let state = PeerState {
                    tunnel_ip: p.tunnel_ip,
                    last_init: None,
                    session: None,
                    provisional: None,
                };
                (p.public_key, state)
            })
            .collect();
        Self {
            node: config.node,
            responder: Responder::new(
                &config.private_key,
                config.peers.iter().map(|p| &p.public_key),
            ),
            kek,
            policy: Arc::new(config.policy),
            peers,
            sessions: HashMap::new(),
            provisional: HashMap::new(),
            by_ip: HashMap::new(),
            pending: HashMap::new(),
            next_request: 0,
            entropy: Entropy::from_seed(config.seed),
            out: VecDeque::new(),
            last_transport_id: 0,
            next_tick: None,
            loads: RateWindow::default(),
            stats: GatewayStats::default(),
        }
    }

    // ---- getters ----

    /// This node.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Counters.
    pub fn stats(&self) -> GatewayStats {
        self.stats
    }

    /// The cached record of a session.
    pub fn session(&self, id: SessionId) -> Option<&SessionRecord> {
        self.sessions.get(&id).map(|l| &l.record)
    }

    /// Every cached record.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionRecord> {
        self.sessions.values().map(|l| &l.record)
    }

    /// Sessions held, for the active-sessions gauge.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    // ---- outputs ----

    /// The next output, in the order produced.
    pub fn poll_output(&mut self) -> Option<GatewayOutput> {
        self.out.pop_front()
    }

    /// When to call [`Gateway::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_tick
    }

    // ---- inputs ----

    /// A datagram (UDP) or frame (TCP) arrived on `path`.
    pub fn handle_packet(&mut self, now: Timestamp, path: Path, bytes: &[u8]) {
        let mut plain = Vec::new();
        if self.handle_packet_into(now, path, bytes, &mut plain) {
            self.out.push_back(GatewayOutput::Tun(plain));
        }
    }

    /// As [`Gateway::handle_packet`], except that the IP packet a `DATA` packet carries is not
    /// queued as [`GatewayOutput::Tun`] but appended to `tun`, and `true` returned; the driver
    /// then writes it (and others of the same batch) to the TUN device from its own buffer,
    /// with no allocation per packet. Every other output is queued as usual.
    pub fn handle_packet_into(
        &mut self,
        now: Timestamp,
        path: Path,
        bytes: &[u8],
        tun: &mut Vec<u8>,
    ) -> bool {
        self.arm(now);
        let packet = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return false;
            }
        };
        match packet {
            Packet::HandshakeInit { noise, .. } => self.on_init(now, path, bytes, noise),
            Packet::Reattach(request) => self.on_reattach(now, path, request),
            Packet::Control {
                session,
                counter,
                sealed,
            } => self.on_control(now, path, bytes, session, counter, sealed),
            Packet::Data {
                session,
                bound_at_version,
                counter,
                sealed,
            } => {
                let start = tun.len();
                let delivered = self.on_data(
                    now,
                    path,
                    bytes,
                    session,
                    bound_at_version,
                    counter,
                    sealed,
                    tun,
                );
                if !delivered {
                    tun.truncate(start);
                }
                return delivered;
            }
            // Gateways send these, they never receive them.
            Packet::HandshakeAck { .. } | Packet::RejectNotice { .. } => {
                self.stats.malformed += 1;
            }
        }
        false
    }

    /// An IP packet read from the TUN device.
    pub fn handle_tun(&mut self, now: Timestamp, packet: &[u8]) {
        let mut bytes = Vec::with_capacity(packet.len() + DATA_OVERHEAD);
        if let Some(path) = self.handle_tun_into(now, packet, &mut bytes) {
            self.out
                .push_back(GatewayOutput::Transmit(Transmit { path, bytes }));
        }
    }

    /// As [`Gateway::handle_tun`], except that the sealed packet is not queued as a
    /// [`GatewayOutput::Transmit`] but appended to `out` (exactly
    /// [`DATA_OVERHEAD`](crate::wire::DATA_OVERHEAD) bytes longer than `packet`), and the path to
    /// send it on returned; `None` when the packet is dropped (counted). The driver can so seal
    /// a batch of packets into one buffer and send it with one system call.
    pub fn handle_tun_into(
        &mut self,
        _now: Timestamp,
        packet: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Path> {
        let Some(id) = ip_destination(packet).and_then(|ip| self.by_ip.get(&ip).copied()) else {
            self.stats.tun_dropped += 1;
            return None;
        };
        let Some(live) = self.sessions.get_mut(&id) else {
            self.stats.tun_dropped += 1;
            return None;
        };
        let Some(data) = live.data.as_mut().filter(|d| !d.resumed) else {
            self.stats.tun_dropped += 1;
            return None;
        };
        if !live.record.state.has_binding() || live.record.is_terminated() {
            self.stats.tun_dropped += 1;
            return None;
        }
        let counter = data.tx;
        data.tx = data.tx.saturating_add(1);
        if counter == u64::MAX {
            // Never reuse a nonce: the binding must be replaced first.
            self.stats.tun_dropped += 1;
            return None;
        }
        seal_data(
            id,
            data.bound_at,
            &data.keys.to_client,
            counter,
            packet,
            out,
        );
        self.stats.data_out += 1;
        Some(data.path)
    }

    /// A TCP connection closed (or failed).
    pub fn handle_closed(&mut self, now: Timestamp, path: Path) {
        let dead: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, l)| l.data.as_ref().is_some_and(|d| d.path == path))
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.mutate(now, id, SessionEvent::TransportDead, Then::Nothing);
        }
    }

    /// The outcome of the store request `id`.
    pub fn handle_store(&mut self, now: Timestamp, id: u64, outcome: StoreOutcome) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        if matches!(outcome, StoreOutcome::Failed(_)) {
            self.stats.store_failures += 1;
        }
        match pending {
            Pending::Create {
                session,
                handshake,
                path,
                packet,
            } => self.created(now, session, handshake, path, &packet, outcome),
            Pending::Mutate {
                session,
                record,
                events,
                refusal,
                then,
            } => self.mutated(now, session, record, events, refusal, then, outcome),
            Pending::Load { session, then } => self.loaded(now, session, then, outcome),
        }
    }

    /// A restarted gateway takes back the live sessions the store says it owns, so that their
    /// timers run and a new handshake from their client supersedes them. Records of other
    /// owners, terminated ones and ones already held are skipped; returns whether `record`
    /// was taken.
    pub fn restore(&mut self, now: Timestamp, record: SessionRecord) -> bool {
        if record.owner != self.node
            || record.is_terminated()
            || self.sessions.contains_key(&record.session_id)
        {
            return false;
        }
        self.arm(now);
        self.adopt(now, record)
    }

    /// A timer fired: dead bindings, passed deadlines.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.next_tick.is_some_and(|t| t > now) {
            return;
        }
        self.next_tick = Some(now.plus(TICK_MS));
        self.expire_provisional(now);
        let mut due = Vec::new();
        for (id, live) in &mut self.sessions {
            live.compact_idle_windows(now);
            if live.busy {
                continue;
            }
            let record = &live.record;
            if next_deadline(record).is_some_and(|d| d <= now) {
                due.push((*id, SessionEvent::Timeout));
            } else if record.state.has_binding()
                && now.since(live.last_rx) >= record.policy.server_dead_after_ms
            {
                due.push((*id, SessionEvent::TransportDead));
            }
        }
        // Session IDs are random: sort so that the outputs do not depend on the map's order.
        due.sort_unstable_by_key(|(id, _)| *id);
        for (id, event) in due {
            self.mutate(now, id, event, Then::Nothing);
        }
    }

    /// Ends a session (operator or policy). Returns false when the session is not held here
    /// or a write of it is in flight.
    pub fn terminate(&mut self, now: Timestamp, id: SessionId, reason: ReasonCode) -> bool {
        let Some(live) = self.sessions.get(&id) else {
            return false;
        };
        if live.busy {
            return false;
        }
        self.mutate(now, id, SessionEvent::Terminate { reason }, Then::Nothing);
        true
    }

    // ---- handshake ----

    fn on_init(&mut self, now: Timestamp, path: Path, packet: &[u8], noise: &[u8]) {
        if !self.responder.mac1_valid(packet) {
            // Not made for this gateway's public key: refused before any Diffie-Hellman.
            self.stats.handshakes_rejected += 1;
            self.stats.init_mac_failed += 1;
            return;
        }
        let seed = self.entropy.seed();
        let Ok(init) = self.responder.open(noise, seed) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(&init.client_key) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        if peer.last_init.is_some_and(|last| init.timestamp <= last) {
            // Authentic but not fresh: a replay, or a client whose clock went back.
            self.stats.handshakes_rejected += 1;
            let old = peer.session;
            if let Some(live) = old.and_then(|id| self.sessions.get(&id)) {
                let ctx = Context {
                    now,
                    node: &self.node,
                };
                let refusal = Refusal {
                    reason: ReasonCode::ReplayDetected,
                    retryable: false,
                };
                let kind = EventKind::SecurityEvent {
                    violation_type: ViolationType::ReplayAttempt,
                };
                let events = machine::refuse(&live.record, &ctx, refusal, kind).events;
                self.out
                    .extend(events.into_iter().map(GatewayOutput::Audit));
            }
            return;
        }
        peer.last_init = Some(init.timestamp);
        let tunnel_ip = peer.tunnel_ip;

        let session = SessionId::from_u128(self.entropy.next_u128());
        let transport_id = self.next_transport_id(now);
        let ack = HandshakeAckPayload {
            session,
            state_version: StateVersion(1),
            owner_epoch: OwnerEpoch(1),
            tunnel_ip,
            transport_id,
            keepalive_interval_ms: clamp_u32(self.policy.keepalive_interval_ms),
            client_dead_after_ms: clamp_u32(self.policy.client_dead_after_ms),
            session_ttl_ms: self.policy.session_ttl_ms,
        };
        let client_key = init.client_key;
        let mut reply = Vec::with_capacity(128);
        let Ok(master) = init.accept(&ack, &mut reply) else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let birth = SessionRecord::birth(
            NewSession {
                session_id: session,
                owner: self.node.clone(),
                client_key,
                tunnel_ip,
                policy: self.policy.clone(),
                secrets: self.kek.seal(session, &master),
            },
            now,
        );
        let candidate = Candidate {
            transport_id,
            proto: path.proto,
            client_addr: path.remote,
            gateway_addr: path.local,
        };
        let ctx = Context {
            now,
            node: &self.node,
        };
        let Outcome::Commit(commit) = apply(&birth, &SessionEvent::HandshakeOk { candidate }, &ctx)
        else {
            self.stats.handshakes_rejected += 1;
            return;
        };
        let stale = self
            .peers
            .get_mut(&client_key)
            .and_then(|peer| peer.provisional.replace(session));
        if let Some(stale) = stale {
            self.provisional.remove(&stale);
        }
        let provisional = Provisional {
            client_key,
            control: master.control_keys(session),
            master,
            record: commit.record,
            events: commit.events,
            expires: now.plus(CONFIRM_MS),
            retry_at: now,
        };
        self.provisional.insert(session, provisional);
        self.out
            .push_back(GatewayOutput::Transmit(Transmit { path, bytes: reply }));
    }

    /// A packet of the provisional `session` authenticated: the client holds the keys, so the
    /// handshake was not a replay. Supersede its previous session and write the new one; the
    /// packet is handled again once the write is done.
    fn confirm(&mut self, now: Timestamp, path: Path, packet: &[u8], session: SessionId) {
        if self
            .provisional
            .get(&session)
            .is_some_and(|p| now < p.retry_at)
        {
            return;
        }
        let Some(p) = self.take_provisional(session) else {
            return;
        };
        let superseded = self
            .peers
            .get(&p.client_key)
            .and_then(|peer| peer.session)
            .filter(|old| {
                // Already ended (e.g. by an earlier attempt of this confirmation): nothing to do.
                self.sessions
                    .get(old)
                    .is_some_and(|live| !live.record.is_terminated())
            });
        if let Some(old) = superseded {
            self.mutate(
                now,
                old,
                SessionEvent::Terminate {
                    reason: ReasonCode::SessionSuperseded,
                },
                Then::Nothing,
            );
        }
        let id = self.request(StoreOp::Create(p.record.clone()));
        self.pending.insert(
            id,
            Pending::Create {
                session,
                handshake: p,
                path,
                packet: packet.to_vec(),
            },
        );
    }

    fn expire_provisional(&mut self, now: Timestamp) {
        let expired: Vec<SessionId> = self
            .provisional
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if self.take_provisional(id).is_some() {
                self.stats.unconfirmed += 1;
            }
        }
    }

    /// Removes the provisional handshake `session`, and its peer's reference to it.
    fn take_provisional(&mut self, session: SessionId) -> Option<Provisional> {
        let p = self.provisional.remove(&session)?;
        if let Some(peer) = self.peers.get_mut(&p.client_key) {
            if peer.provisional == Some(session) {
                peer.provisional = None;
            }
        }
        Some(p)
    }

    fn created(
        &mut self,
        now: Timestamp,
        session: SessionId,
        mut handshake: Provisional,
        path: Path,
        packet: &[u8],
        outcome: StoreOutcome,
    ) {
        // A create whose commit was unknown may have happened: the ID is ours alone (random,
        // 128 bits), so finding it taken means it did.
        let written = matches!(
            outcome,
            StoreOutcome::Written | StoreOutcome::Failed(StoreFailure::AlreadyExists)
        );
        if !written {
            // Not written: the handshake stays provisional, and the client's next packet
            // (a keepalive within a second) tries again, so a store outage costs no new
            // handshake.
            self.stats.handshakes_rejected += 1;
            if let Some(peer) = self.peers.get_mut(&handshake.client_key) {
                if peer.provisional.is_none() {
                    peer.provisional = Some(session);
                    handshake.expires = now.plus(CONFIRM_MS);
                    handshake.retry_at = now.plus(CONFIRM_RETRY_MS);
                    self.provisional.insert(session, handshake);
                }
            }
            return;
        }
        let Provisional {
            client_key,
            master,
            record,
            events,
            ..
        } = handshake;
        self.stats.handshakes += 1;
        for event in events {
            self.out.push_back(GatewayOutput::Audit(event));
        }
        if let Some(peer) = self.peers.get_mut(&client_key) {
            peer.session = Some(session);
        }
        self.by_ip.insert(record.tunnel_ip, session);
        let live = Live::new(record, master, now);
        self.sessions.insert(session, live);
        self.handle_packet(now, path, packet);
    }

    // ---- reattach ----

    fn on_reattach(&mut self, now: Timestamp, path: Path, request: ReattachRequest) {
        let Some(live) = self.sessions.get_mut(&request.session) else {
            if self.loads.allow(now, LOADS_PER_SECOND) {
                self.load(request.session, AfterLoad::Reattach { request, path });
            } else {
                self.notice(path, request.session, ReasonCode::RateLimited);
            }
            return;
        };
        if !live.reattaches.allow(now, REATTACH_PER_SECOND) {
            self.stats.reattach_rejected += 1;
            let rejection = machine::refuse(
                &live.record,
                &Context {
                    now,
                    node: &self.node,
                },
                Refusal {
                    reason: ReasonCode::RateLimited,
                    retryable: true,
                },
                EventKind::ReattachRejected { retryable: true },
            );
            self.emit(rejection.events);
            self.reject(now, path, request.session, rejection.refusal);
            return;
        }
        if live.busy {
            // A write of this session is in flight; the client retries.
            return;
        }
        let attempt = ReattachAttempt {
            nonce: request.nonce,
            known_version: request.known_version,
            candidate: Candidate {
                transport_id: TransportId(0),
                proto: path.proto,
                client_addr: path.remote,
                gateway_addr: path.local,
            },
            proof: self
                .kek
                .open(request.session, &live.record.secrets)
                .map_or(ProofVerdict::Invalid, |master| master.verify(&request)),
        };
        let mut attempt = attempt;
        attempt.candidate.transport_id = self.next_transport_id(now);
        self.mutate(
            now,
            request.session,
            SessionEvent::Reattach(attempt),
            Then::AckReattach { path },
        );
    }

    // ---- control and data ----

    fn on_control(
        &mut self,
        now: Timestamp,
        path: Path,
        bytes: &[u8],
        session: SessionId,
        counter: u64,
        sealed: &[u8],
    ) {
        let Some(live) = self.sessions.get_mut(&session) else {
            match self.provisional.get(&session) {
                Some(p) => {
                    if open_sealed(&p.control.to_gateway, bytes, counter, sealed).is_ok() {
                        self.confirm(now, path, bytes, session);
                    } else {
                        self.stats.auth_failed += 1;
                    }
                }
                None => self.load_for_cache(now, session),
            }
            return;
        };
        let Ok(body) = open_sealed(&live.control.to_gateway, bytes, counter, sealed) else {
            self.stats.auth_failed += 1;
            return;
        };
        if counter <= live.control_floor
            || live.control_rx.check_and_update(counter) != Verdict::Fresh
        {
            self.stats.replayed += 1;
            return;
        }
        let Ok(msg) = Control::decode(&body) else {
            self.stats.malformed += 1;
            return;
        };
        let on_binding = live
            .data
            .as_ref()
            .is_some_and(|d| d.path == path && !d.resumed);
        if !on_binding {
            self.hint(now, session, path);
            return;
        }
        live.last_rx = now;
        match msg {
            Control::Keepalive { sent_ms } => {
                let reply = Control::KeepaliveAck {
                    echo_ms: sent_ms,
                    state_version: live.record.state_version,
                    owner_epoch: live.record.owner_epoch,
                };
                self.send_control(now, session, path, &reply);
            }
            Control::HealthReport {
                loss_pct,
                rtt_ms,
                jitter_ms,
            } => {
                let sample = HealthSample {
                    loss_pct,
                    rtt_ms,
                    jitter_ms,
                };
                let limits = live.record.policy.volatility;
                match live.health.observe(sample, now, &limits) {
                    Some(HealthSignal::Volatile(breach)) => self.mutate(
                        now,
                        session,
                        SessionEvent::VolatilitySignal(breach),
                        Then::Nothing,
                    ),
                    Some(HealthSignal::Stable) => {
                        self.mutate(now, session, SessionEvent::StabilityRestored, Then::Nothing)
                    }
                    None => {}
                }
            }
            Control::Terminate { .. } => self.mutate(
                now,
                session,
                SessionEvent::Terminate {
                    reason: ReasonCode::PolicyTermination,
                },
                Then::Nothing,
            ),
            // Gateway-to-client messages are not accepted from a client.
            _ => self.stats.malformed += 1,
        }
    }

    /// A `DATA` packet: its IP packet is appended to `tun` and `true` returned when it is to
    /// be delivered; otherwise the caller truncates `tun` back.
    #[allow(clippy::too_many_arguments)]
    fn on_data(
        &mut self,
        now: Timestamp,
        path: Path,
        bytes: &[u8],
        session: SessionId,
        bound_at: StateVersion,
        counter: u64,
        sealed: &[u8],
        tun: &mut Vec<u8>,
    ) -> bool {
        let Some(live) = self.sessions.get_mut(&session) else {
            match self.provisional.get(&session) {
                Some(p) => {
                    let authentic = p.record.binding.is_some_and(|b| {
                        b.bound_at_version == bound_at && {
                            let epoch = p.record.owner_epoch;
                            let keys = p.master.binding_keys(session, bound_at, epoch);
                            open_sealed(&keys.to_gateway, bytes, counter, sealed).is_ok()
                        }
                    });
                    if authentic {
                        self.confirm(now, path, bytes, session);
                    } else {
                        self.stats.auth_failed += 1;
                    }
                }
                None => self.load_for_cache(now, session),
            }
            return false;
        };
        let Some(data) = live.data.as_mut().filter(|d| d.bound_at == bound_at) else {
            // A replaced binding's packet, or a former owner's: it cannot authenticate.
            self.stats.auth_failed += 1;
            return false;
        };
        let start = tun.len();
        if open_sealed_into(&data.keys.to_gateway, bytes, counter, sealed, tun).is_err() {
            self.stats.auth_failed += 1;
            return false;
        }
        if data.path != path || data.resumed {
            // Authentic, from a new address (NAT rebinding) or after a restart: not forwarded,
            // the binding stays; the client is told to reattach (SPEC §4 REATTACH_HINT). The
            // window is only checked, so a fresh packet still counts once it is forwarded.
            if data.rx.check(counter) == Verdict::Fresh {
                self.hint(now, session, path);
            } else {
                self.stats.replayed += 1;
            }
            return false;
        }
        if data.rx.check_and_update(counter) != Verdict::Fresh {
            self.stats.replayed += 1;
            return false;
        }
        data.last_accepted = now;
        live.last_rx = now;
        if ip_source(tun.get(start..).unwrap_or_default()) != Some(live.record.tunnel_ip) {
            // Only the client's own tunnel address may be a source (no spoofing into the LAN).
            self.stats.tun_dropped += 1;
            return false;
        }
        self.stats.data_in += 1;
        true
    }

    fn hint(&mut self, now: Timestamp, session: SessionId, path: Path) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        if live
            .last_hint
            .is_some_and(|t| now.since(t) < HINT_INTERVAL_MS)
        {
            return;
        }
        live.last_hint = Some(now);
        let msg = Control::ReattachHint {
            state_version: live.record.state_version,
            owner_epoch: live.record.owner_epoch,
        };
        self.stats.hints += 1;
        self.send_control(now, session, path, &msg);
    }

    // ---- mutations ----

    fn mutate(&mut self, now: Timestamp, session: SessionId, event: SessionEvent, then: Then) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        if live.busy {
            return;
        }
        let ctx = Context {
            now,
            node: &self.node,
        };
        match apply(&live.record, &event, &ctx) {
            Outcome::Unchanged => {}
            Outcome::Reject(rejection) => {
                if matches!(event, SessionEvent::Reattach(_)) {
                    self.stats.reattach_rejected += 1;
                }
                self.emit(rejection.events);
                // A replayed request is audited but not answered: its sender had its answer
                // long ago, and a fresh, authenticated, final rejection would reach the real
                // client (the replay may come from its own address) and end its session.
                let replay = rejection.refusal.reason == ReasonCode::ReplayDetected;
                if let (Then::AckReattach { path, .. }, false) = (then, replay) {
                    self.reject(now, path, session, rejection.refusal);
                }
            }
            Outcome::Commit(commit) => {
                live.busy = true;
                let id = self.request(StoreOp::CompareAndSwap {
                    expected: commit.expected,
                    record: commit.record.clone(),
                });
                self.pending.insert(
                    id,
                    Pending::Mutate {
                        session,
                        record: commit.record,
                        events: commit.events,
                        refusal: commit.refusal,
                        then,
                    },
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mutated(
        &mut self,
        now: Timestamp,
        session: SessionId,
        record: SessionRecord,
        events: Vec<AuditEvent>,
        refusal: Option<Refusal>,
        then: Then,
        outcome: StoreOutcome,
    ) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        live.busy = false;
        if let StoreOutcome::Failed(failure) = outcome {
            let (reason, retryable, security) = match failure {
                StoreFailure::Conflict | StoreFailure::AlreadyExists => {
                    (ReasonCode::OwnershipConflict, true, false)
                }
                StoreFailure::Unavailable | StoreFailure::Other => {
                    (ReasonCode::StoreUnavailable, true, false)
                }
                StoreFailure::CommitUnknown => (ReasonCode::CommitUnknown, true, true),
            };
            let ctx = Context {
                now,
                node: &self.node,
            };
            let refusal = Refusal { reason, retryable };
            let kind = if security {
                EventKind::SecurityEvent {
                    violation_type: ViolationType::PartialWrite,
                }
            } else {
                EventKind::ReattachRejected { retryable }
            };
            let rejection = machine::refuse(&live.record, &ctx, refusal, kind);
            self.emit(rejection.events);
            if let Then::AckReattach { path, .. } = then {
                self.stats.reattach_rejected += 1;
                self.reject(now, path, session, refusal);
            }
            if failure != StoreFailure::Unavailable {
                // Someone else wrote, or we cannot tell: forget the cache, read it again.
                self.forget(session);
                self.load(session, AfterLoad::Cache);
            }
            return;
        }
        self.out
            .extend(events.into_iter().map(GatewayOutput::Audit));
        let rebound =
            record.binding.map(|b| b.bound_at_version) != live.data.as_ref().map(|d| d.bound_at);
        let terminated = record.is_terminated();
        let old_path = live.data.as_ref().map(|d| d.path);
        if rebound {
            live.data = self
                .kek
                .open(session, &record.secrets)
                .ok()
                .and_then(|master| DataPlane::of(&master, &record));
            live.last_rx = now;
            // The hint limit is per binding: the next path change is hinted at once.
            live.last_hint = None;
        }
        let volatile = matches!(
            record.state,
            crate::record::SessionState::Volatile | crate::record::SessionState::Degraded
        );
        live.health.sync(volatile, now);
        live.record = record;
        if let Then::AckReattach { path } = then {
            if let Some(refusal) = refusal {
                self.stats.reattach_rejected += 1;
                self.reject(now, path, session, refusal);
            } else {
                self.stats.reattach_accepted += 1;
                let live = self.sessions.get(&session);
                if let Some(live) = live {
                    let msg = Control::ReattachAck {
                        state_version: live.record.state_version,
                        owner_epoch: live.record.owner_epoch,
                        transport_id: live
                            .record
                            .binding
                            .map(|b| b.transport_id)
                            .unwrap_or(TransportId(0)),
                    };
                    self.send_control(now, session, path, &msg);
                }
            }
        }
        if rebound {
            if let Some(old) = old_path {
                let new = self
                    .sessions
                    .get(&session)
                    .and_then(|l| l.data.as_ref())
                    .map(|d| d.path);
                if old.proto == crate::record::Proto::Tcp && new != Some(old) {
                    self.out.push_back(GatewayOutput::Close(old));
                }
            }
        }
        if terminated {
            let reason = self
                .sessions
                .get(&session)
                .and_then(|l| l.record.termination)
                .map_or(ReasonCode::PolicyTermination, |t| t.reason);
            if let Some(path) = old_path {
                self.send_control(now, session, path, &Control::Terminate { reason });
            }
            self.forget(session);
        }
    }

    // ---- store reads ----

    fn load_for_cache(&mut self, now: Timestamp, session: SessionId) {
        let loading = self.pending.values().any(|p| match p {
            Pending::Load { session: s, .. } | Pending::Create { session: s, .. } => *s == session,
            Pending::Mutate { .. } => false,
        });
        if !loading && self.loads.allow(now, LOADS_PER_SECOND) {
            self.load(session, AfterLoad::Cache);
        }
    }

    fn load(&mut self, session: SessionId, then: AfterLoad) {
        let id = self.request(StoreOp::Get(session));
        self.pending.insert(id, Pending::Load { session, then });
    }

    fn loaded(
        &mut self,
        now: Timestamp,
        session: SessionId,
        then: AfterLoad,
        outcome: StoreOutcome,
    ) {
        let record = match outcome {
            StoreOutcome::Read(Some(record)) if !record.is_terminated() => Some(record),
            StoreOutcome::Read(Some(_)) => {
                if let AfterLoad::Reattach { path, .. } = then {
                    self.notice(path, session, ReasonCode::SessionExpired);
                }
                return;
            }
            StoreOutcome::Read(None) => None,
            _ => {
                if let AfterLoad::Reattach { path, .. } = then {
                    self.notice(path, session, ReasonCode::StoreUnavailable);
                }
                return;
            }
        };
        let Some(record) = record else {
            if let AfterLoad::Reattach { path, request } = then {
                self.stats.reattach_rejected += 1;
                self.notice(path, request.session, ReasonCode::SessionNotFound);
            }
            return;
        };
        if !self.sessions.contains_key(&session) && !self.adopt(now, *record) {
            return;
        }
        if let AfterLoad::Reattach { request, path } = then {
            self.on_reattach(now, path, request);
        }
    }

    /// Holds `record`, read from the store, with keys recomputed from its sealed secret:
    /// nothing is sent under them until the client reattaches (their counters are lost).
    fn adopt(&mut self, now: Timestamp, record: SessionRecord) -> bool {
        let session = record.session_id;
        let Ok(master) = self.kek.open(session, &record.secrets) else {
            // Sealed under another key: not ours to serve.
            self.stats.auth_failed += 1;
            return false;
        };
        if let Some(peer) = self.peers.get_mut(&record.client_key) {
            peer.session = Some(session);
        }
        self.by_ip.insert(record.tunnel_ip, session);
        let mut live = Live::new(record, master, now);
        live.control_floor = live.record.last_nonce;
        if let Some(data) = live.data.as_mut() {
            data.resumed = true;
        }
        self.sessions.insert(session, live);
        true
    }

    // ---- helpers ----

    fn forget(&mut self, session: SessionId) {
        if let Some(live) = self.sessions.remove(&session) {
            if self.by_ip.get(&live.record.tunnel_ip) == Some(&session) {
                self.by_ip.remove(&live.record.tunnel_ip);
            }
            if let Some(peer) = self.peers.get_mut(&live.record.client_key) {
                if peer.session == Some(session) {
                    peer.session = None;
                }
            }
        }
    }

    fn request(&mut self, op: StoreOp) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.out
            .push_back(GatewayOutput::Store(Box::new(StoreRequest { id, op })));
        id
    }

    fn emit(&mut self, events: Vec<AuditEvent>) {
        self.out
            .extend(events.into_iter().map(GatewayOutput::Audit));
    }

    fn send_control(&mut self, now: Timestamp, session: SessionId, path: Path, msg: &Control) {
        let Some(live) = self.sessions.get_mut(&session) else {
            return;
        };
        let counter = next_control_counter(&mut live.control_tx, now);
        let mut bytes = Vec::with_capacity(96);
        seal_control(session, &live.control.to_client, counter, msg, &mut bytes);
        self.out
            .push_back(GatewayOutput::Transmit(Transmit { path, bytes }));
    }

    /// Answers a refused reattach: authenticated when the session's keys are known and the
    /// request proved possession, else the unauthenticated notice.
    fn reject(&mut self, now: Timestamp, path: Path, session: SessionId, refusal: Refusal) {
        let Some(live) = self.sessions.get(&session) else {
            self.notice(path, session, refusal.reason);
            return;
        };
        if refusal.reason == ReasonCode::AuthFail {
            self.notice(path, session, refusal.reason);
            return;
        }
        let msg = Control::ReattachReject {
            reason: refusal.reason,
            retryable: refusal.retryable,
            state_version: live.record.state_version,
            owner_epoch: live.record.owner_epoch,
            owner_hint: None,
        };
        self.send_control(now, session, path, &msg);
    }

    fn notice(&mut self, path: Path, session: SessionId, reason: ReasonCode) {
        let mut bytes = Vec::with_capacity(24);
        Packet::RejectNotice { session, reason }.encode(&mut bytes);
        self.out
            .push_back(GatewayOutput::Transmit(Transmit { path, bytes }));
    }

    fn next_transport_id(&mut self, now: Timestamp) -> TransportId {
        let id = self
            .last_transport_id
            .saturating_add(1)
            .max(now.as_millis().saturating_mul(1 << 16));
        self.last_transport_id = id;
        TransportId(id)
    }

    fn arm(&mut self, now: Timestamp) {
        if self.next_tick.is_none() {
            self.next_tick = Some(now.plus(TICK_MS));
        }
    }
}

impl DataPlane {
    /// The traffic state of `record`'s binding, if it has one: fresh counters and window.
    fn of(master: &MasterSecret, record: &SessionRecord) -> Option<Self> {
        let b = record.binding?;
        Some(Self {
            bound_at: b.bound_at_version,
            path: Path {
                proto: b.proto,
                remote: b.client_addr,
                local: b.gateway_addr,
            },
            keys: master.binding_keys(record.session_id, b.bound_at_version, record.owner_epoch),
            rx: window(&record.policy),
            tx: 0,
            last_accepted: Timestamp(0),
            resumed: false,
        })
    }
}

impl Live {
    fn new(record: SessionRecord, master: MasterSecret, now: Timestamp) -> Box<Self> {
        Box::new(Self {
            data: DataPlane::of(&master, &record),
            control: master.control_keys(record.session_id),
            control_tx: 0,
            control_rx: control_window(),
            control_floor: 0,
            last_rx: now,
            health: HealthMonitor::new(),
            busy: false,
            last_hint: None,
            reattaches: RateWindow::default(),
            record,
        })
    }

    /// Frees the replay bitmaps of windows that have accepted nothing for `COMPACT_AFTER_MS`
    /// (an idle session keeps a few words per window instead of a kilobyte). The control
    /// window goes by the last packet on the binding, the data window by its last data packet.
    fn compact_idle_windows(&mut self, now: Timestamp) {
        if now.since(self.last_rx) >= COMPACT_AFTER_MS {
            self.control_rx.compact();
        }
        if let Some(data) = self
            .data
            .as_mut()
            .filter(|d| now.since(d.last_accepted) >= COMPACT_AFTER_MS)
        {
            data.rx.compact();
        }
    }
}

fn window(policy: &Arc<Policy>) -> ReplayWindow {
    ReplayWindow::new(policy.data_replay_window).unwrap_or_else(|_| control_window())
}

fn control_window() -> ReplayWindow {
    // The minimum size is valid by definition.
    match ReplayWindow::new(CONTROL_WINDOW) {
        Ok(w) => w,
        Err(_) => unreachable!("the minimum window size is valid"),
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::endpoint::client::{CandidateSpec, Client, ClientConfig, ClientOutput};
    use crate::handshake::public_key;
    use crate::record::Proto;

    const GATEWAY_KEY: [u8; 32] = [7; 32];
    const CLIENT_KEY: [u8; 32] = [9; 32];
    const TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn key(private: &[u8; 32]) -> [u8; 32] {
        match public_key(private) {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    fn path() -> Path {
        Path {
            proto: Proto::Udp,
            remote: SocketAddr::from(([192, 0, 2, 7], 40_000)),
            local: SocketAddr::from(([198, 51, 100, 1], 51_820)),
        }
    }

    /// A minimal IPv4 packet from the client's tunnel address, told apart by `tag`.
    fn ip_packet(tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&TUNNEL_IP.octets());
        p[16..20].copy_from_slice(&[10, 0, 0, 1]);
        p.push(tag);
        p
    }

    /// A gateway and a client with an attached session; the store accepts every write.
    fn attached() -> (Gateway, Client, SessionId) {
        let mut gateway = Gateway::new(GatewayConfig {
            node: NodeId::new("gw1"),
            private_key: Zeroizing::new(GATEWAY_KEY),
            policy: Policy::default(),
            peers: vec![Peer {
                public_key: key(&CLIENT_KEY),
                tunnel_ip: IpAddr::V4(TUNNEL_IP),
            }],
            seed: [2; 32],
        });
        let mut client = Client::new(ClientConfig {
            private_key: Zeroizing::new(CLIENT_KEY),
            gateway_public: key(&GATEWAY_KEY),
            candidates: vec![CandidateSpec {
                proto: Proto::Udp,
                addr: path().local,
            }],
            node: NodeId::new("c"),
            seed: [3; 32],
        });
        let now = Timestamp(1_000);
        client.connect(now, 1);
        for bytes in client_transmits(&mut client) {
            gateway.handle_packet(now, path(), &bytes);
        }
        for bytes in gateway_transmits(&mut gateway, now) {
            client.handle_packet(now, 0, &bytes);
        }
        // The client's keepalive confirms the handshake; the gateway then writes the session.
        for bytes in client_transmits(&mut client) {
            gateway.handle_packet(now, path(), &bytes);
        }
        for bytes in gateway_transmits(&mut gateway, now) {
            client.handle_packet(now, 0, &bytes);
        }
        let Some(session) = client.session() else {
            panic!("the handshake did not complete");
        };
        assert!(gateway.session(session).is_some(), "confirmed and written");
        (gateway, client, session)
    }

    fn client_transmits(client: &mut Client) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| client.poll_output())
            .filter_map(|out| match out {
                ClientOutput::Transmit { bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect()
    }

    /// Drains the gateway's outputs, answering store writes: its transmits.
    fn gateway_transmits(gateway: &mut Gateway, now: Timestamp) -> Vec<Vec<u8>> {
        let mut transmits = Vec::new();
        while let Some(out) = gateway.poll_output() {
            match out {
                GatewayOutput::Store(req) => {
                    gateway.handle_store(now, req.id, StoreOutcome::Written);
                }
                GatewayOutput::Transmit(t) => transmits.push(t.bytes),
                _ => {}
            }
        }
        transmits
    }

    /// Drains the gateway's outputs: the packets it wrote to the TUN device.
    fn delivered(gateway: &mut Gateway) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| gateway.poll_output())
            .filter_map(|out| match out {
                GatewayOutput::Tun(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn data_window_holds_bitmap(gateway: &Gateway, session: SessionId) -> bool {
        gateway
            .sessions
            .get(&session)
            .and_then(|l| l.data.as_ref())
            .is_some_and(|d| d.rx.holds_bitmap())
    }

    #[test]
    fn idle_data_window_is_compacted_and_still_refuses_replays() {
        let (mut gateway, mut client, session) = attached();
        assert!(
            !data_window_holds_bitmap(&gateway, session),
            "before any data"
        );
        let mut sealed = Vec::new();
        for tag in 0..3 {
            client.handle_tun(Timestamp(1_100), &ip_packet(tag));
            sealed.extend(client_transmits(&mut client));
        }
        assert_eq!(sealed.len(), 3);
        // The last two arrive in the wrong order.
        for i in [0, 2, 1] {
            gateway.handle_packet(Timestamp(1_100), path(), &sealed[i]);
        }
        assert_eq!(delivered(&mut gateway).len(), 3);
        assert!(
            data_window_holds_bitmap(&gateway, session),
            "after reordered data"
        );

        // Silent, but not yet for long enough.
        gateway.handle_timeout(Timestamp(1_100 + COMPACT_AFTER_MS - 1));
        assert!(data_window_holds_bitmap(&gateway, session));
        let next = gateway.poll_timeout().expect("a timer is armed");
        assert!(next.since(Timestamp(1_100)) >= COMPACT_AFTER_MS);
        gateway.handle_timeout(next);
        assert!(!data_window_holds_bitmap(&gateway, session), "compacted");
        let now = next;
        let replayed = gateway.stats().replayed;
        for bytes in &sealed {
            gateway.handle_packet(now, path(), bytes);
        }
        assert!(delivered(&mut gateway).is_empty(), "a replay got through");
        assert_eq!(gateway.stats().replayed, replayed + 3);
        // New traffic flows as before.
        client.handle_tun(now, &ip_packet(9));
        for bytes in client_transmits(&mut client) {
            gateway.handle_packet(now, path(), &bytes);
        }
        assert_eq!(delivered(&mut gateway), vec![ip_packet(9)]);
    }
}

//! The client endpoint: one handshake, then a session that moves between transports.
//!
//! The client holds an ordered list of candidate transports (SPEC §9 `candidates`); the driver
//! owns the sockets and names them by index. Traffic flows on the *active* candidate. When
//! nothing authenticated arrives on it for `client_dead_after_ms`, the client sends a
//! `REATTACH_REQUEST` on the next candidate, then the next, until one is acknowledged. A
//! `REATTACH_HINT` (the gateway saw our fresh packet from a new address, e.g. after NAT
//! rebinding) makes it reattach at once on the path the hint came on. While it is not on its
//! first candidate, it probes the first ones now and then, so it returns to UDP once UDP works.
//!
//! A new handshake happens only after the session is over (an authenticated `TERMINATE` or a
//! fatal rejection, or nothing authenticated for longer than any recovery could take), and the
//! end is reported as an event first.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use zeroize::Zeroizing;

use crate::audit::{AuditEvent, EventKind};
use crate::crypto::{DirectionalKeys, MasterSecret};
use crate::endpoint::{
    next_control_counter, open_sealed, open_sealed_into, seal_control, seal_data,
};
use crate::handshake::{ClientHandshake, Entropy};
use crate::ids::{NodeId, OwnerEpoch, SessionId, StateVersion, Timestamp, TransportId};
use crate::reason::ReasonCode;
use crate::record::Proto;
use crate::replay::{ReplayWindow, Verdict};
use crate::wire::{Control, Packet, ReattachRequest, DATA_OVERHEAD};

/// Timer resolution of the client.
const TICK_MS: u64 = 50;
/// A handshake init is retried (on the next candidate) after this long without an answer.
pub const HANDSHAKE_RETRY_MS: u64 = 1_000;
/// A reattach is retried (on the next candidate) after this long without an answer.
pub const REATTACH_RETRY_MS: u64 = 1_000;
/// While not on the first candidate, try the preferred ones this often.
pub const PROBE_INTERVAL_MS: u64 = 5_000;
/// Health reports to the gateway, this often.
pub const HEALTH_INTERVAL_MS: u64 = 2_000;
/// With nothing authenticated from the gateway for this long, the session cannot be alive any
/// more (the gateway's transport-loss TTL, 60 s by default, has ended it): start over.
pub const SESSION_LOST_MS: u64 = 90_000;
/// Data-plane replay window of the client.
const DATA_WINDOW: u64 = 8192;

/// One candidate transport, in the order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateSpec {
    /// UDP or TCP.
    pub proto: Proto,
    /// The gateway's address on it.
    pub addr: SocketAddr,
}

/// What a client endpoint is made of.
pub struct ClientConfig {
    /// The client's static private key.
    pub private_key: Zeroizing<[u8; 32]>,
    /// The gateway's static public key.
    pub gateway_public: [u8; 32],
    /// Candidate transports, most preferred first (at least one).
    pub candidates: Vec<CandidateSpec>,
    /// The name the client writes its audit events under.
    pub node: NodeId,
    /// Seed of the endpoint's generator (Noise ephemeral keys).
    pub seed: [u8; 32],
}

/// What the client tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum ClientOutput {
    /// Send bytes on candidate `candidate` (the driver opens it if needed).
    Transmit {
        /// Index into the candidate list.
        candidate: usize,
        /// One whole packet.
        bytes: Vec<u8>,
    },
    /// Write an IP packet to the TUN device.
    Tun(Vec<u8>),
    /// Append an audit event to the client's log.
    Audit(AuditEvent),
    /// Something worth a log line.
    Event(ClientEvent),
}

/// Milestones of the client, for logs and the demo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A handshake was sent.
    HandshakeSent {
        /// On which candidate.
        candidate: usize,
    },
    /// A session was created.
    Established {
        /// The session.
        session: SessionId,
        /// Our address inside the tunnel.
        tunnel_ip: IpAddr,
        /// On which candidate.
        candidate: usize,
    },
    /// The active transport stopped answering.
    TransportDead {
        /// Which.
        candidate: usize,
    },
    /// The gateway asked us to reattach (it saw us from a new address).
    Hinted {
        /// On which candidate the hint came.
        candidate: usize,
    },
    /// A reattach request was sent.
    ReattachSent {
        /// On which candidate.
        candidate: usize,
        /// Its nonce.
        nonce: u64,
    },
    /// The session moved to a new transport.
    Switched {
        /// The session.
        session: SessionId,
        /// The new active candidate.
        candidate: usize,
        /// The version of the new binding.
        state_version: StateVersion,
        /// From the first sign of trouble (or the hint) to the acknowledgement.
        latency_ms: u64,
    },
    /// A reattach was refused.
    Rejected {
        /// Why.
        reason: ReasonCode,
        /// Whether it may be retried.
        retryable: bool,
    },
    /// The session is over; a new handshake follows.
    Terminated {
        /// The session.
        session: SessionId,
        /// Why.
        reason: ReasonCode,
    },
}

/// The client endpoint.
pub struct Client {
    private_key: Zeroizing<[u8; 32]>,
    gateway_public: [u8; 32],
    candidates: Vec<CandidateSpec>,
    node: NodeId,
    entropy: Entropy,
    phase: Phase,
    out: VecDeque<ClientOutput>,
    /// Strictly increasing across inits of this process (SPEC §5).
    last_init_timestamp: u64,
    next_tick: Option<Timestamp>,
}

enum Phase {
    Idle,
    Handshaking {
        state: Box<ClientHandshake>,
        candidate: usize,
        sent_at: Timestamp,
    },
    Established(Box<Established>),
}

struct Established {
    session: SessionId,
    master: MasterSecret,
    control: DirectionalKeys,
    /// One sequence for control counters and reattach nonces (see the gateway's
    /// `control_floor`).
    sequence: u64,
    control_rx: ReplayWindow,
    known_version: StateVersion,
    epoch: OwnerEpoch,
    tunnel_ip: IpAddr,
    keepalive_ms: u64,
    dead_after_ms: u64,
    binding: Option<ClientBinding>,
    active: usize,
    reattach: Option<Reattaching>,
    last_rx: Timestamp,
    last_auth: Timestamp,
    last_keepalive: Timestamp,
    last_probe: Timestamp,
    health: HealthCounters,
}

struct ClientBinding {
    bound_at: StateVersion,
    transport_id: TransportId,
    keys: DirectionalKeys,
    tx: u64,
    rx: ReplayWindow,
}

struct Reattaching {
    candidate: usize,
    sent_at: Timestamp,
    /// When trouble started (dead detection or hint): the switch latency is measured from it.
    since: Timestamp,
    /// A probe of a preferred candidate while the active one works: when unanswered it is
    /// given up, and the session stays where it is.
    probe: bool,
}

#[derive(Default)]
struct HealthCounters {
    since: Timestamp,
    sent: u32,
    acked: u32,
    rtt_sum: u64,
    last_rtt: Option<u64>,
    jitter_sum: u64,
}

impl Client {
    /// A client that has not started yet; [`Client::connect`] sends the first handshake.
    pub fn new(config: ClientConfig) -> Self {
        Self {
            private_key: config.private_key,
            gateway_public: config.gateway_public,
            candidates: config.candidates,
            node: config.node,
            entropy: Entropy::from_seed(config.seed),
            phase: Phase::Idle,
            out: VecDeque::new(),
            last_init_timestamp: 0,
            next_tick: None,
        }
    }

    // ---- getters ----

    /// The current session, once established.
    pub fn session(&self) -> Option<SessionId> {
        match &self.phase {
            Phase::Established(e) => Some(e.session),
            _ => None,
        }
    }

    /// The active candidate, once established.
    pub fn active(&self) -> Option<usize> {
        match &self.phase {
            Phase::Established(e) => Some(e.active),
            _ => None,
        }
    }

    /// The highest version the gateway told us.
    pub fn known_version(&self) -> Option<StateVersion> {
        match &self.phase {
            Phase::Established(e) => Some(e.known_version),
            _ => None,
        }
    }

    /// Our address inside the tunnel, once established.
    pub fn tunnel_ip(&self) -> Option<IpAddr> {
        match &self.phase {
            Phase::Established(e) => Some(e.tunnel_ip),
            _ => None,
        }
    }

    /// The candidates.
    pub fn candidates(&self) -> &[CandidateSpec] {
        &self.candidates
    }

    // ---- outputs ----

    /// The next output.
    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        self.out.pop_front()
    }

    /// When to call [`Client::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_tick
    }

    // ---- inputs ----

    /// Starts: sends a handshake on the first candidate. `wall_clock_ns` feeds the init's
    /// timestamp (it only has to grow).
    pub fn connect(&mut self, now: Timestamp, wall_clock_ns: u64) {
        self.handshake(now, 0, wall_clock_ns);
    }

    /// A packet arrived on candidate `candidate`.
    pub fn handle_packet(&mut self, now: Timestamp, candidate: usize, bytes: &[u8]) {
        let mut plain = Vec::new();
        if self.handle_packet_into(now, candidate, bytes, &mut plain) {
            self.out.push_back(ClientOutput::Tun(plain));
        }
    }

    /// As [`Client::handle_packet`], except that the IP packet a `DATA` packet carries is not
    /// queued as [`ClientOutput::Tun`] but appended to `tun`, and `true` returned, so that the
    /// driver writes a batch of them from its own buffer. Every other output is queued as
    /// usual.
    pub fn handle_packet_into(
        &mut self,
        now: Timestamp,
        candidate: usize,
        bytes: &[u8],
        tun: &mut Vec<u8>,
    ) -> bool {
        let Ok(packet) = Packet::decode(bytes) else {
            return false;
        };
        match packet {
            Packet::HandshakeAck { noise } => self.on_ack(now, candidate, noise),
            Packet::Control {
                session,
                counter,
                sealed,
            } => self.on_control(now, candidate, bytes, session, counter, sealed),
            Packet::Data {
                session,
                bound_at_version,
                counter,
                sealed,
            } => {
                let Phase::Established(e) = &mut self.phase else {
                    return false;
                };
                if e.session != session {
                    return false;
                }
                let Some(b) = e
                    .binding
                    .as_mut()
                    .filter(|b| b.bound_at == bound_at_version)
                else {
                    return false;
                };
                let start = tun.len();
                if open_sealed_into(&b.keys.to_client, bytes, counter, sealed, tun).is_err() {
                    return false;
                }
                if b.rx.check_and_update(counter) != Verdict::Fresh {
                    tun.truncate(start);
                    return false;
                }
                if candidate == e.active {
                    e.last_rx = now;
                }
                e.last_auth = now;
                return true;
            }
            // An unauthenticated notice is a hint, never final (docs/PROTOCOL.md): the timers
            // decide.
            Packet::RejectNotice { .. } => {}
            Packet::HandshakeInit { .. } | Packet::Reattach(_) => {}
        }
        false
    }

    /// An IP packet read from the TUN device.
    pub fn handle_tun(&mut self, now: Timestamp, packet: &[u8]) {
        let mut bytes = Vec::with_capacity(packet.len() + DATA_OVERHEAD);
        if let Some(candidate) = self.handle_tun_into(now, packet, &mut bytes) {
            self.out
                .push_back(ClientOutput::Transmit { candidate, bytes });
        }
    }

    /// As [`Client::handle_tun`], except that the sealed packet is not queued as a
    /// [`ClientOutput::Transmit`] but appended to `out` (exactly
    /// [`DATA_OVERHEAD`](crate::wire::DATA_OVERHEAD) bytes longer than `packet`), and the
    /// candidate to send it on returned; `None` when there is no binding to carry it. The
    /// driver can so seal a batch of packets into one buffer and send it with one system call.
    pub fn handle_tun_into(
        &mut self,
        _now: Timestamp,
        packet: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        let Phase::Established(e) = &mut self.phase else {
            return None;
        };
        let b = e.binding.as_mut()?;
        if b.tx == u64::MAX {
            return None;
        }
        let counter = b.tx;
        b.tx += 1;
        seal_data(
            e.session,
            b.bound_at,
            &b.keys.to_gateway,
            counter,
            packet,
            out,
        );
        Some(e.active)
    }

    /// Candidate `candidate` failed (a TCP connection refused or closed).
    pub fn handle_transport_error(&mut self, now: Timestamp, candidate: usize) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        // A probe in flight does not replace the active candidate: its failure still counts.
        if candidate == e.active && e.reattach.as_ref().is_none_or(|r| r.probe) {
            self.out
                .push_back(ClientOutput::Event(ClientEvent::TransportDead {
                    candidate,
                }));
            let next = self.next_candidate(candidate);
            self.send_reattach(now, next, now, false);
        }
    }

    /// Timers: retries, keepalives, health reports, dead detection, probes.
    pub fn handle_timeout(&mut self, now: Timestamp, wall_clock_ns: u64) {
        if self.next_tick.is_some_and(|t| t > now) {
            return;
        }
        self.next_tick = Some(now.plus(TICK_MS));
        match &self.phase {
            Phase::Idle => {}
            Phase::Handshaking {
                candidate, sent_at, ..
            } => {
                if now.since(*sent_at) >= HANDSHAKE_RETRY_MS {
                    let next = self.next_candidate(*candidate);
                    self.handshake(now, next, wall_clock_ns);
                }
            }
            Phase::Established(_) => self.established_timers(now),
        }
    }

    // ---- handshake ----

    fn handshake(&mut self, now: Timestamp, candidate: usize, wall_clock_ns: u64) {
        self.next_tick.get_or_insert(now.plus(TICK_MS));
        let timestamp = wall_clock_ns.max(self.last_init_timestamp.saturating_add(1));
        self.last_init_timestamp = timestamp;
        let mut bytes = Vec::with_capacity(160);
        let seed = self.entropy.seed();
        let Ok(state) = ClientHandshake::initiate(
            &self.private_key,
            &self.gateway_public,
            timestamp,
            seed,
            &mut bytes,
        ) else {
            return;
        };
        self.phase = Phase::Handshaking {
            state: Box::new(state),
            candidate,
            sent_at: now,
        };
        self.out
            .push_back(ClientOutput::Event(ClientEvent::HandshakeSent {
                candidate,
            }));
        self.out
            .push_back(ClientOutput::Transmit { candidate, bytes });
    }

    fn on_ack(&mut self, now: Timestamp, candidate: usize, noise: &[u8]) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let Phase::Handshaking { state, .. } = phase else {
            self.phase = phase;
            return;
        };
        let Ok((ack, master)) = state.finish(noise) else {
            // Not the answer to our init (or forged): keep waiting; the retry timer decides.
            // The handshake state is consumed by a failed read, so start a fresh one at the
            // next retry.
            self.phase = Phase::Idle;
            self.handshake(now, candidate, self.last_init_timestamp.saturating_add(1));
            return;
        };
        let binding = ClientBinding {
            bound_at: ack.state_version,
            transport_id: ack.transport_id,
            keys: master.binding_keys(ack.session, ack.state_version, ack.owner_epoch),
            tx: 0,
            rx: data_window(),
        };
        let established = Established {
            session: ack.session,
            control: master.control_keys(ack.session),
            master,
            sequence: 0,
            control_rx: data_window(),
            known_version: ack.state_version,
            epoch: ack.owner_epoch,
            tunnel_ip: ack.tunnel_ip,
            keepalive_ms: u64::from(ack.keepalive_interval_ms).max(1),
            dead_after_ms: u64::from(ack.client_dead_after_ms).max(1),
            binding: Some(binding),
            active: candidate,
            reattach: None,
            last_rx: now,
            last_auth: now,
            last_keepalive: now,
            last_probe: now,
            health: HealthCounters {
                since: now,
                ..HealthCounters::default()
            },
        };
        self.out
            .push_back(ClientOutput::Event(ClientEvent::Established {
                session: ack.session,
                tunnel_ip: ack.tunnel_ip,
                candidate,
            }));
        self.phase = Phase::Established(Box::new(established));
        // The gateway keeps the session provisional until a packet under its keys proves that
        // this end holds them (a replayed init cannot): confirm at once.
        self.keepalive(now);
    }

    // ---- control ----

    fn on_control(
        &mut self,
        now: Timestamp,
        candidate: usize,
        bytes: &[u8],
        session: SessionId,
        counter: u64,
        sealed: &[u8],
    ) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        if e.session != session {
            return;
        }
        let Ok(body) = open_sealed(&e.control.to_client, bytes, counter, sealed) else {
            return;
        };
        if e.control_rx.check_and_update(counter) != Verdict::Fresh {
            return;
        }
        let Ok(msg) = Control::decode(&body) else {
            return;
        };
        e.last_auth = now;
        match msg {
            Control::KeepaliveAck {
                echo_ms,
                state_version,
                owner_epoch,
            } => {
                if candidate == e.active {
                    e.last_rx = now;
                }
                e.known_version = e.known_version.max(state_version);
                e.epoch = e.epoch.max(owner_epoch);
                let rtt = now.as_millis().saturating_sub(echo_ms);
                let h = &mut e.health;
                h.acked = h.acked.saturating_add(1);
                h.rtt_sum = h.rtt_sum.saturating_add(rtt);
                if let Some(last) = h.last_rtt {
                    h.jitter_sum = h.jitter_sum.saturating_add(last.abs_diff(rtt));
                }
                h.last_rtt = Some(rtt);
            }
            Control::ReattachAck {
                state_version,
                owner_epoch,
                transport_id,
            } => {
                let since = e.reattach.as_ref().map_or(now, |r| r.since);
                let old = e.binding.as_ref().map(|b| b.transport_id);
                e.binding = Some(ClientBinding {
                    bound_at: state_version,
                    transport_id,
                    keys: e.master.binding_keys(session, state_version, owner_epoch),
                    tx: 0,
                    rx: data_window(),
                });
                e.known_version = e.known_version.max(state_version);
                e.epoch = owner_epoch;
                e.active = candidate;
                e.reattach = None;
                e.last_rx = now;
                // The first probe of a better candidate comes a full interval after a switch.
                e.last_probe = now;
                // Health reports describe the active path: what was lost before the switch (on
                // the old path, or during the switch) is not the new path's loss.
                e.health = HealthCounters {
                    since: now,
                    ..HealthCounters::default()
                };
                let latency_ms = now.since(since);
                let proto = self
                    .candidates
                    .get(candidate)
                    .map_or(Proto::Udp, |c| c.proto);
                let kind = EventKind::TransportSwitch {
                    old_transport_id: old,
                    new_transport_id: transport_id,
                    proto,
                    switch_latency_ms: latency_ms,
                };
                let at = (session, state_version, owner_epoch);
                let event = audit(&self.node, now, at, ReasonCode::TransportSwitchOk, kind);
                self.out.push_back(event);
                self.out
                    .push_back(ClientOutput::Event(ClientEvent::Switched {
                        session,
                        candidate,
                        state_version,
                        latency_ms,
                    }));
            }
            Control::ReattachReject {
                reason,
                retryable,
                state_version,
                owner_epoch,
                ..
            } => {
                // A rejection answers a request of ours. With none in flight it answers someone
                // else's (a replayed or duplicated request) and must not end a working session.
                if e.reattach.is_none() {
                    return;
                }
                let kind = EventKind::ReattachRejected { retryable };
                let at = (session, state_version, owner_epoch);
                self.out.push_back(audit(&self.node, now, at, reason, kind));
                self.out
                    .push_back(ClientOutput::Event(ClientEvent::Rejected {
                        reason,
                        retryable,
                    }));
                if !retryable {
                    self.session_over(now, session, reason);
                    return;
                }
                if reason == ReasonCode::StaleVersion {
                    // Someone reattached since we last heard: catch up and ask again at once.
                    e.known_version = e.known_version.max(state_version);
                    let since = e.reattach.as_ref().map_or(now, |r| r.since);
                    let probe = e.reattach.as_ref().is_some_and(|r| r.probe);
                    self.send_reattach(now, candidate, since, probe);
                }
            }
            Control::ReattachHint {
                state_version,
                owner_epoch,
            } => {
                e.known_version = e.known_version.max(state_version);
                e.epoch = e.epoch.max(owner_epoch);
                let recent = e
                    .reattach
                    .as_ref()
                    .is_some_and(|r| r.candidate == candidate && now.since(r.sent_at) < 200);
                if !recent {
                    let since = e.reattach.as_ref().map_or(now, |r| r.since);
                    self.out
                        .push_back(ClientOutput::Event(ClientEvent::Hinted { candidate }));
                    self.send_reattach(now, candidate, since, false);
                }
            }
            Control::Terminate { reason } => self.session_over(now, session, reason),
            // Cluster moves (REDIRECT) are not part of a single gateway's protocol yet; a
            // client never receives its own message kinds.
            _ => {}
        }
    }

    // ---- timers ----

    fn established_timers(&mut self, now: Timestamp) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        if now.since(e.last_auth) >= SESSION_LOST_MS {
            let session = e.session;
            self.session_over(now, session, ReasonCode::TtlTransportLossExpired);
            return;
        }
        // A reattach in flight: retry on the next candidate. An unanswered probe is given up
        // instead: the active candidate works, and moving on would "switch" to it again.
        if let Some(r) = &e.reattach {
            if now.since(r.sent_at) >= REATTACH_RETRY_MS {
                if r.probe {
                    e.reattach = None;
                } else {
                    let (candidate, since) = (r.candidate, r.since);
                    let next = self.next_candidate(candidate);
                    self.send_reattach(now, next, since, false);
                }
            }
            // Keep the current binding's keepalives going meanwhile.
        } else if now.since(e.last_rx) >= e.dead_after_ms {
            let dead = e.active;
            self.out
                .push_back(ClientOutput::Event(ClientEvent::TransportDead {
                    candidate: dead,
                }));
            let next = self.next_candidate(dead);
            let since = now;
            self.send_reattach(now, next, since, false);
        } else if e.active > 0 && now.since(e.last_probe) >= PROBE_INTERVAL_MS {
            // Try the preferred candidates again (e.g. UDP after a fallback to TCP).
            e.last_probe = now;
            self.send_reattach(now, 0, now, true);
        }

        // The health report closes its window before this tick's keepalive is sent: a keepalive
        // sent in the same tick has had no time to be answered and is not a loss.
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        if now.since(e.health.since) >= HEALTH_INTERVAL_MS && e.health.sent > 0 {
            let h = std::mem::replace(
                &mut e.health,
                HealthCounters {
                    since: now,
                    ..HealthCounters::default()
                },
            );
            let acked = h.acked.min(h.sent);
            let loss_pct = (h.sent - acked).saturating_mul(100) / h.sent;
            let rtt_ms = if acked > 0 {
                h.rtt_sum / u64::from(acked)
            } else {
                0
            };
            let jitter_ms = if acked > 1 {
                h.jitter_sum / u64::from(acked - 1)
            } else {
                0
            };
            let msg = Control::HealthReport {
                loss_pct,
                rtt_ms: u32::try_from(rtt_ms).unwrap_or(u32::MAX),
                jitter_ms: u32::try_from(jitter_ms).unwrap_or(u32::MAX),
            };
            let active = e.active;
            // Reports describe the active path; they are not sent while it is being replaced.
            if e.reattach.is_none() {
                self.send_control(now, active, &msg);
            }
        }
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        if now.since(e.last_keepalive) >= e.keepalive_ms {
            self.keepalive(now);
        }
    }

    fn keepalive(&mut self, now: Timestamp) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        e.last_keepalive = now;
        e.health.sent = e.health.sent.saturating_add(1);
        let msg = Control::Keepalive {
            sent_ms: now.as_millis(),
        };
        let active = e.active;
        self.send_control(now, active, &msg);
    }

    // ---- helpers ----

    fn send_reattach(&mut self, now: Timestamp, candidate: usize, since: Timestamp, probe: bool) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        let Some(spec) = self.candidates.get(candidate) else {
            return;
        };
        let nonce = next_control_counter(&mut e.sequence, now);
        let proof = e
            .master
            .proof(e.session, nonce, e.known_version, spec.proto);
        let request = ReattachRequest {
            session: e.session,
            nonce,
            known_version: e.known_version,
            proto: spec.proto,
            proof,
        };
        e.reattach = Some(Reattaching {
            candidate,
            sent_at: now,
            since,
            probe,
        });
        let mut bytes = Vec::with_capacity(80);
        Packet::Reattach(request).encode(&mut bytes);
        self.out
            .push_back(ClientOutput::Event(ClientEvent::ReattachSent {
                candidate,
                nonce,
            }));
        self.out
            .push_back(ClientOutput::Transmit { candidate, bytes });
    }

    fn send_control(&mut self, now: Timestamp, candidate: usize, msg: &Control) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        let counter = next_control_counter(&mut e.sequence, now);
        let mut bytes = Vec::with_capacity(80);
        seal_control(e.session, &e.control.to_gateway, counter, msg, &mut bytes);
        self.out
            .push_back(ClientOutput::Transmit { candidate, bytes });
    }

    fn session_over(&mut self, now: Timestamp, session: SessionId, reason: ReasonCode) {
        self.out
            .push_back(ClientOutput::Event(ClientEvent::Terminated {
                session,
                reason,
            }));
        self.phase = Phase::Idle;
        let next = self.last_init_timestamp.saturating_add(1);
        self.handshake(now, 0, next);
    }

    fn next_candidate(&self, candidate: usize) -> usize {
        (candidate + 1) % self.candidates.len().max(1)
    }
}

fn data_window() -> ReplayWindow {
    match ReplayWindow::new(DATA_WINDOW) {
        Ok(w) => w,
        Err(_) => unreachable!("8192 is a valid window size"),
    }
}

/// An audit event of the client `node` about `session` at (version, epoch).
fn audit(
    node: &NodeId,
    now: Timestamp,
    (session, state_version, owner_epoch): (SessionId, StateVersion, OwnerEpoch),
    reason_code: ReasonCode,
    kind: EventKind,
) -> ClientOutput {
    ClientOutput::Audit(AuditEvent {
        ts_ms: now.as_millis(),
        node_id: node.clone(),
        session_id: Some(session),
        state_version,
        owner_epoch,
        reason_code,
        kind,
    })
}

//! A deterministic simulation of one client and one gateway over a virtual network, in the
//! style of quinn's test `Pair`: a virtual clock, an event queue ordered by (time, sequence),
//! links with latency, jitter and loss drawn from a seeded generator, a NAT, TCP as a reliable
//! in-order path, a session store with the contract of `jumpvpn-store`, gateway restarts, and an
//! application that sends numbered IP packets through the tunnel both ways.
//!
//! Nothing here sleeps or reads a clock: `run_until` steps virtual time from one event or timer
//! to the next, so a minute of traffic runs in milliseconds and a seed replays exactly.
//!
//! ```text
//!   app ──tun──▶ Client ──candidate i──▶ NAT ──link i──▶ Gateway ──tun──▶ app
//!                  ▲                                        │  ▲
//!                  └────────────── link i ◀─── NAT ◀────────┘  └── Store (create / CAS / get)
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::audit::check::{verify, Source, Violation};
use jumpvpn_core::endpoint::client::{
    CandidateSpec, Client, ClientConfig, ClientEvent, ClientOutput,
};
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig, GatewayOutput, Peer, StoreFailure, StoreOp, StoreOutcome, StoreRequest,
};
use jumpvpn_core::endpoint::Path;
use jumpvpn_core::handshake::public_key;
use jumpvpn_core::{
    AuditEvent, EventKind, NodeId, Policy, Proto, SessionId, SessionRecord, StateVersion, Timestamp,
};
use zeroize::Zeroizing;

/// Where virtual time starts (a plausible Unix time in ms, so wall-clock-based counters look
/// like real ones).
pub const T0: Timestamp = Timestamp(1_700_000_000_000);
/// The gateway's static private key.
pub const GW_KEY: [u8; 32] = [0x11; 32];
/// The client's static private key.
pub const CL_KEY: [u8; 32] = [0x22; 32];
/// The gateway's address inside the tunnel.
pub const GW_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The client's address inside the tunnel (the gateway drops other sources).
pub const CL_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The client's public address, as its NAT presents it.
pub const CLIENT_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Another host on the Internet (an attacker, or the client after moving).
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
/// Candidate index of UDP.
pub const UDP: usize = 0;
/// Candidate index of TCP.
pub const TCP: usize = 1;

/// The gateway's address (UDP and TCP listen on the same one).
pub fn gw_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820)
}

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64: tiny, fast, and good enough to draw latencies and losses from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `permille / 1000`.
    pub fn chance(&mut self, permille: u32) -> bool {
        self.below(1000) < u64::from(permille)
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// 32 random bytes (an endpoint's seed).
    pub fn seed32(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        self.fill(&mut s);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// One direction's delivery model of a link (the same in both directions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// One-way latency.
    pub latency_ms: u64,
    /// Extra delay, uniform in `0..=jitter_ms` (UDP packets may be reordered by it).
    pub jitter_ms: u64,
    /// Loss, per mille (UDP only: TCP is reliable).
    pub loss_permille: u32,
}

impl LinkConfig {
    /// A clean link with `latency_ms` one way.
    pub const fn clean(latency_ms: u64) -> Self {
        Self {
            latency_ms,
            jitter_ms: 0,
            loss_permille: 0,
        }
    }

    /// The round-trip time without jitter.
    pub const fn rtt(&self) -> u64 {
        2 * self.latency_ms
    }
}

/// The world's parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Everything random derives from it: link behaviour and the endpoints' seeds.
    pub seed: u64,
    /// The gateway's policy for new sessions.
    pub policy: Policy,
    /// The UDP candidate's link.
    pub udp: LinkConfig,
    /// The TCP candidate's link.
    pub tcp: LinkConfig,
    /// The application sends one packet each way every this many ms (`None`: no traffic).
    pub traffic_interval_ms: Option<u64>,
    /// Delay between a store request and its outcome.
    pub store_latency_ms: u64,
}

impl SimConfig {
    /// Default policy, clean 20 ms links, a packet each way every 50 ms, an instant store.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            policy: Policy::default(),
            udp: LinkConfig::clean(20),
            tcp: LinkConfig::clean(20),
            traffic_interval_ms: Some(50),
            store_latency_ms: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The session store model
// ---------------------------------------------------------------------------------------------

/// The session store, with the contract of `jumpvpn_store::SessionStore`: create fails if the
/// session exists, compare-and-swap writes iff the stored version is the expected one, get
/// reads. It can be made unavailable (nothing happens, the caller is told so).
#[derive(Default)]
pub struct Store {
    /// The stored records.
    pub records: BTreeMap<SessionId, SessionRecord>,
    /// When false every operation fails with `Unavailable` and changes nothing.
    pub available: bool,
    /// Every successful write: when, which session, which version.
    pub commits: Vec<(Timestamp, SessionId, StateVersion)>,
    /// Operations attempted (including failed ones).
    pub operations: u64,
}

impl Store {
    fn new() -> Self {
        Self {
            available: true,
            ..Self::default()
        }
    }

    /// Performs one operation atomically.
    pub fn execute(&mut self, now: Timestamp, op: StoreOp) -> StoreOutcome {
        self.operations += 1;
        if !self.available {
            return StoreOutcome::Failed(StoreFailure::Unavailable);
        }
        match op {
            StoreOp::Create(record) => {
                if self.records.contains_key(&record.session_id) {
                    return StoreOutcome::Failed(StoreFailure::AlreadyExists);
                }
                assert_eq!(
                    record.state_version,
                    StateVersion(1),
                    "the handshake commits version 1"
                );
                self.commits
                    .push((now, record.session_id, record.state_version));
                self.records.insert(record.session_id, record);
                StoreOutcome::Written
            }
            StoreOp::CompareAndSwap { expected, record } => {
                // The store crate refuses such a request (`check_cas_request`); here it is a
                // bug in the core worth stopping for.
                assert_eq!(
                    record.state_version.get(),
                    expected.get() + 1,
                    "a CAS writes exactly the next version"
                );
                let Some(current) = self.records.get_mut(&record.session_id) else {
                    return StoreOutcome::Failed(StoreFailure::Other);
                };
                if current.state_version != expected {
                    return StoreOutcome::Failed(StoreFailure::Conflict);
                }
                self.commits
                    .push((now, record.session_id, record.state_version));
                *current = record;
                StoreOutcome::Written
            }
            StoreOp::Get(id) => StoreOutcome::Read(self.records.get(&id).cloned().map(Box::new)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The application inside the tunnel
// ---------------------------------------------------------------------------------------------

/// One direction of numbered packets: what was sent when, and what arrived when.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Send time of packet `seq` (the index).
    pub sent: Vec<Timestamp>,
    /// Arrival time of packet `seq`, if it arrived.
    pub received: Vec<Option<Timestamp>>,
    /// Packets that arrived more than once (must stay 0: the replay windows forbid it).
    pub duplicates: u64,
    /// Packets that arrived but were not ours or were malformed.
    pub foreign: u64,
}

impl Traffic {
    fn send(&mut self, now: Timestamp) -> u64 {
        self.sent.push(now);
        self.received.push(None);
        (self.sent.len() - 1) as u64
    }

    fn arrive(&mut self, now: Timestamp, seq: u64) {
        match usize::try_from(seq)
            .ok()
            .and_then(|i| self.received.get_mut(i))
        {
            Some(slot @ None) => *slot = Some(now),
            Some(Some(_)) => self.duplicates += 1,
            None => self.foreign += 1,
        }
    }

    /// Sequence numbers of the packets sent in `[from, to)`.
    fn sent_in(&self, from: Timestamp, to: Timestamp) -> impl Iterator<Item = usize> + '_ {
        self.sent
            .iter()
            .enumerate()
            .filter(move |(_, t)| **t >= from && **t < to)
            .map(|(i, _)| i)
    }

    /// Packets sent in `[from, to)`.
    pub fn count_sent(&self, from: Timestamp, to: Timestamp) -> usize {
        self.sent_in(from, to).count()
    }

    /// Packets sent in `[from, to)` that never arrived.
    pub fn lost(&self, from: Timestamp, to: Timestamp) -> usize {
        self.sent_in(from, to)
            .filter(|i| self.received.get(*i).is_some_and(Option::is_none))
            .count()
    }

    /// The longest outage among packets sent in `[from, to)`: the longest time between the
    /// send times of two consecutive packets that arrived (0 if all arrived at the rate).
    pub fn longest_gap(&self, from: Timestamp, to: Timestamp) -> u64 {
        let delivered: Vec<Timestamp> = self
            .sent_in(from, to)
            .filter(|i| self.received.get(*i).is_some_and(Option::is_some))
            .filter_map(|i| self.sent.get(i).copied())
            .collect();
        delivered
            .windows(2)
            .map(|w| w[1].since(w[0]))
            .max()
            .unwrap_or(0)
    }

    /// The first packet sent at or after `t` that arrived: (seq, sent, received).
    pub fn first_delivered_after(&self, t: Timestamp) -> Option<(usize, Timestamp, Timestamp)> {
        self.sent_in(t, Timestamp(u64::MAX)).find_map(|i| {
            let recv = self.received.get(i).copied().flatten()?;
            Some((i, self.sent[i], recv))
        })
    }

    /// The in-tunnel "TCP stream" (retransmission is out of scope): the packets sent in
    /// `[from, to)` read as one byte stream. Returns how many of them a receiver could hand up
    /// in order, without a hole, and whether they arrived in sequence order.
    pub fn stream(&self, from: Timestamp, to: Timestamp) -> (usize, bool) {
        let arrivals: Vec<Option<Timestamp>> = self
            .sent_in(from, to)
            .map(|i| self.received.get(i).copied().flatten())
            .collect();
        let contiguous = arrivals.iter().take_while(|r| r.is_some()).count();
        let delivered: Vec<Timestamp> = arrivals.iter().flatten().copied().collect();
        let in_order = delivered.windows(2).all(|w| w[0] <= w[1]);
        (contiguous, in_order)
    }
}

/// An IPv4 packet carrying a UDP header and a sequence number, with a valid header checksum.
pub fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, seq: u64) -> Vec<u8> {
    let total: u16 = 20 + 8 + 8;
    let mut p = vec![0u8; usize::from(total)];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 17; // UDP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let checksum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&7u16.to_be_bytes());
    p[24..26].copy_from_slice(&16u16.to_be_bytes());
    p[28..36].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Parses a packet of [`ip_packet`]: (source, destination, seq), if the header is valid.
pub fn parse_ip_packet(p: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u64)> {
    if p.len() != 36 || p[0] != 0x45 || ipv4_checksum(&p[..20]) != 0 {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let seq = u64::from_be_bytes(p[28..36].try_into().ok()?);
    Some((src, dst, seq))
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

// ---------------------------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------------------------

/// A link's current state.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// How it delivers.
    pub config: LinkConfig,
    /// Down: everything sent on it is dropped (e.g. "UDP blocked").
    pub up: bool,
}

/// An open TCP connection of a candidate.
#[derive(Clone, Copy, Debug)]
struct Conn {
    id: u64,
    /// The client's address as the gateway sees it (NAT applied).
    public: SocketAddr,
    /// The last scheduled delivery each way: later segments never overtake earlier ones.
    last_to_gateway: Timestamp,
    last_to_client: Timestamp,
    /// The gateway closed it (or died): nothing more gets through, and the client hears of it
    /// one latency later.
    closing: bool,
}

/// A datagram or segment the client sent, as captured on its side of the NAT.
#[derive(Clone, Debug)]
pub struct Captured {
    /// When.
    pub at: Timestamp,
    /// On which candidate.
    pub candidate: usize,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Decides the fate of one packet the client sends: `false` drops it; it may be modified.
pub type Tamper = Box<dyn FnMut(usize, &mut Vec<u8>) -> bool>;

enum Event {
    ToGateway {
        path: Path,
        conn: Option<u64>,
        bytes: Vec<u8>,
    },
    ToClient {
        proto: Proto,
        /// The address the gateway sent to (resolved through the NAT on arrival).
        dest: SocketAddr,
        conn: Option<u64>,
        bytes: Vec<u8>,
    },
    Store {
        generation: u32,
        request: Box<StoreRequest>,
    },
    /// The client's TCP connection of `candidate` was closed from the other end.
    ClientConnClosed {
        candidate: usize,
        conn: u64,
    },
    AppTick,
}

/// The simulated world: one client, one gateway, their links and store, and the app.
pub struct Sim {
    /// The virtual clock.
    pub now: Timestamp,
    /// The parameters.
    pub config: SimConfig,
    rng: Rng,
    queue: BTreeMap<(Timestamp, u64), Event>,
    seq: u64,
    steps_at_now: u32,
    /// The gateway endpoint (replaced by [`Sim::restart_gateway`]).
    pub gateway: Gateway,
    /// Incremented by each restart; store outcomes for an older one are not delivered.
    pub generation: u32,
    /// The client endpoint.
    pub client: Client,
    /// The session store.
    pub store: Store,
    /// Extra delay of each store operation.
    pub store_latency_ms: u64,
    /// Per-candidate links.
    pub links: Vec<Link>,
    /// The UDP source port the client's NAT uses, per candidate.
    nat_port: Vec<u16>,
    next_port: u16,
    tcp: Vec<Option<Conn>>,
    next_conn: u64,
    /// Every packet the client sent, in order.
    pub client_sent: Vec<Captured>,
    /// Every packet the gateway sent, in order.
    pub gateway_sent: Vec<(Timestamp, Path, Vec<u8>)>,
    /// When the gateway first received something from each remote address.
    pub first_seen: BTreeMap<SocketAddr, Timestamp>,
    /// Gateway → client packets dropped because the NAT had no mapping for their address.
    pub nat_dropped: u64,
    /// Modifies or drops the client's packets before they enter the network.
    pub tamper: Option<Tamper>,
    /// The gateway's audit stream (all gateway incarnations: one node, one file).
    pub gw_audit: Vec<AuditEvent>,
    /// The client's audit stream.
    pub client_audit: Vec<AuditEvent>,
    /// The client's events, with their time.
    pub client_events: Vec<(Timestamp, ClientEvent)>,
    /// IP packets the gateway wrote to its TUN device, in order (client → gateway).
    pub gw_tun: u64,
    /// Client → gateway traffic.
    pub up: Traffic,
    /// Gateway → client traffic.
    pub down: Traffic,
    app_running: bool,
}

impl Sim {
    /// A world at `T0` with the client about to connect (call [`Sim::connect`]).
    pub fn new(config: SimConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let gateway = Gateway::new(gateway_config(&config.policy, rng.seed32()));
        let client = Client::new(ClientConfig {
            private_key: Zeroizing::new(CL_KEY),
            gateway_public: public_key(&GW_KEY).expect("a valid gateway key"),
            candidates: vec![
                CandidateSpec {
                    proto: Proto::Udp,
                    addr: gw_addr(),
                },
                CandidateSpec {
                    proto: Proto::Tcp,
                    addr: gw_addr(),
                },
            ],
            node: NodeId::new("client"),
            seed: rng.seed32(),
        });
        let links = vec![
            Link {
                config: config.udp,
                up: true,
            },
            Link {
                config: config.tcp,
                up: true,
            },
        ];
        Self {
            now: T0,
            store_latency_ms: config.store_latency_ms,
            config,
            rng,
            queue: BTreeMap::new(),
            seq: 0,
            steps_at_now: 0,
            gateway,
            generation: 0,
            client,
            store: Store::new(),
            links,
            nat_port: vec![50_000, 0],
            next_port: 50_001,
            tcp: vec![None, None],
            next_conn: 0,
            client_sent: Vec::new(),
            gateway_sent: Vec::new(),
            first_seen: BTreeMap::new(),
            nat_dropped: 0,
            tamper: None,
            gw_audit: Vec::new(),
            client_audit: Vec::new(),
            client_events: Vec::new(),
            gw_tun: 0,
            up: Traffic::default(),
            down: Traffic::default(),
            app_running: false,
        }
    }

    /// The client starts its handshake now.
    pub fn connect(&mut self) {
        let wall = wall_clock_ns(self.now);
        self.client.connect(self.now, wall);
        self.pump();
    }

    /// A world whose client has connected and established its session, confirmed and stored
    /// by the gateway (within 10 s: a lossy link may lose an init or two).
    pub fn established(config: SimConfig) -> Self {
        let mut sim = Self::new(config);
        sim.connect();
        let up = sim.run_until_cond(10_000, |s| {
            s.client
                .session()
                .is_some_and(|id| s.store.records.contains_key(&id))
        });
        assert!(up, "the handshake completes");
        sim
    }

    /// Whether the client has an open TCP connection on `candidate`.
    pub fn tcp_open(&self, candidate: usize) -> bool {
        self.tcp.get(candidate).is_some_and(Option::is_some)
    }

    // ---- driving ----

    /// Runs events and timers until virtual time `until` (inclusive).
    pub fn run_until(&mut self, until: Timestamp) {
        while self.step(until) {}
        self.now = self.now.max(until);
    }

    /// Runs for `ms` of virtual time.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now.plus(ms);
        self.run_until(until);
    }

    /// Runs until `done` holds (checked after every step) or `ms` pass; returns whether it held.
    pub fn run_until_cond(&mut self, ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now.plus(ms);
        loop {
            if done(self) {
                return true;
            }
            if !self.step(deadline) {
                self.now = self.now.max(deadline);
                return done(self);
            }
        }
    }

    /// Handles the next event or timer if it is due at or before `until`: network and store
    /// events first (in the order they were scheduled), then the gateway's timer, then the
    /// client's. Returns false when nothing is due.
    fn step(&mut self, until: Timestamp) -> bool {
        let queued = self.queue.keys().next().map(|(t, _)| *t);
        let gw = self.gateway.poll_timeout();
        let cl = self.client.poll_timeout();
        let Some(next) = [queued, gw, cl].into_iter().flatten().min() else {
            return false;
        };
        if next > until {
            return false;
        }
        if next > self.now {
            self.now = next;
            self.steps_at_now = 0;
        }
        self.steps_at_now += 1;
        assert!(self.steps_at_now < 1_000_000, "livelock at {:?}", self.now);
        if queued.is_some_and(|t| t <= self.now) {
            if let Some((_, event)) = self.queue.pop_first() {
                self.process(event);
            }
        } else if gw.is_some_and(|t| t <= self.now) {
            self.gateway.handle_timeout(self.now);
        } else {
            let wall = wall_clock_ns(self.now);
            self.client.handle_timeout(self.now, wall);
        }
        self.pump();
        true
    }

    fn schedule(&mut self, at: Timestamp, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn delay(&mut self, link: LinkConfig) -> u64 {
        link.latency_ms + self.rng.below(link.jitter_ms + 1)
    }

    fn process(&mut self, event: Event) {
        match event {
            Event::ToGateway { path, conn, bytes } => {
                if let Some(id) = conn {
                    if !self.tcp.iter().flatten().any(|c| c.id == id && !c.closing) {
                        return; // The connection closed while the segment was in flight.
                    }
                }
                self.first_seen.entry(path.remote).or_insert(self.now);
                self.gateway.handle_packet(self.now, path, &bytes);
            }
            Event::ToClient {
                proto,
                dest,
                conn,
                bytes,
            } => {
                let candidate = match (proto, conn) {
                    (Proto::Tcp, Some(id)) => self
                        .tcp
                        .iter()
                        .position(|c| c.is_some_and(|c| c.id == id && !c.closing)),
                    _ => self.udp_candidate_for(dest),
                };
                match candidate {
                    Some(c) => self.client.handle_packet(self.now, c, &bytes),
                    None => self.nat_dropped += 1,
                }
            }
            Event::Store {
                generation,
                request,
            } => {
                // The write happens even if the gateway that asked has died since: whether it
                // did is for the next incarnation to read from the store.
                let StoreRequest { id, op } = *request;
                let outcome = self.store.execute(self.now, op);
                if generation == self.generation {
                    self.gateway.handle_store(self.now, id, outcome);
                }
            }
            Event::ClientConnClosed { candidate, conn } => {
                // News to the client if it is still the connection it uses.
                if self.tcp[candidate].is_some_and(|c| c.id == conn) {
                    self.tcp[candidate] = None;
                    self.client.handle_transport_error(self.now, candidate);
                }
            }
            Event::AppTick => {
                let s = self.up.send(self.now);
                self.client
                    .handle_tun(self.now, &ip_packet(CL_TUNNEL_IP, GW_TUNNEL_IP, s));
                let s = self.down.send(self.now);
                self.gateway
                    .handle_tun(self.now, &ip_packet(GW_TUNNEL_IP, CL_TUNNEL_IP, s));
                if let Some(every) = self.config.traffic_interval_ms {
                    self.schedule(self.now.plus(every), Event::AppTick);
                }
            }
        }
    }

    /// Polls both endpoints until neither has output.
    pub fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(out) = self.client.poll_output() {
                progress = true;
                self.on_client_output(out);
            }
            while let Some(out) = self.gateway.poll_output() {
                progress = true;
                self.on_gateway_output(out);
            }
            if !progress {
                break;
            }
        }
    }

    fn on_client_output(&mut self, out: ClientOutput) {
        match out {
            ClientOutput::Transmit { candidate, bytes } => self.client_send(candidate, bytes),
            ClientOutput::Tun(packet) => match parse_ip_packet(&packet) {
                Some((src, dst, seq)) if src == GW_TUNNEL_IP && dst == CL_TUNNEL_IP => {
                    self.down.arrive(self.now, seq);
                }
                _ => self.down.foreign += 1,
            },
            ClientOutput::Audit(event) => self.client_audit.push(event),
            ClientOutput::Event(event) => {
                if matches!(event, ClientEvent::Established { .. }) && !self.app_running {
                    self.app_running = true;
                    if let Some(every) = self.config.traffic_interval_ms {
                        self.schedule(self.now.plus(every), Event::AppTick);
                    }
                }
                self.client_events.push((self.now, event));
            }
        }
    }

    fn on_gateway_output(&mut self, out: GatewayOutput) {
        match out {
            GatewayOutput::Transmit(t) => self.gateway_send(t.path, t.bytes),
            GatewayOutput::Tun(packet) => {
                self.gw_tun += 1;
                match parse_ip_packet(&packet) {
                    Some((src, dst, seq)) if src == CL_TUNNEL_IP && dst == GW_TUNNEL_IP => {
                        self.up.arrive(self.now, seq);
                    }
                    _ => self.up.foreign += 1,
                }
            }
            GatewayOutput::Store(request) => {
                let at = self.now.plus(self.store_latency_ms);
                let generation = self.generation;
                self.schedule(
                    at,
                    Event::Store {
                        generation,
                        request,
                    },
                );
            }
            GatewayOutput::Audit(event) => self.gw_audit.push(event),
            GatewayOutput::Close(path) => {
                if let Some(c) = self
                    .tcp
                    .iter()
                    .position(|c| c.is_some_and(|c| c.public == path.remote && !c.closing))
                {
                    self.peer_closes(c);
                }
            }
        }
    }

    /// The gateway's end of the client's TCP connection on `candidate` went away.
    fn peer_closes(&mut self, candidate: usize) {
        let Some(conn) = self.tcp[candidate].as_mut() else {
            return;
        };
        conn.closing = true;
        let id = conn.id;
        let at = self.now.plus(self.links[candidate].config.latency_ms);
        self.schedule(
            at,
            Event::ClientConnClosed {
                candidate,
                conn: id,
            },
        );
    }

    fn client_send(&mut self, candidate: usize, mut bytes: Vec<u8>) {
        self.client_sent.push(Captured {
            at: self.now,
            candidate,
            bytes: bytes.clone(),
        });
        if let Some(tamper) = self.tamper.as_mut() {
            if !tamper(candidate, &mut bytes) {
                return;
            }
        }
        let Some(link) = self.links.get(candidate).copied() else {
            return;
        };
        match candidate {
            TCP => {
                let conn = self.open_tcp(candidate);
                if !link.up || conn.closing {
                    return;
                }
                let at = self
                    .now
                    .plus(self.delay(link.config))
                    .max(conn.last_to_gateway);
                if let Some(c) = self.tcp[candidate].as_mut() {
                    c.last_to_gateway = at;
                }
                let path = Path {
                    proto: Proto::Tcp,
                    remote: conn.public,
                    local: gw_addr(),
                };
                self.schedule(
                    at,
                    Event::ToGateway {
                        path,
                        conn: Some(conn.id),
                        bytes,
                    },
                );
            }
            _ => {
                if !link.up || self.rng.chance(link.config.loss_permille) {
                    return;
                }
                let at = self.now.plus(self.delay(link.config));
                let path = Path {
                    proto: Proto::Udp,
                    remote: self.udp_public(candidate),
                    local: gw_addr(),
                };
                self.schedule(
                    at,
                    Event::ToGateway {
                        path,
                        conn: None,
                        bytes,
                    },
                );
            }
        }
    }

    fn gateway_send(&mut self, path: Path, bytes: Vec<u8>) {
        self.gateway_sent.push((self.now, path, bytes.clone()));
        match path.proto {
            Proto::Tcp => {
                let Some(c) = self
                    .tcp
                    .iter()
                    .position(|c| c.is_some_and(|c| c.public == path.remote && !c.closing))
                else {
                    return; // No such connection (any more).
                };
                let link = self.links[c];
                if !link.up {
                    return;
                }
                let Some(conn) = self.tcp[c] else { return };
                let at = self
                    .now
                    .plus(self.delay(link.config))
                    .max(conn.last_to_client);
                if let Some(conn) = self.tcp[c].as_mut() {
                    conn.last_to_client = at;
                }
                self.schedule(
                    at,
                    Event::ToClient {
                        proto: Proto::Tcp,
                        dest: path.remote,
                        conn: Some(conn.id),
                        bytes,
                    },
                );
            }
            Proto::Udp => {
                // The link is the one of the UDP candidate; whether the NAT still maps the
                // destination is decided on arrival.
                let link = self.links[UDP];
                if !link.up || self.rng.chance(link.config.loss_permille) {
                    return;
                }
                let at = self.now.plus(self.delay(link.config));
                self.schedule(
                    at,
                    Event::ToClient {
                        proto: Proto::Udp,
                        dest: path.remote,
                        conn: None,
                        bytes,
                    },
                );
            }
        }
    }

    fn open_tcp(&mut self, candidate: usize) -> Conn {
        if let Some(conn) = self.tcp[candidate] {
            return conn;
        }
        self.next_conn += 1;
        let port = self.fresh_port();
        let conn = Conn {
            id: self.next_conn,
            public: SocketAddr::new(IpAddr::V4(CLIENT_PUBLIC_IP), port),
            last_to_gateway: self.now,
            last_to_client: self.now,
            closing: false,
        };
        self.tcp[candidate] = Some(conn);
        conn
    }

    fn fresh_port(&mut self) -> u16 {
        let port = self.next_port;
        self.next_port += 1;
        port
    }

    fn udp_public(&self, candidate: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(CLIENT_PUBLIC_IP), self.nat_port[candidate])
    }

    fn udp_candidate_for(&self, dest: SocketAddr) -> Option<usize> {
        (0..self.nat_port.len()).find(|c| *c != TCP && self.udp_public(*c) == dest)
    }

    // ---- faults and interventions ----

    /// NAT rebinding: the client's UDP socket keeps its local port, but the gateway now sees
    /// it from a new public port; packets to the old one are dropped by the NAT. Returns the
    /// new public address.
    pub fn rebind_nat(&mut self) -> SocketAddr {
        self.nat_port[UDP] = self.fresh_port();
        self.udp_public(UDP)
    }

    /// The client's current public UDP address.
    pub fn client_udp_addr(&self) -> SocketAddr {
        self.udp_public(UDP)
    }

    /// The path the gateway sees for the client's UDP socket now.
    pub fn client_udp_path(&self) -> Path {
        Path {
            proto: Proto::Udp,
            remote: self.client_udp_addr(),
            local: gw_addr(),
        }
    }

    /// Blocks or unblocks a candidate's link (in both directions).
    pub fn set_link_up(&mut self, candidate: usize, up: bool) {
        self.links[candidate].up = up;
    }

    /// Closes the client's TCP connection of `candidate` (e.g. a middlebox reset): the gateway
    /// is told `handle_closed`, the client `handle_transport_error`.
    pub fn close_tcp(&mut self, candidate: usize) {
        let Some(conn) = self.tcp[candidate].take() else {
            return;
        };
        let path = Path {
            proto: Proto::Tcp,
            remote: conn.public,
            local: gw_addr(),
        };
        self.gateway.handle_closed(self.now, path);
        self.client.handle_transport_error(self.now, candidate);
        self.pump();
    }

    /// Kills the gateway and starts a new one with the same configuration on the same store.
    /// Its TCP connections die with it (the client sees them reset); store requests in flight
    /// still happen, but their outcome is lost.
    pub fn restart_gateway(&mut self) {
        self.generation += 1;
        let seed = self.rng.seed32();
        self.gateway = Gateway::new(gateway_config(&self.config.policy, seed));
        // As the driver does at start: take back the live sessions this node owns.
        for record in self.store.records.values() {
            self.gateway.restore(self.now, record.clone());
        }
        for c in 0..self.tcp.len() {
            if self.tcp[c].is_some_and(|c| !c.closing) {
                self.peer_closes(c);
            }
        }
        self.pump();
    }

    /// Delivers `bytes` to the gateway now, as if from `path` (an attacker, or a replay);
    /// returns how many IP packets the gateway forwarded to its TUN device because of it.
    pub fn inject_to_gateway(&mut self, path: Path, bytes: &[u8]) -> u64 {
        let before = self.gw_tun;
        self.gateway.handle_packet(self.now, path, bytes);
        self.pump();
        self.gw_tun - before
    }

    /// Delivers `bytes` to the client now, on `candidate`.
    pub fn inject_to_client(&mut self, candidate: usize, bytes: &[u8]) {
        self.client.handle_packet(self.now, candidate, bytes);
        self.pump();
    }

    /// The simulation's generator, for scenario randomness derived from the same seed.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    // ---- observations ----

    /// The client's current session.
    pub fn session(&self) -> SessionId {
        self.client.session().expect("the client has a session")
    }

    /// The stored record of the client's current session.
    pub fn record(&self) -> &SessionRecord {
        let id = self.session();
        self.store.records.get(&id).expect("the session is stored")
    }

    /// The client's events that match `f`, with their times.
    pub fn client_events_where(
        &self,
        f: impl Fn(&ClientEvent) -> bool,
    ) -> Vec<(Timestamp, ClientEvent)> {
        self.client_events
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }

    /// `(time, candidate, version, latency)` of every switch the client made.
    pub fn switches(&self) -> Vec<(Timestamp, usize, StateVersion, u64)> {
        self.client_events
            .iter()
            .filter_map(|(t, e)| match e {
                ClientEvent::Switched {
                    candidate,
                    state_version,
                    latency_ms,
                    ..
                } => Some((*t, *candidate, *state_version, *latency_ms)),
                _ => None,
            })
            .collect()
    }

    /// Handshakes the client sent.
    pub fn handshakes_sent(&self) -> usize {
        self.client_events_where(|e| matches!(e, ClientEvent::HandshakeSent { .. }))
            .len()
    }

    /// Gateway audit events of the given `event_type` and reason.
    pub fn gw_events(&self, event_type: &str, reason: &str) -> Vec<&AuditEvent> {
        self.gw_audit
            .iter()
            .filter(|e| e.kind.event_type() == event_type && e.reason_code.as_str() == reason)
            .collect()
    }

    /// Gateway `SECURITY_EVENT`s of the given violation type.
    pub fn security_events(&self, violation: &str) -> Vec<&AuditEvent> {
        self.gw_audit
            .iter()
            .filter(|e| {
                matches!(&e.kind, EventKind::SecurityEvent { violation_type }
                    if violation_type.as_str() == violation)
            })
            .collect()
    }

    /// Distinct sessions named in the audit streams.
    pub fn audited_sessions(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self
            .gw_audit
            .iter()
            .chain(&self.client_audit)
            .filter_map(|e| e.session_id)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The two streams as JSON lines: what the drivers would write to their files.
    pub fn audit_lines(&self) -> (Vec<String>, Vec<String>) {
        (
            self.gw_audit.iter().map(AuditEvent::to_json_line).collect(),
            self.client_audit
                .iter()
                .map(AuditEvent::to_json_line)
                .collect(),
        )
    }

    /// Runs the audit checker over both streams.
    pub fn audit_violations(&self) -> Vec<Violation> {
        let (gw, cl) = self.audit_lines();
        let sources = [("gw1.jsonl", gw), ("client.jsonl", cl)]
            .into_iter()
            .map(|(name, lines)| Source {
                name: name.to_owned(),
                lines: lines
                    .into_iter()
                    .map(|l| Ok::<_, Infallible>(l.into_bytes())),
            })
            .collect();
        let mut found = Vec::new();
        match verify(sources, |v| found.push(v.clone())) {
            Ok(_) => {}
            Err(e) => match e.error {},
        }
        found
    }

    /// Prints both audit streams and the client's events (shown when a test fails).
    pub fn dump(&self) {
        let (gw, cl) = self.audit_lines();
        println!("--- gw1 ---\n{}", gw.join("\n"));
        println!("--- client ---\n{}", cl.join("\n"));
        for (t, e) in &self.client_events {
            println!("{} {e:?}", t.since(T0));
        }
    }

    /// Asserts that the audit streams break no invariant.
    pub fn assert_audit_clean(&self) {
        let violations = self.audit_violations();
        assert!(
            violations.is_empty(),
            "audit violations:\n{}\n--- gateway stream ---\n{}",
            violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            self.audit_lines().0.join("\n")
        );
    }

    /// Asserts the audit names exactly one session, created exactly once, the client's.
    pub fn assert_one_session(&self) {
        let created: Vec<_> = self
            .gw_audit
            .iter()
            .filter(|e| matches!(e.kind, EventKind::SessionCreated { .. }))
            .collect();
        assert_eq!(created.len(), 1, "exactly one SESSION_CREATED");
        assert_eq!(
            self.audited_sessions(),
            vec![self.session()],
            "one session ID in the audit"
        );
        assert_eq!(self.store.records.len(), 1, "one record in the store");
    }

    /// The audit checks every scenario ends with: no violation, one session, created once.
    pub fn assert_clean_single_session(&self) {
        self.assert_audit_clean();
        self.assert_one_session();
    }
}

/// The gateway's configuration (the same on every restart, except the generator's seed).
pub fn gateway_config(policy: &Policy, seed: [u8; 32]) -> GatewayConfig {
    GatewayConfig {
        node: NodeId::new("gw1"),
        private_key: Zeroizing::new(GW_KEY),
        policy: policy.clone(),
        peers: vec![Peer {
            public_key: public_key(&CL_KEY).expect("a valid client key"),
            tunnel_ip: IpAddr::V4(CL_TUNNEL_IP),
        }],
        seed,
    }
}

/// The wall clock the client stamps its handshake inits with: virtual ms as ns.
pub fn wall_clock_ns(now: Timestamp) -> u64 {
    now.as_millis().saturating_mul(1_000_000)
}

/// The packet type byte of a wire packet.
pub fn packet_type(bytes: &[u8]) -> Option<u8> {
    bytes.first().copied()
}

/// Wire packet types (SPEC §4, `wire.rs`).
pub mod kind {
    /// `HANDSHAKE_INIT`.
    pub const INIT: u8 = 1;
    /// `REATTACH_REQUEST`.
    pub const REATTACH: u8 = 3;
    /// A sealed control packet.
    pub const CONTROL: u8 = 4;
    /// `DATA`.
    pub const DATA: u8 = 5;
    /// Offset of the proof in a `REATTACH_REQUEST`: type, version, session, nonce, known
    /// version, proto.
    pub const PROOF_AT: usize = 2 + 16 + 8 + 8 + 1;
}

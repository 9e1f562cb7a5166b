//! Gateway load through the sans-IO core: handshakes per second and memory per idle session.
//!
//! `cargo run --release -p jumpvpn-core --example gateway_load -- [SESSIONS]` (default 100000).
//!
//! N clients (N peers configured on one gateway) each perform a Noise IK handshake and confirm
//! it with their first packet; the store answers at once, so the figure is the gateway's own
//! cost per handshake (Noise, session creation, the state machine, sealing the master secret).
//! Only the gateway's calls are timed, and only its allocations counted (a counting
//! allocator: bytes requested, without the allocator's own overhead per block): the clients'
//! work happens in between, and the store's copies are dropped (it stands for a separate
//! service). Memory is divided by the number of sessions, once they are all idle.
//!
//! To judge the handshake rate, it first times the primitive that dominates it on this
//! machine: an X25519 variable-base multiplication (three per handshake at the gateway) and a
//! key generation (one), and prints the rate those alone would allow.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use curve25519_dalek::montgomery::MontgomeryPoint;
use jumpvpn_core::endpoint::client::{CandidateSpec, Client, ClientConfig, ClientOutput};
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig, GatewayOutput, Peer, StoreOp, StoreOutcome,
};
use jumpvpn_core::endpoint::Path;
use jumpvpn_core::handshake::{public_key, Entropy};
use jumpvpn_core::{NodeId, Policy, Proto, Timestamp};
use zeroize::Zeroizing;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let gateway_key = [7u8; 32];
    let gateway_public = public_key(&gateway_key).expect("valid key");
    let gw_addr: SocketAddr = "10.0.0.1:51820".parse().expect("address");
    let mut entropy = Entropy::from_seed([1; 32]);

    eprintln!("preparing {n} clients …");
    let mut peers = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    let mut inits = Vec::with_capacity(n);
    for i in 0..n {
        let mut key = entropy.seed();
        key[0] &= 248;
        key[31] = (key[31] & 127) | 64;
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + 2 + i as u32));
        peers.push(Peer {
            public_key: public_key(&key).expect("valid key"),
            tunnel_ip: ip,
        });
        let mut client = Client::new(ClientConfig {
            private_key: Zeroizing::new(key),
            gateway_public,
            candidates: vec![CandidateSpec {
                proto: Proto::Udp,
                addr: gw_addr,
            }],
            node: NodeId::new("c"),
            seed: entropy.seed(),
        });
        client.connect(Timestamp(1_000), 1);
        let from = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 40_000));
        let path = Path {
            proto: Proto::Udp,
            remote: from,
            local: gw_addr,
        };
        inits.push((path, transmits(&mut client).pop().expect("an init")));
        clients.push(client);
    }

    let (variable, fixed) = x25519_costs(2_000);
    println!(
        "X25519 here: {:.1} µs per variable-base multiplication, {:.1} µs per key generation; \
         3 + 1 per handshake allow at most {:.0} handshakes/s on one core (4 + 1: {:.0})",
        variable * 1e6,
        fixed * 1e6,
        1.0 / (3.0 * variable + fixed),
        1.0 / (4.0 * variable + fixed),
    );

    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut gateway = Gateway::new(GatewayConfig {
        node: NodeId::new("gw1"),
        private_key: Zeroizing::new(gateway_key),
        policy: Policy::default(),
        peers,
        seed: [2; 32],
    });
    let start_time = started.elapsed();
    let peers_only = LIVE.load(Ordering::Relaxed);
    let now = Timestamp(2_000);
    // Only the gateway's work is timed and counted: the clients' answers are made in between.
    let mut busy = Duration::ZERO;
    let mut gateway_heap = 0isize;
    let mut gateway_blocks = 0isize;
    for ((path, init), client) in inits.iter().zip(clients.iter_mut()) {
        let mark = (
            Instant::now(),
            LIVE.load(Ordering::Relaxed),
            BLOCKS.load(Ordering::Relaxed),
        );
        gateway.handle_packet(now, *path, init);
        let acks = drain(&mut gateway, now);
        busy += mark.0.elapsed();
        gateway_heap += LIVE.load(Ordering::Relaxed) - mark.1;
        gateway_blocks += BLOCKS.load(Ordering::Relaxed) - mark.2;

        for ack in &acks {
            client.handle_packet(now, 0, ack);
        }
        // The answers were the gateway's allocations: their release counts for it too.
        let mark = (LIVE.load(Ordering::Relaxed), BLOCKS.load(Ordering::Relaxed));
        drop(acks);
        gateway_heap += LIVE.load(Ordering::Relaxed) - mark.0;
        gateway_blocks += BLOCKS.load(Ordering::Relaxed) - mark.1;
        // The client's first packet under the session's keys confirms the handshake.
        let confirm = transmits(client);

        let mark = (
            Instant::now(),
            LIVE.load(Ordering::Relaxed),
            BLOCKS.load(Ordering::Relaxed),
        );
        for bytes in &confirm {
            gateway.handle_packet(now, *path, bytes);
        }
        drain(&mut gateway, now);
        busy += mark.0.elapsed();
        gateway_heap += LIVE.load(Ordering::Relaxed) - mark.1;
        gateway_blocks += BLOCKS.load(Ordering::Relaxed) - mark.2;
    }
    let sessions = gateway.session_count();
    assert_eq!(sessions, n, "every handshake created a session");
    let per_session = gateway_heap as f64 / n as f64;
    println!(
        "gateway start with {n} peers: {:.2} s (one X25519 per peer, precomputed)",
        start_time.as_secs_f64()
    );
    println!(
        "{n} handshakes in {:.2} s of gateway time: {:.0} handshakes/s on one core",
        busy.as_secs_f64(),
        n as f64 / busy.as_secs_f64()
    );
    println!(
        "gateway heap: {:.0} bytes in {:.1} allocations per idle session (plus {:.0} bytes per \
         configured peer)",
        per_session,
        gateway_blocks as f64 / n as f64,
        (peers_only - before) as f64 / n as f64
    );
}

/// The datagrams `client` has queued.
fn transmits(client: &mut Client) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(o) = client.poll_output() {
        if let ClientOutput::Transmit { bytes, .. } = o {
            out.push(bytes);
        }
    }
    out
}

/// Runs the gateway's outputs to completion against a store that answers at once; returns
/// the datagrams it sent.
fn drain(gateway: &mut Gateway, now: Timestamp) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    while let Some(out) = gateway.poll_output() {
        match out {
            GatewayOutput::Store(req) => {
                // Nothing reads the records back: the store's copy is dropped, so that only
                // the gateway's own memory is counted.
                if let StoreOp::Create(_) = req.op {
                    gateway.handle_store(now, req.id, StoreOutcome::Written);
                }
            }
            GatewayOutput::Transmit(t) => sent.push(t.bytes),
            _ => {}
        }
    }
    sent
}

/// Seconds per X25519 variable-base multiplication and per key generation (fixed base), each
/// timed over `count` dependent operations (every output feeds the next input).
fn x25519_costs(count: u32) -> (f64, f64) {
    let mut point = MontgomeryPoint::mul_base_clamped([5; 32]);
    let mut scalar = [9u8; 32];
    let start = Instant::now();
    for _ in 0..count {
        point = point.mul_clamped(scalar);
        scalar[0] ^= point.0[0];
    }
    let variable = start.elapsed().as_secs_f64() / f64::from(count);
    let start = Instant::now();
    for _ in 0..count {
        scalar = MontgomeryPoint::mul_base_clamped(scalar).to_bytes();
    }
    let fixed = start.elapsed().as_secs_f64() / f64::from(count);
    std::hint::black_box((point, scalar));
    (variable, fixed)
}

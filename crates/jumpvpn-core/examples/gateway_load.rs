//! Gateway load through the sans-IO core: handshakes per second and memory per idle session.
//!
//! `cargo run --release -p jumpvpn-core --example gateway_load -- [SESSIONS]` (default 100000).
//!
//! N clients (N peers configured on one gateway) each perform a Noise IK handshake; the store
//! is an in-process map answering at once, so the figure is the gateway's own cost per
//! handshake (Noise, session creation, the state machine, sealing the master secret). Client
//! messages are prepared before the clock starts. Memory is the heap growth of the gateway
//! (a counting allocator: bytes requested, without the allocator's own overhead per block)
//! divided by the number of sessions, once they are all idle. The in-process store stands for
//! a separate service: its table is allocated before the count starts.
//!
//! To judge the handshake rate, it first times the primitive that dominates it on this
//! machine: an X25519 variable-base multiplication (three per handshake at the gateway) and a
//! key generation (one), and prints the rate those alone would allow.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use curve25519_dalek::montgomery::MontgomeryPoint;
use jumpvpn_core::endpoint::client::{CandidateSpec, Client, ClientConfig, ClientOutput};
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig, GatewayOutput, Peer, StoreOp, StoreOutcome,
};
use jumpvpn_core::endpoint::Path;
use jumpvpn_core::handshake::{public_key, Entropy};
use jumpvpn_core::{NodeId, Policy, Proto, SessionId, SessionRecord, Timestamp};
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
        while let Some(out) = client.poll_output() {
            if let ClientOutput::Transmit { bytes, .. } = out {
                let from = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 40_000));
                inits.push((from, bytes));
            }
        }
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

    let mut store: HashMap<SessionId, SessionRecord> = HashMap::with_capacity(n);
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
    let blocks_before = BLOCKS.load(Ordering::Relaxed);
    let now = Timestamp(2_000);
    let start = Instant::now();
    for (from, bytes) in &inits {
        let path = Path {
            proto: Proto::Udp,
            remote: *from,
            local: gw_addr,
        };
        gateway.handle_packet(now, path, bytes);
        while let Some(out) = gateway.poll_output() {
            if let GatewayOutput::Store(req) = out {
                if let StoreOp::Create(record) = req.op {
                    store.insert(record.session_id, record);
                    gateway.handle_store(now, req.id, StoreOutcome::Written);
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let after = LIVE.load(Ordering::Relaxed);
    let blocks_after = BLOCKS.load(Ordering::Relaxed);
    let sessions = gateway.session_count();
    assert_eq!(sessions, n, "every handshake created a session");
    let per_session = (after - peers_only) as f64 / n as f64;
    println!(
        "gateway start with {n} peers: {:.2} s (one X25519 per peer, precomputed)",
        start_time.as_secs_f64()
    );
    println!(
        "{n} handshakes in {:.2} s: {:.0} handshakes/s on one core",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "gateway heap: {:.0} bytes in {:.1} allocations per idle session (plus {:.0} bytes per \
         configured peer)",
        per_session,
        (blocks_after - blocks_before) as f64 / n as f64,
        (peers_only - before) as f64 / n as f64
    );
    drop(store);
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

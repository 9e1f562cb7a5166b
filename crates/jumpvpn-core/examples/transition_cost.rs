//! Runs N accepted reattach transitions, for counting instructions with callgrind (a figure
//! that, unlike wall time, does not move with the load of a shared machine):
//!
//! ```sh
//! cargo build --release -p jumpvpn-core --example transition_cost
//! valgrind --tool=callgrind target/release/examples/transition_cost 100000
//! ```
//! and divide the instructions of `jumpvpn_core::machine::apply` by N (docs/BENCHMARKS.md).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    Candidate, NodeId, Policy, Proto, SessionId, SessionRecord, Timestamp, TransportId,
};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let node = NodeId::new("gw1");
    let t0 = Timestamp(1_700_000_000_000);
    let candidate = |id| Candidate {
        transport_id: TransportId(id),
        proto: Proto::Udp,
        client_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000),
        gateway_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820),
    };
    let birth = SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(1),
            owner: node.clone(),
            client_key: [7; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            policy: Policy::default().into(),
            secrets: SealedSecret::new(vec![0xAA; 48]),
        },
        t0,
    );
    let step = |rec: &SessionRecord, ev: SessionEvent| match apply(
        rec,
        &ev,
        &Context {
            now: t0,
            node: &node,
        },
    ) {
        Outcome::Commit(c) => c.record,
        other => panic!("not committed: {other:?}"),
    };
    let attached = step(
        &birth,
        SessionEvent::HandshakeOk {
            candidate: candidate(1),
        },
    );
    let recovering = step(&attached, SessionEvent::TransportDead);
    let attempt = SessionEvent::Reattach(ReattachAttempt {
        nonce: 1,
        known_version: recovering.state_version,
        candidate: candidate(2),
        proof: ProofVerdict::Valid,
    });
    let ctx = Context {
        now: t0.plus(800),
        node: &node,
    };
    let mut committed = 0u64;
    for _ in 0..n {
        if let Outcome::Commit(c) = apply(black_box(&recovering), black_box(&attempt), &ctx) {
            committed += u64::from(c.record.state_version.get() > 0);
        }
    }
    println!("{committed} accepted transitions");
}

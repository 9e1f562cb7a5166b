//! Writes a two-node audit stream made by the state machine itself, for measuring
//! `jumpvpn audit verify` on large files (docs/BENCHMARKS.md):
//!
//! ```sh
//! cargo run --release -p jumpvpn-core --example audit_stream -- DIR SESSIONS SWITCHES
//! ```
//! Each session is created on gw1, switches transport SWITCHES times (transport dead, then
//! reattach), is migrated to gw2, reattaches there and is terminated. gw2's clock runs 2 s
//! behind gw1's. Writes DIR/gw1.jsonl and DIR/gw2.jsonl.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    Candidate, NodeId, Policy, Proto, ReasonCode, SessionId, SessionRecord, Timestamp, TransportId,
};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".".to_owned());
    let sessions: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let switches: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let (gw1, gw2) = (NodeId::new("gw1"), NodeId::new("gw2"));
    let mut out1 = BufWriter::new(File::create(format!("{dir}/gw1.jsonl"))?);
    let mut out2 = BufWriter::new(File::create(format!("{dir}/gw2.jsonl"))?);
    let candidate = |id| Candidate {
        transport_id: TransportId(id),
        proto: Proto::Udp,
        client_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000),
        gateway_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820),
    };
    let reattach = |nonce, rec: &SessionRecord, id| {
        SessionEvent::Reattach(ReattachAttempt {
            nonce,
            known_version: rec.state_version,
            candidate: candidate(id),
            proof: ProofVerdict::Valid,
        })
    };
    let mut events = 0u64;
    // Sessions interleave in time: session i starts at i ms, each step is 4 s (under the anti-flap bound).
    for i in 0..sessions {
        let mut now = Timestamp(1_700_000_000_000 + i);
        let mut rec = SessionRecord::birth(
            NewSession {
                session_id: SessionId::from_u128(u128::from(i) + 1),
                owner: gw1.clone(),
                client_key: [7; 32],
                tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
                policy: Policy::default().into(),
                secrets: SealedSecret::new(vec![0; 48]),
            },
            now,
        );
        let mut steps: Vec<(SessionEvent, &NodeId)> = vec![(
            SessionEvent::HandshakeOk {
                candidate: candidate(1),
            },
            &gw1,
        )];
        for n in 1..=switches {
            steps.push((SessionEvent::TransportDead, &gw1));
            steps.push((reattach(n, &rec, n + 1), &gw1));
        }
        steps.push((
            SessionEvent::Freeze {
                reason: ReasonCode::Migration,
            },
            &gw1,
        ));
        steps.push((
            SessionEvent::Transfer {
                to: gw2.clone(),
                reason: ReasonCode::Migration,
            },
            &gw1,
        ));
        steps.push((reattach(switches + 1, &rec, 999), &gw2));
        steps.push((
            SessionEvent::Terminate {
                reason: ReasonCode::PolicyTermination,
            },
            &gw2,
        ));
        for (event, node) in steps {
            // Reattaches must name the version current when they are applied.
            let event = match event {
                SessionEvent::Reattach(mut a) => {
                    a.known_version = rec.state_version;
                    SessionEvent::Reattach(a)
                }
                other => other,
            };
            let Outcome::Commit(c) = apply(&rec, &event, &Context { now, node }) else {
                panic!("step {event:?} of session {i} was not committed");
            };
            for mut e in c.events {
                events += 1;
                if e.node_id == gw2 {
                    e.ts_ms -= 2_000;
                    writeln!(out2, "{}", e.to_json_line())?;
                } else {
                    writeln!(out1, "{}", e.to_json_line())?;
                }
            }
            rec = c.record;
            now = now.plus(4_000);
        }
    }
    out1.flush()?;
    out2.flush()?;
    eprintln!("{events} events, {sessions} sessions");
    Ok(())
}

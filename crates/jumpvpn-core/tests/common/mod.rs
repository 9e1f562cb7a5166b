//! Builders shared by the state machine tests.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::machine::{apply, Context, Outcome, ProofVerdict, ReattachAttempt, SessionEvent};
use jumpvpn_core::record::{NewSession, SealedSecret};
use jumpvpn_core::{
    Candidate, NodeId, Policy, Proto, SessionId, SessionRecord, SessionState, StateVersion,
    Timestamp, TransportId,
};

pub const T0: Timestamp = Timestamp(1_700_000_000_000);

pub fn gw(name: &str) -> NodeId {
    NodeId::new(name)
}

pub fn candidate(id: u64) -> Candidate {
    Candidate {
        transport_id: TransportId(id),
        proto: if id.is_multiple_of(2) {
            Proto::Tcp
        } else {
            Proto::Udp
        },
        client_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000),
        gateway_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820),
    }
}

pub fn birth(id: u128, owner: &NodeId, policy: Policy, now: Timestamp) -> SessionRecord {
    SessionRecord::birth(
        NewSession {
            session_id: SessionId::from_u128(id),
            owner: owner.clone(),
            client_key: [7; 32],
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            policy: policy.into(),
            secrets: SealedSecret::new(vec![0xAA; 48]),
        },
        now,
    )
}

pub fn reattach(nonce: u64, known: StateVersion, transport: u64) -> SessionEvent {
    SessionEvent::Reattach(ReattachAttempt {
        nonce,
        known_version: known,
        candidate: candidate(transport),
        proof: ProofVerdict::Valid,
    })
}

/// Applies `event` and returns the committed record, panicking (in a test) otherwise.
pub fn commit(
    record: &SessionRecord,
    event: SessionEvent,
    node: &NodeId,
    now: Timestamp,
) -> SessionRecord {
    match apply(record, &event, &Context { now, node }) {
        Outcome::Commit(c) => c.record,
        other => panic!("{event:?} in {} was not committed: {other:?}", record.state),
    }
}

/// A record of session `id` driven into `state` on node gw1 at `T0` with the default policy.
pub fn record_in(state: SessionState) -> SessionRecord {
    let node = gw("gw1");
    let policy = Policy::default();
    let degraded_after = policy.degraded_after_ms;
    let rec = birth(1, &node, policy, T0);
    if state == SessionState::Birth {
        return rec;
    }
    let rec = commit(
        &rec,
        SessionEvent::HandshakeOk {
            candidate: candidate(1),
        },
        &node,
        T0,
    );
    match state {
        SessionState::Attached => rec,
        SessionState::Volatile | SessionState::Degraded => {
            let breach = jumpvpn_core::machine::HealthBreach {
                metric: jumpvpn_core::machine::HealthMetric::LossPct,
                threshold: 20,
                observed: 35,
            };
            let rec = commit(&rec, SessionEvent::VolatilitySignal(breach), &node, T0);
            if state == SessionState::Volatile {
                return rec;
            }
            commit(&rec, SessionEvent::Timeout, &node, T0.plus(degraded_after))
        }
        SessionState::Recovering => commit(&rec, SessionEvent::TransportDead, &node, T0),
        SessionState::Terminated => commit(
            &rec,
            SessionEvent::Terminate {
                reason: jumpvpn_core::ReasonCode::PolicyTermination,
            },
            &node,
            T0,
        ),
        SessionState::Birth => unreachable!(),
    }
}

//! The wire codec: total decoding (any bytes give a packet or a typed error, never a panic),
//! exact round trips, and the errors that name what is wrong.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use jumpvpn_core::wire::{
    reason_id, Control, DecodeError, HandshakeAckPayload, Packet, ReattachRequest, PROTOCOL_VERSION,
};
use jumpvpn_core::{OwnerEpoch, Proto, ReasonCode, SessionId, StateVersion, TransportId};
use proptest::prelude::*;

fn session() -> impl Strategy<Value = SessionId> {
    any::<u128>().prop_map(SessionId::from_u128)
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(ReasonCode::ALL.to_vec())
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn control() -> impl Strategy<Value = Control> {
    let ve = (any::<u64>(), any::<u64>()).prop_map(|(v, e)| (StateVersion(v), OwnerEpoch(e)));
    prop_oneof![
        any::<u64>().prop_map(|sent_ms| Control::Keepalive { sent_ms }),
        (any::<u64>(), ve.clone()).prop_map(|(echo_ms, (state_version, owner_epoch))| {
            Control::KeepaliveAck {
                echo_ms,
                state_version,
                owner_epoch,
            }
        }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(loss_pct, rtt_ms, jitter_ms)| {
            Control::HealthReport {
                loss_pct,
                rtt_ms,
                jitter_ms,
            }
        }),
        (ve.clone(), any::<u64>()).prop_map(|((state_version, owner_epoch), t)| {
            Control::ReattachAck {
                state_version,
                owner_epoch,
                transport_id: TransportId(t),
            }
        }),
        (
            reason(),
            any::<bool>(),
            ve.clone(),
            prop::option::of(addr())
        )
            .prop_map(
                |(reason, retryable, (state_version, owner_epoch), owner_hint)| {
                    Control::ReattachReject {
                        reason,
                        retryable,
                        state_version,
                        owner_epoch,
                        owner_hint,
                    }
                }
            ),
        (ve.clone(), addr()).prop_map(|((state_version, owner_epoch), to)| Control::Redirect {
            state_version,
            owner_epoch,
            to
        }),
        ve.prop_map(|(state_version, owner_epoch)| Control::ReattachHint {
            state_version,
            owner_epoch
        }),
        reason().prop_map(|reason| Control::Terminate { reason }),
    ]
}

/// Packets with their borrowed parts owned by the strategy.
fn packet_bytes() -> impl Strategy<Value = Vec<u8>> {
    let blob = prop::collection::vec(any::<u8>(), 16..120);
    prop_oneof![
        (
            prop::collection::vec(any::<u8>(), 1..120),
            any::<[u8; 16]>()
        )
            .prop_map(|(noise, mac1)| encode(&Packet::HandshakeInit {
                noise: &noise,
                mac1
            })),
        prop::collection::vec(any::<u8>(), 1..120)
            .prop_map(|noise| encode(&Packet::HandshakeAck { noise: &noise })),
        (
            session(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(session, nonce, v, tcp, proof)| {
                let proto = if tcp { Proto::Tcp } else { Proto::Udp };
                encode(&Packet::Reattach(ReattachRequest {
                    session,
                    nonce,
                    known_version: StateVersion(v),
                    proto,
                    proof,
                }))
            }),
        (session(), any::<u64>(), blob.clone()).prop_map(|(session, counter, sealed)| encode(
            &Packet::Control {
                session,
                counter,
                sealed: &sealed
            }
        )),
        (session(), any::<u64>(), any::<u64>(), blob).prop_map(|(session, v, counter, sealed)| {
            encode(&Packet::Data {
                session,
                bound_at_version: StateVersion(v),
                counter,
                sealed: &sealed,
            })
        }),
        (session(), reason())
            .prop_map(|(session, reason)| encode(&Packet::RejectNotice { session, reason })),
    ]
}

fn encode(packet: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    packet.encode(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_to_a_value_or_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Packet::decode(&bytes);
        let _ = Control::decode(&bytes);
        let _ = HandshakeAckPayload::decode(&bytes);
    }

    #[test]
    fn every_packet_round_trips_exactly(bytes in packet_bytes()) {
        let packet = Packet::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(encode(&packet), bytes);
    }

    #[test]
    fn mutated_packets_never_panic_and_reencode_to_themselves(
        bytes in packet_bytes(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = bytes;
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(packet) = Packet::decode(&bytes) {
            // Whatever decodes is canonical: it encodes back to the same bytes.
            prop_assert_eq!(encode(&packet), bytes);
        }
    }

    #[test]
    fn every_control_body_round_trips_exactly(c in control()) {
        let mut bytes = Vec::new();
        c.encode(&mut bytes);
        prop_assert_eq!(Control::decode(&bytes), Ok(c));
        // One byte less is refused, one byte more too.
        prop_assert!(Control::decode(&bytes[..bytes.len() - 1]).is_err());
        bytes.push(0);
        prop_assert_eq!(Control::decode(&bytes), Err(DecodeError::TooLong));
    }

    #[test]
    fn handshake_ack_payload_round_trips(s in session(), v in any::<u64>(), e in any::<u64>(), ip in addr(), t in any::<u64>(), k in any::<u32>(), d in any::<u32>(), ttl in any::<u64>()) {
        let p = HandshakeAckPayload { session: s, state_version: StateVersion(v), owner_epoch: OwnerEpoch(e), tunnel_ip: ip.ip(), transport_id: TransportId(t), keepalive_interval_ms: k, client_dead_after_ms: d, session_ttl_ms: ttl };
        let mut bytes = Vec::new();
        p.encode(&mut bytes);
        prop_assert_eq!(HandshakeAckPayload::decode(&bytes), Ok(p));
    }
}

#[test]
fn malformed_headers_are_named() {
    assert_eq!(Packet::decode(&[]), Err(DecodeError::Truncated));
    assert_eq!(
        Packet::decode(&[9, PROTOCOL_VERSION]),
        Err(DecodeError::UnknownType(9))
    );
    assert_eq!(
        Packet::decode(&[1, 2, 0xAA]),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(
        Packet::decode(&[1, PROTOCOL_VERSION]),
        Err(DecodeError::Truncated),
        "empty noise"
    );
    // A sealed part shorter than a tag cannot be a sealed message.
    let mut short = vec![4, PROTOCOL_VERSION];
    short.extend_from_slice(&[0; 16 + 8 + 15]);
    assert_eq!(Packet::decode(&short), Err(DecodeError::Truncated));
    // Trailing bytes after a fixed-size packet.
    let mut notice = encode(&Packet::RejectNotice {
        session: SessionId::from_u128(1),
        reason: ReasonCode::AuthFail,
    });
    notice.push(0);
    assert_eq!(Packet::decode(&notice), Err(DecodeError::TooLong));
    assert_eq!(Packet::decode(&vec![1; 70_000]), Err(DecodeError::TooLong));
}

#[test]
fn bad_field_values_are_refused() {
    let mut reattach = encode(&Packet::Reattach(ReattachRequest {
        session: SessionId::from_u128(7),
        nonce: 1,
        known_version: StateVersion(3),
        proto: Proto::Udp,
        proof: [9; 32],
    }));
    reattach[2 + 16 + 8 + 8] = 3; // proto
    assert_eq!(
        Packet::decode(&reattach),
        Err(DecodeError::InvalidField("proto"))
    );
    let mut notice = encode(&Packet::RejectNotice {
        session: SessionId::from_u128(1),
        reason: ReasonCode::AuthFail,
    });
    let n = notice.len();
    notice[n - 2..].copy_from_slice(&u16::MAX.to_be_bytes());
    assert_eq!(
        Packet::decode(&notice),
        Err(DecodeError::InvalidField("reason code"))
    );
    assert_eq!(
        Control::decode(&[5, 0, 17, 2]),
        Err(DecodeError::InvalidField("flag"))
    );
}

#[test]
fn reason_wire_numbers_never_move() {
    // Wire numbers are positions in ReasonCode::ALL: new codes go at the end, never between.
    assert_eq!(reason_id(ReasonCode::HandshakeOk), 0);
    assert_eq!(reason_id(ReasonCode::ReattachAccept), 16);
    assert_eq!(reason_id(ReasonCode::CommitUnknown), 30);
    assert_eq!(reason_id(ReasonCode::Failover), 34);
    assert_eq!(reason_id(ReasonCode::CounterExhausted), 38);
}

#[test]
fn the_header_is_the_associated_data_of_sealed_packets() {
    let data = encode(&Packet::Data {
        session: SessionId::from_u128(5),
        bound_at_version: StateVersion(9),
        counter: 77,
        sealed: &[0xCD; 40],
    });
    assert_eq!(Packet::associated_data(&data), Some(&data[..34]));
    let control = encode(&Packet::Control {
        session: SessionId::from_u128(5),
        counter: 1,
        sealed: &[0xCD; 20],
    });
    assert_eq!(Packet::associated_data(&control), Some(&control[..26]));
    assert_eq!(Packet::associated_data(&[1, 1, 1]), None);
}

#[test]
fn a_reattach_request_does_not_print_its_proof() {
    let r = ReattachRequest {
        session: SessionId::from_u128(1),
        nonce: 2,
        known_version: StateVersion(3),
        proto: Proto::Tcp,
        proof: [0xAB; 32],
    };
    let shown = format!("{r:?}");
    assert!(
        !shown.contains("171") && !shown.to_lowercase().contains("ab, "),
        "{shown}"
    );
}

//! The cryptographic binding: proofs, per-binding traffic keys (the data-plane fence) and
//! sealing.

use jumpvpn_core::crypto::{MasterSecret, OpenError};
use jumpvpn_core::machine::ProofVerdict;
use jumpvpn_core::wire::{Packet, ReattachRequest, PROTOCOL_VERSION};
use jumpvpn_core::{OwnerEpoch, Proto, SessionId, StateVersion};
use proptest::prelude::*;

const S: SessionId = SessionId::from_u128(0x1234);

fn request(master: &MasterSecret) -> ReattachRequest {
    ReattachRequest {
        session: S,
        nonce: 7,
        known_version: StateVersion(12),
        proto: Proto::Tcp,
        proof: master.proof(S, 7, StateVersion(12), Proto::Tcp),
    }
}

#[test]
fn a_proof_verifies_only_with_its_secret_and_its_exact_fields() {
    let master = MasterSecret::from_bytes([1; 32]);
    let good = request(&master);
    assert_eq!(master.verify(&good), ProofVerdict::Valid);
    let mut forged = good;
    forged.proof[31] ^= 1;
    let changed = [
        ReattachRequest {
            session: SessionId::from_u128(0x1235),
            ..good
        },
        ReattachRequest { nonce: 8, ..good },
        ReattachRequest {
            known_version: StateVersion(13),
            ..good
        },
        ReattachRequest {
            proto: Proto::Udp,
            ..good
        },
        forged,
    ];
    for r in changed {
        assert_eq!(master.verify(&r), ProofVerdict::Invalid, "{r:?}");
    }
    assert_eq!(
        MasterSecret::from_bytes([2; 32]).verify(&good),
        ProofVerdict::Invalid
    );
}

#[test]
fn packets_of_a_replaced_binding_or_a_former_owner_do_not_open() {
    let master = MasterSecret::from_bytes([9; 32]);
    let (v, e) = (StateVersion(5), OwnerEpoch(2));
    let mut sealed = Vec::new();
    master
        .binding_keys(S, v, e)
        .to_gateway
        .seal(0, b"hdr", b"an IP packet", &mut sealed);
    let current = master.binding_keys(S, v, e);
    assert_eq!(
        current.to_gateway.open(0, b"hdr", &sealed).as_deref(),
        Ok(&b"an IP packet"[..])
    );
    // The next binding, a new owner, another session, the other direction, the control keys:
    // each is a different key.
    let others = [
        master.binding_keys(S, StateVersion(6), e).to_gateway,
        master.binding_keys(S, v, OwnerEpoch(3)).to_gateway,
        master
            .binding_keys(SessionId::from_u128(0x9999), v, e)
            .to_gateway,
        current.to_client,
        master.control_keys(S).to_gateway,
        MasterSecret::from_bytes([8; 32])
            .binding_keys(S, v, e)
            .to_gateway,
    ];
    for key in others {
        assert_eq!(key.open(0, b"hdr", &sealed), Err(OpenError));
    }
}

#[test]
fn tampering_with_anything_sealed_or_authenticated_is_detected() {
    let keys = MasterSecret::from_bytes([3; 32]).control_keys(S);
    let mut sealed = Vec::new();
    keys.to_client
        .seal(41, b"header", b"REDIRECT to gw2", &mut sealed);
    assert!(keys.to_client.open(41, b"header", &sealed).is_ok());
    assert_eq!(
        keys.to_client.open(42, b"header", &sealed),
        Err(OpenError),
        "other counter"
    );
    assert_eq!(
        keys.to_client.open(41, b"headex", &sealed),
        Err(OpenError),
        "other header"
    );
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x80;
        assert_eq!(
            keys.to_client.open(41, b"header", &bad),
            Err(OpenError),
            "byte {i}"
        );
    }
    assert_eq!(
        keys.to_client.open(41, b"header", &sealed[..15]),
        Err(OpenError),
        "shorter than a tag"
    );
}

#[test]
fn a_data_packet_seals_under_its_wire_header() {
    let keys = MasterSecret::from_bytes([4; 32]).binding_keys(S, StateVersion(3), OwnerEpoch(1));
    let mut packet = vec![5, PROTOCOL_VERSION];
    packet.extend_from_slice(&S.to_bytes());
    packet.extend_from_slice(&3u64.to_be_bytes());
    packet.extend_from_slice(&77u64.to_be_bytes());
    let header = packet.clone();
    keys.to_gateway
        .seal(77, &header, b"\x45\x00 ip", &mut packet);
    let Ok(Packet::Data {
        session,
        bound_at_version,
        counter,
        sealed,
    }) = Packet::decode(&packet)
    else {
        panic!("not a data packet");
    };
    assert_eq!(
        (session, bound_at_version, counter),
        (S, StateVersion(3), 77)
    );
    let aad = Packet::associated_data(&packet).expect("sealed packet");
    assert_eq!(
        keys.to_gateway.open(counter, aad, sealed).as_deref(),
        Ok(&b"\x45\x00 ip"[..])
    );
}

#[test]
fn secrets_do_not_show_in_debug_output() {
    let master = MasterSecret::from_bytes([0xAB; 32]);
    let keys = master.binding_keys(S, StateVersion(1), OwnerEpoch(1));
    for shown in [format!("{master:?}"), format!("{keys:?}")] {
        assert!(shown.contains("redacted"), "{shown}");
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("ab"),
            "{shown}"
        );
    }
}

proptest! {
    #[test]
    fn sealing_round_trips_and_binds_to_version_and_epoch(
        secret in any::<[u8; 32]>(), session in any::<u128>(), v in 1u64..u64::MAX, e in 1u64..u64::MAX,
        counter in any::<u64>(), body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let master = MasterSecret::from_bytes(secret);
        let session = SessionId::from_u128(session);
        let keys = master.binding_keys(session, StateVersion(v), OwnerEpoch(e));
        let mut sealed = Vec::new();
        keys.to_client.seal(counter, b"aad", &body, &mut sealed);
        prop_assert_eq!(sealed.len(), body.len() + 16);
        prop_assert_eq!(keys.to_client.open(counter, b"aad", &sealed), Ok(body));
        let next = master.binding_keys(session, StateVersion(v + 1), OwnerEpoch(e));
        prop_assert_eq!(next.to_client.open(counter, b"aad", &sealed), Err(OpenError));
        let moved = master.binding_keys(session, StateVersion(v), OwnerEpoch(e + 1));
        prop_assert_eq!(moved.to_client.open(counter, b"aad", &sealed), Err(OpenError));
    }
}

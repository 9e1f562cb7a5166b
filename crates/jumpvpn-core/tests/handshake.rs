//! The Noise IK handshake: both ends agree on one master secret; wrong keys, tampering and
//! malformed payloads are refused; a replayed init opens with its old timestamp (the gateway's
//! freshness rule refuses it); generators are deterministic per seed.

use std::net::{IpAddr, Ipv4Addr};

use jumpvpn_core::crypto::{Kek, MasterSecret};
use jumpvpn_core::handshake::{
    public_key, ClientHandshake, Entropy, HandshakeError, InitReceived, Responder,
};
use jumpvpn_core::wire::{HandshakeAckPayload, Packet};
use jumpvpn_core::{OwnerEpoch, Proto, SessionId, StateVersion, TransportId};

const GATEWAY: [u8; 32] = [7; 32];
const CLIENT: [u8; 32] = [9; 32];

fn ack() -> HandshakeAckPayload {
    HandshakeAckPayload {
        session: SessionId::from_u128(0xfeed),
        state_version: StateVersion(1),
        owner_epoch: OwnerEpoch(1),
        tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
        transport_id: TransportId(42),
        keepalive_interval_ms: 1000,
        client_dead_after_ms: 3000,
        session_ttl_ms: 86_400_000,
    }
}

fn noise_of(packet: &[u8]) -> &[u8] {
    match Packet::decode(packet).expect("a handshake packet decodes") {
        Packet::HandshakeInit { noise, .. } | Packet::HandshakeAck { noise } => noise,
        other => panic!("not a handshake packet: {other:?}"),
    }
}

fn same_secret(a: &MasterSecret, b: &MasterSecret) -> bool {
    let s = SessionId::from_u128(1);
    a.proof(s, 1, StateVersion(1), Proto::Udp) == b.proof(s, 1, StateVersion(1), Proto::Udp)
}

#[test]
fn both_ends_derive_one_master_secret_and_the_ack_payload_arrives() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let mut init = Vec::new();
    let client = ClientHandshake::initiate(&CLIENT, &gateway_public, 1234, [1; 32], &mut init)
        .expect("initiates");
    let received = InitReceived::open(&GATEWAY, noise_of(&init), [2; 32]).expect("opens");
    assert_eq!(received.client_key, public_key(&CLIENT).expect("valid key"));
    assert_eq!(received.timestamp, 1234);
    let mut reply = Vec::new();
    let gateway_master = received.accept(&ack(), &mut reply).expect("answers");
    let (payload, client_master) = client.finish(noise_of(&reply)).expect("finishes");
    assert_eq!(payload, ack());
    assert!(same_secret(&gateway_master, &client_master));
}

#[test]
fn a_responder_with_precomputed_keys_agrees_with_its_clients_known_or_not() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let stranger = [11u8; 32];
    let responder = Responder::new(&GATEWAY, [&public_key(&CLIENT).expect("valid key")]);
    for (private, seed) in [(CLIENT, [1; 32]), (stranger, [3; 32])] {
        let mut init = Vec::new();
        let client = ClientHandshake::initiate(&private, &gateway_public, 7, seed, &mut init)
            .expect("initiates");
        let received = responder.open(noise_of(&init), [2; 32]).expect("opens");
        assert_eq!(
            received.client_key,
            public_key(&private).expect("valid key")
        );
        let mut reply = Vec::new();
        let gateway_master = received.accept(&ack(), &mut reply).expect("answers");
        let (_, client_master) = client.finish(noise_of(&reply)).expect("finishes");
        assert!(same_secret(&gateway_master, &client_master));
        // The same init, opened without any precomputation, gives the same secret.
        let plain = InitReceived::open(&GATEWAY, noise_of(&init), [2; 32]).expect("opens");
        let plain_master = plain.accept(&ack(), &mut Vec::new()).expect("answers");
        assert!(same_secret(&gateway_master, &plain_master));
    }
}

#[test]
fn two_handshakes_of_one_client_give_different_secrets() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let run = |client_seed: [u8; 32], gateway_seed: [u8; 32]| {
        let mut init = Vec::new();
        let client = ClientHandshake::initiate(&CLIENT, &gateway_public, 1, client_seed, &mut init)
            .expect("initiates");
        let received = InitReceived::open(&GATEWAY, noise_of(&init), gateway_seed).expect("opens");
        let mut reply = Vec::new();
        let _ = received.accept(&ack(), &mut reply).expect("answers");
        client.finish(noise_of(&reply)).expect("finishes").1
    };
    let first = run([1; 32], [2; 32]);
    assert!(
        same_secret(&first, &run([1; 32], [2; 32])),
        "deterministic per seed"
    );
    assert!(!same_secret(&first, &run([3; 32], [2; 32])));
    assert!(!same_secret(&first, &run([1; 32], [4; 32])));
}

#[test]
fn wrong_gateway_key_tampering_and_garbage_are_refused() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let wrong_public = public_key(&[8; 32]).expect("valid key");
    let mut init = Vec::new();
    let _ = ClientHandshake::initiate(&CLIENT, &wrong_public, 1, [1; 32], &mut init).expect("ok");
    assert_eq!(
        InitReceived::open(&GATEWAY, noise_of(&init), [2; 32]).map(|_| ()),
        Err(HandshakeError::Noise)
    );

    let mut init = Vec::new();
    let client =
        ClientHandshake::initiate(&CLIENT, &gateway_public, 1, [1; 32], &mut init).expect("ok");
    let noise = noise_of(&init).to_vec();
    for i in 0..noise.len() {
        let mut bent = noise.clone();
        bent[i] ^= 0x01;
        assert!(
            InitReceived::open(&GATEWAY, &bent, [2; 32]).is_err(),
            "byte {i}"
        );
    }
    assert!(InitReceived::open(&GATEWAY, &[], [2; 32]).is_err());
    assert!(InitReceived::open(&GATEWAY, &[0u8; 300], [2; 32]).is_err());

    let received = InitReceived::open(&GATEWAY, &noise, [2; 32]).expect("opens");
    let mut reply = Vec::new();
    let _ = received.accept(&ack(), &mut reply).expect("answers");
    let mut bent = noise_of(&reply).to_vec();
    let last = bent.len() - 1;
    bent[last] ^= 0x80;
    assert_eq!(client.finish(&bent).map(|_| ()), Err(HandshakeError::Noise));
}

#[test]
fn a_replayed_init_opens_with_its_old_timestamp() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let mut init = Vec::new();
    let _ =
        ClientHandshake::initiate(&CLIENT, &gateway_public, 99, [1; 32], &mut init).expect("ok");
    let first = InitReceived::open(&GATEWAY, noise_of(&init), [2; 32]).expect("opens");
    let replay = InitReceived::open(&GATEWAY, noise_of(&init), [3; 32]).expect("opens again");
    // Authentic, so only the timestamp rule (strictly greater than the last accepted) can
    // refuse it: the gateway endpoint applies that rule.
    assert_eq!(first.timestamp, replay.timestamp);
}

#[test]
fn sealed_master_secrets_open_only_for_their_session_and_kek() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let mut init = Vec::new();
    let client =
        ClientHandshake::initiate(&CLIENT, &gateway_public, 1, [1; 32], &mut init).expect("ok");
    let received = InitReceived::open(&GATEWAY, noise_of(&init), [2; 32]).expect("opens");
    let mut reply = Vec::new();
    let master = received.accept(&ack(), &mut reply).expect("answers");
    let (_, client_master) = client.finish(noise_of(&reply)).expect("finishes");

    let kek = Kek::derive(&GATEWAY);
    let session = SessionId::from_u128(0xfeed);
    let sealed = kek.seal(session, &master);
    let opened = Kek::derive(&GATEWAY).open(session, &sealed).expect("opens");
    assert!(same_secret(&opened, &client_master));
    assert!(kek.open(SessionId::from_u128(0xbeef), &sealed).is_err());
    assert!(Kek::derive(&[8; 32]).open(session, &sealed).is_err());
    assert!(!format!("{kek:?}").contains('7'));
}

#[test]
fn entropy_is_deterministic_per_seed_and_never_repeats_a_draw() {
    let mut a = Entropy::from_seed([5; 32]);
    let mut b = Entropy::from_seed([5; 32]);
    let draws: Vec<u128> = (0..100).map(|_| a.next_u128()).collect();
    assert_eq!(draws, (0..100).map(|_| b.next_u128()).collect::<Vec<_>>());
    let mut sorted = draws.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), draws.len());
    let mut big = vec![0u8; 5000];
    a.fill(&mut big);
    assert!(big.iter().filter(|&&x| x == 0).count() < 100);
}

#[test]
fn mac1_admits_inits_made_for_this_gateway_and_refuses_any_change_or_another_key() {
    let gateway_public = public_key(&GATEWAY).expect("valid key");
    let responder = Responder::new(&GATEWAY, [&public_key(&CLIENT).expect("valid key")]);
    let mut init = Vec::new();
    ClientHandshake::initiate(&CLIENT, &gateway_public, 5, [1; 32], &mut init).expect("initiates");
    assert!(responder.mac1_valid(&init));

    // Any flipped bit anywhere, header, Noise message or the MAC itself, fails the check.
    for byte in 0..init.len() {
        for bit in 0..8 {
            let mut corrupted = init.clone();
            corrupted[byte] ^= 1 << bit;
            assert!(
                !responder.mac1_valid(&corrupted),
                "byte {byte} bit {bit} passed"
            );
        }
    }
    // Truncated, empty, and an init made for another gateway's key.
    assert!(!responder.mac1_valid(&init[..init.len() - 1]));
    assert!(!responder.mac1_valid(&[]));
    let other_public = public_key(&[13; 32]).expect("valid key");
    let mut elsewhere = Vec::new();
    ClientHandshake::initiate(&CLIENT, &other_public, 5, [1; 32], &mut elsewhere)
        .expect("initiates");
    assert!(!responder.mac1_valid(&elsewhere));
}

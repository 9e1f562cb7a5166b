//! The batched data path: `handle_tun_into` and `handle_packet_into` seal and open into the
//! driver's buffers. They must behave exactly as `handle_tun` and `handle_packet` do (which
//! the simulation covers), append after what the buffer already holds, and leave the buffer as
//! it was whenever a packet is not delivered.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::endpoint::client::{CandidateSpec, Client, ClientConfig, ClientOutput};
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig, GatewayOutput, Peer, StoreOp, StoreOutcome,
};
use jumpvpn_core::endpoint::{Path, Transmit};
use jumpvpn_core::handshake::public_key;
use jumpvpn_core::wire::DATA_OVERHEAD;
use jumpvpn_core::{NodeId, Policy, Proto, Timestamp};
use zeroize::Zeroizing;

const GW_KEY: [u8; 32] = [0x11; 32];
const CL_KEY: [u8; 32] = [0x22; 32];
const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NOW: Timestamp = Timestamp(1_700_000_000_000);
/// What the driver's buffer held before: must survive every call.
const PREFIX: &[u8] = b"earlier packets of the batch";

struct Pair {
    gateway: Gateway,
    client: Client,
    path: Path,
}

fn path() -> Path {
    Path {
        proto: Proto::Udp,
        remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)), 40_000),
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 51_820),
    }
}

/// A gateway and a client with an established session on UDP.
fn established() -> Pair {
    let gateway = Gateway::new(GatewayConfig {
        node: NodeId::new("gw1"),
        private_key: Zeroizing::new(GW_KEY),
        policy: Policy::default(),
        peers: vec![Peer {
            public_key: public_key(&CL_KEY).expect("a valid key"),
            tunnel_ip: IpAddr::V4(CL_IP),
        }],
        seed: [1; 32],
    });
    let client = Client::new(ClientConfig {
        private_key: Zeroizing::new(CL_KEY),
        gateway_public: public_key(&GW_KEY).expect("a valid key"),
        candidates: vec![CandidateSpec {
            proto: Proto::Udp,
            addr: path().local,
        }],
        node: NodeId::new("client"),
        seed: [2; 32],
    });
    let mut pair = Pair {
        gateway,
        client,
        path: path(),
    };
    pair.client.connect(NOW, 1);
    // Shuttle packets (and answer store requests at once) until both sides are quiet.
    loop {
        let mut moved = false;
        while let Some(out) = pair.client.poll_output() {
            if let ClientOutput::Transmit { bytes, .. } = out {
                pair.gateway.handle_packet(NOW, pair.path, &bytes);
                moved = true;
            }
        }
        while let Some(out) = pair.gateway.poll_output() {
            match out {
                GatewayOutput::Transmit(Transmit { bytes, .. }) => {
                    pair.client.handle_packet(NOW, 0, &bytes);
                    moved = true;
                }
                GatewayOutput::Store(request) => {
                    assert!(matches!(request.op, StoreOp::Create(_)));
                    pair.gateway
                        .handle_store(NOW, request.id, StoreOutcome::Written);
                    moved = true;
                }
                _ => {}
            }
        }
        if !moved {
            break;
        }
    }
    assert!(pair.client.session().is_some(), "the handshake completed");
    pair
}

/// A minimal IPv4 header and payload from `src` to `dst`.
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| i as u8).collect();
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p
}

fn buffer() -> Vec<u8> {
    PREFIX.to_vec()
}

#[test]
fn client_to_gateway_batch_appends_sealed_then_opened_packets() {
    let mut pair = established();
    let mut sealed = buffer();
    let mut ends = Vec::new();
    for len in [20, 1420, 40] {
        let before = sealed.len();
        let candidate =
            pair.client
                .handle_tun_into(NOW, &ip_packet(CL_IP, GW_IP, len), &mut sealed);
        assert_eq!(candidate, Some(0));
        assert_eq!(sealed.len(), before + len + DATA_OVERHEAD);
        ends.push(sealed.len());
    }
    assert!(sealed.starts_with(PREFIX));

    let mut tun = buffer();
    let mut start = PREFIX.len();
    for (end, len) in ends.into_iter().zip([20, 1420, 40]) {
        let delivered =
            pair.gateway
                .handle_packet_into(NOW, pair.path, &sealed[start..end], &mut tun);
        assert!(delivered);
        assert_eq!(&tun[tun.len() - len..], ip_packet(CL_IP, GW_IP, len));
        start = end;
    }
    assert_eq!(tun.len(), PREFIX.len() + 20 + 1420 + 40);
    assert!(tun.starts_with(PREFIX));
    assert_eq!(pair.gateway.stats().data_in, 3);
    assert!(pair.gateway.poll_output().is_none(), "nothing queued");
}

#[test]
fn gateway_to_client_batch_appends_sealed_then_opened_packets() {
    let mut pair = established();
    let mut sealed = buffer();
    let path = pair
        .gateway
        .handle_tun_into(NOW, &ip_packet(GW_IP, CL_IP, 1000), &mut sealed);
    assert_eq!(path, Some(pair.path));
    assert_eq!(sealed.len(), PREFIX.len() + 1000 + DATA_OVERHEAD);

    let mut tun = buffer();
    assert!(pair
        .client
        .handle_packet_into(NOW, 0, &sealed[PREFIX.len()..], &mut tun));
    assert_eq!(&tun[PREFIX.len()..], ip_packet(GW_IP, CL_IP, 1000));

    // The same packet again is a replay: not delivered, the buffer untouched.
    let before = tun.clone();
    assert!(!pair
        .client
        .handle_packet_into(NOW, 0, &sealed[PREFIX.len()..], &mut tun));
    assert_eq!(tun, before);
}

#[test]
fn undelivered_packets_leave_the_buffer_as_it_was() {
    let mut pair = established();
    let mut sealed = Vec::new();
    pair.client
        .handle_tun_into(NOW, &ip_packet(CL_IP, GW_IP, 100), &mut sealed);

    let mut tun = buffer();
    // Tampered: fails authentication.
    let mut tampered = sealed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(!pair
        .gateway
        .handle_packet_into(NOW, pair.path, &tampered, &mut tun));
    assert_eq!(tun, PREFIX);
    assert_eq!(pair.gateway.stats().auth_failed, 1);

    // Authentic, once: delivered; twice: a replay.
    assert!(pair
        .gateway
        .handle_packet_into(NOW, pair.path, &sealed, &mut tun));
    let delivered = tun.clone();
    assert!(!pair
        .gateway
        .handle_packet_into(NOW, pair.path, &sealed, &mut tun));
    assert_eq!(tun, delivered);
    assert_eq!(pair.gateway.stats().replayed, 1);

    // Authentic but from a source address other than the client's tunnel address.
    let mut spoofed = Vec::new();
    pair.client.handle_tun_into(
        NOW,
        &ip_packet(Ipv4Addr::new(10, 77, 0, 9), GW_IP, 100),
        &mut spoofed,
    );
    assert!(!pair
        .gateway
        .handle_packet_into(NOW, pair.path, &spoofed, &mut tun));
    assert_eq!(tun, delivered);

    // Authentic and fresh but from a new address: not delivered, a REATTACH_HINT instead.
    let mut moved = Vec::new();
    pair.client
        .handle_tun_into(NOW, &ip_packet(CL_IP, GW_IP, 100), &mut moved);
    let mut elsewhere = pair.path;
    elsewhere.remote.set_port(40_001);
    assert!(!pair
        .gateway
        .handle_packet_into(NOW, elsewhere, &moved, &mut tun));
    assert_eq!(tun, delivered);
    assert_eq!(pair.gateway.stats().hints, 1);
    assert!(matches!(
        pair.gateway.poll_output(),
        Some(GatewayOutput::Transmit(Transmit { path, .. })) if path == elsewhere
    ));
}

#[test]
fn tun_packets_without_a_session_are_dropped_and_counted() {
    let mut pair = established();
    let mut sealed = buffer();
    let nobody = ip_packet(GW_IP, Ipv4Addr::new(10, 77, 0, 99), 100);
    assert_eq!(
        pair.gateway.handle_tun_into(NOW, &nobody, &mut sealed),
        None
    );
    assert_eq!(sealed, PREFIX);
    assert_eq!(pair.gateway.stats().tun_dropped, 1);
}

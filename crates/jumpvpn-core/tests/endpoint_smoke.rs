//! Smallest end-to-end run of the two endpoints: handshake, data both ways, a NAT rebinding
//! answered by a hint and a reattach. (The full scenarios are in the simulation tests.)

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use jumpvpn_core::endpoint::client::{CandidateSpec, Client, ClientConfig, ClientOutput};
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig, GatewayOutput, Peer, StoreOp, StoreOutcome,
};
use jumpvpn_core::endpoint::Path;
use jumpvpn_core::handshake::public_key;
use jumpvpn_core::{NodeId, Policy, Proto, SessionId, SessionRecord, SessionState, Timestamp};
use zeroize::Zeroizing;

const GW_KEY: [u8; 32] = [1; 32];
const CL_KEY: [u8; 32] = [2; 32];

fn ip_packet(src: [u8; 4], dst: [u8; 4], payload: u8) -> Vec<u8> {
    let mut p = vec![0u8; 21];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20] = payload;
    p
}

struct World {
    gw: Gateway,
    cl: Client,
    store: HashMap<SessionId, SessionRecord>,
    client_addr: SocketAddr,
    gw_addr: SocketAddr,
    now: Timestamp,
    tun_gw: Vec<Vec<u8>>,
    tun_cl: Vec<Vec<u8>>,
    audit: Vec<String>,
}

impl World {
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(out) = self.cl.poll_output() {
                progress = true;
                if let ClientOutput::Transmit { bytes, .. } = out {
                    let path = Path {
                        proto: Proto::Udp,
                        remote: self.client_addr,
                        local: self.gw_addr,
                    };
                    self.gw.handle_packet(self.now, path, &bytes);
                } else if let ClientOutput::Tun(p) = out {
                    self.tun_cl.push(p);
                }
            }
            while let Some(out) = self.gw.poll_output() {
                progress = true;
                match out {
                    GatewayOutput::Transmit(t) => self.cl.handle_packet(self.now, 0, &t.bytes),
                    GatewayOutput::Tun(p) => self.tun_gw.push(p),
                    GatewayOutput::Audit(e) => self.audit.push(e.to_json_line()),
                    GatewayOutput::Store(req) => {
                        let outcome = match req.op {
                            StoreOp::Create(r) => {
                                self.store.insert(r.session_id, r);
                                StoreOutcome::Written
                            }
                            StoreOp::CompareAndSwap { expected, record } => {
                                let cur =
                                    self.store.get(&record.session_id).map(|r| r.state_version);
                                assert_eq!(cur, Some(expected), "CAS from the stored version");
                                self.store.insert(record.session_id, record);
                                StoreOutcome::Written
                            }
                            StoreOp::Get(id) => {
                                StoreOutcome::Read(self.store.get(&id).cloned().map(Box::new))
                            }
                        };
                        self.gw.handle_store(self.now, req.id, outcome);
                    }
                    GatewayOutput::Close(_) => {}
                }
            }
            if !progress {
                break;
            }
        }
    }
}

#[test]
fn handshake_data_and_nat_rebinding() {
    let gw = Gateway::new(GatewayConfig {
        node: NodeId::new("gw1"),
        private_key: Zeroizing::new(GW_KEY),
        policy: Policy::default(),
        peers: vec![Peer {
            public_key: public_key(&CL_KEY).expect("key"),
            tunnel_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
        }],
        seed: [3; 32],
    });
    let gw_addr: SocketAddr = "10.0.0.1:51820".parse().expect("addr");
    let cl = Client::new(ClientConfig {
        private_key: Zeroizing::new(CL_KEY),
        gateway_public: public_key(&GW_KEY).expect("key"),
        candidates: vec![CandidateSpec {
            proto: Proto::Udp,
            addr: gw_addr,
        }],
        node: NodeId::new("client"),
        seed: [4; 32],
    });
    let mut w = World {
        gw,
        cl,
        store: HashMap::new(),
        client_addr: "10.0.0.2:40000".parse().expect("addr"),
        gw_addr,
        now: Timestamp(1_000_000),
        tun_gw: vec![],
        tun_cl: vec![],
        audit: vec![],
    };
    w.cl.connect(w.now, 1);
    w.pump();
    let session = w.cl.session().expect("established");
    assert_eq!(w.store[&session].state, SessionState::Attached);

    w.cl.handle_tun(w.now, &ip_packet([10, 77, 0, 2], [10, 77, 0, 1], 7));
    w.pump();
    assert_eq!(w.tun_gw.len(), 1);
    w.gw.handle_tun(w.now, &ip_packet([10, 77, 0, 1], [10, 77, 0, 2], 8));
    w.pump();
    assert_eq!(w.tun_cl.len(), 1);

    // NAT rebinding: the same client now appears from another port.
    w.client_addr = "10.0.0.2:40001".parse().expect("addr");
    w.now = w.now.plus(600);
    w.cl.handle_tun(w.now, &ip_packet([10, 77, 0, 2], [10, 77, 0, 1], 9));
    w.pump();
    assert_eq!(w.gw.stats().hints, 1, "{:?}", w.gw.stats());
    assert_eq!(w.store[&session].state_version.get(), 2);
    assert_eq!(
        w.store[&session].binding.expect("bound").client_addr,
        w.client_addr
    );
    w.cl.handle_tun(w.now, &ip_packet([10, 77, 0, 2], [10, 77, 0, 1], 10));
    w.pump();
    assert_eq!(
        w.tun_gw.len(),
        2,
        "the hinted packet is not forwarded; the next one is"
    );
    assert_eq!(w.cl.session(), Some(session));
    for line in &w.audit {
        println!("{line}");
    }
}

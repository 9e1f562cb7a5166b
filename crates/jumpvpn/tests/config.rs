//! Gateway and client configuration files (SPEC §9): valid files load with their values and
//! defaults; every kind of mistake is refused with an error naming the file and the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use jumpvpn::config::{
    self, ConfigError, PrivateKey, Problem, StoreConfig, DEFAULT_LEASE_TTL_MS, DEFAULT_STORE_PATH,
};
use jumpvpn_core::ownership::{ClusterMode, OnOwnerLoss};
use jumpvpn_core::{NodeId, Policy, Proto};

/// Private key bytes of the gateway, and of two clients.
const GATEWAY_KEY: [u8; 32] = [0x11; 32];
const CLIENT1_KEY: [u8; 32] = [0x22; 32];
const CLIENT2_KEY: [u8; 32] = [0x33; 32];

fn public_b64(private: [u8; 32]) -> String {
    BASE64.encode(PrivateKey::from_bytes(private).public_key())
}

/// A directory with the key and token files the configurations below name.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let fixture = Self { dir };
        fixture.write("gateway.key", &format!("{}\n", BASE64.encode(GATEWAY_KEY)));
        fixture.write("client.key", &format!("{}\n", BASE64.encode(CLIENT1_KEY)));
        fixture.write("admin.token", "  tok-123456\n");
        fixture
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write fixture file");
        path
    }

    fn gateway(&self, text: &str) -> Result<config::GatewayConfig, ConfigError> {
        config::load_gateway(&self.write("gw.toml", text))
    }

    fn client(&self, text: &str) -> Result<config::ClientConfig, ConfigError> {
        config::load_client(&self.write("client.toml", text))
    }
}

/// Every section of SPEC §9's gateway example, with relative key paths.
fn full_gateway() -> String {
    format!(
        r#"
node_id     = "gw1"
private_key_file = "gateway.key"
listen_udp  = "0.0.0.0:51820"
listen_tcp  = "0.0.0.0:51821"
audit_log   = "audit.jsonl"

[tunnel]
name    = "jv0"
address = "10.77.0.1/24"

[admin]
listen     = "127.0.0.1:51900"
token_file = "admin.token"

[store]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379", "127.0.0.1:22379"]
prefix = "/jv-test/"

[cluster]
mode = "shared"
on_owner_loss = "deny"
lease_ttl_ms = 3000
members = [
  {{ id = "gw1", udp = "10.0.0.1:51820", tcp = "10.0.0.1:51821", admin = "http://10.0.0.1:51900" }},
  {{ id = "gw2", udp = "10.0.0.2:51820" }},
]

[policy]
switch_cooldown_ms = 250
volatility = {{ loss_pct = 30 }}

[[peer]]
public_key = "{c1}"
tunnel_ip  = "10.77.0.2"

[[peer]]
public_key = "{c2}"
tunnel_ip  = "10.77.0.3"
"#,
        c1 = public_b64(CLIENT1_KEY),
        c2 = public_b64(CLIENT2_KEY),
    )
}

/// The smallest valid gateway file: every optional section left out.
fn minimal_gateway() -> String {
    r#"
node_id = "gw1"
private_key_file = "gateway.key"
listen_udp = "0.0.0.0:51820"
listen_tcp = "0.0.0.0:51820"
audit_log = "/var/log/jumpvpn/audit.jsonl"

[tunnel]
name = "jv0"
address = "10.77.0.1/24"
"#
    .to_owned()
}

fn full_client() -> String {
    format!(
        r#"
private_key_file   = "client.key"
gateway_public_key = "{gw}"
candidates = ["udp://198.51.100.1:51820", "tcp://198.51.100.1:51820", "udp://[2001:db8::2]:51820"]
audit_log  = "/var/log/jumpvpn/client.jsonl"

[tunnel]
name    = "jv1"
address = "10.77.0.2/24"
"#,
        gw = public_b64(GATEWAY_KEY),
    )
}

#[test]
fn full_gateway_config_loads_every_value() {
    let fx = Fixture::new();
    let cfg = fx.gateway(&full_gateway()).expect("valid gateway config");
    assert_eq!(cfg.node_id, NodeId::new("gw1"));
    assert_eq!(
        cfg.private_key.public_key(),
        PrivateKey::from_bytes(GATEWAY_KEY).public_key()
    );
    assert_eq!(
        cfg.listen_udp,
        "0.0.0.0:51820".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        cfg.listen_tcp,
        "0.0.0.0:51821".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        cfg.audit_log,
        fx.path("audit.jsonl"),
        "relative to the file's directory"
    );
    assert_eq!(cfg.tunnel.name, "jv0");
    assert_eq!(cfg.tunnel.address, IpAddr::from([10, 77, 0, 1]));
    assert_eq!(cfg.tunnel.prefix_len, 24);

    let admin = cfg.admin.as_ref().expect("admin section");
    assert_eq!(
        admin.listen,
        "127.0.0.1:51900".parse::<SocketAddr>().expect("addr")
    );
    let token = admin.token.as_ref().expect("token read from token_file");
    assert_eq!(token.as_str(), "tok-123456", "trimmed");

    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec![
                "http://127.0.0.1:2379".to_owned(),
                "127.0.0.1:22379".to_owned()
            ],
            prefix: "/jv-test/".to_owned(),
        }
    );
    assert_eq!(cfg.cluster.mode, ClusterMode::Shared);
    assert_eq!(cfg.cluster.on_owner_loss, OnOwnerLoss::Deny);
    assert_eq!(cfg.cluster.lease_ttl_ms, 3000);
    assert_eq!(cfg.cluster.members.len(), 2);
    let gw1 = &cfg.cluster.members[0];
    assert_eq!(gw1.id, NodeId::new("gw1"));
    assert_eq!(gw1.tcp, Some("10.0.0.1:51821".parse().expect("addr")));
    assert_eq!(gw1.admin.as_deref(), Some("http://10.0.0.1:51900"));
    let gw2 = &cfg.cluster.members[1];
    assert_eq!((gw2.tcp, gw2.admin.as_deref()), (None, None));

    assert_eq!(cfg.policy.switch_cooldown_ms, 250);
    assert_eq!(cfg.policy.volatility.loss_pct, 30);
    let defaults = Policy::default();
    assert_eq!(cfg.policy.volatility.rtt_ms, defaults.volatility.rtt_ms);
    assert_eq!(cfg.policy.session_ttl_ms, defaults.session_ttl_ms);

    assert_eq!(cfg.peers.len(), 2);
    assert_eq!(
        cfg.peers[0].public_key,
        PrivateKey::from_bytes(CLIENT1_KEY).public_key()
    );
    assert_eq!(cfg.peers[1].tunnel_ip, IpAddr::from([10, 77, 0, 3]));
}

#[test]
fn minimal_gateway_config_gets_the_documented_defaults() {
    let fx = Fixture::new();
    let cfg = fx
        .gateway(&minimal_gateway())
        .expect("valid gateway config");
    assert!(cfg.admin.is_none());
    assert_eq!(
        cfg.store,
        StoreConfig::Embedded {
            path: PathBuf::from(DEFAULT_STORE_PATH)
        }
    );
    assert_eq!(cfg.cluster.mode, ClusterMode::Single);
    assert_eq!(cfg.cluster.on_owner_loss, OnOwnerLoss::Failover);
    assert_eq!(cfg.cluster.lease_ttl_ms, DEFAULT_LEASE_TTL_MS);
    assert_eq!(cfg.cluster.lease_ttl_ms, 5000);
    assert!(cfg.cluster.members.is_empty());
    assert_eq!(cfg.policy, Policy::default());
    assert!(cfg.peers.is_empty());
    assert_eq!(cfg.audit_log, Path::new("/var/log/jumpvpn/audit.jsonl"));

    let with_store = minimal_gateway() + "[store]\npath = \"state/sessions.db\"\n";
    let cfg = fx.gateway(&with_store).expect("valid gateway config");
    assert_eq!(
        cfg.store,
        StoreConfig::Embedded {
            path: fx.path("state/sessions.db")
        }
    );
    let etcd = minimal_gateway() + "[store]\nkind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n";
    let cfg = fx.gateway(&etcd).expect("valid gateway config");
    assert_eq!(
        cfg.store,
        StoreConfig::Etcd {
            endpoints: vec!["127.0.0.1:2379".to_owned()],
            prefix: "/jumpvpn/".to_owned()
        }
    );
}

#[test]
fn full_client_config_loads_candidates_in_order() {
    let fx = Fixture::new();
    let cfg = fx.client(&full_client()).expect("valid client config");
    assert_eq!(
        cfg.private_key.public_key(),
        PrivateKey::from_bytes(CLIENT1_KEY).public_key()
    );
    assert_eq!(
        cfg.gateway_public_key,
        PrivateKey::from_bytes(GATEWAY_KEY).public_key()
    );
    let candidates: Vec<(Proto, String)> = cfg
        .candidates
        .iter()
        .map(|c| (c.proto, c.addr.to_string()))
        .collect();
    assert_eq!(
        candidates,
        [
            (Proto::Udp, "198.51.100.1:51820".to_owned()),
            (Proto::Tcp, "198.51.100.1:51820".to_owned()),
            (Proto::Udp, "[2001:db8::2]:51820".to_owned()),
        ]
    );
    assert_eq!(cfg.candidates[1].to_string(), "tcp://198.51.100.1:51820");
    assert_eq!(cfg.audit_log, Path::new("/var/log/jumpvpn/client.jsonl"));
    assert_eq!(cfg.tunnel.name, "jv1");
    assert_eq!(cfg.tunnel.address, IpAddr::from([10, 77, 0, 2]));
    assert_eq!(cfg.tunnel.prefix_len, 24);
}

#[test]
fn debug_output_and_errors_never_show_secrets() {
    let fx = Fixture::new();
    let cfg = fx.gateway(&full_gateway()).expect("valid gateway config");
    let debug = format!("{cfg:?}");
    assert!(debug.contains("PrivateKey(<redacted>)"));
    assert!(debug.contains("AdminToken(<redacted>)"));
    assert!(!debug.contains(&BASE64.encode(GATEWAY_KEY)));
    assert!(!debug.contains("tok-123456"));
    let client = fx.client(&full_client()).expect("valid client config");
    assert!(!format!("{client:?}").contains(&BASE64.encode(CLIENT1_KEY)));

    // A key file one character short: the error names the key and file, not the content.
    let almost = BASE64.encode(GATEWAY_KEY);
    let almost = &almost[..almost.len() - 2];
    fx.write("gateway.key", almost);
    let err = fx.gateway(&minimal_gateway()).expect_err("truncated key");
    let text = err.to_string();
    assert_eq!(err.key(), "private_key_file");
    assert!(
        text.contains(&fx.path("gateway.key").display().to_string()),
        "{text}"
    );
    assert!(!text.contains(almost), "{text}");
}

/// A bad gateway file, the key its error must name, and a fragment of what it must say.
struct Bad {
    config: String,
    key: &'static str,
    says: &'static str,
}

fn bad(config: String, key: &'static str, says: &'static str) -> Bad {
    Bad { config, key, says }
}

fn assert_refused(
    fx: &Fixture,
    file: &str,
    case: &Bad,
    result: Result<impl std::fmt::Debug, ConfigError>,
) {
    let err = match result {
        Ok(cfg) => panic!(
            "accepted a config that should fail at {}: {cfg:?}",
            case.key
        ),
        Err(err) => err,
    };
    let text = err.to_string();
    assert_eq!(err.key(), case.key, "wrong key in: {text}");
    let prefix = format!("{}: {}: ", fx.path(file).display(), case.key);
    assert!(
        text.starts_with(&prefix),
        "{text:?} should start with {prefix:?}"
    );
    assert!(
        text.contains(case.says),
        "{text:?} should say {:?}",
        case.says
    );
}

#[test]
fn bad_gateway_configs_name_the_key_at_fault() {
    let fx = Fixture::new();
    fx.write("empty.token", " \n");
    let full = full_gateway();
    let min = minimal_gateway();
    let peer = |key: [u8; 32], ip: &str| {
        format!(
            "[[peer]]\npublic_key = \"{}\"\ntunnel_ip = \"{ip}\"\n",
            public_b64(key)
        )
    };
    let cases = [
        bad(
            min.replace("node_id = \"gw1\"\n", ""),
            "node_id",
            "missing required key",
        ),
        bad(
            min.replace("node_id", "node_ide"),
            "node_ide",
            "unknown key",
        ),
        bad(
            min.replace("address =", "adress ="),
            "tunnel.adress",
            "unknown key",
        ),
        bad(
            min.replace("address = \"10.77.0.1/24\"", ""),
            "tunnel.address",
            "missing required key",
        ),
        bad(
            min.replace("[tunnel]\nname = \"jv0\"\naddress = \"10.77.0.1/24\"\n", ""),
            "tunnel",
            "missing required key",
        ),
        bad(
            min.replace("10.77.0.1/24", "10.77.0.1"),
            "tunnel.address",
            "expected an address with its prefix length",
        ),
        bad(
            min.replace("10.77.0.1/24", "10.77.0.0/24"),
            "tunnel.address",
            "10.77.0.0 is the network address",
        ),
        bad(
            min.replace("name = \"jv0\"", "name = \"a-very-long-ifname\""),
            "tunnel.name",
            "1 to 15 bytes",
        ),
        bad(
            min.replace("listen_udp = \"0.0.0.0:51820\"", "listen_udp = \"0.0.0.0\""),
            "listen_udp",
            "expected an IP address and port",
        ),
        bad(
            min.replace("listen_tcp = \"0.0.0.0:51820\"", "listen_tcp = 51820"),
            "listen_tcp",
            "expected a string, found an integer",
        ),
        bad(
            min.clone() + "[store]\nkind = \"redis\"\n",
            "store.kind",
            r#"unknown value "redis", expected "embedded", "memory" or "etcd""#,
        ),
        bad(
            min.clone() + "[store]\nkind = \"etcd\"\n",
            "store.endpoints",
            "missing required key",
        ),
        bad(
            min.clone() + "[store]\nkind = \"etcd\"\nendpoints = []\n",
            "store.endpoints",
            "at least one endpoint",
        ),
        bad(
            min.clone() + "[store]\nkind = \"memory\"\npath = \"x.db\"\n",
            "store.path",
            "only used with kind = \"embedded\"",
        ),
        bad(
            min.clone() + "[admin]\ntoken_file = \"admin.token\"\n",
            "admin.listen",
            "missing required key",
        ),
        bad(
            min.clone() + "[admin]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"empty.token\"\n",
            "admin.token_file",
            "is empty",
        ),
        bad(
            min.clone() + "[admin]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"nope.token\"\n",
            "admin.token_file",
            "cannot read",
        ),
        bad(
            full.replace("mode = \"shared\"", "mode = \"swarm\""),
            "cluster.mode",
            r#"unknown value "swarm", expected "single", "sticky" or "shared""#,
        ),
        bad(
            full.replace("on_owner_loss = \"deny\"", "on_owner_loss = \"panic\""),
            "cluster.on_owner_loss",
            r#"expected "failover", "deny" or "terminate""#,
        ),
        bad(
            full.replace("lease_ttl_ms = 3000", "lease_ttl_ms = \"3000\""),
            "cluster.lease_ttl_ms",
            "expected an integer, found a string",
        ),
        bad(
            full.replace("lease_ttl_ms = 3000", "lease_ttl_ms = -5"),
            "cluster.lease_ttl_ms",
            "expected at least 100, found -5",
        ),
        bad(
            full.replace("{ id = \"gw2\", udp =", "{ id = \"gw2\", udpp ="),
            "cluster.members[1].udpp",
            "unknown key",
        ),
        bad(
            full.replace("{ id = \"gw2\"", "{ id = \"gw1\""),
            "cluster.members[1].id",
            "duplicate member \"gw1\"",
        ),
        bad(
            full.replace("udp = \"10.0.0.2:51820\"", "udp = \"0.0.0.0:51820\""),
            "cluster.members[1].udp",
            "unspecified address",
        ),
        bad(
            full.replace("node_id     = \"gw1\"", "node_id = \"gw3\""),
            "cluster.members",
            "must include this node (\"gw3\") when mode = \"shared\"",
        ),
        bad(
            min.clone() + "[cluster]\nmode = \"sticky\"\nmembers = [{ id = \"gw2\" }]\n",
            "cluster.members",
            "must include this node (\"gw1\") when mode = \"sticky\"",
        ),
        bad(
            min.clone() + "[cluster]\nmode = \"shared\"\nmembers = [{ id = \"gw1\" }]\n",
            "cluster.mode",
            "\"shared\" needs store.kind = \"etcd\"",
        ),
        bad(
            full.replace("switch_cooldown_ms", "switch_cooldwn_ms"),
            "policy.switch_cooldwn_ms",
            "unknown key",
        ),
        bad(
            full.replace("loss_pct = 30", "loss_pct = \"lots\""),
            "policy.volatility.loss_pct",
            "invalid type",
        ),
        bad(
            full.replace("loss_pct = 30", "loss_ptc = 30"),
            "policy.volatility.loss_ptc",
            "unknown key",
        ),
        bad(
            full.replace("loss_pct = 30", "loss_pct = 150"),
            "policy.volatility.loss_pct",
            "expected a percentage, 0 to 100, found 150",
        ),
        bad(
            full.replace("switch_cooldown_ms = 250", "keepalive_interval_ms = 5000"),
            "policy.keepalive_interval_ms",
            "less than client_dead_after_ms",
        ),
        bad(
            full.replace("switch_cooldown_ms = 250", "session_ttl_ms = -1"),
            "policy.session_ttl_ms",
            "invalid value",
        ),
        bad(
            min.clone()
                + &peer(CLIENT1_KEY, "10.77.0.2")
                + "[[peer]]\npublic_key = \"abc\"\ntunnel_ip = \"10.77.0.3\"\n",
            "peer[1].public_key",
            "expected 32 bytes in base64",
        ),
        bad(
            min.clone() + &peer(CLIENT1_KEY, "10.77.0.2") + &peer(CLIENT1_KEY, "10.77.0.3"),
            "peer[1].public_key",
            "the same key as an earlier peer",
        ),
        bad(
            min.clone() + &peer(GATEWAY_KEY, "10.77.0.2"),
            "peer[0].public_key",
            "the gateway's own public key",
        ),
        bad(
            min.clone() + &peer(CLIENT1_KEY, "10.77.0.2") + &peer(CLIENT2_KEY, "10.77.0.2"),
            "peer[1].tunnel_ip",
            "already the address of an earlier peer",
        ),
        bad(
            min.clone() + &peer(CLIENT1_KEY, "10.78.0.2"),
            "peer[0].tunnel_ip",
            "outside the tunnel subnet 10.77.0.0/24",
        ),
        bad(
            min.clone() + &peer(CLIENT1_KEY, "10.77.0.1"),
            "peer[0].tunnel_ip",
            "the gateway's own address",
        ),
        bad(
            min.clone() + &peer(CLIENT1_KEY, "10.77.0.255"),
            "peer[0].tunnel_ip",
            "the broadcast address",
        ),
        bad(
            min.clone() + "[[peer]]\npublic_key = \"x\"\ntunnel-ip = \"10.77.0.2\"\n",
            "peer[0].tunnel-ip",
            "unknown key",
        ),
        bad(
            min.clone() + "[peer]\npublic_key = \"x\"\n",
            "peer",
            "expected an array of tables ([[peer]]), found a table",
        ),
        bad(
            min.replace("gateway.key", "missing.key"),
            "private_key_file",
            "cannot read",
        ),
    ];
    assert!(cases.len() >= 15);
    for case in &cases {
        assert_refused(&fx, "gw.toml", case, fx.gateway(&case.config));
    }
}

#[test]
fn bad_client_configs_name_the_key_at_fault() {
    let fx = Fixture::new();
    let full = full_client();
    let cases = [
        bad(
            full.replace("candidates = [", "candidates = [] #"),
            "candidates",
            "needs at least one address",
        ),
        bad(
            full.replace("tcp://198.51.100.1", "quic://198.51.100.1"),
            "candidates[1]",
            "expected \"udp://IP:PORT\" or \"tcp://IP:PORT\", found \"quic://198.51.100.1:51820\"",
        ),
        bad(
            full.replace("tcp://198.51.100.1:51820", "tcp://gateway.example:51820"),
            "candidates[1]",
            "expected \"udp://IP:PORT\"",
        ),
        bad(
            full.replace("tcp://198.51.100.1:51820", "udp://198.51.100.1:51820"),
            "candidates[1]",
            "duplicate of candidates[0]",
        ),
        bad(
            full.replace("tcp://198.51.100.1:51820", "tcp://198.51.100.1:0"),
            "candidates[1]",
            "port 0",
        ),
        bad(
            full.replace("gateway_public_key = \"", "gateway_public_key = \"AA"),
            "gateway_public_key",
            "expected 32 bytes in base64",
        ),
        bad(
            full.replace("audit_log", "audit_logs"),
            "audit_logs",
            "unknown key",
        ),
        bad(
            full.replace("name    = \"jv1\"\n", ""),
            "tunnel.name",
            "missing required key",
        ),
        bad(
            "node_id = \"c1\"\n".to_owned() + &full,
            "node_id",
            "unknown key",
        ),
        bad(full.clone() + "mtu = 1400\n", "tunnel.mtu", "unknown key"),
    ];
    for case in &cases {
        assert_refused(&fx, "client.toml", case, fx.client(&case.config));
    }
}

#[test]
fn unreadable_and_malformed_files_are_named() {
    let fx = Fixture::new();
    let missing = fx.path("nope.toml");
    let err = config::load_gateway(&missing).expect_err("no such file");
    assert_eq!(err.key(), "");
    assert!(matches!(err.problem(), Problem::Unreadable(_)));
    assert!(err
        .to_string()
        .starts_with(&format!("{}: cannot read: ", missing.display())));

    let err = fx
        .gateway("node_id = \"gw1\"\nlisten_udp = = 3\n")
        .expect_err("not TOML");
    assert!(
        matches!(err.problem(), Problem::Syntax { line: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(": line 2, column "), "{err}");
}

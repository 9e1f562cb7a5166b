//! Gateway and client configuration files (SPEC §9): TOML in, typed and validated values out.
//!
//! [`load_gateway`] and [`load_client`] either return a configuration in which every value has
//! been checked — alone and against the others — or a [`ConfigError`] that names the file, the
//! dotted key and what is wrong with it:
//!
//! ```text
//! gw.toml: store.kind: unknown value "redis", expected "embedded", "memory" or "etcd"
//! gw.toml: tunnel.adress: unknown key
//! gw.toml: node_id: missing required key
//! gw.toml: peer[1].public_key: expected 32 bytes in base64 (44 characters)
//! ```
//!
//! The file is parsed into a `toml::Table` and walked by hand rather than through a derived
//! `Deserialize`: serde's errors do not say which key of which array element they are about,
//! and the walk always knows. Array elements are counted from zero (`peer[0]` is the first
//! `[[peer]]`). The `[policy]` table is the core's [`Policy`], whose key list and types come
//! from its own serde definition (see `parse_policy`), so a knob added there is accepted here
//! without a change.
//!
//! Relative paths in a file (`private_key_file`, `audit_log`, `admin.token_file`, `store.path`)
//! are taken relative to the directory of that file, so a configuration and its keys can be
//! moved together.
//!
//! Secrets — the private key and the admin token — are read from the files the configuration
//! names, kept in buffers that are zeroed on drop, redacted in `Debug`, and never echoed in an
//! error, not even when they are malformed.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use jumpvpn_core::ownership::{ClusterMode, Member, OnOwnerLoss};
use jumpvpn_core::{NodeId, Policy, Proto};
use toml::{Table, Value};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The default `store.path` when `store.kind = "embedded"` and no path is given.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/jumpvpn/sessions.db";

/// The default `store.prefix` for etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/jumpvpn/";

/// The default `cluster.lease_ttl_ms`.
pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;

/// The smallest accepted `cluster.lease_ttl_ms`: below it a keepalive round trip and the
/// drift margin leave no time in which the lease is usable.
pub const MIN_LEASE_TTL_MS: u64 = 100;

/// Largest key or token file read; a real one is under 100 bytes.
const MAX_SECRET_FILE: u64 = 4096;

/// Largest configuration file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Reads and validates a gateway configuration file, and the key and token files it names.
pub fn load_gateway(path: &Path) -> Result<GatewayConfig, ConfigError> {
    let text = read_config(path)?;
    parse_gateway(&text, path)
}

/// Reads and validates a client configuration file, and the key file it names.
pub fn load_client(path: &Path) -> Result<ClientConfig, ConfigError> {
    let text = read_config(path)?;
    parse_client(&text, path)
}

/// Validates a gateway configuration given as text. `origin` is the file it came from: it
/// names the file in errors, and relative paths are taken from its directory.
pub fn parse_gateway(text: &str, origin: &Path) -> Result<GatewayConfig, ConfigError> {
    let ctx = Ctx::new(origin);
    ctx.locate(parse_table(text).and_then(|table| gateway(&ctx, &table)))
}

/// Validates a client configuration given as text. `origin` is as for [`parse_gateway`].
pub fn parse_client(text: &str, origin: &Path) -> Result<ClientConfig, ConfigError> {
    let ctx = Ctx::new(origin);
    ctx.locate(parse_table(text).and_then(|table| client(&ctx, &table)))
}

/// A gateway's configuration (`jumpvpn gateway --config FILE`).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// `node_id`: this gateway's name in the cluster, the audit stream and the store.
    pub node_id: NodeId,
    /// The static private key, read from `private_key_file`.
    pub private_key: PrivateKey,
    /// `listen_udp`: the UDP socket clients reach.
    pub listen_udp: SocketAddr,
    /// `listen_tcp`: the TCP socket clients fall back to.
    pub listen_tcp: SocketAddr,
    /// `audit_log`: the JSONL audit stream of this node.
    pub audit_log: PathBuf,
    /// `[tunnel]`: the TUN device and the gateway's own tunnel address.
    pub tunnel: TunnelConfig,
    /// `[admin]`, when present: the admin API.
    pub admin: Option<AdminConfig>,
    /// `[store]`: where session records live.
    pub store: StoreConfig,
    /// `[cluster]`: how gateways share sessions.
    pub cluster: ClusterConfig,
    /// `[policy]`: the timers and bounds given to new sessions (defaults for absent keys).
    pub policy: Policy,
    /// `[[peer]]`: the clients allowed to connect, in file order.
    pub peers: Vec<PeerConfig>,
}

/// A client's configuration (`jumpvpn client --config FILE`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The static private key, read from `private_key_file`.
    pub private_key: PrivateKey,
    /// `gateway_public_key`: the gateway (or cluster) key the handshake authenticates.
    pub gateway_public_key: [u8; 32],
    /// `candidates`: where to reach the gateways, in the order to try them; never empty.
    pub candidates: Vec<CandidateAddr>,
    /// `audit_log`: the client's JSONL audit stream.
    pub audit_log: PathBuf,
    /// `[tunnel]`: the TUN device and the client's tunnel address.
    pub tunnel: TunnelConfig,
}

/// `[tunnel]`: a TUN device and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// `name`: the interface name (1 to 15 bytes, as Linux allows).
    pub name: String,
    /// The address part of `address`: a host address inside the subnet, neither its network
    /// nor (IPv4) its broadcast address.
    pub address: IpAddr,
    /// The prefix length part of `address` (1 to 32 for IPv4, 1 to 128 for IPv6).
    pub prefix_len: u8,
}

impl TunnelConfig {
    /// Whether `ip` lies in this tunnel's subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        same_subnet(self.address, ip, self.prefix_len)
    }
}

/// `[admin]`: the admin API (SPEC §9).
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// `listen`: the HTTP socket.
    pub listen: SocketAddr,
    /// The bearer token for mutating calls, read from `token_file` and trimmed. Without one,
    /// every mutating call is refused.
    pub token: Option<AdminToken>,
}

/// `[store]`: where session records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// `kind = "embedded"` (the default): a durable file on this node.
    Embedded {
        /// `path`; [`DEFAULT_STORE_PATH`] when absent.
        path: PathBuf,
    },
    /// `kind = "memory"`: lost when the process exits (tests and demonstrations).
    Memory,
    /// `kind = "etcd"`: the shared, linearizable store of a shared cluster.
    Etcd {
        /// `endpoints`: `http://host:port` or `host:port`; never empty.
        endpoints: Vec<String>,
        /// `prefix`: every key lives under it; [`DEFAULT_ETCD_PREFIX`] when absent.
        prefix: String,
    },
}

/// `[cluster]`: how the gateways of a deployment share sessions (SPEC §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `mode`: `"single"` (the default), `"sticky"` or `"shared"`.
    pub mode: ClusterMode,
    /// `on_owner_loss`: `"failover"` (the default), `"deny"` or `"terminate"`.
    pub on_owner_loss: OnOwnerLoss,
    /// `lease_ttl_ms`: the liveness lease's time to live ([`DEFAULT_LEASE_TTL_MS`]).
    pub lease_ttl_ms: u64,
    /// `members`: every gateway of the cluster, this one included unless the mode is
    /// `"single"`. IDs are unique. This is the core's [`Member`], so the list can be handed
    /// to its ownership rules as it is.
    pub members: Vec<MemberConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            mode: ClusterMode::default(),
            on_owner_loss: OnOwnerLoss::default(),
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            members: Vec::new(),
        }
    }
}

/// One entry of `cluster.members`: `{ id, udp, tcp, admin }`, the last three optional.
pub type MemberConfig = Member;

/// One `[[peer]]`: a client allowed to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// `public_key`: the client's static public key.
    pub public_key: [u8; 32],
    /// `tunnel_ip`: the client's address inside the tunnel subnet, unique among peers.
    pub tunnel_ip: IpAddr,
}

/// One entry of the client's `candidates`: `"udp://ip:port"` or `"tcp://ip:port"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CandidateAddr {
    /// The transport.
    pub proto: Proto,
    /// The gateway's socket address.
    pub addr: SocketAddr,
}

impl fmt::Display for CandidateAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.proto.as_str(), self.addr)
    }
}

impl std::str::FromStr for CandidateAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || {
            format!(
                "expected \"udp://IP:PORT\" or \"tcp://IP:PORT\", found {}",
                quote(text)
            )
        };
        let (proto, rest) = if let Some(rest) = text.strip_prefix("udp://") {
            (Proto::Udp, rest)
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            (Proto::Tcp, rest)
        } else {
            return Err(expected());
        };
        let addr: SocketAddr = rest.parse().map_err(|_| expected())?;
        check_destination(addr).map_err(|what| format!("{what} in {}", quote(text)))?;
        Ok(Self { proto, addr })
    }
}

/// A static X25519 private key: zeroed when dropped, never shown by `Debug`.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// Wraps raw key bytes (as `jumpvpn genkey` makes them, already clamped).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The secret, for the handshake.
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// The matching public key.
    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// The admin API's bearer token: zeroed when dropped, never shown by `Debug`.
#[derive(Clone)]
pub struct AdminToken(Zeroizing<String>);

impl AdminToken {
    /// Wraps a token (already trimmed, not empty).
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token text, to compare or to send.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that depends only on the lengths.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// A configuration that cannot be used. `Display` is `<file>: <dotted.key>: <what is wrong>`
/// (or `<file>: <what is wrong>` for problems with the file as a whole).
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    key: String,
    problem: Problem,
}

/// What is wrong, in a [`ConfigError`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// The configuration file itself cannot be read.
    Unreadable(std::io::Error),
    /// The file is not valid TOML.
    Syntax {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// A key this kind of file does not have (often a misspelling).
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// The key's value has the wrong type or is out of range, or contradicts another key.
    InvalidValue(String),
    /// The key names a file (private key, token) that cannot be used.
    SecretFile {
        /// The file, after resolving it against the configuration's directory.
        path: PathBuf,
        /// Why it cannot be used (never including its content).
        reason: String,
    },
}

impl ConfigError {
    /// The configuration file, as given.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The dotted key at fault (`"tunnel.address"`, `"peer[1].public_key"`), or `""` when the
    /// problem is the file as a whole (unreadable, not TOML).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        match &self.problem {
            Problem::Unreadable(e) => write!(f, "cannot read: {e}"),
            Problem::Syntax {
                line,
                column,
                message,
            } => write!(
                f,
                "line {line}, column {column}: invalid TOML: {}",
                message.trim_end()
            ),
            Problem::UnknownKey => f.write_str("unknown key"),
            Problem::MissingKey => f.write_str("missing required key"),
            Problem::InvalidValue(what) => f.write_str(what),
            Problem::SecretFile { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::Unreadable(e) => Some(e),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The two file formats.

fn gateway(ctx: &Ctx, table: &Table) -> Res<GatewayConfig> {
    let root = Section::new(
        String::new(),
        table,
        &[
            "node_id",
            "private_key_file",
            "listen_udp",
            "listen_tcp",
            "audit_log",
            "tunnel",
            "admin",
            "store",
            "cluster",
            "policy",
            "peer",
        ],
    )?;
    let node_id = root.required("node_id", parse_node_id)?;
    let private_key = private_key(ctx, &root)?;
    let listen_udp = root.required("listen_udp", parse_socket_addr)?;
    let listen_tcp = root.required("listen_tcp", parse_socket_addr)?;
    let audit_log = root.required("audit_log", |s| ctx.path(s))?;
    let tunnel = tunnel(&root)?;
    let admin = admin(ctx, &root)?;
    let store = store(ctx, &root)?;
    let cluster = cluster(&root, &node_id, &store)?;
    let policy = parse_policy(&root)?;
    let peers = peers(&root, &tunnel, &private_key)?;
    Ok(GatewayConfig {
        node_id,
        private_key,
        listen_udp,
        listen_tcp,
        audit_log,
        tunnel,
        admin,
        store,
        cluster,
        policy,
        peers,
    })
}

fn client(ctx: &Ctx, table: &Table) -> Res<ClientConfig> {
    let root = Section::new(
        String::new(),
        table,
        &[
            "private_key_file",
            "gateway_public_key",
            "candidates",
            "audit_log",
            "tunnel",
        ],
    )?;
    let private_key = private_key(ctx, &root)?;
    let gateway_public_key = root.required("gateway_public_key", parse_public_key)?;
    let candidates = candidates(&root)?;
    let audit_log = root.required("audit_log", |s| ctx.path(s))?;
    let tunnel = tunnel(&root)?;
    Ok(ClientConfig {
        private_key,
        gateway_public_key,
        candidates,
        audit_log,
        tunnel,
    })
}

// ---------------------------------------------------------------------------------------------
// Sections.

fn private_key(ctx: &Ctx, root: &Section) -> Res<PrivateKey> {
    let key = "private_key_file";
    let path = root.required(key, |s| ctx.path(s))?;
    let text = read_secret(&path).map_err(|reason| root.secret_fault(key, &path, reason))?;
    let bytes = Zeroizing::new(BASE64.decode(text.trim()).unwrap_or_default());
    if bytes.len() != 32 {
        let reason = "not a private key: expected 32 bytes in base64 (44 characters), \
                      as `jumpvpn genkey` writes"
            .to_owned();
        return Err(root.secret_fault(key, &path, reason));
    }
    let mut raw = Zeroizing::new([0u8; 32]);
    raw.copy_from_slice(&bytes);
    Ok(PrivateKey::from_bytes(*raw))
}

fn tunnel(root: &Section) -> Res<TunnelConfig> {
    let tunnel = root.required_table("tunnel", &["name", "address"])?;
    let name = tunnel.required("name", parse_ifname)?;
    let (address, prefix_len) = tunnel.required("address", parse_cidr)?;
    Ok(TunnelConfig {
        name,
        address,
        prefix_len,
    })
}

fn admin(ctx: &Ctx, root: &Section) -> Res<Option<AdminConfig>> {
    let Some(admin) = root.table("admin", &["listen", "token_file"])? else {
        return Ok(None);
    };
    let listen = admin.required("listen", parse_socket_addr)?;
    let token = match admin.optional("token_file", |s| ctx.path(s))? {
        None => None,
        Some(path) => {
            let key = "token_file";
            let text = read_secret(&path).map_err(|r| admin.secret_fault(key, &path, r))?;
            let token = text.trim();
            if token.is_empty() {
                return Err(admin.secret_fault(key, &path, "is empty".to_owned()));
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let reason = "the token contains whitespace or control characters".to_owned();
                return Err(admin.secret_fault(key, &path, reason));
            }
            Some(AdminToken::new(token.to_owned()))
        }
    };
    Ok(Some(AdminConfig { listen, token }))
}

fn store(ctx: &Ctx, root: &Section) -> Res<StoreConfig> {
    let Some(store) = root.table("store", &["kind", "path", "endpoints", "prefix"])? else {
        return Ok(StoreConfig::Embedded {
            path: PathBuf::from(DEFAULT_STORE_PATH),
        });
    };
    let kind = store.optional("kind", |s| {
        one_of(s, &["embedded", "memory", "etcd"]).map(str::to_owned)
    })?;
    let kind = kind.as_deref().unwrap_or("embedded");
    // Keys of another kind are refused rather than ignored: they show a misunderstanding.
    let only = |key: &str, for_kind: &str| -> Res<()> {
        match store.value(key) {
            Some(_) if kind != for_kind => Err(store.invalid(
                key,
                format!("only used with kind = \"{for_kind}\" (kind is \"{kind}\")"),
            )),
            _ => Ok(()),
        }
    };
    only("path", "embedded")?;
    only("endpoints", "etcd")?;
    only("prefix", "etcd")?;
    Ok(match kind {
        "memory" => StoreConfig::Memory,
        "etcd" => {
            let endpoints = store
                .required_array("endpoints")?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let key = format!("endpoints[{i}]");
                    match v.as_str() {
                        Some(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
                        Some(_) => Err(store.invalid(&key, "empty endpoint".to_owned())),
                        None => Err(store.invalid(&key, expected_found("a string", v))),
                    }
                })
                .collect::<Res<Vec<_>>>()?;
            if endpoints.is_empty() {
                return Err(store.invalid("endpoints", "needs at least one endpoint".to_owned()));
            }
            let prefix = store
                .optional("prefix", |s| match s {
                    "" => Err("empty prefix".to_owned()),
                    s => Ok(s.to_owned()),
                })?
                .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned());
            StoreConfig::Etcd { endpoints, prefix }
        }
        _ => StoreConfig::Embedded {
            path: store
                .optional("path", |s| ctx.path(s))?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
        },
    })
}

fn cluster(root: &Section, node_id: &NodeId, store: &StoreConfig) -> Res<ClusterConfig> {
    let Some(cluster) = root.table(
        "cluster",
        &["mode", "on_owner_loss", "lease_ttl_ms", "members"],
    )?
    else {
        return Ok(ClusterConfig::default());
    };
    let mode = cluster
        .optional("mode", |s| {
            Ok(match one_of(s, &["single", "sticky", "shared"])? {
                "sticky" => ClusterMode::Sticky,
                "shared" => ClusterMode::Shared,
                _ => ClusterMode::Single,
            })
        })?
        .unwrap_or_default();
    let on_owner_loss = cluster
        .optional("on_owner_loss", |s| {
            Ok(match one_of(s, &["failover", "deny", "terminate"])? {
                "deny" => OnOwnerLoss::Deny,
                "terminate" => OnOwnerLoss::Terminate,
                _ => OnOwnerLoss::Failover,
            })
        })?
        .unwrap_or_default();
    let lease_ttl_ms = cluster
        .integer("lease_ttl_ms", MIN_LEASE_TTL_MS, u64::MAX)?
        .unwrap_or(DEFAULT_LEASE_TTL_MS);

    let mut members = Vec::new();
    if let Some(list) = cluster.array("members")? {
        let mut ids = HashSet::new();
        for (i, value) in list.iter().enumerate() {
            let path = format!("{}members[{i}]", cluster.prefix());
            let Value::Table(t) = value else {
                return Err(Fault::invalid(
                    path,
                    expected_found("a table like { id = \"gw1\", udp = \"IP:PORT\" }", value),
                ));
            };
            let member = Section::new(path, t, &["id", "udp", "tcp", "admin"])?;
            let id = member.required("id", parse_node_id)?;
            if !ids.insert(id.clone()) {
                return Err(
                    member.invalid("id", format!("duplicate member {}", quote(id.as_str())))
                );
            }
            members.push(Member {
                udp: member.optional("udp", parse_destination)?,
                tcp: member.optional("tcp", parse_destination)?,
                admin: member.optional("admin", parse_admin_url)?,
                id,
            });
        }
    }

    if mode != ClusterMode::Single && !members.iter().any(|m| &m.id == node_id) {
        return Err(cluster.invalid(
            "members",
            format!(
                "must include this node ({}) when mode = \"{mode}\"",
                quote(node_id.as_str())
            ),
        ));
    }
    // SPEC §1: a shared cluster keeps its records in etcd; anything else is one node's store.
    if mode == ClusterMode::Shared && !matches!(store, StoreConfig::Etcd { .. }) {
        return Err(cluster.invalid(
            "mode",
            "\"shared\" needs store.kind = \"etcd\" (the store every member shares)".to_owned(),
        ));
    }
    Ok(ClusterConfig {
        mode,
        on_owner_loss,
        lease_ttl_ms,
        members,
    })
}

/// `[policy]`. Its keys and their types are the core's [`Policy`]: the set of known keys is
/// read from a serialized `Policy::default()`, and each key given is deserialized on its own,
/// so a type error is pinned to its key. Then [`Policy::validate`] checks the ranges.
fn parse_policy(root: &Section) -> Res<Policy> {
    let Some(value) = root.value("policy") else {
        return Ok(Policy::default());
    };
    let Value::Table(given) = value else {
        return Err(root.invalid("policy", expected_found("a table", value)));
    };
    let defaults = match Value::try_from(Policy::default()) {
        Ok(Value::Table(t)) => t,
        // The core's Policy is a struct of integers and one nested struct: it serializes to a
        // table. Should that ever change, say so rather than accept nothing.
        _ => {
            return Err(root.invalid(
                "policy",
                "internal error: the policy's defaults do not form a table".to_owned(),
            ))
        }
    };
    check_policy_table("policy", given, &defaults, &mut Vec::new())?;
    let policy: Policy = Value::Table(given.clone())
        .try_into()
        .map_err(|e: toml::de::Error| root.invalid("policy", e.message().to_owned()))?;
    policy.validate().map_err(|e| {
        Fault::invalid(
            format!("policy.{}", e.key),
            format!("expected {}, found {}", e.expected, e.value),
        )
    })?;
    Ok(policy)
}

/// Checks the keys of `given` (the table at `path`, reached from the policy root through
/// `trail`) against `defaults`, recursing into nested tables.
fn check_policy_table(
    path: &str,
    given: &Table,
    defaults: &Table,
    trail: &mut Vec<String>,
) -> Res<()> {
    for (key, value) in given {
        let here = format!("{path}.{key}");
        let Some(default) = defaults.get(key) else {
            return Err(Fault::unknown(here));
        };
        match (value, default) {
            (Value::Table(inner), Value::Table(inner_defaults)) => {
                trail.push(key.clone());
                check_policy_table(&here, inner, inner_defaults, trail)?;
                trail.pop();
            }
            _ => {
                // A policy holding only this key, nested as in the file.
                let mut probe = Value::Table(Table::from_iter([(key.clone(), value.clone())]));
                for outer in trail.iter().rev() {
                    probe = Value::Table(Table::from_iter([(outer.clone(), probe)]));
                }
                probe
                    .try_into::<Policy>()
                    .map_err(|e| Fault::invalid(here, e.message().to_owned()))?;
            }
        }
    }
    Ok(())
}

fn peers(root: &Section, tunnel: &TunnelConfig, own: &PrivateKey) -> Res<Vec<PeerConfig>> {
    let Some(list) = root.value("peer") else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = list else {
        return Err(root.invalid(
            "peer",
            expected_found("an array of tables ([[peer]])", list),
        ));
    };
    let own_public = own.public_key();
    let mut keys = HashSet::new();
    let mut ips = HashSet::new();
    let mut peers = Vec::with_capacity(list.len());
    for (i, value) in list.iter().enumerate() {
        let path = format!("peer[{i}]");
        let Value::Table(t) = value else {
            return Err(Fault::invalid(path, expected_found("a table", value)));
        };
        let peer = Section::new(path, t, &["public_key", "tunnel_ip"])?;
        let public_key = peer.required("public_key", parse_public_key)?;
        if public_key == own_public {
            return Err(peer.invalid("public_key", "is the gateway's own public key".to_owned()));
        }
        if !keys.insert(public_key) {
            return Err(peer.invalid("public_key", "the same key as an earlier peer".to_owned()));
        }
        let tunnel_ip = peer.required("tunnel_ip", |s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("expected an IP address, found {}", quote(s)))
        })?;
        check_peer_ip(tunnel, tunnel_ip).map_err(|what| peer.invalid("tunnel_ip", what))?;
        if !ips.insert(tunnel_ip) {
            return Err(peer.invalid(
                "tunnel_ip",
                format!("{tunnel_ip} is already the address of an earlier peer"),
            ));
        }
        peers.push(PeerConfig {
            public_key,
            tunnel_ip,
        });
    }
    Ok(peers)
}

fn check_peer_ip(tunnel: &TunnelConfig, ip: IpAddr) -> Result<(), String> {
    let subnet = format!(
        "{}/{}",
        network(tunnel.address, tunnel.prefix_len),
        tunnel.prefix_len
    );
    if !tunnel.contains(ip) {
        return Err(format!(
            "{ip} is outside the tunnel subnet {subnet} (tunnel.address)"
        ));
    }
    if ip == tunnel.address {
        return Err(format!(
            "{ip} is the gateway's own address (tunnel.address)"
        ));
    }
    check_host(ip, tunnel.prefix_len)
        .map_err(|what| format!("{ip} is {what} of the tunnel subnet {subnet}"))
}

fn candidates(root: &Section) -> Res<Vec<CandidateAddr>> {
    let list = root.required_array("candidates")?;
    if list.is_empty() {
        return Err(root.invalid(
            "candidates",
            "needs at least one address, like \"udp://198.51.100.1:51820\"".to_owned(),
        ));
    }
    let mut seen = Vec::with_capacity(list.len());
    for (i, value) in list.iter().enumerate() {
        let key = format!("candidates[{i}]");
        let Some(text) = value.as_str() else {
            return Err(root.invalid(&key, expected_found("a string", value)));
        };
        let candidate: CandidateAddr = text.parse().map_err(|e| root.invalid(&key, e))?;
        if let Some(j) = seen.iter().position(|c| c == &candidate) {
            return Err(root.invalid(&key, format!("duplicate of candidates[{j}]")));
        }
        seen.push(candidate);
    }
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------
// Value parsers: a string in, a typed value or a description of what is wrong out.

fn parse_node_id(s: &str) -> Result<NodeId, String> {
    let valid = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(NodeId::new(s))
    } else {
        Err(format!(
            "expected a node name of 1 to 64 letters, digits, '-', '_' or '.', found {}",
            quote(s)
        ))
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "expected an IP address and port like \"0.0.0.0:51820\", found {}",
            quote(s)
        )
    })
}

/// A socket address that something sends to: not unspecified, not port 0.
fn parse_destination(s: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(s)?;
    check_destination(addr).map_err(|what| format!("{what} in {}", quote(s)))?;
    Ok(addr)
}

fn check_destination(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_unspecified() {
        return Err("an unspecified address cannot be reached".to_owned());
    }
    if addr.port() == 0 {
        return Err("port 0 cannot be reached".to_owned());
    }
    Ok(())
}

fn parse_admin_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(s.trim_end_matches('/').to_owned())
        }
        _ => Err(format!(
            "expected a URL like \"http://10.0.0.1:51900\", found {}",
            quote(s)
        )),
    }
}

fn parse_public_key(s: &str) -> Result<[u8; 32], String> {
    // The value is not echoed: keys are copied around by hand, and a near-miss of a key is
    // still nothing to print.
    BASE64
        .decode(s.trim())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
        .ok_or_else(|| {
            "expected 32 bytes in base64 (44 characters), as `jumpvpn pubkey` prints".to_owned()
        })
}

/// Linux interface names: 1 to 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace, not "."
/// or "..".
fn parse_ifname(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected an interface name of 1 to 15 bytes without '/', ':' or spaces, found {}",
            quote(s)
        ))
    }
}

/// `"10.77.0.1/24"`: a host address and its subnet's prefix length.
fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let expected = || {
        format!(
            "expected an address with its prefix length, like \"10.77.0.1/24\", found {}",
            quote(s)
        )
    };
    let (ip, len) = s.split_once('/').ok_or_else(expected)?;
    let ip: IpAddr = ip.parse().map_err(|_| expected())?;
    let len: u8 = len.parse().map_err(|_| expected())?;
    let max = max_prefix(ip);
    if !(1..=max).contains(&len) {
        return Err(format!(
            "prefix length {len} out of range 1 to {max} in {}",
            quote(s)
        ));
    }
    check_host(ip, len).map_err(|what| {
        format!(
            "{ip} is {what} of {}/{len}, not a host address",
            network(ip, len)
        )
    })?;
    Ok((ip, len))
}

fn one_of<'s>(s: &'s str, allowed: &[&str]) -> Result<&'s str, String> {
    if allowed.contains(&s) {
        return Ok(s);
    }
    let quoted: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    let list = match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    };
    Err(format!("unknown value {}, expected {list}", quote(s)))
}

// ---------------------------------------------------------------------------------------------
// Subnet arithmetic.

fn max_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn network(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u32::from(v4) & mask).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u128::from(v6) & mask).to_be_bytes())
        }
    }
}

fn same_subnet(a: IpAddr, b: IpAddr, len: u8) -> bool {
    a.is_ipv4() == b.is_ipv4() && network(a, len) == network(b, len)
}

/// Whether `ip` may be a host of its /`len` subnet: not the network address, nor the IPv4
/// broadcast address (both exist only in subnets with more than two addresses).
fn check_host(ip: IpAddr, len: u8) -> Result<(), &'static str> {
    let host_bits = u32::from(max_prefix(ip) - len);
    if host_bits < 2 {
        return Ok(());
    }
    if ip == network(ip, len) {
        return Err("the network address");
    }
    if let IpAddr::V4(v4) = ip {
        let host_mask = u32::MAX >> (32 - host_bits);
        if u32::from(v4) & host_mask == host_mask {
            return Err("the broadcast address");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The table walker.

/// An error not yet tied to its file.
struct Fault {
    key: String,
    problem: Problem,
}

type Res<T> = Result<T, Fault>;

impl Fault {
    fn unknown(key: String) -> Self {
        Self {
            key,
            problem: Problem::UnknownKey,
        }
    }

    fn invalid(key: String, what: String) -> Self {
        Self {
            key,
            problem: Problem::InvalidValue(what),
        }
    }
}

/// Where the file is: for error messages and for resolving relative paths.
struct Ctx {
    file: PathBuf,
    dir: PathBuf,
}

impl Ctx {
    fn new(origin: &Path) -> Self {
        let dir = origin
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self {
            file: origin.to_path_buf(),
            dir,
        }
    }

    fn locate<T>(&self, result: Res<T>) -> Result<T, ConfigError> {
        result.map_err(|fault| ConfigError {
            file: self.file.clone(),
            key: fault.key,
            problem: fault.problem,
        })
    }

    fn path(&self, s: &str) -> Result<PathBuf, String> {
        if s.is_empty() {
            return Err("expected a file path, found an empty string".to_owned());
        }
        Ok(self.dir.join(s))
    }
}

/// One table of the file, at a dotted path, whose keys have been checked against the list
/// this format allows.
struct Section<'a> {
    path: String,
    table: &'a Table,
}

impl<'a> Section<'a> {
    fn new(path: String, table: &'a Table, allowed: &[&str]) -> Res<Self> {
        let section = Self { path, table };
        // The first unknown key in the table's order (sorted, or file order with toml's
        // preserve_order): stable from one run to the next.
        if let Some(key) = table.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Fault::unknown(section.key(key)));
        }
        Ok(section)
    }

    /// The dotted path of `key` in this section.
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix())
    }

    fn prefix(&self) -> String {
        if self.path.is_empty() {
            String::new()
        } else {
            format!("{}.", self.path)
        }
    }

    fn value(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    fn invalid(&self, key: &str, what: String) -> Fault {
        Fault::invalid(self.key(key), what)
    }

    fn missing(&self, key: &str) -> Fault {
        Fault {
            key: self.key(key),
            problem: Problem::MissingKey,
        }
    }

    fn secret_fault(&self, key: &str, path: &Path, reason: String) -> Fault {
        Fault {
            key: self.key(key),
            problem: Problem::SecretFile {
                path: path.to_path_buf(),
                reason,
            },
        }
    }

    /// A string-valued key, parsed by `parse` when present.
    fn optional<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Res<Option<T>> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        let Some(text) = value.as_str() else {
            return Err(self.invalid(key, expected_found("a string", value)));
        };
        parse(text)
            .map(Some)
            .map_err(|what| self.invalid(key, what))
    }

    fn required<T>(&self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Res<T> {
        self.optional(key, parse)?.ok_or_else(|| self.missing(key))
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Res<Option<u64>> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        let Some(n) = value.as_integer() else {
            return Err(self.invalid(key, expected_found("an integer", value)));
        };
        match u64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ if max == u64::MAX => {
                Err(self.invalid(key, format!("expected at least {min}, found {n}")))
            }
            _ => Err(self.invalid(key, format!("expected {min} to {max}, found {n}"))),
        }
    }

    fn array(&self, key: &str) -> Res<Option<&'a [Value]>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Array(list)) => Ok(Some(list.as_slice())),
            Some(other) => Err(self.invalid(key, expected_found("an array", other))),
        }
    }

    fn required_array(&self, key: &str) -> Res<&'a [Value]> {
        self.array(key)?.ok_or_else(|| self.missing(key))
    }

    fn table(&self, key: &str, allowed: &[&str]) -> Res<Option<Section<'a>>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Table(table)) => Section::new(self.key(key), table, allowed).map(Some),
            Some(other) => Err(self.invalid(key, expected_found("a table", other))),
        }
    }

    fn required_table(&self, key: &str, allowed: &[&str]) -> Res<Section<'a>> {
        self.table(key, allowed)?.ok_or_else(|| self.missing(key))
    }
}

fn parse_table(text: &str) -> Res<Table> {
    text.parse::<Table>().map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        Fault {
            key: String::new(),
            problem: Problem::Syntax {
                line,
                column,
                message: e.message().to_owned(),
            },
        }
    })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn read_config(path: &Path) -> Result<String, ConfigError> {
    let unreadable = |e| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        problem: Problem::Unreadable(e),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_FILE).read_to_string(&mut text))
        .map_err(unreadable)?;
    Ok(text)
}

/// Reads a key or token file into a buffer that is zeroed on drop.
fn read_secret(path: &Path) -> Result<Zeroizing<String>, String> {
    let mut text = Zeroizing::new(String::new());
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_string(&mut text));
    match read {
        Ok(n) if n as u64 > MAX_SECRET_FILE => {
            Err(format!("too large (over {MAX_SECRET_FILE} bytes)"))
        }
        Ok(_) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err("not text: expected base64".to_owned())
        }
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

fn expected_found(expected: &str, found: &Value) -> String {
    let kind = found.type_str();
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("expected {expected}, found {article} {kind}")
}

/// A value quoted for an error message, TOML-style.
fn quote(s: &str) -> String {
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_accepts_hosts_and_refuses_network_and_broadcast() {
        assert!(parse_cidr("10.77.0.1/24").is_ok());
        assert!(parse_cidr("10.77.0.254/24").is_ok());
        assert!(parse_cidr("10.77.0.0/31").is_ok());
        assert!(parse_cidr("fd00::1/64").is_ok());
        assert!(parse_cidr("10.77.0.0/24")
            .expect_err("network")
            .contains("the network address of 10.77.0.0/24"));
        assert!(parse_cidr("10.77.0.255/24")
            .expect_err("broadcast")
            .contains("the broadcast address"));
        assert!(parse_cidr("10.77.0.1/33").is_err());
        assert!(parse_cidr("10.77.0.1/0").is_err());
        assert!(parse_cidr("10.77.0.1").is_err());
        assert!(parse_cidr("fd00::/64").is_err());
    }

    #[test]
    fn one_of_lists_the_choices_in_english() {
        assert_eq!(
            one_of("redis", &["embedded", "memory", "etcd"]),
            Err(r#"unknown value "redis", expected "embedded", "memory" or "etcd""#.to_owned())
        );
        assert_eq!(one_of("etcd", &["embedded", "memory", "etcd"]), Ok("etcd"));
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_column("a = 1\nb = ?\n", 10), (2, 5));
        assert_eq!(line_column("x", 0), (1, 1));
    }

    #[test]
    fn admin_token_matches_only_itself() {
        let token = AdminToken::new("s3cret".to_owned());
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3creT"));
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }
}

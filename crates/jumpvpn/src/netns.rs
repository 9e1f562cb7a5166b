//! Network namespaces for tests and the demo: a client and a gateway joined by one veth pair,
//! with the path faults a roaming client meets — NAT rebinding and blocked UDP — applied to the
//! live path.
//!
//! ```text
//!   namespace jv-<tag>-c                          namespace jv-<tag>-g
//!   ┌──────────────────────────────┐              ┌──────────────────────────────┐
//!   │ client            jvc        │   veth pair  │        jvg          gateway  │
//!   │ 10.a.b.2/24 ──▶ SNAT udp ────┼──────────────┼──▶ 10.a.b.1/24               │
//!   │   source port := 40000-40999 │              │                              │
//!   │   (nat_rebind: next range)   │              │   block_udp(p): drop dport p │
//!   │ block_udp(p): drop sport p ◀─┼──────────────┼──                            │
//!   └──────────────────────────────┘              └──────────────────────────────┘
//! ```
//!
//! Everything here shells out to `ip`, `iptables` and `conntrack` (iproute2, iptables,
//! conntrack) and needs root; every failure names the command and carries its stderr. A
//! process is put in a namespace by starting it under `ip netns exec` ([`Netns::command`]).
//!
//! Dropping a [`Netns`] kills what still runs inside it and deletes it; the veth pair and the
//! iptables rules live in the namespaces and go with them. After a crash, [`cleanup_stale`]
//! removes the leftovers.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Fails with "`what` must run as root" unless the effective user is root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to check for root")?;
    // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective Uid in /proc/self/status")?;
    if euid != "0" {
        bail!("{what} must run as root; effective uid is {euid}");
    }
    Ok(())
}

/// Deletes every namespace whose name starts with `prefix` (which must start with `"jv-"`),
/// killing what runs inside: the leftovers of a run that crashed before its `Drop`. Returns
/// the names removed.
///
/// Pass the prefix of your own topologies only (`"jv-demo-"`): namespaces of other runs on
/// the same machine that share the prefix are removed too.
pub fn cleanup_stale(prefix: &str) -> anyhow::Result<Vec<String>> {
    if !prefix.starts_with("jv-") || prefix.len() < 4 {
        bail!("refusing to clean up namespaces named {prefix:?}*: the prefix must start with \"jv-\" and say more");
    }
    let mut removed = Vec::new();
    for name in list_namespaces()? {
        if name.starts_with(prefix) {
            Netns { name: name.clone() }.destroy()?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// The names of the network namespaces that `ip netns` knows.
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        // "name (id: 3)" or "name"
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A named network namespace (`ip netns add`), deleted on drop together with everything
/// still running inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, with its loopback interface up. Fails if it already exists.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        if list_namespaces()?.iter().any(|n| n == name) {
            bail!("network namespace {name} already exists (left over from a crashed run? see netns::cleanup_stale)");
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.exec(["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`). Add
    /// arguments, then spawn it or wait for its output as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.name).arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace and waits for it; a non-zero exit is an error that
    /// carries the command and its stderr.
    pub fn exec<I, S>(&self, argv: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().context("exec: empty command")?;
        let mut cmd = self.command(program);
        cmd.args(argv);
        run(&mut cmd)
    }

    /// The processes running inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> anyhow::Result<Vec<u32>> {
        let out = run(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect())
    }

    /// Kills what runs inside, then deletes the namespace.
    fn destroy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "processes {pids:?} in network namespace {} survive SIGKILL",
                    self.name
                );
            }
            // The shell's kill: no dependency on procps. A process may exit between the listing
            // and the kill, so the status is not checked; the next listing is.
            let _ = Command::new("sh")
                .args(["-c", "kill -KILL \"$@\" 2>/dev/null", "sh"])
                .args(pids.iter().map(u32::to_string))
                .status();
            std::thread::sleep(Duration::from_millis(20));
        }
        run(Command::new("ip").args(["netns", "del", &self.name]))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            // Drop cannot fail; say so where a test run or the demo's operator will see it.
            eprintln!(
                "jumpvpn: cannot remove network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// A client namespace and a gateway namespace joined by one veth pair on a /24, with
/// source NAT on the client's outgoing UDP, and path faults to apply to it.
///
/// The client's UDP leaves through SNAT to a port range of [`Topology::NAT_RANGE_SIZE`]
/// ports, so the gateway sees a source port chosen by NAT, not by the client's socket — as
/// behind a home router. [`Topology::nat_rebind`] moves the mapping of live flows to the next
/// range, which is what a NAT rebinding looks like from the gateway.
#[derive(Debug)]
pub struct Topology {
    client: Netns,
    gateway: Netns,
    client_ip: Ipv4Addr,
    gateway_ip: Ipv4Addr,
    /// Which SNAT range is in force: ports `NAT_BASE + generation * NAT_RANGE_SIZE` onwards.
    nat_generation: AtomicU16,
}

impl Topology {
    /// The prefix length of the veth subnet.
    pub const PREFIX_LEN: u8 = 24;
    /// The veth interface in the client namespace.
    pub const CLIENT_IF: &'static str = "jvc";
    /// The veth interface in the gateway namespace.
    pub const GATEWAY_IF: &'static str = "jvg";
    /// The first SNAT port.
    pub const NAT_BASE: u16 = 40_000;
    /// Ports per SNAT range; rebinding moves to the next range, cycling through ten.
    pub const NAT_RANGE_SIZE: u16 = 1_000;
    const NAT_RANGES: u16 = 10;

    /// Creates namespaces `jv-<tag>-c` and `jv-<tag>-g`, the veth pair between them with
    /// `10.a.b.2/24` (client) and `10.a.b.1/24` (gateway) where `a.b` is derived from the tag,
    /// loopback up in both, and the client's UDP SNAT. `tag` is 1 to 32 letters, digits, `-`
    /// or `_`; make it unique per run (a test name and the process ID).
    pub fn new(tag: &str) -> anyhow::Result<Topology> {
        let valid = !tag.is_empty()
            && tag.len() <= 32
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            bail!("topology tag {tag:?}: expected 1 to 32 letters, digits, '-' or '_'");
        }
        require_root("a network-namespace topology")?;
        let client = Netns::create(&format!("jv-{tag}-c"))?;
        let gateway = Netns::create(&format!("jv-{tag}-g"))?;
        let [a, b] = subnet_of(tag);
        let topology = Topology {
            client_ip: Ipv4Addr::new(10, a, b, 2),
            gateway_ip: Ipv4Addr::new(10, a, b, 1),
            client,
            gateway,
            nat_generation: AtomicU16::new(0),
        };
        topology.wire()?;
        Ok(topology)
    }

    /// The client's namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The gateway's namespace.
    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    /// The client's address on the veth (what it sends from, before NAT).
    pub fn client_ip(&self) -> Ipv4Addr {
        self.client_ip
    }

    /// The gateway's address on the veth (what clients send to).
    pub fn gateway_ip(&self) -> Ipv4Addr {
        self.gateway_ip
    }

    /// The source ports the gateway currently sees the client's UDP come from.
    pub fn nat_ports(&self) -> RangeInclusive<u16> {
        nat_range(self.nat_generation.load(Ordering::SeqCst))
    }

    /// Rebinds the client's NAT: switches the SNAT rule to the next port range and deletes the
    /// client namespace's UDP conntrack entries, so the next datagram of every live flow
    /// leaves from a new source port — the same client socket, a new address at the gateway.
    /// Returns the new range.
    pub fn nat_rebind(&self) -> anyhow::Result<RangeInclusive<u16>> {
        let generation = (self.nat_generation.load(Ordering::SeqCst) + 1) % Self::NAT_RANGES;
        let rule = self.snat_rule(generation);
        let mut argv = vec!["iptables", "-t", "nat", "-R", "POSTROUTING", "1"];
        argv.extend(rule.iter().map(String::as_str));
        self.client.exec(argv)?;
        self.nat_generation.store(generation, Ordering::SeqCst);
        // Exit status 1 with "0 flow entries have been deleted" is no flow, not a failure.
        let out = self
            .client
            .command("conntrack")
            .args(["-D", "-p", "udp"])
            .output()
            .context("cannot run conntrack (is the conntrack package installed?)")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("0 flow entries") {
            bail!(
                "conntrack -D -p udp in {}: {}: {}",
                self.client.name,
                out.status,
                stderr.trim()
            );
        }
        Ok(nat_range(generation))
    }

    /// Blocks UDP to and from `port` on the gateway's side (both directions), as a firewall on
    /// the path would: datagrams vanish, no error reaches either sender. Idempotent.
    ///
    /// The drops are at each namespace's ingress (`raw PREROUTING`): client→gateway in the
    /// gateway namespace, gateway→client in the client namespace. Dropping in the sender's
    /// own OUTPUT chain would instead fail its `send` with `EPERM`, which no real network does.
    pub fn block_udp(&self, port: u16) -> anyhow::Result<()> {
        for (ns, rule) in self.udp_block_rules(port) {
            if !rule_present(ns, &rule)? {
                let mut argv = vec!["iptables", "-t", "raw", "-I", "PREROUTING"];
                argv.extend(rule.iter().map(String::as_str));
                ns.exec(argv)?;
            }
        }
        Ok(())
    }

    /// Undoes [`Topology::block_udp`]. Idempotent.
    pub fn unblock_udp(&self, port: u16) -> anyhow::Result<()> {
        for (ns, rule) in self.udp_block_rules(port) {
            while rule_present(ns, &rule)? {
                let mut argv = vec!["iptables", "-t", "raw", "-D", "PREROUTING"];
                argv.extend(rule.iter().map(String::as_str));
                ns.exec(argv)?;
            }
        }
        Ok(())
    }

    fn wire(&self) -> anyhow::Result<()> {
        // Created straight into the namespaces, so the names need only be unique inside them
        // and nothing appears in the caller's namespace even for a moment.
        run(Command::new("ip").args([
            "link",
            "add",
            Self::CLIENT_IF,
            "netns",
            &self.client.name,
            "type",
            "veth",
            "peer",
            "name",
            Self::GATEWAY_IF,
            "netns",
            &self.gateway.name,
        ]))?;
        for (ns, ifname, ip) in [
            (&self.client, Self::CLIENT_IF, self.client_ip),
            (&self.gateway, Self::GATEWAY_IF, self.gateway_ip),
        ] {
            let cidr = format!("{ip}/{}", Self::PREFIX_LEN);
            ns.exec(["ip", "addr", "add", &cidr, "dev", ifname])?;
            ns.exec(["ip", "link", "set", ifname, "up"])?;
        }
        let mut argv = vec!["iptables", "-t", "nat", "-A", "POSTROUTING"];
        let rule = self.snat_rule(0);
        argv.extend(rule.iter().map(String::as_str));
        self.client.exec(argv)?;
        Ok(())
    }

    fn snat_rule(&self, generation: u16) -> Vec<String> {
        let ports = nat_range(generation);
        let to = format!("{}:{}-{}", self.client_ip, ports.start(), ports.end());
        [
            "-o",
            Self::CLIENT_IF,
            "-p",
            "udp",
            "-j",
            "SNAT",
            "--to-source",
            &to,
            "--random",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn udp_block_rules(&self, port: u16) -> [(&Netns, Vec<String>); 2] {
        let rule = |ifname: &str, dir: &str| {
            let port = port.to_string();
            ["-i", ifname, "-p", "udp", dir, &port, "-j", "DROP"]
                .map(str::to_owned)
                .to_vec()
        };
        [
            (&self.gateway, rule(Self::GATEWAY_IF, "--dport")),
            (&self.client, rule(Self::CLIENT_IF, "--sport")),
        ]
    }
}

fn nat_range(generation: u16) -> RangeInclusive<u16> {
    let start = Topology::NAT_BASE + generation * Topology::NAT_RANGE_SIZE;
    start..=start + (Topology::NAT_RANGE_SIZE - 1)
}

/// Whether `rule` is in the namespace's raw PREROUTING chain (`iptables -C`).
fn rule_present(ns: &Netns, rule: &[String]) -> anyhow::Result<bool> {
    let status = ns
        .command("iptables")
        .args(["-t", "raw", "-C", "PREROUTING"])
        .args(rule)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run iptables (is the iptables package installed?)")?;
    Ok(status.success())
}

/// `10.a.b.0/24` for a tag: FNV-1a of the tag, `a` in 100..=199 so it stays clear of the
/// 10.77/16 tunnel addresses of the examples.
fn subnet_of(tag: &str) -> [u8; 2] {
    let hash = tag.bytes().fold(0x811c_9dc5_u32, |h, byte| {
        (h ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let [h0, h1, ..] = hash.to_le_bytes();
    [100 + h0 % 100, h1]
}

/// Runs a command to completion; a non-zero exit is an error carrying the command line and
/// its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_stay_in_10_100_to_10_199() {
        for tag in ["a", "demo", "nat_rebind-1234", "x_y_z"] {
            let [a, _] = subnet_of(tag);
            assert!((100..=199).contains(&a), "{tag} -> {a}");
        }
        assert_ne!(subnet_of("t1-100"), subnet_of("t1-101"));
    }

    #[test]
    fn nat_ranges_do_not_overlap_and_fit_in_u16() {
        let first = nat_range(0);
        let last = nat_range(Topology::NAT_RANGES - 1);
        assert_eq!(first, 40_000..=40_999);
        assert_eq!(last, 49_000..=49_999);
        assert!(!nat_range(1).contains(first.end()));
    }
}

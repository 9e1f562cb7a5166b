//! The network-namespace harness and the TUN device, for real: namespaces, veth, iptables,
//! conntrack, ping and UDP sockets. These tests need root and fail (never skip) without it.
//!
//! UDP endpoints inside the namespaces are a few lines of python3 driven over stdin/stdout
//! (a process is placed in a namespace by `ip netns exec`; this process cannot enter one
//! without unsafe code), so each datagram's observed source address can be asserted.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use jumpvpn::netns::{self, Netns, Topology};

fn must_be_root() {
    if let Err(e) = netns::require_root("the network-namespace tests") {
        panic!("{e:#}: run `cargo test` as root (or in the CI container, where it is)");
    }
}

/// A topology tag unique to this test and this process.
fn tag(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

fn namespaces() -> Vec<String> {
    netns::list_namespaces().expect("ip netns list")
}

/// One UDP socket in a namespace, driven line by line: `send IP PORT`, `recv SECONDS`.
const UDP_TOOL: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("bound %s:%d" % s.getsockname(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "send":
            s.sendto(b"probe", (cmd[1], int(cmd[2])))
            print("sent", flush=True)
        elif cmd[0] == "recv":
            s.settimeout(float(cmd[1]))
            try:
                _, peer = s.recvfrom(2048)
                print("from %s:%d" % peer, flush=True)
            except socket.timeout:
                print("timeout", flush=True)
    except OSError as e:
        print("error %s" % e, flush=True)
"#;

struct UdpTool {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    local: SocketAddr,
}

impl UdpTool {
    fn start(ns: &Netns, bind: SocketAddr) -> UdpTool {
        let mut child = ns
            .command("python3")
            .args([
                "-c",
                UDP_TOOL,
                &bind.ip().to_string(),
                &bind.port().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3 in the namespace (is python3 installed?)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut tool = UdpTool {
            child,
            stdin,
            stdout,
            local: bind,
        };
        let line = tool.line();
        let local = line
            .strip_prefix("bound ")
            .unwrap_or_else(|| panic!("udp tool did not start: {line:?}"));
        tool.local = local.parse().expect("bound address");
        tool
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read from udp tool");
        assert!(n > 0, "udp tool in namespace exited");
        line.trim().to_owned()
    }

    fn send(&mut self, to: SocketAddr) {
        writeln!(self.stdin, "send {} {}", to.ip(), to.port()).expect("write to udp tool");
        assert_eq!(self.line(), "sent");
    }

    /// The sender of the next datagram, or None if none comes within `secs`.
    fn recv(&mut self, secs: f64) -> Option<SocketAddr> {
        writeln!(self.stdin, "recv {secs}").expect("write to udp tool");
        let line = self.line();
        if line == "timeout" {
            return None;
        }
        let from = line
            .strip_prefix("from ")
            .unwrap_or_else(|| panic!("unexpected answer from udp tool: {line:?}"));
        Some(from.parse().expect("sender address"))
    }
}

impl Drop for UdpTool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway socket on `port` and a client socket, in a fresh topology.
fn udp_pair(topo: &Topology, port: u16) -> (UdpTool, UdpTool) {
    let gateway = UdpTool::start(
        topo.gateway(),
        SocketAddr::new(topo.gateway_ip().into(), port),
    );
    let client = UdpTool::start(
        topo.client(),
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
    );
    (gateway, client)
}

/// Client → gateway; returns the source address the gateway saw, if the datagram arrived.
fn client_to_gateway(client: &mut UdpTool, gateway: &mut UdpTool) -> Option<SocketAddr> {
    client.send(gateway.local);
    gateway.recv(1.0)
}

/// Gateway → the client's address as the gateway knows it; whether the client got it.
fn gateway_to_client(gateway: &mut UdpTool, client: &mut UdpTool, seen: SocketAddr) -> bool {
    gateway.send(seen);
    match client.recv(1.0) {
        Some(from) => {
            assert_eq!(
                from, gateway.local,
                "the reply comes from the gateway's socket"
            );
            true
        }
        None => false,
    }
}

#[test]
fn topology_pings_across_the_veth_and_drop_removes_everything() {
    must_be_root();
    let topo = Topology::new(&tag("ping")).expect("create topology");
    let (c, g) = (
        topo.client().name().to_owned(),
        topo.gateway().name().to_owned(),
    );
    assert!(c.starts_with("jv-ping-") && c.ends_with("-c"), "{c}");
    assert!(namespaces().contains(&c) && namespaces().contains(&g));
    assert_eq!(
        topo.gateway_ip().octets()[..3],
        topo.client_ip().octets()[..3]
    );

    let ping = |ns: &Netns, ip: Ipv4Addr| {
        ns.exec(["ping", "-c1", "-W1", &ip.to_string()])
            .unwrap_or_else(|e| panic!("ping {ip} from {}: {e:#}", ns.name()))
    };
    ping(topo.client(), topo.gateway_ip());
    ping(topo.gateway(), topo.client_ip());
    ping(topo.client(), Ipv4Addr::LOCALHOST);
    // The namespaces are isolated: the gateway's address is not reachable from here.
    let outside = Command::new("ping")
        .args(["-c1", "-W1", &topo.gateway_ip().to_string()])
        .output()
        .expect("run ping");
    assert!(
        !outside.status.success(),
        "the topology leaks into the caller's namespace"
    );

    // A process still running inside is killed when the topology goes.
    let mut sleeper = topo
        .client()
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep in the client namespace");
    // `ip netns exec` enters the namespace after the spawn returns: wait (bounded) until the
    // process is seen inside.
    let inside = (0..200).any(|_| {
        let seen = !topo.client().pids().expect("pids").is_empty();
        if !seen {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        seen
    });
    assert!(inside, "the process never appeared in the namespace");
    drop(topo);
    let status = sleeper.wait().expect("wait for sleep");
    assert!(
        !status.success(),
        "sleep was killed, not finished: {status}"
    );
    let left = namespaces();
    assert!(
        !left.contains(&c) && !left.contains(&g),
        "left behind: {left:?}"
    );
}

#[test]
fn nat_rebind_changes_the_source_port_the_gateway_sees() {
    must_be_root();
    let topo = Topology::new(&tag("rebind")).expect("create topology");
    let (mut gateway, mut client) = udp_pair(&topo, 51820);

    let first = client_to_gateway(&mut client, &mut gateway).expect("datagram arrives");
    assert_eq!(first.ip(), IpAddr::from(topo.client_ip()));
    assert!(
        topo.nat_ports().contains(&first.port()),
        "{first} not from SNAT range"
    );
    assert_ne!(
        first.port(),
        client.local.port(),
        "the source port is NAT's, not the socket's"
    );
    assert_eq!(
        client_to_gateway(&mut client, &mut gateway),
        Some(first),
        "mapping is stable"
    );
    assert!(
        gateway_to_client(&mut gateway, &mut client, first),
        "replies reach the socket"
    );

    let range = topo.nat_rebind().expect("rebind");
    assert!(!range.contains(&first.port()));
    let second = client_to_gateway(&mut client, &mut gateway).expect("datagram arrives");
    assert_eq!(second.ip(), first.ip());
    assert_ne!(
        second.port(),
        first.port(),
        "same socket, new source port after rebind"
    );
    assert!(range.contains(&second.port()), "{second} not in {range:?}");
    assert!(
        gateway_to_client(&mut gateway, &mut client, second),
        "new mapping carries replies"
    );

    let third_range = topo.nat_rebind().expect("rebind again");
    let third = client_to_gateway(&mut client, &mut gateway).expect("datagram arrives");
    assert!(third_range.contains(&third.port()) && third.port() != second.port());
}

#[test]
fn block_udp_drops_both_directions_silently_and_unblock_restores() {
    must_be_root();
    let topo = Topology::new(&tag("block")).expect("create topology");
    let (mut gateway, mut client) = udp_pair(&topo, 51820);
    let (mut other_gw, mut other_client) = udp_pair(&topo, 51821);

    let seen = client_to_gateway(&mut client, &mut gateway).expect("flows before blocking");

    topo.block_udp(51820).expect("block");
    topo.block_udp(51820).expect("blocking twice is harmless");
    // Sends succeed ("sent", not "error"): the datagrams vanish on the path.
    assert_eq!(
        client_to_gateway(&mut client, &mut gateway),
        None,
        "client→gateway dropped"
    );
    assert!(
        !gateway_to_client(&mut gateway, &mut client, seen),
        "gateway→client dropped"
    );
    // Other ports, and ICMP, are untouched.
    assert!(client_to_gateway(&mut other_client, &mut other_gw).is_some());
    topo.client()
        .exec(["ping", "-c1", "-W1", &topo.gateway_ip().to_string()])
        .expect("ping while UDP is blocked");

    topo.unblock_udp(51820).expect("unblock");
    assert_eq!(
        client_to_gateway(&mut client, &mut gateway),
        Some(seen),
        "flows again, from the same mapping"
    );
    assert!(gateway_to_client(&mut gateway, &mut client, seen));
    topo.unblock_udp(51820)
        .expect("unblocking twice is harmless");
}

#[test]
fn cleanup_stale_removes_only_namespaces_with_its_prefix() {
    must_be_root();
    let pid = std::process::id();
    let ours = Netns::create(&format!("jv-stale{pid}-a")).expect("create");
    let other = Netns::create(&format!("jv-kept{pid}-a")).expect("create");
    let ours_name = ours.name().to_owned();
    // Forget the handle, as a crashed run would: no Drop.
    std::mem::forget(ours);

    let removed = netns::cleanup_stale(&format!("jv-stale{pid}-")).expect("cleanup");
    assert_eq!(removed, [ours_name.as_str()]);
    let left = namespaces();
    assert!(!left.contains(&ours_name));
    assert!(left.contains(&other.name().to_owned()));
    assert!(
        netns::cleanup_stale("").is_err(),
        "an empty prefix would remove everything"
    );
    assert!(netns::cleanup_stale("jv-").is_err(), "too broad");
}

#[test]
fn tun_device_gets_its_address_mtu_and_link_up_and_goes_away_on_drop() {
    must_be_root();
    let pid = std::process::id();
    let name = format!("jvt{}", pid % 1_000_000);
    let address = IpAddr::from([10, 250, (pid % 250) as u8, 1]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let device = runtime
        .block_on(async { jumpvpn::tun::open(&name, address, 24, jumpvpn::tun::DEFAULT_MTU) })
        .unwrap_or_else(|e| panic!("open TUN {name}: {e:#}"));
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("run ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let addr = ip(&["-o", "addr", "show", "dev", &name]);
    assert!(addr.contains(&format!("inet {address}/24")), "{addr}");
    let link = ip(&["-o", "link", "show", "dev", &name]);
    assert!(link.contains("mtu 1420"), "{link}");
    assert!(link.contains(",UP"), "{link}");

    let second = runtime.block_on(async { jumpvpn::tun::open(&name, address, 24, 1420) });
    match second {
        Ok(_) => panic!("opened a second device named {name}"),
        Err(e) => {
            let text = format!("{e:#}");
            assert!(
                text.contains(&name) && text.contains("already exists"),
                "{text}"
            );
        }
    }

    drop(device);
    let gone = Command::new("ip")
        .args(["link", "show", "dev", &name])
        .output()
        .expect("run ip");
    assert!(!gone.status.success(), "{name} still exists after drop");
}

#[test]
fn spoofed_injection_arrives_from_the_address_of_the_socket_it_imitates() {
    // `debug inject --spoof-source` is how the end-to-end tests replay datagrams from the
    // client's bound address while the client holds the port: through the same NAT mapping.
    must_be_root();
    let topo = Topology::new(&tag("spoof")).expect("create topology");
    let (mut gateway, mut client) = udp_pair(&topo, 51822);
    let real = client_to_gateway(&mut client, &mut gateway).expect("datagram arrives");
    assert_ne!(real.port(), client.local.port(), "behind the NAT");

    let imitated = SocketAddr::new(topo.client_ip().into(), client.local.port());
    let out = topo
        .client()
        .command(env!("CARGO_BIN_EXE_jumpvpn"))
        .args(["debug", "inject", "--mode", "random", "--count", "1"])
        .args(["--to", &gateway.local.to_string()])
        .args(["--spoof-source", &imitated.to_string()])
        .output()
        .expect("inject runs");
    assert!(
        out.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gateway.recv(5.0),
        Some(real),
        "the injected datagram carries the socket's own (translated) source"
    );
}

//! End-to-end: real processes, real TUN devices, real network namespaces, real faults.
//!
//! These tests need root (namespaces, TUN, iptables). Without it they fail loudly; `.ci/run`
//! runs them as root with iproute2, iptables, conntrack and iputils-ping installed.
//! Every test ends with `jumpvpn audit verify` over the gateway's and the client's logs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jumpvpn::debug_cmd::StreamReport;
use jumpvpn::lab::{
    event_type, wait_until, Lab, LabOptions, CLIENT_TUNNEL_IP, GATEWAY_TUNNEL_IP, PORT,
};
use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_jumpvpn");

fn lab(tag: &str, options: LabOptions) -> Lab {
    Lab::new(tag, Path::new(EXE), options).expect("the lab needs root: run the tests as root")
}

fn up(lab: &mut Lab) -> String {
    lab.start_gateway().expect("gateway starts");
    lab.start_client().expect("client starts");
    lab.wait_tunnel(Duration::from_secs(20))
        .expect("the tunnel carries a ping");
    let created = lab
        .wait_gateway_event("the session", Duration::from_secs(5), |e| {
            event_type(e) == "SESSION_CREATED"
        })
        .expect("a session");
    // On the first candidate: the gateway listened before the client sent its first init.
    assert_eq!(created["proto"].as_str(), Some("udp"), "{created}");
    created["session_id"]
        .as_str()
        .expect("a session id")
        .to_owned()
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| event_type(e) == kind).count()
}

fn latest_version(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| event_type(e) == "STATE_CHANGE")
        .filter_map(|e| e["state_version"].as_u64())
        .max()
        .unwrap_or(0)
}

fn audit_verify(lab: &Lab) {
    let out = Command::new(EXE)
        .args(["audit", "verify"])
        .arg(lab.gateway_audit())
        .arg(lab.client_audit())
        .output()
        .expect("audit verify runs");
    assert!(
        out.status.success(),
        "audit verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn inject(lab: &Lab, args: &[&str]) {
    let to = format!("{}:{PORT}", lab.topology.gateway_ip());
    let out = lab
        .topology
        .client()
        .command(EXE)
        .args(["debug", "inject", "--to", &to])
        .args(args)
        .output()
        .expect("inject runs");
    assert!(
        out.status.success(),
        "inject {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn demo_three_jumps_one_session_one_connection() {
    crate_requires_root();
    let out = Command::new(EXE)
        .arg("demo")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo passed"), "{stdout}");
    assert!(stdout.contains("sessions: 1, handshakes: 1"), "{stdout}");
    assert!(stdout.contains("1 connection"), "{stdout}");
    for jump in ["jump 1", "jump 2", "jump 3"] {
        assert!(stdout.contains(jump), "{jump} missing:\n{stdout}");
    }
    // Nothing left behind.
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains("jv-demo"));
}

#[test]
fn gateway_kill_9_and_restart_resumes_the_same_session() {
    let mut lab = lab("kill9", LabOptions::default());
    let session = up(&mut lab);
    let before = latest_version(&lab.gateway_events());

    lab.kill_gateway().expect("kill -9");
    lab.start_gateway().expect("restart on the same store");
    let switch = lab
        .wait_gateway_event("the reattach after restart", Duration::from_secs(30), |e| {
            event_type(e) == "TRANSPORT_SWITCH"
        })
        .expect("the client reattached");
    assert_eq!(switch["session_id"].as_str(), Some(session.as_str()));
    assert!(switch["state_version"].as_u64() > Some(before));
    lab.wait_tunnel(Duration::from_secs(10))
        .expect("traffic flows again");

    let events = lab.gateway_events();
    assert_eq!(count(&events, "SESSION_CREATED"), 1, "no second handshake");
    assert!(lab.stop().expect("stops"), "clean shutdown");
    audit_verify(&lab);
}

#[test]
fn bulk_tcp_crosses_the_batched_data_path_intact_both_ways() {
    // Bulk TCP is what the offloads act on: super-packets from the TUN device split and sealed
    // in batches, datagrams sent and received in runs, packets coalesced back before the TUN
    // write. Every byte must arrive once and in order, on one connection, each way.
    const BYTES: u64 = 16 << 20;
    let mut lab = lab("bulk", LabOptions::default());
    up(&mut lab);
    for (receiver_is_client, address) in [(false, GATEWAY_TUNNEL_IP), (true, CLIENT_TUNNEL_IP)] {
        let listen = format!("{address}:7001");
        let report_path = lab.path(&format!("bulk-to-{address}.json"));
        let report_arg = report_path.display().to_string();
        lab.spawn_helper(
            receiver_is_client,
            &[
                EXE,
                "debug",
                "stream-server",
                "--listen",
                &listen,
                "--report",
                &report_arg,
            ],
        )
        .expect("stream server");
        lab.spawn_helper(
            !receiver_is_client,
            &[
                EXE,
                "debug",
                "stream-client",
                "--connect",
                &listen,
                "--rate",
                "0",
                "--bytes",
                &BYTES.to_string(),
            ],
        )
        .expect("stream client");
        let read = || -> Option<StreamReport> {
            serde_json::from_str(&std::fs::read_to_string(&report_path).ok()?).ok()
        };
        wait_until(Duration::from_secs(60), "the stream's report", || {
            Ok(read().is_some())
        })
        .expect("the stream ended");
        assert_eq!(
            read(),
            Some(StreamReport {
                connections: 1,
                bytes: BYTES,
                in_order: true,
            }),
            "towards {address}"
        );
    }
    assert!(lab.stop().expect("stops"), "clean shutdown");
    audit_verify(&lab);
}

#[test]
fn replays_forgeries_and_garbage_move_nothing() {
    // The client writes every UDP datagram it sends here (the lab's directory is known ahead).
    let dir = std::env::temp_dir().join(format!("jumpvpn-replay-{}", std::process::id()));
    let capture = dir.join("capture.hex").display().to_string();
    let mut options = LabOptions::default();
    options
        .client_env
        .push(("JUMPVPN_CAPTURE".into(), capture.clone()));
    let mut lab = lab("replay", options);
    assert_eq!(lab.dir, dir);
    let session = up(&mut lab);

    // A NAT rebinding makes the client send a reattach, so the capture holds every kind.
    lab.topology.nat_rebind().expect("rebind");
    lab.wait_gateway_event("the reattach", Duration::from_secs(15), |e| {
        event_type(e) == "TRANSPORT_SWITCH"
    })
    .expect("reattached after rebinding");
    lab.wait_tunnel(Duration::from_secs(10)).expect("traffic");
    let before = lab.gateway_events();
    let version = latest_version(&before);

    // From a new address: every captured datagram, forged proofs, bit flips, random bytes.
    inject(&lab, &["--mode", "replay", "--capture", &capture]);
    inject(&lab, &["--mode", "forge-proof", "--capture", &capture]);
    inject(
        &lab,
        &[
            "--mode",
            "bitflip",
            "--capture",
            &capture,
            "--count",
            "3000",
        ],
    );
    inject(&lab, &["--mode", "random", "--count", "3000"]);
    lab.wait_tunnel(Duration::from_secs(10))
        .expect("the session is unaffected: traffic flows");
    let replays_seen = count_reason(&lab.gateway_events(), "REPLAY_DETECTED");
    assert!(replays_seen > 0, "the replayed reattach was refused");

    // From the bound address itself: every captured datagram again, sent as the client's own
    // socket (through the same NAT mapping), where replayed data meets the replay window.
    let source = client_udp_source(&lab);
    inject(
        &lab,
        &[
            "--mode",
            "replay",
            "--capture",
            &capture,
            "--spoof-source",
            &source,
        ],
    );
    wait_until(Duration::from_secs(10), "the bound-address replays", || {
        Ok(count_reason(&lab.gateway_events(), "REPLAY_DETECTED") > replays_seen)
    })
    .expect("the replayed reattach from the bound address was refused");
    lab.wait_tunnel(Duration::from_secs(10))
        .expect("the session is unaffected: traffic flows");

    let events = lab.gateway_events();
    assert_eq!(
        latest_version(&events),
        version,
        "nothing moved: {:?}",
        changes_after(&events, version)
    );
    assert_eq!(
        count(&events, "SESSION_CREATED"),
        1,
        "a replayed init creates nothing"
    );
    let security: Vec<&str> = events
        .iter()
        .filter(|e| event_type(e) == "SECURITY_EVENT")
        .filter_map(|e| e["violation_type"].as_str())
        .collect();
    assert!(security.contains(&"SEC_REPLAY_ATTEMPT"), "{security:?}");
    assert!(security.contains(&"SEC_INVALID_PROOF"), "{security:?}");
    let rejected: Vec<&str> = events
        .iter()
        .filter(|e| event_type(e) == "REATTACH_REJECTED")
        .filter_map(|e| e["reason_code"].as_str())
        .collect();
    assert!(rejected.contains(&"REPLAY_DETECTED"), "{rejected:?}");
    assert!(rejected.contains(&"AUTH_FAIL"), "{rejected:?}");
    assert!(events
        .iter()
        .all(|e| e["session_id"].as_str().is_none_or(|s| s == session)));

    // After a restart the gateway no longer knows the last init timestamp, so the replayed
    // init is answered; its sender cannot confirm it, so it creates and supersedes nothing.
    lab.kill_gateway().expect("kill -9");
    lab.start_gateway().expect("restart on the same store");
    let switches = count(&lab.gateway_events(), "TRANSPORT_SWITCH");
    wait_until(
        Duration::from_secs(30),
        "the reattach after restart",
        || Ok(count(&lab.gateway_events(), "TRANSPORT_SWITCH") > switches),
    )
    .expect("the client reattached");
    lab.wait_tunnel(Duration::from_secs(10)).expect("traffic");
    let version = latest_version(&lab.gateway_events());
    inject(&lab, &["--mode", "replay", "--capture", &capture]);
    lab.wait_tunnel(Duration::from_secs(10))
        .expect("the session is unaffected: traffic flows");
    let events = lab.gateway_events();
    assert_eq!(latest_version(&events), version, "nothing moved");
    assert_eq!(count(&events, "SESSION_CREATED"), 1, "no second session");
    assert_eq!(count_reason(&events, "SESSION_SUPERSEDED"), 0);
    assert!(
        lab.stop().expect("stops"),
        "the gateway survived and shut down cleanly"
    );
    audit_verify(&lab);
}

/// The gateway's events after `version`, for failure messages.
fn changes_after(events: &[Value], version: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["state_version"].as_u64() > Some(version))
        .map(|e| e.to_string())
        .collect()
}

/// Events of the gateway log with this reason code.
fn count_reason(events: &[Value], reason: &str) -> usize {
    events
        .iter()
        .filter(|e| e["reason_code"].as_str() == Some(reason))
        .count()
}

/// The client's UDP socket as its namespace sees it (before the NAT), from `ss`.
fn client_udp_source(lab: &Lab) -> String {
    let out = lab
        .topology
        .client()
        .command("ss")
        .args(["-Hunap"])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("\"jumpvpn\""))
        .unwrap_or_else(|| panic!("no UDP socket of the client in:\n{text}"));
    line.split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("no local address in {line:?}"))
        .to_owned()
}

#[test]
fn session_ttl_expiry_terminates_and_the_client_starts_over() {
    let mut lab = lab(
        "ttl",
        LabOptions {
            policy: "session_ttl_ms = 4000".into(),
            ..LabOptions::default()
        },
    );
    let first = up(&mut lab);
    let ended = lab
        .wait_gateway_event("the TTL", Duration::from_secs(20), |e| {
            event_type(e) == "TERMINATION_EVENT"
        })
        .expect("terminated");
    assert_eq!(ended["session_id"].as_str(), Some(first.as_str()));
    assert_eq!(ended["reason_code"].as_str(), Some("TTL_SESSION_EXPIRED"));
    // The client learns it (authenticated TERMINATE) and performs a new handshake.
    let second = lab
        .wait_gateway_event("a new session", Duration::from_secs(20), |e| {
            event_type(e) == "SESSION_CREATED" && e["session_id"].as_str() != Some(&first)
        })
        .expect("a new handshake after TERMINATED");
    assert_ne!(second["session_id"], ended["session_id"]);
    assert!(lab.stop().expect("stops"));
    audit_verify(&lab);
}

#[test]
fn recovery_window_expiry_terminates_with_its_reason() {
    let mut lab = lab(
        "recov",
        LabOptions {
            policy: "server_dead_after_ms = 1000\nmax_recovery_window_ms = 2000".into(),
            ..LabOptions::default()
        },
    );
    let session = up(&mut lab);
    // Every path to the gateway fails: UDP and TCP.
    lab.topology.block_udp(PORT).expect("block udp");
    let out = lab
        .topology
        .client()
        .command("iptables")
        .args([
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &PORT.to_string(),
            "-j",
            "DROP",
        ])
        .status()
        .expect("iptables");
    assert!(out.success());
    let recovering = lab
        .wait_gateway_event("RECOVERING", Duration::from_secs(20), |e| {
            event_type(e) == "STATE_CHANGE" && e["new_state"].as_str() == Some("RECOVERING")
        })
        .expect("the binding was declared dead");
    assert_eq!(recovering["reason_code"].as_str(), Some("RECOVERY_START"));
    let ended = lab
        .wait_gateway_event("the recovery window", Duration::from_secs(20), |e| {
            event_type(e) == "TERMINATION_EVENT"
        })
        .expect("terminated");
    assert_eq!(ended["session_id"].as_str(), Some(session.as_str()));
    assert_eq!(
        ended["reason_code"].as_str(),
        Some("RECOVERY_BOUNDS_EXCEEDED")
    );
    assert!(lab.stop().expect("stops"));
    audit_verify(&lab);
}

fn crate_requires_root() {
    jumpvpn::netns::require_root("the end-to-end tests").expect("run the tests as root");
}

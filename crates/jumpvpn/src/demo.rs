//! `jumpvpn demo`: the whole product in one command, on one machine.
//!
//! Two network namespaces joined by a veth pair; a gateway (embedded store in a temporary
//! directory) and a client as real processes over real TUN devices; a continuous ping and a
//! long-lived TCP stream through the tunnel. Then three jumps of the path underneath: (a) NAT
//! rebinding (the client's source port changes), (b) UDP blocked (the client falls back to
//! TCP), (c) UDP unblocked (it returns to UDP). For each jump it prints the recovery time and
//! the pings lost; then the session's timeline and the `audit verify` result. Everything it
//! created is removed at the end, also on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::cli::{DemoArgs, TimelineArgs, VerifyArgs};
use crate::debug_cmd::StreamReport;
use crate::lab::{self, event_type, Lab, LabOptions, GATEWAY_TUNNEL_IP, INTERRUPTED, PORT};
use crate::{audit_cmd, Status};

/// Ping interval of the demo.
const PING_INTERVAL: Duration = Duration::from_millis(50);
/// Port of the TCP stream inside the tunnel.
const STREAM_PORT: u16 = 5001;

/// Runs `jumpvpn demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<Status> {
    crate::netns::require_root("jumpvpn demo (it creates network namespaces and TUN devices)")?;
    watch_ctrl_c();
    let exe = std::env::current_exe().context("cannot find the jumpvpn binary")?;
    let _ = crate::netns::cleanup_stale("jv-demo-");
    let mut lab = Lab::new(
        "demo",
        &exe,
        LabOptions {
            keep: args.keep,
            ..LabOptions::default()
        },
    )?;
    let outcome = demo(&mut lab);
    if args.keep {
        println!("kept: {}", lab.dir.display());
    }
    outcome
}

fn watch_ctrl_c() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("jumpvpn demo: interrupted, cleaning up");
            }
        });
    });
}

/// A jump of the demo and what it measured.
struct Jump {
    name: &'static str,
    at: Instant,
    switch: Value,
}

fn demo(lab: &mut Lab) -> anyhow::Result<Status> {
    println!("jumpvpn demo: a gateway and a client in two network namespaces");
    println!(
        "  gateway {}:{PORT} (udp and tcp), client {}, tunnel {} <-> {}",
        lab.topology.gateway_ip(),
        lab.topology.client_ip(),
        lab::CLIENT_TUNNEL_IP,
        GATEWAY_TUNNEL_IP
    );
    lab.start_gateway()?;
    lab.start_client()?;
    let up = lab.wait_tunnel(Duration::from_secs(20))?;
    let created = lab.wait_gateway_event("the session", Duration::from_secs(5), |e| {
        event_type(e) == "SESSION_CREATED"
    })?;
    let session = created["session_id"].as_str().unwrap_or("").to_owned();
    println!(
        "  tunnel up in {:.1} s, session {session}",
        up.as_secs_f64()
    );

    // Continuous ping and a long-lived TCP stream through the tunnel.
    let exe = lab.exe().display().to_string();
    let report_path = lab.path("stream.json");
    let stream_listen = format!("{GATEWAY_TUNNEL_IP}:{STREAM_PORT}");
    let report_arg = report_path.display().to_string();
    lab.spawn_helper(
        false,
        &[
            &exe,
            "debug",
            "stream-server",
            "--listen",
            &stream_listen,
            "--report",
            &report_arg,
        ],
    )?;
    let stream_client = lab.spawn_helper(
        true,
        &[&exe, "debug", "stream-client", "--connect", &stream_listen],
    )?;
    let pings = Pings::start(lab)?;
    println!(
        "  ping every {} ms and one TCP connection running through the tunnel",
        PING_INTERVAL.as_millis()
    );
    pings.wait_replies(20, Duration::from_secs(10))?;

    let mut jumps = Vec::new();
    let mut version = latest_switch_version(lab);

    let at = Instant::now();
    lab.topology.nat_rebind()?;
    let switch = wait_switch(lab, version, "udp", "the reattach after NAT rebinding")?;
    version = switch_version(&switch);
    jumps.push(Jump {
        name: "NAT rebinding: new source port",
        at,
        switch,
    });
    pings.wait_reply_after(Instant::now(), Duration::from_secs(10))?;

    let at = Instant::now();
    lab.topology.block_udp(PORT)?;
    let switch = wait_switch(lab, version, "tcp", "the fallback to TCP")?;
    version = switch_version(&switch);
    jumps.push(Jump {
        name: "UDP blocked: fallback to TCP",
        at,
        switch,
    });
    pings.wait_reply_after(Instant::now(), Duration::from_secs(10))?;

    let at = Instant::now();
    lab.topology.unblock_udp(PORT)?;
    let switch = wait_switch(lab, version, "udp", "the return to UDP")?;
    jumps.push(Jump {
        name: "UDP unblocked: back to UDP",
        at,
        switch,
    });
    pings.wait_reply_after(Instant::now(), Duration::from_secs(10))?;
    let end = Instant::now();

    // Stop the traffic, then the stream (its server writes the report), then the tunnel.
    let replies = pings.stop(lab);
    let sent_bytes = {
        let child = lab.helper(stream_client).context("stream client")?;
        lab::signal(child, "TERM");
        let mut out = String::new();
        if let Some(stdout) = child.stdout.as_mut() {
            use std::io::Read as _;
            stdout.read_to_string(&mut out).ok();
        }
        child.wait()?;
        out.trim().parse::<u64>().unwrap_or(0)
    };
    lab::wait_until(Duration::from_secs(10), "the stream report", || {
        Ok(report_path.exists())
    })?;
    let report: StreamReport = serde_json::from_str(&std::fs::read_to_string(&report_path)?)
        .context("the stream report is not readable")?;
    let clean = lab.stop()?;

    println!();
    let mut ok = true;
    for (i, jump) in jumps.iter().enumerate() {
        let until = jumps.get(i + 1).map_or(end, |j| j.at);
        let (gap, lost, total) = replies.window(jump.at, until);
        let proto = jump.switch["proto"].as_str().unwrap_or("?");
        println!(
            "  jump {} {:<32} recovered in {:>5} ms  pings lost {:>3} of {:<4} now on {proto} (version {})",
            i + 1,
            jump.name,
            gap.as_millis(),
            lost,
            total,
            switch_version(&jump.switch),
        );
    }
    let events = lab.gateway_events();
    let sessions: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["session_id"].as_str())
        .collect();
    let handshakes = events
        .iter()
        .filter(|e| event_type(e) == "SESSION_CREATED")
        .count();
    let stream_ok = report.connections == 1 && report.in_order && report.bytes == sent_bytes;
    println!(
        "  TCP stream: {} connection, {} bytes sent, {} received, {}",
        report.connections,
        sent_bytes,
        report.bytes,
        if report.in_order {
            "every byte in order"
        } else {
            "BYTES OUT OF ORDER"
        }
    );
    println!(
        "  sessions: {}, handshakes: {handshakes}; clean shutdown: {}",
        sessions.len(),
        if clean { "yes" } else { "no" }
    );
    ok &= stream_ok && sessions.len() == 1 && handshakes == 1;

    println!("\ntimeline of session {session}:");
    let files = vec![lab.gateway_audit(), lab.client_audit()];
    audit_cmd::timeline(&TimelineArgs {
        session: session.clone(),
        files: files.clone(),
    })?;
    println!(
        "\naudit verify {}:",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let verified = audit_cmd::verify(&VerifyArgs { files })?;
    ok &= verified == Status::Success;
    if verified == Status::Success {
        println!("  ok: every invariant of SPEC §8 holds");
    }
    println!();
    if ok {
        println!("demo passed: three jumps, one session, the same TCP connection throughout");
        Ok(Status::Success)
    } else {
        bail!("demo failed (see above)")
    }
}

fn switch_version(event: &Value) -> u64 {
    event["state_version"].as_u64().unwrap_or(0)
}

fn latest_switch_version(lab: &Lab) -> u64 {
    lab.gateway_events()
        .iter()
        .filter(|e| matches!(event_type(e), "TRANSPORT_SWITCH" | "SESSION_CREATED"))
        .map(switch_version)
        .max()
        .unwrap_or(0)
}

/// Waits for the gateway to record a switch to `proto` after version `after`.
fn wait_switch(lab: &Lab, after: u64, proto: &str, what: &str) -> anyhow::Result<Value> {
    lab.wait_gateway_event(what, Duration::from_secs(30), |e| {
        event_type(e) == "TRANSPORT_SWITCH"
            && switch_version(e) > after
            && e["proto"].as_str() == Some(proto)
    })
}

/// The continuous ping: replies by sequence number and arrival time.
struct Pings {
    index: usize,
    replies: Arc<Mutex<Vec<(u64, Instant)>>>,
}

/// What the ping saw.
struct Replies {
    replies: Vec<(u64, Instant)>,
}

impl Pings {
    fn start(lab: &mut Lab) -> anyhow::Result<Self> {
        let interval = format!("{:.3}", PING_INTERVAL.as_secs_f64());
        let target = GATEWAY_TUNNEL_IP.to_string();
        let index = lab.spawn_helper(true, &["ping", "-n", "-i", &interval, &target])?;
        let stdout = lab
            .helper(index)
            .and_then(|c| c.stdout.take())
            .context("ping's output")?;
        let replies = Arc::new(Mutex::new(Vec::new()));
        let sink = replies.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let seq = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("icmp_seq="))
                    .and_then(|s| s.parse::<u64>().ok());
                if let (Some(seq), Ok(mut r)) = (seq, sink.lock()) {
                    r.push((seq, Instant::now()));
                }
            }
        });
        Ok(Self { index, replies })
    }

    fn count(&self) -> usize {
        self.replies.lock().map_or(0, |r| r.len())
    }

    fn wait_replies(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        lab::wait_until(timeout, "ping replies", || Ok(self.count() >= n))
    }

    fn wait_reply_after(&self, at: Instant, timeout: Duration) -> anyhow::Result<()> {
        lab::wait_until(timeout, "ping replies after the jump", || {
            Ok(self
                .replies
                .lock()
                .is_ok_and(|r| r.iter().any(|(_, t)| *t > at)))
        })
    }

    fn stop(self, lab: &mut Lab) -> Replies {
        if let Some(child) = lab.helper(self.index) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let replies = self.replies.lock().map(|r| r.clone()).unwrap_or_default();
        Replies { replies }
    }
}

impl Replies {
    /// Over `[from, until)`: the longest silence between replies (the outage), and how many
    /// pings were never answered between the last reply before `from` and the last reply
    /// before `until`, of how many were sent in that span.
    fn window(&self, from: Instant, until: Instant) -> (Duration, u64, u64) {
        let before = self
            .replies
            .iter()
            .filter(|(_, t)| *t < from)
            .map(|(s, _)| *s)
            .max()
            .unwrap_or(0);
        let inside: std::collections::BTreeSet<u64> = self
            .replies
            .iter()
            .filter(|(_, t)| *t >= from && *t < until)
            .map(|(s, _)| *s)
            .filter(|s| *s > before)
            .collect();
        let last = inside.iter().next_back().copied().unwrap_or(before);
        let total = last.saturating_sub(before);
        let lost = total.saturating_sub(inside.len() as u64);
        let mut times: Vec<Instant> = self
            .replies
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= from && *t < until)
            .collect();
        times.sort();
        let mut gap = times
            .first()
            .map_or(Duration::ZERO, |t| t.duration_since(from));
        for pair in times.windows(2) {
            gap = gap.max(pair[1].duration_since(pair[0]));
        }
        // A gap of one interval is the ping's own rhythm, not an outage.
        (gap.saturating_sub(PING_INTERVAL), lost, total)
    }
}

/// The UDP echo port of the reattach benchmark (inside the tunnel).
const ECHO_PORT: u16 = 7_007;

/// 200 compare-and-swaps on an embedded store in a temporary directory, in ms each: the
/// "one store commit" of the reattach latency goal, on the same disk as the lab's store.
fn store_commit_latency() -> anyhow::Result<Vec<f64>> {
    use jumpvpn_core::record::{NewSession, SealedSecret};
    use jumpvpn_core::{NodeId, OwnerEpoch, Policy, SessionId, SessionRecord, SessionState};
    use jumpvpn_store::embedded::EmbeddedStore;
    use jumpvpn_store::SessionStore as _;
    let dir = std::env::temp_dir().join(format!("jumpvpn-commit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = (|| {
        let store = EmbeddedStore::open(dir.join("store.redb"))?;
        let runtime = crate::driver::runtime()?;
        runtime.block_on(async {
            let mut record = SessionRecord::birth(
                NewSession {
                    session_id: SessionId::from_u128(1),
                    owner: NodeId::new("bench"),
                    client_key: [3; 32],
                    tunnel_ip: crate::lab::CLIENT_TUNNEL_IP.into(),
                    policy: Policy::default().into(),
                    secrets: SealedSecret::new(vec![0x5A; 48]),
                },
                jumpvpn_core::Timestamp(1),
            );
            record.state = SessionState::Attached;
            record.state_version = jumpvpn_core::StateVersion(1);
            record.owner_epoch = OwnerEpoch(1);
            store.create(&record).await?;
            let mut took = Vec::with_capacity(200);
            for _ in 0..200 {
                let expected = record.state_version;
                record.state_version = jumpvpn_core::StateVersion(expected.get() + 1);
                let start = Instant::now();
                store.compare_and_swap(expected, &record).await?;
                took.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(took)
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Milliseconds since the Unix epoch, as the audit clocks count them.
fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// `jumpvpn debug bench-reattach`: reattach latency over many NAT rebindings on loopback veth.
///
/// Per jump: the NAT mapping of the client's flow changes (`conntrack -D`); then, with a UDP
/// probe every 1 ms through the tunnel to an echo in the gateway's namespace, it measures
/// path change → first probe answered again (end to end: the next probe meets the new mapping,
/// the gateway answers `REATTACH_HINT`, the client reattaches, the store commits, traffic
/// flows), split at the client's `REATTACH_ACK`, and the client's own measure, hint received →
/// `REATTACH_ACK`. Prints p50/p99 of each, the probe RTT and one embedded-store commit.
pub fn bench_reattach(jumps: usize) -> anyhow::Result<Status> {
    crate::netns::require_root("the reattach benchmark")?;
    let exe = std::env::current_exe().context("cannot find the jumpvpn binary")?;
    let _ = crate::netns::cleanup_stale("jv-bench-");
    let mut lab = Lab::new(
        "bench",
        &exe,
        LabOptions {
            // Anti-flap would (rightly) refuse 200 switches a minute.
            policy: "max_switches_per_min = 1000\nswitch_cooldown_ms = 1".into(),
            ..LabOptions::default()
        },
    )?;
    lab.start_gateway()?;
    lab.start_client()?;
    lab.wait_tunnel(Duration::from_secs(20))?;
    let commit = store_commit_latency()?;
    // A UDP echo in the gateway's namespace, probed through the tunnel every millisecond
    // (ping slows to one probe per 10 ms while replies are outstanding, as after an outage).
    let exe_path = exe.display().to_string();
    let echo = format!("{GATEWAY_TUNNEL_IP}:{ECHO_PORT}");
    let listen = format!("0.0.0.0:{ECHO_PORT}");
    lab.spawn_helper(
        false,
        &[&exe_path, "debug", "udp-echo", "--listen", &listen],
    )?;
    let index = lab.spawn_helper(
        true,
        &[
            &exe_path,
            "debug",
            "udp-probe",
            "--to",
            &echo,
            "--interval-us",
            "1000",
        ],
    )?;
    let stdout = lab
        .helper(index)
        .and_then(|c| c.stdout.take())
        .context("the probe's output")?;
    let replies: Arc<Mutex<Vec<(u64, Instant, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = replies.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut fields = line.split_whitespace().skip(1).map(str::parse::<u64>);
            let (Some(Ok(seq)), Some(Ok(rtt_us))) = (fields.next(), fields.next()) else {
                continue;
            };
            if let Ok(mut r) = sink.lock() {
                r.push((seq, Instant::now(), rtt_us as f64 / 1000.0));
            }
        }
    });
    lab::wait_until(Duration::from_secs(10), "probe replies", || {
        Ok(replies.lock().map_or(0, |r| r.len()) >= 20)
    })?;
    let mut end_to_end = Vec::with_capacity(jumps);
    let mut to_switch = Vec::with_capacity(jumps);
    let mut after_ack = Vec::with_capacity(jumps);
    for jump in 0..jumps {
        let switches = |lab: &Lab| {
            lab.client_events()
                .into_iter()
                .filter(|e| event_type(e) == "TRANSPORT_SWITCH")
                .collect::<Vec<_>>()
        };
        let before = switches(&lab).len();
        lab.topology.nat_rebind()?;
        let changed = Instant::now();
        let changed_wall_ms = wall_ms();
        let last_seq = replies
            .lock()
            .map_or(0, |r| r.last().map_or(0, |(s, _, _)| *s));
        lab::wait_until(Duration::from_secs(10), "the reattach", || {
            Ok(switches(&lab).len() > before)
        })?;
        // The client's audit clock is the wall clock (driver::Clock), in ms.
        if let Some(ts) = switches(&lab).get(before).and_then(|e| e["ts_ms"].as_f64()) {
            to_switch.push(ts - changed_wall_ms);
        }
        lab::wait_until(
            Duration::from_secs(10),
            "a probe through the new path",
            || {
                Ok(replies
                    .lock()
                    .is_ok_and(|r| r.iter().any(|(s, t, _)| *s > last_seq + 1 && *t > changed)))
            },
        )?;
        let first = replies
            .lock()
            .ok()
            .and_then(|r| {
                r.iter()
                    .filter(|(s, t, _)| *s > last_seq + 1 && *t > changed)
                    .map(|(_, t, _)| *t)
                    .min()
            })
            .context("a reply")?;
        let through = first.duration_since(changed).as_secs_f64() * 1000.0;
        end_to_end.push(through);
        if let Some(acked) = to_switch.last() {
            after_ack.push(through - acked);
        }
        if (jump + 1) % 50 == 0 {
            eprintln!("{} jumps", jump + 1);
        }
    }
    let mut client: Vec<f64> = lab
        .client_events()
        .iter()
        .filter(|e| event_type(e) == "TRANSPORT_SWITCH")
        .filter_map(|e| e["switch_latency_ms"].as_f64())
        .collect();
    let mut rtts: Vec<f64> = replies
        .lock()
        .map(|r| r.iter().map(|(_, _, rtt)| *rtt).collect())
        .unwrap_or_default();
    lab.stop()?;
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("{jumps} NAT rebindings on a veth pair, a UDP probe every 1 ms through the tunnel");
    println!(
        "  path change -> first probe answered: p50 {:.1} ms, p99 {:.1} ms (includes up to 1 ms until the next probe)",
        pct(&mut end_to_end, 0.5),
        pct(&mut end_to_end, 0.99)
    );
    println!(
        "  path change -> REATTACH_ACK at the client (audit clock, ms resolution): p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut to_switch, 0.5),
        pct(&mut to_switch, 0.99)
    );
    println!(
        "  REATTACH_ACK at the client -> first probe answered: p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut after_ack, 0.5),
        pct(&mut after_ack, 0.99)
    );
    println!(
        "  hint received -> REATTACH_ACK (client): p50 {:.1} ms, p99 {:.1} ms ({} switches)",
        pct(&mut client, 0.5),
        pct(&mut client, 0.99),
        client.len()
    );
    println!(
        "  probe RTT through the tunnel: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut rtts, 0.5),
        pct(&mut rtts, 0.99)
    );
    let mut commit = commit;
    println!(
        "  one embedded-store commit (CAS, fsync) on this disk: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut commit, 0.5),
        pct(&mut commit, 0.99)
    );
    Ok(Status::Success)
}

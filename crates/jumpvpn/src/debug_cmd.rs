//! `jumpvpn debug …`: small tools the demo and the end-to-end tests run inside network
//! namespaces. Hidden from `--help`: they are instruments, not product.
//!
//! - `stream-server` / `stream-client`: a long-lived TCP connection carrying a known byte
//!   pattern, so that "the same connection carried every byte in order" can be checked after
//!   the tunnel underneath moved.
//! - `inject`: sends datagrams at a gateway: replays of a capture (`JUMPVPN_CAPTURE`, written by
//!   the client), forged proofs, bit flips and random bytes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Status;

/// `jumpvpn debug …`
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Accept one TCP connection and check the pattern it carries; write a report at its end.
    StreamServer(StreamServerArgs),
    /// Connect and send the pattern until SIGTERM or SIGINT (or `--bytes` are sent).
    StreamClient(StreamClientArgs),
    /// Send datagrams at a gateway.
    Inject(InjectArgs),
    /// Echo every UDP datagram back to its sender.
    UdpEcho {
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send a numbered UDP datagram every interval; print `reply SEQ RTT_US` for each echo.
    UdpProbe {
        /// The echo server.
        #[arg(long)]
        to: SocketAddr,
        /// Microseconds between datagrams.
        #[arg(long, default_value_t = 1_000)]
        interval_us: u64,
    },
    /// Reattach latency over many NAT rebindings (a benchmark; needs root).
    BenchReattach {
        /// How many jumps.
        #[arg(long, default_value_t = 200)]
        jumps: usize,
    },
}

/// Arguments of `debug stream-server`.
#[derive(Debug, Args)]
pub struct StreamServerArgs {
    /// Where to listen.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: PathBuf,
}

/// Arguments of `debug stream-client`.
#[derive(Debug, Args)]
pub struct StreamClientArgs {
    /// The server.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Bytes per second; 0: as fast as the connection takes them.
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Stop after this many bytes (closing the connection, so the server reports).
    #[arg(long)]
    pub bytes: Option<u64>,
}

/// What `debug inject` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InjectMode {
    /// Every captured datagram as it was.
    Replay,
    /// Captured reattach requests with one proof byte flipped.
    ForgeProof,
    /// Captured datagrams with random bits flipped.
    Bitflip,
    /// Random bytes of random length.
    Random,
}

/// Arguments of `debug inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The gateway's UDP address.
    #[arg(long)]
    pub to: SocketAddr,
    /// Local address to send from (default: any).
    #[arg(long, conflicts_with = "spoof_source")]
    pub bind: Option<SocketAddr>,
    /// Send as if from this IPv4 address and port, which another socket holds (e.g. the
    /// client's own, so that replays arrive from its bound address): the UDP header is written
    /// here and sent on a raw socket (root).
    #[arg(long)]
    pub spoof_source: Option<SocketAddr>,
    /// A capture file (one hex datagram per line) for replay, forge-proof and bitflip.
    #[arg(long)]
    pub capture: Option<PathBuf>,
    /// What to send.
    #[arg(long, value_enum)]
    pub mode: InjectMode,
    /// How many datagrams (bitflip and random; replay sends each captured one once).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Seed for the random modes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The stream server's report.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamReport {
    /// Connections accepted (1 when the stream survived every jump).
    pub connections: u64,
    /// Bytes received on the first connection.
    pub bytes: u64,
    /// Whether every byte was the expected one.
    pub in_order: bool,
}

/// Sends `datagrams` to `to` as UDP from `from` over a raw IPv4 socket bound to `from`'s
/// address: the kernel writes the IP header, this writes the UDP one (checksum 0, which IPv4
/// allows), so the port can be one another socket holds.
fn send_spoofed(from: SocketAddr, to: SocketAddr, datagrams: &[Vec<u8>]) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    anyhow::ensure!(
        from.is_ipv4() && to.is_ipv4(),
        "--spoof-source: IPv4 only ({from} to {to})"
    );
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .context("--spoof-source: cannot open a raw socket (root needed)")?;
    socket
        .bind(&SockAddr::from(SocketAddr::new(from.ip(), 0)))
        .with_context(|| format!("--spoof-source: cannot bind {}", from.ip()))?;
    let dest = SockAddr::from(SocketAddr::new(to.ip(), 0));
    let mut packet = Vec::with_capacity(1500);
    for d in datagrams {
        let len = u16::try_from(d.len() + 8).context("datagram too long")?;
        packet.clear();
        packet.extend_from_slice(&from.port().to_be_bytes());
        packet.extend_from_slice(&to.port().to_be_bytes());
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
        packet.extend_from_slice(d);
        socket
            .send_to(&packet, &dest)
            .with_context(|| format!("--spoof-source: cannot send to {to}"))?;
    }
    Ok(())
}

/// Byte `i` of the pattern.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Runs a `debug` command.
pub fn run(command: &DebugCommand) -> anyhow::Result<Status> {
    if let DebugCommand::BenchReattach { jumps } = command {
        return crate::demo::bench_reattach(*jumps);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            DebugCommand::StreamServer(args) => stream_server(args).await,
            DebugCommand::StreamClient(args) => stream_client(args).await,
            DebugCommand::Inject(args) => inject(args).await,
            DebugCommand::UdpEcho { listen } => udp_echo(*listen).await,
            DebugCommand::UdpProbe { to, interval_us } => udp_probe(*to, *interval_us).await,
            DebugCommand::BenchReattach { .. } => Ok(()),
        }
    })?;
    Ok(Status::Success)
}

async fn udp_echo(listen: SocketAddr) -> anyhow::Result<()> {
    let socket = tokio::net::UdpSocket::bind(listen)
        .await
        .with_context(|| format!("cannot bind {listen}"))?;
    let mut buf = vec![0u8; 2048];
    loop {
        let (len, from) = socket.recv_from(&mut buf).await?;
        let _ = socket.send_to(&buf[..len], from).await;
    }
}

/// Unlike `ping`, which waits 10 ms between sends while replies are outstanding (so after an
/// outage its cadence drops), this keeps its interval whatever is lost.
async fn udp_probe(to: SocketAddr, interval_us: u64) -> anyhow::Result<()> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket
        .connect(to)
        .await
        .with_context(|| format!("cannot reach {to}"))?;
    let mut tick = tokio::time::interval(std::time::Duration::from_micros(interval_us.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = std::time::Instant::now();
    let mut seq = 0u64;
    let mut buf = [0u8; 64];
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let mut datagram = [0u8; 16];
                datagram[..8].copy_from_slice(&seq.to_be_bytes());
                let sent_us = start.elapsed().as_micros() as u64;
                datagram[8..].copy_from_slice(&sent_us.to_be_bytes());
                // A send into a broken path fails or vanishes; the sequence goes on.
                let _ = socket.send(&datagram).await;
            }
            received = socket.recv(&mut buf) => {
                if let Ok(16) = received {
                    let field = |at: usize| {
                        let mut bytes = [0u8; 8];
                        bytes.copy_from_slice(&buf[at..at + 8]);
                        u64::from_be_bytes(bytes)
                    };
                    let rtt_us = (start.elapsed().as_micros() as u64).saturating_sub(field(8));
                    writeln!(out, "reply {} {rtt_us}", field(0))?;
                    out.flush()?;
                }
            }
        }
    }
}

async fn stream_server(args: &StreamServerArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (mut stream, _) = listener.accept().await?;
    let mut report = StreamReport {
        connections: 1,
        bytes: 0,
        in_order: true,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => {
                let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                for &b in &buf[..n] {
                    if b != pattern(report.bytes) {
                        report.in_order = false;
                    }
                    report.bytes += 1;
                }
            }
            accepted = listener.accept() => {
                if accepted.is_ok() {
                    report.connections += 1;
                }
            }
            _ = sigterm.recv() => break,
        }
    }
    let json = serde_json::to_string(&report)?;
    std::fs::write(&args.report, json)
        .with_context(|| format!("cannot write {}", args.report.display()))?;
    Ok(())
}

async fn stream_client(args: &StreamClientArgs) -> anyhow::Result<()> {
    // The server may still be starting: retry for a while.
    let mut attempts = 0;
    let mut stream = loop {
        match tokio::net::TcpStream::connect(args.connect).await {
            Ok(stream) => break stream,
            Err(error) if attempts >= 100 => {
                return Err(error).with_context(|| format!("cannot connect to {}", args.connect));
            }
            Err(_) => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let paced = args.rate > 0;
    let chunk = if paced {
        (args.rate / 50).clamp(1, 64 * 1024)
    } else {
        64 * 1024
    };
    let limit = args.bytes.unwrap_or(u64::MAX);
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while sent < limit {
        // Signals first; then the next tick, or at once when not paced.
        tokio::select! {
            biased;
            _ = sigterm.recv() => break,
            _ = &mut ctrl_c => break,
            _ = tick.tick(), if paced => {}
            () = std::future::ready(()), if !paced => {}
        }
        let end = sent.saturating_add(chunk).min(limit);
        let bytes: Vec<u8> = (sent..end).map(pattern).collect();
        stream.write_all(&bytes).await.context("stream broke")?;
        sent = end;
    }
    stream.shutdown().await?;
    println!("{sent}");
    std::io::stdout().flush()?;
    Ok(())
}

/// A small deterministic generator (splitmix64) for the random modes.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn read_capture(path: &PathBuf) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read capture {}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, line)| {
            let hex = line.trim();
            (0..hex.len())
                .step_by(2)
                .map(|j| {
                    hex.get(j..j + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .with_context(|| format!("{}:{}: not hex", path.display(), i + 1))
                })
                .collect()
        })
        .collect()
}

async fn inject(args: &InjectArgs) -> anyhow::Result<()> {
    let capture = match &args.capture {
        Some(path) => read_capture(path)?,
        None => Vec::new(),
    };
    let mut mix = Mix(args.seed);
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    match args.mode {
        InjectMode::Replay => datagrams.clone_from(&capture),
        InjectMode::ForgeProof => {
            // REATTACH_REQUEST: type 3, version, session 16, nonce 8, known 8, proto 1, proof 32.
            for d in capture
                .iter()
                .filter(|d| d.first() == Some(&3) && d.len() == 68)
            {
                let mut forged = d.clone();
                let at = 36 + (mix.next() % 32) as usize;
                forged[at] ^= 0x01;
                datagrams.push(forged);
            }
        }
        InjectMode::Bitflip => {
            anyhow::ensure!(!capture.is_empty(), "bitflip needs a non-empty --capture");
            for _ in 0..args.count {
                let mut d = capture[(mix.next() % capture.len() as u64) as usize].clone();
                let flips = 1 + mix.next() % 4;
                for _ in 0..flips {
                    let bit = (mix.next() % (d.len() as u64 * 8)) as usize;
                    d[bit / 8] ^= 1 << (bit % 8);
                }
                datagrams.push(d);
            }
        }
        InjectMode::Random => {
            for _ in 0..args.count {
                let len = (mix.next() % 200) as usize;
                let mut d: Vec<u8> = (0..len).map(|_| mix.next() as u8).collect();
                // Make a share of them look like our packets, to reach deeper code.
                if let Some(first) = d.first_mut() {
                    if mix.next().is_multiple_of(2) {
                        *first = 1 + (mix.next() % 6) as u8;
                    }
                }
                if d.len() > 1 && mix.next().is_multiple_of(2) {
                    d[1] = 1;
                }
                datagrams.push(d);
            }
        }
    }
    match args.spoof_source {
        Some(from) => send_spoofed(from, args.to, &datagrams)?,
        None => {
            let bind = args.bind.unwrap_or_else(|| {
                if args.to.is_ipv4() {
                    SocketAddr::from(([0, 0, 0, 0], 0))
                } else {
                    SocketAddr::from(([0u16; 8], 0))
                }
            });
            let socket = tokio::net::UdpSocket::bind(bind)
                .await
                .with_context(|| format!("cannot bind {bind}"))?;
            for d in &datagrams {
                socket.send_to(d, args.to).await?;
            }
        }
    }
    println!("{}", datagrams.len());
    Ok(())
}

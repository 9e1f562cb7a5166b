//! `jumpvpn client --config FILE`: the tokio driver around the sans-IO client endpoint.
//!
//! The endpoint names transports by their index in the configuration's candidate list; this
//! driver opens them on first use: a connected UDP socket per UDP candidate, a TCP connection
//! per TCP candidate (reconnected on the next send after it failed). One task feeds the
//! endpoint with TUN packets, received packets, transport failures and timers, and drains its
//! outputs after each. It reads the UDP sockets itself; TCP connections have reader tasks.
//!
//! The data path moves batches, as the gateway's does (see [`crate::datapath`]).

use std::future::poll_fn;
use std::io::Write as _;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jumpvpn_core::endpoint::client::{
    CandidateSpec, Client, ClientConfig as EndpointConfig, ClientEvent, ClientOutput,
};
use jumpvpn_core::Proto;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::audit_log::AuditLog;
use crate::cli::ConfigArgs;
use crate::config::{self, ClientConfig};
use crate::datapath::{BatchUdp, GsoBatch, TunReader, TunWriter};
use crate::driver::{self, client_node_name, read_frame, write_frame, Clock, MAX_FRAME, TCP_QUEUE};
use crate::{tun, Status};

const AUDIT_QUEUE: usize = 16_384;
/// Reads of the TUN device, or receives from a UDP socket, per wake-up at most (each one a
/// batch), so that one direction does not starve the other and the timers.
const RECV_ROUNDS: usize = 8;

/// Runs `jumpvpn client --config FILE` until SIGTERM or SIGINT.
pub fn run(args: &ConfigArgs) -> anyhow::Result<Status> {
    let config = config::load_client(&args.config).map_err(crate::usage_error)?;
    crate::init_logging();
    driver::runtime()?.block_on(serve(config))?;
    Ok(Status::Success)
}

enum Net {
    Packet { candidate: usize, bytes: Vec<u8> },
    Failed { candidate: usize, generation: u64 },
}

/// An open transport of one candidate.
enum Transport {
    Udp(BatchUdp),
    Tcp {
        writer: mpsc::Sender<Vec<u8>>,
        generation: u64,
    },
}

/// The transports of the candidates, opened on first use.
struct Transports {
    candidates: Vec<CandidateSpec>,
    open: Vec<Option<Transport>>,
    generation: u64,
    net: mpsc::Sender<Net>,
    /// A debugging aid (and the replay tests' source): every UDP datagram sent, in hex.
    capture: Option<std::io::BufWriter<std::fs::File>>,
}

fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn serve(config: ClientConfig) -> anyhow::Result<()> {
    let public = config.private_key.public_key();
    let node = client_node_name(&public);
    let tun = tun::open(
        &config.tunnel.name,
        config.tunnel.address,
        config.tunnel.prefix_len,
        tun::DEFAULT_MTU,
    )?;
    let (audit, audit_writer) = AuditLog::open(&config.audit_log, node.clone(), AUDIT_QUEUE)
        .with_context(|| format!("audit_log: cannot open {}", config.audit_log.display()))?;
    let candidates: Vec<CandidateSpec> = config
        .candidates
        .iter()
        .map(|c| CandidateSpec {
            proto: c.proto,
            addr: c.addr,
        })
        .collect();
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).context("no operating-system randomness")?;
    let mut client = Client::new(EndpointConfig {
        private_key: Zeroizing::new(config.private_key.secret().to_bytes()),
        gateway_public: config.gateway_public_key,
        candidates: candidates.clone(),
        node,
        seed: *seed,
    });

    let clock = Clock::new();
    let (net_tx, mut net_rx) = mpsc::channel::<Net>(4096);
    let capture = match std::env::var_os("JUMPVPN_CAPTURE") {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("JUMPVPN_CAPTURE: cannot create {path:?}"))?,
        )),
        None => None,
    };
    let mut transports = Transports {
        open: candidates.iter().map(|_| None).collect(),
        candidates: candidates.clone(),
        generation: 0,
        net: net_tx,
        capture,
    };
    let mut udp_buf = vec![0u8; BatchUdp::RECV_BUFFER];
    let mut tun_in = TunReader::new(tun::DEFAULT_MTU);
    let mut tun_out = TunWriter::new();
    let mut sealed: GsoBatch<usize> = GsoBatch::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let timer = tokio::time::sleep(std::time::Duration::from_secs(1));
    tokio::pin!(timer);

    client.connect(clock.now(), wall_clock_ns());
    loop {
        while let Some(output) = client.poll_output() {
            match output {
                ClientOutput::Transmit { candidate, bytes } => {
                    transports.send(candidate, bytes).await;
                }
                ClientOutput::Tun(packet) => tun_out.push(&tun, &packet).await,
                ClientOutput::Audit(event) => audit.emit(event),
                ClientOutput::Event(event) => log_event(&event, &candidates),
            }
        }
        tun_out.flush(&tun).await;
        let deadline = client
            .poll_timeout()
            .map(|t| clock.instant(t))
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            ready = tun.readable() => if ready.is_ok() {
                let now = clock.now();
                for _ in 0..RECV_ROUNDS {
                    if !tun_in.read_more(&tun) {
                        break;
                    }
                    for packet in tun_in.packets() {
                        let start = sealed.buf.len();
                        let Some(candidate) = client.handle_tun_into(now, packet, &mut sealed.buf)
                        else {
                            continue;
                        };
                        if !transports.is_udp(candidate) {
                            let bytes = sealed.buf.split_off(start);
                            transports.send(candidate, bytes).await;
                            continue;
                        }
                        if let Some((to, run, segment)) = sealed.add(candidate, start) {
                            transports.send_run(to, run, segment).await;
                            sealed.restart(candidate, start);
                        }
                    }
                }
                if let Some((to, run, segment)) = sealed.pending() {
                    transports.send_run(to, run, segment).await;
                }
                sealed.clear();
            },
            candidate = poll_fn(|cx| transports.poll_udp_readable(cx)) => {
                let now = clock.now();
                for _ in 0..RECV_ROUNDS {
                    let Some(Some(Transport::Udp(socket))) = transports.open.get_mut(candidate)
                    else {
                        break;
                    };
                    // Errors: nothing more pending, or an ICMP error reported on the connected
                    // socket; the endpoint's dead detection decides, not one error.
                    let Ok(received) = socket.try_recv(&mut udp_buf) else {
                        break;
                    };
                    for datagram in received.datagrams(&udp_buf) {
                        tun_out
                            .fill(&tun, |slot| client.handle_packet_into(now, candidate, datagram, slot))
                            .await;
                    }
                }
                tun_out.flush(&tun).await;
            },
            Some(net) = net_rx.recv() => match net {
                Net::Packet { candidate, bytes } => {
                    let now = clock.now();
                    tun_out
                        .fill(&tun, |slot| client.handle_packet_into(now, candidate, &bytes, slot))
                        .await;
                }
                Net::Failed { candidate, generation } => {
                    if transports.failed(candidate, generation) {
                        client.handle_transport_error(clock.now(), candidate);
                    }
                }
            },
            () = &mut timer => client.handle_timeout(clock.now(), wall_clock_ns()),
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = &mut ctrl_c => { tracing::info!("interrupted: shutting down"); break; }
        }
    }
    drop(audit);
    if let Err(error) = audit_writer.close() {
        tracing::error!("audit log: {error}");
    }
    Ok(())
}

impl Transports {
    /// Whether `candidate` is a UDP candidate.
    fn is_udp(&self, candidate: usize) -> bool {
        self.candidates
            .get(candidate)
            .is_some_and(|c| c.proto == Proto::Udp)
    }

    /// The open transport of `candidate`, opening it first if needed.
    async fn get(&mut self, candidate: usize) -> Option<&mut Transport> {
        let spec = *self.candidates.get(candidate)?;
        let slot = self.open.get_mut(candidate)?;
        if slot.is_none() {
            self.generation += 1;
            *slot = open(candidate, spec, self.generation, self.net.clone()).await;
        }
        slot.as_mut()
    }

    /// Sends one packet on `candidate`.
    async fn send(&mut self, candidate: usize, bytes: Vec<u8>) {
        let len = bytes.len();
        match self.get(candidate).await {
            Some(Transport::Udp(_)) => self.send_run(candidate, &bytes, len).await,
            Some(Transport::Tcp { writer, .. }) => {
                let _ = writer.try_send(bytes);
            }
            None => {}
        }
    }

    /// Sends `run`, datagrams of `segment` bytes (the last may be shorter), on the UDP
    /// `candidate`.
    async fn send_run(&mut self, candidate: usize, run: &[u8], segment: usize) {
        if let Some(capture) = self.capture.as_mut() {
            for datagram in run.chunks(segment.max(1)) {
                let hex: String = datagram.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(capture, "{hex}");
            }
            let _ = capture.flush();
        }
        if let Some(Transport::Udp(socket)) = self.get(candidate).await {
            socket.send(None, run, segment).await;
        }
    }

    /// A TCP transport reported its end: forgets it if it is still the current one of
    /// `candidate`, and says so.
    fn failed(&mut self, candidate: usize, generation: u64) -> bool {
        let Some(slot) = self.open.get_mut(candidate) else {
            return false;
        };
        let current = matches!(
            slot,
            Some(Transport::Tcp { generation: g, .. }) if *g == generation
        );
        if current {
            *slot = None;
        }
        current
    }

    /// Ready with the index of an open UDP transport that has datagrams to read; pending
    /// (woken by any of them) when none has.
    fn poll_udp_readable(&self, cx: &mut std::task::Context<'_>) -> Poll<usize> {
        for (candidate, transport) in self.open.iter().enumerate() {
            if let Some(Transport::Udp(socket)) = transport {
                if socket.poll_readable(cx).is_ready() {
                    return Poll::Ready(candidate);
                }
            }
        }
        Poll::Pending
    }
}

/// Opens the transport of a candidate. UDP: a socket connected to the gateway (the kernel
/// then filters other senders). TCP: the connection is made by the writer task, so sends are
/// queued meanwhile; a failure is reported with this `generation`.
async fn open(
    candidate: usize,
    spec: CandidateSpec,
    generation: u64,
    net: mpsc::Sender<Net>,
) -> Option<Transport> {
    match spec.proto {
        Proto::Udp => {
            let bind = if spec.addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let socket = match UdpSocket::bind(bind).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!("candidate {candidate}: cannot open a UDP socket: {error}");
                    return None;
                }
            };
            if let Err(error) = socket.connect(spec.addr).await {
                tracing::warn!("candidate {candidate}: cannot reach {}: {error}", spec.addr);
                return None;
            }
            // Read by the main task (see `Transports::poll_udp_readable`).
            Some(Transport::Udp(BatchUdp::new(socket)))
        }
        Proto::Tcp => {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
            tokio::spawn(async move {
                let connected = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    TcpStream::connect(spec.addr),
                )
                .await;
                let stream = match connected {
                    Ok(Ok(stream)) => stream,
                    _ => {
                        let _ = net
                            .send(Net::Failed {
                                candidate,
                                generation,
                            })
                            .await;
                        return;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (mut reader, mut writer) = stream.into_split();
                let reader_net = net.clone();
                let read_task = tokio::spawn(async move {
                    let mut buf = vec![0u8; MAX_FRAME];
                    while let Ok(Some(len)) = read_frame(&mut reader, &mut buf).await {
                        let bytes = buf[..len].to_vec();
                        if reader_net
                            .send(Net::Packet { candidate, bytes })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = reader_net
                        .send(Net::Failed {
                            candidate,
                            generation,
                        })
                        .await;
                });
                while let Some(bytes) = rx.recv().await {
                    if write_frame(&mut writer, &bytes).await.is_err() {
                        break;
                    }
                }
                read_task.abort();
                let _ = net
                    .send(Net::Failed {
                        candidate,
                        generation,
                    })
                    .await;
            });
            Some(Transport::Tcp {
                writer: tx,
                generation,
            })
        }
    }
}

fn log_event(event: &ClientEvent, candidates: &[CandidateSpec]) {
    let name = |i: usize| {
        candidates.get(i).map_or_else(
            || format!("#{i}"),
            |c| format!("{}://{}", c.proto.as_str(), c.addr),
        )
    };
    match event {
        ClientEvent::HandshakeSent { candidate } => {
            tracing::info!("handshake sent on {}", name(*candidate));
        }
        ClientEvent::Established {
            session,
            tunnel_ip,
            candidate,
        } => tracing::info!(
            "session {session} established on {}, tunnel address {tunnel_ip}",
            name(*candidate)
        ),
        ClientEvent::TransportDead { candidate } => {
            tracing::info!("transport {} is dead", name(*candidate));
        }
        ClientEvent::Hinted { candidate } => {
            tracing::info!("gateway asks to reattach on {}", name(*candidate));
        }
        ClientEvent::ReattachSent { candidate, .. } => {
            tracing::debug!("reattach sent on {}", name(*candidate));
        }
        ClientEvent::Switched {
            session,
            candidate,
            state_version,
            latency_ms,
        } => tracing::info!(
            "session {session} switched to {} at version {} in {latency_ms} ms",
            name(*candidate),
            state_version.get()
        ),
        ClientEvent::Rejected { reason, retryable } => {
            tracing::info!("reattach rejected: {reason} (retryable: {retryable})");
        }
        ClientEvent::Terminated { session, reason } => {
            tracing::warn!("session {session} terminated: {reason}; starting a new handshake");
        }
    }
}

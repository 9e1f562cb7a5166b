//! `jumpvpn client --config FILE`: the tokio driver around the sans-IO client endpoint.
//!
//! The endpoint names transports by their index in the configuration's candidate list; this
//! driver opens them on first use: a connected UDP socket per UDP candidate, a TCP connection
//! per TCP candidate (reconnected on the next send after it failed). One task feeds the
//! endpoint with TUN packets, received packets, transport failures and timers, and drains its
//! outputs after each.

use std::sync::Arc;
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
use crate::driver::{self, client_node_name, read_frame, write_frame, Clock, MAX_FRAME, TCP_QUEUE};
use crate::{tun, Status};

const AUDIT_QUEUE: usize = 16_384;

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
    Udp(Arc<UdpSocket>),
    Tcp {
        writer: mpsc::Sender<Vec<u8>>,
        generation: u64,
    },
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
    let mut transports: Vec<Option<Transport>> = candidates.iter().map(|_| None).collect();
    let mut generation = 0u64;
    let mut tun_buf = vec![0u8; MAX_FRAME];
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;

    // A debugging aid (and the replay tests' source): every UDP datagram sent, in hex.
    let mut capture = match std::env::var_os("JUMPVPN_CAPTURE") {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("JUMPVPN_CAPTURE: cannot create {path:?}"))?,
        )),
        None => None,
    };

    client.connect(clock.now(), wall_clock_ns());
    loop {
        while let Some(output) = client.poll_output() {
            match output {
                ClientOutput::Transmit { candidate, bytes } => {
                    let Some(spec) = candidates.get(candidate) else {
                        continue;
                    };
                    let slot = &mut transports[candidate];
                    if slot.is_none() {
                        generation += 1;
                        *slot = open(candidate, *spec, generation, net_tx.clone()).await;
                    }
                    match slot {
                        Some(Transport::Udp(socket)) => {
                            let _ = socket.try_send(&bytes);
                            if let Some(capture) = capture.as_mut() {
                                use std::io::Write as _;
                                let hex: String =
                                    bytes.iter().map(|b| format!("{b:02x}")).collect();
                                let _ = writeln!(capture, "{hex}");
                                let _ = capture.flush();
                            }
                        }
                        Some(Transport::Tcp { writer, .. }) => {
                            let _ = writer.try_send(bytes);
                        }
                        None => {}
                    }
                }
                ClientOutput::Tun(packet) => {
                    if let Err(error) = tun.send(&packet).await {
                        tracing::debug!("tun write failed: {error}");
                    }
                }
                ClientOutput::Audit(event) => audit.emit(event),
                ClientOutput::Event(event) => log_event(&event, &candidates),
            }
        }
        let deadline = client
            .poll_timeout()
            .map(|t| clock.instant(t))
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        tokio::select! {
            read = tun.recv(&mut tun_buf) => match read {
                Ok(len) => client.handle_tun(clock.now(), &tun_buf[..len]),
                Err(error) => tracing::warn!("tun read failed: {error}"),
            },
            Some(net) = net_rx.recv() => match net {
                Net::Packet { candidate, bytes } => client.handle_packet(clock.now(), candidate, &bytes),
                Net::Failed { candidate, generation } => {
                    let current = matches!(
                        transports.get(candidate),
                        Some(Some(Transport::Tcp { generation: g, .. })) if *g == generation
                    );
                    if current {
                        transports[candidate] = None;
                        client.handle_transport_error(clock.now(), candidate);
                    }
                }
            },
            () = tokio::time::sleep_until(deadline) => client.handle_timeout(clock.now(), wall_clock_ns()),
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: shutting down"); break; }
        }
    }
    drop(audit);
    if let Err(error) = audit_writer.close() {
        tracing::error!("audit log: {error}");
    }
    Ok(())
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
            let socket = Arc::new(socket);
            let reader = socket.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_FRAME];
                loop {
                    match reader.recv(&mut buf).await {
                        Ok(len) => {
                            let bytes = buf[..len].to_vec();
                            if net.send(Net::Packet { candidate, bytes }).await.is_err() {
                                return;
                            }
                        }
                        // ICMP errors surface here on a connected socket; the endpoint's
                        // dead detection decides, not one error.
                        Err(_) => continue,
                    }
                }
            });
            Some(Transport::Udp(socket))
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

//! `jumpvpn gateway --config FILE`: the tokio driver around the sans-IO gateway endpoint.
//!
//! One task owns the endpoint and feeds it, in arrival order: UDP datagrams, TCP frames (a
//! reader task per connection, frames are a 2-byte big-endian length and the packet), IP
//! packets from the TUN device, the outcomes of store requests (each request runs on its own
//! task, so a slow store never stalls the data plane), admin requests and timers. After each
//! input it drains the endpoint's outputs. The audit log is written by its own thread through a
//! bounded queue (SPEC §8), so the data path never waits on a disk.
//!
//! The data path moves batches (see [`crate::datapath`]): each wake-up of the TUN device reads
//! up to a few TCP super-packets, seals every packet into one buffer and sends runs of
//! datagrams with one system call each; each wake-up of the UDP socket receives runs of
//! datagrams, opens them into the TUN writer's buffers and writes them coalesced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use jumpvpn_core::endpoint::gateway::{
    Gateway, GatewayConfig as EndpointConfig, GatewayOutput, Peer, StoreFailure, StoreOp,
    StoreOutcome, StoreRequest,
};
use jumpvpn_core::endpoint::{Path, Transmit};
use jumpvpn_core::{NodeId, Proto, ReasonCode, SessionId, Timestamp};
use jumpvpn_store::embedded::EmbeddedStore;
use jumpvpn_store::etcd::{EtcdStore, EtcdTimeouts};
use jumpvpn_store::memory::MemoryStore;
use jumpvpn_store::{SessionStore, StoreError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::admin::{self, AdminError, AdminRequest, AdminState, SessionView};
use crate::audit_log::AuditLog;
use crate::cli::ConfigArgs;
use crate::config::{self, GatewayConfig, StoreConfig};
use crate::datapath::{BatchUdp, GsoBatch, TunReader, TunWriter};
use crate::driver::{self, read_frame, write_frame, Clock, MAX_FRAME, TCP_QUEUE};
use crate::metrics::Metrics;
use crate::{tun, Status};

/// Audit events queued before the writer counts them as lost (SPEC §8).
const AUDIT_QUEUE: usize = 65_536;
/// Reads of the TUN device, or receives from the UDP socket, per wake-up at most (each one
/// a batch), so that one direction does not starve the other and the timers.
const RECV_ROUNDS: usize = 8;

/// Runs `jumpvpn gateway --config FILE` until SIGTERM or SIGINT.
pub fn run(args: &ConfigArgs) -> anyhow::Result<Status> {
    let config = config::load_gateway(&args.config).map_err(crate::usage_error)?;
    crate::init_logging();
    driver::runtime()?.block_on(async move {
        match config.store.clone() {
            StoreConfig::Embedded { path } => {
                let store = EmbeddedStore::open(&path)
                    .with_context(|| format!("cannot open store {}", path.display()))?;
                serve(config, Arc::new(store)).await
            }
            StoreConfig::Memory => serve(config, Arc::new(MemoryStore::new())).await,
            StoreConfig::Etcd { endpoints, prefix } => {
                let store = EtcdStore::connect(&endpoints, &prefix, EtcdTimeouts::default())
                    .await
                    .context("cannot connect to etcd")?;
                serve(config, Arc::new(store)).await
            }
        }
    })?;
    Ok(Status::Success)
}

/// What the per-connection and per-request tasks tell the main task.
enum Input {
    TcpOpened {
        path: Path,
        writer: mpsc::Sender<Vec<u8>>,
    },
    TcpFrame {
        path: Path,
        bytes: Vec<u8>,
    },
    TcpClosed {
        path: Path,
    },
    Store {
        id: u64,
        outcome: StoreOutcome,
    },
}

async fn serve<S: SessionStore>(config: GatewayConfig, store: Arc<S>) -> anyhow::Result<()> {
    let node = config.node_id.clone();
    let udp = UdpSocket::bind(config.listen_udp)
        .await
        .with_context(|| format!("listen_udp: cannot bind {}", config.listen_udp))?;
    let tcp = TcpListener::bind(config.listen_tcp)
        .await
        .with_context(|| format!("listen_tcp: cannot bind {}", config.listen_tcp))?;
    let udp_local = udp.local_addr()?;
    let tun = tun::open(
        &config.tunnel.name,
        config.tunnel.address,
        config.tunnel.prefix_len,
        tun::DEFAULT_MTU,
    )?;
    let (audit, audit_writer) = AuditLog::open(&config.audit_log, node.clone(), AUDIT_QUEUE)
        .with_context(|| format!("audit_log: cannot open {}", config.audit_log.display()))?;
    let metrics = Arc::new(Metrics::new(node.clone()));
    metrics.attach_audit_log(audit.clone());
    let ready = Arc::new(AtomicBool::new(false));

    let (admin_tx, mut admin_rx) = mpsc::channel::<AdminRequest>(64);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    if let Some(admin_config) = &config.admin {
        let listener = TcpListener::bind(admin_config.listen)
            .await
            .with_context(|| format!("admin.listen: cannot bind {}", admin_config.listen))?;
        let state = AdminState::new(
            admin_tx.clone(),
            metrics.clone(),
            ready.clone(),
            admin_config.token.as_ref().map(|t| t.as_str().to_owned()),
            node.clone(),
        );
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(error) = admin::serve(listener, state, shutdown).await {
                tracing::error!("admin API stopped: {error}");
            }
        });
    }

    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).context("no operating-system randomness")?;
    let mut gateway = Gateway::new(EndpointConfig {
        node: node.clone(),
        private_key: Zeroizing::new(config.private_key.secret().to_bytes()),
        policy: config.policy.clone(),
        peers: config
            .peers
            .iter()
            .map(|p| Peer {
                public_key: p.public_key,
                tunnel_ip: p.tunnel_ip,
            })
            .collect(),
        seed: *seed,
    });

    let clock = Clock::new();
    let restored = restore(&mut gateway, store.as_ref(), &node, &clock).await;
    if restored > 0 {
        tracing::info!("took back {restored} live sessions from the store");
    }

    let (input_tx, mut input_rx) = mpsc::channel::<Input>(4096);
    let tcp_local = tcp.local_addr()?;
    {
        let input_tx = input_tx.clone();
        tokio::spawn(accept_loop(tcp, tcp_local, input_tx));
    }

    let mut tcp_writers: HashMap<Path, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut udp = BatchUdp::new(udp);
    let mut udp_buf = vec![0u8; BatchUdp::RECV_BUFFER];
    let mut tun_in = TunReader::new(tun::DEFAULT_MTU);
    let mut tun_out = TunWriter::new();
    let mut sealed: GsoBatch<Path> = GsoBatch::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let timer = tokio::time::sleep(std::time::Duration::from_secs(1));
    tokio::pin!(timer);
    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        "gateway {node} listening on udp {udp_local} and tcp {tcp_local}, tunnel {}",
        config.tunnel.name
    );

    loop {
        let deadline = gateway
            .poll_timeout()
            .map(|t| clock.instant(t))
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            ready = udp.readable() => if ready.is_ok() {
                let now = clock.now();
                for _ in 0..RECV_ROUNDS {
                    let received = match udp.try_recv(&mut udp_buf) {
                        Ok(received) => received,
                        // Nothing more pending; or an ICMP error reported on the socket.
                        Err(_) => break,
                    };
                    let path = Path { proto: Proto::Udp, remote: received.from, local: udp_local };
                    for datagram in received.datagrams(&udp_buf) {
                        tun_out
                            .fill(&tun, |slot| gateway.handle_packet_into(now, path, datagram, slot))
                            .await;
                    }
                }
                tun_out.flush(&tun).await;
            },
            ready = tun.readable() => if ready.is_ok() {
                let now = clock.now();
                for _ in 0..RECV_ROUNDS {
                    if !tun_in.read_more(&tun) {
                        break;
                    }
                    for packet in tun_in.packets() {
                        let start = sealed.buf.len();
                        let Some(path) = gateway.handle_tun_into(now, packet, &mut sealed.buf)
                        else {
                            continue;
                        };
                        if path.proto == Proto::Tcp {
                            let bytes = sealed.buf.split_off(start);
                            if let Some(writer) = tcp_writers.get(&path) {
                                let _ = writer.try_send(bytes);
                            }
                            continue;
                        }
                        if let Some((to, run, segment)) = sealed.add(path, start) {
                            udp.send(Some(to.remote), run, segment).await;
                            sealed.restart(path, start);
                        }
                    }
                }
                if let Some((to, run, segment)) = sealed.pending() {
                    udp.send(Some(to.remote), run, segment).await;
                }
                sealed.clear();
            },
            Some(input) = input_rx.recv() => match input {
                Input::TcpOpened { path, writer } => { tcp_writers.insert(path, writer); }
                Input::TcpFrame { path, bytes } => {
                    let now = clock.now();
                    tun_out
                        .fill(&tun, |slot| gateway.handle_packet_into(now, path, &bytes, slot))
                        .await;
                }
                Input::TcpClosed { path } => {
                    tcp_writers.remove(&path);
                    gateway.handle_closed(clock.now(), path);
                }
                Input::Store { id, outcome } => gateway.handle_store(clock.now(), id, outcome),
            },
            Some(request) = admin_rx.recv() => answer_admin(&mut gateway, clock.now(), request),
            () = &mut timer => gateway.handle_timeout(clock.now()),
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = &mut ctrl_c => { tracing::info!("interrupted: shutting down"); break; }
        }
        while let Some(output) = gateway.poll_output() {
            match output {
                GatewayOutput::Transmit(Transmit { path, bytes }) => match path.proto {
                    Proto::Udp => udp.send(Some(path.remote), &bytes, bytes.len()).await,
                    Proto::Tcp => {
                        if let Some(writer) = tcp_writers.get(&path) {
                            let _ = writer.try_send(bytes);
                        }
                    }
                },
                GatewayOutput::Tun(packet) => tun_out.push(&tun, &packet).await,
                GatewayOutput::Store(request) => {
                    spawn_store_request(store.clone(), *request, input_tx.clone());
                }
                GatewayOutput::Audit(event) => audit.emit(event),
                GatewayOutput::Close(path) => {
                    tcp_writers.remove(&path);
                }
            }
        }
        tun_out.flush(&tun).await;
        observe(&metrics, &gateway);
    }

    ready.store(false, Ordering::SeqCst);
    let _ = stop_tx.send(());
    drop(audit);
    if let Err(error) = audit_writer.close() {
        tracing::error!("audit log: {error}");
    }
    tracing::info!("gateway {node} stopped");
    Ok(())
}

/// Copies the endpoint's counters into the metrics (cheap: a handful of atomic stores).
fn observe(metrics: &Metrics, gateway: &Gateway) {
    let stats = gateway.stats();
    let set = |counter: &crate::metrics::Counter, value: u64| {
        let current = counter.get();
        if value > current {
            counter.add(value - current);
        }
    };
    metrics.sessions_active.set(gateway.session_count() as u64);
    set(&metrics.handshakes_total, stats.handshakes);
    set(
        &metrics.handshakes_rejected_total,
        stats.handshakes_rejected,
    );
    set(&metrics.handshakes_unconfirmed_total, stats.unconfirmed);
    set(&metrics.reattach_accepted_total, stats.reattach_accepted);
    set(&metrics.packets_rx_total, stats.data_in);
    set(&metrics.packets_tx_total, stats.data_out);
    set(&metrics.malformed_dropped_total, stats.malformed);
    set(&metrics.replay_dropped_total, stats.replayed);
    set(&metrics.auth_failed_total, stats.auth_failed);
    set(&metrics.tun_dropped_total, stats.tun_dropped);
    set(&metrics.store_errors_total, stats.store_failures);
}

fn answer_admin(gateway: &mut Gateway, now: Timestamp, request: AdminRequest) {
    match request {
        AdminRequest::ListSessions { reply } => {
            let mut list: Vec<SessionView> = gateway.sessions().map(SessionView::from).collect();
            list.sort_by_key(|v| v.session_id);
            let _ = reply.send(list);
        }
        AdminRequest::GetSession { id, reply } => {
            let _ = reply.send(gateway.session(id).map(SessionView::from));
        }
        AdminRequest::Terminate { id, reason, reply } => {
            // The operator's words are for the log; the recorded reason code is fixed.
            tracing::info!("operator terminates session {id}: {reason}");
            let answer = terminate(gateway, now, id);
            let _ = reply.send(answer);
        }
    }
}

fn terminate(
    gateway: &mut Gateway,
    now: Timestamp,
    id: SessionId,
) -> Result<SessionView, AdminError> {
    let Some(view) = gateway.session(id).map(SessionView::from) else {
        return Err(AdminError::NotFound(id));
    };
    if gateway.terminate(now, id, ReasonCode::PolicyTermination) {
        Ok(view)
    } else {
        Err(AdminError::Conflict(
            "a change of this session is in flight; retry".into(),
        ))
    }
}

/// Hands the gateway the live sessions the store says this node owns, so that their timers
/// run from the start (SPEC §6 deadlines) and a new handshake from their client supersedes
/// them. A store that cannot be listed is not fatal: sessions are then read on demand.
async fn restore<S: SessionStore>(
    gateway: &mut Gateway,
    store: &S,
    node: &NodeId,
    clock: &Clock,
) -> usize {
    const PAGE: usize = 1_000;
    let mut restored = 0;
    let mut after = None;
    loop {
        let page = match store.list_by_owner(node, after, PAGE).await {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!("cannot list this node's sessions in the store: {error}");
                return restored;
            }
        };
        let full = page.len() == PAGE;
        after = page.last().map(|r| r.session_id);
        for record in page {
            if gateway.restore(clock.now(), record) {
                restored += 1;
            }
        }
        if !full {
            return restored;
        }
    }
}

fn spawn_store_request<S: SessionStore>(
    store: Arc<S>,
    request: StoreRequest,
    done: mpsc::Sender<Input>,
) {
    tokio::spawn(async move {
        let outcome = match request.op {
            StoreOp::Create(record) => written(store.create(&record).await),
            StoreOp::CompareAndSwap { expected, record } => {
                written(store.compare_and_swap(expected, &record).await)
            }
            StoreOp::Get(session) => match store.get(session).await {
                Ok(record) => StoreOutcome::Read(record.map(Box::new)),
                Err(error) => failed(&error),
            },
        };
        let _ = done
            .send(Input::Store {
                id: request.id,
                outcome,
            })
            .await;
    });
}

fn written(result: Result<(), StoreError>) -> StoreOutcome {
    match result {
        Ok(()) => StoreOutcome::Written,
        Err(error) => failed(&error),
    }
}

fn failed(error: &StoreError) -> StoreOutcome {
    tracing::warn!("store: {error}");
    StoreOutcome::Failed(match error {
        StoreError::Conflict { .. } => StoreFailure::Conflict,
        StoreError::AlreadyExists { .. } => StoreFailure::AlreadyExists,
        StoreError::Unavailable { .. } | StoreError::LeaseExpired => StoreFailure::Unavailable,
        StoreError::CommitUnknown { .. } => StoreFailure::CommitUnknown,
        _ => StoreFailure::Other,
    })
}

async fn accept_loop(listener: TcpListener, local: SocketAddr, input: mpsc::Sender<Input>) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let path = Path {
            proto: Proto::Tcp,
            remote,
            local,
        };
        tokio::spawn(connection(stream, path, input.clone()));
    }
}

/// One TCP transport: frames in, frames out, until either side closes.
async fn connection(stream: TcpStream, path: Path, input: mpsc::Sender<Input>) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    if input
        .send(Input::TcpOpened { path, writer: tx })
        .await
        .is_err()
    {
        return;
    }
    tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if write_frame(&mut writer, &bytes).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut buf = vec![0u8; MAX_FRAME];
    while let Ok(Some(len)) = read_frame(&mut reader, &mut buf).await {
        let bytes = buf[..len].to_vec();
        if input.send(Input::TcpFrame { path, bytes }).await.is_err() {
            return;
        }
    }
    let _ = input.send(Input::TcpClosed { path }).await;
}

//! A real etcd cluster on loopback, for tests: `size` members of Debian's `etcd` binary
//! (package `etcd-server`), random free ports, data in a temporary directory (in `/dev/shm`
//! when there is one, so fsyncs are cheap on a shared 2-core machine), and short raft timings
//! (50 ms heartbeat, 500 ms election timeout) so that faults play out in about a second.
//!
//! Members can be stopped (SIGKILL), paused and resumed (SIGSTOP/SIGCONT) and restarted on
//! their data. Every process is killed when the [`Cluster`] is dropped, during a panic too.
//! Each member's output goes to `<dir>/<name>.log`; a cluster that does not become healthy
//! panics with the end of every log.
//!
//! [`AnswerLoser`] is a proxy in front of one member that loses the answer of one chosen
//! request — before or after etcd applied it — for the lost-answer tests.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::time::Instant;

/// Where Debian installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";

/// How long a cluster may take to (re)gain a leader that every running member follows.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;

/// A running etcd cluster. Methods take `&self` so that fault closures can share it.
pub struct Cluster {
    dir: tempfile::TempDir,
    initial_cluster: String,
    token: String,
    members: Vec<Mutex<Member>>,
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
    paused: bool,
}

/// What a member is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Serving.
    Running,
    /// Stopped with SIGSTOP: its sockets are open, it answers nothing.
    Paused,
    /// Killed.
    Stopped,
}

impl Cluster {
    /// Starts `size` members and waits until they agree on a leader.
    pub async fn start(size: usize) -> Self {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} not found: the etcd tests need a real etcd; install it with \
             `apt-get install etcd-server`"
        );
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("jumpvpn-etcd-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("jumpvpn-etcd-").tempdir(),
        }
        .expect("temporary directory for etcd");
        let ports = free_ports(2 * size);
        let members: Vec<Member> = (0..size)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("http://127.0.0.1:{}", ports[2 * i]),
                    peer_url: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                    data_dir: dir.path().join(&name),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    process: None,
                    paused: false,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "jumpvpn-{}",
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let cluster = Self {
            dir,
            initial_cluster,
            token,
            members: members.into_iter().map(Mutex::new).collect(),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_healthy().await;
        cluster
    }

    /// How many members the cluster has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.size()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.member(i).client_url.clone()
    }

    /// What member `i` is doing.
    pub fn state(&self, i: usize) -> MemberState {
        let m = self.member(i);
        match (&m.process, m.paused) {
            (None, _) => MemberState::Stopped,
            (Some(_), true) => MemberState::Paused,
            (Some(_), false) => MemberState::Running,
        }
    }

    /// Kills member `i` (SIGKILL) and reaps it. Its data directory stays.
    pub fn stop(&self, i: usize) {
        let mut m = self.member(i);
        if let Some(mut child) = m.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        m.paused = false;
    }

    /// Freezes member `i` (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self, i: usize) {
        let mut m = self.member(i);
        let pid = m.process.as_ref().expect("pause a running member").id();
        signal(pid, "-STOP");
        m.paused = true;
    }

    /// Thaws member `i` (SIGCONT).
    pub fn resume(&self, i: usize) {
        let mut m = self.member(i);
        let pid = m.process.as_ref().expect("resume a paused member").id();
        signal(pid, "-CONT");
        m.paused = false;
    }

    /// Starts a stopped member `i` again on its data directory. Does not wait: see
    /// [`Cluster::wait_healthy`].
    pub fn restart(&self, i: usize) {
        assert_eq!(
            self.state(i),
            MemberState::Stopped,
            "restart a stopped member"
        );
        self.spawn(i);
    }

    /// Waits until every running member serves linearizable reads and all follow one leader.
    /// Panics (with the members' logs) after [`HEALTHY_WITHIN`].
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let running: Vec<usize> = (0..self.size())
                .filter(|&i| self.state(i) == MemberState::Running)
                .collect();
            let mut leaders = Vec::new();
            for &i in &running {
                if let Some(leader) = self.serving_leader(i).await {
                    leaders.push(leader);
                }
            }
            if leaders.len() == running.len() && leaders.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd cluster not healthy within {HEALTHY_WITHIN:?}: {} of {} running \
                     members serve, leaders {leaders:x?}\n{}",
                    leaders.len(),
                    running.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the member the running members follow, if they agree on one.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for i in 0..self.size() {
            if self.state(i) != MemberState::Running {
                continue;
            }
            let Some((own, follows)) = self.status(i).await else {
                continue;
            };
            ids.push((i, own));
            match leader {
                None => leader = Some(follows),
                Some(l) if l != follows => return None,
                Some(_) => {}
            }
        }
        let leader = leader.filter(|&l| l != 0)?;
        ids.into_iter()
            .find(|&(_, own)| own == leader)
            .map(|(i, _)| i)
    }

    /// Waits until member `i` knows of no leader (after losing its quorum).
    pub async fn wait_leaderless(&self, i: usize) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            if let Some((_, 0)) = self.status(i).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "member {i} still follows a leader after {HEALTHY_WITHIN:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tail of every member's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.size() {
            let m = self.member(i);
            out.push_str(&format!("--- {} ({}) ---\n", m.name, m.log.display()));
            out.push_str(&tail(&m.log, 3_000));
        }
        out
    }

    fn member(&self, i: usize) -> MutexGuard<'_, Member> {
        // A panic elsewhere while holding this lock leaves a consistent member (every update
        // is one field); keep going so Drop can still kill the processes.
        self.members[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn spawn(&self, i: usize) {
        let mut m = self.member(i);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let err = log.try_clone().expect("etcd log file");
        let child = Command::new(ETCD)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            // Ignored once the data directory holds a member, as on restart.
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD}: {e}"));
        m.process = Some(child);
        m.paused = false;
    }

    /// Member `i`'s leader, if it can serve a linearizable read right now.
    async fn serving_leader(&self, i: usize) -> Option<u64> {
        let mut client = connect_one(&self.endpoint(i)).await?;
        let (_, leader) = self.status(i).await?;
        if leader == 0 {
            return None;
        }
        let options = GetOptions::new().with_count_only();
        tokio::time::timeout(
            Duration::from_millis(500),
            client.get("health", Some(options)),
        )
        .await
        .ok()?
        .ok()?;
        Some(leader)
    }

    /// Member `i`'s own ID and the ID of the leader it follows (0 for none).
    async fn status(&self, i: usize) -> Option<(u64, u64)> {
        let mut client = connect_one(&self.endpoint(i)).await?;
        let status = tokio::time::timeout(Duration::from_millis(500), client.status())
            .await
            .ok()?
            .ok()?;
        Some((status.header()?.member_id(), status.leader()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.size() {
            // SIGKILL ends a paused process too.
            self.stop(i);
        }
    }
}

/// A client talking to one member only, without requiring a leader (to ask about it).
async fn connect_one(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(300))
        .with_timeout(Duration::from_millis(500));
    Client::connect([endpoint], Some(options)).await.ok()
}

/// `count` distinct free TCP ports on loopback (all bound at once, then released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound address").port())
        .collect()
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .arg(which)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed: {status}");
}

fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return "(no log)\n".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Losing one answer on purpose.

/// How [`AnswerLoser`] loses the chosen request's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The request never reaches etcd: it is dropped and its connection closed.
    BeforeEtcd,
    /// As `BeforeEtcd`, and every later connection is closed at once until
    /// [`AnswerLoser::heal`]: the client cannot learn what happened.
    BeforeEtcdThenDown,
    /// The request reaches etcd; everything etcd sends back on that connection is dropped,
    /// until [`AnswerLoser::cut`] closes it.
    AfterEtcd,
}

/// A TCP proxy in front of one member that loses the answer of one chosen gRPC request, so a
/// test decides exactly whether "the request was sent but the answer never came" happened
/// before or after etcd applied it. It reads the client's HTTP/2 frames (each gRPC request
/// opens with one HEADERS frame and ends with a DATA frame flagged END_STREAM) and passes
/// everything else through untouched.
pub struct AnswerLoser {
    endpoint: String,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    plan: Mutex<Plan>,
    /// Bumped to close every open connection.
    cut: tokio::sync::watch::Sender<u64>,
    /// Set once the chosen request was handed to etcd (`Loss::AfterEtcd`).
    delivered: tokio::sync::watch::Sender<bool>,
    /// New connections are closed at once.
    down: AtomicBool,
}

#[derive(Default)]
struct Plan {
    /// The request to lose (1 = the next one) and how.
    armed: Option<(usize, Loss)>,
    /// Requests seen since arming.
    seen: usize,
    /// The stream of the chosen request, once its headers passed (`Loss::AfterEtcd`).
    target: Option<u32>,
}

/// What to do with one client frame.
enum Verdict {
    Forward,
    /// Forward it, then drop whatever etcd answers on this connection.
    ForwardThenMute,
    /// Drop it and close the connection; with `down`, every other connection too, and refuse
    /// new ones.
    Drop {
        down: bool,
    },
}

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const H2_PREFACE_LEN: usize = 24;

impl AnswerLoser {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream
            .strip_prefix("http://")
            .unwrap_or(upstream)
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let shared = Arc::new(Shared {
            plan: Mutex::default(),
            cut: tokio::sync::watch::channel(0).0,
            delivered: tokio::sync::watch::channel(false).0,
            down: AtomicBool::new(false),
        });
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.down.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    tokio::spawn(relay(client, server, shared.clone()));
                }
            }
        });
        Self {
            endpoint,
            shared,
            accept,
        }
    }

    /// The endpoint to give the client.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Loses the answer of the `nth` request from now on (1 = the next one).
    pub fn arm(&self, nth: usize, loss: Loss) {
        *self.shared.plan.lock().expect("plan") = Plan {
            armed: Some((nth, loss)),
            ..Plan::default()
        };
        self.shared.delivered.send_replace(false);
    }

    /// Waits until the chosen request was handed to etcd (`Loss::AfterEtcd`).
    pub async fn delivered(&self) {
        let mut delivered = self.shared.delivered.subscribe();
        tokio::time::timeout(HEALTHY_WITHIN, delivered.wait_for(|d| *d))
            .await
            .expect("the chosen request within the patience")
            .expect("proxy alive");
    }

    /// Closes every open connection (the client notices at once).
    pub fn cut(&self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
    }

    /// Lets new connections through again after `Loss::BeforeEtcdThenDown`.
    pub fn heal(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for AnswerLoser {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Plan {
    fn judge(&mut self, kind: u8, flags: u8, stream: u32) -> Verdict {
        let Some((nth, loss)) = self.armed else {
            return Verdict::Forward;
        };
        if kind == FRAME_HEADERS && self.target.is_none() {
            self.seen += 1;
            if self.seen == nth {
                if loss == Loss::AfterEtcd {
                    self.target = Some(stream);
                } else {
                    self.armed = None;
                    return Verdict::Drop {
                        down: loss == Loss::BeforeEtcdThenDown,
                    };
                }
            }
        }
        if self.target == Some(stream) && kind == FRAME_DATA && flags & FLAG_END_STREAM != 0 {
            *self = Plan::default();
            return Verdict::ForwardThenMute;
        }
        Verdict::Forward
    }
}

/// Relays one connection until either side closes, the proxy cuts, or the plan drops it.
async fn relay(client: tokio::net::TcpStream, server: tokio::net::TcpStream, shared: Arc<Shared>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let mute = Arc::new(AtomicBool::new(false));
    let mut cut = shared.cut.subscribe();

    let answers = {
        let mute = mute.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match server_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if mute.load(Ordering::SeqCst) {
                    continue;
                }
                if client_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let requests = async move {
        let mut pending: Vec<u8> = Vec::new();
        let mut preface = H2_PREFACE_LEN;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            if preface > 0 {
                let take = preface.min(pending.len());
                if server_tx.write_all(&pending[..take]).await.is_err() {
                    return;
                }
                pending.drain(..take);
                preface -= take;
            }
            // Whole frames: 9-byte header (24-bit length, type, flags, stream), then payload.
            while pending.len() >= 9 {
                let len = usize::from(pending[0]) << 16
                    | usize::from(pending[1]) << 8
                    | usize::from(pending[2]);
                if pending.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (pending[3], pending[4]);
                let stream = u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]])
                    & 0x7fff_ffff;
                let verdict = shared.plan.lock().expect("plan").judge(kind, flags, stream);
                match verdict {
                    Verdict::Drop { down } => {
                        if down {
                            shared.down.store(true, Ordering::SeqCst);
                            shared.cut.send_modify(|generation| *generation += 1);
                        }
                        return;
                    }
                    Verdict::Forward | Verdict::ForwardThenMute => {
                        if server_tx.write_all(&pending[..9 + len]).await.is_err() {
                            return;
                        }
                        if let Verdict::ForwardThenMute = verdict {
                            mute.store(true, Ordering::SeqCst);
                            shared.delivered.send_replace(true);
                        }
                    }
                }
                pending.drain(..9 + len);
            }
        }
    };
    // Whichever ends first ends the connection: dropping the halves closes both sockets.
    tokio::select! {
        _ = answers => {}
        _ = requests => {}
        _ = cut.changed() => {}
    }
}

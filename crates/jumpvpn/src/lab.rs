//! A gateway and a client in two network namespaces, as real processes: what `jumpvpn demo`
//! runs, and what the end-to-end tests drive.
//!
//! A [`Lab`] owns everything it creates: the namespaces (and with them the veth pair, the
//! firewall rules and the TUN devices), a working directory with keys, configurations, audit
//! logs and the embedded store, and the processes. Dropping it removes all of it.
//!
//! Waits are bounded polls of an observable condition (a ping answered, an audit event
//! written), never fixed sleeps.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::keys;
use crate::netns::Topology;

/// The gateway's port (UDP and TCP).
pub const PORT: u16 = 51820;
/// The gateway's address inside the tunnel.
pub const GATEWAY_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The client's address inside the tunnel.
pub const CLIENT_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Set by the demo's Ctrl-C handler: every wait gives up, and the lab is dropped (cleaned up).
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How a lab is set up.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// Extra lines for the gateway's `[policy]` table.
    pub policy: String,
    /// Environment for the client process (e.g. `JUMPVPN_CAPTURE`).
    pub client_env: Vec<(String, String)>,
    /// Keep the working directory after the lab is dropped.
    pub keep: bool,
}

/// The namespaces, files and processes of one gateway and one client.
pub struct Lab {
    /// The namespaces.
    pub topology: Topology,
    /// The working directory.
    pub dir: PathBuf,
    exe: PathBuf,
    options: LabOptions,
    gateway: Option<Child>,
    client: Option<Child>,
    helpers: Vec<Child>,
}

impl Lab {
    /// Creates the namespaces and writes keys and configurations. `exe` is the `jumpvpn`
    /// binary; `tag` makes names unique (tests run in parallel).
    pub fn new(tag: &str, exe: &Path, options: LabOptions) -> anyhow::Result<Self> {
        crate::netns::require_root("the lab (network namespaces, TUN devices)")?;
        let dir = std::env::temp_dir().join(format!("jumpvpn-{tag}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).ok();
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let topology = Topology::new(tag)?;
        let lab = Self {
            topology,
            dir,
            exe: exe.to_path_buf(),
            options,
            gateway: None,
            client: None,
            helpers: Vec::new(),
        };
        lab.write_configs()?;
        Ok(lab)
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let (gw_private, gw_public) = keys::new_pair()?;
        let (cl_private, cl_public) = keys::new_pair()?;
        write_secret(&self.path("gateway.key"), &gw_private)?;
        write_secret(&self.path("client.key"), &cl_private)?;
        let gw_ip = self.topology.gateway_ip();
        let gateway = format!(
            r#"node_id = "gw1"
private_key_file = "{gw_key}"
listen_udp = "{gw_ip}:{PORT}"
listen_tcp = "{gw_ip}:{PORT}"
audit_log = "{gw_audit}"

[tunnel]
name = "jv0"
address = "{GATEWAY_TUNNEL_IP}/24"

[store]
kind = "embedded"
path = "{store}"

[policy]
{policy}

[[peer]]
public_key = "{cl_public}"
tunnel_ip = "{CLIENT_TUNNEL_IP}"
"#,
            gw_key = self.path("gateway.key").display(),
            gw_audit = self.gateway_audit().display(),
            store = self.path("sessions.db").display(),
            policy = self.options.policy,
        );
        let client = format!(
            r#"private_key_file = "{cl_key}"
gateway_public_key = "{gw_public}"
candidates = ["udp://{gw_ip}:{PORT}", "tcp://{gw_ip}:{PORT}"]
audit_log = "{cl_audit}"

[tunnel]
name = "jv1"
address = "{CLIENT_TUNNEL_IP}/24"
"#,
            cl_key = self.path("client.key").display(),
            cl_audit = self.client_audit().display(),
        );
        std::fs::write(self.path("gateway.toml"), gateway)?;
        std::fs::write(self.path("client.toml"), client)?;
        Ok(())
    }

    /// A file in the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The gateway's audit log.
    pub fn gateway_audit(&self) -> PathBuf {
        self.path("gateway.audit.jsonl")
    }

    /// The client's audit log.
    pub fn client_audit(&self) -> PathBuf {
        self.path("client.audit.jsonl")
    }

    /// Starts (or restarts) the gateway in its namespace.
    pub fn start_gateway(&mut self) -> anyhow::Result<()> {
        let log = append(&self.path("gateway.log"))?;
        let started = self.gateway_listening_count();
        let mut child = self
            .topology
            .gateway()
            .command(&self.exe)
            .arg("gateway")
            .arg("--config")
            .arg(self.path("gateway.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the gateway")?;
        // Its sockets are bound when it says it listens: a client started earlier would lose
        // its first init to a closed port and wait a retry interval.
        let ready = wait_until(Duration::from_secs(20), "the gateway to listen", || {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "the gateway exited ({status}); see {}",
                    self.path("gateway.log").display()
                );
            }
            Ok(self.gateway_listening_count() > started)
        });
        self.gateway = Some(child);
        ready
    }

    /// How many times the gateway's log says it is listening (once per start).
    fn gateway_listening_count(&self) -> usize {
        std::fs::read_to_string(self.path("gateway.log"))
            .map_or(0, |log| log.matches(" listening on udp ").count())
    }

    /// Starts the client in its namespace.
    pub fn start_client(&mut self) -> anyhow::Result<()> {
        let log = append(&self.path("client.log"))?;
        let mut command = self.topology.client().command(&self.exe);
        command
            .arg("client")
            .arg("--config")
            .arg(self.path("client.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.options.client_env {
            command.env(k, v);
        }
        self.client = Some(command.spawn().context("cannot start the client")?);
        Ok(())
    }

    /// Kills the gateway with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill_gateway(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.gateway.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops the gateway and the client with SIGTERM and waits for them (bounded); returns
    /// whether both exited successfully.
    pub fn stop(&mut self) -> anyhow::Result<bool> {
        let mut clean = true;
        for child in [self.client.take(), self.gateway.take()]
            .into_iter()
            .flatten()
        {
            clean &= terminate(child, Duration::from_secs(10))?;
        }
        Ok(clean)
    }

    /// Runs a helper process in the client (`in_client`) or gateway namespace, owned by the
    /// lab; returns its index for [`Lab::helper`].
    pub fn spawn_helper(&mut self, in_client: bool, args: &[&str]) -> anyhow::Result<usize> {
        let ns = if in_client {
            self.topology.client()
        } else {
            self.topology.gateway()
        };
        let child = ns
            .command(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", args[0]))?;
        self.helpers.push(child);
        Ok(self.helpers.len() - 1)
    }

    /// A helper process started by [`Lab::spawn_helper`].
    pub fn helper(&mut self, index: usize) -> Option<&mut Child> {
        self.helpers.get_mut(index)
    }

    /// The `jumpvpn` binary.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Whether one ping through the tunnel (client → gateway) is answered within a second.
    pub fn ping_once(&self) -> bool {
        self.topology
            .client()
            .command("ping")
            .args(["-c", "1", "-W", "1", "-n", "-q"])
            .arg(GATEWAY_TUNNEL_IP.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until a ping through the tunnel is answered.
    pub fn wait_tunnel(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        wait_until(timeout, "the tunnel to carry a ping", || {
            Ok(self.ping_once())
        })?;
        Ok(start.elapsed())
    }

    /// The gateway's audit events so far.
    pub fn gateway_events(&self) -> Vec<Value> {
        read_events(&self.gateway_audit())
    }

    /// The client's audit events so far.
    pub fn client_events(&self) -> Vec<Value> {
        read_events(&self.client_audit())
    }

    /// Waits until the gateway has written an event `matches` accepts; returns it.
    pub fn wait_gateway_event(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let mut found = None;
        wait_until(timeout, what, || {
            found = self.gateway_events().into_iter().find(|e| matches(e));
            Ok(found.is_some())
        })?;
        found.context("unreachable: the wait succeeded")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut child in self.helpers.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for child in [self.client.take(), self.gateway.take()]
            .into_iter()
            .flatten()
        {
            let _ = terminate(child, Duration::from_secs(5));
        }
        if !self.options.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sends SIGTERM, waits up to `timeout`, then SIGKILL. Returns whether it exited with 0.
pub fn terminate(mut child: Child, timeout: Duration) -> anyhow::Result<bool> {
    signal(&child, "TERM");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            child.wait()?;
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal (by name: `TERM`, `INT`, …) to a child.
pub fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `done` every 50 ms until it says yes, `timeout` passes, or the demo is interrupted.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if done()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {:.1} s waiting for {what}",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The well-formed events of a JSONL audit file.
pub fn read_events(path: &Path) -> Vec<Value> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// The `event_type` of an event.
pub fn event_type(event: &Value) -> &str {
    event["event_type"].as_str().unwrap_or("")
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{text}")?;
    Ok(())
}

fn append(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

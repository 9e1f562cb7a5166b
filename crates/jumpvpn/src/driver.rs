//! What the gateway and client drivers share: the clock the endpoints are fed, the framing of
//! packets on TCP transports, the runtime, and the names clients write audit events under.

use anyhow::Context as _;
use jumpvpn_core::{NodeId, Timestamp};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest frame on a TCP transport (the length prefix is 16 bits).
pub(crate) const MAX_FRAME: usize = u16::MAX as usize;
/// Frames queued for one TCP connection before new ones are dropped (as a full UDP socket
/// buffer would drop them).
pub(crate) const TCP_QUEUE: usize = 1024;

/// The runtime a driver runs on: one thread. The endpoint is one task, and on a
/// multi-threaded runtime every readiness event of its sockets would be seen by a worker
/// thread and handed to it with a wake-up across threads; here the thread that polls the
/// sockets runs the task. The work that could block (store commits, the audit log) has threads
/// of its own.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Milliseconds since the Unix epoch, from a monotonic clock anchored once at start (so timers
/// never see the wall clock jump).
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    start_ms: u64,
}

impl Clock {
    /// A clock anchored now.
    pub(crate) fn new() -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            start: Instant::now(),
            start_ms,
        }
    }

    /// The current time.
    pub(crate) fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.start_ms.saturating_add(elapsed))
    }

    /// The instant at which `at` falls.
    pub(crate) fn instant(&self, at: Timestamp) -> tokio::time::Instant {
        let ms = at.as_millis().saturating_sub(self.start_ms);
        tokio::time::Instant::from_std(self.start + std::time::Duration::from_millis(ms))
    }
}

/// Writes one frame: a 2-byte big-endian length, then the packet.
pub(crate) async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut frame = Vec::with_capacity(bytes.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(bytes);
    writer.write_all(&frame).await
}

/// Reads one frame into `buf`; `None` at a clean end of stream.
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    let Some(frame) = buf.get_mut(..len) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too long",
        ));
    };
    reader.read_exact(frame).await?;
    Ok(Some(len))
}
/// Node names of clients in their audit logs.
pub(crate) fn client_node_name(public_key: &[u8; 32]) -> NodeId {
    let hex: String = public_key[..4].iter().map(|b| format!("{b:02x}")).collect();
    NodeId::new(format!("client-{hex}"))
}

//! Batched I/O for the data path: many packets per system call between the TUN device, the
//! endpoint and the UDP socket.
//!
//! ```text
//!   TUN ──read: one TSO super-packet, split──▶ TunReader ──seal each──▶ GsoBatch ──one sendmsg──▶ UDP
//!   UDP ──recvmsg: one GRO list, split──▶ open each ──▶ TunWriter ──coalesce (GRO)──▶ TUN
//! ```
//!
//! - The TUN device runs with the kernel's offloads (`IFF_VNET_HDR`, TSO): a bulk TCP sender
//!   hands the tunnel one super-packet of up to 64 KiB, which tun-rs splits into MTU-sized IP
//!   packets; packets for the TUN device are coalesced back (GRO) before they are written.
//! - The UDP socket sends a run of equal-sized datagrams to one destination as one `sendmsg`
//!   with `UDP_SEGMENT` (GSO) and receives a run of them with `UDP_GRO`, through `nix`. Not
//!   through quinn-udp: its socket setup turns path MTU discovery to "probe" and sets
//!   `IPV6_DONTFRAG`, so that a datagram larger than the path MTU (a full-sized tunnel packet
//!   over IPv6, or over PPPoE) would be refused instead of fragmented as before.
//!
//! Where the kernel lacks an offload, each falls back to one packet per call.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned,
    MsgFlags, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Largest IP packet (and UDP payload) handled.
const MAX_PACKET: usize = u16::MAX as usize;
/// Most datagrams the kernel sends for one `UDP_SEGMENT` message (`UDP_MAX_SEGMENTS`).
const GSO_MAX_SEGMENTS: usize = 64;
/// Largest payload of one `UDP_SEGMENT` message: the limit of one UDP/IPv4 datagram.
const GSO_MAX_BYTES: usize = 65_507;
/// Most datagrams the kernel coalesces into one `UDP_GRO` read (`UDP_GRO_CNT_MAX`).
const GRO_MAX_SEGMENTS: usize = 64;
/// Socket buffer size asked for in each direction (wireguard-go's choice). The default (about
/// 200 KiB) holds only a few coalesced runs: while the task is busy sealing a batch, the next
/// runs arriving would be dropped.
const SOCKET_BUFFER: usize = 7 << 20;

// ---- TUN ----------------------------------------------------------------------------------

/// The IP packets of one TUN read.
pub(crate) struct TunReader {
    /// The raw read: virtio header and (super-)packet.
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl TunReader {
    /// Buffers for a device of this MTU: the segments of a super-packet are at most that long;
    /// only a packet that comes whole (the first buffer) may be longer.
    pub(crate) fn new(mtu: u16) -> Self {
        let mut bufs = vec![vec![0; MAX_PACKET]];
        bufs.extend((1..IDEAL_BATCH_SIZE).map(|_| vec![0; usize::from(mtu)]));
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs,
            sizes: vec![0; IDEAL_BATCH_SIZE],
            count: 0,
        }
    }

    /// One read, without waiting: `WouldBlock` when nothing is pending. Afterwards
    /// [`TunReader::packets`] yields what was read.
    pub(crate) fn try_read(&mut self, tun: &AsyncDevice) -> io::Result<()> {
        self.count = 0;
        self.count = tun.try_recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)?;
        Ok(())
    }

    /// [`TunReader::try_read`] for a loop that drains the device: false when nothing more is
    /// pending, or when the read failed (logged), which ends the loop either way.
    pub(crate) fn read_more(&mut self, tun: &AsyncDevice) -> bool {
        match self.try_read(tun) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => false,
            Err(error) => {
                tracing::warn!("tun read failed: {error}");
                false
            }
        }
    }

    /// The packets of the last read.
    pub(crate) fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(&self.sizes)
            .take(self.count)
            .filter_map(|(buf, &size)| buf.get(..size))
    }
}

/// IP packets gathered for one write (or a few, after coalescing) to the TUN device.
pub(crate) struct TunWriter {
    /// Each holds `VIRTIO_NET_HDR_LEN` bytes of room for the header, then a packet.
    bufs: Vec<Vec<u8>>,
    len: usize,
    gro: GROTable,
}

impl TunWriter {
    pub(crate) fn new() -> Self {
        Self {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + 2048))
                .collect(),
            len: 0,
            gro: GROTable::default(),
        }
    }

    /// Adds one packet that `fill` appends to the buffer it is given (writing the batch first
    /// if it is full); the packet is kept only if `fill` returns true, e.g. when an endpoint
    /// opens a `DATA` packet into it.
    pub(crate) async fn fill(
        &mut self,
        tun: &AsyncDevice,
        fill: impl FnOnce(&mut Vec<u8>) -> bool,
    ) {
        if self.is_full() {
            self.flush(tun).await;
        }
        if let Some(slot) = self.slot() {
            if fill(slot) {
                self.commit();
            }
        }
    }

    /// The buffer for the next packet, holding only the header room: append the packet, then
    /// [`TunWriter::commit`] it (or leave it, and the next call starts over). `None` when the
    /// batch is full: [`TunWriter::flush`] first.
    fn slot(&mut self) -> Option<&mut Vec<u8>> {
        let buf = self.bufs.get_mut(self.len)?;
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        Some(buf)
    }

    /// Keeps the packet appended to the last [`TunWriter::slot`].
    fn commit(&mut self) {
        let filled = self
            .bufs
            .get(self.len)
            .is_some_and(|b| b.len() > VIRTIO_NET_HDR_LEN);
        if filled {
            self.len += 1;
        }
    }

    /// Whether no slot is left.
    fn is_full(&self) -> bool {
        self.len >= self.bufs.len()
    }

    /// Adds a copy of `packet`.
    pub(crate) async fn push(&mut self, tun: &AsyncDevice, packet: &[u8]) {
        self.fill(tun, |buf| {
            buf.extend_from_slice(packet);
            true
        })
        .await;
    }

    /// Writes the gathered packets, coalescing the segments of each TCP flow.
    pub(crate) async fn flush(&mut self, tun: &AsyncDevice) {
        if self.len == 0 {
            return;
        }
        let Some(bufs) = self.bufs.get_mut(..self.len) else {
            return;
        };
        if let Err(error) = tun
            .send_multiple(&mut self.gro, bufs, VIRTIO_NET_HDR_LEN)
            .await
        {
            tracing::debug!("tun write failed: {error}");
        }
        self.len = 0;
    }
}

// ---- UDP ----------------------------------------------------------------------------------

/// A UDP socket that sends and receives runs of datagrams with one system call each.
pub(crate) struct BatchUdp {
    socket: UdpSocket,
    gso: bool,
    /// Ancillary-data space for a received `UDP_GRO` segment size.
    cmsg: Vec<u8>,
}

/// What one receive brought: `len` bytes of datagrams `stride` bytes apart (the last may be
/// shorter), all from `from`.
pub(crate) struct Received {
    pub(crate) len: usize,
    pub(crate) stride: usize,
    pub(crate) from: SocketAddr,
}

impl Received {
    /// The datagrams of `buf` (the buffer the receive filled).
    pub(crate) fn datagrams<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        buf.get(..self.len)
            .unwrap_or_default()
            .chunks(self.stride.max(1))
    }
}

impl BatchUdp {
    /// Bytes a receive buffer needs to hold the longest run the kernel may coalesce.
    pub(crate) const RECV_BUFFER: usize = GRO_MAX_SEGMENTS * 2048;

    /// Wraps `socket`, enabling `UDP_GRO`, noting whether `UDP_SEGMENT` is available, and
    /// enlarging its buffers.
    pub(crate) fn new(socket: UdpSocket) -> Self {
        // Either may be missing (an old kernel): then one datagram per call.
        let _ = setsockopt(&socket, sockopt::UdpGroSegment, &true);
        let gso = getsockopt(&socket, sockopt::UdpGsoSegment).is_ok();
        // Beyond the system's limit (net.core.rmem_max) when privileged, as a VPN is; else up
        // to that limit.
        if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
        }
        Self {
            socket,
            gso,
            cmsg: nix::cmsg_space!(i32),
        }
    }

    /// Waits until a receive may succeed.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Polls for readability (for a task that waits on several sockets).
    pub(crate) fn poll_readable(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.socket.poll_recv_ready(cx).map(|_| ())
    }

    /// One receive without waiting (`WouldBlock` when nothing is pending): a single datagram,
    /// or a run of them coalesced by the kernel.
    pub(crate) fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Received> {
        let cmsg = &mut self.cmsg;
        self.socket.try_io(Interest::READABLE, || {
            let fd = self.socket.as_raw_fd();
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let mut stride = msg.bytes;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(size) = c {
                        stride = usize::try_from(size).unwrap_or(msg.bytes);
                    }
                }
            }
            let from = msg
                .address
                .as_ref()
                .and_then(socket_addr)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            Ok(Received {
                len: msg.bytes,
                stride,
                from,
            })
        })
    }

    /// Sends `contents`, datagrams of `segment` bytes (the last may be shorter), to `to` (or
    /// to the connected peer), waiting while the socket's buffer is full. Errors other than a
    /// full buffer are the network's (unreachable, refused): the datagrams are lost, as they
    /// would be on the way.
    pub(crate) async fn send(&mut self, to: Option<SocketAddr>, contents: &[u8], segment: usize) {
        let to = to.map(SockaddrStorage::from);
        if self.gso && contents.len() > segment {
            match self.send_one(to.as_ref(), contents, Some(segment)).await {
                Err(Errno::EIO | Errno::EINVAL) => {
                    // The device or path cannot take segmentation offload (or a segment is
                    // larger than the path MTU): one datagram per call from now on.
                    tracing::debug!("UDP segmentation offload refused; sending datagrams singly");
                    self.gso = false;
                }
                _ => return,
            }
        }
        for datagram in contents.chunks(segment.max(1)) {
            let _ = self.send_one(to.as_ref(), datagram, None).await;
        }
    }

    async fn send_one(
        &self,
        to: Option<&SockaddrStorage>,
        contents: &[u8],
        segment: Option<usize>,
    ) -> Result<(), Errno> {
        let segment = segment.and_then(|s| u16::try_from(s).ok());
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, || {
                let gso;
                let cmsgs: &[ControlMessage] = match &segment {
                    Some(size) => {
                        gso = [ControlMessage::UdpGsoSegments(size)];
                        &gso
                    }
                    None => &[],
                };
                sendmsg(
                    self.socket.as_raw_fd(),
                    &[IoSlice::new(contents)],
                    cmsgs,
                    MsgFlags::empty(),
                    to,
                )
                .map_err(io::Error::from)
            })
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(error) => Err(error
                .raw_os_error()
                .map_or(Errno::UnknownErrno, Errno::from_raw)),
        }
    }
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

// ---- batching -----------------------------------------------------------------------------

/// Sealed datagrams gathered in one buffer to be sent together: the same destination, the
/// same size but for a shorter last one, within the kernel's limits for one `UDP_SEGMENT`
/// message.
pub(crate) struct GsoBatch<D> {
    /// The datagrams, back to back.
    pub(crate) buf: Vec<u8>,
    dest: Option<D>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run.
    closed: bool,
}

impl<D: Copy + PartialEq> GsoBatch<D> {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_PACKET),
            dest: None,
            segment: 0,
            count: 0,
            closed: false,
        }
    }

    /// Takes in the datagram for `dest` that was just appended to `buf` at `start`. When it
    /// cannot join the run before it, that run is returned to be sent first (destination,
    /// bytes, segment size) — call [`GsoBatch::restart`] with `start` once it is sent.
    pub(crate) fn add(&mut self, dest: D, start: usize) -> Option<(D, &[u8], usize)> {
        let len = self.buf.len().saturating_sub(start);
        let joins = self.count == 0
            || (self.dest == Some(dest)
                && !self.closed
                && len <= self.segment
                && self.count < GSO_MAX_SEGMENTS
                && start + len <= GSO_MAX_BYTES);
        if joins {
            self.note(dest, len);
            return None;
        }
        let run = self.buf.get(..start)?;
        Some((self.dest?, run, self.segment))
    }

    /// Drops the run sent, keeping the datagram at `start` as the first of the next one.
    pub(crate) fn restart(&mut self, dest: D, start: usize) {
        self.buf.drain(..start.min(self.buf.len()));
        self.count = 0;
        self.closed = false;
        let len = self.buf.len();
        self.note(dest, len);
    }

    /// The run gathered so far, if any; then [`GsoBatch::clear`].
    pub(crate) fn pending(&self) -> Option<(D, &[u8], usize)> {
        if self.count == 0 {
            return None;
        }
        Some((self.dest?, &self.buf, self.segment))
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.dest = None;
        self.count = 0;
        self.closed = false;
    }

    fn note(&mut self, dest: D, len: usize) {
        if self.count == 0 {
            self.dest = Some(dest);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a datagram of `len` bytes for `dest`; returns the run it made ready to send
    /// (destination, bytes, segment size), as the driver would send it.
    fn feed(batch: &mut GsoBatch<u8>, dest: u8, len: usize) -> Option<(u8, usize, usize)> {
        let start = batch.buf.len();
        batch.buf.extend(std::iter::repeat_n(0xAB, len));
        let run = batch.add(dest, start).map(|(d, run, s)| (d, run.len(), s));
        if run.is_some() {
            batch.restart(dest, start);
        }
        run
    }

    fn pending(batch: &GsoBatch<u8>) -> Option<(u8, usize, usize)> {
        batch.pending().map(|(d, run, s)| (d, run.len(), s))
    }

    #[test]
    fn equal_datagrams_to_one_destination_form_one_run() {
        let mut batch = GsoBatch::new();
        for _ in 0..10 {
            assert_eq!(feed(&mut batch, 1, 100), None);
        }
        assert_eq!(
            feed(&mut batch, 1, 40),
            None,
            "a shorter last datagram joins"
        );
        assert_eq!(pending(&batch), Some((1, 1040, 100)));
    }

    #[test]
    fn a_new_destination_starts_a_new_run() {
        let mut batch = GsoBatch::new();
        assert_eq!(feed(&mut batch, 1, 100), None);
        assert_eq!(feed(&mut batch, 2, 100), Some((1, 100, 100)));
        assert_eq!(pending(&batch), Some((2, 100, 100)));
    }

    #[test]
    fn a_longer_datagram_starts_a_new_run() {
        let mut batch = GsoBatch::new();
        assert_eq!(feed(&mut batch, 1, 100), None);
        assert_eq!(feed(&mut batch, 1, 101), Some((1, 100, 100)));
        assert_eq!(pending(&batch), Some((1, 101, 101)));
    }

    #[test]
    fn a_shorter_datagram_ends_its_run() {
        let mut batch = GsoBatch::new();
        assert_eq!(feed(&mut batch, 1, 100), None);
        assert_eq!(feed(&mut batch, 1, 50), None);
        assert_eq!(feed(&mut batch, 1, 50), Some((1, 150, 100)));
        assert_eq!(pending(&batch), Some((1, 50, 50)));
    }

    #[test]
    fn a_run_stays_within_the_kernel_limits() {
        let mut batch = GsoBatch::new();
        let mut sent = Vec::new();
        for _ in 0..200 {
            if let Some((_, len, segment)) = feed(&mut batch, 7, 1470) {
                assert!(len <= GSO_MAX_BYTES);
                assert!(len / segment <= GSO_MAX_SEGMENTS);
                sent.push(len);
            }
        }
        sent.extend(pending(&batch).map(|(_, len, _)| len));
        assert_eq!(sent.iter().sum::<usize>(), 200 * 1470);
        assert_eq!(sent[0], 44 * 1470, "as many as fit in 65,507 bytes");

        let mut batch = GsoBatch::new();
        let runs = (0..200).filter_map(|_| feed(&mut batch, 7, 20)).count();
        assert_eq!(runs, 3, "64 datagrams at most per run");
    }
}

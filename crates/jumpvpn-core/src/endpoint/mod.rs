//! Sans-IO endpoints: the gateway and the client of SPEC §4–§6, driven by inputs and read
//! through outputs, as `quinn-proto`'s `Connection` is.
//!
//! Inputs are `handle_*(now, …)` calls: a datagram or TCP frame that arrived on a path, an IP
//! packet from the TUN device, the outcome of a store request, a timer. Outputs are polled with
//! `poll_output()` until it returns `None`, then `poll_timeout()` tells when to call
//! `handle_timeout`. Outputs are values: bytes to transmit on a path, IP packets for the TUN
//! device, store requests (the gateway *asks* for a compare-and-swap and learns the outcome as a
//! later input), audit events. Nothing here reads a clock, a socket, a file or the operating
//! system's random generator; the drivers (tokio) and the simulation (a virtual clock) do.

pub mod client;
pub mod gateway;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::crypto::{AeadKey, OpenError};
use crate::ids::{SessionId, StateVersion, Timestamp};
use crate::record::Proto;
use crate::wire::{Control, Packet, DATA_HEADER_LEN};

/// A transport path: the protocol and both ends. For TCP the pair of addresses names one
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Path {
    /// UDP or TCP.
    pub proto: Proto,
    /// The peer's address (for the gateway: the client's address as seen, after any NAT).
    pub remote: SocketAddr,
    /// Our address.
    pub local: SocketAddr,
}

/// Bytes to send on a path.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// Where.
    pub path: Path,
    /// One whole packet (the driver adds the TCP length prefix).
    pub bytes: Vec<u8>,
}

/// Control counters start from the clock (milliseconds × 2^20) and then count up, so a
/// restarted sender never reuses a (key, counter) pair under the session-long control keys,
/// as long as its clock did not run backwards.
pub(crate) fn next_control_counter(last: &mut u64, now: Timestamp) -> u64 {
    let counter = last
        .saturating_add(1)
        .max(now.as_millis().saturating_mul(1 << 20));
    *last = counter;
    counter
}

/// Appends a sealed control packet.
pub(crate) fn seal_control(
    session: SessionId,
    key: &AeadKey,
    counter: u64,
    msg: &Control,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    Packet::Control {
        session,
        counter,
        sealed: &[],
    }
    .encode(out);
    let mut header = [0u8; 2 + 16 + 8];
    header.copy_from_slice(&out[start..]);
    let mut body = Vec::with_capacity(64);
    msg.encode(&mut body);
    key.seal(counter, &header, &body, out);
}

/// Appends a sealed data packet.
pub(crate) fn seal_data(
    session: SessionId,
    bound_at_version: StateVersion,
    key: &AeadKey,
    counter: u64,
    ip_packet: &[u8],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    Packet::Data {
        session,
        bound_at_version,
        counter,
        sealed: &[],
    }
    .encode(out);
    let mut header = [0u8; DATA_HEADER_LEN];
    header.copy_from_slice(&out[start..]);
    key.seal(counter, &header, ip_packet, out);
}

/// Opens the sealed part of a control or data packet (`bytes` is the whole packet).
pub(crate) fn open_sealed(
    key: &AeadKey,
    bytes: &[u8],
    counter: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let aad = Packet::associated_data(bytes).ok_or(OpenError)?;
    key.open(counter, aad, sealed)
}

/// Opens the sealed part of a packet and appends the plaintext to `out`; on failure `out` is
/// left as it was.
pub(crate) fn open_sealed_into(
    key: &AeadKey,
    bytes: &[u8],
    counter: u64,
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), OpenError> {
    let aad = Packet::associated_data(bytes).ok_or(OpenError)?;
    key.open_into(counter, aad, sealed, out)
}

/// The destination address of an IP packet, if it is one.
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    ip_address(packet, 16, 24)
}

/// The source address of an IP packet, if it is one.
pub fn ip_source(packet: &[u8]) -> Option<IpAddr> {
    ip_address(packet, 12, 8)
}

fn ip_address(packet: &[u8], v4_at: usize, v6_at: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let b: [u8; 4] = packet.get(v4_at..v4_at + 4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 if packet.len() >= 40 => {
            let b: [u8; 16] = packet.get(v6_at..v6_at + 16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

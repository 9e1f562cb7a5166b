//! The wire codec (SPEC §4): every message of the protocol as a typed value, and its bytes.
//!
//! Decoding is total: any byte string decodes to a [`Packet`] or a [`DecodeError`], never a
//! panic, and a decoded value is well-formed by construction. Encoding appends to a caller's
//! buffer. Cryptography is not done here: Noise handshake messages and sealed bodies travel as
//! opaque bytes, and [`Control`] is the plaintext that a sealed control packet carries.
//!
//! Layout (all integers big-endian; see docs/PROTOCOL.md):
//!
//! ```text
//! every packet      type:u8 | version:u8 | …
//! HANDSHAKE_INIT    1 | v | noise message (to the end)
//! HANDSHAKE_ACK     2 | v | noise message (to the end)
//! REATTACH_REQUEST  3 | v | session:16 | nonce:u64 | known_version:u64 | proto:u8 | proof:32
//! CONTROL           4 | v | session:16 | counter:u64 | sealed body (ciphertext and tag)
//! DATA              5 | v | session:16 | bound_at_version:u64 | counter:u64 | sealed packet
//! REJECT_NOTICE     6 | v | session:16 | reason:u16       (unauthenticated: advisory only)
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ids::{OwnerEpoch, SessionId, StateVersion, TransportId};
use crate::reason::ReasonCode;
use crate::record::Proto;

/// The protocol version this codec speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes of a proof of possession.
pub const PROOF_LEN: usize = 32;
/// Bytes of an AEAD tag: the least a sealed body can be.
pub const TAG_LEN: usize = 16;
/// Largest packet accepted (a jumbo frame plus headers).
pub const MAX_PACKET: usize = 65_535;
/// Bytes of a `DATA` header: type, version, session, bound_at_version, counter.
pub const DATA_HEADER_LEN: usize = 2 + 16 + 8 + 8;
/// Bytes a `DATA` packet adds to the IP packet it carries (header and tag).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;
/// Bytes of a `CONTROL` header: type, version, session, counter.
const CONTROL_HEADER_LEN: usize = 2 + 16 + 8;

/// Message types, the first byte of every packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    /// Noise IK first message (client → gateway).
    HandshakeInit = 1,
    /// Noise IK second message (gateway → client).
    HandshakeAck = 2,
    /// Bind a new transport, with a proof of possession.
    ReattachRequest = 3,
    /// A sealed control message ([`Control`]).
    Control = 4,
    /// A sealed IP packet.
    Data = 5,
    /// An unauthenticated refusal for a request that could not be authenticated.
    RejectNotice = 6,
}

/// Length of a `HANDSHAKE_INIT`'s `mac1`.
pub const MAC1_LEN: usize = 16;

/// A decoded packet. Borrowed fields point into the decoded buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `HANDSHAKE_INIT`: the Noise message and a MAC that lets the gateway refuse, before any
    /// Diffie-Hellman, an init not made for its public key (see `handshake::mac1`).
    HandshakeInit {
        /// Noise IK message 1.
        noise: &'a [u8],
        /// A MAC of everything before it, keyed by a hash of the gateway's public key.
        mac1: [u8; MAC1_LEN],
    },
    /// `HANDSHAKE_ACK`: the Noise message (its payload is a [`HandshakeAckPayload`]).
    HandshakeAck {
        /// Noise IK message 2.
        noise: &'a [u8],
    },
    /// `REATTACH_REQUEST`.
    Reattach(ReattachRequest),
    /// A sealed control message.
    Control {
        /// The session it belongs to.
        session: SessionId,
        /// Sender's control counter (the AEAD nonce; strictly increasing).
        counter: u64,
        /// Ciphertext and tag of a [`Control`] body.
        sealed: &'a [u8],
    },
    /// `DATA`: a sealed IP packet.
    Data {
        /// The session.
        session: SessionId,
        /// The binding whose traffic keys sealed it (keys are derived per binding).
        bound_at_version: StateVersion,
        /// Packet counter (the AEAD nonce; checked against the replay window).
        counter: u64,
        /// Ciphertext and tag.
        sealed: &'a [u8],
    },
    /// An unauthenticated refusal: a client treats it as a hint, never as final.
    RejectNotice {
        /// The session named by the refused request.
        session: SessionId,
        /// Why.
        reason: ReasonCode,
    },
}

/// `REATTACH_REQUEST` fields (SPEC §4). The proof is a MAC keyed by the session's master
/// secret over (session, nonce, known version, candidate descriptor).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReattachRequest {
    /// The session.
    pub session: SessionId,
    /// Strictly increasing control nonce.
    pub nonce: u64,
    /// The highest version the client has been told.
    pub known_version: StateVersion,
    /// The transport the client proposes (the one it sends on).
    pub proto: Proto,
    /// Proof of possession.
    pub proof: [u8; PROOF_LEN],
}

impl fmt::Debug for ReattachRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The proof is not a secret, but it is not for logs either (SPEC §8).
        f.debug_struct("ReattachRequest")
            .field("session", &self.session)
            .field("nonce", &self.nonce)
            .field("known_version", &self.known_version)
            .field("proto", &self.proto)
            .finish_non_exhaustive()
    }
}

/// The plaintext of a sealed control packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Liveness; `sent_ms` is echoed for RTT.
    Keepalive {
        /// Sender's clock, echoed back.
        sent_ms: u64,
    },
    /// Answer to a keepalive, with the session's current version and epoch.
    KeepaliveAck {
        /// The echoed `sent_ms`.
        echo_ms: u64,
        /// Current version.
        state_version: StateVersion,
        /// Current epoch.
        owner_epoch: OwnerEpoch,
    },
    /// Client-observed path health.
    HealthReport {
        /// Loss, percent.
        loss_pct: u32,
        /// RTT, ms.
        rtt_ms: u32,
        /// Jitter, ms.
        jitter_ms: u32,
    },
    /// Reattach accepted.
    ReattachAck {
        /// The new version.
        state_version: StateVersion,
        /// The epoch.
        owner_epoch: OwnerEpoch,
        /// The new binding.
        transport_id: TransportId,
    },
    /// Reattach refused (authenticated).
    ReattachReject {
        /// Why.
        reason: ReasonCode,
        /// Whether to retry.
        retryable: bool,
        /// The current version.
        state_version: StateVersion,
        /// The current epoch.
        owner_epoch: OwnerEpoch,
        /// Where the owner is, when another node owns the session.
        owner_hint: Option<SocketAddr>,
    },
    /// The session moved to another node.
    Redirect {
        /// The new version.
        state_version: StateVersion,
        /// The new epoch.
        owner_epoch: OwnerEpoch,
        /// The new owner's address.
        to: SocketAddr,
    },
    /// A fresh packet of the session arrived from a new address: reattach now.
    ReattachHint {
        /// Current version.
        state_version: StateVersion,
        /// Current epoch.
        owner_epoch: OwnerEpoch,
    },
    /// The session ended.
    Terminate {
        /// Why.
        reason: ReasonCode,
    },
}

/// The plaintext payload of the Noise `HANDSHAKE_ACK` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeAckPayload {
    /// The new session.
    pub session: SessionId,
    /// Its version (1).
    pub state_version: StateVersion,
    /// Its epoch (1).
    pub owner_epoch: OwnerEpoch,
    /// The client's address inside the tunnel.
    pub tunnel_ip: IpAddr,
    /// The client's first binding.
    pub transport_id: TransportId,
    /// Policy the client applies: keepalive period.
    pub keepalive_interval_ms: u32,
    /// Policy the client applies: silence before reattaching elsewhere.
    pub client_dead_after_ms: u32,
    /// Policy the client applies: the session's lifetime.
    pub session_ttl_ms: u64,
}

/// Why bytes are not a packet. Peer-controlled input: the caller drops the packet silently
/// (SPEC §4 step 1) and may count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its type requires.
    Truncated,
    /// Longer than its type allows, or than [`MAX_PACKET`].
    TooLong,
    /// Unknown first byte.
    UnknownType(u8),
    /// A protocol version this codec does not speak.
    UnsupportedVersion(u8),
    /// A field holds a value outside its domain.
    InvalidField(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated packet"),
            DecodeError::TooLong => f.write_str("packet too long"),
            DecodeError::UnknownType(t) => write!(f, "unknown packet type {t}"),
            DecodeError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            DecodeError::InvalidField(name) => write!(f, "invalid {name}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl<'a> Packet<'a> {
    /// Decodes one packet.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_PACKET {
            return Err(DecodeError::TooLong);
        }
        let mut r = Reader::new(bytes);
        let kind = r.u8()?;
        let version = r.u8()?;
        if !(1..=6).contains(&kind) {
            return Err(DecodeError::UnknownType(kind));
        }
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let packet = match kind {
            1 => {
                let rest = r.rest_nonempty()?;
                let split = rest
                    .len()
                    .checked_sub(MAC1_LEN)
                    .filter(|&n| n > 0)
                    .ok_or(DecodeError::Truncated)?;
                let (noise, mac1) = rest.split_at(split);
                Packet::HandshakeInit {
                    noise,
                    mac1: mac1.try_into().map_err(|_| DecodeError::Truncated)?,
                }
            }
            2 => Packet::HandshakeAck {
                noise: r.rest_nonempty()?,
            },
            3 => Packet::Reattach(ReattachRequest {
                session: r.session()?,
                nonce: r.u64()?,
                known_version: StateVersion(r.u64()?),
                proto: r.proto()?,
                proof: r.array()?,
            }),
            4 => Packet::Control {
                session: r.session()?,
                counter: r.u64()?,
                sealed: r.sealed()?,
            },
            5 => Packet::Data {
                session: r.session()?,
                bound_at_version: StateVersion(r.u64()?),
                counter: r.u64()?,
                sealed: r.sealed()?,
            },
            _ => Packet::RejectNotice {
                session: r.session()?,
                reason: r.reason()?,
            },
        };
        r.finish()?;
        Ok(packet)
    }

    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            Packet::HandshakeInit { .. } => PacketType::HandshakeInit,
            Packet::HandshakeAck { .. } => PacketType::HandshakeAck,
            Packet::Reattach(_) => PacketType::ReattachRequest,
            Packet::Control { .. } => PacketType::Control,
            Packet::Data { .. } => PacketType::Data,
            Packet::RejectNotice { .. } => PacketType::RejectNotice,
        };
        out.push(kind as u8);
        out.push(PROTOCOL_VERSION);
        match self {
            Packet::HandshakeInit { noise, mac1 } => {
                out.extend_from_slice(noise);
                out.extend_from_slice(mac1);
            }
            Packet::HandshakeAck { noise } => out.extend_from_slice(noise),
            Packet::Reattach(r) => {
                out.extend_from_slice(&r.session.to_bytes());
                out.extend_from_slice(&r.nonce.to_be_bytes());
                out.extend_from_slice(&r.known_version.get().to_be_bytes());
                out.push(proto_byte(r.proto));
                out.extend_from_slice(&r.proof);
            }
            Packet::Control {
                session,
                counter,
                sealed,
            } => {
                out.extend_from_slice(&session.to_bytes());
                out.extend_from_slice(&counter.to_be_bytes());
                out.extend_from_slice(sealed);
            }
            Packet::Data {
                session,
                bound_at_version,
                counter,
                sealed,
            } => {
                out.extend_from_slice(&session.to_bytes());
                out.extend_from_slice(&bound_at_version.get().to_be_bytes());
                out.extend_from_slice(&counter.to_be_bytes());
                out.extend_from_slice(sealed);
            }
            Packet::RejectNotice { session, reason } => {
                out.extend_from_slice(&session.to_bytes());
                out.extend_from_slice(&reason_id(*reason).to_be_bytes());
            }
        }
    }

    /// The bytes a sealed packet authenticates as associated data: everything before its
    /// sealed part. `None` for packets that are not sealed.
    pub fn associated_data(bytes: &[u8]) -> Option<&[u8]> {
        match bytes.first() {
            Some(4) => bytes.get(..CONTROL_HEADER_LEN),
            Some(5) => bytes.get(..DATA_HEADER_LEN),
            _ => None,
        }
    }
}

impl Control {
    /// Decodes a control body (after opening the seal).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let control = match r.u8()? {
            1 => Control::Keepalive { sent_ms: r.u64()? },
            2 => Control::KeepaliveAck {
                echo_ms: r.u64()?,
                state_version: StateVersion(r.u64()?),
                owner_epoch: OwnerEpoch(r.u64()?),
            },
            3 => Control::HealthReport {
                loss_pct: r.u32()?,
                rtt_ms: r.u32()?,
                jitter_ms: r.u32()?,
            },
            4 => Control::ReattachAck {
                state_version: StateVersion(r.u64()?),
                owner_epoch: OwnerEpoch(r.u64()?),
                transport_id: TransportId(r.u64()?),
            },
            5 => Control::ReattachReject {
                reason: r.reason()?,
                retryable: r.flag()?,
                state_version: StateVersion(r.u64()?),
                owner_epoch: OwnerEpoch(r.u64()?),
                owner_hint: if r.flag()? {
                    Some(r.socket_addr()?)
                } else {
                    None
                },
            },
            6 => Control::Redirect {
                state_version: StateVersion(r.u64()?),
                owner_epoch: OwnerEpoch(r.u64()?),
                to: r.socket_addr()?,
            },
            7 => Control::ReattachHint {
                state_version: StateVersion(r.u64()?),
                owner_epoch: OwnerEpoch(r.u64()?),
            },
            8 => Control::Terminate {
                reason: r.reason()?,
            },
            _ => return Err(DecodeError::InvalidField("control kind")),
        };
        r.finish()?;
        Ok(control)
    }

    /// Appends the body's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Control::Keepalive { sent_ms } => {
                out.push(1);
                out.extend_from_slice(&sent_ms.to_be_bytes());
            }
            Control::KeepaliveAck {
                echo_ms,
                state_version,
                owner_epoch,
            } => {
                out.push(2);
                out.extend_from_slice(&echo_ms.to_be_bytes());
                put_version_epoch(out, *state_version, *owner_epoch);
            }
            Control::HealthReport {
                loss_pct,
                rtt_ms,
                jitter_ms,
            } => {
                out.push(3);
                for v in [loss_pct, rtt_ms, jitter_ms] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Control::ReattachAck {
                state_version,
                owner_epoch,
                transport_id,
            } => {
                out.push(4);
                put_version_epoch(out, *state_version, *owner_epoch);
                out.extend_from_slice(&transport_id.get().to_be_bytes());
            }
            Control::ReattachReject {
                reason,
                retryable,
                state_version,
                owner_epoch,
                owner_hint,
            } => {
                out.push(5);
                out.extend_from_slice(&reason_id(*reason).to_be_bytes());
                out.push(u8::from(*retryable));
                put_version_epoch(out, *state_version, *owner_epoch);
                out.push(u8::from(owner_hint.is_some()));
                if let Some(addr) = owner_hint {
                    put_socket_addr(out, *addr);
                }
            }
            Control::Redirect {
                state_version,
                owner_epoch,
                to,
            } => {
                out.push(6);
                put_version_epoch(out, *state_version, *owner_epoch);
                put_socket_addr(out, *to);
            }
            Control::ReattachHint {
                state_version,
                owner_epoch,
            } => {
                out.push(7);
                put_version_epoch(out, *state_version, *owner_epoch);
            }
            Control::Terminate { reason } => {
                out.push(8);
                out.extend_from_slice(&reason_id(*reason).to_be_bytes());
            }
        }
    }
}

impl HandshakeAckPayload {
    /// Decodes the payload (after the Noise handshake opened it).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let payload = Self {
            session: r.session()?,
            state_version: StateVersion(r.u64()?),
            owner_epoch: OwnerEpoch(r.u64()?),
            tunnel_ip: r.ip()?,
            transport_id: TransportId(r.u64()?),
            keepalive_interval_ms: r.u32()?,
            client_dead_after_ms: r.u32()?,
            session_ttl_ms: r.u64()?,
        };
        r.finish()?;
        Ok(payload)
    }

    /// Appends the payload's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session.to_bytes());
        put_version_epoch(out, self.state_version, self.owner_epoch);
        put_ip(out, self.tunnel_ip);
        out.extend_from_slice(&self.transport_id.get().to_be_bytes());
        out.extend_from_slice(&self.keepalive_interval_ms.to_be_bytes());
        out.extend_from_slice(&self.client_dead_after_ms.to_be_bytes());
        out.extend_from_slice(&self.session_ttl_ms.to_be_bytes());
    }
}

/// A reason code's wire number: its position in [`ReasonCode::ALL`], which only ever grows at
/// the end (codes are never renamed or removed, SPEC §10).
pub fn reason_id(reason: ReasonCode) -> u16 {
    let index = ReasonCode::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(0);
    u16::try_from(index).unwrap_or(0)
}

fn reason_from_id(id: u16) -> Option<ReasonCode> {
    ReasonCode::ALL.get(usize::from(id)).copied()
}

const fn proto_byte(proto: Proto) -> u8 {
    match proto {
        Proto::Udp => 1,
        Proto::Tcp => 2,
    }
}

fn put_version_epoch(out: &mut Vec<u8>, version: StateVersion, epoch: OwnerEpoch) {
    out.extend_from_slice(&version.get().to_be_bytes());
    out.extend_from_slice(&epoch.get().to_be_bytes());
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn put_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    put_ip(out, addr.ip());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A cursor over peer-controlled bytes: every read is checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn session(&mut self) -> Result<SessionId, DecodeError> {
        Ok(SessionId::from_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidField("flag")),
        }
    }

    fn proto(&mut self) -> Result<Proto, DecodeError> {
        match self.u8()? {
            1 => Ok(Proto::Udp),
            2 => Ok(Proto::Tcp),
            _ => Err(DecodeError::InvalidField("proto")),
        }
    }

    fn reason(&mut self) -> Result<ReasonCode, DecodeError> {
        let id = u16::from_be_bytes(self.array()?);
        reason_from_id(id).ok_or(DecodeError::InvalidField("reason code"))
    }

    fn ip(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(DecodeError::InvalidField("address family")),
        }
    }

    fn socket_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = self.ip()?;
        Ok(SocketAddr::new(ip, u16::from_be_bytes(self.array()?)))
    }

    fn rest_nonempty(&mut self) -> Result<&'a [u8], DecodeError> {
        let rest = std::mem::take(&mut self.rest);
        if rest.is_empty() {
            return Err(DecodeError::Truncated);
        }
        Ok(rest)
    }

    fn sealed(&mut self) -> Result<&'a [u8], DecodeError> {
        let rest = std::mem::take(&mut self.rest);
        if rest.len() < TAG_LEN {
            return Err(DecodeError::Truncated);
        }
        Ok(rest)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TooLong)
        }
    }
}

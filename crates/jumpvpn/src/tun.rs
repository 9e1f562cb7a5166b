//! The TUN device: where the tunnel's IP packets enter and leave the operating system.
//!
//! [`open`] creates a layer-3 TUN device without packet information, gives it its tunnel
//! address and MTU, and brings it up, in the network namespace the process runs in — gateway
//! and client processes of the tests and the demo are started under `ip netns exec`, so their
//! device lands in their namespace. The device disappears when the returned value is dropped.
//!
//! The device is opened with the kernel's segmentation offloads (a virtio-net header before
//! each packet, TCP segmentation and checksums left to us): a read may be a TCP super-packet
//! of up to 64 KiB, and a write may be one. Read and write it only through
//! [`crate::datapath::TunReader`] and [`crate::datapath::TunWriter`], which split and coalesce.
//! Where the kernel refuses the offloads the device is opened without them, and the same
//! calls move one packet at a time.

use std::io;
use std::net::IpAddr;

use anyhow::{bail, Context};

/// The tunnel MTU used unless configured otherwise: 1420, WireGuard's choice for the same
/// reason. A tunnelled packet of this size becomes, on the outer path:
///
/// ```text
///   inner IP packet                      1420
/// + DATA header (2 + 16 + 8 + 8)           34
/// + AEAD tag                               16
/// + length prefix (TCP transport only)      2
/// + outer IPv4 + UDP headers               28   (IPv4 + TCP: 40, IPv6 + UDP: 48)
/// = 1500 for IPv4/UDP with 2 bytes to spare
/// ```
///
/// so it fits an ordinary 1500-byte Ethernet path without fragmentation. Over IPv6 or TCP
/// the outer packet can exceed 1500 by a few bytes; the kernel fragments or segments it, which
/// costs throughput, not correctness.
pub const DEFAULT_MTU: u16 = 1420;

/// Creates the TUN device `name` with `address/prefix_len`, the given MTU, and the link up.
///
/// Must be called inside a tokio runtime (the device is registered with its reactor). Needs
/// `CAP_NET_ADMIN` (root, in practice); without it the error says so. Fails if an interface
/// of that name already exists.
pub fn open(
    name: &str,
    address: IpAddr,
    prefix_len: u8,
    mtu: u16,
) -> anyhow::Result<tun_rs::AsyncDevice> {
    let max_prefix = if address.is_ipv4() { 32 } else { 128 };
    if prefix_len > max_prefix {
        bail!("TUN device {name}: prefix length {prefix_len} out of range for {address}");
    }
    if mtu < 576 {
        bail!("TUN device {name}: MTU {mtu} is below the IPv4 minimum of 576");
    }
    let build = |offload: bool| {
        let builder = tun_rs::DeviceBuilder::new()
            .name(name)
            .packet_information(false)
            .offload(offload)
            .mtu(mtu)
            .enable(true);
        let builder = match address {
            IpAddr::V4(v4) => builder.ipv4(v4, prefix_len, None),
            IpAddr::V6(v6) => builder.ipv6(v6, prefix_len),
        };
        builder.build_async()
    };
    let device = build(true).or_else(|e| {
        tracing::debug!("TUN device {name}: no segmentation offload ({e}); without it");
        build(false)
    });
    let device = device.map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::PermissionDenied => {
                " (creating a TUN device needs CAP_NET_ADMIN: run as root)"
            }
            io::ErrorKind::NotFound => " (is /dev/net/tun present? load the tun module)",
            io::ErrorKind::ResourceBusy => " (an interface of that name already exists)",
            _ => "",
        };
        anyhow::Error::new(e).context(format!(
            "cannot create TUN device {name} with {address}/{prefix_len}, MTU {mtu}{hint}"
        ))
    })?;
    // The kernel may pick another name if the one asked for is a pattern; refuse a surprise.
    let actual = device
        .name()
        .with_context(|| format!("TUN device {name}: cannot read its name back"))?;
    if actual != name {
        bail!("TUN device {name}: the kernel named it {actual}");
    }
    Ok(device)
}

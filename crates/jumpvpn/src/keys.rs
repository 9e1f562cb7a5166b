//! `jumpvpn genkey` and `jumpvpn pubkey`: X25519 static keys in WireGuard's format — 32 bytes,
//! standard base64 (44 characters) — so keys can be made and checked with the same habits as
//! `wg genkey` and `wg pubkey`.
//!
//! Private key material lives only in buffers that are zeroed when dropped, and never appears
//! in an error message.

use std::io::{Read, Write};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::Status;

/// Prints a new private key.
pub fn genkey() -> anyhow::Result<Status> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    clamp(&mut key);
    let text = Zeroizing::new(BASE64.encode(key.as_ref()));
    print_line(&text)
}

/// A new key pair, both halves in base64 (private first).
pub fn new_pair() -> anyhow::Result<(Zeroizing<String>, String)> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    clamp(&mut key);
    let public = PublicKey::from(&StaticSecret::from(*key));
    Ok((
        Zeroizing::new(BASE64.encode(key.as_ref())),
        BASE64.encode(public.as_bytes()),
    ))
}

/// Reads a private key on standard input and prints its public key.
pub fn pubkey() -> anyhow::Result<Status> {
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("cannot read a private key on standard input")?;
    let secret = StaticSecret::from(*parse_private_key(input.trim())?);
    let public = PublicKey::from(&secret);
    print_line(&BASE64.encode(public.as_bytes()))
}

/// Decodes a private key as written by `genkey`. The error never echoes the input.
pub fn parse_private_key(text: &str) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let bytes = Zeroizing::new(BASE64.decode(text).ok().unwrap_or_default());
    let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!("invalid private key: expected 32 bytes in base64 (44 characters), as `jumpvpn genkey` prints");
    };
    Ok(Zeroizing::new(key))
}

/// X25519 clamping (RFC 7748 §5), done at generation as WireGuard does, so the stored key is the
/// scalar actually used.
fn clamp(key: &mut [u8; 32]) {
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
}

fn print_line(text: &str) -> anyhow::Result<Status> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").context("cannot write to standard output")?;
    Ok(Status::Success)
}

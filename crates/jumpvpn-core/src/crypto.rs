//! The cryptographic binding of SPEC §5, without I/O or randomness (keys come in as bytes).
//!
//! - **Proof of possession**: a BLAKE2s MAC keyed by the session's master secret over the
//!   session, nonce, known version and candidate transport of a `REATTACH_REQUEST`, compared in
//!   constant time.
//! - **Traffic keys per binding**: derived from (master secret, session, `state_version`,
//!   `owner_epoch`), one key per direction. A packet sealed under a replaced binding, or by a
//!   former owner (older epoch), does not open under the current keys: the data plane is fenced
//!   cryptographically, not only by bookkeeping. Counters restart at 0 with each key pair, so no
//!   counter is ever stored.
//! - **Control keys**: derived from (master secret, session), one per direction, so control
//!   messages (`REDIRECT`, `TERMINATE`, …) stay authenticated across bindings.
//! - **Sealing**: ChaCha20-Poly1305, the nonce being the 64-bit packet counter (little-endian,
//!   after four zero bytes), the packet header as associated data. The cipher is `ring`'s
//!   (assembly, about three times faster per packet than a portable implementation on the
//!   machines we measured: it is most of the data path's CPU time).
//!
//! Every derivation is a MAC under the master secret with its own label, so no two purposes
//! ever share a key. Secret bytes are zeroed when dropped and never shown by `Debug`.

use std::fmt;

use blake2::digest::Mac;
use blake2::Blake2sMac256;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::ids::{OwnerEpoch, SessionId, StateVersion};
use crate::machine::ProofVerdict;
use crate::record::{Proto, SealedSecret};
use crate::wire::{ReattachRequest, PROOF_LEN, TAG_LEN};

const PROOF_LABEL: &[u8] = b"jumpvpn v1 reattach proof";
const BINDING_LABEL: &[u8] = b"jumpvpn v1 binding key";
const CONTROL_LABEL: &[u8] = b"jumpvpn v1 control key";
const TO_GATEWAY: &[u8] = b"client to gateway";
const TO_CLIENT: &[u8] = b"gateway to client";
const KEK_LABEL: &[u8] = b"jumpvpn v1 key-encryption key";
const SEAL_LABEL: &[u8] = b"jumpvpn v1 sealed master secret";

/// A session's master secret: the root of its proofs and keys. Never stored in clear (the
/// record keeps it sealed), never logged.
pub struct MasterSecret([u8; 32]);

impl MasterSecret {
    /// Wraps 32 secret bytes (from the handshake).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The proof a client sends with a reattach.
    pub fn proof(
        &self,
        session: SessionId,
        nonce: u64,
        known_version: StateVersion,
        proto: Proto,
    ) -> [u8; PROOF_LEN] {
        let proto = [match proto {
            Proto::Udp => 1u8,
            Proto::Tcp => 2,
        }];
        self.mac(
            PROOF_LABEL,
            &[
                &session.to_bytes(),
                &nonce.to_be_bytes(),
                &known_version.get().to_be_bytes(),
                &proto,
            ],
        )
    }

    /// Checks a reattach's proof, in constant time.
    pub fn verify(&self, request: &ReattachRequest) -> ProofVerdict {
        let expected = Zeroizing::new(self.proof(
            request.session,
            request.nonce,
            request.known_version,
            request.proto,
        ));
        if bool::from(expected.as_slice().ct_eq(&request.proof)) {
            ProofVerdict::Valid
        } else {
            ProofVerdict::Invalid
        }
    }

    /// The traffic keys of the binding made at `version` under `epoch`.
    pub fn binding_keys(
        &self,
        session: SessionId,
        version: StateVersion,
        epoch: OwnerEpoch,
    ) -> DirectionalKeys {
        let context: [&[u8]; 3] = [
            &session.to_bytes(),
            &version.get().to_be_bytes(),
            &epoch.get().to_be_bytes(),
        ];
        self.directional(BINDING_LABEL, &context)
    }

    /// The session's control keys.
    pub fn control_keys(&self, session: SessionId) -> DirectionalKeys {
        self.directional(CONTROL_LABEL, &[&session.to_bytes()])
    }

    fn directional(&self, label: &[u8], context: &[&[u8]]) -> DirectionalKeys {
        let key = |direction: &[u8]| {
            let mut parts: Vec<&[u8]> = context.to_vec();
            parts.push(direction);
            AeadKey::new(Zeroizing::new(self.mac(label, &parts)))
        };
        DirectionalKeys {
            to_gateway: key(TO_GATEWAY),
            to_client: key(TO_CLIENT),
        }
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        // BLAKE2s accepts keys of 1 to 32 bytes: a 32-byte key is always valid.
        let Ok(mut mac) = <Blake2sMac256 as Mac>::new_from_slice(&self.0) else {
            unreachable!("a 32-byte key is valid for BLAKE2s")
        };
        Mac::update(&mut mac, label);
        for part in parts {
            // Length-prefixed, so that no two different lists of parts feed the same bytes.
            Mac::update(&mut mac, &(part.len() as u64).to_be_bytes());
            Mac::update(&mut mac, part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl Drop for MasterSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The key-encryption key that seals master secrets at rest (SPEC §5). Each session's secret is
/// sealed under its own subkey (derived from the session ID), so the single seal of each
/// session never shares a (key, nonce) pair with another.
pub struct Kek(MasterSecret);

impl Kek {
    /// The key-encryption key of a gateway, derived from its configured private key, so that
    /// every node of a cluster (which shares one gateway identity) can open what another sealed.
    pub fn derive(gateway_private: &[u8; 32]) -> Self {
        Self(MasterSecret(
            MasterSecret(*gateway_private).mac(KEK_LABEL, &[]),
        ))
    }

    /// Seals a session's master secret for the store.
    pub fn seal(&self, session: SessionId, master: &MasterSecret) -> SealedSecret {
        let mut out = Vec::with_capacity(32 + TAG_LEN);
        self.subkey(session)
            .seal(0, &session.to_bytes(), &master.0, &mut out);
        SealedSecret::new(out)
    }

    /// Opens what [`Kek::seal`] sealed for the same session.
    pub fn open(
        &self,
        session: SessionId,
        sealed: &SealedSecret,
    ) -> Result<MasterSecret, OpenError> {
        let plain = Zeroizing::new(
            self.subkey(session)
                .open(0, &session.to_bytes(), &sealed.0)?,
        );
        let bytes: [u8; 32] = plain.as_slice().try_into().map_err(|_| OpenError)?;
        Ok(MasterSecret(bytes))
    }

    fn subkey(&self, session: SessionId) -> AeadKey {
        AeadKey::new(Zeroizing::new(
            self.0.mac(SEAL_LABEL, &[&session.to_bytes()]),
        ))
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(<redacted>)")
    }
}

/// One key per direction.
#[derive(Debug)]
pub struct DirectionalKeys {
    /// Seals what the client sends.
    pub to_gateway: AeadKey,
    /// Seals what the gateway sends.
    pub to_client: AeadKey,
}

/// A packet did not authenticate (wrong key, tampered, or wrong header or counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenError;

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("packet did not authenticate")
    }
}

impl std::error::Error for OpenError {}

/// A ChaCha20-Poly1305 key, zeroized on drop. Its `Debug` shows nothing of it.
///
/// Only the 32 bytes are kept: ring's key object is built for each use (for ChaCha20 that is a
/// copy of the key), because it is sized for any of ring's AEADs (over 500 bytes, four per
/// session) and is not zeroized when dropped.
pub struct AeadKey {
    key: Zeroizing<[u8; 32]>,
}

impl AeadKey {
    fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self { key }
    }

    // `LessSafeKey` leaves nonce uniqueness to the caller: every nonce here is a counter that
    // never repeats under one key (a fresh key per binding, counters from 0).
    fn ring_key(&self) -> LessSafeKey {
        let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, self.key.as_slice()) else {
            unreachable!("a 32-byte key is valid for ChaCha20-Poly1305")
        };
        LessSafeKey::new(unbound)
    }

    /// Appends `plaintext` sealed under `counter` (which must never repeat under this key) and
    /// authenticated together with `aad`, then its tag, to `out`.
    pub fn seal(&self, counter: u64, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(plaintext);
        let Some(body) = out.get_mut(start..) else {
            return;
        };
        // Encryption fails only for messages longer than ChaCha20's 256 GiB limit, far beyond
        // a packet. Should it fail, the body is zeroed and the tag left zero: the packet then
        // fails to open and leaks nothing.
        match self
            .ring_key()
            .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), body)
        {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(_) => {
                body.fill(0);
                out.extend_from_slice(&[0; TAG_LEN]);
            }
        }
    }

    /// Opens what [`AeadKey::seal`] produced.
    pub fn open(&self, counter: u64, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let mut plaintext = Vec::with_capacity(sealed.len());
        self.open_into(counter, aad, sealed, &mut plaintext)?;
        Ok(plaintext)
    }

    /// Opens what [`AeadKey::seal`] produced and appends the plaintext to `out` (decrypted in
    /// place there: one copy, no allocation when `out` has room). On failure `out` is left as
    /// it was.
    pub fn open_into(
        &self,
        counter: u64,
        aad: &[u8],
        sealed: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), OpenError> {
        let split = sealed.len().checked_sub(TAG_LEN).ok_or(OpenError)?;
        let (ciphertext, tag) = sealed.split_at(split);
        let tag = Tag::try_from(tag).map_err(|_| OpenError)?;
        let start = out.len();
        out.extend_from_slice(ciphertext);
        let opened = match out.get_mut(start..) {
            Some(body) => self
                .ring_key()
                .open_in_place_separate_tag(nonce(counter), Aad::from(aad), tag, body, 0..)
                .is_ok(),
            None => false,
        };
        if !opened {
            // What a failed open left there is unspecified: none of it is kept.
            out.truncate(start);
            return Err(OpenError);
        }
        Ok(())
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey(<redacted>)")
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

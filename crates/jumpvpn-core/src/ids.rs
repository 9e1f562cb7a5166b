//! Newtypes for the identifiers and counters of the protocol, so that the compiler keeps a
//! version from being used as an epoch, or a transport ID as a session ID.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A session's identity: 128 random bits, printed as 32 lowercase hex characters. Never changes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u128);

impl SessionId {
    /// Wraps 128 bits. The caller supplies the randomness (the core has no random generator).
    pub const fn from_u128(bits: u128) -> Self {
        Self(bits)
    }

    /// Builds an ID from 16 random bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }

    /// The 128 bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// The 16 bytes, big-endian (the order in which the hex form is printed).
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Why a string is not a session ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSessionIdError {
    input: String,
}

impl fmt::Display for ParseSessionIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid session id {:?}: expected 32 lowercase hex characters",
            self.input
        )
    }
}

impl std::error::Error for ParseSessionIdError {}

impl FromStr for SessionId {
    type Err = ParseSessionIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            // Keep the echoed input short: it may come from the network.
            let input: String = s.chars().take(40).collect();
            return Err(ParseSessionIdError { input });
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| ParseSessionIdError {
                input: s.to_owned(),
            })
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// The next value, or `None` when the counter would overflow.
            pub const fn next(self) -> Option<Self> {
                match self.0.checked_add(1) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

counter!(
    /// The session record's version: 0 in BIRTH, +1 on every accepted mutation, never reused.
    StateVersion
);
counter!(
    /// The ownership fencing token: +1 on every change of owner, never on other mutations.
    OwnerEpoch
);
counter!(
    /// A server-assigned identifier of one transport binding.
    TransportId
);

/// A point in time: milliseconds since the Unix epoch. Supplied by the caller; the core never
/// reads a clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + ms`, saturating at the end of time rather than wrapping.
    pub const fn plus(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, or 0 if `earlier` is later.
    pub const fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A gateway node's identifier, as written in its configuration (`node_id = "gw1"`).
///
/// Shared rather than copied: records and audit events clone it on every transition.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(std::sync::Arc<str>);

impl NodeId {
    /// Wraps a node name.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(std::sync::Arc::from(name.as_ref()))
    }

    /// The node's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_round_trips_through_its_hex_form() {
        let id = SessionId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<SessionId>(), Ok(id));
        assert_eq!(SessionId::from_bytes(id.to_bytes()), id);
    }

    #[test]
    fn session_id_rejects_uppercase_short_and_signed_forms() {
        for bad in [
            "0123456789ABCDEF0011223344556677",
            "abc",
            "+123456789abcdef0011223344556677",
            "",
        ] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn counters_refuse_to_overflow() {
        assert_eq!(StateVersion(u64::MAX).next(), None);
        assert_eq!(OwnerEpoch(1).next(), Some(OwnerEpoch(2)));
    }
}

//! How a record is written to a store: JSON, so that an operator can read it with the store's
//! own tools (`etcdctl get`). Decoding errors name the key.

use jumpvpn_core::SessionRecord;

use crate::StoreError;

/// Encodes a record.
pub fn encode(record: &SessionRecord) -> Vec<u8> {
    // A record is plain data with string keys: serialising it cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a record stored under `key`.
pub fn decode(key: &str, bytes: &[u8]) -> Result<SessionRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

//! API keys: created, listed, revoked and looked up in the `shoal-keys` KV bucket.
//!
//! A key is a secret (`shoal_<32 hex>`) shown once, at creation; the bucket holds only its
//! SHA-256 (the KV key) and an [`ApiKeyRecord`]: a public id (the first 12 hex digits of the
//! hash), a name, and the endpoints it may use (none listed: all). Every gateway checks each
//! request against the bucket, so a revoked key stops working at once on all of them.

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shoal_actors::clock::now_ms;
use shoal_actors::nats::Nats;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::ids::validate_id;
pub use shoal_protocol::keys::ApiKeyRecord;

/// The prefix of generated keys, so they are recognisable in logs and secret scanners.
pub const KEY_PREFIX: &str = "shoal_";
/// Hex digits of the hash that make a key's public id.
const ID_LEN: usize = 12;
/// Shortest secret accepted from a user (`shoal dev --api-key`).
pub const MIN_SECRET_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key: {0}")]
    Invalid(String),
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    #[error("key record {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
}

/// A key just created: the secret (shown this once) and its record.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub secret: String,
    pub record: ApiKeyRecord,
}

/// Hex SHA-256 of a secret: its KV key.
pub fn hash_key(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random secret: `shoal_` and 128 random bits (122 of them random) in hex.
pub fn generate_secret() -> String {
    format!("{KEY_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

/// Creates a key with a generated secret.
pub async fn create(nats: &Nats, name: &str, endpoints: &[String]) -> Result<CreatedKey, KeyError> {
    create_with_secret(nats, name, endpoints, &generate_secret()).await
}

/// Stores `secret` as a key (for `shoal dev --api-key`). Idempotent: an existing key with the
/// same secret is returned unchanged.
pub async fn create_with_secret(
    nats: &Nats,
    name: &str,
    endpoints: &[String],
    secret: &str,
) -> Result<CreatedKey, KeyError> {
    if secret.len() < MIN_SECRET_LEN || secret.chars().any(char::is_whitespace) {
        return Err(KeyError::Invalid(format!(
            "an API key needs at least {MIN_SECRET_LEN} characters and no whitespace"
        )));
    }
    for e in endpoints {
        validate_id("endpoint id", e).map_err(|e| KeyError::Invalid(e.message))?;
    }
    let key_hash = hash_key(secret);
    let record = ApiKeyRecord {
        id: key_hash[..ID_LEN].to_string(),
        name: name.to_string(),
        key_hash: key_hash.clone(),
        endpoints: endpoints.to_vec(),
        created_at_ms: now_ms(),
    };
    let bytes = to_msgpack(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
    let kv_key = nats.names.api_key_key(&key_hash);
    match nats.keys.create(&kv_key, Bytes::from(bytes)).await {
        Ok(_) => Ok(CreatedKey { secret: secret.to_string(), record }),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            let existing = lookup(nats, secret).await?.ok_or_else(|| KeyError::Unavailable("key vanished".into()))?;
            Ok(CreatedKey { secret: secret.to_string(), record: existing })
        }
        Err(e) => Err(KeyError::Unavailable(e.to_string())),
    }
}

/// The record of a secret, if it is a (not revoked) key.
pub async fn lookup(nats: &Nats, secret: &str) -> Result<Option<ApiKeyRecord>, KeyError> {
    let key_hash = hash_key(secret);
    let entry =
        nats.keys.get(nats.names.api_key_key(&key_hash)).await.map_err(|e| KeyError::Unavailable(e.to_string()))?;
    entry
        .map(|bytes| {
            from_msgpack(&bytes)
                .map_err(|e| KeyError::Corrupt { id: key_hash[..ID_LEN].to_string(), reason: e.to_string() })
        })
        .transpose()
}

/// Every key, oldest first.
pub async fn list(nats: &Nats) -> Result<Vec<ApiKeyRecord>, KeyError> {
    let mut keys = nats.keys.keys().await.map_err(|e| KeyError::Unavailable(e.to_string()))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| KeyError::Unavailable(e.to_string()))?;
        if let Some(bytes) = nats.keys.get(&key).await.map_err(|e| KeyError::Unavailable(e.to_string()))? {
            match from_msgpack::<ApiKeyRecord>(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(key = %key, error = %e, "corrupt API key record skipped"),
            }
        }
    }
    out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(out)
}

/// Revokes the key with this public id; `false` if there is none.
pub async fn revoke(nats: &Nats, id: &str) -> Result<bool, KeyError> {
    if id.len() < ID_LEN || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(KeyError::Invalid(format!("{id:?} is not a key id ({ID_LEN} hex digits, as `keys list` shows)")));
    }
    let id = id.to_ascii_lowercase();
    let mut keys = nats.keys.keys().await.map_err(|e| KeyError::Unavailable(e.to_string()))?;
    let mut found = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| KeyError::Unavailable(e.to_string()))?;
        if key.starts_with(&id) {
            found.push(key);
        }
    }
    for key in &found {
        nats.keys.purge(key).await.map_err(|e| KeyError::Unavailable(e.to_string()))?;
    }
    Ok(!found.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_hex_sha256_and_secrets_are_prefixed_and_distinct() {
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let (a, b) = (generate_secret(), generate_secret());
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 32, "{a}");
        assert_ne!(a, b);
    }
}

//! API keys of the HTTP gateway, as stored in the `shoal-keys` KV (key: the hex SHA-256 of the
//! secret; the secret itself is never stored).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// A short public id, to list and revoke the key by.
    pub id: String,
    /// A label for people (`ci`, `alice`).
    #[serde(default)]
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub key_hash: String,
    /// The endpoints the key may use; empty = all.
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub created_at_ms: u64,
}

impl ApiKeyRecord {
    /// Whether this key may use `endpoint`.
    pub fn allows(&self, endpoint: &str) -> bool {
        self.endpoints.is_empty() || self.endpoints.iter().any(|e| e == endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unscoped_key_allows_every_endpoint_and_a_scoped_one_only_its_own() {
        let mut k = ApiKeyRecord {
            id: "k1".into(),
            name: "ci".into(),
            key_hash: "00".into(),
            endpoints: vec![],
            created_at_ms: 0,
        };
        assert!(k.allows("any"));
        k.endpoints = vec!["a".into(), "b".into()];
        assert!(k.allows("b"));
        assert!(!k.allows("c"));
    }
}

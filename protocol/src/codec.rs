//! The codec: MessagePack with named fields by default, JSON for clients that ask for it.
//!
//! A request's `Content-Type` header selects the encoding (`application/json` → JSON, anything
//! else → MessagePack); the reply uses the same encoding, so a plain NATS client can speak JSON.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::ApiError;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    MsgPack,
    Json,
}

impl Encoding {
    /// Picks the encoding from a `Content-Type` header value (parameters are ignored).
    pub fn from_content_type(value: Option<&str>) -> Encoding {
        match value.map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            Some(v) if v == JSON || v == "json" || v == "text/json" => Encoding::Json,
            _ => Encoding::MsgPack,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::MsgPack => MSGPACK,
            Encoding::Json => JSON,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid MessagePack: {0}")]
    MsgPackDecode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode MessagePack: {0}")]
    MsgPackEncode(#[from] rmp_serde::encode::Error),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::MsgPackEncode(_) => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(format!(
                "{e} (send MessagePack with named fields, or JSON with the header Content-Type: application/json)"
            )),
        }
    }
}

pub fn encode<T: Serialize + ?Sized>(encoding: Encoding, value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(match encoding {
        Encoding::MsgPack => rmp_serde::to_vec_named(value)?,
        Encoding::Json => serde_json::to_vec(value)?,
    })
}

pub fn decode<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, CodecError> {
    Ok(match encoding {
        Encoding::MsgPack => rmp_serde::from_slice(bytes)?,
        Encoding::Json => serde_json::from_slice(bytes)?,
    })
}

/// MessagePack with named fields: the encoding of everything shoal stores and publishes.
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode(Encoding::MsgPack, value)
}

pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(Encoding::MsgPack, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_selects_json_with_parameters() {
        assert_eq!(Encoding::from_content_type(Some("application/json; charset=utf-8")), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("Application/JSON")), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("application/msgpack")), Encoding::MsgPack);
        assert_eq!(Encoding::from_content_type(None), Encoding::MsgPack);
    }

    #[test]
    fn malformed_input_is_a_bad_request_naming_both_encodings() {
        let err: ApiError =
            decode::<serde_json::Value>(Encoding::MsgPack, &[0xc1]).expect_err("0xc1 is never valid").into();
        assert_eq!(err.code, crate::ErrorCode::BadRequest);
        assert!(err.message.contains("application/json"), "{}", err.message);
        let err: ApiError = decode::<serde_json::Value>(Encoding::Json, b"{").expect_err("bad json").into();
        assert_eq!(err.code, crate::ErrorCode::BadRequest);
    }
}

//! MessagePack (named fields) and JSON encoding of the wire types.

use serde::{de::DeserializeOwned, Serialize};

/// A message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// MessagePack encoding failed.
    #[error("msgpack encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// MessagePack decoding failed.
    #[error("msgpack decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// JSON encoding or decoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes a stream message as MessagePack with named fields.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a stream message from MessagePack.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// The body encoding of an API request; the reply uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`, the default.
    Json,
    /// `application/msgpack`.
    MsgPack,
}

impl Encoding {
    /// The encoding named by a `Content-Type` header value (JSON when absent or unknown).
    pub fn from_content_type(value: Option<&str>) -> Self {
        match value.map(|v| v.trim().to_ascii_lowercase()) {
            Some(v)
                if v.starts_with("application/msgpack")
                    || v.starts_with("application/x-msgpack") =>
            {
                Self::MsgPack
            }
            _ => Self::Json,
        }
    }

    /// The `Content-Type` header value.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::MsgPack => "application/msgpack",
        }
    }

    /// Encodes a value in this encoding.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            Self::Json => Ok(serde_json::to_vec(value)?),
            Self::MsgPack => encode(value),
        }
    }

    /// Decodes a value in this encoding.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            Self::Json => Ok(serde_json::from_slice(bytes)?),
            Self::MsgPack => decode(bytes),
        }
    }
}

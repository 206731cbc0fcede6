//! Events other systems publish on `<prefix>.event.*`: a user logged in, an order was
//! cancelled. They arrive as JSON or MessagePack; a `Content-Type` header decides, and
//! without one the first byte does (`{` is JSON).

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{CodecError, Encoding};

/// `<prefix>.event.user.login`: issue the user's lazy coupons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserLogin {
    /// The user (`membership_account.id`).
    pub user_id: i64,
}

/// `<prefix>.event.order.canceled`: the order's coupon item is unused again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCanceled {
    /// The cancelled order.
    pub order_id: i64,
    /// Its user.
    pub user_id: i64,
    /// The coupon item the order used.
    pub coupon_item_id: i64,
}

/// The encoding of an event: the `Content-Type` when given, else sniffed from the payload.
pub fn event_encoding(content_type: Option<&str>, payload: &[u8]) -> Encoding {
    if content_type.is_some() {
        return Encoding::from_content_type(content_type);
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Encoding::Json,
        _ => Encoding::MsgPack,
    }
}

/// Decodes an event in either encoding.
pub fn decode_event<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
) -> Result<T, CodecError> {
    event_encoding(content_type, payload).decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_json_and_msgpack_without_header() {
        let a: UserLogin = decode_event(None, br#" {"user_id":7}"#).unwrap();
        assert_eq!(a.user_id, 7);
        let bytes = crate::encode(&UserLogin { user_id: 9 }).unwrap();
        let b: UserLogin = decode_event(None, &bytes).unwrap();
        assert_eq!(b.user_id, 9);
        let c: UserLogin = decode_event(None, br#"{"user_id":7,"account":{"name":"x"}}"#).unwrap();
        assert_eq!(c.user_id, 7);
        assert!(decode_event::<UserLogin>(None, b"{\"user\":7}").is_err());
        assert!(decode_event::<UserLogin>(None, b"garbage").is_err());
    }
}

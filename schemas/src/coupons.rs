//! Coupon API bodies: `<prefix>.api.coupon.create`, `.claim` and `.status`.
//!
//! A coupon reaches users in one of three ways ([`CouponDelivery`]): lazily, when each user
//! logs in; eagerly, through the sharded pipeline with a coupon-issuing final stage; or by a
//! push to a segment, after which the users claim it themselves.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    api::{check_text, MAX_CREATED_BY_CHARS, MAX_NAME_CHARS},
    ApiError, InformType, SegmentFilter,
};

/// Largest `rule` object, in bytes of JSON.
pub const MAX_RULE_BYTES: usize = 4096;

/// How a coupon reaches its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponDelivery {
    /// Every user, issued when the user logs in.
    #[default]
    Lazy,
    /// Every user, issued now by the pipeline.
    Eager,
    /// Pushed to a segment; its users claim it with `coupon.claim`.
    Segment,
}

impl CouponDelivery {
    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lazy => "lazy",
            Self::Eager => "eager",
            Self::Segment => "segment",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Lazy, Self::Eager, Self::Segment]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// `<prefix>.api.coupon.create` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCouponRequest {
    /// Operator-facing name.
    pub name: String,
    /// Who created it.
    pub created_by: String,
    /// Coupon type (the shop's own code: cash, discount, ...).
    pub coupon_type: i32,
    /// The rule as a JSON object (amount, threshold, ...); herald stores it as given.
    pub rule: serde_json::Value,
    /// Start of the validity window (RFC 3339).
    pub starts_at: DateTime<Utc>,
    /// End of the validity window; must be after `starts_at` and in the future.
    pub ends_at: DateTime<Utc>,
    /// Channel of the segment push: sms, email, app or inbox.
    pub inform_type: InformType,
    /// Stock limit; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// How it reaches users; `lazy` when absent.
    #[serde(default)]
    pub delivery: CouponDelivery,
    /// The segment, for `"delivery":"segment"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<SegmentFilter>,
}

impl CreateCouponRequest {
    /// Checks what the types cannot, against the current time `now`.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), ApiError> {
        check_text("name", &self.name, MAX_NAME_CHARS)?;
        check_text("created_by", &self.created_by, MAX_CREATED_BY_CHARS)?;
        if !self.rule.is_object() {
            return Err(ApiError::invalid("rule: must be a JSON object"));
        }
        let rule_len = self.rule.to_string().len();
        if rule_len > MAX_RULE_BYTES {
            return Err(ApiError::invalid(format!(
                "rule: too large ({rule_len} bytes, at most {MAX_RULE_BYTES})"
            )));
        }
        if self.ends_at <= self.starts_at {
            return Err(ApiError::invalid("ends_at: must be after starts_at"));
        }
        if self.ends_at <= now {
            return Err(ApiError::invalid("ends_at: must be in the future"));
        }
        if let Some(t) = self.total {
            if t < 1 {
                return Err(ApiError::invalid("total: must be at least 1 when given"));
            }
        }
        match (self.delivery, &self.segment) {
            (CouponDelivery::Segment, None) => {
                return Err(ApiError::invalid(
                    "segment: missing field (required when delivery is segment)",
                ))
            }
            (CouponDelivery::Segment, Some(f)) => {
                if f.member_levels.as_ref().is_some_and(|l| l.is_empty()) {
                    return Err(ApiError::invalid(
                        "segment.member_levels: must not be empty when given",
                    ));
                }
            }
            (d, Some(_)) => {
                return Err(ApiError::invalid(format!(
                    "segment: only allowed when delivery is segment, not {}",
                    d.as_str()
                )))
            }
            (_, None) => {}
        }
        Ok(())
    }

    /// The key under which a repeat of this request is recognised.
    pub fn dedupe_key(&self) -> String {
        format!(
            "coupon\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.name,
            self.created_by,
            self.delivery.as_str(),
            self.starts_at.timestamp_millis(),
            self.ends_at.timestamp_millis()
        )
    }
}

/// Reply to a coupon create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCouponReply {
    /// Always true.
    pub ok: bool,
    /// The coupon's id (`sales_promotion_coupon.id`).
    pub coupon_id: i64,
    /// The campaign that issues it (eager) or pushes it (segment); none for lazy coupons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<i64>,
    /// True when this repeats an earlier request, which was not created again.
    pub duplicate: bool,
}

/// `<prefix>.api.coupon.claim` request: a user claims a segment coupon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimCouponRequest {
    /// The coupon.
    pub coupon_id: i64,
    /// The user claiming it.
    pub user_id: i64,
}

/// Reply to a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimCouponReply {
    /// Always true.
    pub ok: bool,
    /// The user's coupon item (`sales_promotion_coupon_item.id`).
    pub coupon_item_id: i64,
    /// True when the user already held it; nothing new was issued.
    pub duplicate: bool,
}

/// `<prefix>.api.coupon.status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponStatusRequest {
    /// The coupon.
    pub coupon_id: i64,
}

/// Reply to a coupon status request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CouponStatusReply {
    /// Always true.
    pub ok: bool,
    /// The coupon.
    pub coupon_id: i64,
    /// Its name.
    pub name: String,
    /// How it reaches users.
    pub delivery: CouponDelivery,
    /// Stock limit; none when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    /// Items issued so far.
    pub issued: i64,
    /// Start of the validity window.
    pub starts_at: DateTime<Utc>,
    /// End of the validity window.
    pub ends_at: DateTime<Utc>,
    /// The campaign that issues or pushes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_request, Encoding};

    const GOOD: &str = r#"{"name":"10 off 100","created_by":"ops-7","coupon_type":1,
        "rule":{"amount":10,"threshold":100},"starts_at":"2026-01-01T00:00:00Z",
        "ends_at":"2099-01-01T00:00:00Z","inform_type":"app"}"#;

    fn json(s: &str) -> Result<CreateCouponRequest, ApiError> {
        let r: CreateCouponRequest = parse_request(Encoding::Json, s.as_bytes())?;
        r.validate(Utc::now())?;
        Ok(r)
    }

    #[test]
    fn lazy_is_the_default() {
        let r = json(GOOD).unwrap();
        assert_eq!(r.delivery, CouponDelivery::Lazy);
        assert_eq!(r.total, None);
    }

    #[test]
    fn segment_delivery_needs_a_segment() {
        let seg = GOOD.replace(
            r#""inform_type":"app""#,
            r#""inform_type":"app","delivery":"segment","segment":{"member_levels":[3,4]}"#,
        );
        assert_eq!(json(&seg).unwrap().delivery, CouponDelivery::Segment);
        let e = json(&GOOD.replace(
            r#""inform_type":"app""#,
            r#""inform_type":"app","delivery":"segment""#,
        ))
        .unwrap_err();
        assert!(
            e.message.starts_with("segment: missing field"),
            "{}",
            e.message
        );
        let e = json(&GOOD.replace(
            r#""inform_type":"app""#,
            r#""inform_type":"app","segment":{"min_points":5}"#,
        ))
        .unwrap_err();
        assert!(
            e.message.starts_with("segment: only allowed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = json(&GOOD.replace(r#"{"amount":10,"threshold":100}"#, "[1]")).unwrap_err();
        assert_eq!(e.message, "rule: must be a JSON object");
        let e = json(&GOOD.replace("2099", "2001")).unwrap_err();
        assert_eq!(e.message, "ends_at: must be after starts_at");
        let e = json(
            &GOOD
                .replace("2026-01-01", "2000-01-01")
                .replace("2099", "2001"),
        )
        .unwrap_err();
        assert_eq!(e.message, "ends_at: must be in the future");
        let e =
            json(&GOOD.replace(r#""coupon_type":1"#, r#""coupon_type":1,"total":0"#)).unwrap_err();
        assert_eq!(e.message, "total: must be at least 1 when given");
        let e = json(&GOOD.replace(
            r#""coupon_type":1"#,
            r#""coupon_type":1,"delivery":"later""#,
        ))
        .unwrap_err();
        assert!(
            e.message.starts_with("delivery: unknown variant"),
            "{}",
            e.message
        );
        let e = json(&GOOD.replace(r#""coupon_type":1,"#, "")).unwrap_err();
        assert_eq!(e.message, "coupon_type: missing field");
    }

    #[test]
    fn msgpack_round_trip() {
        let r = json(GOOD).unwrap();
        let bytes = crate::encode(&r).unwrap();
        let back: CreateCouponRequest = parse_request(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(back, r);
    }
}

//! Request and reply bodies of herald's NATS API (`<prefix>.api.*`), in JSON or MessagePack.
//!
//! Decoding goes through [`parse_request`], which names the offending field in its error,
//! and every request type has a `validate` that checks what serde cannot.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Encoding, InformType};

/// Longest campaign or coupon name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest `created_by`, in characters.
pub const MAX_CREATED_BY_CHARS: usize = 100;
/// Longest push title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest push body, in characters.
pub const MAX_BODY_CHARS: usize = 2000;
/// Largest request body, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What kind of campaign this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignKind {
    /// A promotion pushed to its audience.
    Promotion,
    /// "You can claim a coupon", pushed to a coupon's segment.
    CouponSegment,
    /// A coupon issued to every user by the pipeline's coupon-issuing final stage.
    CouponEager,
}

impl CampaignKind {
    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Promotion => "promotion",
            Self::CouponSegment => "coupon_segment",
            Self::CouponEager => "coupon_eager",
        }
    }
}

/// Who receives a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Audience {
    /// Every user in `membership_account`.
    #[default]
    All,
    /// Users whose level, points and activity match; an empty or absent filter matches all.
    Segment(SegmentFilter),
}

/// A persona segment: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentFilter {
    /// Member levels to include (`membership_point.member_level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_levels: Option<Vec<i32>>,
    /// Minimum points (`membership_point.member_point`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_points: Option<i64>,
    /// Minimum active days (`membership_filter.active_days`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_active_days: Option<i32>,
}

/// `<prefix>.api.campaign.create` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaignRequest {
    /// Campaign kind.
    pub kind: CampaignKind,
    /// Operator-facing name.
    pub name: String,
    /// Who created it.
    pub created_by: String,
    /// When the promotion starts (RFC 3339).
    pub starts_at: DateTime<Utc>,
    /// When it ends; must be after `starts_at`.
    pub ends_at: DateTime<Utc>,
    /// Channel: sms, email, app or inbox.
    pub inform_type: InformType,
    /// Push title.
    pub title: String,
    /// Push body.
    pub body: String,
    /// Who receives it; every user when absent.
    #[serde(default)]
    pub audience: Audience,
}

impl CreateCampaignRequest {
    /// Checks what the types cannot: lengths and the time window.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.kind != CampaignKind::Promotion {
            return Err(ApiError::invalid(format!(
                "kind: {} campaigns are created through coupon.create",
                self.kind.as_str()
            )));
        }
        check_text("name", &self.name, MAX_NAME_CHARS)?;
        check_text("created_by", &self.created_by, MAX_CREATED_BY_CHARS)?;
        check_text("title", &self.title, MAX_TITLE_CHARS)?;
        check_text("body", &self.body, MAX_BODY_CHARS)?;
        if self.ends_at <= self.starts_at {
            return Err(ApiError::invalid("ends_at: must be after starts_at"));
        }
        if let Audience::Segment(f) = &self.audience {
            if let Some(levels) = &f.member_levels {
                if levels.is_empty() {
                    return Err(ApiError::invalid(
                        "audience.member_levels: must not be empty when given",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The key under which a repeat of this request is recognised.
    pub fn dedupe_key(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.name,
            self.created_by,
            self.starts_at.timestamp_millis(),
            self.ends_at.timestamp_millis()
        )
    }
}

pub(crate) fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    let n = value.chars().count();
    if n > max_chars {
        return Err(ApiError::invalid(format!(
            "{field}: too long ({n} characters, at most {max_chars})"
        )));
    }
    Ok(())
}

/// `<prefix>.api.campaign.status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignStatusRequest {
    /// The campaign.
    pub campaign_id: i64,
}

/// Error codes a client can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or fails validation; the message names the field.
    InvalidRequest,
    /// The named object does not exist.
    NotFound,
    /// A server herald depends on failed; the request may be retried.
    Unavailable,
    /// A bug; the node logged it.
    Internal,
    /// The user is not in the coupon's segment.
    NotEligible,
    /// The coupon's validity window has not started.
    NotStarted,
    /// The coupon's validity window is over.
    Expired,
    /// The coupon's stock is used up.
    SoldOut,
}

/// The `error` object of a failed reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable, naming the field where there is one.
    pub message: String,
}

impl ApiError {
    /// An `invalid_request` error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
        }
    }

    /// A `not_found` error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::NotFound,
            message: message.into(),
        }
    }

    /// An error with the given code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An `unavailable` error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            message: message.into(),
        }
    }
}

/// A failed reply: `{"ok":false,"error":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Always false.
    pub ok: bool,
    /// What went wrong.
    pub error: ApiError,
}

impl From<ApiError> for ErrorReply {
    fn from(error: ApiError) -> Self {
        Self { ok: false, error }
    }
}

/// Reply to a create request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCampaignReply {
    /// Always true.
    pub ok: bool,
    /// The campaign's id.
    pub campaign_id: i64,
    /// True when this repeats an earlier request, which was not created again.
    pub duplicate: bool,
}

/// A campaign's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Created, not yet sharded.
    Pending,
    /// Fan-out under way.
    Running,
    /// Every bucket and batch is done.
    Completed,
    /// Gave up; see the error.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
}

impl CampaignState {
    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Running,
            Self::Completed,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// True when nothing more will happen to the campaign.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Reply to a status request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignStatusReply {
    /// Always true.
    pub ok: bool,
    /// The campaign.
    pub campaign_id: i64,
    /// Its name.
    pub name: String,
    /// Lifecycle state.
    pub status: CampaignState,
    /// Buckets the audience was sharded into (0 until sharded).
    pub buckets_total: i64,
    /// Buckets expanded into push batches.
    pub buckets_done: i64,
    /// Users found in the expanded buckets.
    pub recipients: i64,
    /// Pushes the provider accepted.
    pub sent: i64,
    /// Users skipped because an earlier delivery already reached them.
    pub skipped: i64,
    /// Users whose push failed for good.
    pub failed: i64,
    /// When the campaign was created.
    pub created_at: DateTime<Utc>,
    /// When fan-out started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Decodes a request body, naming the offending field in the error.
pub fn parse_request<T: DeserializeOwned>(encoding: Encoding, body: &[u8]) -> Result<T, ApiError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(ApiError::invalid(format!(
            "request body too large ({} bytes, at most {MAX_REQUEST_BYTES})",
            body.len()
        )));
    }
    match encoding {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if inner.is_syntax() || inner.is_eof() {
                    ApiError::invalid(format!("malformed json: {inner}"))
                } else {
                    describe(path, inner.to_string())
                }
            })?;
            de.end()
                .map_err(|e| ApiError::invalid(format!("malformed json: {e}")))?;
            Ok(value)
        }
        Encoding::MsgPack => {
            let mut de = rmp_serde::Deserializer::new(body);
            serde_path_to_error::deserialize(&mut de)
                .map_err(|e| describe(e.path().to_string(), e.into_inner().to_string()))
        }
    }
}

fn describe(path: String, error: String) -> ApiError {
    // Strip serde_json's position suffix: the field path says where.
    let error = match error.find(" at line ") {
        Some(i) => error[..i].to_string(),
        None => error,
    };
    if path.is_empty() || path == "." || path == "?" {
        ApiError::invalid(format!("request: {error}")).with_prefix_if_missing_field(&error)
    } else {
        ApiError::invalid(format!("{path}: {error}"))
    }
}

impl ApiError {
    // A missing field is reported at the parent; name it in front.
    fn with_prefix_if_missing_field(mut self, error: &str) -> Self {
        if let Some(rest) = error.strip_prefix("missing field `") {
            if let Some(end) = rest.find('`') {
                self.message = format!("{}: missing field", &rest[..end]);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<CreateCampaignRequest, ApiError> {
        parse_request(Encoding::Json, s.as_bytes()).and_then(|r: CreateCampaignRequest| {
            r.validate()?;
            Ok(r)
        })
    }

    const GOOD: &str = r#"{"kind":"promotion","name":"Double 11","created_by":"ops-7",
        "starts_at":"2026-11-21T00:00:00Z","ends_at":"2026-11-28T00:00:00Z",
        "inform_type":"app","title":"Double 11 is on","body":"Open the app for your deal",
        "audience":{"type":"all"}}"#;

    #[test]
    fn accepts_the_documented_request() {
        let r = json(GOOD).unwrap();
        assert_eq!(r.inform_type, InformType::App);
        assert_eq!(r.audience, Audience::All);
    }

    #[test]
    fn errors_name_the_field() {
        let e = json(&GOOD.replace(r#""title":"Double 11 is on","#, "")).unwrap_err();
        assert_eq!(e.message, "title: missing field");
        let e = json(&GOOD.replace(r#""app""#, r#""fax""#)).unwrap_err();
        assert!(
            e.message.starts_with("inform_type: unknown variant `fax`"),
            "{}",
            e.message
        );
        let e = json(&GOOD.replace(r#""promotion""#, r#""lottery""#)).unwrap_err();
        assert!(
            e.message.starts_with("kind: unknown variant"),
            "{}",
            e.message
        );
        let e = json(&GOOD.replace(r#""ops-7""#, "7")).unwrap_err();
        assert!(
            e.message.starts_with("created_by: invalid type"),
            "{}",
            e.message
        );
        let e = json(&GOOD.replace("2026-11-28", "2026-11-20")).unwrap_err();
        assert_eq!(e.message, "ends_at: must be after starts_at");
        let e = json(&GOOD.replace("Double 11 is on", "")).unwrap_err();
        assert_eq!(e.message, "title: must not be empty");
        let long = "x".repeat(MAX_BODY_CHARS + 1);
        let e = json(&GOOD.replace("Open the app for your deal", &long)).unwrap_err();
        assert!(e.message.starts_with("body: too long"), "{}", e.message);
        let e = json("{not json").unwrap_err();
        assert!(e.message.starts_with("malformed json"), "{}", e.message);
        let e = json(&GOOD.replace(r#""all""#, r#""everyone""#)).unwrap_err();
        assert!(e.message.starts_with("audience"), "{}", e.message);
        assert!(e.code == ErrorCode::InvalidRequest);
    }

    #[test]
    fn msgpack_requests_decode_and_name_fields() {
        let r = json(GOOD).unwrap();
        let bytes = crate::encode(&r).unwrap();
        let back: CreateCampaignRequest = parse_request(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(back, r);
        let e =
            parse_request::<CreateCampaignRequest>(Encoding::MsgPack, &[0xc1, 0x00]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = parse_request::<CampaignStatusRequest>(
            Encoding::MsgPack,
            &crate::encode(&serde_json::json!({"campaign_id": "x"})).unwrap(),
        )
        .unwrap_err();
        assert!(e.message.starts_with("campaign_id:"), "{}", e.message);
    }

    #[test]
    fn dedupe_key_ignores_title_and_body() {
        let a = json(GOOD).unwrap();
        let b = json(&GOOD.replace("Double 11 is on", "other")).unwrap();
        assert_eq!(a.dedupe_key(), b.dedupe_key());
    }
}

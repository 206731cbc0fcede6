//! Requests the tests and demos send.

use chrono::{TimeZone, Utc};
use herald_schemas::{Audience, CampaignKind, CreateCampaignRequest, InformType};

/// A promotion to every user, by the app channel, in force 2026-11-21 to 2026-11-28.
pub fn promotion(name: &str) -> CreateCampaignRequest {
    CreateCampaignRequest {
        kind: CampaignKind::Promotion,
        name: name.into(),
        created_by: "ops-7".into(),
        starts_at: Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap(),
        ends_at: Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap(),
        inform_type: InformType::App,
        title: "t".into(),
        body: "b".into(),
        audience: Audience::All,
    }
}

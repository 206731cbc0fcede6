//! The final stage of an eager coupon's campaign: for each `PushBatch`, one transaction
//! inserts an item per user (multi-row, `ON CONFLICT DO NOTHING`), adds them to the coupon's
//! count within its stock, and records the batch done. A redelivered batch inserts nothing
//! and finds its record, so counts stay exact.

use std::sync::Arc;

use async_trait::async_trait;
use herald_nats::{Delivery, Outcome};
use herald_schemas::{decode, PushBatch, Subjects};

use super::store::BatchDone;
use crate::{
    context::{Shared, StageSettings},
    stage::Stage,
    store::Campaign,
};

/// Most recipients a batch may carry; more is a malformed message.
const MAX_BATCH_RECIPIENTS: usize = 10_000;

/// Issues one eager coupon to its campaign's push batches.
pub struct CouponIssuer {
    shared: Arc<Shared>,
    campaign: Arc<Campaign>,
    coupon_id: i64,
}

impl CouponIssuer {
    /// The issuer of `campaign`; fails when it names no coupon.
    pub fn new(shared: Arc<Shared>, campaign: Arc<Campaign>) -> Result<Self, String> {
        let coupon_id = campaign
            .coupon_id
            .ok_or_else(|| format!("campaign {} has no coupon", campaign.id))?;
        Ok(Self {
            shared,
            campaign,
            coupon_id,
        })
    }
}

#[async_trait]
impl Stage for CouponIssuer {
    const NAME: &'static str = "issue";

    fn settings(shared: &Shared) -> &StageSettings {
        &shared.settings.push
    }

    fn stream(subjects: &Subjects) -> String {
        subjects.push_stream()
    }

    fn filter(subjects: &Subjects, campaign_id: i64) -> String {
        subjects.push(campaign_id)
    }

    async fn handle(&self, d: Delivery) -> Outcome {
        let batch: PushBatch = match decode(&d.payload) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Reject {
                    reason: format!("undecodable PushBatch: {e}"),
                }
            }
        };
        if batch.epoch != self.campaign.epoch {
            return Outcome::Done;
        }
        if batch.campaign_id != self.campaign.id
            || batch.user_ids.is_empty()
            || batch.user_ids.len() > MAX_BATCH_RECIPIENTS
        {
            return Outcome::Reject {
                reason: format!(
                    "invalid push batch: campaign {} with {} recipients",
                    batch.campaign_id,
                    batch.user_ids.len()
                ),
            };
        }
        let pairs: Vec<(i64, i64)> = batch
            .user_ids
            .iter()
            .map(|u| (self.coupon_id, *u))
            .collect();
        let done = BatchDone {
            campaign_id: batch.campaign_id,
            bucket: batch.bucket,
            part: batch.part,
        };
        let recipients = batch.user_ids.len() as i32;
        match self
            .shared
            .store
            .issue(&pairs, chrono::Utc::now(), Some((done, recipients)))
            .await
        {
            Ok(_) => Outcome::Done,
            Err(e) => {
                tracing::warn!(campaign_id = self.campaign.id, error = %e, "issuing coupon batch failed");
                Outcome::retry(format!("issuing coupon items: {e}"))
            }
        }
    }
}

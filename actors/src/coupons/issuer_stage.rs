//! The final stage of an eager coupon's campaign: for each `PushBatch`, one transaction
//! inserts an item per user (multi-row, `ON CONFLICT DO NOTHING`), adds them to the coupon's
//! count within its stock, and records the batch done. A redelivered batch inserts nothing
//! and finds its record, so counts stay exact.

use std::sync::Arc;

use async_trait::async_trait;
use herald_nats::{Delivery, Outcome};
use herald_schemas::Subjects;

use super::store::BatchDone;
use crate::{
    context::{Shared, StageSettings},
    push_sender::checked_batch,
    stage::Stage,
    store::Campaign,
};

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
        let batch = match checked_batch(&d, &self.campaign) {
            Ok(b) => b,
            Err(outcome) => return outcome,
        };
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
            Ok(issued) => {
                // Committed: the supervisor may finish the campaign now.
                for campaign_id in issued.completed {
                    let _ = self.shared.maybe_complete.send(campaign_id);
                }
                Outcome::Done
            }
            Err(e) => {
                tracing::warn!(campaign_id = self.campaign.id, error = %e, "issuing coupon batch failed");
                Outcome::retry(format!("issuing coupon items: {e}"))
            }
        }
    }
}

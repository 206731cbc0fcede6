//! The bucket expander stage: reads one bucket's users (id range plus the audience filter),
//! publishes them as `PushBatch`es of at most `batch_size` recipients with deterministic
//! message ids, records the bucket as expanded, then acks.

use std::sync::Arc;

use async_trait::async_trait;
use herald_nats::{publish_all, Delivery, Outcome, Outgoing};
use herald_schemas::{decode, encode, BucketTask, PushBatch, Subjects};

use crate::{
    context::{Shared, StageSettings},
    stage::Stage,
    store::Campaign,
};

/// Expands the buckets of one campaign.
pub struct BucketExpander {
    shared: Arc<Shared>,
    campaign: Arc<Campaign>,
}

impl BucketExpander {
    /// The expander of `campaign`.
    pub fn new(shared: Arc<Shared>, campaign: Arc<Campaign>) -> Self {
        Self { shared, campaign }
    }

    async fn expand(&self, task: &BucketTask) -> Result<(), String> {
        let settings = &self.shared.settings;
        let users = self
            .shared
            .store
            .bucket_users(&self.campaign.audience, task.start_id, task.end_id)
            .await
            .map_err(|e| format!("database: {e}"))?;
        let subject = self.shared.topology.subjects().push(task.campaign_id);
        let mut parts = 0i32;
        let mut out: Vec<Outgoing> = Vec::new();
        let mut bytes = 0;
        for chunk in users.chunks(settings.batch_size.max(1)) {
            let batch = PushBatch::new(task.campaign_id, task.bucket, parts, chunk.to_vec())
                .with_epoch(self.campaign.epoch);
            let payload = encode(&batch).map_err(|e| e.to_string())?;
            if !out.is_empty()
                && (out.len() >= settings.publish_max_messages
                    || bytes + payload.len() > settings.publish_max_bytes)
            {
                publish_all(self.shared.topology.js(), &out)
                    .await
                    .map_err(|e| e.to_string())?;
                out.clear();
                bytes = 0;
            }
            bytes += payload.len();
            out.push(Outgoing {
                subject: subject.clone(),
                msg_id: batch.msg_id(),
                payload: payload.into(),
            });
            parts += 1;
        }
        if !out.is_empty() {
            publish_all(self.shared.topology.js(), &out)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.shared
            .store
            .record_bucket(
                task.campaign_id,
                task.bucket,
                parts,
                users.len() as i64,
                chrono::Utc::now(),
            )
            .await
            .map_err(|e| format!("database: {e}"))?;
        Ok(())
    }
}

#[async_trait]
impl Stage for BucketExpander {
    const NAME: &'static str = "expand";

    fn settings(shared: &Shared) -> &StageSettings {
        &shared.settings.expand
    }

    fn stream(subjects: &Subjects) -> String {
        subjects.buckets_stream()
    }

    fn filter(subjects: &Subjects, campaign_id: i64) -> String {
        subjects.bucket(campaign_id)
    }

    async fn handle(&self, d: Delivery) -> Outcome {
        let task: BucketTask = match decode(&d.payload) {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Reject {
                    reason: format!("undecodable BucketTask: {e}"),
                }
            }
        };
        if task.epoch != self.campaign.epoch {
            tracing::debug!(
                campaign_id = self.campaign.id,
                epoch = task.epoch,
                "stale BucketTask skipped"
            );
            return Outcome::Done;
        }
        if task.campaign_id != self.campaign.id || task.end_id < task.start_id {
            return Outcome::Reject {
                reason: format!(
                    "invalid bucket task: campaign {} bucket {} range {}..{}",
                    task.campaign_id, task.bucket, task.start_id, task.end_id
                ),
            };
        }
        match self.expand(&task).await {
            Ok(()) => Outcome::Done,
            Err(reason) => {
                tracing::warn!(campaign_id = task.campaign_id, bucket = task.bucket, reason = %reason, "bucket expansion failed");
                Outcome::retry(reason)
            }
        }
    }
}

//! The bucket expander stage: reads one bucket's users (id range plus the audience filter),
//! publishes them as `PushBatch`es of at most `batch_size` recipients with deterministic
//! message ids, records the bucket as expanded, then acks. Batches end at lease-block
//! boundaries (see `markers`), so two batches never contend for a block's lease.

use std::sync::Arc;

use async_trait::async_trait;
use herald_nats::{publish_all, Delivery, Outcome, Outgoing};
use herald_schemas::{decode, encode, BucketTask, PushBatch, Subjects};

use crate::{
    context::{Shared, StageSettings},
    markers::block_of,
    stage::Stage,
    store::{BucketRecord, Campaign},
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
        for chunk in block_batches(&users, settings.batch_size) {
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
        let record = BucketRecord {
            campaign_id: task.campaign_id,
            bucket: task.bucket,
            parts,
            recipients: users.len() as i64,
            done_at: chrono::Utc::now(),
        };
        self.shared
            .bucket_records
            .call(record)
            .await
            .map_err(|e| format!("database: {e}"))?;
        Ok(())
    }
}

/// Cuts sorted `users` into batches of at most `size`, each ending where a lease block ends:
/// whole blocks while they fit, and a block with more users than `size` alone in slices.
fn block_batches(users: &[i64], size: usize) -> Vec<&[i64]> {
    let size = size.max(1);
    let mut out = Vec::with_capacity(users.len() / size + 1);
    let mut start = 0;
    let mut i = 0;
    while i < users.len() {
        let block = block_of(users[i]);
        let end = i + users[i..].partition_point(|u| block_of(*u) == block);
        if end - start > size && i > start {
            out.push(&users[start..i]);
            start = i;
        }
        while end - start > size {
            out.push(&users[start..start + size]);
            start += size;
        }
        i = end;
    }
    if start < users.len() {
        out.push(&users[start..]);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markers::BLOCK_IDS;

    fn check(users: &[i64], size: usize) -> Vec<Vec<i64>> {
        let batches: Vec<Vec<i64>> = block_batches(users, size)
            .into_iter()
            .map(|b| b.to_vec())
            .collect();
        assert_eq!(batches.concat(), users, "every user once, in order");
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= size, "batch of {}", b.len());
        }
        batches
    }

    #[test]
    fn dense_users_are_cut_into_whole_blocks() {
        let users: Vec<i64> = (0..1000).collect();
        let batches = check(&users, 100);
        // Three 32-id blocks fit in 100.
        assert_eq!(batches[0].len(), 96);
        for pair in batches.windows(2) {
            let (a, b) = (pair[0].last().unwrap(), pair[1][0]);
            assert_ne!(block_of(*a), block_of(b), "a block split across batches");
        }
    }

    #[test]
    fn sparse_users_fill_batches_up_to_the_size() {
        let users: Vec<i64> = (0..10_000).step_by(50).collect();
        let batches = check(&users, 100);
        assert_eq!(batches.len(), 2);
    }

    #[test]
    fn a_block_larger_than_the_size_is_sliced() {
        let users: Vec<i64> = (0..BLOCK_IDS * 2).collect();
        let batches = check(&users, 10);
        assert_eq!(batches[0].len(), 10);
        assert_eq!(batches.len(), 8);
        assert!(check(&[], 10).is_empty());
    }
}

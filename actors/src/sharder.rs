//! The sharder: one handler per node on a consumer all nodes share, for every campaign. It
//! turns a campaign's `CampaignCreated` into one `BucketTask` per `bucket_size` user ids
//! (rounded up to whole lease blocks) between the audience's id bounds, published in batches
//! of at most `publish_max_messages` messages and `publish_max_bytes` bytes, then records the
//! bucket count. Re-sharding after a crash re-publishes the same message ids, which the server
//! drops inside its dedupe window and the later stages skip after it.
//!
//! Sharding is one message per campaign, so unlike the expander and the sender it needs no
//! consumer of its own per campaign: a campaign whose audience is empty is done without any
//! consumer being created for it (see `campaign_supervisor`).

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::join_all;
use herald_nats::{publish_all, Delivery, Outcome, Outgoing};
use herald_schemas::{decode, encode, BucketTask, CampaignCreated, Subjects};

use crate::{
    context::{Shared, StageSettings},
    event_worker::EventHandler,
    markers::BLOCK_IDS,
};

/// Campaigns sharded together in one batch (each on its own, concurrently).
const SHARD_BATCH: usize = 16;

/// Shards the campaigns announced on the campaigns stream.
pub struct Sharder {
    shared: Arc<Shared>,
}

impl Sharder {
    /// The sharder of this node.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn one(&self, d: &Delivery) -> Outcome {
        let created: CampaignCreated = match decode(&d.payload) {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Reject {
                    reason: format!("undecodable CampaignCreated: {e}"),
                }
            }
        };
        let on_subject = d
            .subject
            .rsplit('.')
            .next()
            .and_then(|s| s.parse::<i64>().ok());
        if on_subject != Some(created.campaign_id) {
            return Outcome::Reject {
                reason: format!(
                    "campaign id {} on the subject {}",
                    created.campaign_id, d.subject
                ),
            };
        }
        let campaign_id = created.campaign_id;
        match self.shard(created).await {
            Ok(()) => Outcome::Done,
            Err(reason) => {
                tracing::warn!(campaign_id, reason = %reason, "sharding failed");
                Outcome::retry(reason)
            }
        }
    }

    async fn shard(&self, created: CampaignCreated) -> Result<(), String> {
        let store = &self.shared.store;
        let id = created.campaign_id;
        let Some(campaign) = store.campaign(id).await.map_err(db)? else {
            // The API commits the row before it announces, so this is an announcement of a
            // database that was since recreated: nothing to do.
            tracing::debug!(
                campaign_id = id,
                "CampaignCreated of an unknown campaign skipped"
            );
            return Ok(());
        };
        if campaign.epoch != created.epoch {
            // An older campaign that had the same id: not this one, nothing to do.
            tracing::debug!(
                campaign_id = id,
                epoch = created.epoch,
                "stale CampaignCreated skipped"
            );
            return Ok(());
        }
        if campaign.status.is_final() || campaign.buckets_total.is_some() {
            return Ok(()); // a duplicate CampaignCreated: already sharded
        }
        let settings = &self.shared.settings;
        let bounds = store
            .audience_bounds(&campaign.audience)
            .await
            .map_err(db)?;
        let buckets = match bounds {
            // Nobody to send to: `set_sharded` below completes it, so no supervisor starts
            // stages for it.
            None => 0,
            Some((lo, hi)) => {
                store
                    .set_running(campaign.id, chrono::Utc::now())
                    .await
                    .map_err(db)?;
                // Every node's root starts a supervisor for it, and the supervisors start the
                // later stages now, so they expand the first buckets while the rest are still
                // being published. A lost notice is made up by the roots' periodic scan.
                self.announce_running(campaign.id).await;
                let _ = self.shared.maybe_complete.send(campaign.id);
                let tasks: Vec<BucketTask> =
                    bucket_tasks(campaign.id, lo, hi, settings.bucket_size)
                        .into_iter()
                        .map(|t| t.with_epoch(campaign.epoch))
                        .collect();
                let n = tasks.len() as i64;
                self.publish(campaign.id, tasks).await?;
                n
            }
        };
        store
            .set_sharded(campaign.id, buckets, chrono::Utc::now())
            .await
            .map_err(db)?;
        // An empty audience is completed now, and a small one may have had every record in
        // before its bucket count: either way the supervisor need not wait for its tick.
        let _ = self.shared.maybe_complete.send(campaign.id);
        if buckets == 0 {
            tracing::info!(
                campaign_id = campaign.id,
                "empty audience: campaign completed"
            );
        }
        tracing::info!(campaign_id = campaign.id, buckets, "campaign sharded");
        Ok(())
    }

    async fn announce_running(&self, campaign_id: i64) {
        let subject = self
            .shared
            .topology
            .subjects()
            .campaign_running(campaign_id);
        if let Err(e) = self.shared.nats.publish(subject, Default::default()).await {
            tracing::warn!(campaign_id, error = %e, "announcing a running campaign failed; the nodes' scans will find it");
        }
    }

    async fn publish(&self, campaign_id: i64, tasks: Vec<BucketTask>) -> Result<(), String> {
        let settings = &self.shared.settings;
        let subject = self.shared.topology.subjects().bucket(campaign_id);
        let mut batch: Vec<Outgoing> = Vec::with_capacity(settings.publish_max_messages);
        let mut bytes = 0;
        for task in tasks {
            let payload = encode(&task).map_err(|e| e.to_string())?;
            if !batch.is_empty()
                && (batch.len() >= settings.publish_max_messages
                    || bytes + payload.len() > settings.publish_max_bytes)
            {
                publish_all(self.shared.topology.js(), &batch)
                    .await
                    .map_err(|e| e.to_string())?;
                batch.clear();
                bytes = 0;
            }
            bytes += payload.len();
            batch.push(Outgoing {
                subject: subject.clone(),
                msg_id: task.msg_id(),
                payload: payload.into(),
            });
        }
        if !batch.is_empty() {
            publish_all(self.shared.topology.js(), &batch)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Publishes a campaign's `CampaignCreated` (message id `created:ID.EPOCH`, so repeats inside the
/// dedupe window are dropped, and the sharder skips a campaign already sharded after it).
/// A failure is logged: the campaign's supervisor announces a pending campaign again.
pub async fn announce(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    id: i64,
    epoch: i64,
) {
    announce_all(js, subjects, &[(id, epoch)]).await
}

/// Publishes `CampaignCreated` for each (campaign id, epoch), pipelined, then awaits the acks.
pub async fn announce_all(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    campaigns: &[(i64, i64)],
) {
    let mut out = Vec::with_capacity(campaigns.len());
    for (id, epoch) in campaigns {
        match encode(&CampaignCreated::new(*id).with_epoch(*epoch)) {
            Ok(payload) => out.push(Outgoing {
                subject: subjects.campaign_created(*id),
                msg_id: format!("created:{id}.{epoch}"),
                payload: payload.into(),
            }),
            Err(e) => {
                tracing::error!(campaign_id = id, error = %e, "encoding CampaignCreated failed")
            }
        }
    }
    if let Err(e) = publish_all(js, &out).await {
        tracing::warn!(campaigns = out.len(), error = %e, "announcing campaigns failed; they will be retried");
    }
}

fn db(e: sea_orm::DbErr) -> String {
    format!("database: {e}")
}

/// The buckets covering ids `lo..=hi`, `size` ids each; exact, never past `hi`.
pub fn bucket_tasks(campaign_id: i64, lo: i64, hi: i64, size: i64) -> Vec<BucketTask> {
    // Bucket edges sit on a grid of `size` rounded up to whole lease blocks, so no block
    // straddles two buckets and the batches of neighbouring buckets never contend.
    let size = (size.clamp(1, i64::MAX - BLOCK_IDS) + BLOCK_IDS - 1) / BLOCK_IDS * BLOCK_IDS;
    let mut out = Vec::new();
    let mut start = lo;
    let mut bucket = 0;
    while start <= hi {
        let next_edge = start
            .div_euclid(size)
            .saturating_add(1)
            .saturating_mul(size);
        let end = next_edge.min(hi.saturating_add(1));
        out.push(BucketTask::new(campaign_id, bucket, start, end));
        bucket += 1;
        start = end;
    }
    out
}

#[async_trait]
impl EventHandler for Sharder {
    const NAME: &'static str = "shard";

    fn subject(subjects: &Subjects) -> String {
        subjects.campaign_created_all()
    }

    fn stream(subjects: &Subjects) -> String {
        subjects.campaigns_stream()
    }

    fn settings(shared: &Shared) -> &StageSettings {
        &shared.settings.shard
    }

    fn batch_size(_shared: &Shared) -> usize {
        SHARD_BATCH
    }

    async fn handle(&self, batch: Vec<Delivery>) -> Vec<Outcome> {
        join_all(batch.iter().map(|d| self.one(d))).await
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_tasks;
    use crate::markers::BLOCK_IDS;

    #[test]
    fn buckets_cover_the_range_exactly() {
        let t = bucket_tasks(1, 1, 2500, 1024);
        let ranges: Vec<_> = t.iter().map(|b| (b.bucket, b.start_id, b.end_id)).collect();
        assert_eq!(ranges, vec![(0, 1, 1024), (1, 1024, 2048), (2, 2048, 2501)]);
        assert_eq!(bucket_tasks(1, 5, 5, 1024).len(), 1);
        assert_eq!(bucket_tasks(1, 0, 1023, 1024).len(), 1);
        assert_eq!(bucket_tasks(1, 0, 1024, 1024).len(), 2);
    }

    #[test]
    fn bucket_edges_fall_on_lease_block_edges() {
        // 1000 rounds up to 1024: 32 blocks of 32 ids.
        for (lo, hi, size) in [(1, 100_000, 1000), (7_777, 50_000, 1), (-40, 40, 33)] {
            let t = bucket_tasks(1, lo, hi, size);
            assert_eq!(t[0].start_id, lo);
            assert_eq!(t.last().unwrap().end_id, hi + 1);
            for pair in t.windows(2) {
                assert_eq!(pair[0].end_id, pair[1].start_id);
                assert_eq!(pair[1].start_id % BLOCK_IDS, 0, "{lo}..{hi} by {size}");
                let grid = (size + BLOCK_IDS - 1) / BLOCK_IDS * BLOCK_IDS;
                assert!(pair[0].end_id - pair[0].start_id <= grid);
            }
        }
    }
}

//! The sharder: one handler per node on a consumer all nodes share, for every campaign. It
//! turns each campaign a `CampaignCreated` names (up to [`ANNOUNCE_MAX`] per message) into
//! one `BucketTask` per `bucket_size` user ids (rounded up to whole lease blocks) between the
//! audience's id bounds, published in batches of at most `publish_max_messages` messages and
//! `publish_max_bytes` bytes, then records the bucket count. Re-sharding after a crash
//! re-publishes the same message ids, which the server drops inside its dedupe window and the
//! later stages skip after it.
//!
//! A campaign is sharded from one message, so unlike the expander and the sender the sharder
//! needs no consumer of its own per campaign: a campaign whose audience is empty is done
//! without any consumer being created for it (see `campaign_supervisor`).

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use futures::{stream, StreamExt};
use herald_nats::{publish_all, Delivery, Outcome, Outgoing};
use herald_schemas::{
    decode, encode, Audience, BucketTask, CampaignCreated, CampaignRef, Subjects,
};

use crate::{
    context::{Shared, StageSettings},
    event_worker::EventHandler,
    markers::BLOCK_IDS,
    store::Campaign,
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

    /// The campaigns a delivery announces, or why it is rejected.
    fn parse(d: &Delivery) -> Result<Vec<CampaignRef>, Outcome> {
        let created: CampaignCreated = decode(&d.payload).map_err(|e| Outcome::Reject {
            reason: format!("undecodable CampaignCreated: {e}"),
        })?;
        let on_subject = d
            .subject
            .rsplit('.')
            .next()
            .and_then(|s| s.parse::<i64>().ok());
        if on_subject != Some(created.campaign_id) {
            return Err(Outcome::Reject {
                reason: format!(
                    "campaign id {} on the subject {}",
                    created.campaign_id, d.subject
                ),
            });
        }
        Ok(created.campaigns().collect())
    }

    /// Shards a batch of announcements: one read of their campaigns, one read of the bounds
    /// of each distinct audience, one statement that completes those with an empty
    /// audience, and the buckets of the rest, each on its own. A delivery is done once
    /// every campaign it names is; one that fails has it redelivered, and the campaigns
    /// already sharded are then skipped.
    async fn shard_batch(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let store = &self.shared.store;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(batch.len());
        let mut wanted: Vec<(usize, CampaignRef)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            match Self::parse(d) {
                Ok(refs) => {
                    wanted.extend(refs.into_iter().map(|r| (i, r)));
                    outcomes.push(Outcome::Done);
                }
                Err(o) => outcomes.push(o),
            }
        }
        let mut ids: Vec<i64> = wanted.iter().map(|(_, r)| r.campaign_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let found = match store.campaigns(&ids).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(campaigns = ids.len(), error = %e, "reading campaigns to shard failed");
                let reason = db(e);
                for (i, _) in &wanted {
                    outcomes[*i] = Outcome::retry(reason.clone());
                }
                return outcomes;
            }
        };
        let found: HashMap<i64, Campaign> = found.into_iter().map(|c| (c.id, c)).collect();
        // The campaigns that still need sharding, each with the deliveries that name it; the
        // others are done.
        let mut todo: Vec<(Vec<usize>, &Campaign)> = Vec::new();
        let mut todo_at: HashMap<i64, usize> = HashMap::new();
        for (i, created) in wanted {
            let id = created.campaign_id;
            let Some(campaign) = found.get(&id) else {
                // The API commits the row before it announces, so this is an announcement of
                // a database that was since recreated: nothing to do.
                tracing::debug!(
                    campaign_id = id,
                    "CampaignCreated of an unknown campaign skipped"
                );
                continue;
            };
            if campaign.epoch != created.epoch {
                // An older campaign that had the same id: not this one, nothing to do.
                tracing::debug!(
                    campaign_id = id,
                    epoch = created.epoch,
                    "stale CampaignCreated skipped"
                );
                continue;
            }
            if campaign.status.is_final() || campaign.buckets_total.is_some() {
                continue; // a duplicate CampaignCreated: already sharded
            }
            match todo_at.get(&id) {
                Some(&k) => todo[k].0.push(i),
                None => {
                    todo_at.insert(id, todo.len());
                    todo.push((vec![i], campaign));
                }
            }
        }
        // Campaigns of one batch with the same audience share one read of its bounds.
        let mut audiences: Vec<&Audience> = Vec::new();
        for (_, c) in &todo {
            if !audiences.contains(&&c.audience) {
                audiences.push(&c.audience);
            }
        }
        // A batch may name up to 256 campaigns, so their reads are bounded as their shards are.
        let reads: Vec<_> = audiences.iter().map(|a| store.audience_bounds(a)).collect();
        let bounds: Vec<_> = stream::iter(reads).buffered(SHARD_BATCH).collect().await;
        let bounds_of = |c: &Campaign| {
            let at = audiences.iter().position(|a| **a == c.audience);
            match at.map(|i| &bounds[i]) {
                Some(Ok(b)) => Ok(*b),
                Some(Err(e)) => Err(format!("database: {e}")),
                None => Err("no audience read".to_string()),
            }
        };
        // A message may name many campaigns: at most a batch's worth are sharded at once.
        let shards: Vec<_> = todo
            .iter()
            .map(|&(_, c)| {
                let bounds = bounds_of(c);
                async move {
                    match bounds {
                        Ok(Some((lo, hi))) => self.shard(c, lo, hi).await.map(|()| true),
                        Ok(None) => Ok(false),
                        Err(reason) => Err(reason),
                    }
                }
            })
            .collect();
        let results: Vec<Result<bool, String>> =
            stream::iter(shards).buffered(SHARD_BATCH).collect().await;
        let mut empty = Vec::new();
        for ((at, campaign), result) in todo.iter().zip(results) {
            let outcome = match result {
                Ok(true) => continue,
                Ok(false) => {
                    empty.push((at, campaign.id));
                    continue;
                }
                Err(reason) => {
                    tracing::warn!(campaign_id = campaign.id, reason = %reason, "sharding failed");
                    Outcome::retry(reason)
                }
            };
            for i in at {
                outcomes[*i] = outcome.clone();
            }
        }
        if empty.is_empty() {
            return outcomes;
        }
        // Nobody to send to: recording 0 buckets completes them, so no supervisor starts
        // stages for them.
        let ids: Vec<i64> = empty.iter().map(|(_, id)| *id).collect();
        match store.set_sharded_all(&ids, 0, chrono::Utc::now()).await {
            Ok(()) => {
                for (_, id) in &empty {
                    let _ = self.shared.maybe_complete.send(*id);
                    tracing::info!(campaign_id = id, "empty audience: campaign completed");
                }
            }
            Err(e) => {
                tracing::warn!(campaigns = empty.len(), error = %e, "completing empty campaigns failed");
                let reason = db(e);
                for (at, _) in &empty {
                    for i in *at {
                        outcomes[*i] = Outcome::retry(reason.clone());
                    }
                }
            }
        }
        outcomes
    }

    /// Shards one campaign whose audience has ids in `lo..=hi`: marks it running, publishes
    /// its buckets and records their count.
    async fn shard(&self, campaign: &Campaign, lo: i64, hi: i64) -> Result<(), String> {
        let store = &self.shared.store;
        let settings = &self.shared.settings;
        store
            .set_running(campaign.id, chrono::Utc::now())
            .await
            .map_err(db)?;
        // Every node's root starts a supervisor for it, and the supervisors start the later
        // stages now, so they expand the first buckets while the rest are still being
        // published. A lost notice is made up by the roots' periodic scan.
        self.announce_running(campaign.id).await;
        let _ = self.shared.maybe_complete.send(campaign.id);
        let tasks: Vec<BucketTask> = bucket_tasks(campaign.id, lo, hi, settings.bucket_size)
            .into_iter()
            .map(|t| t.with_epoch(campaign.epoch))
            .collect();
        let buckets = tasks.len() as i64;
        self.publish(campaign.id, tasks).await?;
        store
            .set_sharded(campaign.id, buckets, chrono::Utc::now())
            .await
            .map_err(db)?;
        // A small campaign may have had every record in before its bucket count: the
        // supervisor need not wait for its tick.
        let _ = self.shared.maybe_complete.send(campaign.id);
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

/// Most campaigns one `CampaignCreated` names: a sharder batch of such messages then holds
/// at most `SHARD_BATCH` × this many campaigns.
pub const ANNOUNCE_MAX: usize = 16;

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

/// Publishes `CampaignCreated` for the (campaign id, epoch) pairs, [`ANNOUNCE_MAX`] to a
/// message (each on the subject and with the message id of its first campaign), pipelined,
/// then awaits the acks. One stream message per campaign cost the server a store, an ack, a
/// delivery and the sharder's ack each, for a message of a few bytes.
pub async fn announce_all(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    campaigns: &[(i64, i64)],
) {
    let refs: Vec<CampaignRef> = campaigns
        .iter()
        .map(|&(campaign_id, epoch)| CampaignRef { campaign_id, epoch })
        .collect();
    let mut out = Vec::with_capacity(refs.len().div_ceil(ANNOUNCE_MAX));
    for chunk in refs.chunks(ANNOUNCE_MAX) {
        let Some(created) = CampaignCreated::all(chunk) else {
            continue;
        };
        let (id, epoch) = (created.campaign_id, created.epoch);
        match encode(&created) {
            Ok(payload) => out.push(Outgoing {
                subject: subjects.campaign_created(id),
                msg_id: format!("created:{id}.{epoch}"),
                payload: payload.into(),
            }),
            Err(e) => {
                tracing::error!(campaign_id = id, campaigns = chunk.len(), error = %e, "encoding CampaignCreated failed")
            }
        }
    }
    if let Err(e) = publish_all(js, &out).await {
        tracing::warn!(campaigns = refs.len(), error = %e, "announcing campaigns failed; they will be retried");
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
        self.shard_batch(&batch).await
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

//! What every actor of a node shares: connections, the provider set and the settings.

use std::{sync::Arc, time::Duration};

use herald_nats::{ConsumeSettings, StageConsumer, Topology};
use tokio::sync::{broadcast, Semaphore};

use crate::{
    batcher::Batcher,
    coupons::ActiveCoupons,
    markers::{batch_field, CampaignRef, Markers},
    provider::Providers,
    store::{BatchRecord, BucketRecord, Store},
};

/// How one stage pulls and retries.
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// Messages one node handles at once for one campaign.
    pub concurrency: usize,
    /// Redelivery after this long without an ack or progress.
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// Unacked messages in flight across all nodes.
    pub max_ack_pending: i64,
    /// First retry delay; doubles per delivery.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl StageSettings {
    /// The stage's consume settings.
    pub fn consume(&self) -> ConsumeSettings {
        ConsumeSettings {
            concurrency: self.concurrency,
            max_deliver: self.max_deliver,
            ack_wait: self.ack_wait,
            retry_base: self.retry_base,
            retry_max: self.retry_max,
        }
    }

    /// The durable consumer spec for this stage.
    pub fn consumer(&self, durable: String, stream: String, filter: String) -> StageConsumer {
        StageConsumer {
            durable,
            stream,
            filter,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
        }
    }
}

/// The pipeline's knobs; the engine's config fills them.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// User ids per bucket.
    pub bucket_size: i64,
    /// Recipients per push batch.
    pub batch_size: usize,
    /// Messages per publish batch.
    pub publish_max_messages: usize,
    /// Bytes per publish batch.
    pub publish_max_bytes: usize,
    /// Sharder: one consumer for every campaign; `concurrency` counts batches of campaigns.
    pub shard: StageSettings,
    /// Bucket expander stage.
    pub expand: StageSettings,
    /// Push sender stage.
    pub push: StageSettings,
    /// Event consumers (logins, order cancellations); `concurrency` counts batches.
    pub events: StageSettings,
    /// Most events per batch.
    pub event_batch_size: usize,
    /// How often a node writes the database's active lazy coupons into Redis.
    pub coupon_sync_interval: Duration,
    /// Pushes in flight to providers on this node, all campaigns together (a batch call
    /// holds one permit per push).
    pub send_concurrency: usize,
    /// Tries per recipient within one delivery of a batch before the batch is retried later.
    pub send_attempts: u32,
    /// First in-place retry delay for a recipient.
    pub send_retry_base: Duration,
    /// Longest in-place retry delay (a longer Retry-After retries the batch later instead).
    pub send_retry_max: Duration,
    /// How long a claim lives: longer than the slowest send with its retries.
    pub claim_ttl: Duration,
    /// How long confirmations are kept (the replay horizon).
    pub marker_ttl: Duration,
    /// How often a campaign supervisor checks for completion.
    pub progress_interval: Duration,
    /// Restarts of one child within a campaign before the campaign is failed.
    pub max_restarts: u32,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        let stage = StageSettings {
            concurrency: 8,
            ack_wait: Duration::from_secs(30),
            max_deliver: 8,
            max_ack_pending: 1000,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        };
        Self {
            bucket_size: 1024,
            batch_size: 100,
            publish_max_messages: 100,
            publish_max_bytes: 800 * 1024,
            shard: StageSettings {
                // Batches of up to 16 campaigns each; one big audience's sharding holds up
                // only its own batch.
                concurrency: 4,
                ..stage.clone()
            },
            expand: stage.clone(),
            push: StageSettings {
                concurrency: 64,
                ..stage.clone()
            },
            events: StageSettings {
                // Each batch holds a database connection for its transaction. 8 measured
                // 20% more logins/s than 4 on a slow 2-core machine and the same on a fast
                // one; 16 was slower on both (BENCHMARKS.md, sessions 2 and 11).
                concurrency: 8,
                max_ack_pending: 20_000,
                ..stage
            },
            event_batch_size: 500,
            coupon_sync_interval: Duration::from_secs(10),
            send_concurrency: 2048,
            send_attempts: 4,
            send_retry_base: Duration::from_millis(100),
            send_retry_max: Duration::from_secs(2),
            claim_ttl: Duration::from_secs(60),
            marker_ttl: Duration::from_secs(30 * 24 * 3600),
            progress_interval: Duration::from_millis(500),
            max_restarts: 5,
        }
    }
}

/// Records (finished batches, expanded buckets) waiting to be written, at most, per kind.
const RECORD_QUEUE: usize = 4096;
/// Records per insert, at most.
const RECORD_GROUP: usize = 128;
/// Inserts of one kind of record in flight: one connection each, so fan-out work keeps the
/// rest.
const RECORD_STATEMENTS: usize = 4;

/// Everything a node's actors share.
pub struct Shared {
    /// This node's id (logs, claim tokens).
    pub node_id: String,
    /// The NATS connection.
    pub nats: async_nats::Client,
    /// Streams and consumers.
    pub topology: Topology,
    /// The database.
    pub store: Store,
    /// Idempotency markers.
    pub markers: Markers,
    /// The active lazy coupons in Redis.
    pub coupons: ActiveCoupons,
    /// Providers by inform type.
    pub providers: Providers,
    /// Knobs.
    pub settings: PipelineSettings,
    /// Bounds provider calls in flight on this node.
    pub send_permits: Arc<Semaphore>,
    /// Records finished push batches of every campaign on this node, grouped into
    /// multi-row inserts, then drops the group's running totals from Redis.
    pub batch_records: Batcher<FinishedBatch, ()>,
    /// Records expanded buckets the same way.
    pub bucket_records: Batcher<BucketRecord, ()>,
    /// Ids of campaigns that may have just completed (a record on this node made them
    /// complete, or the sharder found nothing to send): their supervisors here check at
    /// once instead of at their next progress check.
    pub maybe_complete: broadcast::Sender<i64>,
}

/// Completions waiting for slow supervisors; one that falls behind checks at once.
const COMPLETED_QUEUE: usize = 256;

/// A push batch to record, and the campaign whose running totals in Redis it leaves.
#[derive(Debug, Clone)]
pub struct FinishedBatch {
    /// The row.
    pub record: BatchRecord,
    /// The campaign, as Redis names it.
    pub campaign: CampaignRef,
}

/// A batcher of records: concurrent calls go to the database as one `record` call, at most
/// `RECORD_GROUP` rows and `RECORD_STATEMENTS` statements at once.
/// The campaigns a group made complete are announced on `completed`.
fn recorder<T, F, Fut>(store: Store, completed: broadcast::Sender<i64>, record: F) -> Batcher<T, ()>
where
    T: Send + 'static,
    F: Fn(Store, Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<i64>, sea_orm::DbErr>> + Send + 'static,
{
    Batcher::start(
        RECORD_QUEUE,
        RECORD_GROUP,
        RECORD_STATEMENTS,
        move |rows: Vec<T>| {
            let n = rows.len();
            let done = record(store.clone(), rows);
            let completed = completed.clone();
            async move {
                for campaign_id in done.await.map_err(|e| e.to_string())? {
                    // No supervisor listening is fine: none runs that campaign here.
                    let _ = completed.send(campaign_id);
                }
                Ok(vec![(); n])
            }
        },
    )
}

impl Shared {
    /// Shared state; the send semaphore is sized from the settings.
    pub fn new(
        node_id: String,
        nats: async_nats::Client,
        topology: Topology,
        store: Store,
        markers: Markers,
        providers: Providers,
        settings: PipelineSettings,
    ) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(settings.send_concurrency.max(1)));
        let coupons = ActiveCoupons::new(
            markers.client().clone(),
            &topology.subjects().redis_prefix(),
            settings.claim_ttl,
        );
        let (completed, _) = broadcast::channel(COMPLETED_QUEUE);
        let forget = markers.clone();
        let batch_records = recorder(
            store.clone(),
            completed.clone(),
            move |store, batches: Vec<FinishedBatch>| {
                let markers = forget.clone();
                async move {
                    let rows: Vec<BatchRecord> = batches.iter().map(|b| b.record.clone()).collect();
                    let complete = store.record_batches(&rows).await?;
                    // Recorded: the totals are never read again. Dropping them for the whole
                    // group saves a Redis call per batch; a failure only leaves them until the
                    // campaign's markers are deleted.
                    let fields: Vec<(CampaignRef, String)> = batches
                        .iter()
                        .map(|b| (b.campaign, batch_field(b.record.bucket, b.record.part)))
                        .collect();
                    if let Err(e) = markers.forget_batches(&fields).await {
                        tracing::debug!(error = %e, "dropping batch totals failed; they go with the campaign");
                    }
                    Ok(complete)
                }
            },
        );
        let bucket_records = recorder(
            store.clone(),
            completed.clone(),
            |store, buckets: Vec<BucketRecord>| async move { store.record_buckets(&buckets).await },
        );
        Arc::new(Self {
            batch_records,
            bucket_records,
            maybe_complete: completed,
            node_id,
            nats,
            topology,
            store,
            markers,
            coupons,
            providers,
            settings,
            send_permits: permits,
        })
    }
}

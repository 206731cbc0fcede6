//! What a create does after its reply, batched over the creates that finished meanwhile:
//! record each new id under its dedupe key in Redis (one pipeline), so repeats get it at once,
//! and announce new campaigns on the campaigns stream (one pipelined publish). Neither is
//! needed for correctness: the database catches repeats Redis has not heard of, and a node
//! that finds a pending campaign announces it again.

use std::time::Duration;

use fred::{clients::Client as Redis, interfaces::KeysInterface, types::Expiration};
use herald_schemas::Subjects;
use tokio::sync::mpsc;

/// Most jobs per round.
const MAX_ROUND: usize = 256;

/// A job for after the reply.
#[derive(Debug)]
pub enum AfterCreate {
    /// `SET key id PX ttl`.
    RecordId {
        /// The dedupe key.
        key: String,
        /// The id it now maps to.
        id: i64,
        /// How long the key lives.
        ttl: Duration,
    },
    /// Publish `CampaignCreated`.
    Announce {
        /// The campaign.
        campaign_id: i64,
        /// Its epoch.
        epoch: i64,
    },
}

/// Hands jobs to the collector task.
#[derive(Clone)]
pub struct AfterCreates {
    tx: mpsc::Sender<AfterCreate>,
}

impl AfterCreates {
    /// Starts the collector; at most `queue` jobs wait. The handle ends once every sender
    /// is dropped and what was queued has been sent.
    pub fn start(
        redis: Redis,
        js: async_nats::jetstream::Context,
        subjects: Subjects,
        queue: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let collector = tokio::spawn(collect(redis, js, subjects, rx));
        (Self { tx }, collector)
    }

    /// Queues a job; when the queue is full the job runs on its own task instead.
    pub fn push(&self, job: AfterCreate) {
        if let Err(e) = self.tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(job).await;
            });
        }
    }
}

async fn collect(
    redis: Redis,
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    mut rx: mpsc::Receiver<AfterCreate>,
) {
    while let Some(job) = rx.recv().await {
        let mut jobs = vec![job];
        while jobs.len() < MAX_ROUND {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut records = Vec::new();
        let mut announce = Vec::new();
        for j in jobs {
            match j {
                AfterCreate::RecordId { key, id, ttl } => records.push((key, id, ttl)),
                AfterCreate::Announce { campaign_id, epoch } => announce.push((campaign_id, epoch)),
            }
        }
        let record = async {
            if records.is_empty() {
                return;
            }
            let pipeline = redis.pipeline();
            for (key, id, ttl) in &records {
                let px = Expiration::PX(ttl.as_millis().max(1) as i64);
                let queued: Result<(), _> = pipeline.set(key, *id, Some(px), None, false).await;
                if let Err(e) = queued {
                    tracing::warn!(error = %e, "queueing a dedupe record failed");
                }
            }
            let sent: Result<Vec<fred::types::Value>, _> = pipeline.all().await;
            if let Err(e) = sent {
                tracing::warn!(records = records.len(), error = %e, "recording dedupe keys failed; the database check still holds");
            }
        };
        let publish = async {
            if !announce.is_empty() {
                herald_actors::sharder::announce_all(&js, &subjects, &announce).await;
            }
        };
        tokio::join!(record, publish);
    }
}

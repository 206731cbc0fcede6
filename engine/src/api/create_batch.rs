//! Campaign inserts of concurrent create requests, grouped into one statement.
//!
//! One `INSERT` per create costs a database round trip and a commit each, and on a small
//! machine that caps creates at a few thousand per second, so a burst of requests queues for
//! connections. Here each create hands its row to a collector, which takes whatever rows are
//! waiting (up to [`MAX_BATCH`]) and inserts them with one multi-row statement, with up to
//! `connections` statements in flight. Under light load a batch is a single row and nothing
//! waits; under a burst the batches grow instead of the queue.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_actors::store::{CampaignInsert, NewCampaign, Store};
use sea_orm::DbErr;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most rows per statement.
const MAX_BATCH: usize = 128;

struct Job {
    campaign: NewCampaign,
    now: DateTime<Utc>,
    since: DateTime<Utc>,
    reply: oneshot::Sender<Result<(i64, bool), String>>,
}

/// Hands campaign rows to the collector task.
#[derive(Clone)]
pub struct CreateBatcher {
    tx: mpsc::Sender<Job>,
}

impl CreateBatcher {
    /// Starts the collector: at most `queue` rows wait, `connections` statements run at once.
    pub fn start(store: Store, queue: usize, connections: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        tokio::spawn(collect(store, rx, connections.max(1)));
        Self { tx }
    }

    /// Inserts the campaign unless a repeat (see [`Store::insert_campaigns`]).
    pub async fn insert(
        &self,
        campaign: NewCampaign,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<(i64, bool), DbErr> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            campaign,
            now,
            since,
            reply,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| DbErr::Custom("create batcher stopped".into()))?;
        rx.await
            .map_err(|_| DbErr::Custom("create batcher dropped the request".into()))?
            .map_err(DbErr::Custom)
    }
}

async fn collect(store: Store, mut rx: mpsc::Receiver<Job>, connections: usize) {
    let permits = Arc::new(Semaphore::new(connections));
    while let Some(job) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued while the statements in flight ran goes in this one.
        let mut jobs = vec![job];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            let rows: Vec<CampaignInsert> = jobs
                .iter()
                .map(|j| CampaignInsert {
                    campaign: &j.campaign,
                    now: j.now,
                    since: j.since,
                })
                .collect();
            let result = store.insert_campaigns(&rows).await;
            drop(rows);
            match result {
                Ok(ids) => {
                    for (job, r) in jobs.into_iter().zip(ids) {
                        let _ = job.reply.send(Ok(r));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

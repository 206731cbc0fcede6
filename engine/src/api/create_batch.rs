//! Campaign inserts of concurrent create requests, grouped into one statement.
//!
//! One `INSERT` per create costs a database round trip and a commit each, and on a small
//! machine that caps creates at a few thousand per second, so a burst of requests queues for
//! connections. Here the rows of concurrent creates go through a [`Batcher`]: whatever rows
//! are waiting (up to [`MAX_BATCH`]) are inserted with one multi-row statement, with up to
//! `connections` statements in flight.

use chrono::{DateTime, Utc};
use herald_actors::{
    batcher::Batcher,
    store::{CampaignInsert, NewCampaign, Store},
};
use sea_orm::DbErr;

/// Most rows per statement.
const MAX_BATCH: usize = 128;

struct Job {
    campaign: NewCampaign,
    now: DateTime<Utc>,
    since: DateTime<Utc>,
}

/// Hands campaign rows to the collector task.
#[derive(Clone)]
pub struct CreateBatcher {
    batcher: Batcher<Job, (i64, bool)>,
}

impl CreateBatcher {
    /// Starts the collector: at most `queue` rows wait, `connections` statements run at once.
    pub fn start(store: Store, queue: usize, connections: usize) -> Self {
        let batcher = Batcher::start(queue, MAX_BATCH, connections, move |jobs: Vec<Job>| {
            let store = store.clone();
            async move {
                let rows: Vec<CampaignInsert> = jobs
                    .iter()
                    .map(|j| CampaignInsert {
                        campaign: &j.campaign,
                        now: j.now,
                        since: j.since,
                    })
                    .collect();
                store
                    .insert_campaigns(&rows)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        Self { batcher }
    }

    /// Inserts the campaign unless a repeat (see [`Store::insert_campaigns`]).
    pub async fn insert(
        &self,
        campaign: NewCampaign,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<(i64, bool), DbErr> {
        self.batcher
            .call(Job {
                campaign,
                now,
                since,
            })
            .await
            .map_err(DbErr::Custom)
    }
}

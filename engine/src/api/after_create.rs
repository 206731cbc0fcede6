//! What a create does after its reply, batched over the creates that finish within a few
//! milliseconds of each other ([`next_round`]): record each new id under its dedupe key in
//! Redis (the round's commands in one write), so repeats get it at once, and announce new
//! campaigns on the campaigns stream (one pipelined publish). Neither is needed for
//! correctness: the database catches repeats Redis has not heard of, and a node that finds a
//! pending campaign announces it again.

use std::time::Duration;

use fred::{clients::Client as Redis, interfaces::KeysInterface, types::Expiration};
use herald_schemas::Subjects;
use tokio::sync::mpsc;

/// Most jobs per round.
const MAX_ROUND: usize = 256;

/// How long a round waits for more jobs after its first (see [`next_round`]).
const LINGER: Duration = Duration::from_millis(5);

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
    while let Some(jobs) = next_round(&mut rx, LINGER, MAX_ROUND).await {
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
            // Sent together rather than as a fred pipeline: fred 10 flushes the socket after
            // each command of a pipeline (one write per create, traced with strace), but only
            // after the last of the commands queued at once. All of these are queued on the
            // first poll, so they go out in one write.
            let sets = records.iter().map(|(key, id, ttl)| {
                let px = Expiration::PX(ttl.as_millis().max(1) as i64);
                redis.set::<(), _, _>(key, *id, Some(px), None, false)
            });
            let failed = futures::future::join_all(sets)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect::<Vec<_>>();
            if let Some(e) = failed.first() {
                tracing::warn!(records = records.len(), failed = failed.len(), error = %e, "recording dedupe keys failed; the database check still holds");
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

/// The next round: the first job to come, then whatever comes within `linger` of it, at most
/// `max` jobs. Nobody waits for this work, so a round waits for the creates that follow: at a
/// steady few creates per millisecond that makes one Redis write and one burst of
/// announcements (which a sharder then takes as one batch) of several creates instead of one
/// each. None once every sender is gone and nothing is left.
async fn next_round<T>(rx: &mut mpsc::Receiver<T>, linger: Duration, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let until = tokio::time::Instant::now() + linger;
    let mut jobs = vec![first];
    while jobs.len() < max {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(j)) => jobs.push(j),
            Ok(None) | Err(_) => break,
        }
    }
    Some(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_records_every_id_with_its_ttl() {
        use fred::interfaces::ClientLike;
        let env = crate::testkit::TestEnv::new("afterrecord").await.unwrap();
        env.run_test(async {
            let redis =
                herald_actors::markers::connect(&env.config.redis.url, Duration::from_secs(5))
                    .await
                    .unwrap();
            let js = async_nats::jetstream::new(env.nats.clone());
            let (after, collector) = AfterCreates::start(redis.clone(), js, env.subjects(), 512);
            // More than one round holds, and more than join_all polls without a queue (30).
            let key = |i: i64| format!("{}:dedupe:test{i}", env.prefix);
            for i in 0..300 {
                after.push(AfterCreate::RecordId {
                    key: key(i),
                    id: 1_000 + i,
                    ttl: Duration::from_secs(60),
                });
            }
            drop(after);
            collector.await.unwrap();
            for i in 0..300 {
                let id: Option<i64> = redis.get(key(i)).await.unwrap();
                assert_eq!(id, Some(1_000 + i), "key {i}");
                let ttl: i64 = redis.pttl(key(i)).await.unwrap();
                assert!((1..=60_000).contains(&ttl), "key {i}: pttl {ttl}");
            }
            let keys: Vec<String> = (0..300).map(key).collect();
            let _: i64 = redis.del(keys).await.unwrap();
            redis.quit().await.unwrap();
        })
        .await
        .unwrap();
    }

    /// Sends `1..=n`, one every `gap`.
    fn send_spaced(tx: mpsc::Sender<u32>, n: u32, gap: Duration) {
        tokio::spawn(async move {
            for i in 1..=n {
                tx.send(i).await.unwrap();
                tokio::time::sleep(gap).await;
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_takes_the_jobs_that_follow_within_the_linger() {
        let (tx, mut rx) = mpsc::channel(16);
        // One job a millisecond: a 5 ms round holds the first and the four after it.
        send_spaced(tx, 12, Duration::from_millis(1));
        let linger = Duration::from_millis(5);
        assert_eq!(
            next_round(&mut rx, linger, 100).await,
            Some(vec![1, 2, 3, 4, 5])
        );
        assert_eq!(
            next_round(&mut rx, linger, 100).await,
            Some(vec![6, 7, 8, 9, 10])
        );
        assert_eq!(next_round(&mut rx, linger, 100).await, Some(vec![11, 12]));
        assert_eq!(next_round(&mut rx, linger, 100).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_round_goes_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 1..=5 {
            tx.send(i).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let round = next_round(&mut rx, Duration::from_secs(60), 3).await;
        assert_eq!(round, Some(vec![1, 2, 3]));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_ends_when_the_senders_are_gone() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        drop(tx);
        let started = tokio::time::Instant::now();
        assert_eq!(
            next_round(&mut rx, Duration::from_secs(60), 100).await,
            Some(vec![1])
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            next_round(&mut rx, Duration::from_secs(60), 100).await,
            None
        );
    }
}

//! The push sender stage: for each `PushBatch`, claim its users in Redis (one script call),
//! send to the claimed ones through the campaign's provider in batch calls (a permit per push
//! from the node's send window) with a few quick in-place retries, confirm what was sent or
//! failed for good, release the rest, and ack only when every user of the batch is settled. Users that still need a retry send the
//! batch back to JetStream with a delay; on the last delivery they are recorded as failed.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::join_all;
use herald_nats::{Delivery, Outcome};
use herald_schemas::{decode, PushBatch, Subjects};

use crate::{
    context::{FinishedBatch, Shared, StageSettings},
    markers::{batch_field, CampaignRef, ClaimState, Release, Settled},
    provider::{Provider, Push, SendError},
    stage::Stage,
    store::{BatchRecord, Campaign},
};

/// Most recipients a batch may carry; more is a malformed message.
const MAX_BATCH_RECIPIENTS: usize = 10_000;
/// Tries for the Redis and database writes that settle a batch after its sends.
const SETTLE_ATTEMPTS: u32 = 5;

/// Sends the push batches of one campaign.
pub struct PushSender {
    shared: Arc<Shared>,
    campaign: Arc<Campaign>,
    provider: Arc<dyn Provider>,
    title: Arc<str>,
    body: Arc<str>,
}

enum Sent {
    Ok,
    Failed(String),
    Retry(String, Option<Duration>),
}

impl PushSender {
    /// The sender of `campaign`; fails when no provider serves its inform type.
    pub fn new(shared: Arc<Shared>, campaign: Arc<Campaign>) -> Result<Self, String> {
        let provider = shared
            .providers
            .get(campaign.inform_type)
            .ok_or_else(|| format!("no provider configured for {}", campaign.inform_type))?;
        Ok(Self {
            title: campaign.title.as_str().into(),
            body: campaign.body.as_str().into(),
            shared,
            campaign,
            provider,
        })
    }

    fn push(&self, user_id: i64) -> Push {
        Push {
            campaign_id: self.campaign.id,
            user_id,
            channel: self.campaign.inform_type,
            title: self.title.clone(),
            body: self.body.clone(),
        }
    }

    /// Sends to `users` in rounds of provider batch calls, retrying the retryable ones in
    /// place with a growing wait, up to `send_attempts` rounds; one outcome per user.
    async fn send_all(&self, users: &[i64]) -> Vec<Sent> {
        let s = &self.shared.settings;
        let mut out: Vec<Option<Sent>> = users.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..users.len()).collect();
        let mut attempt = 0u32;
        while !pending.is_empty() {
            attempt += 1;
            let results = self.send_round(users, &pending).await;
            let stopping = self.shared.send_permits.is_closed();
            let mut wait = Duration::ZERO;
            let mut again = Vec::new();
            for (i, r) in pending.iter().zip(results) {
                out[*i] = match r {
                    Ok(()) => Some(Sent::Ok),
                    Err(SendError::Permanent { reason }) => Some(Sent::Failed(reason)),
                    Err(SendError::Retryable {
                        reason,
                        retry_after,
                    }) => {
                        let w = retry_after.unwrap_or_else(|| {
                            s.send_retry_base
                                .saturating_mul(2u32.saturating_pow(attempt - 1))
                        });
                        if stopping || attempt >= s.send_attempts || w > s.send_retry_max {
                            Some(Sent::Retry(reason, retry_after))
                        } else {
                            wait = wait.max(w);
                            again.push(*i);
                            None
                        }
                    }
                };
            }
            if !again.is_empty() {
                tokio::time::sleep(wait).await;
            }
            pending = again;
        }
        out.into_iter()
            .map(|o| o.expect("every user gets an outcome"))
            .collect()
    }

    /// One round: the `pending` users' pushes as provider batch calls, in slices no larger
    /// than the node's send window, each holding one permit per push while it runs.
    async fn send_round(&self, users: &[i64], pending: &[usize]) -> Vec<Result<(), SendError>> {
        let window = self.shared.settings.send_concurrency.max(1);
        let slices = pending.chunks(window).map(|slice| async move {
            let retry = |reason: String| {
                Err(SendError::Retryable {
                    reason,
                    retry_after: None,
                })
            };
            let Ok(_permits) = self
                .shared
                .send_permits
                .acquire_many(slice.len() as u32)
                .await
            else {
                return slice
                    .iter()
                    .map(|_| retry("node shutting down".into()))
                    .collect();
            };
            let pushes: Vec<Push> = slice.iter().map(|i| self.push(users[*i])).collect();
            let mut results = self.provider.send_batch(&pushes).await;
            if results.len() != pushes.len() {
                let reason = format!(
                    "provider {} answered {} results for {} pushes",
                    self.provider.name(),
                    results.len(),
                    pushes.len()
                );
                results = pushes.iter().map(|_| retry(reason.clone())).collect();
            }
            results
        });
        join_all(slices).await.concat()
    }

    async fn process(&self, batch: PushBatch, d: &Delivery) -> Result<Outcome, String> {
        let markers = &self.shared.markers;
        let cid = batch.campaign_id;
        let scope = CampaignRef {
            id: cid,
            epoch: self.campaign.epoch,
        };
        let token = format!(
            "{}:{}:{}",
            self.shared.node_id, d.stream_sequence, d.delivered
        );
        let field = batch_field(batch.bucket, batch.part);
        // A user listed twice is still one recipient and one send.
        let mut users = batch.user_ids;
        users.sort_unstable();
        users.dedup();
        let states = markers
            .claim(scope, &users, &token)
            .await
            .map_err(|e| e.to_string())?;
        let mut claimed = Vec::new();
        let mut busy = 0usize;
        for (user, state) in users.iter().zip(&states) {
            match state {
                ClaimState::Claimed => claimed.push(*user),
                ClaimState::Busy => busy += 1,
                ClaimState::Done => {}
            }
        }
        let results = self.send_all(&claimed).await;
        let last = d.delivered >= self.shared.settings.push.max_deliver;
        let mut sent = Vec::new();
        let mut failed: Vec<(i64, String)> = Vec::new();
        let mut retry = Vec::new();
        let mut retry_after: Option<Duration> = None;
        let mut retry_reason = String::new();
        for (user, r) in claimed.iter().zip(results) {
            match r {
                Sent::Ok => sent.push(*user),
                Sent::Failed(reason) => failed.push((*user, reason)),
                Sent::Retry(reason, _) if last => failed.push((
                    *user,
                    format!("gave up after {} deliveries: {reason}", d.delivered),
                )),
                Sent::Retry(reason, after) => {
                    retry.push(*user);
                    retry_after = retry_after.max(after);
                    retry_reason = reason;
                }
            }
        }
        let again = !retry.is_empty() || (busy > 0 && !last);
        // The leases on this batch's blocks go with the last confirmation when nothing is
        // left to retry; otherwise with the release below, after every confirmation.
        let release = Release {
            token: &token,
            users: &users,
        };
        // Sends happened: confirm them first (Redis only), so a database outage cannot turn
        // them into repeats; then record the failures and settle those.
        let now = chrono::Utc::now();
        let failed_users: Vec<i64> = failed.iter().map(|(u, _)| *u).collect();
        let last_call = !again && failed.is_empty();
        let totals = settle_with_retries(|| async {
            markers
                .confirm_totals(
                    scope,
                    &field,
                    Settled::Sent,
                    &sent,
                    last_call.then_some(release),
                )
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
        let total_sent = totals.sent;
        // Without failures now, the failed total is what earlier deliveries left.
        let total_failed = if failed.is_empty() {
            totals.failed
        } else {
            settle_with_retries(|| async {
                self.shared
                    .store
                    .record_failures(cid, &failed, now)
                    .await
                    .map_err(|e| e.to_string())?;
                markers
                    .confirm_totals(
                        scope,
                        &field,
                        Settled::Failed,
                        &failed_users,
                        (!again).then_some(release),
                    )
                    .await
                    .map(|t| t.failed)
                    .map_err(|e| e.to_string())
            })
            .await?
        };
        if again {
            if let Err(e) = markers.release(scope, &users, &token).await {
                tracing::warn!(campaign_id = cid, error = %e, "releasing claims failed; they expire");
            }
            let reason = if retry.is_empty() {
                format!("{busy} recipients are being sent by another worker")
            } else {
                format!("{} recipients to retry: {retry_reason}", retry.len())
            };
            return Ok(Outcome::Retry {
                reason,
                delay: retry_after,
            });
        }
        let recipients = users.len() as i64;
        let skipped = (recipients - total_sent - total_failed).max(0);
        let record = BatchRecord {
            campaign_id: cid,
            bucket: batch.bucket,
            part: batch.part,
            recipients: recipients as i32,
            sent: total_sent as i32,
            skipped: skipped as i32,
            failed: total_failed as i32,
            done_at: chrono::Utc::now(),
        };
        let finished = FinishedBatch {
            record,
            campaign: scope,
        };
        settle_with_retries(|| async { self.shared.batch_records.call(finished.clone()).await })
            .await?;
        Ok(Outcome::Done)
    }
}

/// Decodes and checks a push batch of `campaign`. A batch of an older campaign with the same
/// id (another epoch) is acked and skipped; an undecodable or invalid one is rejected.
pub(crate) fn checked_batch(d: &Delivery, campaign: &Campaign) -> Result<PushBatch, Outcome> {
    let batch: PushBatch = decode(&d.payload).map_err(|e| Outcome::Reject {
        reason: format!("undecodable PushBatch: {e}"),
    })?;
    if batch.epoch != campaign.epoch {
        tracing::debug!(
            campaign_id = campaign.id,
            epoch = batch.epoch,
            "stale PushBatch skipped"
        );
        return Err(Outcome::Done);
    }
    if batch.campaign_id != campaign.id
        || batch.user_ids.is_empty()
        || batch.user_ids.len() > MAX_BATCH_RECIPIENTS
    {
        return Err(Outcome::Reject {
            reason: format!(
                "invalid push batch: campaign {} with {} recipients",
                batch.campaign_id,
                batch.user_ids.len()
            ),
        });
    }
    Ok(batch)
}

async fn settle_with_retries<T, F, Fut>(mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < SETTLE_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "settling batch failed, retrying");
                tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[async_trait]
impl Stage for PushSender {
    const NAME: &'static str = "push";

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
        match self.process(batch, &d).await {
            Ok(outcome) => outcome,
            Err(reason) => {
                tracing::warn!(campaign_id = self.campaign.id, reason = %reason, "push batch failed");
                Outcome::retry(reason)
            }
        }
    }
}

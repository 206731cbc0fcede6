//! The consume side of a stage: pull messages from a durable consumer, run a handler on each
//! with bounded concurrency, and settle each by what the handler returned. Acks happen only
//! after the work; a retry naks with a growing delay; the last failed delivery, or a message
//! the handler rejects, goes to the dead-letter stream with the reason and is terminated.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use herald_schemas::{encode, DeadLetter, Subjects, SCHEMA_VERSION};

use crate::{
    publish_all,
    pull::{pull_messages, PullError},
    NatsError, Outgoing,
};

/// How a stage pulls and retries.
#[derive(Debug, Clone)]
pub struct ConsumeSettings {
    /// Messages handled at once by this worker.
    pub concurrency: usize,
    /// Deliveries before a failing message is dead-lettered (must match the consumer's).
    pub max_deliver: i64,
    /// The consumer's ack wait; progress is reported at a third of it during long work.
    pub ack_wait: Duration,
    /// First retry delay; doubles per delivery.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for ConsumeSettings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_deliver: 8,
            ack_wait: Duration::from_secs(30),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// What the handler made of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The work is done: ack.
    Done,
    /// Try again later (after `delay`, or the backoff for this delivery).
    Retry {
        /// Why.
        reason: String,
        /// Wait at least this long.
        delay: Option<Duration>,
    },
    /// Never going to work (undecodable, invalid): dead-letter at once.
    Reject {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// A retry with the default backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            reason: reason.into(),
            delay: None,
        }
    }
}

/// One delivery of a message, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The payload.
    pub payload: Bytes,
    /// The subject it was published on.
    pub subject: String,
    /// Which delivery this is, from 1.
    pub delivered: i64,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// Its `Content-Type` header, when it has one.
    pub content_type: Option<String>,
}

impl Delivery {
    /// The delivery of `msg`, or None when it carries no JetStream metadata.
    pub(crate) fn of(msg: &jetstream::Message) -> Option<Self> {
        let info = msg.info().ok()?;
        Some(Delivery {
            payload: msg.payload.clone(),
            subject: msg.subject.to_string(),
            delivered: info.delivered,
            stream_sequence: info.stream_sequence,
            content_type: msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str().to_string()),
        })
    }
}

/// Pulls from `consumer` until `stop` resolves, handling up to `settings.concurrency` messages
/// at once. Messages in flight when `stop` resolves are finished and settled; those not yet
/// started are left unacked and come back to some worker after the ack wait. Returns
/// [`NatsError::ConsumerDeleted`] when the consumer is deleted under it.
pub async fn consume<H, Fut, S>(
    js: jetstream::Context,
    subjects: Subjects,
    consumer: PullConsumer,
    settings: ConsumeSettings,
    stop: S,
    handler: H,
) -> Result<(), NatsError>
where
    H: Fn(Delivery) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
    S: Future<Output = ()> + Send,
{
    let mut consumer = consumer;
    let durable = consumer.cached_info().name.clone();
    let stream_name = consumer.cached_info().stream_name.clone();
    let messages = pull_messages(&js, &consumer, settings.concurrency).await?;
    let _ = consumer.info().await;
    let deleted = AtomicBool::new(false);
    let deleted = &deleted;
    let messages = messages.take_until(stop);
    messages
        .for_each_concurrent(settings.concurrency.max(1), |item| {
            let handler = handler.clone();
            let js = js.clone();
            let subjects = subjects.clone();
            let settings = settings.clone();
            let durable = durable.clone();
            let stream_name = stream_name.clone();
            async move {
                let msg = match item {
                    Ok(m) => m,
                    Err(e) => {
                        pull_error(&durable, &e, deleted);
                        return;
                    }
                };
                let Some(delivery) = Delivery::of(&msg) else {
                    tracing::warn!(consumer = %durable, "message without jetstream info, ignored");
                    return;
                };
                let outcome = with_progress(
                    std::slice::from_ref(&msg),
                    settings.ack_wait,
                    handler(delivery.clone()),
                )
                .await;
                settle(
                    &js,
                    &subjects,
                    &stream_name,
                    &durable,
                    &settings,
                    &msg,
                    &delivery,
                    outcome,
                )
                .await;
            }
        })
        .await;
    ended(durable, deleted)
}

/// Logs a pull error. Heartbeat and pull errors are usually transient, and the stream goes
/// on. A deleted consumer ends it: that is how a campaign's stages learn that another node
/// finished it, so it is noted in `deleted` and logged as news, not as a fault.
pub(crate) fn pull_error(durable: &str, e: &PullError, deleted: &AtomicBool) {
    if *e == PullError::ConsumerDeleted {
        deleted.store(true, Ordering::Relaxed);
        tracing::info!(consumer = %durable, "consumer deleted, pulling stops");
    } else {
        tracing::warn!(consumer = %durable, error = %e, "pull error");
    }
}

/// How a consume loop that has run to its end returns.
pub(crate) fn ended(durable: String, deleted: &AtomicBool) -> Result<(), NatsError> {
    if deleted.load(Ordering::Relaxed) {
        return Err(NatsError::ConsumerDeleted(durable));
    }
    Ok(())
}

/// Runs `work`, telling the server the messages are still in progress while it runs long.
pub(crate) async fn with_progress<F: Future>(
    msgs: &[jetstream::Message],
    ack_wait: Duration,
    work: F,
) -> F::Output {
    let period = (ack_wait / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for msg in msgs {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "progress ack failed");
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn settle(
    js: &jetstream::Context,
    subjects: &Subjects,
    stream: &str,
    durable: &str,
    settings: &ConsumeSettings,
    msg: &jetstream::Message,
    delivery: &Delivery,
    outcome: Outcome,
) {
    let result = match outcome {
        Outcome::Done => msg.ack().await.map_err(|e| e.to_string()),
        Outcome::Retry { reason, delay } if delivery.delivered < settings.max_deliver => {
            let delay = delay.unwrap_or_else(|| backoff(settings, delivery.delivered));
            tracing::info!(consumer = durable, delivered = delivery.delivered, reason = %reason, ?delay, "retrying message");
            msg.ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| e.to_string())
        }
        Outcome::Retry { reason, .. } => {
            let reason = format!("gave up after {} deliveries: {reason}", delivery.delivered);
            dead_letter(js, subjects, stream, durable, msg, delivery, reason).await
        }
        Outcome::Reject { reason } => {
            dead_letter(js, subjects, stream, durable, msg, delivery, reason).await
        }
    };
    if let Err(e) = result {
        // The message stays unacked and comes back after the ack wait: nothing is lost.
        tracing::warn!(consumer = durable, error = %e, "settling message failed");
    }
}

/// The retry delay for the given delivery number: base * 2^(n-1), capped.
pub fn backoff(settings: &ConsumeSettings, delivered: i64) -> Duration {
    let exp = (delivered.max(1) - 1).min(16) as u32;
    settings
        .retry_base
        .saturating_mul(2u32.saturating_pow(exp))
        .min(settings.retry_max)
}

async fn dead_letter(
    js: &jetstream::Context,
    subjects: &Subjects,
    stream: &str,
    durable: &str,
    msg: &jetstream::Message,
    delivery: &Delivery,
    reason: String,
) -> Result<(), String> {
    tracing::warn!(consumer = durable, subject = %delivery.subject, reason = %reason, "dead-lettering message");
    let letter = DeadLetter {
        v: SCHEMA_VERSION,
        stream: stream.to_string(),
        consumer: durable.to_string(),
        subject: delivery.subject.clone(),
        stream_sequence: delivery.stream_sequence,
        delivered: delivery.delivered,
        reason,
        payload: delivery.payload.to_vec(),
    };
    let payload = encode(&letter).map_err(|e| e.to_string())?;
    let out = Outgoing {
        subject: subjects.dead_letter(stream),
        msg_id: format!("dl:{stream}:{durable}:{}", delivery.stream_sequence),
        payload: payload.into(),
    };
    match publish_all(js, std::slice::from_ref(&out)).await {
        Ok(()) => msg.ack_with(AckKind::Term).await.map_err(|e| e.to_string()),
        Err(e) => {
            // Keep the message rather than lose it; it comes back later.
            let _ = msg
                .ack_with(AckKind::Nak(Some(dead_letter_retry_delay())))
                .await;
            Err(format!("dead letter publish failed: {e}"))
        }
    }
}

fn dead_letter_retry_delay() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let s = ConsumeSettings {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(backoff(&s, 1), Duration::from_millis(100));
        assert_eq!(backoff(&s, 2), Duration::from_millis(200));
        assert_eq!(backoff(&s, 4), Duration::from_millis(800));
        assert_eq!(backoff(&s, 5), Duration::from_secs(1));
        assert_eq!(backoff(&s, 100), Duration::from_secs(1));
    }
}

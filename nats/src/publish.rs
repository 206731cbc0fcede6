//! Batched publishing: send every message of a batch, then await every ack, so a batch of a
//! hundred costs one round trip, not a hundred. Each message carries a deterministic
//! `Nats-Msg-Id`, so re-publishing a batch after a crash is dropped by the server's dedupe.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;

use crate::NatsError;

/// How many times a batch is sent before the error is returned.
const PUBLISH_ATTEMPTS: u32 = 4;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Subject.
    pub subject: String,
    /// Deterministic message id for server-side dedupe.
    pub msg_id: String,
    /// Encoded payload.
    pub payload: Bytes,
}

/// Publishes all messages and waits until the server stored every one. Retries the whole
/// batch a bounded number of times; dedupe by message id makes the retry safe.
pub async fn publish_all(js: &jetstream::Context, batch: &[Outgoing]) -> Result<(), NatsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match publish_once(js, batch).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < PUBLISH_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "publish batch failed, retrying");
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt - 1))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn publish_once(js: &jetstream::Context, batch: &[Outgoing]) -> Result<(), NatsError> {
    let mut acks = Vec::with_capacity(batch.len());
    for m in batch {
        let ack = js
            .send_publish(
                m.subject.clone(),
                PublishMessage::build()
                    .payload(m.payload.clone())
                    .message_id(&m.msg_id),
            )
            .await
            .map_err(|e| NatsError::Publish {
                subject: m.subject.clone(),
                reason: e.to_string(),
            })?;
        acks.push((m, ack));
    }
    for (m, ack) in acks {
        ack.await.map_err(|e| NatsError::Publish {
            subject: m.subject.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

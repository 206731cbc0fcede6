//! The batch consume loop, for high-rate small messages such as login events: whatever
//! messages are ready (up to a batch size) go to the handler together, so it can make one
//! Redis call and one multi-row insert for all of them. Each message is still settled on its
//! own by the outcome the handler returned for it: ack, retry with backoff, or dead letter.

use std::{future::Future, sync::atomic::AtomicBool};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use herald_schemas::Subjects;

use crate::{
    consume::{ended, pull_error, settle, with_progress, ConsumeSettings, Delivery, Outcome},
    pull::pull_messages,
    NatsError,
};

/// How the batch loop pulls.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Retry and concurrency (batches handled at once by this worker).
    pub consume: ConsumeSettings,
    /// Most messages per batch.
    pub batch_size: usize,
}

/// Pulls from `consumer` until `stop` resolves and hands ready messages to `handler` in
/// batches of up to `batch_size`, `consume.concurrency` batches at once. The handler returns
/// one outcome per delivery, in order; a missing outcome counts as a retry. Returns
/// [`NatsError::ConsumerDeleted`] when the consumer is deleted under it.
pub async fn consume_batches<H, Fut, S>(
    js: jetstream::Context,
    subjects: Subjects,
    consumer: PullConsumer,
    settings: BatchSettings,
    stop: S,
    handler: H,
) -> Result<(), NatsError>
where
    H: Fn(Vec<Delivery>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Vec<Outcome>> + Send,
    S: Future<Output = ()> + Send,
{
    let mut consumer = consumer;
    let durable = consumer.cached_info().name.clone();
    let stream_name = consumer.cached_info().stream_name.clone();
    let size = settings.batch_size.max(1);
    let concurrency = settings.consume.concurrency.max(1);
    let messages = pull_messages(&js, &consumer, size * concurrency).await?;
    let _ = consumer.info().await;
    let deleted = AtomicBool::new(false);
    let deleted = &deleted;
    let batches = messages.take_until(stop).ready_chunks(size);
    batches
        .for_each_concurrent(concurrency, |items| {
            let handler = handler.clone();
            let js = js.clone();
            let subjects = subjects.clone();
            let settings = settings.consume.clone();
            let durable = durable.clone();
            let stream_name = stream_name.clone();
            async move {
                let mut msgs = Vec::with_capacity(items.len());
                let mut deliveries = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Ok(m) => match Delivery::of(&m) {
                            Some(d) => {
                                deliveries.push(d);
                                msgs.push(m);
                            }
                            None => {
                                tracing::warn!(consumer = %durable, "message without jetstream info, ignored")
                            }
                        },
                        Err(e) => pull_error(&durable, &e, deleted),
                    }
                }
                if msgs.is_empty() {
                    return;
                }
                let outcomes =
                    with_progress(&msgs, settings.ack_wait, handler(deliveries.clone())).await;
                let mut outcomes = outcomes.into_iter();
                let settles = msgs.iter().zip(&deliveries).map(|(msg, d)| {
                    let outcome = outcomes
                        .next()
                        .unwrap_or_else(|| Outcome::retry("handler returned no outcome"));
                    let (js, subjects, settings) = (&js, &subjects, &settings);
                    let (stream_name, durable) = (&stream_name, &durable);
                    async move {
                        settle(js, subjects, stream_name, durable, settings, msg, d, outcome)
                            .await
                    }
                });
                futures::future::join_all(settles).await;
            }
        })
        .await;
    ended(durable, deleted)
}

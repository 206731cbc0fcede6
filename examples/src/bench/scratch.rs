//! A throwaway stream with one pull consumer, and a producer that publishes into it with acks
//! awaited in windows, shared by the scenarios that measure the bus without herald's pipeline.

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use tokio::task::JoinHandle;

/// Publishes awaited in flight at once.
const WINDOW: usize = 1000;

/// A fresh stream `<PREFIX>_<NAME>` on `<prefix>.<name>` with a durable consumer `name`.
pub async fn stream_with_consumer(
    js: &jetstream::Context,
    prefix: &str,
    name: &str,
    consumer: pull::Config,
) -> anyhow::Result<(String, String, herald_nats::PullStream)> {
    let stream_name =
        herald_engine::schemas::Subjects::new(prefix).stream(&name.to_ascii_uppercase());
    let subject = format!("{prefix}.{name}");
    let _ = js.delete_stream(&stream_name).await;
    let st = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some(name.to_string()),
            ..consumer
        })
        .await?;
    // herald's own pull stream, so a lost pull request stalls the scratch consumer no
    // longer than it would stall a stage.
    let messages = herald_nats::pull_messages(js, &consumer, 200).await?;
    Ok((stream_name, subject, messages))
}

/// Publishes every payload `payloads` yields to `subject`, awaiting acks a window at a time.
pub fn produce(
    js: jetstream::Context,
    subject: String,
    payloads: impl Iterator<Item = anyhow::Result<Bytes>> + Send + 'static,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut acks = Vec::with_capacity(WINDOW);
        for payload in payloads {
            acks.push(js.publish(subject.clone(), payload?).await?);
            if acks.len() == WINDOW {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        Ok(())
    })
}

//! The bus's own limit on this machine: publish and consume the same bytes the pipeline
//! moves (one ~PushBatch-sized message per 100 users) with no processing at all.

use std::time::Instant;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use herald_engine::schemas::{encode, PushBatch};

/// Messages moved and the time it took.
pub struct CeilingResult {
    pub messages: u64,
    pub bytes_per_message: usize,
    pub seconds: f64,
}

pub async fn run(
    nats: &async_nats::Client,
    prefix: &str,
    users: i64,
) -> anyhow::Result<CeilingResult> {
    let js = jetstream::new(nats.clone());
    let (name, subject, stream) = crate::scratch::stream_with_consumer(
        &js,
        prefix,
        "ceiling",
        pull::Config {
            max_ack_pending: 10_000,
            ..Default::default()
        },
    )
    .await?;
    let messages = (users + 99) / 100;
    let sample = encode(&PushBatch::new(1, 1, 0, (1_000_000..1_000_100).collect()))?;
    let size = sample.len();
    let started = Instant::now();
    let payload = bytes::Bytes::from(sample);
    let producer = crate::scratch::produce(
        js.clone(),
        subject,
        (0..messages).map(move |_| Ok(payload.clone())),
    );
    let mut stream = stream.take(messages as usize);
    let mut n = 0u64;
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        n += 1;
    }
    producer.await??;
    let seconds = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(CeilingResult {
        messages: n,
        bytes_per_message: size,
        seconds,
    })
}

//! The bus's own limit on this machine: publish and consume the same bytes the pipeline
//! moves (one ~PushBatch-sized message per 100 users) with no processing at all.

use std::time::Instant;

use async_nats::jetstream::{self, consumer::pull, stream};
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
    let name = format!("{}_CEILING", prefix.to_ascii_uppercase());
    let subject = format!("{prefix}.ceiling");
    let _ = js.delete_stream(&name).await;
    let st = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let consumer = st
        .create_consumer(pull::Config {
            durable_name: Some("ceiling".into()),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let messages = (users + 99) / 100;
    let sample = encode(&PushBatch::new(1, 1, 0, (1_000_000..1_000_100).collect()))?;
    let size = sample.len();
    let started = Instant::now();
    let producer = {
        let js = js.clone();
        let subject = subject.clone();
        let payload = bytes::Bytes::from(sample);
        tokio::spawn(async move {
            let mut acks = Vec::with_capacity(1000);
            for _ in 0..messages {
                acks.push(js.publish(subject.clone(), payload.clone()).await?);
                if acks.len() == 1000 {
                    for a in acks.drain(..) {
                        a.await?;
                    }
                }
            }
            for a in acks {
                a.await?;
            }
            anyhow::Ok(())
        })
    };
    let mut stream = consumer.messages().await?.take(messages as usize);
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

//! The reference design's shape, for comparison: one JetStream message per user, and a
//! per-user string marker read with GET and written with SET after the send (check-then-set,
//! one Redis round trip each). Same provider, same servers, same machine.

use std::{sync::Arc, time::Instant};

use async_nats::jetstream::{self, consumer::pull};
use fred::{
    clients::Client,
    interfaces::{ClientLike, KeysInterface},
};
use futures::StreamExt;
use herald_engine::{schemas::InformType, Provider, Push};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct UserMessage {
    campaign_id: i64,
    user_id: i64,
    title: String,
    body: String,
}

/// What the baseline run measured.
pub struct BaselineResult {
    /// Messages handled (one per user).
    pub users: u64,
    /// Users of the run the provider never received (counted against the users asked
    /// for, so a stream that ended early shows here too).
    pub missing: u64,
    /// Errors the pull stream yielded: a missed heartbeat means the consumer stalled until
    /// its pull request ran out, and that round's time (and ratio) says so.
    pub pull_errors: u64,
    pub seconds: f64,
    /// Users the provider received more than once.
    pub duplicates: u64,
    /// CPU of this process and the servers during the run.
    pub cpu: crate::proc::CpuSnapshot,
}

pub async fn run(
    nats: &async_nats::Client,
    redis_url: &str,
    prefix: &str,
    users: i64,
    latency_ms: u64,
    concurrency: usize,
) -> anyhow::Result<BaselineResult> {
    let js = jetstream::new(nats.clone());
    let (name, subject, messages) = crate::scratch::stream_with_consumer(
        &js,
        prefix,
        "baseline",
        pull::Config {
            ack_wait: std::time::Duration::from_secs(60),
            max_ack_pending: concurrency as i64 * 2,
            ..Default::default()
        },
    )
    .await?;
    let redis =
        herald_actors::markers::connect(redis_url, std::time::Duration::from_secs(10)).await?;
    // herald's pushes count with the same provider.
    let provider = Arc::new(crate::counting::CountingProvider::new(users, latency_ms));
    let cpu0 = crate::proc::CpuSnapshot::now();
    let started = Instant::now();

    // One message per user.
    let producer = crate::scratch::produce(
        js.clone(),
        subject,
        (1..=users).map(|user_id| {
            let m = UserMessage {
                campaign_id: 1,
                user_id,
                title: "Double 11 is on".into(),
                body: "Open the app for your deal".into(),
            };
            Ok(rmp_serde::to_vec_named(&m)?.into())
        }),
    );

    // A pull error is not a message: it is counted and reported, and `users` messages are
    // still handled.
    let mut pull_errors = 0u64;
    let mut messages = messages
        .filter_map(|m| {
            futures::future::ready(match m {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("baseline: pull error: {e}");
                    pull_errors += 1;
                    None
                }
            })
        })
        .take(users as usize);
    let key_prefix = format!("{prefix}:baseline");
    let handled = futures::stream::poll_fn(|cx| messages.poll_next_unpin(cx))
        .map(|m| {
            let redis: Client = redis.clone();
            let provider = provider.clone();
            let key_prefix = key_prefix.clone();
            async move {
                let u: UserMessage = rmp_serde::from_slice(&m.payload)?;
                let key = format!("{key_prefix}:{}:{}", u.campaign_id, u.user_id);
                let seen: Option<String> = redis.get(&key).await?;
                if seen.is_none() {
                    let push = Push {
                        campaign_id: u.campaign_id,
                        user_id: u.user_id,
                        channel: InformType::App,
                        title: u.title.into(),
                        body: u.body.into(),
                    };
                    let _ = provider.send(&push).await;
                    let _: () = redis.set(&key, "1", None, None, false).await?;
                }
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .fold(0u64, |n, r| async move {
            if let Err(e) = r {
                eprintln!("baseline: {e:#}");
            }
            n + 1
        })
        .await;
    drop(messages);
    producer.await??;
    let seconds = started.elapsed().as_secs_f64();
    let (duplicates, missing) = provider.duplicates_and_misses();
    let cpu = crate::proc::CpuSnapshot::since(&cpu0);
    // Clean up: the stream and the per-user keys.
    let _ = js.delete_stream(&name).await;
    herald_actors::markers::delete_matching(&redis, &format!("{key_prefix}:*")).await?;
    let _ = redis.quit().await;
    Ok(BaselineResult {
        users: handled,
        missing,
        pull_errors,
        seconds,
        duplicates,
        cpu,
    })
}

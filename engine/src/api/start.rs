//! Starting the API service, by default on a thread of its own.
//!
//! On a node that also runs the pipeline, thousands of stage tasks share the runtime's
//! workers, and tokio has no priorities: a create would wait in the same queue as every
//! push batch. The API therefore gets its own single-threaded runtime on its own OS thread,
//! with its own NATS connection, database pool and Redis client, so a request is picked up
//! as soon as the operating system runs that thread (a thread that was asleep is scheduled
//! promptly) instead of after whatever the pipeline queued.

use std::time::Duration;

use anyhow::Context;
use fred::clients::Client as Redis;
use herald_actors::{coupons::ActiveCoupons, markers, store::Store};
use herald_schemas::Subjects;
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{AfterCreates, ApiService, CreateBatcher};
use crate::{
    config::Config,
    engine::{connect_db_with, connect_nats},
};

/// How long a stopping API waits for its queued Redis records and announcements.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves the API until `stop`: on its own thread when `api.own_thread` is set, else on the
/// caller's runtime with the node's `redis` and `nats`. The handle ends when the API has
/// stopped.
pub async fn start(
    config: &Config,
    node_id: &str,
    redis: Redis,
    nats: async_nats::Client,
    claim_ttl: Duration,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    if !config.api.own_thread {
        let (service, after) = build(config, redis, nats, claim_ttl).await?;
        let served = service.spawn(stop).await?;
        return Ok(tokio::spawn(async move {
            let _ = served.await;
            let _ = tokio::time::timeout(DRAIN, after).await;
        }));
    }
    let config = config.clone();
    let name = format!("herald {node_id} api");
    let (ready_tx, ready_rx) = oneshot::channel::<anyhow::Result<()>>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("herald-api".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(serve_here(config, name, claim_ttl, stop, ready_tx));
            drop(done_tx);
        })
        .context("starting the API thread")?;
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the API thread ended while starting"))??;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// Runs on the API thread: connects, serves until `stop`, then drains.
async fn serve_here(
    config: Config,
    name: String,
    claim_ttl: Duration,
    stop: CancellationToken,
    ready: oneshot::Sender<anyhow::Result<()>>,
) {
    let started = async {
        let redis = markers::connect(
            &config.redis.url,
            Duration::from_millis(config.redis.command_timeout_ms),
        )
        .await
        .context("connecting the API to Redis")?;
        let nats = connect_nats(&config.nats.url, &name).await?;
        let (service, after) = build(&config, redis, nats.clone(), claim_ttl).await?;
        let served = service.spawn(stop).await?;
        anyhow::Ok((served, after, nats))
    }
    .await;
    match started {
        Ok((served, after, nats)) => {
            let _ = ready.send(Ok(()));
            let _ = served.await;
            // The service and its senders are gone: the collector ends once it has sent
            // what was queued.
            let _ = tokio::time::timeout(DRAIN, after).await;
            let _ = nats.flush().await;
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// The service and its after-reply collector (which ends when the service is dropped).
async fn build(
    config: &Config,
    redis: Redis,
    nats: async_nats::Client,
    claim_ttl: Duration,
) -> anyhow::Result<(ApiService, JoinHandle<()>)> {
    let js = async_nats::jetstream::new(nats.clone());
    let subjects = Subjects::new(config.nats.prefix.clone());
    let connections = config.api.db_connections.max(1);
    // Every connection open and its insert ready before the first request: a burst of
    // creates right after a start otherwise waits for a connection to open and a statement
    // to be prepared.
    let store = Store::new(connect_db_with(&config.database.url, connections, connections).await?);
    store
        .warm_campaign_inserts(connections as usize)
        .await
        .context("preparing the API's campaign insert")?;
    let (after, collector) = AfterCreates::start(
        redis.clone(),
        js.clone(),
        subjects.clone(),
        config.api.max_in_flight * 2,
    );
    let service = ApiService {
        after,
        creates: CreateBatcher::start(
            store.clone(),
            config.api.max_in_flight,
            connections as usize,
        ),
        coupons: ActiveCoupons::new(redis.clone(), &subjects.redis_prefix(), claim_ttl),
        nats,
        js,
        subjects,
        store,
        redis,
        dedupe_window: Duration::from_secs(config.api.dedupe_window_secs),
        max_in_flight: config.api.max_in_flight,
    };
    Ok((service, collector))
}

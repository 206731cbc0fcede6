//! The NATS request/reply API: `<prefix>.api.campaign.create` and `.status`, and
//! `<prefix>.api.coupon.create`, `.claim` and `.status` (the `coupons` module). Bodies are JSON, or
//! MessagePack with
//! `Content-Type: application/msgpack`; the reply uses the request's encoding. Every node
//! serves in one queue group, so requests spread over the nodes.
//!
//! A create is validated, deduplicated (Redis for the window, the database as the fallback
//! when Redis has lost its data), inserted, answered, and then announced on the campaigns
//! stream.

use std::{sync::Arc, time::Duration};

use async_nats::{HeaderMap, Message};
use chrono::{DateTime, SubsecRound, Utc};
use fred::{
    clients::Client as Redis,
    interfaces::KeysInterface,
    types::{Expiration, SetOptions},
};
use futures::StreamExt;
use herald_actors::{
    coupons::ActiveCoupons,
    store::{NewCampaign, Store},
};
use herald_schemas::{
    parse_request, ApiError, CampaignState, CampaignStatusReply, CampaignStatusRequest,
    CreateCampaignReply, CreateCampaignRequest, Encoding, ErrorReply, Subjects,
};
use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinHandle};
use tokio_util::sync::CancellationToken;

mod after_create;
mod coupons;
mod create_batch;
mod prune;
mod start;

pub use after_create::{AfterCreate, AfterCreates};
pub use create_batch::CreateBatcher;
pub use start::start;

/// How long a create in progress holds its dedupe key before a repeat may proceed.
const PENDING_TTL: Duration = Duration::from_secs(30);

/// What the API service needs.
#[derive(Clone)]
pub struct ApiService {
    /// NATS connection.
    pub nats: async_nats::Client,
    /// JetStream context.
    pub js: async_nats::jetstream::Context,
    /// Names.
    pub subjects: Subjects,
    /// Database.
    pub store: Store,
    /// Redis.
    pub redis: Redis,
    /// Dedupe window.
    pub dedupe_window: Duration,
    /// Requests in flight.
    pub max_in_flight: usize,
    /// The active lazy coupons in Redis.
    pub coupons: ActiveCoupons,
    /// Groups the campaign inserts of concurrent creates.
    pub creates: CreateBatcher,
    /// Groups the Redis records and announcements that follow creates.
    pub after: AfterCreates,
}

/// The request subjects the service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    CampaignCreate,
    CampaignStatus,
    CouponCreate,
    CouponClaim,
    CouponStatus,
}

impl ApiService {
    /// Subscribes and serves until `stop` is cancelled; in-flight requests are finished.
    pub async fn spawn(self, stop: CancellationToken) -> anyhow::Result<JoinHandle<()>> {
        let group = format!("{}-api", self.subjects.prefix());
        let s = &self.subjects;
        let mut subs = Vec::new();
        for (endpoint, subject) in [
            (Endpoint::CampaignCreate, s.api_campaign_create()),
            (Endpoint::CampaignStatus, s.api_campaign_status()),
            (Endpoint::CouponCreate, s.api_coupon_create()),
            (Endpoint::CouponClaim, s.api_coupon_claim()),
            (Endpoint::CouponStatus, s.api_coupon_status()),
        ] {
            let sub = self.nats.queue_subscribe(subject, group.clone()).await?;
            subs.push(sub.map(move |m| (endpoint, m)).boxed());
        }
        // Make sure the server has the subscriptions before callers are told we are up.
        herald_nats::sync_with_server(&self.nats).await;
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.max_in_flight.max(1)));
        // Its own token: the pruner also ends when the requests end without `stop`.
        let prune_stop = stop.child_token();
        let pruner = tokio::spawn(prune::expired_claims(
            this.store.clone(),
            this.dedupe_window,
            prune_stop.clone(),
        ));
        Ok(tokio::spawn(async move {
            let requests = futures::stream::select_all(subs).take_until(stop.cancelled_owned());
            let mut requests = std::pin::pin!(requests);
            let mut tasks = tokio::task::JoinSet::new();
            while let Some((endpoint, msg)) = requests.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let this = this.clone();
                tasks.spawn(async move {
                    this.serve(endpoint, msg).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            prune_stop.cancel();
            let _ = pruner.await;
        }))
    }

    async fn serve(&self, endpoint: Endpoint, msg: Message) {
        let encoding = Encoding::from_content_type(
            msg.headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
        );
        let body = &msg.payload;
        let body = match endpoint {
            Endpoint::CampaignCreate => reply(encoding, self.create(encoding, body).await),
            Endpoint::CampaignStatus => reply(encoding, self.status(encoding, body).await),
            Endpoint::CouponCreate => reply(encoding, self.create_coupon(encoding, body).await),
            Endpoint::CouponClaim => reply(encoding, self.claim_coupon(encoding, body).await),
            Endpoint::CouponStatus => reply(encoding, self.coupon_status(encoding, body).await),
        };
        let Some(reply) = msg.reply else {
            return; // a publish, not a request: nobody to answer
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding reply failed");
                return;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", encoding.content_type());
        if let Err(e) = self
            .nats
            .publish_with_headers(reply, headers, body.into())
            .await
        {
            tracing::warn!(error = %e, "sending reply failed");
        }
    }

    /// Runs `insert` once per dedupe key within the window and returns its id, whether this
    /// call is a repeat, and the creation time handed to `insert`. Redis spots repeats within the window; `insert` gets the time
    /// and the window's start, so the database can catch repeats Redis has forgotten.
    async fn deduped<F, Fut>(
        &self,
        dedupe_key: &str,
        insert: F,
    ) -> Result<(i64, bool, DateTime<Utc>), ApiError>
    where
        F: FnOnce(DateTime<Utc>, DateTime<Utc>) -> Fut,
        Fut: std::future::Future<Output = Result<(i64, bool), sea_orm::DbErr>>,
    {
        let key = format!(
            "{}:dedupe:{}",
            self.subjects.redis_prefix(),
            hex_digest(dedupe_key)
        );
        let window = self.dedupe_window;
        // Take the key for this create; a repeat finds it and gets the same id.
        let mut waited = Duration::ZERO;
        loop {
            let set: Option<String> = self
                .redis
                .set(
                    &key,
                    "pending",
                    Some(Expiration::PX(PENDING_TTL.as_millis() as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(redis_err)?;
            if set.is_some() {
                break;
            }
            let current: Option<String> = self.redis.get(&key).await.map_err(redis_err)?;
            match current.as_deref().map(str::parse::<i64>) {
                Some(Ok(id)) => return Ok((id, true, Utc::now())),
                Some(Err(_)) if waited < PENDING_TTL => {
                    // The same request is being created right now: wait for its id.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    waited += Duration::from_millis(20);
                }
                _ => {}
            }
        }
        // Whole milliseconds, so the stored time gives back the same epoch on every backend.
        let now = Utc::now().trunc_subsecs(3);
        let since = now - chrono::Duration::from_std(window).unwrap_or_default();
        let (id, duplicate) = match insert(now, since).await {
            Ok((id, inserted)) => (id, !inserted),
            Err(e) => {
                let _: Result<i64, _> = self.redis.del(&key).await;
                return Err(db_err(e));
            }
        };
        // Repeats now get the id from Redis; one that came in meanwhile waits for it.
        let ttl = window.saturating_sub((Utc::now() - now).to_std().unwrap_or_default());
        self.after.push(AfterCreate::RecordId { key, id, ttl });
        Ok((id, duplicate, now))
    }

    async fn create(
        &self,
        encoding: Encoding,
        body: &[u8],
    ) -> Result<CreateCampaignReply, ApiError> {
        let req: CreateCampaignRequest = parse_request(encoding, body)?;
        req.validate()?;
        let new = NewCampaign {
            kind: req.kind.as_str().into(),
            name: req.name.clone(),
            created_by: req.created_by.clone(),
            starts_at: req.starts_at,
            ends_at: req.ends_at,
            inform_type: req.inform_type,
            title: req.title.clone(),
            body: req.body.clone(),
            audience: req.audience.clone(),
            dedupe_key: req.dedupe_key(),
            coupon_id: None,
        };
        let key = new.dedupe_key.clone();
        let (id, duplicate, now) = self
            .deduped(&key, |now, since| self.creates.insert(new, now, since))
            .await?;
        if !duplicate {
            self.announce(id, now.timestamp_millis());
            tracing::debug!(campaign_id = id, name = %req.name, "campaign created");
        }
        Ok(CreateCampaignReply {
            ok: true,
            campaign_id: id,
            duplicate,
        })
    }

    /// Announces a new campaign on the campaigns stream, after the reply: the row is the
    /// record, and a lost announcement is repeated by the node that finds the pending campaign.
    fn announce(&self, campaign_id: i64, epoch: i64) {
        self.after
            .push(AfterCreate::Announce { campaign_id, epoch });
    }

    async fn status(
        &self,
        encoding: Encoding,
        body: &[u8],
    ) -> Result<CampaignStatusReply, ApiError> {
        let req: CampaignStatusRequest = parse_request(encoding, body)?;
        campaign_status(&self.store, req.campaign_id).await
    }
}

fn reply<T: Serialize>(
    encoding: Encoding,
    result: Result<T, ApiError>,
) -> Result<Vec<u8>, herald_schemas::CodecError> {
    match result {
        Ok(r) => encoding.encode(&r),
        Err(e) => encoding.encode(&ErrorReply::from(e)),
    }
}

/// The status reply of a campaign: final counters once finished, live sums while running.
pub async fn campaign_status(store: &Store, id: i64) -> Result<CampaignStatusReply, ApiError> {
    let row = store
        .status(id)
        .await
        .map_err(db_err)?
        .ok_or_else(|| ApiError::not_found(format!("campaign {id} not found")))?;
    let status = CampaignState::parse(&row.status)
        .ok_or_else(|| ApiError::unavailable(format!("campaign {id} has unknown status")))?;
    let p = store.progress(id).await.map_err(db_err)?;
    let (recipients, sent, skipped, failed) = if status.is_final() {
        (row.recipients, row.sent, row.skipped, row.failed)
    } else {
        (p.recipients, p.sent, p.skipped, p.failed)
    };
    Ok(CampaignStatusReply {
        ok: true,
        campaign_id: row.id,
        name: row.name,
        status,
        buckets_total: row.buckets_total.unwrap_or(0),
        buckets_done: p.buckets_done,
        recipients,
        sent,
        skipped,
        failed,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        error: row.error,
    })
}

pub(crate) fn redis_err(e: fred::error::Error) -> ApiError {
    tracing::warn!(error = %e, "redis request failed");
    ApiError::unavailable(format!("redis: {e}"))
}

pub(crate) fn db_err(e: sea_orm::DbErr) -> ApiError {
    tracing::warn!(error = %e, "database request failed");
    ApiError::unavailable(format!("database: {e}"))
}

/// A short stable digest for Redis keys (FNV-1a, 128 bits as two 64-bit lanes).
fn hex_digest(s: &str) -> String {
    let mut a: u64 = 0xcbf29ce484222325;
    let mut b: u64 = 0x84222325cbf29ce4;
    for byte in s.bytes() {
        a = (a ^ byte as u64).wrapping_mul(0x100000001b3);
        b = (b ^ byte as u64).wrapping_mul(0x100000001b3).rotate_left(5);
    }
    format!("{a:016x}{b:016x}")
}

/// Sends a request in `encoding` and decodes the reply; for the CLI and tests.
pub async fn request<T: Serialize, R: serde::de::DeserializeOwned>(
    nats: &async_nats::Client,
    subject: String,
    encoding: Encoding,
    body: &T,
    timeout: Duration,
) -> anyhow::Result<Result<R, ApiError>> {
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", encoding.content_type());
    let payload = encoding.encode(body)?;
    let msg = tokio::time::timeout(
        timeout,
        nats.request_with_headers(subject.clone(), headers, payload.into()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("no reply on {subject} within {timeout:?}: is a herald node running?")
    })?
    .map_err(|e| anyhow::anyhow!("request on {subject}: {e}"))?;
    let value: serde_json::Value = match encoding {
        Encoding::Json => serde_json::from_slice(&msg.payload)?,
        Encoding::MsgPack => rmp_serde::from_slice(&msg.payload)?,
    };
    if value.get("ok").and_then(|v| v.as_bool()) == Some(true) {
        Ok(Ok(serde_json::from_value(value)?))
    } else {
        let e: ErrorReply = serde_json::from_value(value)?;
        Ok(Err(e.error))
    }
}

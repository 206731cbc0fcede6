//! [`WebhookSink`]: a real HTTP server on 127.0.0.1 that plays the push gateway for
//! [`WebhookProvider`](crate::providers::WebhookProvider).
//!
//! `POST /push` takes the provider's JSON body and `Idempotency-Key` header. The sink answers
//! 400 to a malformed request or a rejected user, 503 or 429 at random at the configured
//! rates (drawn per request, so a retry of the same key eventually succeeds), and 200
//! otherwise; it counts every 200 per `(campaign_id, user_id)` in a [`Ledger`], so a test
//! can assert "every user once, nobody twice".

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use anyhow::{ensure, Context};
use axum::{
    body::Bytes,
    extract::State,
    http::{
        header::{CONTENT_TYPE, RETRY_AFTER},
        HeaderMap, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use herald_schemas::InformType;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::providers::{rng::SplitMix64, Ledger};

/// How long [`WebhookSink::shutdown`] waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a [`WebhookSink`] listens and misbehaves.
#[derive(Debug, Clone, Default)]
pub struct SinkConfig {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Share of requests (0..=1) answered 503.
    pub fail_503_rate: f64,
    /// Share of requests (0..=1) answered 429.
    pub fail_429_rate: f64,
    /// Users whose pushes are always answered 400 (a permanent failure).
    pub reject_user_ids: HashSet<i64>,
    /// Time the sink takes before answering each request, in milliseconds.
    pub latency_ms: u64,
    /// `Retry-After` seconds sent with injected 503 and 429 answers; none if unset.
    pub retry_after_secs: Option<u64>,
}

/// One push as the sink received it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkPush {
    /// The `Idempotency-Key` header.
    #[serde(skip)]
    pub idempotency_key: String,
    /// The campaign.
    pub campaign_id: i64,
    /// The recipient.
    pub user_id: i64,
    /// The channel.
    pub channel: InformType,
    /// The title.
    pub title: String,
    /// The body.
    pub body: String,
}

/// An in-process push gateway; see the module docs. Stops on [`shutdown`](Self::shutdown)
/// or drop.
#[derive(Debug)]
pub struct WebhookSink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct SinkState {
    config: SinkConfig,
    rng: SplitMix64,
    ledger: Ledger,
    requests: AtomicU64,
    answered_503: AtomicU64,
    answered_429: AtomicU64,
    rejected: AtomicU64,
    malformed: AtomicU64,
    last: Mutex<Option<SinkPush>>,
}

impl WebhookSink {
    /// Binds 127.0.0.1:`config.port` and starts serving.
    pub async fn start(config: SinkConfig) -> anyhow::Result<WebhookSink> {
        for (field, rate) in [
            ("fail_503_rate", config.fail_503_rate),
            ("fail_429_rate", config.fail_429_rate),
        ] {
            ensure!(
                (0.0..=1.0).contains(&rate),
                "webhook sink: {field} must be within 0..=1, got {rate}"
            );
        }
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))
            .await
            .with_context(|| format!("webhook sink: binding 127.0.0.1:{}", config.port))?;
        let addr = listener
            .local_addr()
            .context("webhook sink: reading the bound address")?;
        let state = Arc::new(SinkState {
            config,
            rng: SplitMix64::from_entropy(),
            ledger: Ledger::new(),
            requests: AtomicU64::new(0),
            answered_503: AtomicU64::new(0),
            answered_429: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            last: Mutex::new(None),
        });
        let router = Router::new()
            .route("/push", post(receive))
            .with_state(state.clone());
        let cancel = CancellationToken::new();
        let stop = cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(%addr, error = %e, "webhook sink stopped");
            }
        });
        Ok(WebhookSink {
            addr,
            state,
            cancel,
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/push`.
    pub fn url(&self) -> String {
        format!("http://{}/push", self.addr)
    }

    /// Pushes answered 200, repeats included.
    pub fn delivered_total(&self) -> u64 {
        self.state.ledger.total()
    }

    /// `(campaign_id, user_id)` pairs answered 200 at least once.
    pub fn distinct(&self) -> u64 {
        self.state.ledger.distinct()
    }

    /// 200 answers beyond the first per pair: 0 means exactly-once.
    pub fn duplicates(&self) -> u64 {
        self.state.ledger.duplicates()
    }

    /// Pushes to `user_id` for `campaign_id` answered 200.
    pub fn count(&self, campaign_id: i64, user_id: i64) -> u32 {
        self.state.ledger.count(campaign_id, user_id)
    }

    /// Pushes answered 200 for an `Idempotency-Key` (`campaign:user`); the sink refuses a
    /// key that does not match the body, so this equals [`count`](Self::count).
    pub fn count_key(&self, key: &str) -> u32 {
        parse_key(key).map_or(0, |(c, u)| self.state.ledger.count(c, u))
    }

    /// The users of `user_ids` that never got a 200 for `campaign_id`.
    pub fn missing(&self, campaign_id: i64, user_ids: impl Iterator<Item = i64>) -> Vec<i64> {
        self.state.ledger.missing(campaign_id, user_ids)
    }

    /// The ledger of 200-answered pushes (shared: it keeps counting).
    pub fn ledger(&self) -> Ledger {
        self.state.ledger.clone()
    }

    /// Failures the sink made on purpose: 503s, 429s and 400s for rejected users.
    pub fn failures_injected(&self) -> u64 {
        self.failures_503() + self.failures_429() + self.rejected()
    }

    /// Requests answered 503.
    pub fn failures_503(&self) -> u64 {
        self.state.answered_503.load(Ordering::Relaxed)
    }

    /// Requests answered 429.
    pub fn failures_429(&self) -> u64 {
        self.state.answered_429.load(Ordering::Relaxed)
    }

    /// Requests answered 400 because the user is in `reject_user_ids`.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }

    /// Requests answered 400 for a bad body, a missing or mismatched `Idempotency-Key`, or
    /// a content type other than JSON.
    pub fn malformed(&self) -> u64 {
        self.state.malformed.load(Ordering::Relaxed)
    }

    /// Requests to `/push`, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The last push answered 200.
    pub fn last_push(&self) -> Option<SinkPush> {
        self.state
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Resets every counter and the ledger.
    pub fn clear(&self) {
        let s = &self.state;
        s.ledger.clear();
        for counter in [
            &s.requests,
            &s.answered_503,
            &s.answered_429,
            &s.rejected,
            &s.malformed,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        *s.last.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Stops accepting, lets in-flight requests finish (up to 5 s), then returns.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        // The server task finishes its graceful shutdown on its own.
        self.cancel.cancel();
    }
}

async fn receive(State(state): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if state.config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(state.config.latency_ms)).await;
    }
    let push = match parse(&headers, &body) {
        Ok(push) => push,
        Err(reason) => {
            state.malformed.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, reason).into_response();
        }
    };
    if state.config.reject_user_ids.contains(&push.user_id) {
        state.rejected.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::BAD_REQUEST, "user rejected").into_response();
    }
    let draw = state.rng.next_f64();
    if draw < state.config.fail_503_rate {
        state.answered_503.fetch_add(1, Ordering::Relaxed);
        return injected(&state, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    if draw < state.config.fail_503_rate + state.config.fail_429_rate {
        state.answered_429.fetch_add(1, Ordering::Relaxed);
        return injected(&state, StatusCode::TOO_MANY_REQUESTS, "slow down");
    }
    state.ledger.record_delivery(push.campaign_id, push.user_id);
    *state.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(push);
    (StatusCode::OK, "ok").into_response()
}

fn injected(state: &SinkState, status: StatusCode, text: &'static str) -> Response {
    match state.config.retry_after_secs {
        Some(secs) => (status, [(RETRY_AFTER, secs.to_string())], text).into_response(),
        None => (status, text).into_response(),
    }
}

/// Checks the content type, the body shape and that the key matches the body.
fn parse(headers: &HeaderMap, body: &[u8]) -> Result<SinkPush, String> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/json") {
        return Err(format!(
            "content-type must be application/json, got {content_type:?}"
        ));
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or("missing idempotency-key header")?;
    let mut push: SinkPush =
        serde_json::from_slice(body).map_err(|e| format!("malformed body: {e}"))?;
    if parse_key(key) != Some((push.campaign_id, push.user_id)) {
        return Err(format!(
            "idempotency-key {key:?} does not match the body ({}:{})",
            push.campaign_id, push.user_id
        ));
    }
    push.idempotency_key = key.to_owned();
    Ok(push)
}

fn parse_key(key: &str) -> Option<(i64, i64)> {
    let (campaign, user) = key.split_once(':')?;
    Some((campaign.parse().ok()?, user.parse().ok()?))
}

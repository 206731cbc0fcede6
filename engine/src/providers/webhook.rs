//! [`WebhookProvider`]: POSTs each push as JSON to an HTTP endpoint, with an
//! `Idempotency-Key: campaign:user` header so the gateway can drop a repeat that herald's own
//! markers could not prevent (a crash between send and confirm).
//!
//! 2xx is delivered; 408, 429, 5xx, a timeout or a connection error are retryable (with
//! `Retry-After` seconds when the server sends them); any other status is permanent.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use async_trait::async_trait;
use herald_actors::provider::{Provider, Push, SendError};
use reqwest::{
    header::{CONTENT_TYPE, RETRY_AFTER},
    redirect, Response, StatusCode, Url,
};
use serde::Serialize;
use tokio::sync::Semaphore;

/// Default time limit for one request, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Default limit on requests in flight.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The header carrying [`Push::idempotency_key`].
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Most of an error body quoted in a failure reason, in characters.
const REASON_BODY_CHARS: usize = 200;
/// Most of a response body read; the rest is dropped with the connection.
const BODY_READ_LIMIT: usize = 64 * 1024;

/// Where and how a [`WebhookProvider`] sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Endpoint to POST to (`http://host:port/path`).
    pub url: String,
    /// Time limit for one request, connect included, in milliseconds.
    pub timeout_ms: u64,
    /// Most requests in flight at once (and idle connections kept).
    pub max_connections: usize,
}

impl WebhookConfig {
    /// A config for `url` with the default timeout and connection limit.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Checks the config and returns the parsed url.
pub(super) fn validate(config: &WebhookConfig) -> anyhow::Result<Url> {
    let url = Url::parse(&config.url)
        .with_context(|| format!("webhook provider: url {:?} is not a valid url", config.url))?;
    match url.scheme() {
        "http" => {}
        // reqwest is built without TLS in this workspace: fail here, not on every send.
        "https" => bail!(
            "webhook provider: url {:?}: https is not supported by this build (no tls), use http",
            config.url
        ),
        other => bail!(
            "webhook provider: url {:?} must be http, not {other}",
            config.url
        ),
    }
    ensure!(
        url.host().is_some(),
        "webhook provider: url {:?} has no host",
        config.url
    );
    ensure!(
        config.timeout_ms > 0,
        "webhook provider: timeout_ms must be above 0"
    );
    ensure!(
        (1..=Semaphore::MAX_PERMITS).contains(&config.max_connections),
        "webhook provider: max_connections must be at least 1, got {}",
        config.max_connections
    );
    Ok(url)
}

/// Sends pushes as JSON over HTTP through one shared connection pool.
#[derive(Debug)]
pub struct WebhookProvider {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
    /// Bounds requests in flight to `max_connections`; reqwest's pool has no such limit.
    permits: Semaphore,
}

/// The JSON body, borrowed from the push.
#[derive(Serialize)]
struct Body<'a> {
    campaign_id: i64,
    user_id: i64,
    channel: &'static str,
    title: &'a str,
    body: &'a str,
}

impl WebhookProvider {
    /// Validates `config` and builds the HTTP client.
    pub fn new(config: WebhookConfig) -> anyhow::Result<Self> {
        let url = validate(&config)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(config.max_connections)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A 3xx is an answer (permanent failure), not a hop to follow with the same push.
            .redirect(redirect::Policy::none())
            .build()
            .context("webhook provider: building the http client")?;
        Ok(Self {
            client,
            url,
            timeout,
            permits: Semaphore::new(config.max_connections),
        })
    }

    /// The endpoint.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }
}

#[async_trait]
impl Provider for WebhookProvider {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn send(&self, push: &Push) -> Result<(), SendError> {
        let body = serde_json::to_vec(&Body {
            campaign_id: push.campaign_id,
            user_id: push.user_id,
            channel: push.channel.as_str(),
            title: &push.title,
            body: &push.body,
        })
        .map_err(|e| SendError::Permanent {
            reason: format!("encoding the body: {e}"),
        })?;
        // The semaphore is never closed, so acquire cannot fail; map it anyway.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| SendError::Retryable {
                reason: "webhook provider is shutting down".into(),
                retry_after: None,
            })?;
        let response = self
            .client
            .post(self.url.clone())
            .header(IDEMPOTENCY_KEY, push.idempotency_key())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error(&e, self.timeout))?;
        let status = response.status();
        if status.is_success() {
            // Drain so the connection goes back to the pool; the push is delivered either way.
            read_prefix(response).await;
            return Ok(());
        }
        let retry_after = retry_after(&response);
        let reason = status_reason(status, &read_prefix(response).await);
        if is_retryable(status) {
            Err(SendError::Retryable {
                reason,
                retry_after,
            })
        } else {
            Err(SendError::Permanent { reason })
        }
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// `http 400: <first 200 characters of the body>`.
fn status_reason(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(REASON_BODY_CHARS).collect();
    if text.is_empty() {
        format!("http {}", status.as_u16())
    } else {
        format!("http {}: {text}", status.as_u16())
    }
}

/// `Retry-After` in seconds; the HTTP-date form is ignored.
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Reads at most [`BODY_READ_LIMIT`] bytes of the body; a read error ends it early.
async fn read_prefix(mut response: Response) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < BODY_READ_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    buf
}

/// No answer from the server: always worth a retry.
fn transport_error(error: &reqwest::Error, timeout: Duration) -> SendError {
    let reason = if error.is_timeout() {
        format!("timeout after {} ms", timeout.as_millis())
    } else if error.is_connect() {
        format!("connection failed: {}", error_chain(error))
    } else {
        format!("request failed: {}", error_chain(error))
    };
    SendError::Retryable {
        reason,
        retry_after: None,
    }
}

/// The error and its sources, `: `-separated, without reqwest's url (we know it).
fn error_chain(error: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_quotes_at_most_200_chars() {
        let body = "x".repeat(500);
        let reason = status_reason(StatusCode::BAD_REQUEST, body.as_bytes());
        assert_eq!(reason, format!("http 400: {}", "x".repeat(200)));
        assert_eq!(status_reason(StatusCode::CONFLICT, b""), "http 409");
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301, 302, 400, 401, 403, 404, 409, 422] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn validate_rejects_bad_urls_and_limits() {
        for (url, needle) in [
            ("not a url", "not a valid url"),
            ("ftp://h/x", "must be http"),
            ("https://h/x", "https"),
        ] {
            let err = validate(&WebhookConfig::new(url)).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{url}: {err:#}");
        }
        let mut config = WebhookConfig::new("http://127.0.0.1:9/push");
        config.max_connections = 0;
        let err = validate(&config).unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
    }
}

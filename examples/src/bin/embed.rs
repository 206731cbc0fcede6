//! Embedding herald in another Rust service: start an engine with a custom provider for the
//! app channel, create a campaign through the NATS API, and wait for it to complete.
//!
//! Needs NATS (JetStream), Redis and a database as configured (`herald.toml`, `HERALD__*`);
//! the default database is SQLite under `./data`. Run `herald users seed --count 1000` first.
//!
//! ```text
//! cargo run -p herald-examples --bin embed
//! ```

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;
use herald_engine::{
    api::request,
    schemas::{
        CampaignStatusReply, CampaignStatusRequest, CreateCampaignReply, Encoding, InformType,
        Subjects,
    },
    Config, Engine, Provider, Push, SendError,
};

/// A provider that counts what it would send; yours would call your gateway here.
#[derive(Default)]
struct CountingProvider {
    sent: AtomicU64,
}

#[async_trait]
impl Provider for CountingProvider {
    fn name(&self) -> &str {
        "counting"
    }

    async fn send(&self, _push: &Push) -> Result<(), SendError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let config = Config::load(None)?;
    let provider = Arc::new(CountingProvider::default());
    let engine = Engine::builder(config.clone())
        .provider(InformType::App, provider.clone())
        .start()
        .await?;

    let nats = herald_engine::engine::connect_nats(&config.nats.url, "embed example").await?;
    let subjects = Subjects::new(config.nats.prefix.clone());
    let req = serde_json::json!({
        "kind": "promotion", "name": "embedded example", "created_by": "example",
        "starts_at": "2026-11-21T00:00:00Z", "ends_at": "2026-11-28T00:00:00Z",
        "inform_type": "app", "title": "Hello", "body": "From an embedded herald",
        "audience": {"type": "all"}
    });
    let created: CreateCampaignReply = request(
        &nats,
        subjects.api_campaign_create(),
        Encoding::Json,
        &req,
        Duration::from_secs(5),
    )
    .await?
    .map_err(|e| anyhow::anyhow!(e.message))?;
    loop {
        let s: CampaignStatusReply = request(
            &nats,
            subjects.api_campaign_status(),
            Encoding::Json,
            &CampaignStatusRequest {
                campaign_id: created.campaign_id,
            },
            Duration::from_secs(5),
        )
        .await?
        .map_err(|e| anyhow::anyhow!(e.message))?;
        if s.status.is_final() {
            println!(
                "campaign {} {}: sent {} (provider counted {}), skipped {}",
                s.campaign_id,
                s.status.as_str(),
                s.sent,
                provider.sent.load(Ordering::Relaxed),
                s.skipped
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine.shutdown().await
}

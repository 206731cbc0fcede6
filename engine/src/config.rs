//! Node configuration: defaults in code, then an optional TOML file, then environment
//! overrides `HERALD__SECTION__KEY` (e.g. `HERALD__NATS__URL`,
//! `HERALD__PROVIDERS__APP__KIND=webhook`). Unknown keys are errors, so a typo is caught.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context};
use herald_actors::{PipelineSettings, StageSettings};
use herald_schemas::InformType;
use serde::{Deserialize, Serialize};

use crate::providers::ProviderConfig;

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// NATS and JetStream.
    pub nats: NatsConfig,
    /// Redis (idempotency markers, request dedupe).
    pub redis: RedisConfig,
    /// The database (the record).
    pub database: DatabaseConfig,
    /// The NATS request API.
    pub api: ApiConfig,
    /// The fan-out pipeline.
    pub pipeline: PipelineConfig,
    /// A provider per inform type.
    pub providers: ProvidersConfig,
}

/// This node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node id in logs and claim tokens; empty = hostname and process id.
    pub id: String,
    /// Run campaign fan-out on this node; false makes an API-only node.
    pub run_pipeline: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            run_pipeline: true,
        }
    }
}

/// NATS and JetStream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// Prefix of every subject, stream and consumer name; deployments sharing a server differ.
    pub prefix: String,
    /// How long streams keep messages, in seconds (the replay horizon).
    pub stream_max_age_secs: u64,
    /// Size cap per stream in bytes; -1 = unlimited.
    pub stream_max_bytes: i64,
    /// Window in seconds in which a repeated message id is dropped by the server.
    pub duplicate_window_secs: u64,
    /// Keep streams in memory instead of files (tests, benchmarks).
    pub memory_streams: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "herald".into(),
            stream_max_age_secs: 7 * 24 * 3600,
            stream_max_bytes: -1,
            duplicate_window_secs: 120,
            memory_streams: false,
        }
    }
}

/// Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Server URL.
    pub url: String,
    /// Timeout of one command in milliseconds.
    pub command_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            command_timeout_ms: 5000,
        }
    }
}

/// The database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://...` or `sqlite://path?mode=rwc`; the default is an embedded SQLite file.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Connections opened when the node starts and kept open, at most `max_connections`.
    /// Each PostgreSQL connection opened later, under load, costs a backend start (and a TLS
    /// handshake unless `sslmode=disable`), a few milliseconds of CPU on a small machine.
    pub min_connections: u32,
    /// Apply pending migrations when a node starts.
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/herald.db?mode=rwc".into(),
            max_connections: 16,
            min_connections: 1,
            migrate_on_start: true,
        }
    }
}

/// The NATS request API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API on this node.
    pub enabled: bool,
    /// Seconds within which a repeated create request is answered as a duplicate. The
    /// database's claims older than twice this are removed (every 5 minutes).
    pub dedupe_window_secs: u64,
    /// Requests handled at once on this node.
    pub max_in_flight: usize,
    /// Database connections reserved for the API, so fan-out work cannot starve it. Each
    /// runs one multi-row insert of the creates waiting at the time; on a small machine
    /// fewer, bigger batches answer faster than many small ones. All are opened, with the
    /// insert prepared on each, before the API serves.
    pub db_connections: u32,
    /// Serve the API on a thread of its own (its own runtime, NATS connection, database
    /// pool and Redis client), so requests do not queue behind the pipeline's tasks.
    pub own_thread: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dedupe_window_secs: 30 * 60,
            max_in_flight: 256,
            db_connections: 2,
            own_thread: true,
        }
    }
}

/// One stage's pulling and retrying.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Messages one node handles at once for one campaign (for `shard`, which serves every
    /// campaign: batches of up to 16 new campaigns; for `events`: event batches).
    pub concurrency: usize,
    /// Seconds without an ack or progress before redelivery.
    pub ack_wait_secs: u64,
    /// Deliveries before a message goes to the dead-letter stream.
    pub max_deliver: i64,
    /// Unacked messages in flight across all nodes (back-pressure).
    pub max_ack_pending: i64,
    /// First retry delay in milliseconds; doubles per delivery.
    pub retry_base_ms: u64,
    /// Longest retry delay in milliseconds.
    pub retry_max_ms: u64,
}

impl StageConfig {
    fn to_settings(&self) -> StageSettings {
        StageSettings {
            concurrency: self.concurrency,
            ack_wait: Duration::from_secs(self.ack_wait_secs),
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            retry_base: Duration::from_millis(self.retry_base_ms),
            retry_max: Duration::from_millis(self.retry_max_ms),
        }
    }

    fn from_settings(s: &StageSettings) -> Self {
        Self {
            concurrency: s.concurrency,
            ack_wait_secs: s.ack_wait.as_secs(),
            max_deliver: s.max_deliver,
            max_ack_pending: s.max_ack_pending,
            retry_base_ms: s.retry_base.as_millis() as u64,
            retry_max_ms: s.retry_max.as_millis() as u64,
        }
    }
}

/// The fan-out pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// User ids per bucket, rounded up to a multiple of 32 (a lease block).
    pub bucket_size: i64,
    /// Recipients per push batch.
    pub batch_size: usize,
    /// Messages per publish batch.
    pub publish_max_messages: usize,
    /// Bytes per publish batch.
    pub publish_max_bytes: usize,
    /// Pushes in flight to providers on this node (a batch call holds one per push).
    pub send_concurrency: usize,
    /// Tries per recipient within one delivery of a batch.
    pub send_attempts: u32,
    /// First in-place retry delay in milliseconds.
    pub send_retry_base_ms: u64,
    /// Longest in-place retry delay in milliseconds; a longer Retry-After retries the batch later.
    pub send_retry_max_ms: u64,
    /// Seconds a claim lives; must exceed the slowest send with its retries.
    pub claim_ttl_secs: u64,
    /// Seconds confirmations are kept (replay horizon).
    pub marker_ttl_secs: u64,
    /// Milliseconds between a supervisor's progress checks (restarts, and completions
    /// recorded on other nodes; one recorded on the same node is seen at once).
    pub progress_interval_ms: u64,
    /// Restarts of one stage per campaign before the campaign fails.
    pub max_restarts: u32,
    /// Sharder: one consumer on the campaigns stream for every campaign.
    pub shard: StageConfig,
    /// Bucket expander stage.
    pub expand: StageConfig,
    /// Push sender stage.
    pub push: StageConfig,
    /// Event consumers (logins, order cancellations); `concurrency` counts batches.
    pub events: StageConfig,
    /// Most events handled as one batch (one Redis call, one multi-row insert).
    pub event_batch_size: usize,
    /// Milliseconds between writes of the database's active lazy coupons into Redis.
    pub coupon_sync_interval_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self::from_settings(&PipelineSettings::default())
    }
}

impl PipelineConfig {
    fn from_settings(s: &PipelineSettings) -> Self {
        Self {
            bucket_size: s.bucket_size,
            batch_size: s.batch_size,
            publish_max_messages: s.publish_max_messages,
            publish_max_bytes: s.publish_max_bytes,
            send_concurrency: s.send_concurrency,
            send_attempts: s.send_attempts,
            send_retry_base_ms: s.send_retry_base.as_millis() as u64,
            send_retry_max_ms: s.send_retry_max.as_millis() as u64,
            claim_ttl_secs: s.claim_ttl.as_secs(),
            marker_ttl_secs: s.marker_ttl.as_secs(),
            progress_interval_ms: s.progress_interval.as_millis() as u64,
            max_restarts: s.max_restarts,
            shard: StageConfig::from_settings(&s.shard),
            expand: StageConfig::from_settings(&s.expand),
            push: StageConfig::from_settings(&s.push),
            events: StageConfig::from_settings(&s.events),
            event_batch_size: s.event_batch_size,
            coupon_sync_interval_ms: s.coupon_sync_interval.as_millis() as u64,
        }
    }

    /// The actors' settings.
    pub fn to_settings(&self) -> PipelineSettings {
        PipelineSettings {
            bucket_size: self.bucket_size,
            batch_size: self.batch_size,
            publish_max_messages: self.publish_max_messages,
            publish_max_bytes: self.publish_max_bytes,
            shard: self.shard.to_settings(),
            expand: self.expand.to_settings(),
            push: self.push.to_settings(),
            events: self.events.to_settings(),
            event_batch_size: self.event_batch_size.max(1),
            coupon_sync_interval: Duration::from_millis(self.coupon_sync_interval_ms.max(100)),
            send_concurrency: self.send_concurrency,
            send_attempts: self.send_attempts,
            send_retry_base: Duration::from_millis(self.send_retry_base_ms),
            send_retry_max: Duration::from_millis(self.send_retry_max_ms),
            claim_ttl: Duration::from_secs(self.claim_ttl_secs),
            marker_ttl: Duration::from_secs(self.marker_ttl_secs),
            progress_interval: Duration::from_millis(self.progress_interval_ms),
            max_restarts: self.max_restarts,
        }
    }
}

/// A provider per inform type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// SMS.
    pub sms: ProviderConfig,
    /// Email.
    pub email: ProviderConfig,
    /// App push.
    pub app: ProviderConfig,
    /// In-app inbox.
    pub inbox: ProviderConfig,
}

impl ProvidersConfig {
    /// The provider config of an inform type.
    pub fn get(&self, t: InformType) -> &ProviderConfig {
        match t {
            InformType::Sms => &self.sms,
            InformType::Email => &self.email,
            InformType::App => &self.app,
            InformType::Inbox => &self.inbox,
        }
    }

    /// Sets every inform type to the same provider.
    pub fn set_all(&mut self, p: ProviderConfig) {
        self.sms = p.clone();
        self.email = p.clone();
        self.app = p.clone();
        self.inbox = p;
    }
}

impl Config {
    /// Loads defaults, then `file` if given (it must exist) or `./herald.toml` if present,
    /// then `HERALD__*` environment variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let defaults = config::Config::try_from(&Config::default())?;
        let mut b = config::Config::builder().add_source(defaults);
        match file {
            Some(p) => {
                if !p.exists() {
                    bail!("config file {} does not exist", p.display());
                }
                b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
            None if Path::new("herald.toml").exists() => {
                b = b.add_source(config::File::new("herald.toml", config::FileFormat::Toml));
            }
            None => {}
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HERALD__"))
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("HERALD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let cfg: Config = b
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let d = &self.database;
        if d.max_connections < 1 || d.min_connections > d.max_connections {
            bail!(
                "database.max_connections ({}) must be at least 1, and database.min_connections ({}) at most that",
                d.max_connections,
                d.min_connections
            );
        }
        let p = &self.pipeline;
        if p.bucket_size < 1 {
            bail!("pipeline.bucket_size: must be at least 1");
        }
        if p.batch_size < 1 || p.batch_size > 1000 {
            bail!("pipeline.batch_size: must be between 1 and 1000");
        }
        if p.send_concurrency < 1 || p.send_attempts < 1 {
            bail!("pipeline.send_concurrency and pipeline.send_attempts: must be at least 1");
        }
        for (name, s) in [
            ("shard", &p.shard),
            ("expand", &p.expand),
            ("push", &p.push),
        ] {
            if s.concurrency < 1
                || s.max_deliver < 1
                || s.max_ack_pending < 1
                || s.ack_wait_secs < 1
            {
                bail!("pipeline.{name}: concurrency, max_deliver, max_ack_pending and ack_wait_secs must be at least 1");
            }
        }
        if p.claim_ttl_secs < 1 {
            bail!("pipeline.claim_ttl_secs: must be at least 1");
        }
        let prefix = &self.nats.prefix;
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("nats.prefix: use letters, digits, '-' and '_' only");
        }
        for t in InformType::ALL {
            self.providers
                .get(t)
                .validate()
                .with_context(|| format!("providers.{t}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_a_file() {
        let c = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.pipeline.bucket_size, 1024);
    }

    #[test]
    fn env_overrides_nested_keys() {
        let c = Config::load_from(
            None,
            env(&[
                ("HERALD__NATS__URL", "nats://127.0.0.1:4333"),
                ("HERALD__REDIS__URL", "redis://127.0.0.1:6380"),
                ("HERALD__DATABASE__URL", "postgres://postgres@127.0.0.1/x"),
                ("HERALD__PROVIDERS__APP__KIND", "webhook"),
                ("HERALD__PROVIDERS__APP__URL", "http://127.0.0.1:9000/push"),
                ("HERALD__PIPELINE__PUSH__CONCURRENCY", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(c.nats.url, "nats://127.0.0.1:4333");
        assert_eq!(c.redis.url, "redis://127.0.0.1:6380");
        assert_eq!(c.database.url, "postgres://postgres@127.0.0.1/x");
        assert_eq!(c.pipeline.push.concurrency, 7);
        assert!(
            matches!(c.providers.app, ProviderConfig::Webhook { .. }),
            "{:?}",
            c.providers.app
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::load_from(None, env(&[("HERALD__NATS__ULR", "x")])).unwrap_err();
        assert!(format!("{e:#}").contains("ulr"), "{e:#}");
        let dir = std::env::temp_dir().join(format!("herald-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "[pipeline]\nbuket_size = 5\n").unwrap();
        let unknown = Config::load_from(Some(&f), env(&[])).map(|_| ());
        std::fs::write(&f, "[pipeline]\nbucket_size = 0\n").unwrap();
        let invalid = Config::load_from(Some(&f), env(&[])).map(|_| ());
        // Removed before the checks, so a failing one leaves nothing in the temp dir either.
        std::fs::remove_dir_all(&dir).unwrap();
        let e = unknown.unwrap_err();
        assert!(format!("{e:#}").contains("buket_size"), "{e:#}");
        let e = invalid.unwrap_err();
        assert!(format!("{e:#}").contains("bucket_size"), "{e:#}");
    }

    #[test]
    fn min_connections_above_the_pool_size_is_an_error() {
        let c =
            Config::load_from(None, env(&[("HERALD__DATABASE__MIN_CONNECTIONS", "16")])).unwrap();
        assert_eq!(c.database.min_connections, 16);
        let e = Config::load_from(
            None,
            env(&[
                ("HERALD__DATABASE__MAX_CONNECTIONS", "4"),
                ("HERALD__DATABASE__MIN_CONNECTIONS", "5"),
            ]),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("database.min_connections (5)"),
            "{e:#}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let e =
            Config::load_from(Some(Path::new("/nonexistent/herald.toml")), env(&[])).unwrap_err();
        assert!(e.to_string().contains("does not exist"));
    }
}

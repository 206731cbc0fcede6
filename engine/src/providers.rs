//! The push providers herald ships with, and the config that picks one.
//!
//! - [`LogProvider`] writes every push to the log: the default for a first run.
//! - [`SimulatedProvider`] sleeps, fails at configured rates and keeps a [`Ledger`] of what it
//!   delivered: for tests, demos and the benchmark.
//! - [`WebhookProvider`] POSTs each push as JSON to an HTTP endpoint with an
//!   `Idempotency-Key` header: the way to reach a real gateway.
//!
//! [`ProviderConfig`] is the config-file form (`kind = "webhook"`, ...); its
//! [`build`](ProviderConfig::build) validates and returns an `Arc<dyn Provider>`.

mod ledger;
mod log;
pub(crate) mod rng;
mod simulated;
mod webhook;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use herald_actors::provider::{Provider, Providers, Push, SendError};
pub use ledger::Ledger;
pub use log::LogProvider;
pub use simulated::{SimulatedConfig, SimulatedProvider};
pub use webhook::{WebhookConfig, WebhookProvider, DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT_MS};

/// Which provider to use, as written in a config file.
///
/// ```toml
/// kind = "webhook"
/// url = "http://gateway.internal:8080/push"
/// timeout_ms = 2000
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Write each push to the log ([`LogProvider`]).
    Log {},
    /// Pretend to deliver, with latency and failures ([`SimulatedProvider`]).
    Simulated {
        /// Time each send takes, in milliseconds.
        #[serde(default)]
        latency_ms: u64,
        /// Share of sends (0..=1) that fail with a retryable error.
        #[serde(default)]
        failure_rate: f64,
        /// Share of sends (0..=1) that fail with a permanent error.
        #[serde(default)]
        permanent_failure_rate: f64,
    },
    /// POST each push as JSON to an HTTP endpoint ([`WebhookProvider`]).
    Webhook {
        /// Endpoint to POST to (`http://host:port/path`).
        url: String,
        /// Time limit for one request, connect included, in milliseconds.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Most requests in flight at once (and idle connections kept).
        #[serde(default = "default_max_connections")]
        max_connections: usize,
    },
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self::Log {}
    }
}

impl ProviderConfig {
    /// The `kind` name (`log`, `simulated`, `webhook`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Log {} => "log",
            Self::Simulated { .. } => "simulated",
            Self::Webhook { .. } => "webhook",
        }
    }

    /// Checks the values without building anything.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Log {} => Ok(()),
            Self::Simulated { .. } => self.simulated_config().map(|_| ()),
            Self::Webhook { .. } => self.webhook_config().map(|_| ()),
        }
    }

    /// Validates and builds the provider; a simulated one keeps no ledger
    /// ([`SimulatedProvider::unrecorded`]).
    pub fn build(&self) -> anyhow::Result<Arc<dyn Provider>> {
        match self {
            Self::Simulated { .. } => Ok(Arc::new(SimulatedProvider::unrecorded(
                self.simulated_config()?,
            ))),
            _ => self.build_with_ledger().map(|(provider, _)| provider),
        }
    }

    /// Validates and builds the provider; for `simulated`, also returns its ledger so a
    /// test or benchmark can check what was delivered.
    pub fn build_with_ledger(&self) -> anyhow::Result<(Arc<dyn Provider>, Option<Ledger>)> {
        match self {
            Self::Log {} => Ok((Arc::new(LogProvider::new()), None)),
            Self::Simulated { .. } => {
                let provider = SimulatedProvider::new(self.simulated_config()?);
                let ledger = provider.ledger();
                Ok((Arc::new(provider), Some(ledger)))
            }
            Self::Webhook { .. } => Ok((
                Arc::new(WebhookProvider::new(self.webhook_config()?)?),
                None,
            )),
        }
    }

    fn simulated_config(&self) -> anyhow::Result<SimulatedConfig> {
        let Self::Simulated {
            latency_ms,
            failure_rate,
            permanent_failure_rate,
        } = *self
        else {
            anyhow::bail!("provider kind is {}, not simulated", self.kind());
        };
        let config = SimulatedConfig {
            latency_ms,
            failure_rate,
            permanent_failure_rate,
        };
        config.validate()?;
        Ok(config)
    }

    fn webhook_config(&self) -> anyhow::Result<WebhookConfig> {
        let Self::Webhook {
            url,
            timeout_ms,
            max_connections,
        } = self
        else {
            anyhow::bail!("provider kind is {}, not webhook", self.kind());
        };
        let config = WebhookConfig {
            url: url.clone(),
            timeout_ms: *timeout_ms,
            max_connections: *max_connections,
        };
        webhook::validate(&config)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_log() {
        assert_eq!(ProviderConfig::default(), ProviderConfig::Log {});
        let parsed: ProviderConfig = serde_json::from_str(r#"{"kind":"log"}"#).unwrap();
        assert_eq!(parsed, ProviderConfig::Log {});
    }

    #[test]
    fn webhook_defaults_apply() {
        let parsed: ProviderConfig =
            serde_json::from_str(r#"{"kind":"webhook","url":"http://127.0.0.1:1/push"}"#).unwrap();
        assert_eq!(
            parsed,
            ProviderConfig::Webhook {
                url: "http://127.0.0.1:1/push".into(),
                timeout_ms: 5000,
                max_connections: 512,
            }
        );
    }

    #[test]
    fn unknown_field_on_log_is_rejected() {
        let err =
            serde_json::from_str::<ProviderConfig>(r#"{"kind":"log","levle":"info"}"#).unwrap_err();
        assert!(err.to_string().contains("levle"), "{err}");
    }

    #[test]
    fn build_with_ledger_returns_the_simulated_ledger() {
        let config = ProviderConfig::Simulated {
            latency_ms: 0,
            failure_rate: 0.0,
            permanent_failure_rate: 0.0,
        };
        let (provider, ledger) = config.build_with_ledger().unwrap();
        assert_eq!(provider.name(), "simulated");
        assert!(ledger.is_some());
        assert!(ProviderConfig::default()
            .build_with_ledger()
            .unwrap()
            .1
            .is_none());
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = ProviderConfig::Simulated {
            latency_ms: 0,
            failure_rate: 0.0,
            permanent_failure_rate: -0.1,
        }
        .validate()
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("permanent_failure_rate"),
            "{err:#}"
        );

        let err = ProviderConfig::Webhook {
            url: "ftp://example.com/x".into(),
            timeout_ms: 5000,
            max_connections: 1,
        }
        .build()
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("url"), "{err:#}");

        let err = ProviderConfig::Webhook {
            url: "http://example.com/x".into(),
            timeout_ms: 0,
            max_connections: 1,
        }
        .validate()
        .unwrap_err();
        assert!(format!("{err:#}").contains("timeout_ms"), "{err:#}");
    }
}

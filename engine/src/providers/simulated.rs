//! [`SimulatedProvider`]: a provider that takes time and fails at configured rates, and
//! keeps a [`Ledger`] of what it delivered, for tests, demos and the benchmark. One built
//! from a node's config ([`SimulatedProvider::unrecorded`]) keeps none.

use std::time::Duration;

use anyhow::ensure;
use async_trait::async_trait;
use herald_actors::provider::{Provider, Push, SendError};

use super::{ledger::Ledger, rng::SplitMix64};

/// How a [`SimulatedProvider`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimulatedConfig {
    /// Time each call takes, one push or a batch, in milliseconds (a tokio sleep: no thread
    /// is blocked).
    pub latency_ms: u64,
    /// Share of sends (0..=1) that return [`SendError::Retryable`].
    pub failure_rate: f64,
    /// Share of sends (0..=1) that return [`SendError::Permanent`].
    pub permanent_failure_rate: f64,
}

impl SimulatedConfig {
    /// Checks that each rate is within 0..=1 and that together they do not exceed 1.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (field, rate) in [
            ("failure_rate", self.failure_rate),
            ("permanent_failure_rate", self.permanent_failure_rate),
        ] {
            ensure!(
                (0.0..=1.0).contains(&rate),
                "simulated provider: {field} must be within 0..=1, got {rate}"
            );
        }
        ensure!(
            self.failure_rate + self.permanent_failure_rate <= 1.0,
            "simulated provider: failure_rate + permanent_failure_rate must not exceed 1, got {}",
            self.failure_rate + self.permanent_failure_rate
        );
        Ok(())
    }
}

/// Sleeps `latency_ms` per call (a batch call as one, like a provider's batch endpoint),
/// then each push succeeds or fails at random at the configured rates. Every success is
/// counted in its [`Ledger`].
#[derive(Debug)]
pub struct SimulatedProvider {
    latency: Duration,
    failure_rate: f64,
    permanent_failure_rate: f64,
    rng: SplitMix64,
    ledger: Ledger,
    /// False: the ledger stays empty (see [`SimulatedProvider::unrecorded`]).
    record: bool,
}

impl SimulatedProvider {
    /// A provider with a fresh ledger and a random seed. Rates outside 0..=1 are clamped;
    /// use [`SimulatedConfig::validate`] to reject them instead.
    pub fn new(config: SimulatedConfig) -> Self {
        Self::with_rng(config, SplitMix64::from_entropy())
    }

    /// Like [`new`](Self::new), but which sends fail depends only on `seed` and call order.
    pub fn with_seed(config: SimulatedConfig, seed: u64) -> Self {
        Self::with_rng(config, SplitMix64::with_seed(seed))
    }

    fn with_rng(config: SimulatedConfig, rng: SplitMix64) -> Self {
        let clamp = |rate: f64| {
            if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            }
        };
        Self {
            latency: Duration::from_millis(config.latency_ms),
            failure_rate: clamp(config.failure_rate),
            permanent_failure_rate: clamp(config.permanent_failure_rate),
            rng,
            ledger: Ledger::new(),
            record: true,
        }
    }

    /// Like [`new`](Self::new), but it records nothing: its ledger stays empty. What a node
    /// builds from its config (`herald serve` with `kind = "simulated"`), where no one can
    /// read a ledger, and a ledger would keep an entry per user and campaign for as long as
    /// the node runs (tens of MB per 1M-user campaign, and CPU for every push).
    pub fn unrecorded(config: SimulatedConfig) -> Self {
        Self {
            record: false,
            ..Self::new(config)
        }
    }

    /// The ledger of successful deliveries (shared: it keeps counting).
    pub fn ledger(&self) -> Ledger {
        self.ledger.clone()
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn name(&self) -> &str {
        "simulated"
    }

    async fn send(&self, push: &Push) -> Result<(), SendError> {
        let mut one = self.send_batch(std::slice::from_ref(push)).await;
        one.pop().expect("one result per push")
    }

    /// One call for the whole batch, as a batch endpoint takes: one latency, then each push
    /// succeeds or fails on its own draw.
    async fn send_batch(&self, pushes: &[Push]) -> Vec<Result<(), SendError>> {
        if self.record {
            for _ in pushes {
                self.ledger.record_attempt();
            }
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        pushes.iter().map(|p| self.outcome(p)).collect()
    }
}

impl SimulatedProvider {
    fn outcome(&self, push: &Push) -> Result<(), SendError> {
        // One draw, split into [permanent | retryable | success] bands.
        let draw = self.rng.next_f64();
        if draw < self.permanent_failure_rate {
            return Err(SendError::Permanent {
                reason: "simulated permanent failure".into(),
            });
        }
        if draw < self.permanent_failure_rate + self.failure_rate {
            return Err(SendError::Retryable {
                reason: "simulated failure".into(),
                retry_after: None,
            });
        }
        if self.record {
            self.ledger.record_delivery(push.campaign_id, push.user_id);
        }
        Ok(())
    }
}

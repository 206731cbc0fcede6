//! The provider interface: the third party that actually delivers a push (SMS gateway,
//! email service, app push service, in-app inbox). The engine crate holds the
//! implementations; the push sender only sees this trait.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use herald_schemas::InformType;

/// One push to one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// The campaign.
    pub campaign_id: i64,
    /// The recipient.
    pub user_id: i64,
    /// The channel.
    pub channel: InformType,
    /// Title, shared by every push of the campaign.
    pub title: Arc<str>,
    /// Body, shared by every push of the campaign.
    pub body: Arc<str>,
}

impl Push {
    /// The key a provider uses to drop a repeat (`campaign:user`): it closes the window
    /// between a send and its confirmation that no store of ours can close.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.campaign_id, self.user_id)
    }
}

/// Why a send did not go through.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later: 429, 5xx, timeout, connection error.
    #[error("retryable: {reason}")]
    Retryable {
        /// What happened.
        reason: String,
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// Will never succeed: recorded as a failure, not retried.
    #[error("permanent: {reason}")]
    Permanent {
        /// What happened.
        reason: String,
    },
}

/// Delivers pushes for one channel.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// A short name for logs and the dashboard (`webhook`, `simulated`, ...).
    fn name(&self) -> &str;

    /// Delivers one push. Must be safe to call concurrently.
    async fn send(&self, push: &Push) -> Result<(), SendError>;

    /// Delivers the pushes of one batch (one campaign, distinct users); one result per
    /// push, in order. A provider with a batch endpoint (FCM, SES, most SMS gateways)
    /// overrides this to make one call for the lot; the default sends each push through
    /// [`Provider::send`], all at once. The push sender calls this, never `send`.
    async fn send_batch(&self, pushes: &[Push]) -> Vec<Result<(), SendError>> {
        futures::future::join_all(pushes.iter().map(|p| self.send(p))).await
    }
}

/// The provider for each inform type.
#[derive(Clone, Default)]
pub struct Providers {
    by_type: HashMap<InformType, Arc<dyn Provider>>,
}

impl Providers {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the provider for `inform_type`.
    pub fn with(mut self, inform_type: InformType, provider: Arc<dyn Provider>) -> Self {
        self.by_type.insert(inform_type, provider);
        self
    }

    /// Sets the provider for `inform_type`.
    pub fn insert(&mut self, inform_type: InformType, provider: Arc<dyn Provider>) {
        self.by_type.insert(inform_type, provider);
    }

    /// The provider for `inform_type`, if configured.
    pub fn get(&self, inform_type: InformType) -> Option<Arc<dyn Provider>> {
        self.by_type.get(&inform_type).cloned()
    }
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.by_type {
            m.entry(k, &v.name());
        }
        m.finish()
    }
}

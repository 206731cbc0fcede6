//! [`LogProvider`]: "delivers" each push by logging it, so a first run shows what would go
//! out without any gateway.

use async_trait::async_trait;
use herald_actors::provider::{Provider, Push, SendError};

/// Writes every push to the log at info level; never fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogProvider;

impl LogProvider {
    /// A log provider.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Provider for LogProvider {
    fn name(&self) -> &str {
        "log"
    }

    async fn send(&self, push: &Push) -> Result<(), SendError> {
        tracing::info!(
            campaign_id = push.campaign_id,
            user_id = push.user_id,
            channel = push.channel.as_str(),
            title = %push.title,
            "push"
        );
        Ok(())
    }
}

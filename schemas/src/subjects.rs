//! Subject and stream names, all derived from one prefix so test runs and deployments can
//! share a NATS server without seeing each other's traffic.

/// Names every subject and stream herald uses, from a prefix such as `herald`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (a NATS token: letters, digits, `-`, `_`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What every stream name under this prefix starts with: `HERALD_` for `herald`. Other
    /// prefixes can share it (`herald-x` gives `HERALD_X_`); herald's own stream names have
    /// no `_` after it.
    pub fn stream_prefix(&self) -> String {
        format!(
            "{}_",
            self.prefix.to_ascii_uppercase().replace(['.', '-'], "_")
        )
    }

    /// The stream `<PREFIX>_<name>`.
    pub fn stream(&self, name: &str) -> String {
        format!("{}{name}", self.stream_prefix())
    }

    /// Request subject: create a campaign.
    pub fn api_campaign_create(&self) -> String {
        format!("{}.api.campaign.create", self.prefix)
    }

    /// Request subject: a campaign's status.
    pub fn api_campaign_status(&self) -> String {
        format!("{}.api.campaign.status", self.prefix)
    }

    /// Request subject: create a coupon.
    pub fn api_coupon_create(&self) -> String {
        format!("{}.api.coupon.create", self.prefix)
    }

    /// Request subject: a user claims a segment coupon.
    pub fn api_coupon_claim(&self) -> String {
        format!("{}.api.coupon.claim", self.prefix)
    }

    /// Request subject: a coupon's status.
    pub fn api_coupon_status(&self) -> String {
        format!("{}.api.coupon.status", self.prefix)
    }

    /// Stream of events from other systems (logins, order cancellations).
    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }

    /// Wildcard over all event subjects.
    pub fn events_all(&self) -> String {
        format!("{}.event.>", self.prefix)
    }

    /// Subject of user login events.
    pub fn event_user_login(&self) -> String {
        format!("{}.event.user.login", self.prefix)
    }

    /// Subject of order cancellation events.
    pub fn event_order_canceled(&self) -> String {
        format!("{}.event.order.canceled", self.prefix)
    }

    /// Stream of `CampaignCreated` messages.
    pub fn campaigns_stream(&self) -> String {
        self.stream("CAMPAIGNS")
    }

    /// Subject of one campaign's `CampaignCreated`.
    pub fn campaign_created(&self, campaign_id: i64) -> String {
        format!("{}.campaign.created.{campaign_id}", self.prefix)
    }

    /// Wildcard over all `CampaignCreated` subjects.
    pub fn campaign_created_all(&self) -> String {
        format!("{}.campaign.created.*", self.prefix)
    }

    /// Subject (core NATS, not on a stream) on which a sharder says that a campaign has an
    /// audience and its stages should start; every node's engine root listens.
    pub fn campaign_running(&self, campaign_id: i64) -> String {
        format!("{}.campaign.running.{campaign_id}", self.prefix)
    }

    /// Wildcard over all `campaign_running` subjects.
    pub fn campaign_running_all(&self) -> String {
        format!("{}.campaign.running.*", self.prefix)
    }

    /// Stream of `BucketTask` messages.
    pub fn buckets_stream(&self) -> String {
        self.stream("BUCKETS")
    }

    /// Subject of one campaign's bucket tasks.
    pub fn bucket(&self, campaign_id: i64) -> String {
        format!("{}.bucket.{campaign_id}", self.prefix)
    }

    /// Wildcard over all bucket subjects.
    pub fn bucket_all(&self) -> String {
        format!("{}.bucket.*", self.prefix)
    }

    /// Stream of `PushBatch` messages.
    pub fn push_stream(&self) -> String {
        self.stream("PUSH")
    }

    /// Subject of one campaign's push batches.
    pub fn push(&self, campaign_id: i64) -> String {
        format!("{}.push.{campaign_id}", self.prefix)
    }

    /// Wildcard over all push subjects.
    pub fn push_all(&self) -> String {
        format!("{}.push.*", self.prefix)
    }

    /// Dead-letter stream.
    pub fn dead_letter_stream(&self) -> String {
        self.stream("DEADLETTER")
    }

    /// Subject of a dead letter from `stream`.
    pub fn dead_letter(&self, stream: &str) -> String {
        format!("{}.deadletter.{}", self.prefix, stream.to_ascii_lowercase())
    }

    /// Wildcard over all dead letters.
    pub fn dead_letter_all(&self) -> String {
        format!("{}.deadletter.>", self.prefix)
    }

    /// Redis key prefix for this deployment.
    pub fn redis_prefix(&self) -> String {
        self.prefix.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::Subjects;

    #[test]
    fn names_derive_from_prefix() {
        let s = Subjects::new("t-1");
        assert_eq!(s.push_stream(), "T_1_PUSH");
        assert!(s.push_stream().starts_with(&s.stream_prefix()));
        assert_eq!(s.stream("BASELINE"), "T_1_BASELINE");
        assert_eq!(s.push(42), "t-1.push.42");
        assert_eq!(s.campaign_running(42), "t-1.campaign.running.42");
        // Not captured by the campaigns stream, which holds `campaign.created.*` only.
        assert!(!s.campaign_running(42).starts_with("t-1.campaign.created."));
        assert_eq!(s.api_campaign_create(), "t-1.api.campaign.create");
    }
}

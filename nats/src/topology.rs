//! Streams and consumers. Streams keep history (Limits retention, file storage, `max_age`)
//! so a campaign can be replayed; each stage of each campaign has one durable pull consumer
//! that every node's workers share.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    stream::{self, RetentionPolicy, StorageType},
};
use herald_schemas::Subjects;

use crate::NatsError;

/// Retention of herald's streams.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// How long messages are kept (replay horizon).
    pub max_age: Duration,
    /// Size cap per stream in bytes (-1 = unlimited).
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Keep streams in memory instead of files (tests and benchmarks only).
    pub memory: bool,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            memory: false,
        }
    }
}

/// How a stage consumer retries.
#[derive(Debug, Clone)]
pub struct StageConsumer {
    /// Durable name, unique per (campaign, stage).
    pub durable: String,
    /// Stream it reads.
    pub stream: String,
    /// Subject filter (one campaign's subject).
    pub filter: String,
    /// Redelivery after this long without an ack.
    pub ack_wait: Duration,
    /// Deliveries before the message goes to the dead-letter stream.
    pub max_deliver: i64,
    /// Unacked messages in flight across all nodes: the back-pressure.
    pub max_ack_pending: i64,
}

/// herald's JetStream streams under one prefix.
#[derive(Clone)]
pub struct Topology {
    js: jetstream::Context,
    subjects: Subjects,
    settings: StreamSettings,
}

impl Topology {
    /// A topology on `js` for `subjects`.
    pub fn new(js: jetstream::Context, subjects: Subjects, settings: StreamSettings) -> Self {
        Self {
            js,
            subjects,
            settings,
        }
    }

    /// The JetStream context.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// The subject names.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Creates the campaigns, buckets, push, dead-letter and events streams if missing.
    pub async fn ensure_streams(&self) -> Result<(), NatsError> {
        let s = &self.subjects;
        for (name, subject) in [
            (s.campaigns_stream(), s.campaign_created_all()),
            (s.buckets_stream(), s.bucket_all()),
            (s.push_stream(), s.push_all()),
            (s.dead_letter_stream(), s.dead_letter_all()),
            (s.events_stream(), s.events_all()),
        ] {
            self.js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject],
                    retention: RetentionPolicy::Limits,
                    storage: if self.settings.memory {
                        StorageType::Memory
                    } else {
                        StorageType::File
                    },
                    max_age: self.settings.max_age,
                    max_bytes: self.settings.max_bytes,
                    duplicate_window: self.settings.duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::Topology(format!("stream {name}: {e}")))?;
        }
        Ok(())
    }

    /// The shared durable pull consumer of a stage, created if missing.
    pub async fn stage_consumer(
        &self,
        c: &StageConsumer,
    ) -> Result<jetstream::consumer::PullConsumer, NatsError> {
        // No STREAM.INFO: a campaign binds a consumer per stage on every node, and the
        // consumer request itself says when the stream is missing.
        let stream = self
            .js
            .get_stream_no_info(&c.stream)
            .await
            .map_err(|e| NatsError::Topology(format!("stream {}: {e}", c.stream)))?;
        stream
            .get_or_create_consumer(
                &c.durable,
                pull::Config {
                    durable_name: Some(c.durable.clone()),
                    filter_subject: c.filter.clone(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: c.ack_wait,
                    max_deliver: c.max_deliver,
                    max_ack_pending: c.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| NatsError::Topology(format!("consumer {}: {e}", c.durable)))
    }

    /// Deletes a stage consumer once its campaign is over; a missing one is not an error.
    pub async fn delete_consumer(&self, stream: &str, durable: &str) -> Result<(), NatsError> {
        match self.js.delete_consumer_from_stream(durable, stream).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(NatsError::Topology(format!(
                "delete consumer {durable}: {e}"
            ))),
        }
    }

    /// Messages not yet delivered plus delivered but unacked, for a consumer (lag).
    pub async fn consumer_lag(
        &self,
        stream: &str,
        durable: &str,
    ) -> Result<(u64, usize), NatsError> {
        let stream = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| NatsError::Topology(e.to_string()))?;
        let info = stream
            .consumer_info(durable)
            .await
            .map_err(|e| NatsError::Topology(e.to_string()))?;
        Ok((info.num_pending, info.num_ack_pending))
    }
}

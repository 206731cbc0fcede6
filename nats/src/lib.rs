//! herald's JetStream layer: the stream topology ([`Topology`]), batched publishing with
//! deterministic message ids ([`publish_all`]), the pull stream ([`PullStream`]), and the
//! consume side ([`Delivery`]): typed decode, ack after the work, bounded retry with a
//! delay, and dead letters.

pub mod consume;
pub mod consume_batch;
pub mod publish;
pub mod pull;
pub mod topology;

pub use consume::{consume, ConsumeSettings, Delivery, Outcome};
pub use consume_batch::{consume_batches, BatchSettings};
pub use publish::{publish_all, Outgoing};
pub use pull::{pull_messages, PullError, PullStream};
pub use topology::{StageConsumer, StreamSettings, Topology};

/// Waits until the server has processed everything this connection sent so far (for example
/// new subscriptions), by a request round trip: `flush` only empties the socket buffer.
pub async fn sync_with_server(client: &async_nats::Client) {
    let subject = format!("{}.herald.sync", client.new_inbox());
    // Nobody answers: the server's "no responders" reply is the acknowledgement we wait for.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request(subject, bytes::Bytes::new()),
    )
    .await;
}

/// A JetStream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Creating or reading a stream or consumer failed.
    #[error("jetstream topology: {0}")]
    Topology(String),
    /// A publish was not acknowledged by the server.
    #[error("jetstream publish to {subject}: {reason}")]
    Publish {
        /// Subject of the message that failed.
        subject: String,
        /// What the server or client said.
        reason: String,
    },
    /// Acknowledging a message failed.
    #[error("jetstream ack: {0}")]
    Ack(String),
    /// Encoding a message failed.
    #[error("encode: {0}")]
    Encode(#[from] herald_schemas::CodecError),
    /// The consumer was deleted while pulling from it: another node finished the campaign
    /// and removed its consumers, or an operator did.
    #[error("consumer {0} was deleted")]
    ConsumerDeleted(String),
}

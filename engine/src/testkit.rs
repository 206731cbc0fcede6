//! Test helpers that run real servers in-process, for integration tests, demos and the
//! benchmark. [`WebhookSink`] is an HTTP endpoint for the webhook provider that counts what
//! it received and injects failures. [`NatsServer`] is a nats-server of a test's own, to kill
//! and start again.

mod env;
mod nats_server;
mod segment;
mod webhook_sink;

pub use env::{pg_admin_url, wait_until, TestEnv, MAX_NAME_LEN};
pub use nats_server::NatsServer;
pub use segment::gold_members;
pub use webhook_sink::{SinkConfig, SinkPush, WebhookSink};

//! herald: a campaign push engine on NATS JetStream.
//!
//! Embed it with [`Engine`]: load a [`Config`], optionally plug in your own
//! [`Provider`]s, start it, and create campaigns through
//! the NATS API ([`api`]). The `herald` binary wraps the same pieces in a CLI.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = herald_engine::Config::load(None)?;
//! let engine = herald_engine::Engine::start(config).await?;
//! // ... serve until told to stop ...
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod dev;
pub mod engine;
pub mod huge_pages;
pub mod providers;
pub mod seed;
pub mod signal;
pub mod testkit;

pub use config::Config;
pub use engine::{Engine, EngineBuilder};
pub use herald_actors as actors;
pub use herald_actors::provider::{Provider, Providers, Push, SendError};
pub use herald_schemas as schemas;
pub use signal::shutdown_signal;

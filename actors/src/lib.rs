//! herald's actors (ractor): the engine root, one supervisor per campaign, and its sharder,
//! bucket expander and push sender. Stages hand work to each other through JetStream
//! streams only, so any node can run any stage and a crash loses nothing.

pub mod provider;

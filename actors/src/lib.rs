//! herald's actors (ractor): the engine root ([`engine_root`]), one supervisor per campaign
//! ([`campaign_supervisor`]), and its three stages — [`sharder`], [`bucket_expander`],
//! [`push_sender`] — each run by a [`stage::StageWorker`]. Stages hand work to each other
//! through JetStream streams only, so any node can run any stage and a crash loses nothing.
//! [`store`] and [`markers`] hold the database and Redis sides; [`provider`] is the interface
//! to the third parties that deliver pushes. [`coupons`] issues coupons: on login events run
//! by an [`event_worker::EventWorker`], and as the final stage of an eager coupon's campaign.

pub mod batcher;
pub mod bucket_expander;
pub mod campaign_supervisor;
pub mod context;
pub mod coupons;
pub mod engine_root;
pub mod event_worker;
pub mod markers;
pub mod provider;
pub mod push_sender;
pub mod sharder;
pub mod stage;
pub mod store;

pub use context::{PipelineSettings, Shared, StageSettings};
pub use engine_root::{EngineRoot, RootMsg};

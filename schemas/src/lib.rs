//! Wire types herald nodes exchange over NATS, encoded as MessagePack with named fields.
//!
//! Every stream message carries a schema version `v` so old and new nodes can run side by
//! side: a node accepts any version up to [`SCHEMA_VERSION`] and ignores fields it does not
//! know. The API request and reply types are here too, since outside clients speak them.
//! [`Subjects`] names every subject and stream from one configurable prefix.

pub mod api;
pub mod codec;
pub mod coupons;
pub mod events;
pub mod messages;
pub mod subjects;

pub use api::*;
pub use codec::{decode, encode, CodecError, Encoding};
pub use coupons::*;
pub use events::*;
pub use messages::*;
pub use subjects::Subjects;

/// The schema version this build writes.
pub const SCHEMA_VERSION: u16 = 1;

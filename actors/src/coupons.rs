//! Coupons: lazy issuance on login, eager issuance by the pipeline, release on order cancel.
//!
//! - [`store`]: coupon rows and [`Store::issue`](crate::store::Store::issue), the one place
//!   items are created (multi-row, idempotent, never past the stock).
//! - [`active`]: the active lazy coupons in Redis and who holds them.
//! - [`login_issuer`]: login events → the user's missing lazy coupons.
//! - [`releaser`]: order-cancel events → the coupon item is unused again.
//! - [`issuer_stage`]: the final stage of an eager coupon's campaign.

pub mod active;
pub mod issuer_stage;
pub mod login_issuer;
pub mod releaser;
pub mod store;

pub use active::{ActiveCoupons, Claimed};
pub use store::{Coupon, Issued, IssuedItem, Release};

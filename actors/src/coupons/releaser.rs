//! Order cancellation: the coupon item the order used is unused again. Idempotent (an item
//! already unused is left alone); an unknown item, or one of another user, is dead-lettered
//! with the reason instead of being retried.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::join_all;
use herald_nats::{Delivery, Outcome};
use herald_schemas::{decode_event, OrderCanceled, Subjects};

use super::store::Release;
use crate::{context::Shared, event_worker::EventHandler};

/// Handles `order.canceled` events.
pub struct CouponReleaser {
    shared: Arc<Shared>,
}

impl CouponReleaser {
    /// The releaser of this node.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn one(&self, d: &Delivery) -> Outcome {
        let e: OrderCanceled = match decode_event(d.content_type.as_deref(), &d.payload) {
            Ok(e) => e,
            Err(e) => {
                return Outcome::Reject {
                    reason: format!("undecodable order.canceled event: {e}"),
                }
            }
        };
        let now = chrono::Utc::now();
        match self
            .shared
            .store
            .release_item(e.coupon_item_id, e.user_id, now)
            .await
        {
            Ok(Release::Released) => {
                tracing::info!(
                    order_id = e.order_id,
                    coupon_item_id = e.coupon_item_id,
                    "coupon item released"
                );
                Outcome::Done
            }
            Ok(Release::AlreadyUnused) => Outcome::Done,
            Ok(Release::NotFound) => {
                let reason = format!(
                    "order {}: coupon item {} does not exist",
                    e.order_id, e.coupon_item_id
                );
                tracing::warn!(
                    order_id = e.order_id,
                    coupon_item_id = e.coupon_item_id,
                    "coupon item to release not found"
                );
                Outcome::Reject { reason }
            }
            Ok(Release::OtherUser) => {
                let reason = format!(
                    "order {}: coupon item {} does not belong to user {}",
                    e.order_id, e.coupon_item_id, e.user_id
                );
                tracing::warn!(
                    order_id = e.order_id,
                    coupon_item_id = e.coupon_item_id,
                    user_id = e.user_id,
                    "coupon item belongs to another user"
                );
                Outcome::Reject { reason }
            }
            Err(err) => Outcome::retry(format!("releasing coupon item: {err}")),
        }
    }
}

#[async_trait]
impl EventHandler for CouponReleaser {
    const NAME: &'static str = "coupon_releaser";

    fn subject(subjects: &Subjects) -> String {
        subjects.event_order_canceled()
    }

    async fn handle(&self, batch: Vec<Delivery>) -> Vec<Outcome> {
        join_all(batch.iter().map(|d| self.one(d))).await
    }
}

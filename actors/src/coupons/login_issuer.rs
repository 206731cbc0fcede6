//! Lazy issuance: for each login event, every active lazy coupon the user does not hold yet
//! is claimed in Redis (stock taken atomically for limited coupons), inserted into
//! `sales_promotion_coupon_item` and counted, a whole batch of logins at a time: one Redis
//! script, one multi-row insert, one confirm script. Repeated logins stop at Redis.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use async_trait::async_trait;
use herald_nats::{Delivery, Outcome};
use herald_schemas::{decode_event, Subjects, UserLogin};

use super::active::Claimed;
use crate::{context::Shared, event_worker::EventHandler};

/// Largest user id: Redis's Lua numbers are doubles, exact up to 2^53.
const MAX_USER_ID: i64 = 1 << 53;

/// Handles `user.login` events.
pub struct LoginIssuer {
    shared: Arc<Shared>,
    batches: AtomicU64,
}

impl LoginIssuer {
    /// The issuer of this node.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            batches: AtomicU64::new(0),
        }
    }

    /// Writes the database's active lazy coupons into Redis.
    pub async fn sync(&self) -> Result<(), String> {
        let coupons = self
            .shared
            .store
            .active_lazy_coupons(chrono::Utc::now())
            .await
            .map_err(|e| format!("loading active coupons: {e}"))?;
        self.shared
            .coupons
            .sync(&coupons)
            .await
            .map_err(|e| format!("writing active coupons: {e}"))
    }

    /// Issues the missing lazy coupons of `users`; returns how many items were created and
    /// the users to ask again later (see [`Claimed::Pairs`]).
    pub async fn issue(&self, users: &[i64]) -> Result<(usize, HashSet<i64>), String> {
        let active = &self.shared.coupons;
        let n = self.batches.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}:{n}", self.shared.node_id);
        let mut claimed = active
            .claim(users, &token)
            .await
            .map_err(|e| e.to_string())?;
        if claimed == Claimed::NotLoaded {
            tracing::info!("active coupon list missing in redis, loading it from the database");
            self.sync().await?;
            claimed = active
                .claim(users, &token)
                .await
                .map_err(|e| e.to_string())?;
        }
        let (pairs, waiting) = match claimed {
            Claimed::Pairs { claimed, waiting } => (claimed, waiting),
            Claimed::NotLoaded => return Err("active coupon list could not be loaded".into()),
        };
        let waiting: HashSet<i64> = waiting.into_iter().map(|(_, u)| u).collect();
        if pairs.is_empty() {
            return Ok((0, waiting));
        }
        let issued = match self
            .shared
            .store
            .issue(&pairs, chrono::Utc::now(), None)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                if let Err(e) = active.release(&pairs, &token).await {
                    tracing::warn!(error = %e, "releasing coupon claims failed; they expire");
                }
                return Err(format!("issuing coupon items: {e}"));
            }
        };
        let new: HashSet<(i64, i64)> = issued
            .items
            .iter()
            .map(|i| (i.coupon_id, i.user_id))
            .collect();
        let out: HashSet<(i64, i64)> = issued.out_of_stock.iter().copied().collect();
        if !out.is_empty() {
            // Redis let more through than the database's stock allows (it lost data, or a
            // count was off): give the claims back and take the database's count.
            let _ = active.release(&issued.out_of_stock, &token).await;
            let coupons: HashSet<i64> = out.iter().map(|(c, _)| *c).collect();
            for id in coupons {
                match self.shared.store.coupon(id).await {
                    Ok(Some(c)) => {
                        let _ = active.set_issued(&c).await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(coupon_id = id, error = %e, "reloading coupon failed"),
                }
            }
        }
        let confirm: Vec<((i64, i64), bool)> = pairs
            .iter()
            .filter(|p| !out.contains(p))
            .map(|p| (*p, new.contains(p)))
            .collect();
        // If this fails the items are in the database already; the redelivered events find
        // them through the unique index and confirm then.
        active
            .confirm(&confirm)
            .await
            .map_err(|e| format!("confirming coupon items: {e}"))?;
        Ok((issued.items.len(), waiting))
    }
}

#[async_trait]
impl EventHandler for LoginIssuer {
    const NAME: &'static str = "login_issuer";

    fn subject(subjects: &Subjects) -> String {
        subjects.event_user_login()
    }

    async fn handle(&self, batch: Vec<Delivery>) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Done; batch.len()];
        let mut users = Vec::with_capacity(batch.len());
        let mut valid = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            match decode_event::<UserLogin>(d.content_type.as_deref(), &d.payload) {
                Ok(e) if e.user_id > 0 && e.user_id <= MAX_USER_ID => {
                    users.push(e.user_id);
                    valid.push((i, e.user_id));
                }
                Ok(e) => {
                    outcomes[i] = Outcome::Reject {
                        reason: format!(
                            "login event: user_id must be in 1..=2^53, got {}",
                            e.user_id
                        ),
                    }
                }
                Err(e) => {
                    outcomes[i] = Outcome::Reject {
                        reason: format!("undecodable login event: {e}"),
                    }
                }
            }
        }
        users.sort_unstable();
        users.dedup();
        match self.issue(&users).await {
            Ok((n, waiting)) => {
                tracing::debug!(
                    logins = users.len(),
                    issued = n,
                    waiting = waiting.len(),
                    "login batch done"
                );
                // Their events come back after the stage's backoff. A claim ends with its
                // batch, or for a node that died at its deadline (`claim_ttl`, 60 s), which
                // the default backoff (0.5 s doubling to 30 s, 8 deliveries: 61.5 s) outlasts;
                // an event still waiting after its last delivery is dead-lettered, not lost.
                for &(i, user) in &valid {
                    if waiting.contains(&user) {
                        outcomes[i] = Outcome::retry(
                            "a limited coupon's last stock is held by claims in flight",
                        );
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(logins = users.len(), reason = %reason, "login batch failed");
                for (i, _) in valid {
                    outcomes[i] = Outcome::retry(reason.clone());
                }
            }
        }
        outcomes
    }

    async fn tick(&self) {
        if let Err(e) = self.sync().await {
            tracing::warn!(error = %e, "syncing active coupons failed");
        }
    }
}

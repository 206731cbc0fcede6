//! The coupon endpoints: create (lazy, eager or segment delivery), claim and status.
//!
//! A lazy coupon goes into the Redis active list before the reply, so logins right after it
//! see it; when that fails the reply is `unavailable`, and a repeat of the request (a
//! duplicate) adds it again. An eager or segment coupon gets a campaign (one per coupon,
//! found again on a repeated request) that the pipeline runs: eager campaigns end in the
//! coupon-issuing stage, segment campaigns push "claim your coupon" to the segment.

use chrono::{DateTime, SubsecRound, Utc};
use herald_actors::{
    coupons::{store::STATUS_NORMAL, Coupon},
    store::NewCampaign,
};
use herald_schemas::{
    parse_request, ApiError, Audience, CampaignKind, ClaimCouponReply, ClaimCouponRequest,
    CouponDelivery, CouponStatusReply, CouponStatusRequest, CreateCouponReply, CreateCouponRequest,
    Encoding, ErrorCode,
};

use super::{db_err, ApiService};

impl ApiService {
    pub(super) async fn create_coupon(
        &self,
        encoding: Encoding,
        body: &[u8],
    ) -> Result<CreateCouponReply, ApiError> {
        let req: CreateCouponRequest = parse_request(encoding, body)?;
        req.validate(Utc::now())?;
        let store = &self.store;
        let (id, duplicate, _) = self
            .deduped(&req.dedupe_key(), |now, since| {
                store.insert_coupon(&req, now, since)
            })
            .await?;
        let coupon = self.coupon(id).await?;
        let campaign_id = match coupon.delivery {
            CouponDelivery::Lazy => {
                // Without this, logins would miss the coupon until the next sync; the client
                // hears it and a repeat (a duplicate, which adds again) activates it.
                if let Err(e) = self.coupons.add(&coupon).await {
                    tracing::warn!(coupon_id = id, error = %e, "adding coupon to the redis list failed");
                    return Err(ApiError::unavailable(format!(
                        "coupon {id} is saved but not active for logins yet (redis: {e}); \
                         repeat the request to activate it"
                    )));
                }
                None
            }
            CouponDelivery::Eager | CouponDelivery::Segment => {
                Some(self.coupon_campaign(&coupon, &req).await?)
            }
        };
        if !duplicate {
            tracing::info!(
                coupon_id = id,
                ?campaign_id,
                delivery = coupon.delivery.as_str(),
                "coupon created"
            );
        }
        Ok(CreateCouponReply {
            ok: true,
            coupon_id: id,
            campaign_id,
            duplicate,
        })
    }

    /// The campaign of an eager or segment coupon, created (and announced) if missing.
    async fn coupon_campaign(
        &self,
        coupon: &Coupon,
        req: &CreateCouponRequest,
    ) -> Result<i64, ApiError> {
        if let Some(id) = coupon.campaign_id {
            return Ok(id);
        }
        let (kind, audience) = match coupon.delivery {
            CouponDelivery::Segment => (
                CampaignKind::CouponSegment,
                Audience::Segment(coupon.segment.clone().unwrap_or_default()),
            ),
            _ => (CampaignKind::CouponEager, Audience::All),
        };
        let new = NewCampaign {
            kind: kind.as_str().into(),
            name: format!("coupon {}: {}", coupon.id, coupon.name),
            created_by: req.created_by.clone(),
            starts_at: coupon.starts_at,
            ends_at: coupon.ends_at,
            inform_type: req.inform_type,
            title: format!("A coupon for you: {}", coupon.name),
            body: format!(
                "Claim coupon {} before {}",
                coupon.id,
                coupon.ends_at.format("%Y-%m-%d %H:%M UTC")
            ),
            audience,
            // One campaign per coupon, whenever it is asked for.
            dedupe_key: format!("coupon:{}", coupon.id),
            coupon_id: Some(coupon.id),
        };
        let now = Utc::now().trunc_subsecs(3);
        let (campaign_id, inserted) = self
            .store
            .insert_campaign(&new, now, DateTime::<Utc>::UNIX_EPOCH)
            .await
            .map_err(db_err)?;
        self.store
            .set_coupon_campaign(coupon.id, campaign_id)
            .await
            .map_err(db_err)?;
        if inserted {
            self.announce(campaign_id, now.timestamp_millis());
        }
        Ok(campaign_id)
    }

    async fn coupon(&self, id: i64) -> Result<Coupon, ApiError> {
        if id <= 0 {
            return Err(ApiError::invalid("coupon_id: must be positive"));
        }
        self.store
            .coupon(id)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::not_found(format!("coupon {id} not found")))
    }

    pub(super) async fn claim_coupon(
        &self,
        encoding: Encoding,
        body: &[u8],
    ) -> Result<ClaimCouponReply, ApiError> {
        let req: ClaimCouponRequest = parse_request(encoding, body)?;
        if req.user_id <= 0 {
            return Err(ApiError::invalid("user_id: must be positive"));
        }
        let c = self.coupon(req.coupon_id).await?;
        if c.delivery != CouponDelivery::Segment {
            return Err(ApiError::invalid(format!(
                "coupon_id: coupon {} is not claimable (its delivery is {}: herald issues it)",
                c.id,
                c.delivery.as_str()
            )));
        }
        let now = Utc::now();
        if c.status != STATUS_NORMAL {
            return Err(ApiError::new(
                ErrorCode::Expired,
                format!("coupon {} is no longer in force", c.id),
            ));
        }
        if now < c.starts_at {
            return Err(ApiError::new(
                ErrorCode::NotStarted,
                format!(
                    "coupon {} can be claimed from {}",
                    c.id,
                    c.starts_at.to_rfc3339()
                ),
            ));
        }
        if now >= c.ends_at {
            return Err(ApiError::new(
                ErrorCode::Expired,
                format!("coupon {} ended at {}", c.id, c.ends_at.to_rfc3339()),
            ));
        }
        let user = req.user_id;
        if let Some(item) = self.store.coupon_item(c.id, user).await.map_err(db_err)? {
            return Ok(ClaimCouponReply {
                ok: true,
                coupon_item_id: item,
                duplicate: true,
            });
        }
        let segment = c.segment.clone().unwrap_or_default();
        if !self
            .store
            .in_segment(user, &segment)
            .await
            .map_err(db_err)?
        {
            return Err(ApiError::new(
                ErrorCode::NotEligible,
                format!("user {user} is not in the segment of coupon {}", c.id),
            ));
        }
        let issued = self
            .store
            .issue(&[(c.id, user)], now, None)
            .await
            .map_err(db_err)?;
        if let Some(item) = issued.items.first() {
            return Ok(ClaimCouponReply {
                ok: true,
                coupon_item_id: item.item_id,
                duplicate: false,
            });
        }
        if !issued.out_of_stock.is_empty() {
            return Err(ApiError::new(
                ErrorCode::SoldOut,
                format!("coupon {} has no stock left", c.id),
            ));
        }
        // A concurrent claim of the same user won.
        let item = self
            .store
            .coupon_item(c.id, user)
            .await
            .map_err(db_err)?
            .ok_or_else(|| ApiError::unavailable("claim neither issued nor found; retry"))?;
        Ok(ClaimCouponReply {
            ok: true,
            coupon_item_id: item,
            duplicate: true,
        })
    }

    pub(super) async fn coupon_status(
        &self,
        encoding: Encoding,
        body: &[u8],
    ) -> Result<CouponStatusReply, ApiError> {
        let req: CouponStatusRequest = parse_request(encoding, body)?;
        let c = self.coupon(req.coupon_id).await?;
        Ok(CouponStatusReply {
            ok: true,
            coupon_id: c.id,
            name: c.name,
            delivery: c.delivery,
            total: c.total,
            issued: c.issued,
            starts_at: c.starts_at,
            ends_at: c.ends_at,
            campaign_id: c.campaign_id,
        })
    }
}

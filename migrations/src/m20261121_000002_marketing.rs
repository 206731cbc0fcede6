//! Marketing reference tables: `sales_promotion`, coupon definitions in
//! `sales_promotion_coupon` and the coupons handed to users in
//! `sales_promotion_coupon_item`, plus the two schedules herald reads campaigns from,
//! `hot_goods_crontab` and `push_message_crontab`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::{drop_table, index, pk_big_auto, unique_index};

/// Creates the marketing tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SalesPromotion::Table)
                    .col(pk_big_auto(SalesPromotion::Id))
                    .col(big_integer_null(SalesPromotion::CampaignId))
                    .col(text(SalesPromotion::Name))
                    .col(timestamp_with_time_zone(SalesPromotion::StartTime))
                    .col(timestamp_with_time_zone(SalesPromotion::EndTime))
                    .col(text_null(SalesPromotion::Remark))
                    .col(integer(SalesPromotion::Status))
                    .col(text_null(SalesPromotion::Rule))
                    .col(integer(SalesPromotion::Type))
                    .col(text(SalesPromotion::CreatedBy))
                    .col(timestamp_with_time_zone(SalesPromotion::CreatedAt))
                    .col(timestamp_with_time_zone(SalesPromotion::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SalesPromotionCoupon::Table)
                    .col(pk_big_auto(SalesPromotionCoupon::Id))
                    .col(text(SalesPromotionCoupon::CouponName))
                    .col(integer(SalesPromotionCoupon::CouponType))
                    .col(text(SalesPromotionCoupon::CouponRule))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCoupon::ActivityStartTime,
                    ))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCoupon::ActivityEndTime,
                    ))
                    // Stock limit; NULL means unlimited.
                    .col(big_integer_null(SalesPromotionCoupon::CouponCount))
                    .col(big_integer(SalesPromotionCoupon::CouponReceivedCount).default(0))
                    .col(text(SalesPromotionCoupon::CouponReceiveType))
                    .col(text(SalesPromotionCoupon::InformType))
                    .col(integer(SalesPromotionCoupon::Status))
                    .col(text(SalesPromotionCoupon::CreatedBy))
                    .col(timestamp_with_time_zone(SalesPromotionCoupon::CreatedAt))
                    .col(timestamp_with_time_zone(SalesPromotionCoupon::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SalesPromotionCouponItem::Table)
                    .col(pk_big_auto(SalesPromotionCouponItem::Id))
                    .col(big_integer(SalesPromotionCouponItem::CouponId))
                    .col(integer(SalesPromotionCouponItem::CouponType))
                    .col(big_integer(SalesPromotionCouponItem::UserAccountId))
                    .col(boolean(SalesPromotionCouponItem::IsUsed).default(false))
                    .col(timestamp_with_time_zone_null(
                        SalesPromotionCouponItem::UsedTime,
                    ))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCouponItem::EffectiveStartTime,
                    ))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCouponItem::EffectiveEndTime,
                    ))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCouponItem::CreatedAt,
                    ))
                    .col(timestamp_with_time_zone(
                        SalesPromotionCouponItem::UpdatedAt,
                    ))
                    .to_owned(),
            )
            .await?;
        // One coupon per user: a re-delivered grant must not hand out a second one.
        manager
            .create_index(unique_index(
                "ux_coupon_item_coupon_user",
                SalesPromotionCouponItem::Table,
                [
                    SalesPromotionCouponItem::CouponId,
                    SalesPromotionCouponItem::UserAccountId,
                ],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(HotGoodsCrontab::Table)
                    .col(pk_big_auto(HotGoodsCrontab::Id))
                    .col(big_integer(HotGoodsCrontab::GoodsId))
                    .col(text(HotGoodsCrontab::GoodsName))
                    .col(text_null(HotGoodsCrontab::GoodsDesc))
                    .col(text_null(HotGoodsCrontab::Keywords))
                    // JSON segment filter.
                    .col(text(HotGoodsCrontab::Portrayal))
                    .col(date(HotGoodsCrontab::CrontabDate))
                    .col(integer(HotGoodsCrontab::Status))
                    .col(timestamp_with_time_zone(HotGoodsCrontab::CreatedAt))
                    .col(timestamp_with_time_zone(HotGoodsCrontab::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(PushMessageCrontab::Table)
                    .col(pk_big_auto(PushMessageCrontab::Id))
                    .col(text(PushMessageCrontab::AutomaticPushName))
                    .col(text(PushMessageCrontab::MainMessage))
                    .col(text(PushMessageCrontab::Message))
                    .col(text(PushMessageCrontab::InformType))
                    // JSON segment filter.
                    .col(text_null(PushMessageCrontab::FilterCondition))
                    .col(timestamp_with_time_zone(PushMessageCrontab::PushDateTime))
                    .col(integer(PushMessageCrontab::Status))
                    .col(text(PushMessageCrontab::CreatedBy))
                    .col(timestamp_with_time_zone(PushMessageCrontab::CreatedAt))
                    .col(timestamp_with_time_zone(PushMessageCrontab::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        // The scheduler polls for due rows: `WHERE status = ? AND push_date_time <= ?`.
        manager
            .create_index(index(
                "ix_push_message_crontab_status_push_date_time",
                PushMessageCrontab::Table,
                [PushMessageCrontab::Status, PushMessageCrontab::PushDateTime],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(drop_table(PushMessageCrontab::Table))
            .await?;
        manager
            .drop_table(drop_table(HotGoodsCrontab::Table))
            .await?;
        manager
            .drop_table(drop_table(SalesPromotionCouponItem::Table))
            .await?;
        manager
            .drop_table(drop_table(SalesPromotionCoupon::Table))
            .await?;
        manager.drop_table(drop_table(SalesPromotion::Table)).await
    }
}

#[derive(DeriveIden)]
enum SalesPromotion {
    Table,
    Id,
    CampaignId,
    Name,
    StartTime,
    EndTime,
    Remark,
    Status,
    Rule,
    Type,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SalesPromotionCoupon {
    Table,
    Id,
    CouponName,
    CouponType,
    CouponRule,
    ActivityStartTime,
    ActivityEndTime,
    CouponCount,
    CouponReceivedCount,
    CouponReceiveType,
    InformType,
    Status,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SalesPromotionCouponItem {
    Table,
    Id,
    CouponId,
    CouponType,
    UserAccountId,
    IsUsed,
    UsedTime,
    EffectiveStartTime,
    EffectiveEndTime,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum HotGoodsCrontab {
    Table,
    Id,
    GoodsId,
    GoodsName,
    GoodsDesc,
    Keywords,
    Portrayal,
    CrontabDate,
    Status,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PushMessageCrontab {
    Table,
    Id,
    AutomaticPushName,
    MainMessage,
    Message,
    InformType,
    FilterCondition,
    PushDateTime,
    Status,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

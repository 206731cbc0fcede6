//! Coupon delivery: how a `sales_promotion_coupon` reaches users (`delivery`: lazy, eager or
//! segment), its segment filter, the campaign that pushes or issues it, and the dedupe key of
//! the request that created it; `campaign.coupon_id` links a coupon campaign back. An index on
//! `(delivery, activity_end_time)` serves the rebuild of the active lazy-coupon list.
//!
//! SQLite alters one column per statement, so each column is its own `ALTER TABLE`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::index;

/// Adds the coupon delivery columns.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            text(Coupon::Delivery).default("lazy").to_owned(),
            text_null(Coupon::Segment),
            big_integer_null(Coupon::CampaignId),
            text_null(Coupon::DedupeKey),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Coupon::Table)
                        .add_column(col)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Campaign::Table)
                    .add_column(big_integer_null(Campaign::CouponId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_coupon_delivery_end",
                Coupon::Table,
                [Coupon::Delivery, Coupon::ActivityEndTime],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_coupon_dedupe_key",
                Coupon::Table,
                [Coupon::DedupeKey],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_coupon_dedupe_key")
                    .table(Coupon::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ix_coupon_delivery_end")
                    .table(Coupon::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Campaign::Table)
                    .drop_column(Campaign::CouponId)
                    .to_owned(),
            )
            .await?;
        for col in [
            Coupon::DedupeKey,
            Coupon::CampaignId,
            Coupon::Segment,
            Coupon::Delivery,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Coupon::Table)
                        .drop_column(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Coupon {
    #[sea_orm(iden = "sales_promotion_coupon")]
    Table,
    Delivery,
    Segment,
    CampaignId,
    DedupeKey,
    ActivityEndTime,
}

#[derive(DeriveIden)]
enum Campaign {
    Table,
    CouponId,
}

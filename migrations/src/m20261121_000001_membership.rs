//! Membership reference tables: `membership_account`, the per-account level and points in
//! `membership_point`, the precomputed segment attributes in `membership_filter`, and the
//! `push_message` log of every message delivered to a user.

use sea_orm_migration::{prelude::*, schema::*};

use crate::{drop_table, index, pk_big_auto};

/// Creates the membership tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(MembershipAccount::Table)
                    .col(pk_big_auto(MembershipAccount::Id))
                    .col(text(MembershipAccount::Username))
                    .col(text_null(MembershipAccount::Mobile))
                    .col(text_null(MembershipAccount::Email))
                    .col(boolean(MembershipAccount::IsDeleted).default(false))
                    .col(timestamp_with_time_zone(MembershipAccount::CreatedAt))
                    .col(timestamp_with_time_zone(MembershipAccount::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(MembershipPoint::Table)
                    .col(pk_big_auto(MembershipPoint::Id))
                    .col(big_integer_uniq(MembershipPoint::AccountId))
                    .col(integer(MembershipPoint::MemberLevel))
                    .col(big_integer(MembershipPoint::MemberPoint))
                    .col(timestamp_with_time_zone(MembershipPoint::CreatedAt))
                    .col(timestamp_with_time_zone(MembershipPoint::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_membership_point_member_level",
                MembershipPoint::Table,
                [MembershipPoint::MemberLevel],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(MembershipFilter::Table)
                    .col(pk_big_auto(MembershipFilter::Id))
                    .col(big_integer_uniq(MembershipFilter::AccountId))
                    .col(integer(MembershipFilter::ActiveDays))
                    .col(integer(MembershipFilter::MemberLevel))
                    .col(integer(MembershipFilter::OrderCount).default(0))
                    // Cents, so sums stay exact.
                    .col(big_integer(MembershipFilter::TotalAmount).default(0))
                    .col(timestamp_with_time_zone(MembershipFilter::CreatedAt))
                    .col(timestamp_with_time_zone(MembershipFilter::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_membership_filter_active_days",
                MembershipFilter::Table,
                [MembershipFilter::ActiveDays],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(PushMessage::Table)
                    .col(pk_big_auto(PushMessage::Id))
                    .col(big_integer_null(PushMessage::CampaignId))
                    .col(big_integer(PushMessage::UserAccountId))
                    .col(text(PushMessage::InformType))
                    .col(text(PushMessage::MainMessage))
                    .col(text(PushMessage::Message))
                    .col(integer(PushMessage::SendStatus))
                    .col(timestamp_with_time_zone_null(PushMessage::SentAt))
                    .col(timestamp_with_time_zone(PushMessage::CreatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(drop_table(PushMessage::Table)).await?;
        manager
            .drop_table(drop_table(MembershipFilter::Table))
            .await?;
        manager
            .drop_table(drop_table(MembershipPoint::Table))
            .await?;
        manager
            .drop_table(drop_table(MembershipAccount::Table))
            .await
    }
}

#[derive(DeriveIden)]
enum MembershipAccount {
    Table,
    Id,
    Username,
    Mobile,
    Email,
    IsDeleted,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum MembershipPoint {
    Table,
    Id,
    AccountId,
    MemberLevel,
    MemberPoint,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum MembershipFilter {
    Table,
    Id,
    AccountId,
    ActiveDays,
    MemberLevel,
    OrderCount,
    TotalAmount,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum PushMessage {
    Table,
    Id,
    CampaignId,
    UserAccountId,
    InformType,
    MainMessage,
    Message,
    SendStatus,
    SentAt,
    CreatedAt,
}

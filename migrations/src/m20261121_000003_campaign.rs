//! herald's own tables: `campaign` (one row per push campaign with its running totals),
//! `campaign_bucket` and `campaign_batch` (completion markers that make bucket expansion and
//! batch sending idempotent on redelivery), and `campaign_failure` (one row per user a
//! campaign could not reach, with the reason).

use sea_orm_migration::{prelude::*, schema::*};

use crate::{drop_table, index, pk_big_auto, unique_index};

/// Creates herald's campaign tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Campaign::Table)
                    .col(pk_big_auto(Campaign::Id))
                    .col(text(Campaign::Kind))
                    .col(text(Campaign::Name))
                    .col(text(Campaign::CreatedBy))
                    .col(timestamp_with_time_zone(Campaign::StartsAt))
                    .col(timestamp_with_time_zone(Campaign::EndsAt))
                    .col(text(Campaign::InformType))
                    .col(text(Campaign::Title))
                    .col(text(Campaign::Body))
                    // JSON audience spec.
                    .col(text(Campaign::Audience))
                    .col(text(Campaign::Status))
                    .col(text(Campaign::DedupeKey))
                    // Unknown until the audience has been sharded.
                    .col(big_integer_null(Campaign::BucketsTotal))
                    .col(big_integer(Campaign::Recipients).default(0))
                    .col(big_integer(Campaign::Sent).default(0))
                    .col(big_integer(Campaign::Skipped).default(0))
                    .col(big_integer(Campaign::Failed).default(0))
                    .col(text_null(Campaign::Error))
                    .col(timestamp_with_time_zone(Campaign::CreatedAt))
                    .col(timestamp_with_time_zone_null(Campaign::StartedAt))
                    .col(timestamp_with_time_zone_null(Campaign::FinishedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_campaign_status",
                Campaign::Table,
                [Campaign::Status],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_campaign_dedupe_key",
                Campaign::Table,
                [Campaign::DedupeKey],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(CampaignBucket::Table)
                    .col(big_integer(CampaignBucket::CampaignId))
                    .col(big_integer(CampaignBucket::Bucket))
                    .col(integer(CampaignBucket::Parts))
                    .col(big_integer(CampaignBucket::Recipients))
                    .col(timestamp_with_time_zone(CampaignBucket::DoneAt))
                    .primary_key(
                        Index::create()
                            .col(CampaignBucket::CampaignId)
                            .col(CampaignBucket::Bucket),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(CampaignBatch::Table)
                    .col(big_integer(CampaignBatch::CampaignId))
                    .col(big_integer(CampaignBatch::Bucket))
                    .col(integer(CampaignBatch::Part))
                    .col(integer(CampaignBatch::Recipients))
                    .col(integer(CampaignBatch::Sent))
                    .col(integer(CampaignBatch::Skipped))
                    .col(integer(CampaignBatch::Failed))
                    .col(timestamp_with_time_zone(CampaignBatch::DoneAt))
                    .primary_key(
                        Index::create()
                            .col(CampaignBatch::CampaignId)
                            .col(CampaignBatch::Bucket)
                            .col(CampaignBatch::Part),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(CampaignFailure::Table)
                    .col(pk_big_auto(CampaignFailure::Id))
                    .col(big_integer(CampaignFailure::CampaignId))
                    .col(big_integer(CampaignFailure::UserId))
                    .col(text(CampaignFailure::Reason))
                    .col(timestamp_with_time_zone(CampaignFailure::CreatedAt))
                    .to_owned(),
            )
            .await?;
        // A retried batch must not record the same user's failure twice.
        manager
            .create_index(unique_index(
                "ux_campaign_failure_user",
                CampaignFailure::Table,
                [CampaignFailure::CampaignId, CampaignFailure::UserId],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(drop_table(CampaignFailure::Table))
            .await?;
        manager.drop_table(drop_table(CampaignBatch::Table)).await?;
        manager
            .drop_table(drop_table(CampaignBucket::Table))
            .await?;
        manager.drop_table(drop_table(Campaign::Table)).await
    }
}

#[derive(DeriveIden)]
enum Campaign {
    Table,
    Id,
    Kind,
    Name,
    CreatedBy,
    StartsAt,
    EndsAt,
    InformType,
    Title,
    Body,
    Audience,
    Status,
    DedupeKey,
    BucketsTotal,
    Recipients,
    Sent,
    Skipped,
    Failed,
    Error,
    CreatedAt,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum CampaignBucket {
    Table,
    CampaignId,
    Bucket,
    Parts,
    Recipients,
    DoneAt,
}

#[derive(DeriveIden)]
enum CampaignBatch {
    Table,
    CampaignId,
    Bucket,
    Part,
    Recipients,
    Sent,
    Skipped,
    Failed,
    DoneAt,
}

#[derive(DeriveIden)]
enum CampaignFailure {
    Table,
    Id,
    CampaignId,
    UserId,
    Reason,
    CreatedAt,
}

//! `campaign_dedupe`: the newest campaign per dedupe key, keyed by the key itself. A create
//! claims its key here with `INSERT … ON CONFLICT`, which finds a repeat through the primary
//! key whatever the planner believes about the table's size, and lets one of two racing
//! creates win. The `NOT EXISTS` over `campaign` it replaces was planned, in a statement
//! prepared while the table was small, as a scan of every campaign, so each create cost more
//! as campaigns piled up. Existing campaigns' keys are copied here, and the index on
//! `campaign.dedupe_key`, which nothing reads any more, is dropped.

use sea_orm_migration::{prelude::*, schema::*};

use crate::{drop_table, index};

/// Adds the dedupe table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CampaignDedupe::Table)
                    .col(text(CampaignDedupe::DedupeKey).primary_key())
                    .col(big_integer(CampaignDedupe::CampaignId))
                    .col(timestamp_with_time_zone(CampaignDedupe::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO campaign_dedupe (dedupe_key, campaign_id, created_at) \
                 SELECT c.dedupe_key, c.id, c.created_at FROM campaign c \
                 WHERE c.id = (SELECT MAX(n.id) FROM campaign n WHERE n.dedupe_key = c.dedupe_key)",
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name(DEDUPE_INDEX)
                    .table(Campaign::Table)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(index(DEDUPE_INDEX, Campaign::Table, [Campaign::DedupeKey]))
            .await?;
        manager.drop_table(drop_table(CampaignDedupe::Table)).await
    }
}

/// The index migration 3 made on `campaign.dedupe_key`.
const DEDUPE_INDEX: &str = "ix_campaign_dedupe_key";

#[derive(DeriveIden)]
enum CampaignDedupe {
    Table,
    DedupeKey,
    CampaignId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Campaign {
    Table,
    DedupeKey,
}

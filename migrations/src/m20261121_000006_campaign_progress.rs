//! `campaign_progress`: one row of running counters per campaign, kept in the same
//! transaction as the `campaign_bucket` and `campaign_batch` rows they count. A campaign's
//! progress is then one row to read instead of sums over a row per batch (100,000 rows for
//! a 10M-user campaign, read on every progress check). Campaigns recorded before this
//! migration get their counters from those sums once, here.

use sea_orm_migration::{prelude::*, schema::*};

use crate::drop_table;

/// Adds the progress counters.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(CampaignProgress::Table)
                    .col(big_integer(CampaignProgress::CampaignId).primary_key())
                    .col(big_integer(CampaignProgress::BucketsDone).default(0))
                    .col(big_integer(CampaignProgress::PartsTotal).default(0))
                    .col(big_integer(CampaignProgress::Recipients).default(0))
                    .col(big_integer(CampaignProgress::BatchesDone).default(0))
                    .col(big_integer(CampaignProgress::Sent).default(0))
                    .col(big_integer(CampaignProgress::Skipped).default(0))
                    .col(big_integer(CampaignProgress::Failed).default(0))
                    .to_owned(),
            )
            .await?;
        // Counters of campaigns recorded before this migration.
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO campaign_progress (campaign_id, buckets_done, parts_total, \
                 recipients, batches_done, sent, skipped, failed) \
                 SELECT c.id, \
                 COALESCE((SELECT COUNT(*) FROM campaign_bucket b WHERE b.campaign_id = c.id), 0), \
                 COALESCE((SELECT SUM(parts) FROM campaign_bucket b WHERE b.campaign_id = c.id), 0), \
                 COALESCE((SELECT SUM(recipients) FROM campaign_bucket b WHERE b.campaign_id = c.id), 0), \
                 COALESCE((SELECT COUNT(*) FROM campaign_batch p WHERE p.campaign_id = c.id), 0), \
                 COALESCE((SELECT SUM(sent) FROM campaign_batch p WHERE p.campaign_id = c.id), 0), \
                 COALESCE((SELECT SUM(skipped) FROM campaign_batch p WHERE p.campaign_id = c.id), 0), \
                 COALESCE((SELECT SUM(failed) FROM campaign_batch p WHERE p.campaign_id = c.id), 0) \
                 FROM campaign c",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(drop_table(CampaignProgress::Table))
            .await
    }
}

#[derive(DeriveIden)]
enum CampaignProgress {
    Table,
    CampaignId,
    BucketsDone,
    PartsTotal,
    Recipients,
    BatchesDone,
    Sent,
    Skipped,
    Failed,
}

//! `campaign_progress.buckets_total`: a campaign's bucket count beside its counters, so the
//! statement that records batches can tell whether it completed a campaign from the progress
//! row alone, without a join to `campaign` whose plan depends on what the planner believes
//! about that table's size. Sharded campaigns get theirs copied here.

use sea_orm_migration::{prelude::*, schema::*};

/// Adds the bucket count to the progress row.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CampaignProgress::Table)
                    .add_column(big_integer_null(CampaignProgress::BucketsTotal))
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        db.execute_unprepared(
            "INSERT INTO campaign_progress (campaign_id) SELECT c.id FROM campaign c \
             WHERE c.buckets_total IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM campaign_progress p WHERE p.campaign_id = c.id)",
        )
        .await?;
        db.execute_unprepared(
            "UPDATE campaign_progress SET buckets_total = \
             (SELECT c.buckets_total FROM campaign c WHERE c.id = campaign_progress.campaign_id)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CampaignProgress::Table)
                    .drop_column(CampaignProgress::BucketsTotal)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum CampaignProgress {
    Table,
    BucketsTotal,
}

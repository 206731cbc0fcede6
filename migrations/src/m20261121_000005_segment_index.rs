//! An index on `membership_point.member_point`, so a segment's id bounds with a selective
//! `min_points` (the sharder's first query) need not scan every member's points.

use sea_orm_migration::prelude::*;

use crate::index;

/// Adds the points index.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(index(
                "ix_membership_point_member_point",
                MembershipPoint::Table,
                [MembershipPoint::MemberPoint],
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_membership_point_member_point")
                    .table(MembershipPoint::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum MembershipPoint {
    Table,
    MemberPoint,
}

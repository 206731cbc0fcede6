//! One segment of the seeded users for the tests that push to a segment, and the users an
//! SQL query of it returns: an oracle written apart from the engine's audience SQL.

use herald_schemas::SegmentFilter;
use sea_orm::{ConnectionTrait, FromQueryResult, Statement};

use super::TestEnv;

/// Member levels 3 to 5 with 1,000 points or more, active 30 days or more.
pub fn gold_members() -> SegmentFilter {
    SegmentFilter {
        member_levels: Some(vec![3, 4, 5]),
        min_points: Some(1_000),
        min_active_days: Some(30),
    }
}

impl TestEnv {
    /// The ids in [`gold_members`], in order, by a plain SQL query.
    pub async fn gold_member_ids(&self) -> anyhow::Result<Vec<i64>> {
        #[derive(FromQueryResult)]
        struct Id {
            id: i64,
        }
        let rows = Id::find_by_statement(Statement::from_string(
            self.db.get_database_backend(),
            "SELECT a.id FROM membership_account a \
             JOIN membership_point p ON p.account_id = a.id \
             JOIN membership_filter f ON f.account_id = a.id \
             WHERE a.is_deleted = false AND p.member_level IN (3, 4, 5) \
             AND p.member_point >= 1000 AND f.active_days >= 30 ORDER BY a.id",
        ))
        .all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}

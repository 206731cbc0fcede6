//! Demo and test users: fills `membership_account`, `membership_point` and
//! `membership_filter` with varied levels, points and active days, in set-based statements
//! (PostgreSQL's `generate_series`, a recursive CTE on SQLite), a million rows per statement.

use chrono::Utc;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, FromQueryResult, Statement, Value,
};

/// Rows inserted per statement.
const CHUNK: i64 = 1_000_000;

/// What a seed run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// First new user id.
    pub first_id: i64,
    /// Last new user id.
    pub last_id: i64,
}

/// The level a seeded user gets: 1..=5, deterministic so tests can compute segments.
pub fn seeded_level(id: i64) -> i64 {
    1 + (id * 7) % 5
}

/// The points a seeded user gets: 0..10000.
pub fn seeded_points(id: i64) -> i64 {
    (id * 37) % 10_000
}

/// The active days a seeded user gets: 0..=90.
pub fn seeded_active_days(id: i64) -> i64 {
    (id * 13) % 91
}

/// Appends `count` users after the current highest id.
pub async fn seed_users(db: &DatabaseConnection, count: i64) -> Result<SeedReport, DbErr> {
    #[derive(FromQueryResult)]
    struct Max {
        hi: Option<i64>,
    }
    let backend = db.get_database_backend();
    let hi = Max::find_by_statement(Statement::from_string(
        backend,
        "SELECT MAX(id) AS hi FROM membership_account",
    ))
    .one(db)
    .await?
    .and_then(|m| m.hi)
    .unwrap_or(0);
    let first = hi + 1;
    let last = hi + count.max(0);
    let mut start = first;
    while start <= last {
        let end = (start + CHUNK - 1).min(last);
        let txn_stmts = statements(backend, start, end);
        for (sql, values) in txn_stmts {
            db.execute(Statement::from_sql_and_values(backend, sql, values))
                .await?;
        }
        start = end + 1;
    }
    if backend == DbBackend::Postgres && count > 0 {
        db.execute(Statement::from_string(
            backend,
            "SELECT setval(pg_get_serial_sequence('membership_account', 'id'), \
             (SELECT MAX(id) FROM membership_account))",
        ))
        .await?;
    }
    if count > 0 {
        // Fresh statistics after a bulk load: without them PostgreSQL plans a segment's
        // bounds query as a hash join over every user (0.3 s at 1M users) instead of an
        // index lookup (0.05 ms), until autovacuum gets to the tables. The vacuum too is
        // done now rather than by autovacuum in the middle of the first campaign, whose
        // reads would otherwise also set every new row's hint bits.
        let analyze = match backend {
            DbBackend::Postgres => {
                "VACUUM (ANALYZE) membership_account, membership_point, membership_filter"
            }
            _ => "ANALYZE",
        };
        db.execute(Statement::from_string(backend, analyze)).await?;
    }
    Ok(SeedReport {
        first_id: first,
        last_id: last,
    })
}

fn statements(backend: DbBackend, start: i64, end: i64) -> Vec<(String, Vec<Value>)> {
    let now = Utc::now();
    let series = match backend {
        DbBackend::Postgres => "generate_series($1::bigint, $2::bigint) AS s(g)".to_string(),
        _ => "s".to_string(),
    };
    let with = match backend {
        DbBackend::Postgres => String::new(),
        _ => "WITH RECURSIVE s(g) AS (SELECT $1 UNION ALL SELECT g + 1 FROM s WHERE g < $2) "
            .to_string(),
    };
    let account = format!(
        "{with}INSERT INTO membership_account (id, username, mobile, email, is_deleted, created_at, updated_at) \
         SELECT g, 'user' || g, CAST(13800000000 + g AS TEXT), 'user' || g || '@example.com', $3, $4, $4 \
         FROM {series}"
    );
    let point = format!(
        "{with}INSERT INTO membership_point (account_id, member_level, member_point, created_at, updated_at) \
         SELECT g, 1 + (g * 7) % 5, (g * 37) % 10000, $3, $3 FROM {series}"
    );
    let filter = format!(
        "{with}INSERT INTO membership_filter (account_id, active_days, member_level, order_count, total_amount, created_at, updated_at) \
         SELECT g, (g * 13) % 91, 1 + (g * 7) % 5, g % 50, (g * 101) % 1000000, $3, $3 FROM {series}"
    );
    vec![
        (
            account,
            vec![start.into(), end.into(), false.into(), now.into()],
        ),
        (point, vec![start.into(), end.into(), now.into()]),
        (filter, vec![start.into(), end.into(), now.into()]),
    ]
}

/// Number of users.
pub async fn count_users(db: &DatabaseConnection) -> Result<i64, DbErr> {
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    Ok(N::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM membership_account",
    ))
    .one(db)
    .await?
    .map(|n| n.n)
    .unwrap_or(0))
}

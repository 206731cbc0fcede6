//! Runs herald's migrations up and down against real SQLite (in memory) and PostgreSQL,
//! checking every table and column of the schema contract, the defaults and the named
//! unique indexes.
//!
//! PostgreSQL comes from `HERALD_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the test creates its own database there
//! and drops it afterwards, pass or fail.

use std::time::{SystemTime, UNIX_EPOCH};

use herald_migrations::{with_database, Migrator};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, SqlErr, Statement};
use sea_orm_migration::MigratorTrait;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Whether a column may hold NULL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Null {
    No,
    Yes,
}
use Null::{No, Yes};

const BIGINT: &str = "bigint";
const INT: &str = "integer";
const TEXT: &str = "text";
const BOOL: &str = "boolean";
const TSTZ: &str = "timestamp with time zone";
const DATE: &str = "date";

/// Table, then its columns in order: name, PostgreSQL type, nullability.
type TableSpec = (&'static str, &'static [(&'static str, &'static str, Null)]);

/// The schema contract other crates rely on.
const SCHEMA: &[TableSpec] = &[
    (
        "membership_account",
        &[
            ("id", BIGINT, No),
            ("username", TEXT, No),
            ("mobile", TEXT, Yes),
            ("email", TEXT, Yes),
            ("is_deleted", BOOL, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "membership_point",
        &[
            ("id", BIGINT, No),
            ("account_id", BIGINT, No),
            ("member_level", INT, No),
            ("member_point", BIGINT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "membership_filter",
        &[
            ("id", BIGINT, No),
            ("account_id", BIGINT, No),
            ("active_days", INT, No),
            ("member_level", INT, No),
            ("order_count", INT, No),
            ("total_amount", BIGINT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "push_message",
        &[
            ("id", BIGINT, No),
            ("campaign_id", BIGINT, Yes),
            ("user_account_id", BIGINT, No),
            ("inform_type", TEXT, No),
            ("main_message", TEXT, No),
            ("message", TEXT, No),
            ("send_status", INT, No),
            ("sent_at", TSTZ, Yes),
            ("created_at", TSTZ, No),
        ],
    ),
    (
        "sales_promotion",
        &[
            ("id", BIGINT, No),
            ("campaign_id", BIGINT, Yes),
            ("name", TEXT, No),
            ("start_time", TSTZ, No),
            ("end_time", TSTZ, No),
            ("remark", TEXT, Yes),
            ("status", INT, No),
            ("rule", TEXT, Yes),
            ("type", INT, No),
            ("created_by", TEXT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "sales_promotion_coupon",
        &[
            ("id", BIGINT, No),
            ("coupon_name", TEXT, No),
            ("coupon_type", INT, No),
            ("coupon_rule", TEXT, No),
            ("activity_start_time", TSTZ, No),
            ("activity_end_time", TSTZ, No),
            ("coupon_count", BIGINT, Yes),
            ("coupon_received_count", BIGINT, No),
            ("coupon_receive_type", TEXT, No),
            ("inform_type", TEXT, No),
            ("status", INT, No),
            ("created_by", TEXT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
            ("delivery", TEXT, No),
            ("segment", TEXT, Yes),
            ("campaign_id", BIGINT, Yes),
            ("dedupe_key", TEXT, Yes),
        ],
    ),
    (
        "sales_promotion_coupon_item",
        &[
            ("id", BIGINT, No),
            ("coupon_id", BIGINT, No),
            ("coupon_type", INT, No),
            ("user_account_id", BIGINT, No),
            ("is_used", BOOL, No),
            ("used_time", TSTZ, Yes),
            ("effective_start_time", TSTZ, No),
            ("effective_end_time", TSTZ, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "hot_goods_crontab",
        &[
            ("id", BIGINT, No),
            ("goods_id", BIGINT, No),
            ("goods_name", TEXT, No),
            ("goods_desc", TEXT, Yes),
            ("keywords", TEXT, Yes),
            ("portrayal", TEXT, No),
            ("crontab_date", DATE, No),
            ("status", INT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "push_message_crontab",
        &[
            ("id", BIGINT, No),
            ("automatic_push_name", TEXT, No),
            ("main_message", TEXT, No),
            ("message", TEXT, No),
            ("inform_type", TEXT, No),
            ("filter_condition", TEXT, Yes),
            ("push_date_time", TSTZ, No),
            ("status", INT, No),
            ("created_by", TEXT, No),
            ("created_at", TSTZ, No),
            ("updated_at", TSTZ, No),
        ],
    ),
    (
        "campaign",
        &[
            ("id", BIGINT, No),
            ("kind", TEXT, No),
            ("name", TEXT, No),
            ("created_by", TEXT, No),
            ("starts_at", TSTZ, No),
            ("ends_at", TSTZ, No),
            ("inform_type", TEXT, No),
            ("title", TEXT, No),
            ("body", TEXT, No),
            ("audience", TEXT, No),
            ("status", TEXT, No),
            ("dedupe_key", TEXT, No),
            ("buckets_total", BIGINT, Yes),
            ("recipients", BIGINT, No),
            ("sent", BIGINT, No),
            ("skipped", BIGINT, No),
            ("failed", BIGINT, No),
            ("error", TEXT, Yes),
            ("created_at", TSTZ, No),
            ("started_at", TSTZ, Yes),
            ("finished_at", TSTZ, Yes),
            ("coupon_id", BIGINT, Yes),
        ],
    ),
    (
        "campaign_bucket",
        &[
            ("campaign_id", BIGINT, No),
            ("bucket", BIGINT, No),
            ("parts", INT, No),
            ("recipients", BIGINT, No),
            ("done_at", TSTZ, No),
        ],
    ),
    (
        "campaign_batch",
        &[
            ("campaign_id", BIGINT, No),
            ("bucket", BIGINT, No),
            ("part", INT, No),
            ("recipients", INT, No),
            ("sent", INT, No),
            ("skipped", INT, No),
            ("failed", INT, No),
            ("done_at", TSTZ, No),
        ],
    ),
    (
        "campaign_progress",
        &[
            ("campaign_id", BIGINT, No),
            ("buckets_done", BIGINT, No),
            ("parts_total", BIGINT, No),
            ("recipients", BIGINT, No),
            ("batches_done", BIGINT, No),
            ("sent", BIGINT, No),
            ("skipped", BIGINT, No),
            ("failed", BIGINT, No),
            ("buckets_total", BIGINT, Yes),
        ],
    ),
    (
        "campaign_dedupe",
        &[
            ("dedupe_key", TEXT, No),
            ("campaign_id", BIGINT, No),
            ("created_at", TSTZ, No),
        ],
    ),
    (
        "campaign_failure",
        &[
            ("id", BIGINT, No),
            ("campaign_id", BIGINT, No),
            ("user_id", BIGINT, No),
            ("reason", TEXT, No),
            ("created_at", TSTZ, No),
        ],
    ),
];

/// The bookkeeping table sea-orm-migration keeps; it survives `down`.
const MIGRATIONS_TABLE: &str = "seaql_migrations";

const T: &str = "'2026-11-21 08:00:00+00'";

fn coupon_item_insert(coupon_id: i64, user_id: i64) -> String {
    format!(
        "INSERT INTO sales_promotion_coupon_item \
         (coupon_id, coupon_type, user_account_id, effective_start_time, effective_end_time, \
          created_at, updated_at) \
         VALUES ({coupon_id}, 1, {user_id}, {T}, {T}, {T}, {T})"
    )
}

fn campaign_failure_insert(campaign_id: i64, user_id: i64) -> String {
    format!(
        "INSERT INTO campaign_failure (campaign_id, user_id, reason, created_at) \
         VALUES ({campaign_id}, {user_id}, 'no device token', {T})"
    )
}

/// A campaign row with `status`, `dedupe_key`, `created_at` and `buckets_total` (SQL
/// literals, so `{T}` or `NULL` fit).
fn campaign_insert(
    status: &str,
    dedupe_key: &str,
    created_at: &str,
    buckets_total: &str,
) -> String {
    format!(
        "INSERT INTO campaign (kind, name, created_by, starts_at, ends_at, inform_type, title, \
         body, audience, status, dedupe_key, created_at, buckets_total) \
         VALUES ('push', 'n', 'ops', {T}, {T}, 'app', 't', 'b', '{{}}', '{status}', \
         '{dedupe_key}', {created_at}, {buckets_total})"
    )
}

/// An in-memory SQLite database migrated up to and including migration `version`, as a
/// database made before the later migrations would be.
async fn sqlite_at(version: u32) -> DatabaseConnection {
    let db = Database::connect("sqlite::memory:")
        .await
        .expect("open in-memory sqlite");
    Migrator::up(&db, Some(version))
        .await
        .expect("migrate up to an earlier version");
    db
}

/// Tables in the connected database, sorted, excluding the backend's own.
async fn tables(db: &DatabaseConnection) -> Vec<String> {
    let sql = match db.get_database_backend() {
        DbBackend::Sqlite => {
            "SELECT name FROM sqlite_master \
             WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        }
        DbBackend::Postgres => {
            "SELECT table_name::text AS name FROM information_schema.tables \
             WHERE table_schema = current_schema() ORDER BY name"
        }
        other => panic!("unsupported backend {other:?}"),
    };
    let rows = db
        .query_all(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("list tables");
    rows.iter()
        .map(|row| row.try_get::<String>("", "name").expect("table name"))
        .collect()
}

fn expected_tables() -> Vec<String> {
    let mut names: Vec<String> = SCHEMA.iter().map(|(t, _)| t.to_string()).collect();
    names.push(MIGRATIONS_TABLE.to_owned());
    names.sort();
    names
}

/// Asserts every table has exactly the contract's columns, in order, with their nullability
/// (and, on PostgreSQL, their types; SQLite type names are sea-query's own affinity names).
async fn assert_columns(db: &DatabaseConnection) {
    let backend = db.get_database_backend();
    for (table, columns) in SCHEMA {
        let expected: Vec<(String, Option<String>, Null)> = columns
            .iter()
            .map(|(name, ty, null)| {
                let ty = (backend == DbBackend::Postgres).then(|| ty.to_string());
                (name.to_string(), ty, *null)
            })
            .collect();
        let actual: Vec<(String, Option<String>, Null)> = match backend {
            DbBackend::Sqlite => {
                let rows = db
                    .query_all(Statement::from_sql_and_values(
                        backend,
                        "SELECT name, \"notnull\" AS not_null, pk FROM pragma_table_info(?) \
                         ORDER BY cid",
                        [(*table).into()],
                    ))
                    .await
                    .expect("table_info");
                rows.iter()
                    .map(|row| {
                        let name: String = row.try_get("", "name").expect("name");
                        let not_null: i64 = row.try_get("", "not_null").expect("notnull");
                        // An `integer PRIMARY KEY` is the rowid and can never be NULL, though
                        // SQLite does not flag it `notnull`.
                        let pk: i64 = row.try_get("", "pk").expect("pk");
                        let null = if not_null != 0 || pk != 0 { No } else { Yes };
                        (name, None, null)
                    })
                    .collect()
            }
            DbBackend::Postgres => {
                let rows = db
                    .query_all(Statement::from_sql_and_values(
                        backend,
                        "SELECT column_name::text AS name, data_type::text AS ty, \
                         is_nullable::text AS nullable FROM information_schema.columns \
                         WHERE table_schema = current_schema() AND table_name = $1 \
                         ORDER BY ordinal_position",
                        [(*table).into()],
                    ))
                    .await
                    .expect("information_schema.columns");
                rows.iter()
                    .map(|row| {
                        let name: String = row.try_get("", "name").expect("name");
                        let ty: String = row.try_get("", "ty").expect("ty");
                        let nullable: String = row.try_get("", "nullable").expect("nullable");
                        let null = if nullable == "YES" { Yes } else { No };
                        (name, Some(ty), null)
                    })
                    .collect()
            }
            other => panic!("unsupported backend {other:?}"),
        };
        assert_eq!(actual, expected, "columns of {table}");
    }
}

/// Asserts `result` failed on the unique index `index` over `columns` of `table`.
fn assert_unique_violation<T: std::fmt::Debug>(
    backend: DbBackend,
    result: Result<T, DbErr>,
    index: &str,
    table: &str,
    columns: &[&str],
) {
    let err = result.expect_err("duplicate insert must fail");
    let Some(SqlErr::UniqueConstraintViolation(message)) = err.sql_err() else {
        panic!("expected a unique violation on {index}, got {err}");
    };
    // PostgreSQL names the index; SQLite lists the indexed columns instead.
    let expected = match backend {
        DbBackend::Postgres => format!("\"{index}\""),
        _ => columns
            .iter()
            .map(|column| format!("{table}.{column}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    assert!(message.contains(&expected), "{message}");
}

/// Inserts into the tables whose defaults and unique indexes other crates depend on.
async fn assert_defaults_and_uniques(db: &DatabaseConnection) {
    let backend = db.get_database_backend();
    db.execute_unprepared(&format!(
        "INSERT INTO membership_account (username, created_at, updated_at) VALUES ('ann', {T}, {T})"
    ))
    .await
    .expect("insert account");
    let row = db
        .query_one(Statement::from_string(
            backend,
            "SELECT id, is_deleted FROM membership_account",
        ))
        .await
        .expect("select account")
        .expect("one account");
    assert_eq!(row.try_get::<i64>("", "id").expect("id"), 1);
    assert!(!row.try_get::<bool>("", "is_deleted").expect("is_deleted"));

    db.execute_unprepared(&campaign_insert("pending", "k", T, "NULL"))
        .await
        .expect("insert campaign");
    let row = db
        .query_one(Statement::from_string(
            backend,
            "SELECT recipients + sent + skipped + failed AS total, buckets_total FROM campaign",
        ))
        .await
        .expect("select campaign")
        .expect("one campaign");
    assert_eq!(row.try_get::<i64>("", "total").expect("total"), 0);
    assert_eq!(
        row.try_get::<Option<i64>>("", "buckets_total")
            .expect("buckets_total"),
        None
    );

    db.execute_unprepared(&coupon_item_insert(7, 42))
        .await
        .expect("first coupon item");
    db.execute_unprepared(&coupon_item_insert(7, 43))
        .await
        .expect("same coupon, another user");
    db.execute_unprepared(&coupon_item_insert(8, 42))
        .await
        .expect("another coupon, same user");
    assert_unique_violation(
        backend,
        db.execute_unprepared(&coupon_item_insert(7, 42)).await,
        "ux_coupon_item_coupon_user",
        "sales_promotion_coupon_item",
        &["coupon_id", "user_account_id"],
    );

    db.execute_unprepared(&campaign_failure_insert(1, 42))
        .await
        .expect("first failure");
    assert_unique_violation(
        backend,
        db.execute_unprepared(&campaign_failure_insert(1, 42)).await,
        "ux_campaign_failure_user",
        "campaign_failure",
        &["campaign_id", "user_id"],
    );

    db.execute_unprepared(&format!(
        "INSERT INTO campaign_bucket (campaign_id, bucket, parts, recipients, done_at) \
         VALUES (1, 0, 2, 10, {T})"
    ))
    .await
    .expect("first bucket marker");
    let again = db
        .execute_unprepared(&format!(
            "INSERT INTO campaign_bucket (campaign_id, bucket, parts, recipients, done_at) \
             VALUES (1, 0, 2, 10, {T})"
        ))
        .await;
    assert!(
        matches!(
            again.as_ref().map_err(DbErr::sql_err),
            Err(Some(SqlErr::UniqueConstraintViolation(_)))
        ),
        "bucket marker primary key must reject a second row: {again:?}"
    );
}

#[tokio::test]
async fn sqlite_up_down_up() {
    let db = Database::connect("sqlite::memory:")
        .await
        .expect("open in-memory sqlite");

    Migrator::up(&db, None).await.expect("migrate up");
    assert_eq!(tables(&db).await, expected_tables());
    assert_columns(&db).await;
    assert_defaults_and_uniques(&db).await;

    Migrator::down(&db, None).await.expect("migrate down");
    assert_eq!(tables(&db).await, vec![MIGRATIONS_TABLE.to_owned()]);

    // Down must leave nothing behind that blocks a fresh up (indexes included).
    Migrator::up(&db, None).await.expect("migrate up again");
    assert_eq!(tables(&db).await, expected_tables());
    assert_defaults_and_uniques(&db).await;
}

async fn postgres_body(url: String) {
    let db = Database::connect(&url)
        .await
        .expect("connect to test database");

    Migrator::up(&db, None).await.expect("migrate up");
    assert_eq!(tables(&db).await, expected_tables());
    assert_columns(&db).await;
    assert_defaults_and_uniques(&db).await;

    Migrator::down(&db, None).await.expect("migrate down");
    assert_eq!(tables(&db).await, vec![MIGRATIONS_TABLE.to_owned()]);

    Migrator::up(&db, None).await.expect("migrate up again");
    assert_eq!(tables(&db).await, expected_tables());
    Migrator::down(&db, None).await.expect("migrate down again");

    db.close().await.expect("close test database");
}

#[tokio::test]
async fn postgres_up_down() {
    let admin_url = std::env::var("HERALD_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let database = format!("herald_mig_{}_{nanos}", std::process::id());

    let admin = Database::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("connect to {admin_url}: {e}"));
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{database}\""))
        .await
        .expect("create test database");

    // Run the body as its own task so a failed assertion still reaches the cleanup below.
    let outcome = tokio::spawn(postgres_body(with_database(&admin_url, &database))).await;

    admin
        .execute_unprepared(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await
        .expect("drop test database");
    admin.close().await.expect("close admin connection");

    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test]
async fn progress_counters_start_from_the_records_of_earlier_campaigns() {
    // A database migrated before campaign_progress existed, with a campaign half done.
    let db = sqlite_at(5).await;
    for sql in [
        campaign_insert("running", "k", T, "NULL"),
        format!(
            "INSERT INTO campaign_bucket (campaign_id, bucket, parts, recipients, done_at) \
             VALUES (1, 0, 2, 150, {T}), (1, 1, 1, 40, {T})"
        ),
        format!(
            "INSERT INTO campaign_batch (campaign_id, bucket, part, recipients, sent, skipped, \
             failed, done_at) VALUES (1, 0, 0, 100, 90, 8, 2, {T}), (1, 1, 0, 40, 40, 0, 0, {T})"
        ),
    ] {
        db.execute_unprepared(&sql).await.expect("insert");
    }
    Migrator::up(&db, None).await.expect("migrate up");
    let row = db
        .query_one(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT buckets_done, parts_total, recipients, batches_done, sent, skipped, failed \
             FROM campaign_progress WHERE campaign_id = 1",
        ))
        .await
        .expect("select progress")
        .expect("a progress row for the earlier campaign");
    let got: Vec<i64> = [
        "buckets_done",
        "parts_total",
        "recipients",
        "batches_done",
        "sent",
        "skipped",
        "failed",
    ]
    .iter()
    .map(|c| row.try_get::<i64>("", c).expect(c))
    .collect();
    assert_eq!(got, vec![2, 3, 190, 2, 130, 8, 2]);
}

#[tokio::test]
async fn dedupe_claims_start_from_the_newest_earlier_campaign_per_key() {
    // A database migrated before campaign_dedupe existed: key k created twice (outside its
    // window), key j once.
    let db = sqlite_at(6).await;
    for (key, at) in [("k", "'2026-11-20 08:00:00+00'"), ("j", T), ("k", T)] {
        db.execute_unprepared(&campaign_insert("done", key, at, "NULL"))
            .await
            .expect("insert campaign");
    }
    Migrator::up(&db, None).await.expect("migrate up");
    let rows = db
        .query_all(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT dedupe_key, campaign_id FROM campaign_dedupe ORDER BY dedupe_key",
        ))
        .await
        .expect("select claims");
    let got: Vec<(String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "dedupe_key").expect("dedupe_key"),
                r.try_get("", "campaign_id").expect("campaign_id"),
            )
        })
        .collect();
    assert_eq!(got, vec![("j".to_string(), 2), ("k".to_string(), 3)]);
    // Down past migration 8, then 7.
    Migrator::down(&db, Some(2))
        .await
        .expect("migrate down two");
    assert!(!tables(&db).await.contains(&"campaign_dedupe".to_string()));
}

#[tokio::test]
async fn progress_rows_get_the_bucket_counts_of_sharded_campaigns() {
    // Before migration 8: campaign 1 sharded into 4 buckets with a progress row, campaign 2
    // sharded into 2 with none yet, campaign 3 not sharded.
    let db = sqlite_at(7).await;
    for buckets in ["4", "2", "NULL"] {
        db.execute_unprepared(&campaign_insert("running", "k", T, buckets))
            .await
            .expect("insert campaign");
    }
    db.execute_unprepared(
        "INSERT INTO campaign_progress (campaign_id, buckets_done) VALUES (1, 3)",
    )
    .await
    .expect("insert progress");
    Migrator::up(&db, None).await.expect("migrate up");
    let rows = db
        .query_all(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT campaign_id, buckets_done, buckets_total FROM campaign_progress \
             ORDER BY campaign_id",
        ))
        .await
        .expect("select progress");
    let got: Vec<(i64, i64, Option<i64>)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "campaign_id").expect("campaign_id"),
                r.try_get("", "buckets_done").expect("buckets_done"),
                r.try_get("", "buckets_total").expect("buckets_total"),
            )
        })
        .collect();
    assert_eq!(got, vec![(1, 3, Some(4)), (2, 0, Some(2))]);
}

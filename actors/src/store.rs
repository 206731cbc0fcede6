//! The database side of the pipeline (sea-orm over PostgreSQL or SQLite): campaign rows,
//! audience reads, per-bucket and per-batch completion records, failures. Every write the
//! pipeline makes is idempotent (`ON CONFLICT DO NOTHING` or a guarded `UPDATE`), because any
//! message may be handled twice.
//!
//! Statements use `$1, $2, ...` placeholders in ascending order, which both PostgreSQL and
//! SQLite accept.

use chrono::{DateTime, Utc};
use herald_schemas::{Audience, CampaignState, InformType, SegmentFilter};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, FromQueryResult, QueryResult, Statement,
    TransactionTrait, Value,
};

mod campaigns;

pub use campaigns::{CampaignInsert, NewCampaign};

/// A campaign row, as the pipeline needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    /// Id.
    pub id: i64,
    /// Kind (`promotion`).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Channel.
    pub inform_type: InformType,
    /// Push title.
    pub title: String,
    /// Push body.
    pub body: String,
    /// Audience.
    pub audience: Audience,
    /// Lifecycle state.
    pub status: CampaignState,
    /// Buckets, once sharded.
    pub buckets_total: Option<i64>,
    /// Creation time in ms: with the id, names this campaign in messages and Redis keys, so
    /// an older campaign with the same id (a recreated database) is never mistaken for it.
    pub epoch: i64,
    /// The coupon a `coupon_segment` or `coupon_eager` campaign pushes or issues.
    pub coupon_id: Option<i64>,
}

#[derive(Debug, FromQueryResult)]
struct CampaignRow {
    id: i64,
    kind: String,
    name: String,
    inform_type: String,
    title: String,
    body: String,
    audience: String,
    status: String,
    buckets_total: Option<i64>,
    created_at: DateTime<Utc>,
    coupon_id: Option<i64>,
}

impl TryFrom<CampaignRow> for Campaign {
    type Error = DbErr;

    fn try_from(r: CampaignRow) -> Result<Self, DbErr> {
        let bad = |what: &str| DbErr::Custom(format!("campaign {}: bad {what}", r.id));
        Ok(Campaign {
            id: r.id,
            kind: r.kind.clone(),
            name: r.name.clone(),
            inform_type: InformType::parse(&r.inform_type).ok_or_else(|| bad("inform_type"))?,
            title: r.title.clone(),
            body: r.body.clone(),
            audience: serde_json::from_str(&r.audience).map_err(|_| bad("audience"))?,
            status: CampaignState::parse(&r.status).ok_or_else(|| bad("status"))?,
            buckets_total: r.buckets_total,
            epoch: r.created_at.timestamp_millis(),
            coupon_id: r.coupon_id,
        })
    }
}

/// A finished push batch and its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    /// Campaign.
    pub campaign_id: i64,
    /// Bucket.
    pub bucket: i64,
    /// Part within the bucket.
    pub part: i32,
    /// Users in the batch.
    pub recipients: i32,
    /// Users sent.
    pub sent: i32,
    /// Users skipped (sent before).
    pub skipped: i32,
    /// Users failed for good.
    pub failed: i32,
    /// When it finished.
    pub done_at: DateTime<Utc>,
}

/// An expanded bucket: how many push batches and users it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRecord {
    /// Campaign.
    pub campaign_id: i64,
    /// Bucket.
    pub bucket: i64,
    /// Push batches it was expanded into.
    pub parts: i32,
    /// Users in the bucket.
    pub recipients: i64,
    /// When it was expanded.
    pub done_at: DateTime<Utc>,
}

/// Counters of a campaign (its `campaign_progress` row), or increments to add to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, FromQueryResult)]
pub struct Progress {
    /// Buckets expanded.
    pub buckets_done: i64,
    /// Push batches the expanded buckets produced.
    pub parts_total: i64,
    /// Users in the expanded buckets.
    pub recipients: i64,
    /// Push batches finished.
    pub batches_done: i64,
    /// Pushes accepted by the provider.
    pub sent: i64,
    /// Users skipped as already done.
    pub skipped: i64,
    /// Users failed for good.
    pub failed: i64,
}

impl Progress {
    /// Whether a campaign sharded into `buckets_total` buckets has every bucket expanded and
    /// every push batch finished. `COMPLETE` says the same in SQL.
    pub fn is_complete(&self, buckets_total: i64) -> bool {
        self.buckets_done >= buckets_total && self.batches_done >= self.parts_total
    }
}

/// [`Progress::is_complete`] over a progress row `p`, which holds the campaign's bucket count
/// once it is sharded. The count lives beside the counters so that this check reads nothing
/// but the row the record statement just wrote: a join to `campaign` here was planned, in a
/// statement prepared while that table was small, as a scan of every campaign.
const COMPLETE: &str = "p.buckets_total IS NOT NULL AND p.buckets_done >= p.buckets_total \
     AND p.batches_done >= p.parts_total";

/// Full campaign status for the API.
#[derive(Debug, Clone, FromQueryResult)]
pub struct StatusRow {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// State.
    pub status: String,
    /// Buckets, once sharded.
    pub buckets_total: Option<i64>,
    /// Final counters (set on completion).
    pub recipients: i64,
    /// Final counters (set on completion).
    pub sent: i64,
    /// Final counters (set on completion).
    pub skipped: i64,
    /// Final counters (set on completion).
    pub failed: i64,
    /// Error, if failed.
    pub error: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Started.
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Typed access to herald's tables.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

/// The lowest and highest of `ids` (0 and 0 for none). The statements that look campaigns
/// up by an array of ids also bound them (`id = ANY($ids) AND id BETWEEN $lo AND $hi`):
/// each connection keeps its plan of a statement once it has run it a few times, and a plan
/// made while the table was new and small scans the whole table for `id = ANY($ids)`. It
/// kept doing so as the table grew to thousands of rows, which on a fresh database made
/// completing a batch of 16 empty campaigns cost a millisecond. A range whose width the
/// planner cannot know makes it use the primary key whatever the table's size.
fn id_bounds(ids: &[i64]) -> (i64, i64) {
    let lo = ids.iter().copied().min().unwrap_or(0);
    let hi = ids.iter().copied().max().unwrap_or(0);
    (lo, hi)
}

/// Runs `statement` once on each of `connections` connections of `db`, each in a transaction
/// that is rolled back, so that every connection has it prepared and its backend has the
/// catalog entries of its tables cached before the first real call.
pub async fn prepare_on_each_connection(
    db: &DatabaseConnection,
    connections: usize,
    statement: &Statement,
) -> Result<(), DbErr> {
    // Held together, so that each takes a connection of its own.
    let mut held = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        held.push(db.begin().await?);
    }
    for txn in held {
        txn.execute(statement.clone()).await?;
        txn.rollback().await?;
    }
    Ok(())
}

pub(crate) fn stmt<C: ConnectionTrait>(conn: &C, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(conn.get_database_backend(), sql, values)
}

/// A multi-row `INSERT INTO {into} VALUES … ON CONFLICT DO NOTHING RETURNING {returning}`
/// of `rows`, or None for none: a row recorded before is left as it is, and the rows
/// actually inserted come back. Padded to a power of two with repeats of the first row
/// (ON CONFLICT DO NOTHING skips them), so the statement takes few shapes and each
/// connection plans it once.
fn records_stmt<T>(
    backend: DbBackend,
    into: &str,
    returning: &str,
    rows: &[T],
    values: impl Fn(&T) -> Vec<Value>,
) -> Option<Statement> {
    let first = rows.first()?;
    let count = rows.len().next_power_of_two();
    let mut sql = format!("INSERT INTO {into} VALUES ");
    let mut all: Vec<Value> = Vec::new();
    for i in 0..count {
        let row = values(rows.get(i).unwrap_or(first));
        let n = all.len();
        if i > 0 {
            sql.push_str(", ");
        }
        let marks: Vec<String> = (n + 1..=n + row.len()).map(|k| format!("${k}")).collect();
        sql.push_str(&format!("({})", marks.join(", ")));
        all.extend(row);
    }
    sql.push_str(&format!(" ON CONFLICT DO NOTHING RETURNING {returning}"));
    Some(Statement::from_sql_and_values(backend, sql, all))
}

fn batch_records_stmt(backend: DbBackend, batches: &[BatchRecord]) -> Option<Statement> {
    records_stmt(
        backend,
        "campaign_batch (campaign_id, bucket, part, recipients, sent, skipped, failed, done_at)",
        "campaign_id, sent, skipped, failed",
        batches,
        |b| {
            vec![
                b.campaign_id.into(),
                b.bucket.into(),
                b.part.into(),
                b.recipients.into(),
                b.sent.into(),
                b.skipped.into(),
                b.failed.into(),
                b.done_at.into(),
            ]
        },
    )
}

fn bucket_records_stmt(backend: DbBackend, buckets: &[BucketRecord]) -> Option<Statement> {
    records_stmt(
        backend,
        "campaign_bucket (campaign_id, bucket, parts, recipients, done_at)",
        "campaign_id, parts, recipients",
        buckets,
        |b| {
            vec![
                b.campaign_id.into(),
                b.bucket.into(),
                b.parts.into(),
                b.recipients.into(),
                b.done_at.into(),
            ]
        },
    )
}

/// The upsert that adds one row of increments (the `excluded` row) to a campaign's counters.
const ADD_PROGRESS: &str = "INSERT INTO campaign_progress (campaign_id, buckets_done, \
     parts_total, recipients, batches_done, sent, skipped, failed) {rows} \
     ON CONFLICT (campaign_id) DO UPDATE SET \
     buckets_done = campaign_progress.buckets_done + excluded.buckets_done, \
     parts_total = campaign_progress.parts_total + excluded.parts_total, \
     recipients = campaign_progress.recipients + excluded.recipients, \
     batches_done = campaign_progress.batches_done + excluded.batches_done, \
     sent = campaign_progress.sent + excluded.sent, \
     skipped = campaign_progress.skipped + excluded.skipped, \
     failed = campaign_progress.failed + excluded.failed";

/// Adds `inc` to a campaign's progress row, creating it at the first record.
async fn add_progress<C: ConnectionTrait>(
    conn: &C,
    campaign_id: i64,
    inc: Progress,
) -> Result<(), DbErr> {
    conn.execute(Statement::from_sql_and_values(
        conn.get_database_backend(),
        ADD_PROGRESS.replace("{rows}", "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
        vec![
            campaign_id.into(),
            inc.buckets_done.into(),
            inc.parts_total.into(),
            inc.recipients.into(),
            inc.batches_done.into(),
            inc.sent.into(),
            inc.skipped.into(),
            inc.failed.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// On PostgreSQL, `insert` (which returns the rows it inserted) and the counters it adds up
/// to as one statement: one round trip, atomic without a transaction of ours, and the
/// progress row locked only for that statement. `counts` selects the increments per
/// campaign from the inserted rows, `ins`. It answers the ids of the campaigns that this
/// statement made complete, from the counters it wrote.
fn with_progress(insert: Statement, counts: &str) -> Statement {
    let sql = format!(
        "WITH ins AS ({}), p AS ({} RETURNING campaign_id, buckets_done, batches_done, \
         parts_total, buckets_total) SELECT p.campaign_id FROM p WHERE {COMPLETE}",
        insert.sql,
        ADD_PROGRESS.replace(
            "{rows}",
            &format!("{counts} FROM ins GROUP BY campaign_id ORDER BY campaign_id")
        )
    );
    Statement { sql, ..insert }
}

/// What a batch record adds to its campaign's counters: in SQL over the inserted rows
/// (`ins`), and in Rust per returned row.
const BATCH_COUNTS: &str =
    "SELECT campaign_id, 0, 0, 0, COUNT(*), SUM(sent), SUM(skipped), SUM(failed)";

fn count_batch(row: &QueryResult, inc: &mut Progress) -> Result<(), DbErr> {
    inc.batches_done += 1;
    inc.sent += i64::from(row.try_get::<i32>("", "sent")?);
    inc.skipped += i64::from(row.try_get::<i32>("", "skipped")?);
    inc.failed += i64::from(row.try_get::<i32>("", "failed")?);
    Ok(())
}

/// What a bucket record adds to its campaign's counters, as [`BATCH_COUNTS`].
const BUCKET_COUNTS: &str = "SELECT campaign_id, COUNT(*), SUM(parts), SUM(recipients), 0, 0, 0, 0";

fn count_bucket(row: &QueryResult, inc: &mut Progress) -> Result<(), DbErr> {
    inc.buckets_done += 1;
    inc.parts_total += i64::from(row.try_get::<i32>("", "parts")?);
    inc.recipients += row.try_get::<i64>("", "recipients")?;
    Ok(())
}

/// Runs a records `insert` and adds the rows it inserted to their campaigns' progress. On
/// PostgreSQL that is one statement; on SQLite run it inside a transaction, so the rows
/// and the counters move together. Returns the campaigns this call made complete (only a
/// call that inserted something can), so their supervisors can finish them at once.
async fn record_in<C: ConnectionTrait>(
    conn: &C,
    insert: Statement,
    counts: &str,
    count: fn(&QueryResult, &mut Progress) -> Result<(), DbErr>,
) -> Result<Vec<i64>, DbErr> {
    let campaign_ids = |rows: Vec<QueryResult>| {
        rows.iter()
            .map(|r| r.try_get::<i64>("", "campaign_id"))
            .collect::<Result<Vec<i64>, DbErr>>()
    };
    let backend = conn.get_database_backend();
    if backend == DbBackend::Postgres {
        return campaign_ids(conn.query_all(with_progress(insert, counts)).await?);
    }
    // Sorted by campaign, so concurrent transactions lock progress rows in one order.
    let mut by_campaign: std::collections::BTreeMap<i64, Progress> = Default::default();
    for row in conn.query_all(insert).await? {
        let inc = by_campaign
            .entry(row.try_get::<i64>("", "campaign_id")?)
            .or_default();
        count(&row, inc)?;
    }
    if by_campaign.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<Value> = by_campaign.keys().map(|id| (*id).into()).collect();
    for (campaign_id, inc) in by_campaign {
        add_progress(conn, campaign_id, inc).await?;
    }
    let marks: Vec<String> = (1..=ids.len()).map(|k| format!("${k}")).collect();
    let complete = format!(
        "SELECT p.campaign_id FROM campaign_progress p WHERE p.campaign_id IN ({}) AND {COMPLETE}",
        marks.join(", ")
    );
    campaign_ids(
        conn.query_all(Statement::from_sql_and_values(backend, complete, ids))
            .await?,
    )
}

/// Records finished push batches and adds the ones not recorded before to their campaigns'
/// progress, on `conn` (a transaction of the caller's on SQLite). Returns the campaigns it
/// made complete.
pub(crate) async fn record_batches_in<C: ConnectionTrait>(
    conn: &C,
    batches: &[BatchRecord],
) -> Result<Vec<i64>, DbErr> {
    match batch_records_stmt(conn.get_database_backend(), batches) {
        Some(insert) => record_in(conn, insert, BATCH_COUNTS, count_batch).await,
        None => Ok(vec![]),
    }
}

impl Store {
    /// A store over `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// The connection.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Loads a campaign.
    pub async fn campaign(&self, id: i64) -> Result<Option<Campaign>, DbErr> {
        CampaignRow::find_by_statement(stmt(
            &self.db,
            "SELECT id, kind, name, inform_type, title, body, audience, status, buckets_total, \
             created_at, coupon_id FROM campaign WHERE id = $1",
            vec![id.into()],
        ))
        .one(&self.db)
        .await?
        .map(Campaign::try_from)
        .transpose()
    }

    /// Loads the campaigns among `ids` that exist, in one query.
    pub async fn campaigns(&self, ids: &[i64]) -> Result<Vec<Campaign>, DbErr> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        const COLUMNS: &str = "id, kind, name, inform_type, title, body, audience, status, \
             buckets_total, created_at, coupon_id";
        // PostgreSQL takes the ids as one array (one statement text for any number of
        // them) and their bounds (see [`id_bounds`]).
        let (sql, values) = if self.db.get_database_backend() == DbBackend::Postgres {
            let sql = format!(
                "SELECT {COLUMNS} FROM campaign WHERE id = ANY($1::bigint[]) AND id BETWEEN $2 AND $3"
            );
            let (lo, hi) = id_bounds(ids);
            (sql, vec![ids.to_vec().into(), lo.into(), hi.into()])
        } else {
            let marks: Vec<String> = (1..=ids.len()).map(|k| format!("${k}")).collect();
            let sql = format!(
                "SELECT {COLUMNS} FROM campaign WHERE id IN ({})",
                marks.join(", ")
            );
            (sql, ids.iter().map(|id| (*id).into()).collect())
        };
        CampaignRow::find_by_statement(stmt(&self.db, &sql, values))
            .all(&self.db)
            .await?
            .into_iter()
            .map(Campaign::try_from)
            .collect()
    }

    /// Ids of the campaigns a node should supervise: every running one, and those still
    /// pending that were created before `pending_before` (a new one is its sharders' until
    /// then; one that stays pending longer needs announcing again).
    pub async fn campaigns_to_supervise(
        &self,
        pending_before: DateTime<Utc>,
    ) -> Result<Vec<i64>, DbErr> {
        #[derive(FromQueryResult)]
        struct Id {
            id: i64,
        }
        Ok(Id::find_by_statement(stmt(
            &self.db,
            "SELECT id FROM campaign \
             WHERE status = 'running' OR (status = 'pending' AND created_at < $1) ORDER BY id",
            vec![pending_before.into()],
        ))
        .all(&self.db)
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect())
    }

    /// The audience's id bounds `(min, max)`, or None when it is empty.
    pub async fn audience_bounds(&self, audience: &Audience) -> Result<Option<(i64, i64)>, DbErr> {
        #[derive(FromQueryResult)]
        struct Bounds {
            lo: Option<i64>,
            hi: Option<i64>,
        }
        let (joins, conds, mut extra) = audience_sql(audience, 2);
        let sql = format!(
            "SELECT MIN(a.id) AS lo, MAX(a.id) AS hi FROM membership_account a{joins} \
             WHERE a.is_deleted = $1{conds}"
        );
        let mut values = vec![false.into()];
        values.append(&mut extra);
        let b = Bounds::find_by_statement(stmt(&self.db, &sql, values))
            .one(&self.db)
            .await?;
        Ok(b.and_then(|b| Some((b.lo?, b.hi?))))
    }

    /// Records the shard count and moves the campaign to `running`, or with no buckets to
    /// `completed` (first writer wins). The count goes on the campaign row and, in the same
    /// statement (PostgreSQL) or transaction (SQLite), on its progress row.
    pub async fn set_sharded(
        &self,
        id: i64,
        buckets: i64,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        self.set_sharded_all(&[id], buckets, now).await
    }

    /// [`Store::set_sharded`] for several campaigns with the same bucket count, in one
    /// statement on PostgreSQL: a burst of new campaigns with empty audiences is completed a
    /// batch at a time.
    pub async fn set_sharded_all(
        &self,
        ids: &[i64],
        buckets: i64,
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        // With no buckets there is nothing to wait for: the campaign is completed here, with
        // its counters at their default of 0, rather than by a later progress check.
        const SET: &str = "buckets_total = $1, \
             status = CASE WHEN $1 = 0 THEN 'completed' ELSE 'running' END, \
             started_at = COALESCE(campaign.started_at, $2), \
             finished_at = CASE WHEN $1 = 0 THEN $2 END";
        const WHERE: &str =
            "campaign.buckets_total IS NULL AND campaign.status IN ('pending', 'running')";
        if ids.is_empty() {
            return Ok(());
        }
        if self.db.get_database_backend() == DbBackend::Postgres {
            // One count for every row, so the rows need no join with a list of counts: such
            // a join was planned as a loop over the list for each campaign row, n² steps for
            // a batch of n (4 ms for a batch of 90 on a busy machine). The ids as an array:
            // one statement text for any batch size, so each connection parses it once, and
            // their bounds keep the rows looked up by key (see [`id_bounds`]).
            let sql = format!(
                "WITH c AS (UPDATE campaign SET {SET} \
                 WHERE campaign.id = ANY($3::bigint[]) AND campaign.id BETWEEN $4 AND $5 \
                 AND {WHERE} \
                 RETURNING campaign.id, campaign.buckets_total) \
                 INSERT INTO campaign_progress (campaign_id, buckets_total) \
                 SELECT id, buckets_total FROM c \
                 ON CONFLICT (campaign_id) DO UPDATE SET buckets_total = excluded.buckets_total"
            );
            let (lo, hi) = id_bounds(ids);
            let values: Vec<Value> = vec![
                buckets.into(),
                now.into(),
                ids.to_vec().into(),
                lo.into(),
                hi.into(),
            ];
            self.db.execute(stmt(&self.db, &sql, values)).await?;
            return Ok(());
        }
        let txn = self.db.begin().await?;
        let sql = format!("UPDATE campaign SET {SET} WHERE id = $3 AND {WHERE}");
        for id in ids {
            let first = txn
                .execute(stmt(
                    &txn,
                    &sql,
                    vec![buckets.into(), now.into(), (*id).into()],
                ))
                .await?;
            if first.rows_affected() == 1 {
                txn.execute(stmt(
                    &txn,
                    "INSERT INTO campaign_progress (campaign_id, buckets_total) VALUES ($1, $2) \
                     ON CONFLICT (campaign_id) DO UPDATE SET buckets_total = excluded.buckets_total",
                    vec![(*id).into(), buckets.into()],
                ))
                .await?;
            }
        }
        txn.commit().await
    }

    /// Marks a campaign running before sharding starts.
    pub async fn set_running(&self, id: i64, now: DateTime<Utc>) -> Result<(), DbErr> {
        self.db
            .execute(stmt(
                &self.db,
                "UPDATE campaign SET status = 'running', started_at = COALESCE(started_at, $1) \
                 WHERE id = $2 AND status = 'pending'",
                vec![now.into(), id.into()],
            ))
            .await?;
        Ok(())
    }

    /// User ids in `[start, end)` that belong to the audience, ascending.
    pub async fn bucket_users(
        &self,
        audience: &Audience,
        start: i64,
        end: i64,
    ) -> Result<Vec<i64>, DbErr> {
        #[derive(FromQueryResult)]
        struct Ids {
            ids: Option<String>,
        }
        // One row holding the bucket's ids as text rather than a row per user: decoding a
        // thousand rows was most of the expander's cost, here and in the database.
        let (joins, conds, mut extra) = audience_sql(audience, 4);
        let agg = match self.db.get_database_backend() {
            // No ORDER BY inside the aggregate: it sorts even rows the index scan hands
            // over in order, and that was 0.2 of the query's 0.55 ms per 1024 ids.
            DbBackend::Postgres => "string_agg(a.id::text, ',')",
            _ => "group_concat(a.id, ',')",
        };
        let sql = format!(
            "SELECT {agg} AS ids FROM membership_account a{joins} \
             WHERE a.id >= $1 AND a.id < $2 AND a.is_deleted = $3{conds}"
        );
        let mut values = vec![start.into(), end.into(), false.into()];
        values.append(&mut extra);
        let row = Ids::find_by_statement(stmt(&self.db, &sql, values))
            .one(&self.db)
            .await?;
        let Some(text) = row.and_then(|r| r.ids) else {
            return Ok(Vec::new());
        };
        let mut ids = text
            .split(',')
            .map(|id| {
                id.parse::<i64>()
                    .map_err(|e| DbErr::Custom(format!("bucket user id {id:?}: {e}")))
            })
            .collect::<Result<Vec<i64>, DbErr>>()?;
        // Neither aggregate promises an order; the scan's order makes this sort a linear
        // check in practice.
        ids.sort_unstable();
        Ok(ids)
    }

    /// Records expanded buckets, one multi-row insert, and their campaigns' progress; a
    /// bucket recorded before is left as it is and counted once. Returns the campaigns this
    /// call made complete.
    pub async fn record_buckets(&self, buckets: &[BucketRecord]) -> Result<Vec<i64>, DbErr> {
        match bucket_records_stmt(self.db.get_database_backend(), buckets) {
            Some(insert) => self.record(insert, BUCKET_COUNTS, count_bucket).await,
            None => Ok(vec![]),
        }
    }

    /// Records finished push batches, one multi-row insert, and their campaigns' progress;
    /// a batch recorded before is left as it is and counted once. Returns the campaigns this
    /// call made complete.
    pub async fn record_batches(&self, batches: &[BatchRecord]) -> Result<Vec<i64>, DbErr> {
        match batch_records_stmt(self.db.get_database_backend(), batches) {
            Some(insert) => self.record(insert, BATCH_COUNTS, count_batch).await,
            None => Ok(vec![]),
        }
    }

    /// [`record_in`] on its own on PostgreSQL, in a transaction on SQLite.
    async fn record(
        &self,
        insert: Statement,
        counts: &str,
        count: fn(&QueryResult, &mut Progress) -> Result<(), DbErr>,
    ) -> Result<Vec<i64>, DbErr> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            return record_in(&self.db, insert, counts, count).await;
        }
        let txn = self.db.begin().await?;
        let complete = record_in(&txn, insert, counts, count).await?;
        txn.commit().await?;
        Ok(complete)
    }

    /// Records users whose push failed for good, with the reason; one multi-row insert.
    pub async fn record_failures(
        &self,
        campaign_id: i64,
        failures: &[(i64, String)],
        now: DateTime<Utc>,
    ) -> Result<(), DbErr> {
        if failures.is_empty() {
            return Ok(());
        }
        let mut sql = String::from(
            "INSERT INTO campaign_failure (campaign_id, user_id, reason, created_at) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(failures.len() * 4);
        for (i, (user, reason)) in failures.iter().enumerate() {
            let n = i * 4;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4));
            values.extend([
                campaign_id.into(),
                (*user).into(),
                reason.clone().into(),
                now.into(),
            ]);
        }
        sql.push_str(" ON CONFLICT DO NOTHING");
        self.db.execute(stmt(&self.db, &sql, values)).await?;
        Ok(())
    }

    /// A campaign's progress: its counters row (zeros before its first record).
    pub async fn progress(&self, campaign_id: i64) -> Result<Progress, DbErr> {
        let row = Progress::find_by_statement(stmt(
            &self.db,
            "SELECT buckets_done, parts_total, recipients, batches_done, sent, skipped, failed \
             FROM campaign_progress WHERE campaign_id = $1",
            vec![campaign_id.into()],
        ))
        .one(&self.db)
        .await?;
        Ok(row.unwrap_or_default())
    }

    /// Moves a running campaign to a final state with its counters; true if this call did it.
    pub async fn finish(
        &self,
        id: i64,
        state: CampaignState,
        progress: &Progress,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, DbErr> {
        let r = self
            .db
            .execute(stmt(
                &self.db,
                "UPDATE campaign SET status = $1, recipients = $2, sent = $3, skipped = $4, \
                 failed = $5, error = $6, finished_at = $7 \
                 WHERE id = $8 AND status IN ('pending', 'running')",
                vec![
                    state.as_str().into(),
                    progress.recipients.into(),
                    progress.sent.into(),
                    progress.skipped.into(),
                    progress.failed.into(),
                    error.map(str::to_string).into(),
                    now.into(),
                    id.into(),
                ],
            ))
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The status row of a campaign.
    pub async fn status(&self, id: i64) -> Result<Option<StatusRow>, DbErr> {
        StatusRow::find_by_statement(stmt(
            &self.db,
            "SELECT id, name, status, buckets_total, recipients, sent, skipped, failed, error, \
             created_at, started_at, finished_at FROM campaign WHERE id = $1",
            vec![id.into()],
        ))
        .one(&self.db)
        .await
    }
}

/// Joins and extra conditions (each prefixed with ` AND `) selecting the audience, with
/// placeholders numbered from `$first`.
pub(crate) fn audience_sql(audience: &Audience, first: usize) -> (String, String, Vec<Value>) {
    let Audience::Segment(SegmentFilter {
        member_levels,
        min_points,
        min_active_days,
    }) = audience
    else {
        return (String::new(), String::new(), vec![]);
    };
    let mut joins = String::new();
    let mut conds = String::new();
    let mut values: Vec<Value> = Vec::new();
    let mut n = first;
    if member_levels.is_some() || min_points.is_some() {
        joins.push_str(" JOIN membership_point p ON p.account_id = a.id");
    }
    if min_active_days.is_some() {
        joins.push_str(" JOIN membership_filter f ON f.account_id = a.id");
    }
    if let Some(levels) = member_levels {
        let mut ph = Vec::with_capacity(levels.len());
        for l in levels {
            values.push((*l).into());
            ph.push(format!("${n}"));
            n += 1;
        }
        conds.push_str(&format!(" AND p.member_level IN ({})", ph.join(", ")));
    }
    if let Some(p) = min_points {
        values.push((*p).into());
        conds.push_str(&format!(" AND p.member_point >= ${n}"));
        n += 1;
    }
    if let Some(d) = min_active_days {
        values.push((*d).into());
        conds.push_str(&format!(" AND f.active_days >= ${n}"));
    }
    (joins, conds, values)
}

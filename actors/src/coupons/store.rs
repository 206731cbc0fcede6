//! The database side of coupons: coupon rows, and issuing coupon items.
//!
//! [`Store::issue`] is the one way items are created, for lazy, eager and claimed coupons
//! alike: a multi-row `INSERT … ON CONFLICT DO NOTHING` (the unique index on coupon + user
//! makes it idempotent) and a guarded count update in the same transaction (on PostgreSQL
//! one statement each, whatever the batch's size and coupons). The batch's coupon rows are
//! locked in id order, and a limited coupon's count only moves while it stays within the
//! stock; when that guard fails, the items past what stock is left are deleted again before
//! the count moves. So the database never oversells, whatever Redis says.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use herald_schemas::{Audience, CouponDelivery, CreateCouponRequest, SegmentFilter};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, FromQueryResult, TransactionTrait,
    Value,
};

use crate::store::{audience_sql, record_batches_in, stmt, BatchRecord, Store};

/// Pairs per insert statement on SQLite (two placeholders each; PostgreSQL takes arrays).
const INSERT_CHUNK: usize = 500;
/// `sales_promotion_coupon.status` of a coupon in force.
pub const STATUS_NORMAL: i32 = 1;
/// `coupon_receive_type` of coupons the platform hands out (lazy, eager).
pub const RECEIVE_PLATFORM: &str = "platform";
/// `coupon_receive_type` of coupons users claim (segment).
pub const RECEIVE_SELF: &str = "self";

/// A coupon, as herald needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Coupon {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Coupon type code.
    pub coupon_type: i32,
    /// Start of the validity window.
    pub starts_at: DateTime<Utc>,
    /// End of the validity window.
    pub ends_at: DateTime<Utc>,
    /// Stock limit; None when unlimited.
    pub total: Option<i64>,
    /// Items issued.
    pub issued: i64,
    /// How it reaches users.
    pub delivery: CouponDelivery,
    /// The segment of a segment coupon.
    pub segment: Option<SegmentFilter>,
    /// The campaign that pushes or issues it.
    pub campaign_id: Option<i64>,
    /// `STATUS_NORMAL` when in force.
    pub status: i32,
}

#[derive(Debug, FromQueryResult)]
struct CouponRow {
    id: i64,
    coupon_name: String,
    coupon_type: i32,
    activity_start_time: DateTime<Utc>,
    activity_end_time: DateTime<Utc>,
    coupon_count: Option<i64>,
    coupon_received_count: i64,
    delivery: String,
    segment: Option<String>,
    campaign_id: Option<i64>,
    status: i32,
}

const COUPON_COLUMNS: &str = "id, coupon_name, coupon_type, activity_start_time, \
    activity_end_time, coupon_count, coupon_received_count, delivery, segment, campaign_id, status";

impl TryFrom<CouponRow> for Coupon {
    type Error = DbErr;

    fn try_from(r: CouponRow) -> Result<Self, DbErr> {
        let bad = |what: &str| DbErr::Custom(format!("coupon {}: bad {what}", r.id));
        Ok(Coupon {
            id: r.id,
            name: r.coupon_name.clone(),
            coupon_type: r.coupon_type,
            starts_at: r.activity_start_time,
            ends_at: r.activity_end_time,
            total: r.coupon_count,
            issued: r.coupon_received_count,
            delivery: CouponDelivery::parse(&r.delivery).ok_or_else(|| bad("delivery"))?,
            segment: match &r.segment {
                Some(s) => Some(serde_json::from_str(s).map_err(|_| bad("segment"))?),
                None => None,
            },
            campaign_id: r.campaign_id,
            status: r.status,
        })
    }
}

/// A coupon item that [`Store::issue`] created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuedItem {
    /// The coupon.
    pub coupon_id: i64,
    /// The user.
    pub user_id: i64,
    /// The new `sales_promotion_coupon_item.id`.
    pub item_id: i64,
}

/// What [`Store::issue`] did with a set of (coupon, user) pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Issued {
    /// Items created now. Pairs neither here nor in `out_of_stock` already had an item.
    pub items: Vec<IssuedItem>,
    /// Pairs not issued because the coupon's stock ran out.
    pub out_of_stock: Vec<(i64, i64)>,
    /// Campaigns the recorded push batch made complete (none without a batch).
    pub completed: Vec<i64>,
}

/// A push batch of an eager campaign, recorded done in the same transaction as its items.
#[derive(Debug, Clone, Copy)]
pub struct BatchDone {
    /// Campaign.
    pub campaign_id: i64,
    /// Bucket.
    pub bucket: i64,
    /// Part within the bucket.
    pub part: i32,
}

/// What releasing a coupon item found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The item was used and is unused again.
    Released,
    /// The item was already unused: nothing to do.
    AlreadyUnused,
    /// No such item.
    NotFound,
    /// The item belongs to another user.
    OtherUser,
}

impl Store {
    /// Inserts a coupon unless one with the same dedupe key was created at or after `since`.
    /// Returns the id and whether this call inserted it.
    pub async fn insert_coupon(
        &self,
        req: &CreateCouponRequest,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<(i64, bool), DbErr> {
        #[derive(FromQueryResult)]
        struct Id {
            id: i64,
        }
        let db = self.db();
        let key = req.dedupe_key();
        let segment = match &req.segment {
            Some(s) => Some(serde_json::to_string(s).map_err(|e| DbErr::Custom(e.to_string()))?),
            None => None,
        };
        let receive = match req.delivery {
            CouponDelivery::Segment => RECEIVE_SELF,
            _ => RECEIVE_PLATFORM,
        };
        let row = Id::find_by_statement(stmt(
            db,
            "INSERT INTO sales_promotion_coupon (coupon_name, coupon_type, coupon_rule, \
             activity_start_time, activity_end_time, coupon_count, coupon_received_count, \
             coupon_receive_type, inform_type, status, created_by, created_at, updated_at, \
             delivery, segment, dedupe_key) \
             SELECT $1, $2, $3, $4, $5, $6, 0, $7, $8, $9, $10, $11, $11, $12, $13, $14 \
             WHERE NOT EXISTS (SELECT 1 FROM sales_promotion_coupon \
               WHERE dedupe_key = $14 AND created_at >= $15) \
             RETURNING id",
            vec![
                req.name.clone().into(),
                req.coupon_type.into(),
                req.rule.to_string().into(),
                req.starts_at.into(),
                req.ends_at.into(),
                req.total.into(),
                receive.into(),
                req.inform_type.as_str().into(),
                STATUS_NORMAL.into(),
                req.created_by.clone().into(),
                now.into(),
                req.delivery.as_str().into(),
                segment.into(),
                key.clone().into(),
                since.into(),
            ],
        ))
        .one(db)
        .await?;
        if let Some(r) = row {
            return Ok((r.id, true));
        }
        let found = Id::find_by_statement(stmt(
            db,
            "SELECT id FROM sales_promotion_coupon WHERE dedupe_key = $1 AND created_at >= $2 \
             ORDER BY id DESC LIMIT 1",
            vec![key.into(), since.into()],
        ))
        .one(db)
        .await?;
        found
            .map(|r| (r.id, false))
            .ok_or_else(|| DbErr::Custom("coupon neither inserted nor found".into()))
    }

    /// Links a coupon to the campaign that pushes or issues it.
    pub async fn set_coupon_campaign(&self, coupon_id: i64, campaign_id: i64) -> Result<(), DbErr> {
        let db = self.db();
        db.execute(stmt(
            db,
            "UPDATE sales_promotion_coupon SET campaign_id = $1 WHERE id = $2",
            vec![campaign_id.into(), coupon_id.into()],
        ))
        .await?;
        Ok(())
    }

    /// Loads a coupon.
    pub async fn coupon(&self, id: i64) -> Result<Option<Coupon>, DbErr> {
        let db = self.db();
        CouponRow::find_by_statement(stmt(
            db,
            &format!("SELECT {COUPON_COLUMNS} FROM sales_promotion_coupon WHERE id = $1"),
            vec![id.into()],
        ))
        .one(db)
        .await?
        .map(Coupon::try_from)
        .transpose()
    }

    /// Lazy coupons in force whose window has not ended at `now` (some may not have started).
    pub async fn active_lazy_coupons(&self, now: DateTime<Utc>) -> Result<Vec<Coupon>, DbErr> {
        let db = self.db();
        CouponRow::find_by_statement(stmt(
            db,
            &format!(
                "SELECT {COUPON_COLUMNS} FROM sales_promotion_coupon \
                 WHERE delivery = $1 AND activity_end_time > $2 AND status = $3 ORDER BY id"
            ),
            vec!["lazy".into(), now.into(), STATUS_NORMAL.into()],
        ))
        .all(db)
        .await?
        .into_iter()
        .map(Coupon::try_from)
        .collect()
    }

    /// The user's item of a coupon, if any.
    pub async fn coupon_item(&self, coupon_id: i64, user_id: i64) -> Result<Option<i64>, DbErr> {
        #[derive(FromQueryResult)]
        struct Id {
            id: i64,
        }
        let db = self.db();
        Ok(Id::find_by_statement(stmt(
            db,
            "SELECT id FROM sales_promotion_coupon_item WHERE coupon_id = $1 AND user_account_id = $2",
            vec![coupon_id.into(), user_id.into()],
        ))
        .one(db)
        .await?
        .map(|r| r.id))
    }

    /// Whether the user exists and matches the segment.
    pub async fn in_segment(&self, user_id: i64, segment: &SegmentFilter) -> Result<bool, DbErr> {
        #[derive(FromQueryResult)]
        struct Id {
            id: i64,
        }
        let db = self.db();
        let (joins, conds, mut extra) = audience_sql(&Audience::Segment(segment.clone()), 3);
        let sql = format!(
            "SELECT a.id AS id FROM membership_account a{joins} \
             WHERE a.id = $1 AND a.is_deleted = $2{conds}"
        );
        let mut values = vec![user_id.into(), false.into()];
        values.append(&mut extra);
        Ok(Id::find_by_statement(stmt(db, &sql, values))
            .one(db)
            .await?
            .is_some_and(|r| r.id == user_id))
    }

    /// Marks a used coupon item unused again (an order that used it was cancelled).
    pub async fn release_item(
        &self,
        item_id: i64,
        user_id: i64,
        now: DateTime<Utc>,
    ) -> Result<Release, DbErr> {
        let db = self.db();
        let r = db
            .execute(stmt(
                db,
                "UPDATE sales_promotion_coupon_item SET is_used = $1, used_time = NULL, \
                 updated_at = $2 WHERE id = $3 AND user_account_id = $4 AND is_used = $5",
                vec![
                    false.into(),
                    now.into(),
                    item_id.into(),
                    user_id.into(),
                    true.into(),
                ],
            ))
            .await?;
        if r.rows_affected() > 0 {
            return Ok(Release::Released);
        }
        #[derive(FromQueryResult)]
        struct Owner {
            user_account_id: i64,
        }
        let owner = Owner::find_by_statement(stmt(
            db,
            "SELECT user_account_id FROM sales_promotion_coupon_item WHERE id = $1",
            vec![item_id.into()],
        ))
        .one(db)
        .await?;
        Ok(match owner {
            None => Release::NotFound,
            Some(o) if o.user_account_id != user_id => Release::OtherUser,
            Some(_) => Release::AlreadyUnused,
        })
    }

    /// Issues coupon items for (coupon, user) pairs, at most one per pair ever, never past a
    /// coupon's stock; with `batch`, records that push batch done in the same transaction.
    ///
    /// Every writer takes its locks in one order: its items in (coupon, user) order, then its
    /// coupons' rows in id order. A batch that ran past a stock once locked that coupon before
    /// inserting its items, and deadlocked with batches that held an item it wanted.
    pub async fn issue(
        &self,
        pairs: &[(i64, i64)],
        now: DateTime<Utc>,
        batch: Option<(BatchDone, i32)>,
    ) -> Result<Issued, DbErr> {
        let mut pairs = pairs.to_vec();
        pairs.sort_unstable();
        pairs.dedup();
        let txn = self.db().begin().await?;
        let inserted = insert_items(&txn, &pairs, now).await?;
        let mut by_coupon: BTreeMap<i64, Vec<IssuedItem>> = BTreeMap::new();
        for it in inserted {
            by_coupon.entry(it.coupon_id).or_default().push(it);
        }
        let counts: Vec<(i64, usize)> = by_coupon.iter().map(|(c, new)| (*c, new.len())).collect();
        let past = add_to_counts(&txn, &counts, now).await?;
        let mut items = Vec::new();
        let mut out_of_stock = Vec::new();
        for (coupon, mut new) in by_coupon {
            if past.contains(&coupon) {
                // Past the stock: keep what is left of it (by user order) and delete the rest.
                let left = lock_and_read_left(&txn, coupon).await?;
                new.sort_unstable_by_key(|it| it.user_id);
                let over = new.split_off(left.min(new.len()));
                delete_items(&txn, &over).await?;
                out_of_stock.extend(over.iter().map(|it| (it.coupon_id, it.user_id)));
                add_to_count(&txn, coupon, new.len(), now, false).await?;
            }
            items.extend(new);
        }
        let completed = record(&txn, batch, items.len(), now).await?;
        txn.commit().await?;
        Ok(Issued {
            items,
            out_of_stock,
            completed,
        })
    }
}

/// Adds each coupon's new items to its count, unless that would pass its stock; returns the
/// coupons whose count was not written (past the stock, or gone). Every coupon's row is
/// locked, in id order, on PostgreSQL in one statement: the rows are every batch's, and
/// each batch holds them until it commits, so the fewer round trips after they are locked,
/// the shorter the other batches wait (one `UPDATE` a coupon, five round trips with the
/// logins benchmark's coupons, took 2.1 ms a one-row update on average: the wait for those
/// locks).
async fn add_to_counts(
    txn: &DatabaseTransaction,
    counts: &[(i64, usize)],
    now: DateTime<Utc>,
) -> Result<HashSet<i64>, DbErr> {
    if txn.get_database_backend() != DbBackend::Postgres {
        let mut past = HashSet::new();
        for &(coupon, k) in counts {
            if !add_to_count(txn, coupon, k, now, true).await? {
                past.insert(coupon);
            }
        }
        return Ok(past);
    }
    if counts.is_empty() {
        return Ok(HashSet::new());
    }
    #[derive(FromQueryResult)]
    struct Id {
        id: i64,
    }
    let (ids, ks): (Vec<i64>, Vec<i64>) = counts.iter().map(|(c, k)| (*c, *k as i64)).unzip();
    // `locked` takes the row locks in id order before the update writes any row.
    let written = Id::find_by_statement(stmt(
        txn,
        "WITH k (id, n) AS (SELECT * FROM unnest($1::bigint[], $2::bigint[])), \
         locked AS MATERIALIZED (SELECT c.id FROM sales_promotion_coupon c \
           WHERE c.id IN (SELECT id FROM k) ORDER BY c.id FOR UPDATE) \
         UPDATE sales_promotion_coupon c SET \
           coupon_received_count = c.coupon_received_count + k.n, updated_at = $3 \
         FROM k, locked l WHERE c.id = k.id AND l.id = k.id \
           AND (c.coupon_count IS NULL OR c.coupon_received_count + k.n <= c.coupon_count) \
         RETURNING c.id",
        vec![ids.into(), ks.into(), now.into()],
    ))
    .all(txn)
    .await?;
    let mut past: HashSet<i64> = counts.iter().map(|(c, _)| *c).collect();
    for w in written {
        past.remove(&w.id);
    }
    Ok(past)
}

/// Adds `k` new items to a coupon's count. With `guard`, a count that would pass the stock is
/// not written and the result is false.
async fn add_to_count(
    txn: &DatabaseTransaction,
    coupon: i64,
    k: usize,
    now: DateTime<Utc>,
    guard: bool,
) -> Result<bool, DbErr> {
    if k == 0 {
        return Ok(true);
    }
    let cond = if guard {
        " AND (coupon_count IS NULL OR coupon_received_count + $1 <= coupon_count)"
    } else {
        ""
    };
    let r = txn
        .execute(stmt(
            txn,
            &format!(
                "UPDATE sales_promotion_coupon SET coupon_received_count = \
                 coupon_received_count + $1, updated_at = $2 WHERE id = $3{cond}"
            ),
            vec![(k as i64).into(), now.into(), coupon.into()],
        ))
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Locks a coupon's row and returns how much of its stock is left (0 for a coupon that is
/// gone; unlimited counts as no limit).
async fn lock_and_read_left(txn: &DatabaseTransaction, coupon: i64) -> Result<usize, DbErr> {
    #[derive(FromQueryResult)]
    struct Stock {
        coupon_count: Option<i64>,
        coupon_received_count: i64,
    }
    // A no-op write takes the row lock (PostgreSQL) or the write lock (SQLite); the read after
    // it is stable until commit.
    txn.execute(stmt(
        txn,
        "UPDATE sales_promotion_coupon SET coupon_received_count = coupon_received_count \
         WHERE id = $1",
        vec![coupon.into()],
    ))
    .await?;
    let stock = Stock::find_by_statement(stmt(
        txn,
        "SELECT coupon_count, coupon_received_count FROM sales_promotion_coupon WHERE id = $1",
        vec![coupon.into()],
    ))
    .one(txn)
    .await?;
    Ok(match stock {
        None => 0,
        Some(Stock {
            coupon_count: None, ..
        }) => usize::MAX,
        Some(Stock {
            coupon_count: Some(total),
            coupon_received_count: issued,
        }) => usize::try_from(total - issued).unwrap_or(0),
    })
}

/// Deletes items this transaction inserted and cannot keep.
async fn delete_items(txn: &DatabaseTransaction, items: &[IssuedItem]) -> Result<(), DbErr> {
    for chunk in items.chunks(INSERT_CHUNK) {
        let ph: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let values: Vec<Value> = chunk.iter().map(|it| Value::from(it.item_id)).collect();
        txn.execute(stmt(
            txn,
            &format!(
                "DELETE FROM sales_promotion_coupon_item WHERE id IN ({})",
                ph.join(", ")
            ),
            values,
        ))
        .await?;
    }
    Ok(())
}

async fn insert_items(
    txn: &DatabaseTransaction,
    pairs: &[(i64, i64)],
    now: DateTime<Utc>,
) -> Result<Vec<IssuedItem>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        id: i64,
        coupon_id: i64,
        user_account_id: i64,
    }
    impl Row {
        fn item(self) -> IssuedItem {
            IssuedItem {
                coupon_id: self.coupon_id,
                user_id: self.user_account_id,
                item_id: self.id,
            }
        }
    }
    // The pairs as `v (cid, uid)`, then the same insert on either backend.
    let insert = |pairs_sql: &str, flag: usize| {
        format!(
            "WITH v (cid, uid) AS ({pairs_sql}) \
             INSERT INTO sales_promotion_coupon_item (coupon_id, coupon_type, user_account_id, \
             is_used, effective_start_time, effective_end_time, created_at, updated_at) \
             SELECT c.id, c.coupon_type, v.uid, ${flag}, c.activity_start_time, \
             c.activity_end_time, ${now}, ${now} FROM v JOIN sales_promotion_coupon c \
             ON c.id = v.cid WHERE TRUE ORDER BY v.cid, v.uid \
             ON CONFLICT (coupon_id, user_account_id) DO NOTHING \
             RETURNING id, coupon_id, user_account_id",
            now = flag + 1
        )
    };
    if txn.get_database_backend() == DbBackend::Postgres {
        // One array per column: one statement text for any number of pairs, which each
        // connection parses and plans once. A VALUES list has a text of its own for each
        // chunk length, and a chunk of 500 pairs has 1,000 parameters to plan.
        let (coupons, users): (Vec<i64>, Vec<i64>) = pairs.iter().copied().unzip();
        let sql = insert("SELECT * FROM unnest($1::bigint[], $2::bigint[])", 3);
        let values = vec![coupons.into(), users.into(), false.into(), now.into()];
        let rows = Row::find_by_statement(stmt(txn, &sql, values))
            .all(txn)
            .await?;
        return Ok(rows.into_iter().map(Row::item).collect());
    }
    let mut out = Vec::new();
    for chunk in pairs.chunks(INSERT_CHUNK) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 2 + 2);
        let mut rows = Vec::with_capacity(chunk.len());
        for (i, (c, u)) in chunk.iter().enumerate() {
            rows.push(format!("(${}, ${})", 2 * i + 1, 2 * i + 2));
            values.push((*c).into());
            values.push((*u).into());
        }
        values.push(false.into());
        values.push(now.into());
        let sql = insert(&format!("VALUES {}", rows.join(", ")), chunk.len() * 2 + 1);
        let inserted = Row::find_by_statement(stmt(txn, &sql, values))
            .all(txn)
            .await?;
        out.extend(inserted.into_iter().map(Row::item));
    }
    Ok(out)
}

/// Records the eager campaign's push batch done, if any; returns the campaigns that made
/// complete.
async fn record(
    txn: &DatabaseTransaction,
    batch: Option<(BatchDone, i32)>,
    issued: usize,
    now: DateTime<Utc>,
) -> Result<Vec<i64>, DbErr> {
    let Some((b, recipients)) = batch else {
        return Ok(vec![]);
    };
    let sent = issued as i32;
    let done = BatchRecord {
        campaign_id: b.campaign_id,
        bucket: b.bucket,
        part: b.part,
        recipients,
        sent,
        skipped: (recipients - sent).max(0),
        failed: 0,
        done_at: now,
    };
    record_batches_in(txn, &[done]).await
}

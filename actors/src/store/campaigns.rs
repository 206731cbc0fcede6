//! New campaign rows, each inserted once per dedupe key within its window.
//!
//! A create claims its dedupe key in `campaign_dedupe` (primary key: the key) with
//! `INSERT … ON CONFLICT`. The conflict is found through that unique index whatever the
//! planner believes about the table's size, so a create costs the same with ten campaigns or
//! ten million, and of two creates racing with the same key exactly one wins. On PostgreSQL the
//! claims and the inserts of a group of creates are one statement; on SQLite, one transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald_schemas::{Audience, InformType};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, FromQueryResult, Statement,
    TransactionTrait, Value,
};

use super::{prepare_on_each_connection, stmt, Store};

/// A new campaign row.
#[derive(Debug, Clone)]
pub struct NewCampaign {
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Creator.
    pub created_by: String,
    /// Start of the promotion.
    pub starts_at: DateTime<Utc>,
    /// End of the promotion.
    pub ends_at: DateTime<Utc>,
    /// Channel.
    pub inform_type: InformType,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Audience as JSON.
    pub audience: Audience,
    /// Dedupe key of the request.
    pub dedupe_key: String,
    /// The coupon of a coupon campaign.
    pub coupon_id: Option<i64>,
}

/// One campaign of [`Store::insert_campaigns`].
#[derive(Debug, Clone, Copy)]
pub struct CampaignInsert<'a> {
    /// The campaign.
    pub campaign: &'a NewCampaign,
    /// Its creation time (its epoch).
    pub now: DateTime<Utc>,
    /// A campaign with the same dedupe key created at or after this makes it a repeat.
    pub since: DateTime<Utc>,
}

/// The columns a new campaign sets, in the order [`row_values`] gives them.
const COLUMNS: &str = "kind, name, created_by, starts_at, ends_at, inform_type, title, body, \
                       audience, dedupe_key, created_at, coupon_id";
/// Values per campaign in [`row_values`].
const VALUES_PER_ROW: usize = 12;

impl Store {
    /// Inserts a campaign (status `pending`) unless one with the same dedupe key was created
    /// at or after `since`. Returns the id and whether this call inserted it.
    pub async fn insert_campaign(
        &self,
        c: &NewCampaign,
        now: DateTime<Utc>,
        since: DateTime<Utc>,
    ) -> Result<(i64, bool), DbErr> {
        let mut out = self
            .insert_campaigns(&[CampaignInsert {
                campaign: c,
                now,
                since,
            }])
            .await?;
        out.pop()
            .ok_or_else(|| DbErr::Custom("campaign insert returned nothing".into()))
    }

    /// Inserts many campaigns at once, each unless one with its dedupe key was created at or
    /// after its `since` (an earlier one in the same call counts too). Returns, per campaign
    /// in order, its id and whether this call inserted it.
    pub async fn insert_campaigns(
        &self,
        batch: &[CampaignInsert<'_>],
    ) -> Result<Vec<(i64, bool)>, DbErr> {
        // One claim per dedupe key; repeats within the call get the first one's id.
        let mut first: HashMap<&str, usize> = HashMap::new();
        let mut owners = Vec::new();
        for (i, b) in batch.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(e) =
                first.entry(b.campaign.dedupe_key.as_str())
            {
                e.insert(i);
                owners.push(*b);
            }
        }
        let inserted = match self.db.get_database_backend() {
            DbBackend::Postgres => self.insert_claimed_in_one_statement(&owners).await?,
            _ => {
                let txn = begin_writing(&self.db).await?;
                let inserted = insert_claimed_one_by_one(&txn, &owners).await?;
                txn.commit().await?;
                inserted
            }
        };
        let mut out = Vec::with_capacity(batch.len());
        for (i, b) in batch.iter().enumerate() {
            let key = b.campaign.dedupe_key.as_str();
            let owner = first.get(key).copied() == Some(i);
            let result = match inserted.get(key) {
                Some(id) => (*id, owner),
                None => {
                    let id = self.find_duplicate(key, b.since).await?.ok_or_else(|| {
                        DbErr::Custom("campaign neither inserted nor found".into())
                    })?;
                    (id, false)
                }
            };
            out.push(result);
        }
        Ok(out)
    }

    /// The campaign that holds `dedupe_key` if it was created at or after `since`.
    async fn find_duplicate(
        &self,
        dedupe_key: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<i64>, DbErr> {
        Ok(claim_of(&self.db, dedupe_key)
            .await?
            .filter(|c| c.created_at >= since)
            .map(|c| c.campaign_id))
    }

    /// Deletes up to `limit` dedupe claims made before `before`, and returns how many it
    /// deleted. A claim older than its window makes nothing a repeat any more (the next create
    /// with its key takes it over), so removing it changes no answer. Left alone, one stays
    /// for every key ever used, and the claims' index, which every create writes to, grows
    /// with them.
    pub async fn prune_dedupe_claims(
        &self,
        before: DateTime<Utc>,
        limit: u64,
    ) -> Result<u64, DbErr> {
        // On PostgreSQL the rows are locked as they are chosen, skipping those a create holds:
        // a create's statement takes several keys over, and a prune that waited for one of
        // them while holding another could deadlock with it (PostgreSQL would then abort one
        // of the two, perhaps the create's whole group). A create that finds a row the prune
        // holds waits for it to go and then claims the key afresh. The age is checked again
        // on the row being deleted, so even a row changed after it was chosen is kept if it
        // is live. SQLite has one writer at a time and no row locks.
        let lock = match self.db.get_database_backend() {
            DbBackend::Postgres => " FOR UPDATE SKIP LOCKED",
            _ => "",
        };
        let sql = format!(
            "DELETE FROM campaign_dedupe WHERE created_at < $1 AND dedupe_key IN \
             (SELECT dedupe_key FROM campaign_dedupe WHERE created_at < $2 LIMIT $3{lock})"
        );
        let deleted = self
            .db
            .execute(stmt(
                &self.db,
                &sql,
                vec![
                    before.into(),
                    before.into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        Ok(deleted.rows_affected())
    }

    /// PostgreSQL: ids for every row, the claims, and the inserts of the claimed rows in one
    /// statement. Returns the ids of the campaigns inserted, by dedupe key.
    async fn insert_claimed_in_one_statement(
        &self,
        owners: &[CampaignInsert<'_>],
    ) -> Result<HashMap<String, i64>, DbErr> {
        #[derive(FromQueryResult)]
        struct Row {
            id: i64,
            dedupe_key: String,
        }
        if owners.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(Row::find_by_statement(claim_and_insert(owners)?)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| (r.dedupe_key, r.id))
            .collect())
    }

    /// Opens `connections` connections at once and runs the campaign insert on each with no
    /// rows, so that each has it prepared and its backend has the tables' catalog entries
    /// cached. Otherwise the first burst of creates after a start waits for that on top of
    /// its own insert: the bench measured a first create of each of 100 requesters at twice
    /// the latency of the ones after it. PostgreSQL only; elsewhere it does nothing.
    pub async fn warm_campaign_inserts(&self, connections: usize) -> Result<(), DbErr> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        prepare_on_each_connection(&self.db, connections, &claim_and_insert(&[])?).await
    }
}

/// The PostgreSQL statement of [`Store::insert_campaigns`]: ids for every row, the claims,
/// and the inserts of the claimed rows; returns `id, dedupe_key` of each row inserted.
fn claim_and_insert(owners: &[CampaignInsert<'_>]) -> Result<Statement, DbErr> {
    // One array per column: one statement text for any number of rows, so each
    // connection parses and plans it once, and a row costs no placeholders of its own.
    let texts = |f: &dyn Fn(&CampaignInsert) -> String| -> Value {
        owners.iter().map(f).collect::<Vec<String>>().into()
    };
    let times = |f: &dyn Fn(&CampaignInsert) -> DateTime<Utc>| -> Value {
        owners.iter().map(f).collect::<Vec<DateTime<Utc>>>().into()
    };
    let audiences = owners
        .iter()
        .map(|b| audience_json(b.campaign))
        .collect::<Result<Vec<String>, DbErr>>()?;
    // Arrays carry no NULLs here, so a missing coupon is a flag beside a 0.
    let (coupons, has_coupon): (Vec<i64>, Vec<bool>) = owners
        .iter()
        .map(|b| {
            (
                b.campaign.coupon_id.unwrap_or(0),
                b.campaign.coupon_id.is_some(),
            )
        })
        .unzip();
    let values: Vec<Value> = vec![
        texts(&|b| b.campaign.kind.clone()),
        texts(&|b| b.campaign.name.clone()),
        texts(&|b| b.campaign.created_by.clone()),
        times(&|b| b.campaign.starts_at),
        times(&|b| b.campaign.ends_at),
        texts(&|b| b.campaign.inform_type.as_str().to_string()),
        texts(&|b| b.campaign.title.clone()),
        texts(&|b| b.campaign.body.clone()),
        audiences.into(),
        texts(&|b| b.campaign.dedupe_key.clone()),
        times(&|b| b.now),
        coupons.into(),
        has_coupon.into(),
        times(&|b| b.since),
    ];
    // The claim updates a key only when its holder is older than the window; the claims
    // that went through return their new ids, and only those rows are inserted.
    let sql = format!(
        "WITH v AS (SELECT kind, name, created_by, starts_at, ends_at, inform_type, title, \
           body, audience, dedupe_key, created_at, \
           CASE WHEN has_coupon THEN coupon_id END AS coupon_id, since \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], \
           $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
           $11::timestamptz[], $12::bigint[], $13::bool[], $14::timestamptz[]) \
           AS u({COLUMNS}, has_coupon, since)), \
         n AS (SELECT nextval('campaign_id_seq') AS id, v.* FROM v), \
         claimed AS (INSERT INTO campaign_dedupe AS d (dedupe_key, campaign_id, created_at) \
           SELECT n.dedupe_key, n.id, n.created_at FROM n \
           ON CONFLICT (dedupe_key) DO UPDATE \
           SET campaign_id = EXCLUDED.campaign_id, created_at = EXCLUDED.created_at \
           WHERE d.created_at < (SELECT n.since FROM n WHERE n.dedupe_key = EXCLUDED.dedupe_key) \
           RETURNING d.campaign_id) \
         INSERT INTO campaign (id, {COLUMNS}, status, recipients, sent, skipped, failed) \
         SELECT n.id, n.kind, n.name, n.created_by, n.starts_at, n.ends_at, n.inform_type, \
         n.title, n.body, n.audience, n.dedupe_key, n.created_at, n.coupon_id, 'pending', \
         0, 0, 0, 0 \
         FROM n WHERE n.id IN (SELECT campaign_id FROM claimed) \
         RETURNING id, dedupe_key"
    );
    Ok(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
}

/// SQLite: a transaction that holds the database's write lock from its start. Its first
/// statement is a write that changes nothing, since sea-orm cannot begin one `IMMEDIATE`.
/// A transaction that read first would take a snapshot, and if another connection then
/// committed a write (another create, a prune, the pipeline's records), its own first write
/// would fail at once with "database is locked" instead of waiting its turn. Taken first, the
/// lock waits out the other writers (sqlx's busy timeout), and the reads see their commits.
async fn begin_writing(db: &sea_orm::DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    let txn = db.begin().await?;
    txn.execute_unprepared("DELETE FROM campaign_dedupe WHERE 0")
        .await?;
    Ok(txn)
}

/// SQLite, inside `txn` (from [`begin_writing`]): each row's claim is read, and a row whose
/// key is free or outside its window is inserted and claims it.
async fn insert_claimed_one_by_one(
    txn: &DatabaseTransaction,
    owners: &[CampaignInsert<'_>],
) -> Result<HashMap<String, i64>, DbErr> {
    #[derive(FromQueryResult)]
    struct Id {
        id: i64,
    }
    let placeholders = (1..=VALUES_PER_ROW)
        .map(|k| format!("${k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!(
        "INSERT INTO campaign ({COLUMNS}, status, recipients, sent, skipped, failed) \
         VALUES ({placeholders}, 'pending', 0, 0, 0, 0) RETURNING id"
    );
    let mut inserted = HashMap::new();
    for b in owners {
        let key = b.campaign.dedupe_key.as_str();
        if let Some(held) = claim_of(txn, key).await? {
            if held.created_at >= b.since {
                continue;
            }
        }
        let id = Id::find_by_statement(stmt(txn, &insert, row_values(b)?.into()))
            .one(txn)
            .await?
            .ok_or_else(|| DbErr::Custom("campaign insert returned no id".into()))?
            .id;
        txn.execute(stmt(
            txn,
            "INSERT INTO campaign_dedupe (dedupe_key, campaign_id, created_at) \
             VALUES ($1, $2, $3) ON CONFLICT (dedupe_key) DO UPDATE \
             SET campaign_id = excluded.campaign_id, created_at = excluded.created_at",
            vec![key.into(), id.into(), b.now.into()],
        ))
        .await?;
        inserted.insert(key.to_string(), id);
    }
    Ok(inserted)
}

/// Who holds a dedupe key, and since when.
#[derive(FromQueryResult)]
struct Claim {
    campaign_id: i64,
    created_at: DateTime<Utc>,
}

async fn claim_of<C: ConnectionTrait>(conn: &C, dedupe_key: &str) -> Result<Option<Claim>, DbErr> {
    Claim::find_by_statement(stmt(
        conn,
        "SELECT campaign_id, created_at FROM campaign_dedupe WHERE dedupe_key = $1",
        vec![dedupe_key.into()],
    ))
    .one(conn)
    .await
}

/// The values of [`COLUMNS`] for one campaign.
fn row_values(b: &CampaignInsert) -> Result<[Value; VALUES_PER_ROW], DbErr> {
    let c = b.campaign;
    let audience = audience_json(c)?;
    Ok([
        c.kind.clone().into(),
        c.name.clone().into(),
        c.created_by.clone().into(),
        c.starts_at.into(),
        c.ends_at.into(),
        c.inform_type.as_str().into(),
        c.title.clone().into(),
        c.body.clone().into(),
        audience.into(),
        c.dedupe_key.clone().into(),
        b.now.into(),
        c.coupon_id.into(),
    ])
}

/// A campaign's audience as stored: JSON text.
fn audience_json(c: &NewCampaign) -> Result<String, DbErr> {
    serde_json::to_string(&c.audience).map_err(|e| DbErr::Custom(e.to_string()))
}

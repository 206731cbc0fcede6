//! The campaign store's batch inserts, on SQLite and PostgreSQL: one statement for many
//! creates, repeats within the batch and within the window recognised, racing repeats
//! inserted once; and finished push batches recorded many per statement, a batch recorded before
//! left as it was; a record answering the campaigns it completed; a bucket's users read as
//! one aggregated row, in order, on both; dedupe claims past their window pruned, live ones
//! kept; and, on PostgreSQL, the lookups of campaigns by id
//! using the primary key on a table that grew after their plans were made, a batch of
//! campaigns completed with no step of the plan run once per campaign, and the campaign
//! insert warmed on every connection of a pool.

use chrono::{Duration as Span, Utc};
use herald_engine::{
    actors::store::{BatchRecord, BucketRecord, CampaignInsert, NewCampaign, Store},
    schemas::{Audience, InformType, SegmentFilter},
    testkit::{self, TestEnv},
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement, TransactionTrait,
};

fn campaign(key: &str) -> NewCampaign {
    NewCampaign {
        kind: "promotion".into(),
        name: format!("campaign {key}"),
        created_by: "ops".into(),
        starts_at: Utc::now(),
        ends_at: Utc::now() + Span::days(1),
        inform_type: InformType::App,
        title: "t".into(),
        body: "b".into(),
        audience: Audience::All,
        dedupe_key: key.into(),
        coupon_id: None,
    }
}

async fn rows(db: &DatabaseConnection) -> i64 {
    rows_where(db, "TRUE").await
}

/// The campaigns for which `condition` holds.
async fn rows_where(db: &DatabaseConnection, condition: &str) -> i64 {
    testkit::count(db, &format!("campaign WHERE {condition}"))
        .await
        .unwrap()
}

fn batch<'a>(
    cs: &[&'a NewCampaign],
    now: chrono::DateTime<Utc>,
    since: chrono::DateTime<Utc>,
) -> Vec<CampaignInsert<'a>> {
    cs.iter()
        .map(|campaign| CampaignInsert {
            campaign,
            now,
            since,
        })
        .collect()
}

async fn batch_insert_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    let now = Utc::now();
    let since = now - Span::minutes(30);
    let (a, b, c) = (campaign("a"), campaign("b"), campaign("c"));
    // Three distinct and one repeat: three inserted.
    let first = store
        .insert_campaigns(&batch(&[&a, &b, &a, &c], now, since))
        .await
        .unwrap();
    assert_eq!(
        rows(&db).await,
        3,
        "a repeat within the batch is not inserted"
    );
    assert!(first[0].1 && first[1].1 && !first[2].1 && first[3].1);
    assert_eq!(first[2].0, first[0].0, "the repeat gets the first one's id");
    let ids: std::collections::HashSet<i64> = first.iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), 3);
    // The same again within the window: all repeats, nothing inserted.
    let again = store
        .insert_campaigns(&batch(&[&c, &b], now, since))
        .await
        .unwrap();
    assert_eq!(again, vec![(first[3].0, false), (first[1].0, false)]);
    assert_eq!(rows(&db).await, 3);
    // Outside the window it is a new campaign.
    let later = store
        .insert_campaign(&a, now + Span::hours(1), now + Span::minutes(1))
        .await
        .unwrap();
    assert!(later.1 && later.0 != first[0].0);
    // Every column comes back as it went in, a coupon among them, beside one without.
    let mut d = campaign("d");
    d.coupon_id = Some(42);
    d.audience = Audience::Segment(SegmentFilter {
        min_points: Some(5),
        ..Default::default()
    });
    let (id, _) = store.insert_campaign(&d, now, since).await.unwrap();
    let read = store.campaigns(&[id, first[0].0]).await.unwrap();
    let back = read.iter().find(|c| c.id == id).unwrap();
    assert_eq!(
        (back.name.as_str(), back.title.as_str(), back.body.as_str()),
        ("campaign d", "t", "b")
    );
    assert_eq!((back.coupon_id, &back.audience), (Some(42), &d.audience));
    assert_eq!(
        back.epoch,
        now.timestamp_millis(),
        "the creation time is the epoch"
    );
    let other = read.iter().find(|c| c.id == first[0].0).unwrap();
    assert_eq!(other.coupon_id, None);
}

/// The claims of keys last used more than the cut-off ago are removed, at most `limit` a
/// call, and the others kept; a key whose claim was removed is new again, as it was once its
/// window had passed, and a kept one is still a repeat.
async fn pruning_claims_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    let now = Utc::now();
    let window = Span::minutes(30);
    let (o1, o2, o3, live) = (
        campaign("old 1"),
        campaign("old 2"),
        campaign("old 3"),
        campaign("live"),
    );
    let then = now - Span::hours(3);
    store
        .insert_campaigns(&batch(&[&o1, &o2, &o3], then, then - window))
        .await
        .unwrap();
    let recent = now - Span::minutes(10);
    let (live_id, _) = store
        .insert_campaign(&live, recent, recent - window)
        .await
        .unwrap();
    let cut = now - Span::hours(1);
    assert_eq!(store.prune_dedupe_claims(cut, 2).await.unwrap(), 2);
    assert_eq!(store.prune_dedupe_claims(cut, 2).await.unwrap(), 1);
    assert_eq!(store.prune_dedupe_claims(cut, 2).await.unwrap(), 0);
    assert_eq!(claims(&db).await, 1, "the live claim stays");
    assert_eq!(
        store
            .insert_campaign(&live, now, now - window)
            .await
            .unwrap(),
        (live_id, false),
        "a key within its window is still a repeat"
    );
    let (_, inserted) = store.insert_campaign(&o1, now, now - window).await.unwrap();
    assert!(inserted, "a key past its window makes a new campaign");
    assert_eq!(rows(&db).await, 5, "the campaigns themselves are all kept");
}

/// A create's statement takes expired claims over while a prune runs: the prune skips the
/// claim the create holds, which stays, and removes the other, without waiting. A prune that
/// waited for the held claim while holding the other would deadlock with the create as it
/// claims that one too.
#[tokio::test]
async fn a_prune_neither_removes_nor_waits_for_a_claim_a_create_holds() {
    on_postgres("storeprunerace", |db: DatabaseConnection| async move {
        herald_engine::engine::migrate(&db).await.unwrap();
        let store = Store::new(db.clone());
        let now = Utc::now();
        let then = now - Span::hours(3);
        let (second, first) = (campaign("second"), campaign("first"));
        // "second" first, so a scan in table order meets it before "first".
        store
            .insert_campaigns(&batch(&[&second, &first], then, then - Span::minutes(30)))
            .await
            .unwrap();
        // The create's takeover of "first", held open on a connection of its own.
        let create = db.begin().await.unwrap();
        create
            .execute(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE campaign_dedupe SET created_at = $1 WHERE dedupe_key = $2",
                [now.into(), "first".into()],
            ))
            .await
            .unwrap();
        let removed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.prune_dedupe_claims(now - Span::hours(1), 10),
        )
        .await
        .expect("the prune does not wait for the claim a create holds")
        .unwrap();
        assert_eq!(removed, 1, "the claim no create holds is removed");
        // The same create claims "second" as a create's claim does: gone, so claimed afresh.
        create
            .execute(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO campaign_dedupe (dedupe_key, campaign_id, created_at) \
                 VALUES ($1, 99, $2) ON CONFLICT (dedupe_key) DO UPDATE \
                 SET campaign_id = excluded.campaign_id, created_at = excluded.created_at",
                ["second".into(), now.into()],
            ))
            .await
            .unwrap();
        create.commit().await.unwrap();
        assert_eq!(claims(&db).await, 2);
        assert_eq!(
            store
                .prune_dedupe_claims(now - Span::hours(1), 10)
                .await
                .unwrap(),
            0,
            "both claims are live"
        );
    })
    .await;
}

async fn claims(db: &DatabaseConnection) -> i64 {
    testkit::count(db, "campaign_dedupe").await.unwrap()
}

/// Creates with one dedupe key racing on separate connections, with no Redis in front:
/// exactly one of them inserts, and every one answers that campaign's id.
async fn racing_repeats_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    const ROUNDS: i64 = 20;
    for round in 0..ROUNDS {
        let c = campaign(&format!("race {round}"));
        let now = Utc::now();
        let since = now - Span::minutes(30);
        let racers = (0..8).map(|_| {
            let (store, c) = (store.clone(), c.clone());
            tokio::spawn(async move { store.insert_campaign(&c, now, since).await.unwrap() })
        });
        let mut answers = Vec::new();
        for r in racers.collect::<Vec<_>>() {
            answers.push(r.await.unwrap());
        }
        let winners = answers.iter().filter(|a| a.1).count();
        assert_eq!(winners, 1, "round {round}: {answers:?}");
        assert!(answers.iter().all(|a| a.0 == answers[0].0), "{answers:?}");
    }
    assert_eq!(rows(&db).await, ROUNDS);
}

fn record(campaign_id: i64, bucket: i64, part: i32, sent: i32) -> BatchRecord {
    BatchRecord {
        campaign_id,
        bucket,
        part,
        recipients: 100,
        sent,
        skipped: 100 - sent,
        failed: 0,
        done_at: Utc::now(),
    }
}

async fn batch_records_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    let (id, _) = store
        .insert_campaign(&campaign("r"), Utc::now(), Utc::now())
        .await
        .unwrap();
    // Three batches (padded to four rows with a repeat of the first), then a redelivered
    // batch with other counts beside a new one: the first record of a batch stands.
    store
        .record_batches(&[
            record(id, 0, 0, 100),
            record(id, 0, 1, 90),
            record(id, 1, 0, 80),
        ])
        .await
        .unwrap();
    store
        .record_batches(&[record(id, 0, 1, 0), record(id, 2, 0, 70)])
        .await
        .unwrap();
    store.record_batches(&[]).await.unwrap();
    let p = store.progress(id).await.unwrap();
    assert_eq!(p.batches_done, 4);
    assert_eq!(p.sent, 100 + 90 + 80 + 70);
    assert_eq!(p.skipped, 10 + 20 + 30);

    // Buckets count once each, whatever their repeats say: within one grouped insert and
    // across two.
    let now = Utc::now();
    let bucket = |bucket, parts, recipients| BucketRecord {
        campaign_id: id,
        bucket,
        parts,
        recipients,
        done_at: now,
    };
    store
        .record_buckets(&[bucket(0, 2, 200), bucket(1, 1, 100), bucket(0, 5, 999)])
        .await
        .unwrap();
    store.record_buckets(&[bucket(1, 7, 7)]).await.unwrap();
    store.record_buckets(&[]).await.unwrap();
    let p = store.progress(id).await.unwrap();
    assert_eq!((p.buckets_done, p.parts_total, p.recipients), (2, 3, 300));

    // Eight writers racing over overlapping batches of a second campaign: each batch counts
    // once, and the counters match sums over the rows.
    let (other, _) = store
        .insert_campaign(&campaign("r2"), Utc::now(), Utc::now())
        .await
        .unwrap();
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for round in 0..10i64 {
                    let batches: Vec<BatchRecord> = (0..16i64)
                        .map(|k| record(other, (w + round + k) % 40, 0, (k % 7) as i32 * 10))
                        .collect();
                    store.record_batches(&batches).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let p = store.progress(other).await.unwrap();
    #[derive(sea_orm::FromQueryResult)]
    struct Sums {
        n: i64,
        sent: i64,
        skipped: i64,
    }
    let sums = Sums::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n, CAST(SUM(sent) AS BIGINT) AS sent, \
         CAST(SUM(skipped) AS BIGINT) AS skipped FROM campaign_batch WHERE campaign_id = $1",
        vec![other.into()],
    ))
    .one(&db)
    .await
    .unwrap()
    .unwrap();
    assert_eq!(sums.n, 32, "buckets 0..=31");
    assert_eq!(
        (p.batches_done, p.sent, p.skipped),
        (sums.n, sums.sent, sums.skipped)
    );
    // The first campaign's counters did not move.
    assert_eq!(store.progress(id).await.unwrap().batches_done, 4);
}

/// A record answers the campaigns it made complete: the one record that brings every
/// bucket and every batch in, whichever kind it is, and no other.
async fn completion_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    let (id, _) = store
        .insert_campaign(&campaign("done"), Utc::now(), Utc::now())
        .await
        .unwrap();
    let (other, _) = store
        .insert_campaign(&campaign("other"), Utc::now(), Utc::now())
        .await
        .unwrap();
    let bucket = |campaign_id, bucket, parts| BucketRecord {
        campaign_id,
        bucket,
        parts,
        recipients: 100 * i64::from(parts),
        done_at: Utc::now(),
    };
    let none: Vec<i64> = vec![];
    // Not sharded yet: everything recorded so far is still not complete.
    assert_eq!(
        store.record_buckets(&[bucket(id, 0, 2)]).await.unwrap(),
        none
    );
    assert_eq!(
        store
            .record_batches(&[record(id, 0, 0, 100), record(id, 0, 1, 100)])
            .await
            .unwrap(),
        none
    );
    store.set_sharded(id, 2, Utc::now()).await.unwrap();
    store.set_sharded(other, 1, Utc::now()).await.unwrap();
    // The last bucket's batch first, then the bucket itself completes the campaign; the
    // other campaign's record in the same statement does not complete that one.
    assert_eq!(
        store
            .record_batches(&[record(id, 1, 0, 100), record(other, 0, 0, 100)])
            .await
            .unwrap(),
        none
    );
    assert_eq!(
        store
            .record_buckets(&[bucket(id, 1, 1), bucket(other, 0, 2)])
            .await
            .unwrap(),
        vec![id]
    );
    // A repeat inserts nothing and completes nothing again.
    assert_eq!(
        store.record_buckets(&[bucket(id, 1, 1)]).await.unwrap(),
        none
    );
    assert_eq!(
        store
            .record_batches(&[record(other, 0, 1, 0)])
            .await
            .unwrap(),
        vec![other]
    );
}

/// Sharding records the bucket count once (the first writer wins) and moves the campaign to
/// running; with no buckets it completes the campaign in the same step, so nothing waits
/// for a progress check.
async fn sharding_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db.clone());
    let (empty, _) = store
        .insert_campaign(&campaign("empty"), Utc::now(), Utc::now())
        .await
        .unwrap();
    let (some, _) = store
        .insert_campaign(&campaign("some"), Utc::now(), Utc::now())
        .await
        .unwrap();
    let (also_empty, _) = store
        .insert_campaign(&campaign("also empty"), Utc::now(), Utc::now())
        .await
        .unwrap();
    store
        .set_sharded_all(&[empty, also_empty], 0, Utc::now())
        .await
        .unwrap();
    store.set_sharded(some, 3, Utc::now()).await.unwrap();
    store.set_sharded(some, 5, Utc::now()).await.unwrap();

    for id in [empty, also_empty] {
        let e = store.status(id).await.unwrap().unwrap();
        assert_eq!((e.status.as_str(), e.buckets_total), ("completed", Some(0)));
        assert!(e.started_at.is_some() && e.finished_at.is_some());
        assert_eq!((e.recipients, e.sent, e.skipped, e.failed), (0, 0, 0, 0));
    }
    // Read back in one query, missing ids left out.
    let mut read: Vec<i64> = store
        .campaigns(&[some, empty, 999_999])
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    read.sort_unstable();
    assert_eq!(read, vec![empty, some]);
    let s = store.status(some).await.unwrap().unwrap();
    assert_eq!((s.status.as_str(), s.buckets_total), ("running", Some(3)));
    assert!(s.started_at.is_some() && s.finished_at.is_none());
    // The count is on the progress row too: the last bucket's record completes it.
    let done = store
        .record_buckets(&[BucketRecord {
            campaign_id: some,
            bucket: 0,
            parts: 0,
            recipients: 0,
            done_at: Utc::now(),
        }])
        .await
        .unwrap();
    assert!(done.is_empty(), "one bucket of three is not complete");
}

#[tokio::test]
async fn sharding_completes_an_empty_audience_on_sqlite() {
    sharding_on(sqlite().await).await;
}

#[tokio::test]
async fn sharding_completes_an_empty_audience_on_postgres() {
    on_postgres("storesharding", sharding_on).await;
}

/// A connection keeps its plan of a statement once it has run it a few times. The sharder's
/// lookups of campaigns by id must use the primary key even when that plan was made while
/// the table was nearly empty: a plan that scans the table, or every pending campaign
/// through the status index, costs more with every campaign.
#[tokio::test]
async fn the_campaign_lookups_use_the_primary_key_as_the_table_grows() {
    let env = TestEnv::new("storeplans").await.unwrap();
    let url = env.config.database.url.clone();
    // The environment's connections migrated the database, which scans the table; a
    // backend publishes its counts when it ends, so they end before the counts are read.
    env.db.clone().close().await.unwrap();
    env.run_test(async move {
        let db = herald_engine::engine::connect_db(&url, 1).await.unwrap();
        let (seq0, status0) = campaign_scans(&db).await;
        // One connection, so each statement is planned on it while the table is tiny.
        let one = herald_engine::engine::connect_db(&url, 1).await.unwrap();
        let store = Store::new(one.clone());
        let many: Vec<NewCampaign> = (0..2001).map(|i| campaign(&format!("k{i}"))).collect();
        let refs: Vec<&NewCampaign> = many.iter().collect();
        let (first, rest) = refs.split_first().unwrap();
        let mut ids = insert_ids(&store, &[first]).await;
        for _ in 0..8 {
            store.campaigns(&ids).await.unwrap();
            store
                .set_sharded_all(&[ids[0]], 1, Utc::now())
                .await
                .unwrap();
        }
        // The table grows by 2,000 pending campaigns; the same plans look them up.
        for chunk in rest.chunks(100) {
            ids.extend(insert_ids(&store, chunk).await);
        }
        for chunk in ids[1..].chunks(16) {
            assert_eq!(store.campaigns(chunk).await.unwrap().len(), chunk.len());
            store.set_sharded_all(chunk, 0, Utc::now()).await.unwrap();
        }
        one.close().await.unwrap();
        let (seq, status) = campaign_scans(&db).await;
        assert_eq!(
            (seq - seq0, status - status0),
            (0, 0),
            "scans of the whole campaign table, and of the status index, while looking \
             campaigns up by id"
        );
        assert_eq!(
            rows_where(&db, "status = 'completed'").await,
            2000,
            "every campaign of the batches completed"
        );
    })
    .await
    .unwrap();
}

/// Completing a batch of campaigns costs the same per campaign whatever the batch's size: no
/// step of the statement's plan runs once per campaign. Joined with a list of (id, count)
/// pairs, the campaign rows were each matched by a loop over the whole list, n² steps for a
/// batch of n.
#[tokio::test]
async fn completing_a_batch_of_campaigns_runs_each_step_of_its_plan_once() {
    let env = TestEnv::new("storeshardplan").await.unwrap();
    let url = env.config.database.url.clone();
    env.run_test(async move {
        // One connection, so the statement the test explains is the one the store prepared.
        let one = herald_engine::engine::connect_db(&url, 1).await.unwrap();
        let store = Store::new(one.clone());
        // A table of the size a busy node reaches, with fresh statistics as autovacuum keeps
        // them: the planner then takes the rows both in the batch's list and within its
        // bounds for about one, and loops over any list joined to them once per row. (At
        // 3,000 rows it chose a hash join, and the test would not see the loop.)
        let many: Vec<NewCampaign> = (0..30_000).map(|i| campaign(&format!("b{i}"))).collect();
        let refs: Vec<&NewCampaign> = many.iter().collect();
        let mut ids = Vec::new();
        for chunk in refs.chunks(500) {
            ids.extend(insert_ids(&store, chunk).await);
        }
        one.execute_unprepared("ANALYZE campaign").await.unwrap();
        let (first, rest) = ids.split_at(90);
        let second = &rest[..90];
        store.set_sharded_all(first, 0, Utc::now()).await.unwrap();
        let txn = one.begin().await.unwrap();
        #[derive(FromQueryResult)]
        struct Prepared {
            name: String,
        }
        let name = Prepared::find_by_statement(Statement::from_string(
            DbBackend::Postgres,
            "SELECT name FROM pg_prepared_statements \
             WHERE statement LIKE 'WITH c AS (UPDATE campaign SET buckets_total%'",
        ))
        .one(&txn)
        .await
        .unwrap()
        .expect("the completing statement prepared on the connection")
        .name;
        // Its parameters: the count, the time, the ids and their bounds.
        let list = second
            .iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let (lo, hi) = (second[0], second[second.len() - 1]);
        let plan: serde_json::Value = txn
            .query_one(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "EXPLAIN (ANALYZE, FORMAT JSON) \
                     EXECUTE {name}(0, now(), '{{{list}}}'::bigint[], {lo}, {hi})"
                ),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "QUERY PLAN")
            .unwrap();
        txn.commit().await.unwrap();
        let mut nodes = Vec::new();
        plan_nodes(&plan[0]["Plan"], &mut nodes);
        let repeated: Vec<_> = nodes
            .iter()
            .filter(|n| n["Actual Loops"].as_i64() != Some(1))
            .map(|n| format!("{} x{}", n["Node Type"], n["Actual Loops"]))
            .collect();
        assert!(
            repeated.is_empty(),
            "steps run more than once for a batch of {}: {repeated:?}",
            second.len()
        );
        assert_eq!(
            rows_where(&one, "status = 'completed'").await,
            180,
            "both batches completed, and no other campaign"
        );
    })
    .await
    .unwrap();
}

/// Every node of an `EXPLAIN (FORMAT JSON)` plan, depth first.
fn plan_nodes<'a>(node: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    out.push(node);
    for child in node["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

#[tokio::test]
async fn warming_opens_every_connection_with_the_campaign_insert_prepared() {
    let env = TestEnv::new("storewarm").await.unwrap();
    let url = env.config.database.url.clone();
    env.run_test(async move {
        // Opens one connection of three, as the API's pool did before it was warmed.
        let db = herald_engine::engine::connect_db(&url, 3).await.unwrap();
        let store = Store::new(db.clone());
        store.warm_campaign_inserts(3).await.unwrap();
        let pool = db.get_postgres_connection_pool();
        assert_eq!(pool.size(), 3, "connections open after warming");
        assert_eq!(rows(&db).await, 0, "warming inserts nothing");
        // Held together, each of the three reads the statements prepared on itself.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(db.begin().await.unwrap());
        }
        #[derive(FromQueryResult)]
        struct Count {
            n: i64,
        }
        let mut prepared = Vec::new();
        for txn in &held {
            let n = Count::find_by_statement(Statement::from_string(
                DbBackend::Postgres,
                "SELECT COUNT(*) AS n FROM pg_prepared_statements \
                 WHERE statement LIKE 'WITH v AS%INSERT INTO campaign_dedupe%'",
            ))
            .one(txn)
            .await
            .unwrap()
            .unwrap()
            .n;
            prepared.push(n);
        }
        assert_eq!(
            prepared,
            vec![1, 1, 1],
            "the insert prepared on each connection"
        );
        drop(held);
        let ids = insert_ids(&store, &[&campaign("after warming")]).await;
        assert_eq!(ids.len(), 1);
        assert_eq!(rows(&db).await, 1);
    })
    .await
    .unwrap();
}

/// Inserts `campaigns` in one call and returns their ids.
async fn insert_ids(store: &Store, campaigns: &[&NewCampaign]) -> Vec<i64> {
    let rows = batch(campaigns, Utc::now(), Utc::now());
    let inserted = store.insert_campaigns(&rows).await.unwrap();
    inserted.into_iter().map(|(id, _)| id).collect()
}

/// Sequential scans of `campaign` and scans of its status index, once the backends that
/// made them have exited.
async fn campaign_scans(db: &DatabaseConnection) -> (i64, i64) {
    #[derive(FromQueryResult, PartialEq, Clone, Copy)]
    struct N {
        seq: i64,
        status: i64,
    }
    let read = || async {
        N::find_by_statement(Statement::from_string(
            db.get_database_backend(),
            "SELECT t.seq_scan AS seq, i.idx_scan AS status FROM pg_stat_user_tables t \
             JOIN pg_stat_user_indexes i ON i.relid = t.relid AND i.indexrelname = 'ix_campaign_status' \
             WHERE t.relname = 'campaign'"
                .to_string(),
        ))
        .one(db)
        .await
        .unwrap()
        .unwrap()
    };
    // Until two reads 300 ms apart agree: an exited backend's counts land shortly after.
    let mut last = read().await;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = read().await;
        if now == last {
            break;
        }
        last = now;
    }
    (last.seq, last.status)
}

/// An in-memory SQLite database, one connection.
async fn sqlite() -> DatabaseConnection {
    herald_engine::engine::connect_db("sqlite::memory:", 1)
        .await
        .unwrap()
}

/// Runs `body` on a PostgreSQL database of its own, then drops the database, also when
/// `body` panics.
async fn on_postgres<F, Fut>(name: &str, body: F)
where
    F: FnOnce(DatabaseConnection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let env = TestEnv::new(name).await.unwrap();
    env.run_test(body(env.db.clone())).await.unwrap();
}

#[tokio::test]
async fn batch_insert_on_sqlite() {
    batch_insert_on(sqlite().await).await;
}

#[tokio::test]
async fn batch_records_on_sqlite() {
    batch_records_on(sqlite().await).await;
}

#[tokio::test]
async fn batch_records_on_postgres() {
    on_postgres("storerecords", batch_records_on).await;
}

#[tokio::test]
async fn a_record_that_completes_its_campaign_says_so_on_sqlite() {
    completion_on(sqlite().await).await;
}

#[tokio::test]
async fn a_record_that_completes_its_campaign_says_so_on_postgres() {
    on_postgres("storecomplete", completion_on).await;
}

#[tokio::test]
async fn batch_insert_on_postgres() {
    on_postgres("storebatch", batch_insert_on).await;
}

#[tokio::test]
async fn expired_claims_are_pruned_and_live_ones_kept_on_sqlite() {
    pruning_claims_on(sqlite().await).await;
}

#[tokio::test]
async fn expired_claims_are_pruned_and_live_ones_kept_on_postgres() {
    on_postgres("storeprune", pruning_claims_on).await;
}

#[tokio::test]
async fn racing_repeats_insert_once_on_sqlite() {
    racing_repeats_on(sqlite().await).await;
}

/// A SQLite file behind a pool of several connections, as a node's default database is:
/// racing creates take turns as writers instead of failing.
#[tokio::test]
async fn racing_repeats_insert_once_on_a_sqlite_file_with_a_pool() {
    let dir = std::env::temp_dir().join(format!("herald-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("sqlite://{}/herald.db?mode=rwc", dir.display());
    let db = herald_engine::engine::connect_db_with(&url, 8, 8)
        .await
        .unwrap();
    racing_repeats_on(db).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn racing_repeats_insert_once_on_postgres() {
    on_postgres("storerace", racing_repeats_on).await;
}

// After a bulk load the planner needs statistics: without them a segment's bounds query
// scans every user. Seeding refreshes them (pg_class.reltuples is -1 until the first
// ANALYZE or VACUUM).
#[tokio::test]
async fn seeding_users_leaves_fresh_statistics() {
    let env = TestEnv::new("seedstats").await.unwrap();
    env.run_test(async {
        env.seed(3_000).await.unwrap();
        #[derive(FromQueryResult)]
        struct T {
            relname: String,
            reltuples: f64,
        }
        let tables = T::find_by_statement(Statement::from_string(
            env.db.get_database_backend(),
            "SELECT relname::text AS relname, reltuples::float8 AS reltuples FROM pg_class \
             WHERE relname IN ('membership_account', 'membership_point', 'membership_filter')"
                .to_string(),
        ))
        .all(&env.db)
        .await
        .unwrap();
        assert_eq!(tables.len(), 3);
        for t in tables {
            assert_eq!(
                t.reltuples, 3_000.0,
                "{} has no fresh statistics",
                t.relname
            );
        }
    })
    .await
    .unwrap();
}

async fn bucket_users_on(db: DatabaseConnection) {
    herald_engine::engine::migrate(&db).await.unwrap();
    herald_engine::seed::seed_users(&db, 2_500).await.unwrap();
    let store = Store::new(db.clone());
    let all = store
        .bucket_users(&Audience::All, 1_000, 2_000)
        .await
        .unwrap();
    assert_eq!(all, (1_000..2_000).collect::<Vec<i64>>());
    assert!(store
        .bucket_users(&Audience::All, 5_000, 6_000)
        .await
        .unwrap()
        .is_empty());
    // A segment: the same users an SQL query of it returns, in id order.
    let segment = Audience::Segment(SegmentFilter {
        member_levels: None,
        min_points: Some(5_000),
        min_active_days: None,
    });
    #[derive(FromQueryResult)]
    struct Id {
        id: i64,
    }
    let expected: Vec<i64> = Id::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT a.id AS id FROM membership_account a JOIN membership_point p \
         ON p.account_id = a.id WHERE a.id >= 1 AND a.id < 2501 AND p.member_point >= 5000 \
         ORDER BY a.id"
            .to_string(),
    ))
    .all(&db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| r.id)
    .collect();
    assert!(
        !expected.is_empty() && expected.len() < 2_500,
        "{}",
        expected.len()
    );
    assert_eq!(
        store.bucket_users(&segment, 1, 2_501).await.unwrap(),
        expected
    );
}

#[tokio::test]
async fn bucket_users_on_sqlite() {
    bucket_users_on(sqlite().await).await;
}

#[tokio::test]
async fn bucket_users_on_postgres() {
    on_postgres("storebucket", bucket_users_on).await;
}

/// `database.min_connections` are open once a node has started, so the first campaign does
/// not pay for opening them (a backend start and often a TLS handshake each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_opens_its_min_connections_when_it_starts() {
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    let env = TestEnv::new("storeminconn").await.unwrap();
    env.run_test(async {
        let count = || async {
            Count::find_by_statement(Statement::from_sql_and_values(
                env.db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database()",
                [],
            ))
            .one(&env.db)
            .await
            .unwrap()
            .unwrap()
            .n
        };
        let before = count().await;
        let mut config = env.config.clone();
        config.node.run_pipeline = false;
        config.api.enabled = false;
        config.database.max_connections = 8;
        config.database.min_connections = 6;
        let engine = herald_engine::Engine::start(config).await.unwrap();
        let opened = count().await - before;
        assert!(opened >= 6, "the node opened {opened} connections, not 6");
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

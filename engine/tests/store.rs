//! The campaign store's batch insert, on SQLite and PostgreSQL: one statement for many
//! creates, repeats within the batch and within the window recognised, padding rows never
//! inserted.

use chrono::{Duration as Span, Utc};
use herald_engine::{
    actors::store::{CampaignInsert, NewCampaign, Store},
    schemas::{Audience, InformType},
    testkit::TestEnv,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement};

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
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    N::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM campaign".to_string(),
    ))
    .one(db)
    .await
    .unwrap()
    .unwrap()
    .n
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
    // Three distinct and one repeat: padded to four rows, three inserted.
    let first = store
        .insert_campaigns(&batch(&[&a, &b, &a, &c], now, since))
        .await
        .unwrap();
    assert_eq!(rows(&db).await, 3, "padding rows are never inserted");
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
}

#[tokio::test]
async fn batch_insert_on_sqlite() {
    let db = herald_engine::engine::connect_db("sqlite::memory:", 1)
        .await
        .unwrap();
    batch_insert_on(db).await;
}

#[tokio::test]
async fn batch_insert_on_postgres() {
    let env = TestEnv::new("storebatch").await.unwrap();
    batch_insert_on(env.db.clone()).await;
    env.cleanup().await.unwrap();
}

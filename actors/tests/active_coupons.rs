//! The active lazy coupon list against the real Redis at 127.0.0.1:6379. Each test runs
//! under its own key prefix and deletes its keys after, also when it fails.

use std::{
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chrono::Utc;
use herald_actors::{
    coupons::{store::STATUS_NORMAL, ActiveCoupons, Claimed, Coupon},
    markers::{connect, delete_matching},
};
use herald_schemas::CouponDelivery;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Runs `test` on an active list under a prefix of its own, then deletes that prefix's keys.
async fn with_active<F, Fut>(test: F)
where
    F: FnOnce(ActiveCoupons) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let client = connect(REDIS_URL, Duration::from_secs(10))
        .await
        .expect("connect to redis at 127.0.0.1:6379");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    let prefix = format!("tac{}_{nanos}", std::process::id());
    let active = ActiveCoupons::new(client.clone(), &prefix, Duration::from_secs(30));
    let outcome = tokio::spawn(test(active)).await;
    delete_matching(&client, &format!("{prefix}:*"))
        .await
        .expect("delete test keys");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn lazy_coupon(id: i64) -> Coupon {
    Coupon {
        id,
        name: format!("coupon {id}"),
        coupon_type: 1,
        starts_at: Utc::now() - chrono::Duration::hours(1),
        ends_at: Utc::now() + chrono::Duration::days(1),
        total: None,
        issued: 0,
        delivery: CouponDelivery::Lazy,
        segment: None,
        campaign_id: None,
        status: STATUS_NORMAL,
    }
}

/// Claimed pairs and nobody waiting.
fn claimed(pairs: &[(i64, i64)]) -> Claimed {
    Claimed::Pairs {
        claimed: pairs.to_vec(),
        waiting: Vec::new(),
    }
}

#[tokio::test]
async fn a_coupon_created_while_a_node_loads_the_list_stays_in_it() {
    with_active(|active| async move {
        let older = lazy_coupon(1);
        let new = lazy_coupon(2);
        // A node reads the database's active coupons, before the new one is committed ...
        let read_before_the_new_one = vec![older];
        // ... the API commits the new coupon and adds it to the list, not loaded yet ...
        active.add(&new).await.unwrap();
        // ... a login meanwhile finds the list not loaded, and loads it itself ...
        assert_eq!(active.claim(&[5], "a").await.unwrap(), Claimed::NotLoaded);
        // ... and the node writes what it had read.
        active.sync(&read_before_the_new_one).await.unwrap();
        let Claimed::Pairs {
            claimed: mut pairs, ..
        } = active.claim(&[7], "b").await.unwrap()
        else {
            panic!("the list is loaded");
        };
        pairs.sort_unstable();
        assert_eq!(pairs, vec![(1, 7), (2, 7)], "both coupons are active");
    })
    .await;
}

#[tokio::test]
async fn a_coupon_added_to_a_loaded_list_keeps_the_live_issued_count() {
    with_active(|active| async move {
        let mut limited = lazy_coupon(3);
        limited.total = Some(1);
        active.sync(std::slice::from_ref(&limited)).await.unwrap();
        assert_eq!(active.claim(&[10], "a").await.unwrap(), claimed(&[(3, 10)]));
        active.confirm(&[((3, 10), true)]).await.unwrap();
        // A repeated add (issued 0, as read before the item) must not give the stock back.
        active.add(&limited).await.unwrap();
        assert_eq!(
            active.claim(&[11], "b").await.unwrap(),
            Claimed::none(),
            "the one item of stock is gone"
        );
    })
    .await;
}

/// The keys of `active`'s list: `<prefix>:cp:` followed by `name`.
fn key(active: &ActiveCoupons, name: &str) -> String {
    format!("{}{name}", active.key_pattern().trim_end_matches('*'))
}

async fn delete_key(key: &str) {
    let client = connect(REDIS_URL, Duration::from_secs(10)).await.unwrap();
    let _: i64 = fred::interfaces::KeysInterface::del(&client, key)
        .await
        .unwrap();
}

/// Redis can lose some keys and keep others (eviction, a partial restore). A list that lost
/// its set of coupons, or one coupon's hash, must be reloaded from the database like a list
/// Redis lost whole; read as loaded, it would let every login through without its coupons.
#[tokio::test]
async fn a_list_that_lost_part_of_its_keys_is_loaded_again() {
    with_active(|active| async move {
        let coupons = [lazy_coupon(1), lazy_coupon(2)];
        active.sync(&coupons).await.unwrap();
        assert_eq!(
            active.claim(&[5], "a").await.unwrap(),
            claimed(&[(1, 5), (2, 5)])
        );

        delete_key(&key(&active, "active")).await;
        assert_eq!(
            active.claim(&[6], "a").await.unwrap(),
            Claimed::NotLoaded,
            "the set of coupons is gone"
        );
        active.sync(&coupons).await.unwrap();
        assert_eq!(
            active.claim(&[6], "a").await.unwrap(),
            claimed(&[(1, 6), (2, 6)])
        );

        delete_key(&key(&active, "2")).await;
        assert_eq!(
            active.claim(&[7], "a").await.unwrap(),
            Claimed::NotLoaded,
            "coupon 2's hash is gone"
        );
        // A reload from a database that no longer lists coupon 2 leaves it out for good.
        active.sync(&coupons[..1]).await.unwrap();
        assert_eq!(active.claim(&[7], "a").await.unwrap(), claimed(&[(1, 7)]));
    })
    .await;
}

/// Claims in flight can hold a limited coupon's last stock and still come to nothing: after
/// Redis lost the holders' bits, the first logins claim stock for users the database shows
/// as holders already. Users turned away meanwhile must hear "wait", not "gone", or the
/// stock those claims give back goes to nobody.
#[tokio::test]
async fn users_turned_away_for_stock_that_claims_hold_are_told_to_wait() {
    with_active(|active| async move {
        let mut limited = lazy_coupon(4);
        limited.total = Some(2);
        active.sync(std::slice::from_ref(&limited)).await.unwrap();
        assert_eq!(
            active.claim(&[1, 2], "a").await.unwrap(),
            claimed(&[(4, 1), (4, 2)])
        );
        assert_eq!(
            active.claim(&[3], "b").await.unwrap(),
            Claimed::Pairs {
                claimed: vec![],
                waiting: vec![(4, 3)]
            },
            "both items are held by claims that may come to nothing"
        );
        // Both were holders already (no new item): their claims go, the stock stays.
        active
            .confirm(&[((4, 1), false), ((4, 2), false)])
            .await
            .unwrap();
        assert_eq!(
            active.claim(&[3], "b").await.unwrap(),
            claimed(&[(4, 3)]),
            "the waiting user gets the stock the claims gave back"
        );
        active.confirm(&[((4, 3), true)]).await.unwrap();
        assert_eq!(
            active.claim(&[5, 6], "c").await.unwrap(),
            Claimed::Pairs {
                claimed: vec![(4, 5)],
                waiting: vec![(4, 6)]
            },
            "the last item: 5 claims it, 6 waits for that claim"
        );
        active.confirm(&[((4, 5), true)]).await.unwrap();
        assert_eq!(
            active.claim(&[7], "c").await.unwrap(),
            Claimed::none(),
            "sold out: nobody waits for stock that is gone"
        );
    })
    .await;
}

/// Before the loaded flag was a member of the set it was a key of its own; a sync removes
/// such a key, so an upgraded deployment does not keep it forever.
#[tokio::test]
async fn a_sync_removes_the_old_loaded_key() {
    with_active(|active| async move {
        let old = key(&active, "loaded");
        let client = connect(REDIS_URL, Duration::from_secs(10)).await.unwrap();
        let _: () = fred::interfaces::KeysInterface::set(&client, &old, "1", None, None, false)
            .await
            .unwrap();
        active.sync(&[lazy_coupon(1)]).await.unwrap();
        let left: i64 = fred::interfaces::KeysInterface::exists(&client, &old)
            .await
            .unwrap();
        assert_eq!(left, 0, "the old flag's key is gone");
        assert_eq!(active.claim(&[5], "a").await.unwrap(), claimed(&[(1, 5)]));
    })
    .await;
}

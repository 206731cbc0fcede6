//! Coupons end to end against the real NATS, Redis and PostgreSQL: lazy issuance on login
//! storms handled by two nodes, stock never oversold, validity windows, segment pushes and
//! claims, eager issuance, release on order cancel, Redis losing its data, a coupon Redis
//! cannot activate, dead letters.

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{Duration as Span, Utc};
use fred::interfaces::{KeysInterface, SortedSetsInterface};
use herald_engine::{
    providers::{Ledger, SimulatedConfig, SimulatedProvider},
    schemas::{
        decode, encode, ApiError, ClaimCouponReply, ClaimCouponRequest, CouponDelivery,
        CouponStatusReply, CouponStatusRequest, CreateCouponReply, CreateCouponRequest, DeadLetter,
        ErrorCode, InformType, OrderCanceled, SegmentFilter, UserLogin,
    },
    testkit::{gold_members, wait_until, TestEnv},
    Engine,
};
use sea_orm::{ConnectionTrait, FromQueryResult, Statement};

const LONG: Duration = Duration::from_secs(120);

fn coupon(name: &str, delivery: CouponDelivery) -> CreateCouponRequest {
    CreateCouponRequest {
        name: name.into(),
        created_by: "ops-7".into(),
        coupon_type: 1,
        rule: serde_json::json!({"amount": 10, "threshold": 100}),
        starts_at: Utc::now() - Span::hours(1),
        ends_at: Utc::now() + Span::days(7),
        inform_type: InformType::App,
        total: None,
        delivery,
        segment: None,
    }
}

async fn start(env: &TestEnv) -> (Engine, Ledger) {
    let provider = Arc::new(SimulatedProvider::new(SimulatedConfig {
        latency_ms: 1,
        failure_rate: 0.0,
        permanent_failure_rate: 0.0,
    }));
    let ledger = provider.ledger();
    let engine = Engine::builder(env.config.clone())
        .provider_for_all(provider)
        .start()
        .await
        .unwrap();
    (engine, ledger)
}

async fn create(env: &TestEnv, req: &CreateCouponRequest) -> Result<CreateCouponReply, ApiError> {
    env.ask(env.subjects().api_coupon_create(), req)
        .await
        .unwrap()
}

async fn claim(env: &TestEnv, coupon_id: i64, user_id: i64) -> Result<ClaimCouponReply, ApiError> {
    env.ask(
        env.subjects().api_coupon_claim(),
        &ClaimCouponRequest { coupon_id, user_id },
    )
    .await
    .unwrap()
}

async fn status(env: &TestEnv, coupon_id: i64) -> CouponStatusReply {
    env.ask(
        env.subjects().api_coupon_status(),
        &CouponStatusRequest { coupon_id },
    )
    .await
    .unwrap()
    .unwrap()
}

#[derive(Debug, FromQueryResult)]
struct Count {
    n: i64,
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    Count::find_by_statement(Statement::from_string(
        env.db.get_database_backend(),
        sql.to_string(),
    ))
    .one(&env.db)
    .await
    .unwrap()
    .unwrap()
    .n
}

async fn items(env: &TestEnv, coupon_id: i64) -> i64 {
    count(
        env,
        &format!(
            "SELECT COUNT(*) AS n FROM sales_promotion_coupon_item WHERE coupon_id = {coupon_id}"
        ),
    )
    .await
}

async fn users_of(env: &TestEnv, coupon_id: i64) -> Vec<i64> {
    #[derive(FromQueryResult)]
    struct U {
        user_account_id: i64,
    }
    U::find_by_statement(Statement::from_string(
        env.db.get_database_backend(),
        format!(
            "SELECT user_account_id FROM sales_promotion_coupon_item WHERE coupon_id = {coupon_id} \
             ORDER BY user_account_id"
        ),
    ))
    .all(&env.db)
    .await
    .unwrap()
    .into_iter()
    .map(|u| u.user_account_id)
    .collect()
}

fn login_json(user: i64) -> Vec<u8> {
    format!(r#"{{"user_id":{user}}}"#).into_bytes()
}

fn login_msgpack(user: i64) -> Vec<u8> {
    encode(&UserLogin { user_id: user }).unwrap()
}

/// A deterministic stream of user ids with repeats (xorshift).
fn logins(n: usize, users: i64, seed: u64) -> Vec<i64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % users as u64) as i64 + 1
        })
        .collect()
}

async fn dead_letters(env: &TestEnv, at_least: u64) -> Vec<DeadLetter> {
    let js = async_nats::jetstream::new(env.nats.clone());
    let dl = js
        .get_stream(env.subjects().dead_letter_stream())
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let mut dl = dl.clone();
            async move { dl.info().await.map(|i| i.state.messages).unwrap_or(0) >= at_least }
        })
        .await,
        "dead letters arrived"
    );
    let mut dl = dl;
    let n = dl.info().await.unwrap().state.messages;
    let mut out = Vec::new();
    for seq in 1..=n {
        let m = dl.get_raw_message(seq).await.unwrap();
        out.push(decode(&m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_storm_on_two_nodes_issues_one_item_per_coupon_and_user() {
    let env = TestEnv::new("cplogin").await.unwrap();
    env.run_test(async {
        env.seed(20_000).await.unwrap();
        let (a, _) = start(&env).await;
        let (b, _) = start(&env).await;

        let open = create(&env, &coupon("open", CouponDelivery::Lazy))
            .await
            .unwrap();
        let limited = create(
            &env,
            &CreateCouponRequest {
                total: Some(3_000),
                ..coupon("limited", CouponDelivery::Lazy)
            },
        )
        .await
        .unwrap();
        let later = create(
            &env,
            &CreateCouponRequest {
                starts_at: Utc::now() + Span::days(1),
                ..coupon("not yet", CouponDelivery::Lazy)
            },
        )
        .await
        .unwrap();
        // An expired coupon cannot be created through the API; write one as an old row would be.
        env.db
            .execute(Statement::from_string(
                env.db.get_database_backend(),
                "INSERT INTO sales_promotion_coupon (coupon_name, coupon_type, coupon_rule, \
                 activity_start_time, activity_end_time, coupon_count, coupon_received_count, \
                 coupon_receive_type, inform_type, status, created_by, created_at, updated_at, delivery) \
                 VALUES ('expired', 1, '{}', now() - interval '2 days', now() - interval '1 day', NULL, 0, \
                 'platform', 'app', 1, 'ops', now(), now(), 'lazy')"
                    .to_string(),
            ))
            .await
            .unwrap();

        // 50,000 logins of 20,000 users with repeats, half JSON and half MessagePack.
        let stream = logins(50_000, 20_000, 0x9e3779b97f4a7c15);
        let distinct: HashSet<i64> = stream.iter().copied().collect();
        let payloads = stream
            .iter()
            .enumerate()
            .map(|(i, u)| {
                if i % 2 == 0 {
                    login_json(*u)
                } else {
                    login_msgpack(*u)
                }
            })
            .collect();
        env.publish_events(env.subjects().event_user_login(), payloads)
            .await
            .unwrap();

        let want = distinct.len() as i64;
        assert!(
            wait_until(LONG, || async { items(&env, open.coupon_id).await >= want }).await,
            "every distinct user got the open coupon"
        );
        // Let any straggler (a redelivery) finish before counting.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let open_users = users_of(&env, open.coupon_id).await;
        assert_eq!(open_users.len() as i64, want, "one item per user");
        assert_eq!(
            open_users.iter().copied().collect::<HashSet<_>>(),
            distinct,
            "exactly the users who logged in"
        );
        assert_eq!(
            items(&env, limited.coupon_id).await,
            3_000,
            "stock exactly used"
        );
        assert_eq!(items(&env, later.coupon_id).await, 0, "not started");
        assert_eq!(
            count(
                &env,
                "SELECT COUNT(*) AS n FROM sales_promotion_coupon_item i JOIN sales_promotion_coupon c \
                 ON c.id = i.coupon_id WHERE c.coupon_name = 'expired'"
            )
            .await,
            0,
            "expired"
        );
        assert_eq!(status(&env, open.coupon_id).await.issued, want);
        assert_eq!(status(&env, limited.coupon_id).await.issued, 3_000);
        // No (coupon, user) pair twice, whatever the index says.
        assert_eq!(
            count(
                &env,
                "SELECT COUNT(*) AS n FROM (SELECT coupon_id, user_account_id FROM \
                 sales_promotion_coupon_item GROUP BY coupon_id, user_account_id HAVING COUNT(*) > 1) d"
            )
            .await,
            0
        );

        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// What goes wrong between two waves of logins.
enum Fault {
    /// Redis loses every key herald kept there.
    LostEverything,
    /// Redis loses the set of active coupons alone (eviction, a partial restore), with the
    /// periodic reload an hour away, so only the next login batch can notice.
    LostActiveSet,
    /// A node died mid-batch holding claims on the coupon's last 500 items, for users who do
    /// not log in again, which expire 3 s later.
    DeadNodesClaims,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_issues_nobody_twice() {
    logins_across("cpredis", Fault::LostEverything).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_the_active_set_alone_still_issues_every_login() {
    logins_across("cppartial", Fault::LostActiveSet).await;
}

/// Users who log in while claims in flight hold a limited coupon's last stock wait for those
/// claims (their events come back) instead of being turned away for good: once the dead
/// node's claims expire, they get the stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_wait_out_a_dead_nodes_claims_on_the_last_stock() {
    logins_across("cpdead", Fault::DeadNodesClaims).await;
}

/// 1,000 users hold a coupon of stock 1,500 when `fault` happens; then all 2,000 log in (or,
/// with a dead node's claims on users 1,501..2,000, the first 1,500): the 1,000 keep theirs,
/// 500 of the rest get the stock left, nobody gets two.
async fn logins_across(name: &str, fault: Fault) {
    let mut env = TestEnv::new(name).await.unwrap();
    if matches!(fault, Fault::LostActiveSet) {
        env.config.pipeline.coupon_sync_interval_ms = 3_600_000;
    }
    env.run_test(async {
        env.seed(2_000).await.unwrap();
        let (engine, _) = start(&env).await;
        let c = create(
            &env,
            &CreateCouponRequest {
                total: Some(1_500),
                ..coupon("survives a fault", CouponDelivery::Lazy)
            },
        )
        .await
        .unwrap();
        let first: Vec<Vec<u8>> = (1..=1_000).map(login_json).collect();
        env.publish_events(env.subjects().event_user_login(), first)
            .await
            .unwrap();
        assert!(wait_until(LONG, || async { items(&env, c.coupon_id).await >= 1_000 }).await);

        let redis =
            herald_engine::actors::markers::connect(&env.config.redis.url, Duration::from_secs(5))
                .await
                .unwrap();
        match fault {
            Fault::LostEverything => {
                herald_engine::actors::markers::delete_matching(
                    &redis,
                    &format!("{}:*", env.prefix),
                )
                .await
                .unwrap();
            }
            Fault::LostActiveSet => {
                let _: i64 = redis
                    .del(format!("{}:cp:active", env.prefix))
                    .await
                    .unwrap();
            }
            Fault::DeadNodesClaims => {
                let deadline = Utc::now().timestamp_millis() + 3_000;
                let claims: Vec<(String, String)> = (1_501..=2_000)
                    .map(|u| (u.to_string(), format!("dead-node:0|{deadline}")))
                    .collect();
                let _: i64 = fred::interfaces::HashesInterface::hset(
                    &redis,
                    format!("{}:cp:{}:claims", env.prefix, c.coupon_id),
                    claims,
                )
                .await
                .unwrap();
            }
        }
        let logins = match fault {
            Fault::DeadNodesClaims => 1..=1_500,
            _ => 1..=2_000,
        };
        let again: Vec<Vec<u8>> = logins.map(login_json).collect();
        env.publish_events(env.subjects().event_user_login(), again)
            .await
            .unwrap();
        assert!(
            wait_until(LONG, || async { items(&env, c.coupon_id).await >= 1_500 }).await,
            "the logins after the fault got the coupon's last 500 items"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let users = users_of(&env, c.coupon_id).await;
        assert_eq!(users.len(), 1_500, "never past the stock");
        assert_eq!(users.iter().collect::<HashSet<_>>().len(), 1_500);
        assert!((1..=1_000).all(|u| users.binary_search(&u).is_ok()));
        assert_eq!(status(&env, c.coupon_id).await.issued, 1_500);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_coupon_redis_cannot_activate_is_refused_and_a_repeat_activates_it() {
    let mut env = TestEnv::new("cpadd").await.unwrap();
    // No sync during the test: only the API's add can put the coupon in the list.
    env.config.pipeline.coupon_sync_interval_ms = 3_600_000;
    env.run_test(async {
        env.seed(100).await.unwrap();
        let (engine, _) = start(&env).await;
        let redis =
            herald_engine::actors::markers::connect(&env.config.redis.url, Duration::from_secs(5))
                .await
                .unwrap();
        // The list is loaded when its set holds the member `loaded`.
        let active = format!("{}:cp:active", env.prefix);
        let is_loaded = || async {
            let score: Option<f64> = redis.zscore(&active, "loaded").await.unwrap_or(None);
            score.is_some()
        };
        assert!(
            wait_until(LONG, is_loaded).await,
            "the node loaded the (empty) active list"
        );
        // The list's key holds a string, so Redis answers the add with WRONGTYPE.
        let _: () = redis
            .set(&active, "not a sorted set", None, None, false)
            .await
            .unwrap();

        let req = coupon("needs redis", CouponDelivery::Lazy);
        let err = create(&env, &req).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
        assert!(
            err.message.contains("repeat the request"),
            "{}",
            err.message
        );
        let saved = count(&env, "SELECT COUNT(*) AS n FROM sales_promotion_coupon").await;
        assert_eq!(saved, 1, "the coupon is saved, not lost");

        // The loaded, empty list again: only the repeat's add can put the coupon in it.
        let _: i64 = redis.del(&active).await.unwrap();
        let _: i64 = redis
            .zadd(&active, None, None, false, false, (f64::INFINITY, "loaded"))
            .await
            .unwrap();
        let again = create(&env, &req).await.unwrap();
        assert!(again.duplicate, "the repeat finds the saved coupon");

        let users: Vec<Vec<u8>> = (1..=100).map(login_json).collect();
        env.publish_events(env.subjects().event_user_login(), users)
            .await
            .unwrap();
        assert!(
            wait_until(LONG, || async { items(&env, again.coupon_id).await >= 100 }).await,
            "logins after the repeat get the coupon"
        );
        assert_eq!(status(&env, again.coupon_id).await.issued, 100);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_oversell_a_segment_coupon() {
    let env = TestEnv::new("cprace").await.unwrap();
    env.run_test(async {
        env.seed(2_000).await.unwrap();
        let (a, _) = start(&env).await;
        let (b, _) = start(&env).await;
        let c = create(
            &env,
            &CreateCouponRequest {
                total: Some(50),
                segment: Some(SegmentFilter::default()),
                ..coupon("fifty", CouponDelivery::Segment)
            },
        )
        .await
        .unwrap();

        let claims = (1..=400).map(|u| {
            let env = &env;
            async move { claim(env, c.coupon_id, u).await }
        });
        let results = futures::future::join_all(claims).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let sold_out = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.code == ErrorCode::SoldOut))
            .count();
        assert_eq!(
            (ok, sold_out),
            (50, 350),
            "{:?}",
            results.iter().find(|r| r.is_err())
        );
        assert_eq!(items(&env, c.coupon_id).await, 50);
        assert_eq!(status(&env, c.coupon_id).await.issued, 50);

        // A winner asking again gets the same item.
        let (winner, item) = results
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.as_ref().ok().map(|r| (i as i64 + 1, r.coupon_item_id)))
            .unwrap();
        let again = claim(&env, c.coupon_id, winner).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.coupon_item_id, item);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_coupon_pushes_exactly_the_segment_and_checks_claims() {
    let env = TestEnv::new("cpseg").await.unwrap();
    env.run_test(async {
        env.seed(5_000).await.unwrap();
        let (engine, ledger) = start(&env).await;
        let req = CreateCouponRequest {
            segment: Some(gold_members()),
            ..coupon("come back", CouponDelivery::Segment)
        };
        let c = create(&env, &req).await.unwrap();
        let campaign = c.campaign_id.expect("a segment coupon has a push campaign");
        let s = env.wait_completed(campaign, LONG).await.unwrap();

        let expected = env.gold_member_ids().await.unwrap();
        assert!(
            !expected.is_empty() && expected.len() < 5_000,
            "a real segment"
        );
        assert_eq!(s.sent as usize, expected.len());
        assert_eq!(ledger.duplicates(), 0);
        assert_eq!(ledger.total() as usize, expected.len());
        assert!(ledger
            .missing(campaign, expected.iter().copied())
            .is_empty());
        // Pushing gives nothing yet; a user in the segment claims, one outside cannot.
        assert_eq!(items(&env, c.coupon_id).await, 0);
        let inside = expected[0];
        let outside = (1..=5_000)
            .find(|u| expected.binary_search(u).is_err())
            .unwrap();
        let got = claim(&env, c.coupon_id, inside).await.unwrap();
        assert!(!got.duplicate);
        let e = claim(&env, c.coupon_id, outside).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotEligible, "{e:?}");
        let e = claim(&env, 999_999, inside).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(items(&env, c.coupon_id).await, 1);

        // A repeated create is recognised and points at the same campaign.
        let again = create(&env, &req).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(
            (again.coupon_id, again.campaign_id),
            (c.coupon_id, c.campaign_id)
        );
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_checks_the_validity_window() {
    let env = TestEnv::new("cpwin").await.unwrap();
    env.run_test(async {
        env.seed(100).await.unwrap();
        let (engine, _) = start(&env).await;
        let later = create(
            &env,
            &CreateCouponRequest {
                starts_at: Utc::now() + Span::days(1),
                segment: Some(SegmentFilter::default()),
                ..coupon("tomorrow", CouponDelivery::Segment)
            },
        )
        .await
        .unwrap();
        let e = claim(&env, later.coupon_id, 1).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotStarted, "{e:?}");
        // Age a claimable coupon past its end.
        let now = create(
            &env,
            &CreateCouponRequest {
                segment: Some(SegmentFilter::default()),
                ..coupon("ending", CouponDelivery::Segment)
            },
        )
        .await
        .unwrap();
        env.db
            .execute(Statement::from_string(
                env.db.get_database_backend(),
                format!(
                    "UPDATE sales_promotion_coupon SET activity_end_time = now() - interval '1 minute' \
                     WHERE id = {}",
                    now.coupon_id
                ),
            ))
            .await
            .unwrap();
        let e = claim(&env, now.coupon_id, 1).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Expired, "{e:?}");
        let lazy = create(&env, &coupon("lazy one", CouponDelivery::Lazy))
            .await
            .unwrap();
        let e = claim(&env, lazy.coupon_id, 1).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.starts_with("coupon_id:"), "{}", e.message);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_coupon_reaches_every_user_exactly_once() {
    let mut env = TestEnv::new("cpeager").await.unwrap();
    // Ten minutes between progress checks: the campaign completes within LONG only because
    // the node that records its last batch tells its supervisor at once.
    env.config.pipeline.progress_interval_ms = 600_000;
    env.run_test(async {
        env.seed(12_345).await.unwrap();
        let (a, ledger) = start(&env).await;
        let (b, _) = start(&env).await;
        let c = create(&env, &coupon("for everyone", CouponDelivery::Eager))
            .await
            .unwrap();
        let campaign = c.campaign_id.expect("an eager coupon has a campaign");
        let s = env.wait_completed(campaign, LONG).await.unwrap();
        assert_eq!((s.recipients, s.sent, s.skipped), (12_345, 12_345, 0));
        let users = users_of(&env, c.coupon_id).await;
        assert_eq!(users, (1..=12_345).collect::<Vec<i64>>());
        assert_eq!(status(&env, c.coupon_id).await.issued, 12_345);
        assert_eq!(ledger.total(), 0, "eager issuance pushes nothing");
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_cancel_releases_the_item_and_bad_events_are_dead_lettered() {
    let env = TestEnv::new("cpcancel").await.unwrap();
    env.run_test(async {
        env.seed(100).await.unwrap();
        let (engine, _) = start(&env).await;
        let c = create(
            &env,
            &CreateCouponRequest {
                segment: Some(SegmentFilter::default()),
                ..coupon("to use", CouponDelivery::Segment)
            },
        )
        .await
        .unwrap();
        let item = claim(&env, c.coupon_id, 7).await.unwrap().coupon_item_id;
        // The order system used it.
        env.db
            .execute(Statement::from_string(
                env.db.get_database_backend(),
                format!(
                    "UPDATE sales_promotion_coupon_item SET is_used = true, used_time = now() \
                     WHERE id = {item}"
                ),
            ))
            .await
            .unwrap();
        let used_sql = format!(
            "SELECT COUNT(*) AS n FROM sales_promotion_coupon_item WHERE id = {item} AND is_used"
        );
        assert_eq!(count(&env, &used_sql).await, 1);
        let cancel = |order_id, user_id, coupon_item_id| {
            encode(&OrderCanceled {
                order_id,
                user_id,
                coupon_item_id,
            })
            .unwrap()
        };
        let subjects = env.subjects();
        env.publish_events(
            subjects.event_order_canceled(),
            vec![cancel(1, 7, item), cancel(1, 7, item)],
        )
        .await
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || async {
                count(&env, &used_sql).await == 0
            })
            .await
        );

        // Unknown item, someone else's item, and garbage: dead letters with the reason.
        env.publish_events(
            subjects.event_order_canceled(),
            vec![cancel(2, 7, 424242), cancel(3, 8, item)],
        )
        .await
        .unwrap();
        env.publish_events(
            subjects.event_user_login(),
            vec![b"{\"user\":1}".to_vec(), b"\xc1garbage".to_vec()],
        )
        .await
        .unwrap();
        let letters = dead_letters(&env, 4).await;
        let mut reasons: Vec<String> = letters.iter().map(|l| l.reason.clone()).collect();
        reasons.sort();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("coupon item 424242 does not exist")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("does not belong to user 8")),
            "{reasons:?}"
        );
        assert_eq!(
            reasons
                .iter()
                .filter(|r| r.starts_with("undecodable login event"))
                .count(),
            2,
            "{reasons:?}"
        );
        assert_eq!(count(&env, &used_sql).await, 0, "still released");
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// `Store::issue` on both backends: the stock guard, the locked slow path and idempotence.
async fn issue_on(db: sea_orm::DatabaseConnection) {
    use herald_engine::actors::store::Store;
    herald_engine::engine::migrate(&db).await.unwrap();
    let store = Store::new(db);
    let now = Utc::now();
    let since = now - Span::minutes(30);
    let limited = CreateCouponRequest {
        total: Some(10),
        ..coupon("ten", CouponDelivery::Lazy)
    };
    let (ten, inserted) = store.insert_coupon(&limited, now, since).await.unwrap();
    assert!(inserted);
    assert_eq!(
        store.insert_coupon(&limited, now, since).await.unwrap(),
        (ten, false)
    );
    let (open, _) = store
        .insert_coupon(&coupon("open", CouponDelivery::Lazy), now, since)
        .await
        .unwrap();
    let pairs: Vec<(i64, i64)> = (1..=20).flat_map(|u| [(ten, u), (open, u)]).collect();
    let first = store.issue(&pairs, now, None).await.unwrap();
    assert_eq!(first.items.len(), 30, "10 limited + 20 open");
    assert_eq!(first.out_of_stock.len(), 10);
    assert!(first.out_of_stock.iter().all(|(c, _)| *c == ten));
    let again = store.issue(&pairs, now, None).await.unwrap();
    assert!(again.items.is_empty(), "nothing twice");
    assert_eq!(store.coupon(ten).await.unwrap().unwrap().issued, 10);
    assert_eq!(store.coupon(open).await.unwrap().unwrap().issued, 20);
    let active = store.active_lazy_coupons(now).await.unwrap();
    assert_eq!(
        active.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ten, open]
    );
}

#[tokio::test]
async fn issue_keeps_stock_and_idempotence_on_sqlite() {
    let db = herald_engine::engine::connect_db("sqlite::memory:", 1)
        .await
        .unwrap();
    issue_on(db).await;
}

#[tokio::test]
async fn issue_keeps_stock_and_idempotence_on_postgres() {
    let env = TestEnv::new("cpstore").await.unwrap();
    env.run_test(issue_on(env.db.clone())).await.unwrap();
}

/// Batches that run past a limited coupon's stock, while others do not, and twin batches
/// with the same pairs at once. Every writer locks its items, then its coupons in id order,
/// so none deadlocks. Two deadlocks were seen in the logins benchmark: a batch past the stock
/// locked the limited coupons first and the unlimited one (lower id) last; after that was
/// fixed, it still locked a coupon before inserting its items, and a batch holding one of
/// those items waited for that coupon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issues_past_the_stock_do_not_deadlock() {
    use herald_engine::actors::store::Store;
    let env = TestEnv::new("cpdeadlock").await.unwrap();
    env.run_test(async {
        let db = herald_engine::engine::connect_db(&env.config.database.url, 16)
            .await
            .unwrap();
        let store = Store::new(db);
        let now = Utc::now();
        let since = now - Span::minutes(30);
        // The unlimited coupon gets the lower id.
        let (open, _) = store
            .insert_coupon(&coupon("open", CouponDelivery::Lazy), now, since)
            .await
            .unwrap();
        let roomy = CreateCouponRequest {
            total: Some(1_000_000),
            ..coupon("roomy", CouponDelivery::Lazy)
        };
        let (roomy, _) = store.insert_coupon(&roomy, now, since).await.unwrap();
        let limited = CreateCouponRequest {
            total: Some(50),
            ..coupon("fifty", CouponDelivery::Lazy)
        };
        let (fifty, _) = store.insert_coupon(&limited, now, since).await.unwrap();
        let (tasks, batches, per_batch) = (16_i64, 12_i64, 10_i64);
        let mut running = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let store = store.clone();
            running.spawn(async move {
                let mut failed = Vec::new();
                for b in 0..batches {
                    // Tasks 2k and 2k + 1 are twins: the same batches at the same time.
                    let first = ((t / 2) * batches + b) * per_batch + 1;
                    let pairs: Vec<(i64, i64)> = (first..first + per_batch)
                        .flat_map(|u| [(open, u), (roomy, u), (fifty, u)])
                        .collect();
                    if let Err(e) = store.issue(&pairs, Utc::now(), None).await {
                        failed.push(e.to_string());
                    }
                }
                failed
            });
        }
        let mut failed = Vec::new();
        while let Some(f) = running.join_next().await {
            failed.extend(f.unwrap());
        }
        assert!(
            failed.is_empty(),
            "{} batches failed: {:?}",
            failed.len(),
            failed.first()
        );
        let users = tasks / 2 * batches * per_batch;
        assert_eq!(store.coupon(open).await.unwrap().unwrap().issued, users);
        assert_eq!(store.coupon(roomy).await.unwrap().unwrap().issued, users);
        assert_eq!(store.coupon(fifty).await.unwrap().unwrap().issued, 50);
        assert_eq!(items(&env, open).await, users);
        assert_eq!(items(&env, roomy).await, users);
        assert_eq!(items(&env, fifty).await, 50);
    })
    .await
    .unwrap();
}

/// A store on a pool of one connection, so that [`prepared_like`] reads the connection every
/// statement was prepared on, and the ids of lazy coupons named `names` made in it.
async fn one_connection_store(
    env: &TestEnv,
    names: &[&str],
) -> (herald_engine::actors::store::Store, Vec<i64>) {
    let db = herald_engine::engine::connect_db(&env.config.database.url, 1)
        .await
        .unwrap();
    let store = herald_engine::actors::store::Store::new(db);
    let now = Utc::now();
    let mut ids = Vec::new();
    for name in names {
        let (id, _) = store
            .insert_coupon(
                &coupon(name, CouponDelivery::Lazy),
                now,
                now - Span::minutes(30),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    (store, ids)
}

/// How many statements prepared on the store's one connection match each SQL `LIKE`
/// pattern.
async fn prepared_like(store: &herald_engine::actors::store::Store, patterns: &[&str]) -> Vec<i64> {
    use sea_orm::{DbBackend, TransactionTrait};
    #[derive(FromQueryResult)]
    struct Count {
        n: i64,
    }
    // The pool's only connection, the one every statement of the test prepared on.
    let txn = store.db().begin().await.unwrap();
    let mut counts = Vec::new();
    for pattern in patterns {
        let n = Count::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT COUNT(*) AS n FROM pg_prepared_statements WHERE statement LIKE $1",
            [(*pattern).into()],
        ))
        .one(&txn)
        .await
        .unwrap()
        .unwrap()
        .n;
        counts.push(n);
    }
    counts
}

/// Batches of any size issue their items with one statement text on PostgreSQL, so a
/// connection parses and plans it once. Each size had a text of its own (a VALUES list with
/// two parameters a pair); with one text, PostgreSQL's CPU in the logins benchmark fell by
/// 11–20% and logins/s rose by 7–13% (session 21, BENCHMARKS.md).
#[tokio::test]
async fn items_of_any_batch_size_share_one_prepared_insert() {
    let env = TestEnv::new("cponestmt").await.unwrap();
    env.run_test(async {
        let (store, ids) = one_connection_store(&env, &["sizes"]).await;
        let id = ids[0];
        let mut next = 1_i64;
        let sizes = [1_i64, 7, 500, 501, 1200];
        for n in sizes {
            let pairs: Vec<(i64, i64)> = (next..next + n).map(|u| (id, u)).collect();
            let issued = store.issue(&pairs, Utc::now(), None).await.unwrap();
            assert_eq!(issued.items.len() as i64, n);
            next += n;
        }
        let prepared = prepared_like(
            &store,
            &["WITH v (cid, uid)%INSERT INTO sales_promotion_coupon_item%"],
        )
        .await;
        assert_eq!(
            prepared,
            vec![1],
            "item inserts prepared for {sizes:?} pairs"
        );
        assert_eq!(items(&env, id).await, sizes.iter().sum::<i64>());
    })
    .await
    .unwrap();
}

/// A batch's coupon counts move in one statement on PostgreSQL, its coupons locked in id
/// order. Every batch of a login storm updates the same coupon rows and holds them until it
/// commits; with an `UPDATE` per coupon, five round trips in the logins benchmark, the
/// other batches waited 2.1 ms a statement for those locks.
#[tokio::test]
async fn a_batch_moves_its_coupons_counts_in_one_statement() {
    let env = TestEnv::new("cpcounts").await.unwrap();
    env.run_test(async {
        let (store, coupons) = one_connection_store(&env, &["a", "b", "c"]).await;
        let pairs: Vec<(i64, i64)> = (1..=40_i64)
            .flat_map(|u| coupons.iter().map(move |c| (*c, u)))
            .collect();
        let issued = store.issue(&pairs, Utc::now(), None).await.unwrap();
        assert_eq!(issued.items.len(), 120);
        let prepared = prepared_like(
            &store,
            &[
                "WITH k (id, n)%UPDATE sales_promotion_coupon%",
                "UPDATE sales_promotion_coupon SET coupon_received_count%",
            ],
        )
        .await;
        assert_eq!(
            prepared,
            vec![1, 0],
            "one count statement, no per-coupon update"
        );
        for id in coupons {
            assert_eq!(store.coupon(id).await.unwrap().unwrap().issued, 40);
        }
    })
    .await
    .unwrap();
}

//! A server killed mid-campaign and started again: nats-server (SIGKILL, same port and
//! store), PostgreSQL (an immediate shutdown, so the next start runs crash recovery) and
//! redis-server (SIGKILL; it keeps nothing on disk, so it comes back empty). The node
//! reconnects, its stages go on, and every user gets a push: exactly one after a NATS or
//! PostgreSQL outage; after Redis lost its markers, the batches in flight may be sent again,
//! and no more. While Redis is down, a create gets a clear error rather than waiting, and
//! works once Redis is back. The servers are the tests' own ([`NatsServer`], [`PgServer`],
//! [`RedisServer`]), never the shared ones.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use herald_engine::{
    providers::{SimulatedConfig, SimulatedProvider},
    schemas::ErrorCode,
    testkit::{promotion, wait_until, NatsServer, PgServer, RedisServer, TestEnv, TestServer},
    Engine,
};

const USERS: i64 = 20_000;
/// Push batches in flight on the node.
const PUSH_CONCURRENCY: usize = 4;
/// Users in flight: those batches of at most 100. After Redis lost its markers, these may be
/// sent again.
const IN_FLIGHT: u64 = PUSH_CONCURRENCY as u64 * 100;

/// Runs a 20,000-user campaign on `env`, calls `outage` (which takes a server down and
/// brings it back) once 2,000 users are pushed, and checks the campaign completes with
/// every user pushed, at most `repeats` of them twice.
async fn survives(env: &TestEnv, repeats: u64, outage: impl AsyncFnOnce()) {
    env.run_test(async {
        env.seed(USERS).await.unwrap();
        // 4 batches of 100 in flight at 100 ms: about 4,000 users/s, so the campaign is
        // mid-way when the server goes.
        let provider = Arc::new(SimulatedProvider::new(SimulatedConfig {
            latency_ms: 100,
            failure_rate: 0.0,
            permanent_failure_rate: 0.0,
        }));
        let ledger = provider.ledger();
        let mut config = env.config.clone();
        config.pipeline.push.concurrency = PUSH_CONCURRENCY;
        let engine = Engine::builder(config)
            .provider_for_all(provider)
            .start()
            .await
            .unwrap();
        let reply = env.create(&promotion("outage")).await.unwrap().unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || async {
                ledger.total() >= 2_000
            })
            .await,
            "the campaign got going"
        );

        let at_outage = ledger.total();
        outage().await;
        let back = Instant::now();
        let at_back = ledger.total();
        assert!(
            at_back < USERS as u64,
            "taken down mid-campaign (at {at_outage}, {at_back} when back)"
        );

        // The other 17,000 users take about 5 s; a stage that never went on would leave the
        // campaign running.
        let s = env
            .wait_completed(reply.campaign_id, Duration::from_secs(60))
            .await
            .unwrap();
        eprintln!(
            "{}: down at {at_outage} pushed, {at_back} when back; completed {:.1} s after, {} repeated",
            env.db_name(),
            back.elapsed().as_secs_f64(),
            ledger.duplicates()
        );
        assert!(
            ledger.duplicates() <= repeats,
            "at most {repeats} users got two pushes: {}",
            ledger.duplicates()
        );
        assert!(ledger.missing(reply.campaign_id, 1..=USERS).is_empty());
        assert_eq!(ledger.distinct(), USERS as u64);
        assert_eq!((s.sent, s.skipped, s.failed), (USERS, 0, 0));
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// A server of kind `S` of the test's own, crashed mid-campaign and started again after
/// `down` (see [`TestServer::crash`] for what a crash is to each), on an environment that
/// uses it; at most `repeats` users pushed twice.
async fn down_for<S: TestServer>(name: &str, down: Duration, repeats: u64) {
    let mut server = S::start().await.unwrap();
    let env = TestEnv::new_on(name, &server.servers()).await.unwrap();
    survives(&env, repeats, async || {
        server.crash().await;
        tokio::time::sleep(down).await;
        server.restart().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_campaign_loses_no_user() {
    down_for::<NatsServer>("natsrestart", Duration::from_millis(500), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_down_longer_than_a_pull_loses_no_user() {
    // Longer than a pull request lasts (5 s) with its heartbeats: every pull the engine had
    // waiting is gone when the server comes back.
    down_for::<NatsServer>("natsdown", Duration::from_secs(7), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashed_mid_campaign_loses_no_user() {
    // Within the push sender's in-place retries of a batch's settling (about 3 s).
    down_for::<PgServer>("pgcrash", Duration::from_secs(2), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_past_the_in_place_retries_loses_no_user() {
    // Longer than those retries, and than the tests' 5 s ack wait.
    down_for::<PgServer>("pgdown", Duration::from_secs(6), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_campaign_loses_no_user() {
    down_for::<RedisServer>("redisrestart", Duration::from_millis(500), IN_FLIGHT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_past_the_in_place_retries_loses_no_user() {
    // Longer than the push sender's in-place retries of a batch's settling (about 3 s) and
    // than the tests' 5 s ack wait.
    down_for::<RedisServer>("redisdown", Duration::from_secs(6), IN_FLIGHT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_while_redis_is_down_is_refused_and_goes_through_once_it_is_back() {
    let mut redis = RedisServer::start().await.unwrap();
    let env = TestEnv::new_on("redisapi", &redis.servers()).await.unwrap();
    env.run_test(async {
        env.seed(100).await.unwrap();
        let provider = Arc::new(SimulatedProvider::new(SimulatedConfig {
            latency_ms: 0,
            failure_rate: 0.0,
            permanent_failure_rate: 0.0,
        }));
        let ledger = provider.ledger();
        let mut config = env.config.clone();
        config.redis.command_timeout_ms = 1_000;
        let engine = Engine::builder(config)
            .provider_for_all(provider)
            .start()
            .await
            .unwrap();
        let request = promotion("while redis is down");

        redis.crash().await;
        let asked = Instant::now();
        let refused = env
            .create(&request)
            .await
            .expect("an answer within the request's 10 s")
            .expect_err("no create without the dedupe lock");
        eprintln!(
            "refused after {:.1} s: {}",
            asked.elapsed().as_secs_f64(),
            refused.message
        );
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert!(refused.message.contains("redis"), "{}", refused.message);

        redis.restart().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let created = loop {
            match env.create(&request).await.unwrap() {
                Ok(reply) => break reply,
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.code, ErrorCode::Unavailable, "{}", e.message);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("creates go through once Redis is back: {}", e.message),
            }
        };
        assert!(!created.duplicate, "the refused create left nothing behind");
        let again = env.create(&request).await.unwrap().unwrap();
        assert_eq!(
            (again.campaign_id, again.duplicate),
            (created.campaign_id, true)
        );
        env.wait_completed(created.campaign_id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(ledger.distinct(), 100);
        assert_eq!(ledger.duplicates(), 0);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

//! A server killed mid-campaign and started again on the same port and data: nats-server
//! (SIGKILL), and PostgreSQL (an immediate shutdown, so the next start runs crash recovery).
//! The node reconnects, its stages go on, and every user gets exactly one push. The servers
//! are the tests' own ([`NatsServer`], [`PgServer`]), never the shared ones.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use herald_engine::{
    config::Config,
    providers::{SimulatedConfig, SimulatedProvider},
    testkit::{pg_admin_url, promotion, wait_until, NatsServer, PgServer, TestEnv},
    Engine,
};

const USERS: i64 = 20_000;

/// Runs a 20,000-user campaign on `env`, calls `outage` (which takes a server down and
/// brings it back) once 2,000 users are pushed, and checks the campaign completes with
/// every user pushed exactly once.
async fn survives(env: &TestEnv, outage: impl AsyncFnOnce()) {
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
        config.pipeline.push.concurrency = 4;
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
            "{}: down at {at_outage} pushed, {at_back} when back; completed {:.1} s after",
            env.db_name(),
            back.elapsed().as_secs_f64()
        );
        assert_eq!(ledger.duplicates(), 0, "no user got two pushes");
        assert!(ledger.missing(reply.campaign_id, 1..=USERS).is_empty());
        assert_eq!(ledger.total(), USERS as u64);
        assert_eq!((s.sent, s.skipped, s.failed), (USERS, 0, 0));
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// nats-server killed, then started again after `down`.
async fn nats_down_for(name: &str, down: Duration) {
    let mut nats = NatsServer::start().await.unwrap();
    let env = TestEnv::new_on(name, &nats.url(), &pg_admin_url())
        .await
        .unwrap();
    survives(&env, async || {
        nats.kill();
        tokio::time::sleep(down).await;
        nats.restart().await.unwrap();
    })
    .await;
}

/// PostgreSQL crashed, then started again after `down`.
async fn postgres_down_for(name: &str, down: Duration) {
    let mut pg = PgServer::start().await.unwrap();
    let env = TestEnv::new_on(name, &Config::default().nats.url, &pg.url())
        .await
        .unwrap();
    survives(&env, async || {
        pg.crash();
        tokio::time::sleep(down).await;
        pg.restart().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_campaign_loses_no_user() {
    nats_down_for("natsrestart", Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_down_longer_than_a_pull_loses_no_user() {
    // Longer than a pull request lasts (5 s) with its heartbeats: every pull the engine had
    // waiting is gone when the server comes back.
    nats_down_for("natsdown", Duration::from_secs(7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashed_mid_campaign_loses_no_user() {
    // Within the push sender's in-place retries of a batch's settling (about 3 s).
    postgres_down_for("pgcrash", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_past_the_in_place_retries_loses_no_user() {
    // Longer than those retries, and than the tests' 5 s ack wait.
    postgres_down_for("pgdown", Duration::from_secs(6)).await;
}

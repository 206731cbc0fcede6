//! nats-server killed (SIGKILL) mid-campaign and started again on the same port and store:
//! the engine reconnects, its stage loops pull again, and the campaign completes with every
//! user pushed exactly once. The server is one of the test's own ([`NatsServer`]), never the
//! shared one.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{TimeZone, Utc};
use herald_engine::{
    providers::{SimulatedConfig, SimulatedProvider},
    schemas::{Audience, CampaignKind, CreateCampaignRequest, InformType},
    testkit::{wait_until, NatsServer, TestEnv},
    Engine,
};

const USERS: i64 = 20_000;

fn promo() -> CreateCampaignRequest {
    CreateCampaignRequest {
        kind: CampaignKind::Promotion,
        name: "nats restart".into(),
        created_by: "ops-7".into(),
        starts_at: Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap(),
        ends_at: Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap(),
        inform_type: InformType::App,
        title: "t".into(),
        body: "b".into(),
        audience: Audience::All,
    }
}

/// Kills the server once the campaign has pushed `going` users, keeps it down for `down`,
/// starts it again and checks the campaign ends with every user pushed once.
async fn restarted_mid_campaign(name: &str, down: Duration) {
    let mut server = NatsServer::start().await.unwrap();
    let env = TestEnv::new_on_nats(name, &server.url()).await.unwrap();
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
        let reply = env.create(&promo()).await.unwrap().unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || async {
                ledger.total() >= 2_000
            })
            .await,
            "the campaign got going"
        );

        server.kill();
        let at_kill = ledger.total();
        tokio::time::sleep(down).await;
        server.restart().await.unwrap();
        let restarted = Instant::now();
        let at_restart = ledger.total();
        assert!(
            at_restart < USERS as u64,
            "killed mid-campaign (at {at_kill}, {at_restart} when started again)"
        );

        // The other 17,000 users take about 5 s; a stage that never pulled again would
        // leave the campaign running.
        let s = env
            .wait_completed(reply.campaign_id, Duration::from_secs(60))
            .await
            .unwrap();
        eprintln!(
            "{name}: killed at {at_kill} pushed, {at_restart} when started again after {down:?}; \
             completed {:.1} s after the restart",
            restarted.elapsed().as_secs_f64()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_campaign_loses_no_user() {
    restarted_mid_campaign("natsrestart", Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_down_longer_than_a_pull_loses_no_user() {
    // Longer than a pull request lasts (5 s) with its heartbeats: every pull the engine had
    // waiting is gone when the server comes back.
    restarted_mid_campaign("natsdown", Duration::from_secs(7)).await;
}

//! End-to-end tests of a promotion push against the real NATS, Redis and PostgreSQL: every
//! user gets exactly one push, through retries, duplicates, poison messages and a restart.

use std::{collections::HashSet, sync::Arc, time::Duration};

use herald_engine::{
    config::Config,
    providers::{Ledger, ProviderConfig, SimulatedConfig, SimulatedProvider},
    schemas::{decode, Audience, CampaignState, CreateCampaignRequest, DeadLetter, SegmentFilter},
    testkit::{promotion, wait_until, SinkConfig, TestEnv, WebhookSink},
    Engine,
};
use sea_orm::{ConnectionTrait, FromQueryResult, Statement};

fn promo(name: &str) -> CreateCampaignRequest {
    CreateCampaignRequest {
        title: "Double 11 is on".into(),
        body: "Open the app for your deal".into(),
        ..promotion(name)
    }
}

/// A promotion for a segment nobody is in.
fn promo_to_nobody(name: &str) -> CreateCampaignRequest {
    CreateCampaignRequest {
        audience: Audience::Segment(SegmentFilter {
            min_points: Some(1_000_000_000),
            ..Default::default()
        }),
        ..promo(name)
    }
}

fn simulated(latency_ms: u64) -> Arc<SimulatedProvider> {
    Arc::new(SimulatedProvider::new(SimulatedConfig {
        latency_ms,
        failure_rate: 0.0,
        permanent_failure_rate: 0.0,
    }))
}

const LONG: Duration = Duration::from_secs(120);

/// A node on the environment whose app channel posts to `sink`.
async fn start_webhook(env: &TestEnv, sink: &WebhookSink) -> Engine {
    let mut config = env.config.clone();
    config.providers.app = ProviderConfig::Webhook {
        url: sink.url(),
        timeout_ms: 2000,
        max_connections: 64,
    };
    Engine::start(config).await.unwrap()
}

/// A node on the environment with a simulated provider for every channel, and its ledger.
async fn start_simulated(env: &TestEnv, latency_ms: u64) -> (Engine, Ledger) {
    start_simulated_on(env.config.clone(), latency_ms).await
}

/// A node with `config` and a simulated provider for every channel, and its ledger.
async fn start_simulated_on(config: Config, latency_ms: u64) -> (Engine, Ledger) {
    let provider = simulated(latency_ms);
    let ledger = provider.ledger();
    let engine = Engine::builder(config)
        .provider_for_all(provider)
        .start()
        .await
        .unwrap();
    (engine, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_users_get_exactly_one_push_each() {
    let env = TestEnv::new("tenk").await.unwrap();
    env.run_test(async {
        env.seed(10_000).await.unwrap();
        let (engine, ledger) = start_simulated(&env, 1).await;

        let reply = env.create(&promo("Double 11")).await.unwrap().unwrap();
        assert!(reply.ok && !reply.duplicate);
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();

        assert_eq!(ledger.total(), 10_000, "pushes received");
        assert_eq!(ledger.distinct(), 10_000);
        assert_eq!(ledger.duplicates(), 0);
        assert!(ledger.missing(reply.campaign_id, 1..=10_000).is_empty());
        assert_eq!((s.buckets_total, s.buckets_done), (10, 10));
        assert_eq!(
            (s.recipients, s.sent, s.skipped, s.failed),
            (10_000, 10_000, 0, 0)
        );
        assert!(s.started_at.is_some() && s.finished_at.is_some());
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

// A campaign is finished by the record that completes it (or, for an empty audience, by
// the sharder), not at the supervisor's next periodic check: here that check is ten minutes
// away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_complete_without_waiting_for_the_progress_check() {
    let env = TestEnv::new("prompt").await.unwrap();
    env.run_test(async {
        env.seed(3_000).await.unwrap();
        let mut config = env.config.clone();
        config.pipeline.progress_interval_ms = 600_000;
        let (engine, ledger) = start_simulated_on(config, 0).await;
        let everyone = env.create(&promo("everyone")).await.unwrap().unwrap();
        let nobody = env
            .create(&promo_to_nobody("nobody"))
            .await
            .unwrap()
            .unwrap();
        let within = Duration::from_secs(30);
        let s = env
            .wait_completed(everyone.campaign_id, within)
            .await
            .unwrap();
        assert_eq!((s.recipients, s.sent), (3_000, 3_000));
        assert_eq!(ledger.distinct(), 3_000);
        let s = env
            .wait_completed(nobody.campaign_id, within)
            .await
            .unwrap();
        assert_eq!((s.buckets_total, s.recipients, s.sent), (0, 0, 0));
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_exactly_once_through_429_and_503() {
    let env = TestEnv::new("flaky").await.unwrap();
    env.run_test(async {
        env.seed(5_000).await.unwrap();
        let sink = WebhookSink::start(SinkConfig {
            fail_503_rate: 0.15,
            fail_429_rate: 0.10,
            ..Default::default()
        })
        .await
        .unwrap();
        let engine = start_webhook(&env, &sink).await;

        let reply = env.create(&promo("flaky gateway")).await.unwrap().unwrap();
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();

        assert!(
            sink.failures_503() > 0 && sink.failures_429() > 0,
            "failures were injected"
        );
        assert_eq!(sink.delivered_total(), 5_000, "successful pushes");
        assert_eq!(sink.duplicates(), 0);
        assert!(sink.missing(reply.campaign_id, 1..=5_000).is_empty());
        assert_eq!(
            (s.recipients, s.sent, s.skipped, s.failed),
            (5_000, 5_000, 0, 0)
        );
        engine.shutdown().await.unwrap();
        sink.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_4xx_is_recorded_as_failed_and_not_retried() {
    let env = TestEnv::new("perm").await.unwrap();
    env.run_test(async {
        env.seed(1_000).await.unwrap();
        let rejected: HashSet<i64> = [5, 17, 999].into_iter().collect();
        let sink = WebhookSink::start(SinkConfig {
            reject_user_ids: rejected.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let engine = start_webhook(&env, &sink).await;

        let reply = env.create(&promo("some rejected")).await.unwrap().unwrap();
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();

        assert_eq!((s.recipients, s.sent, s.failed), (1_000, 997, 3));
        assert_eq!(
            sink.rejected(),
            3,
            "each rejected user was tried once, not retried"
        );
        assert_eq!(sink.delivered_total(), 997);
        #[derive(FromQueryResult)]
        struct Failure {
            user_id: i64,
            reason: String,
        }
        let rows = Failure::find_by_statement(Statement::from_string(
            env.db.get_database_backend(),
            format!(
                "SELECT user_id, reason FROM campaign_failure WHERE campaign_id = {} ORDER BY user_id",
                reply.campaign_id
            ),
        ))
        .all(&env.db)
        .await
        .unwrap();
        assert_eq!(
            rows.iter().map(|r| r.user_id).collect::<Vec<_>>(),
            vec![5, 17, 999]
        );
        assert!(
            rows.iter().all(|r| r.reason.contains("400")),
            "reason names the status"
        );
        engine.shutdown().await.unwrap();
        sink.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_sends_nothing_more() {
    let env = TestEnv::new("dup").await.unwrap();
    env.run_test(async {
        env.seed(2_000).await.unwrap();
        let (engine, ledger) = start_simulated(&env, 0).await;

        let req = promo("once only");
        let first = env.create(&req).await.unwrap().unwrap();
        env.wait_completed(first.campaign_id, LONG).await.unwrap();
        assert_eq!(ledger.total(), 2_000);

        let mut again = req.clone();
        again.title = "a different title does not make it new".into();
        let second = env.create(&again).await.unwrap().unwrap();
        assert_eq!(second.campaign_id, first.campaign_id);
        assert!(second.duplicate);
        // The same request as MessagePack is the same campaign too.
        let third: herald_engine::schemas::CreateCampaignReply = herald_engine::api::request(
            &env.nats,
            env.subjects().api_campaign_create(),
            herald_engine::schemas::Encoding::MsgPack,
            &req,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            (third.campaign_id, third.duplicate),
            (first.campaign_id, true)
        );

        // Re-announcing the campaign (a duplicate CampaignCreated) sends nothing either.
        let epoch = herald_actors::store::Store::new(env.db.clone())
            .campaign(first.campaign_id)
            .await
            .unwrap()
            .unwrap()
            .epoch;
        herald_actors::sharder::announce(
            &async_nats::jetstream::new(env.nats.clone()),
            &env.subjects(),
            first.campaign_id,
            epoch,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ledger.total(), 2_000, "nothing more was sent");
        assert_eq!(ledger.duplicates(), 0);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_do_not_block() {
    let env = TestEnv::new("poison").await.unwrap();
    env.run_test(async {
        env.seed(3_000).await.unwrap();
        let (engine, ledger) = start_simulated(&env, 0).await;
        let js = async_nats::jetstream::new(env.nats.clone());
        let subjects = env.subjects();

        let reply = env.create(&promo("poisoned")).await.unwrap().unwrap();
        let id = reply.campaign_id;
        // Garbage on the push and bucket subjects of the running campaign.
        js.publish(subjects.push(id), "not msgpack".into())
            .await
            .unwrap()
            .await
            .unwrap();
        js.publish(subjects.bucket(id), vec![0xc1u8, 0x00].into())
            .await
            .unwrap()
            .await
            .unwrap();
        // And on the campaigns stream, which one sharder consumer reads for every campaign.
        js.publish(subjects.campaign_created(id + 1_000_000), "junk".into())
            .await
            .unwrap()
            .await
            .unwrap();

        let s = env.wait_completed(id, LONG).await.unwrap();
        assert_eq!(s.sent, 3_000);
        assert_eq!(ledger.total(), 3_000);

        let mut dl = js.get_stream(subjects.dead_letter_stream()).await.unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let mut dl = dl.clone();
                async move { dl.info().await.map(|i| i.state.messages).unwrap_or(0) >= 3 }
            })
            .await
        );
        assert_eq!(dl.info().await.unwrap().state.messages, 3);
        let mut reasons = Vec::new();
        for seq in 1..=3 {
            let m = dl.get_raw_message(seq).await.unwrap();
            let letter: DeadLetter = decode(&m.payload).unwrap();
            reasons.push(letter.reason.clone());
            assert!(!letter.payload.is_empty(), "the original payload is kept");
        }
        reasons.sort();
        assert!(
            reasons[0].starts_with("undecodable BucketTask"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("undecodable CampaignCreated"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].starts_with("undecodable PushBatch"),
            "{reasons:?}"
        );
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// Runs a 10,000-user campaign on a node with a `latency_ms` provider and `concurrency` push
/// batches until `going` users got their push, hands that node to `stop` (with the ledger
/// and the campaign id), then finishes the campaign on a second node and checks that every
/// user got exactly one push across both. One provider (one ledger) serves both nodes, as
/// one real gateway would.
async fn interrupted_then_finished<F>(
    name: &str,
    latency_ms: u64,
    concurrency: usize,
    going: u64,
    stop: F,
) where
    F: AsyncFnOnce(Engine, &Ledger, &TestEnv, i64),
{
    let env = TestEnv::new(name).await.unwrap();
    env.run_test(async {
        env.seed(10_000).await.unwrap();
        let provider = simulated(latency_ms);
        let ledger = provider.ledger();
        let mut config = env.config.clone();
        config.pipeline.push.concurrency = concurrency;
        let first = Engine::builder(config.clone())
            .provider_for_all(provider.clone())
            .start()
            .await
            .unwrap();
        let reply = env.create(&promo(name)).await.unwrap().unwrap();
        assert!(
            wait_until(LONG, || async { ledger.total() >= going }).await,
            "the campaign got going"
        );
        stop(first, &ledger, &env, reply.campaign_id).await;

        let second = Engine::builder(config)
            .provider_for_all(provider)
            .start()
            .await
            .unwrap();
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();
        assert_eq!(ledger.duplicates(), 0, "no user got two pushes");
        assert_eq!(ledger.total(), 10_000);
        assert_eq!(s.sent + s.skipped, 10_000);
        assert_eq!(
            s.sent, 10_000,
            "sent counts each user once across both runs"
        );
        second.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_mid_campaign_and_restarted_ends_exactly_once() {
    interrupted_then_finished(
        "restart",
        20,
        8,
        2_000,
        async |first, ledger, env, campaign_id| {
            first.shutdown().await.unwrap();
            let at_stop = ledger.total();
            assert!(at_stop < 10_000, "stopped mid-campaign (at {at_stop})");
            let store = herald_actors::store::Store::new(env.db.clone());
            let row = store.status(campaign_id).await.unwrap().unwrap();
            assert_eq!(row.status, CampaignState::Running.as_str());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_dropped_mid_campaign_stops_sending_and_loses_nothing() {
    // About 1,000 users/s: the campaign is still running when the engine is dropped.
    interrupted_then_finished("dropped", 200, 2, 500, async |first, ledger, _, _| {
        drop(first);
        // In-flight batches may finish; after that nothing more is sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut seen = ledger.total();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = ledger.total();
            if now == seen {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the dropped engine kept sending ({now})"
            );
            seen = now;
        }
        assert!(seen < 10_000, "the dropped engine finished the campaign");
    })
    .await;
}

/// Regression: every campaign used to create (and later delete) three consumers on every
/// node, an empty audience too, which held a node to 50-165 new campaigns a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_audience_completes_without_consumers_of_its_own() {
    let env = TestEnv::new("emptyaud").await.unwrap();
    env.run_test(async {
        use futures::StreamExt;
        env.seed(2_000).await.unwrap();
        // The server announces every consumer it creates on these streams.
        let s = env.subjects();
        let mut created = Vec::new();
        for stream in [s.campaigns_stream(), s.buckets_stream(), s.push_stream()] {
            let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream}.*");
            created.push(env.nats.subscribe(subject).await.unwrap());
        }
        let mut created = futures::stream::select_all(created);
        env.nats.flush().await.unwrap();
        let (engine, ledger) = start_simulated(&env, 0).await;

        let empty = env
            .create(&promo_to_nobody("nobody"))
            .await
            .unwrap()
            .unwrap();
        let s_empty = env.wait_completed(empty.campaign_id, LONG).await.unwrap();
        assert_eq!((s_empty.buckets_total, s_empty.recipients), (0, 0));
        // A campaign with an audience gets its stages, so the advisories are seen.
        let all = env.create(&promo("everyone")).await.unwrap().unwrap();
        env.wait_completed(all.campaign_id, LONG).await.unwrap();
        assert_eq!(ledger.total(), 2_000);

        let mut names = Vec::new();
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(500), created.next()).await
        {
            names.push(
                msg.subject
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        let p = s.prefix().replace('.', "_");
        names.sort();
        assert_eq!(
            names,
            vec![
                format!("{p}_expand_{}", all.campaign_id),
                format!("{p}_push_{}", all.campaign_id),
                format!("{p}_shard"),
            ],
            "consumers created: one sharder for the node, stages only for the campaign with users"
        );
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

// The API announces the campaigns created within a few milliseconds of each other in one
// stream message each 16 (`sharder::ANNOUNCE_MAX`), and the sharder runs every campaign a
// message names: here campaigns with users and campaigns without, mixed in one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_created_together_share_announcements_and_all_run() {
    let env = TestEnv::new("together").await.unwrap();
    env.run_test(async {
        env.seed(300).await.unwrap();
        let (engine, ledger) = start_simulated(&env, 0).await;
        let requests: Vec<CreateCampaignRequest> = (0..40)
            .map(|i| match i % 2 {
                0 => promo(&format!("together {i}")),
                _ => promo_to_nobody(&format!("together {i}")),
            })
            .collect();
        let replies = futures::future::join_all(requests.iter().map(|r| env.create(r))).await;
        let ids: Vec<i64> = replies
            .into_iter()
            .map(|r| r.unwrap().unwrap().campaign_id)
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let s = env.wait_completed(*id, LONG).await.unwrap();
            let users = if i % 2 == 0 { 300 } else { 0 };
            assert_eq!((s.recipients, s.sent), (users, users), "campaign {i}");
            if users > 0 {
                assert!(ledger.missing(*id, 1..=300).is_empty(), "campaign {i}");
            }
        }
        assert_eq!(ledger.total(), 20 * 300);
        assert_eq!(ledger.duplicates(), 0);

        let js = async_nats::jetstream::new(env.nats.clone());
        let s = env.subjects();
        let mut campaigns = js.get_stream(s.campaigns_stream()).await.unwrap();
        let messages = campaigns.info().await.unwrap().state.messages;
        assert!(
            (3..=20).contains(&messages),
            "40 campaigns created together were announced in {messages} messages"
        );
        let mut dl = js.get_stream(s.dead_letter_stream()).await.unwrap();
        assert_eq!(dl.info().await.unwrap().state.messages, 0);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_campaign_reaches_exactly_the_segment() {
    let env = TestEnv::new("segment").await.unwrap();
    env.run_test(async {
        env.seed(5_000).await.unwrap();
        let (engine, ledger) = start_simulated(&env, 0).await;
        let mut req = promo("gold members");
        req.audience = Audience::Segment(herald_engine::testkit::gold_members());
        let reply = env.create(&req).await.unwrap().unwrap();
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();

        let expected = env.gold_member_ids().await.unwrap();
        assert!(
            expected.len() > 100 && expected.len() < 5_000,
            "a real subset: {}",
            expected.len()
        );
        assert_eq!(s.recipients, expected.len() as i64);
        assert_eq!(ledger.total(), expected.len() as u64);
        assert!(ledger
            .missing(reply.campaign_id, expected.iter().copied())
            .is_empty());
        assert_eq!(ledger.duplicates(), 0);
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_a_campaign_and_send_once() {
    let env = TestEnv::new("twonodes").await.unwrap();
    env.run_test(async {
        env.seed(20_000).await.unwrap();
        // One gateway (one ledger) behind both nodes.
        let provider = simulated(5);
        let ledger = provider.ledger();
        let mut a = env.config.clone();
        a.node.id = "node-a".into();
        let mut b = env.config.clone();
        b.node.id = "node-b".into();
        let node_a = Engine::builder(a)
            .provider_for_all(provider.clone())
            .start()
            .await
            .unwrap();
        let node_b = Engine::builder(b)
            .provider_for_all(provider)
            .start()
            .await
            .unwrap();

        let reply = env.create(&promo("two nodes")).await.unwrap().unwrap();
        // Both nodes run a supervisor for the campaign while it is going.
        let both = wait_until(Duration::from_secs(10), || async {
            node_a
                .running_campaigns()
                .await
                .unwrap_or_default()
                .contains(&reply.campaign_id)
                && node_b
                    .running_campaigns()
                    .await
                    .unwrap_or_default()
                    .contains(&reply.campaign_id)
        })
        .await;
        let s = env.wait_completed(reply.campaign_id, LONG).await.unwrap();
        assert!(both, "both nodes took part");
        assert_eq!(ledger.total(), 20_000);
        assert_eq!(ledger.duplicates(), 0);
        assert_eq!((s.recipients, s.sent), (20_000, 20_000));
        // Once completed, no supervisor is left on either node.
        assert!(
            wait_until(Duration::from_secs(10), || async {
                node_a
                    .running_campaigns()
                    .await
                    .unwrap_or_default()
                    .is_empty()
                    && node_b
                        .running_campaigns()
                        .await
                        .unwrap_or_default()
                        .is_empty()
            })
            .await
        );
        // And no consumer of the campaign is left behind on the server: only the sharder's,
        // which every node shares for every campaign.
        let js = async_nats::jetstream::new(env.nats.clone());
        let subjects = env.subjects();
        let shard = herald_actors::event_worker::event_durable(subjects.prefix(), "shard");
        for (stream, keep) in [
            (subjects.campaigns_stream(), vec![shard]),
            (subjects.buckets_stream(), vec![]),
            (subjects.push_stream(), vec![]),
        ] {
            let stream = js.get_stream(&stream).await.unwrap();
            let left = wait_until(Duration::from_secs(10), || {
                let (stream, keep) = (stream.clone(), keep.clone());
                async move {
                    use futures::TryStreamExt;
                    let names: Vec<String> = stream
                        .consumer_names()
                        .try_collect()
                        .await
                        .unwrap_or_default();
                    names == keep
                }
            })
            .await;
            assert!(
                left,
                "consumers of {} deleted",
                stream.cached_info().config.name
            );
        }
        node_a.shutdown().await.unwrap();
        node_b.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_database_reusing_campaign_ids_still_reaches_everyone() {
    // Both exist from the start, so that one run removes both whatever fails.
    let [old, new] = TestEnv::new_all(["epoch1", "epoch2"]).await.unwrap();
    TestEnv::run_test_on(&[&new, &old], async {
        // First life: campaign 1 runs to completion, leaving its messages in the streams and
        // its markers in Redis.
        old.seed(2_000).await.unwrap();
        let (engine, _) = start_simulated(&old, 0).await;
        let first = old.create(&promo("first life")).await.unwrap().unwrap();
        old.wait_completed(first.campaign_id, LONG).await.unwrap();
        engine.shutdown().await.unwrap();

        // Second life: a fresh database (ids start again at 1) on the same streams and Redis.
        new.seed(3_000).await.unwrap();
        let mut config = new.config.clone();
        config.nats.prefix = old.prefix.clone();
        let (engine, ledger) = start_simulated_on(config, 0).await;
        let reply: herald_engine::schemas::CreateCampaignReply = herald_engine::api::request(
            &new.nats,
            old.subjects().api_campaign_create(),
            herald_engine::schemas::Encoding::Json,
            &promo("second life"),
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(reply.campaign_id, first.campaign_id, "the id is reused");
        let store = herald_actors::store::Store::new(new.db.clone());
        assert!(
            wait_until(LONG, || async {
                store
                    .status(reply.campaign_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == "completed")
            })
            .await
        );
        let row = store.status(reply.campaign_id).await.unwrap().unwrap();
        assert_eq!(
            ledger.total(),
            3_000,
            "no user skipped for the old campaign's markers"
        );
        assert_eq!(ledger.duplicates(), 0);
        assert_eq!((row.recipients, row.sent, row.skipped), (3_000, 3_000, 0));
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

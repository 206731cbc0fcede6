//! The NATS API as an outside client sees it: raw JSON and MessagePack requests, the exact
//! reply shapes, and clear errors for bad input while the node keeps serving.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use herald_engine::{testkit::TestEnv, Engine};
use serde_json::{json, Value};

async fn raw(env: &TestEnv, subject: String, body: Vec<u8>, msgpack: bool) -> (Value, String) {
    let mut headers = HeaderMap::new();
    if msgpack {
        headers.insert("Content-Type", "application/msgpack");
    }
    let started = Instant::now();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        env.nats.request_with_headers(subject, headers, body.into()),
    )
    .await
    .expect("a reply within 5 s")
    .expect("a reply");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "replied within a second"
    );
    let ct = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Content-Type"))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    let v: Value = if msgpack {
        rmp_serde::from_slice(&msg.payload).expect("msgpack reply")
    } else {
        serde_json::from_slice(&msg.payload).expect("json reply")
    };
    (v, ct)
}

fn good() -> Value {
    json!({"kind":"promotion","name":"Double 11","created_by":"ops-7",
        "starts_at":"2026-11-21T00:00:00Z","ends_at":"2026-11-28T00:00:00Z",
        "inform_type":"app","title":"Double 11 is on","body":"Open the app for your deal",
        "audience":{"type":"all"}})
}

fn with(field: &str, value: Value) -> Vec<u8> {
    let mut v = good();
    v[field] = value;
    serde_json::to_vec(&v).unwrap()
}

fn without(field: &str) -> Vec<u8> {
    let mut v = good();
    v.as_object_mut().unwrap().remove(field);
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors_and_the_node_keeps_serving() {
    let env = TestEnv::new("api").await.unwrap();
    env.run_test(async {
        env.seed(10).await.unwrap();
        let mut config = env.config.clone();
        config
            .providers
            .set_all(herald_engine::providers::ProviderConfig::Simulated {
                latency_ms: 0,
                failure_rate: 0.0,
                permanent_failure_rate: 0.0,
            });
        let engine = Engine::start(config).await.unwrap();
        let create = env.subjects().api_campaign_create();

        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "malformed json"),
            (b"".to_vec(), "malformed json"),
            (b"42".to_vec(), "request: invalid type: integer `42`"),
            (without("title"), "title: missing field"),
            (without("ends_at"), "ends_at: missing field"),
            (with("name", json!(42)), "name: invalid type"),
            (with("starts_at", json!("yesterday")), "starts_at:"),
            (
                with("ends_at", json!("2026-11-20T00:00:00Z")),
                "ends_at: must be after starts_at",
            ),
            (
                with("inform_type", json!("pigeon")),
                "inform_type: unknown variant `pigeon`",
            ),
            (
                with("kind", json!("lottery")),
                "kind: unknown variant `lottery`",
            ),
            (with("title", json!("  ")), "title: must not be empty"),
            (with("body", json!("x".repeat(5000))), "body: too long"),
            (with("audience", json!({"type":"martians"})), "audience"),
            (with("surprise", json!(1)), "unknown field `surprise`"),
        ];
        for (body, expected) in cases {
            let (v, ct) = raw(&env, create.clone(), body.clone(), false).await;
            assert_eq!(ct, "application/json");
            assert_eq!(v["ok"], json!(false), "{v}");
            assert_eq!(v["error"]["code"], json!("invalid_request"), "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(expected),
                "for {}: expected {expected:?} in {message:?}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(80)
                    .collect::<String>()
            );
        }

        // MessagePack: garbage, a wrong type, and a good request answered in MessagePack.
        let (v, ct) = raw(&env, create.clone(), vec![0xc1, 0x00, 0x13], true).await;
        assert_eq!(ct, "application/msgpack");
        assert_eq!(v["error"]["code"], json!("invalid_request"));
        let mut bad = good();
        bad["title"] = json!(7);
        let (v, _) = raw(
            &env,
            create.clone(),
            rmp_serde::to_vec_named(&bad).unwrap(),
            true,
        )
        .await;
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("title: invalid type"),
            "{v}"
        );
        let (v, ct) = raw(
            &env,
            create.clone(),
            rmp_serde::to_vec_named(&good()).unwrap(),
            true,
        )
        .await;
        assert_eq!(ct, "application/msgpack");
        assert_eq!(v["ok"], json!(true), "{v}");
        assert_eq!(v["duplicate"], json!(false));
        let id = v["campaign_id"].as_i64().unwrap();

        // After all that the node still serves JSON, and knows the campaign.
        let (v, _) = raw(
            &env,
            create.clone(),
            serde_json::to_vec(&good()).unwrap(),
            false,
        )
        .await;
        assert_eq!(v, json!({"ok": true, "campaign_id": id, "duplicate": true}));
        env.wait_completed(id, Duration::from_secs(60))
            .await
            .unwrap();

        let status = env.subjects().api_campaign_status();
        let (v, _) = raw(
            &env,
            status.clone(),
            serde_json::to_vec(&json!({"campaign_id": id})).unwrap(),
            false,
        )
        .await;
        assert_eq!(v["status"], json!("completed"), "{v}");
        for key in [
            "buckets_total",
            "buckets_done",
            "recipients",
            "sent",
            "skipped",
            "failed",
            "started_at",
            "finished_at",
        ] {
            assert!(v.get(key).is_some(), "status has {key}: {v}");
        }
        assert_eq!(
            (v["recipients"].as_i64(), v["sent"].as_i64()),
            (Some(10), Some(10))
        );
        let (v, _) = raw(
            &env,
            status.clone(),
            serde_json::to_vec(&json!({"campaign_id": 987654})).unwrap(),
            false,
        )
        .await;
        assert_eq!(v["ok"], json!(false));
        assert_eq!(v["error"]["code"], json!("not_found"));
        let (v, _) = raw(&env, status, b"{\"campaign_id\":\"x\"}".to_vec(), false).await;
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("campaign_id: invalid type"),
            "{v}"
        );

        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_still_a_duplicate_after_redis_lost_its_data() {
    let env = TestEnv::new("apiredis").await.unwrap();
    env.run_test(async {
        let mut config = env.config.clone();
        config.node.run_pipeline = false; // only the API matters here
        let engine = Engine::start(config).await.unwrap();
        let create = env.subjects().api_campaign_create();

        let (first, _) = raw(
            &env,
            create.clone(),
            serde_json::to_vec(&good()).unwrap(),
            false,
        )
        .await;
        assert_eq!(first["duplicate"], json!(false));
        // Redis forgets every dedupe key (a flush, a failover without persistence), once the
        // API has recorded the id there.
        let redis = herald_actors::markers::connect(&env.config.redis.url, Duration::from_secs(5))
            .await
            .unwrap();
        let pattern = format!("{}:dedupe:*", env.prefix);
        let recorded = herald_engine::testkit::wait_until(Duration::from_secs(5), || {
            let (redis, pattern) = (redis.clone(), pattern.clone());
            async move {
                use fred::interfaces::{ClientLike, KeysInterface};
                let keys: Vec<String> = redis
                    .custom(fred::cmd!("KEYS"), vec![pattern])
                    .await
                    .unwrap();
                let Some(key) = keys.first() else {
                    return false;
                };
                let v: Option<String> = redis.get(key).await.unwrap();
                v.is_some_and(|v| v != "pending")
            }
        })
        .await;
        assert!(recorded);
        herald_actors::markers::delete_matching(&redis, &format!("{}:dedupe:*", env.prefix))
            .await
            .unwrap();
        let (again, _) = raw(&env, create, serde_json::to_vec(&good()).unwrap(), false).await;
        assert_eq!(again["campaign_id"], first["campaign_id"]);
        assert_eq!(
            again["duplicate"],
            json!(true),
            "the database remembered it"
        );
        engine.shutdown().await.unwrap();
    })
    .await
    .unwrap();
}

/// Sends one create from a thread and runtime of its own (an outside client), while the
/// caller blocks its own thread; returns the reply, or None after `wait`.
fn create_from_another_thread(
    url: String,
    subject: String,
    name: &str,
    wait: Duration,
) -> std::thread::JoinHandle<Option<Value>> {
    let mut body = good();
    body["name"] = json!(name);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let nats = async_nats::connect(url).await.unwrap();
            let payload = serde_json::to_vec(&body).unwrap();
            let reply = tokio::time::timeout(wait, nats.request(subject, payload.into())).await;
            reply
                .ok()
                .map(|r| serde_json::from_slice(&r.unwrap().payload).unwrap())
        })
    })
}

// The engine's runtime is blocked outright here, the extreme of a runtime whose workers are
// all busy with pipeline tasks: the API on its own thread still answers; on the engine's
// runtime (api.own_thread = false) it cannot.
#[tokio::test]
async fn the_api_answers_while_the_engines_runtime_is_busy() {
    let env = TestEnv::new("apithread").await.unwrap();
    env.run_test(async {
        let create = env.subjects().api_campaign_create();
        for own_thread in [true, false] {
            let mut config = env.config.clone();
            config.node.run_pipeline = false;
            config.api.own_thread = own_thread;
            let engine = Engine::start(config).await.unwrap();
            let requester = create_from_another_thread(
                env.config.nats.url.clone(),
                create.clone(),
                &format!("busy runtime {own_thread}"),
                Duration::from_secs(2),
            );
            // Blocks this test's single-threaded runtime, the one the engine runs on.
            std::thread::sleep(Duration::from_secs(3));
            let reply = requester.join().unwrap();
            if own_thread {
                let reply = reply.expect("a reply while the engine's runtime was blocked");
                assert_eq!(reply["ok"], json!(true), "{reply}");
            } else {
                assert!(
                    reply.is_none(),
                    "on the engine's runtime the API cannot answer while it is blocked: {reply:?}"
                );
            }
            engine.shutdown().await.unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_dropped_without_shutdown_stops_answering() {
    let env = TestEnv::new("apidrop").await.unwrap();
    env.run_test(async {
        let mut config = env.config.clone();
        config.node.run_pipeline = false;
        let engine = Engine::start(config).await.unwrap();
        let create = env.subjects().api_campaign_create();
        let (reply, _) = raw(
            &env,
            create.clone(),
            serde_json::to_vec(&good()).unwrap(),
            false,
        )
        .await;
        assert_eq!(reply["ok"], json!(true), "{reply}");
        drop(engine);
        // The API's own thread drains and closes its connection: requests then find nobody.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = env.nats.request(create.clone(), "{}".into()).await;
            if matches!(&r, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dropped engine still answers: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
}

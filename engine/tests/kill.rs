//! A node killed with SIGKILL mid-campaign (no drain, no acks) and started again: the
//! campaign completes, no user is lost, and repeats are bounded by the in-flight window —
//! the sends that reached the provider but were not yet confirmed, which the provider
//! recognises by their `Idempotency-Key`.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use herald_engine::testkit::{promotion, wait_until, SinkConfig, TestEnv, WebhookSink};

/// A `herald serve` process, killed when dropped so a failing test leaves none behind.
struct Node(Child);

impl Node {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_node(env: &TestEnv, sink_url: &str) -> Node {
    let c = &env.config;
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .env("HERALD__DATABASE__URL", &c.database.url)
        .env("HERALD__NATS__PREFIX", &c.nats.prefix)
        .env("HERALD__PROVIDERS__APP__KIND", "webhook")
        .env("HERALD__PROVIDERS__APP__URL", sink_url)
        .env("HERALD__PIPELINE__CLAIM_TTL_SECS", "3")
        .env("HERALD__PIPELINE__PUSH__ACK_WAIT_SECS", "4")
        .env("HERALD__PIPELINE__PUSH__CONCURRENCY", "8")
        .env("HERALD__PIPELINE__PROGRESS_INTERVAL_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Node)
        .expect("start herald serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_campaign_loses_no_user() {
    const USERS: i64 = 20_000;
    let env = TestEnv::new("kill").await.unwrap();
    env.run_test(async {
        env.seed(USERS).await.unwrap();
        let sink = WebhookSink::start(SinkConfig {
            latency_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap();

        let mut first = spawn_node(&env, &sink.url());
        let req = promotion("killed");
        let mut reply = None;
        for _ in 0..100 {
            match env.create(&req).await {
                Ok(r) => {
                    reply = Some(r.unwrap());
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await, // node starting
            }
        }
        let reply = reply.expect("the node answered");
        // The binary turns transparent huge pages off for itself (herald_engine::huge_pages).
        let status = std::fs::read_to_string(format!("/proc/{}/status", first.0.id())).unwrap();
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
        assert!(
            wait_until(Duration::from_secs(60), || async {
                sink.delivered_total() >= 3_000
            })
            .await,
            "the campaign got going"
        );
        first.kill(); // SIGKILL: nothing is drained or acked
        let at_kill = sink.delivered_total();
        assert!(at_kill < USERS as u64, "killed mid-campaign (at {at_kill})");

        let mut second = spawn_node(&env, &sink.url());
        let s = env
            .wait_completed(reply.campaign_id, Duration::from_secs(120))
            .await
            .unwrap();
        second.kill();

        assert!(
            sink.missing(reply.campaign_id, 1..=USERS).is_empty(),
            "no user lost"
        );
        assert_eq!(sink.distinct(), USERS as u64);
        // In flight at the kill: at most push concurrency (8) batches of 100 recipients.
        let repeats = sink.duplicates();
        eprintln!("kill -9 at {at_kill} delivered: {repeats} repeated Idempotency-Keys");
        assert!(
            repeats <= 800,
            "repeats bounded by the in-flight window: {repeats}"
        );
        assert_eq!(s.recipients, USERS);
        assert_eq!(s.sent + s.skipped, USERS);
        assert_eq!(s.failed, 0);
        sink.shutdown().await;
    })
    .await
    .unwrap();
}

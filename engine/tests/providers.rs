//! Providers against a real HTTP sink over loopback, the simulated provider's ledger, and
//! the provider config as read from files.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use herald_engine::{
    providers::{
        Provider, ProviderConfig, Push, SendError, SimulatedConfig, SimulatedProvider,
        WebhookConfig, WebhookProvider,
    },
    testkit::{SinkConfig, WebhookSink},
};
use herald_schemas::InformType;

fn push(campaign_id: i64, user_id: i64) -> Push {
    Push {
        campaign_id,
        user_id,
        channel: InformType::App,
        title: Arc::from("spring sale"),
        body: Arc::from("20% off everything \u{2728}"),
    }
}

fn webhook(url: String, timeout_ms: u64) -> WebhookProvider {
    WebhookProvider::new(WebhookConfig {
        url,
        timeout_ms,
        max_connections: 8,
    })
    .expect("valid webhook config")
}

async fn sink(config: SinkConfig) -> WebhookSink {
    WebhookSink::start(config).await.expect("sink starts")
}

#[tokio::test]
async fn webhook_2xx_delivers_json_with_idempotency_key() {
    let sink = sink(SinkConfig::default()).await;
    let provider = webhook(sink.url(), 5000);

    provider.send(&push(42, 7)).await.expect("delivered");

    assert_eq!(sink.delivered_total(), 1);
    assert_eq!(sink.count(42, 7), 1);
    assert_eq!(sink.count_key("42:7"), 1);
    assert_eq!((sink.malformed(), sink.failures_injected()), (0, 0));
    let seen = sink.last_push().expect("the sink kept the push");
    assert_eq!(seen.idempotency_key, "42:7");
    assert_eq!((seen.campaign_id, seen.user_id), (42, 7));
    assert_eq!(seen.channel, InformType::App);
    assert_eq!(seen.title, "spring sale");
    assert_eq!(seen.body, "20% off everything \u{2728}");

    // A repeat reaches the sink as a duplicate: the key is what lets a real gateway drop it.
    provider.send(&push(42, 7)).await.expect("delivered");
    provider.send(&push(42, 8)).await.expect("delivered");
    assert_eq!(
        (sink.delivered_total(), sink.distinct(), sink.duplicates()),
        (3, 2, 1)
    );
    assert_eq!(sink.requests(), 3);
    sink.shutdown().await;
}

#[tokio::test]
async fn webhook_503_is_retryable() {
    let sink = sink(SinkConfig {
        fail_503_rate: 1.0,
        ..SinkConfig::default()
    })
    .await;
    let err = webhook(sink.url(), 5000)
        .send(&push(1, 1))
        .await
        .unwrap_err();
    match err {
        SendError::Retryable {
            reason,
            retry_after,
        } => {
            assert!(reason.starts_with("http 503"), "{reason}");
            assert_eq!(retry_after, None);
        }
        other => panic!("expected retryable, got {other:?}"),
    }
    assert_eq!((sink.failures_503(), sink.delivered_total()), (1, 0));
}

#[tokio::test]
async fn webhook_429_is_retryable_with_retry_after() {
    let sink = sink(SinkConfig {
        fail_429_rate: 1.0,
        retry_after_secs: Some(2),
        ..SinkConfig::default()
    })
    .await;
    let err = webhook(sink.url(), 5000)
        .send(&push(1, 1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SendError::Retryable {
            reason: "http 429: slow down".into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    );
    assert_eq!((sink.failures_429(), sink.delivered_total()), (1, 0));
}

#[tokio::test]
async fn webhook_400_is_permanent() {
    let sink = sink(SinkConfig {
        reject_user_ids: HashSet::from([13]),
        ..SinkConfig::default()
    })
    .await;
    let provider = webhook(sink.url(), 5000);
    let err = provider.send(&push(1, 13)).await.unwrap_err();
    match err {
        SendError::Permanent { reason } => {
            assert!(reason.contains("400"), "{reason}");
            assert!(reason.contains("user rejected"), "{reason}");
        }
        other => panic!("expected permanent, got {other:?}"),
    }
    provider.send(&push(1, 14)).await.expect("other users pass");
    assert_eq!(
        (sink.rejected(), sink.count(1, 13), sink.count(1, 14)),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn webhook_timeout_is_retryable() {
    let sink = sink(SinkConfig {
        latency_ms: 1000,
        ..SinkConfig::default()
    })
    .await;
    let started = Instant::now();
    let err = webhook(sink.url(), 100)
        .send(&push(1, 1))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(900));
    match err {
        SendError::Retryable { reason, .. } => assert!(reason.contains("timeout"), "{reason}"),
        other => panic!("expected retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn webhook_connection_refused_is_retryable() {
    // Take a free port, then close it so nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = webhook(format!("http://127.0.0.1:{port}/push"), 2000)
        .send(&push(1, 1))
        .await
        .unwrap_err();
    match err {
        SendError::Retryable { reason, .. } => {
            assert!(reason.starts_with("connection failed"), "{reason}")
        }
        other => panic!("expected retryable, got {other:?}"),
    }
}

#[tokio::test]
async fn sink_counts_malformed_requests() {
    let sink = sink(SinkConfig::default()).await;
    let client = reqwest::Client::new();
    let good = r#"{"campaign_id":1,"user_id":2,"channel":"sms","title":"t","body":"b"}"#;
    let cases = [
        (None, good),                                      // no key
        (Some("1:3"), good),                               // key does not match the body
        (Some("1:2"), r#"{"campaign_id":1,"user_id":2}"#), // missing fields
        (
            Some("1:2"),
            r#"{"campaign_id":1,"user_id":2,"channel":"fax","title":"t","body":"b"}"#,
        ),
    ];
    for (key, body) in cases {
        let mut request = client
            .post(sink.url())
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let status = request.send().await.unwrap().status();
        assert_eq!(status, 400, "{key:?} {body}");
    }
    assert_eq!((sink.malformed(), sink.delivered_total()), (4, 0));
}

#[tokio::test]
async fn sink_failures_are_per_request_so_retries_get_through() {
    let sink = sink(SinkConfig {
        fail_503_rate: 0.5,
        fail_429_rate: 0.2,
        ..SinkConfig::default()
    })
    .await;
    let provider = webhook(sink.url(), 5000);
    for user in 0..50 {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match provider.send(&push(3, user)).await {
                Ok(()) => break,
                Err(SendError::Retryable { .. }) if attempts < 200 => continue,
                Err(e) => panic!("user {user}: {e}"),
            }
        }
    }
    assert!(sink.missing(3, 0..50).is_empty());
    assert_eq!((sink.distinct(), sink.duplicates()), (50, 0));
    assert!(sink.failures_injected() > 0);
    assert_eq!(sink.requests(), 50 + sink.failures_injected());
}

#[tokio::test]
async fn sink_stops_on_shutdown() {
    let sink = sink(SinkConfig::default()).await;
    let url = sink.url();
    sink.shutdown().await;
    let err = webhook(url, 1000).send(&push(1, 1)).await.unwrap_err();
    assert!(matches!(err, SendError::Retryable { .. }), "{err:?}");
}

#[tokio::test]
async fn simulated_ledger_counts_deliveries_and_duplicates() {
    let provider = SimulatedProvider::new(SimulatedConfig::default());
    let ledger = provider.ledger();
    for user in 0..100 {
        provider.send(&push(5, user)).await.unwrap();
    }
    provider.send(&push(5, 10)).await.unwrap();
    provider.send(&push(5, 10)).await.unwrap();
    provider.send(&push(5, 11)).await.unwrap();

    assert_eq!(ledger.total(), 103);
    assert_eq!(ledger.distinct(), 100);
    assert_eq!(ledger.duplicates(), 3);
    assert_eq!(ledger.attempts(), 103);
    assert_eq!(
        (
            ledger.count(5, 10),
            ledger.count(5, 11),
            ledger.count(5, 12)
        ),
        (3, 2, 1)
    );
    assert_eq!(ledger.missing(5, 98..103), vec![100, 101, 102]);
    ledger.clear();
    assert_eq!((ledger.total(), ledger.attempts()), (0, 0));
}

#[tokio::test]
async fn a_simulated_provider_built_from_config_keeps_no_ledger() {
    // `herald serve` builds its providers from config and never reads a ledger; one would
    // grow by an entry per user and campaign for as long as the node runs.
    let provider = SimulatedProvider::unrecorded(SimulatedConfig::default());
    let ledger = provider.ledger();
    let batch: Vec<Push> = (0..1_000).map(|user| push(6, user)).collect();
    let sent = provider.send_batch(&batch).await;
    assert!(sent.iter().all(Result::is_ok));
    assert_eq!((ledger.total(), ledger.attempts()), (0, 0));

    let config = ProviderConfig::Simulated {
        latency_ms: 0,
        failure_rate: 0.0,
        permanent_failure_rate: 0.0,
    };
    let built = config.build().unwrap();
    assert_eq!(built.name(), "simulated");
    assert!(built.send_batch(&batch).await.iter().all(Result::is_ok));
}

#[tokio::test]
async fn simulated_failure_rate_one_always_fails() {
    let provider = SimulatedProvider::new(SimulatedConfig {
        failure_rate: 1.0,
        ..SimulatedConfig::default()
    });
    for user in 0..200 {
        let err = provider.send(&push(1, user)).await.unwrap_err();
        assert!(matches!(err, SendError::Retryable { .. }), "{err:?}");
    }
    let ledger = provider.ledger();
    assert_eq!((ledger.attempts(), ledger.total()), (200, 0));

    let permanent = SimulatedProvider::new(SimulatedConfig {
        permanent_failure_rate: 1.0,
        ..SimulatedConfig::default()
    });
    let err = permanent.send(&push(1, 1)).await.unwrap_err();
    assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");
}

#[tokio::test]
async fn simulated_failure_rate_is_roughly_kept_and_seed_repeats() {
    let config = SimulatedConfig {
        failure_rate: 0.25,
        permanent_failure_rate: 0.05,
        ..SimulatedConfig::default()
    };
    let outcomes = |provider: SimulatedProvider| async move {
        let mut out = Vec::new();
        for user in 0..4000 {
            out.push(match provider.send(&push(1, user)).await {
                Ok(()) => 0,
                Err(SendError::Retryable { .. }) => 1,
                Err(SendError::Permanent { .. }) => 2,
            });
        }
        out
    };
    let a = outcomes(SimulatedProvider::with_seed(config, 9)).await;
    let b = outcomes(SimulatedProvider::with_seed(config, 9)).await;
    assert_eq!(a, b);
    let retryable = a.iter().filter(|&&o| o == 1).count();
    let permanent = a.iter().filter(|&&o| o == 2).count();
    assert!((850..1150).contains(&retryable), "{retryable}");
    assert!((120..280).contains(&permanent), "{permanent}");
}

#[tokio::test]
async fn simulated_latency_is_honoured_without_blocking_threads() {
    let provider = Arc::new(SimulatedProvider::new(SimulatedConfig {
        latency_ms: 200,
        ..SimulatedConfig::default()
    }));
    let started = Instant::now();
    provider.send(&push(1, 1)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));

    // 500 sends of 200 ms on a current-thread runtime: only concurrent sleeps finish fast.
    let started = Instant::now();
    let sends: Vec<_> = (0..500)
        .map(|user| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.send(&push(2, user)).await })
        })
        .collect();
    for send in sends {
        send.await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(provider.ledger().distinct(), 501);
}

#[tokio::test]
async fn simulated_batch_is_one_call_with_one_latency_and_an_outcome_per_push() {
    let provider = SimulatedProvider::with_seed(
        SimulatedConfig {
            latency_ms: 200,
            permanent_failure_rate: 0.5,
            ..SimulatedConfig::default()
        },
        7,
    );
    let pushes: Vec<Push> = (1..=100).map(|u| push(3, u)).collect();
    let started = Instant::now();
    let results = provider.send_batch(&pushes).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(2_000),
        "one latency, not 100: {elapsed:?}"
    );
    assert_eq!(results.len(), 100);
    let delivered: Vec<i64> = pushes
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(p, _)| p.user_id)
        .collect();
    assert!((20..=80).contains(&delivered.len()), "{}", delivered.len());
    // The ledger holds exactly the pushes answered Ok.
    let ledger = provider.ledger();
    assert_eq!(ledger.total(), delivered.len() as u64);
    for p in &pushes {
        assert_eq!(
            ledger.count(3, p.user_id) == 1,
            delivered.contains(&p.user_id)
        );
    }
}

/// Delivers only even users and counts the calls in flight at once.
struct EvenOnly {
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Provider for EvenOnly {
    fn name(&self) -> &str {
        "even-only"
    }

    async fn send(&self, push: &Push) -> Result<(), SendError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.in_flight.fetch_sub(1, SeqCst);
        if push.user_id % 2 == 0 {
            Ok(())
        } else {
            Err(SendError::Permanent {
                reason: format!("odd user {}", push.user_id),
            })
        }
    }
}

#[tokio::test]
async fn a_provider_without_a_batch_endpoint_gets_each_push_at_once_in_order() {
    let provider = EvenOnly {
        in_flight: Default::default(),
        peak: Default::default(),
    };
    let pushes: Vec<Push> = (1..=40).map(|u| push(4, u)).collect();
    let started = Instant::now();
    let results = provider.send_batch(&pushes).await;
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "sent one by one"
    );
    assert_eq!(provider.peak.load(std::sync::atomic::Ordering::SeqCst), 40);
    for (p, r) in pushes.iter().zip(&results) {
        assert_eq!(r.is_ok(), p.user_id % 2 == 0, "user {}", p.user_id);
    }
}

fn from_toml(text: &str) -> anyhow::Result<ProviderConfig> {
    Ok(config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()?
        .try_deserialize()?)
}

#[test]
fn provider_config_parses_from_toml_and_json() {
    assert_eq!(
        from_toml(
            r#"
            kind = "webhook"
            url = "http://127.0.0.1:8080/push"
            timeout_ms = 2000
            "#
        )
        .unwrap(),
        ProviderConfig::Webhook {
            url: "http://127.0.0.1:8080/push".into(),
            timeout_ms: 2000,
            max_connections: 512,
        }
    );
    assert_eq!(
        from_toml("kind = \"simulated\"\nlatency_ms = 5\nfailure_rate = 0.1\n").unwrap(),
        ProviderConfig::Simulated {
            latency_ms: 5,
            failure_rate: 0.1,
            permanent_failure_rate: 0.0,
        }
    );
    assert_eq!(from_toml("kind = \"log\"").unwrap(), ProviderConfig::Log {});

    let json: ProviderConfig =
        serde_json::from_str(r#"{"kind":"simulated","failure_rate":1,"permanent_failure_rate":0}"#)
            .unwrap();
    assert_eq!(
        json,
        ProviderConfig::Simulated {
            latency_ms: 0,
            failure_rate: 1.0,
            permanent_failure_rate: 0.0,
        }
    );
    assert_eq!(json.build().unwrap().name(), "simulated");
    // What we write, we read back.
    let text = serde_json::to_string(&json).unwrap();
    assert_eq!(serde_json::from_str::<ProviderConfig>(&text).unwrap(), json);
}

#[test]
fn provider_config_rejects_unknown_fields_and_kinds() {
    let err = from_toml("kind = \"webhook\"\nurl = \"http://h/push\"\ntimeout = 5\n").unwrap_err();
    assert!(format!("{err:#}").contains("timeout"), "{err:#}");
    let err =
        serde_json::from_str::<ProviderConfig>(r#"{"kind":"simulated","latency":5}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `latency`"), "{err}");
    let err = serde_json::from_str::<ProviderConfig>(r#"{"kind":"pigeon"}"#).unwrap_err();
    assert!(err.to_string().contains("pigeon"), "{err}");
}

#[test]
fn provider_config_rejects_a_bad_failure_rate() {
    let config = from_toml("kind = \"simulated\"\nfailure_rate = 1.5\n").unwrap();
    let err = config.build().err().expect("1.5 is rejected");
    let text = format!("{err:#}");
    assert!(
        text.contains("failure_rate") && text.contains("1.5"),
        "{text}"
    );
    assert!(config.validate().is_err());
}

#[test]
fn provider_config_rejects_a_bad_url() {
    for url in ["localhost:8080", "ftp://h/push", ""] {
        let config = ProviderConfig::Webhook {
            url: url.into(),
            timeout_ms: 5000,
            max_connections: 512,
        };
        let err = config.build().err().expect("bad url is rejected");
        assert!(format!("{err:#}").contains("url"), "{url}: {err:#}");
    }
}

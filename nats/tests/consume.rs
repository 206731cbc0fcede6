//! Publish and consume against the real NATS JetStream at 127.0.0.1:4222: dedupe by message
//! id, ack after the work, bounded retries ending in the dead-letter stream, rejects, a poison
//! message among good ones, and stopping. Each test creates its own streams under a unique
//! prefix (in memory) and deletes them after, also when it fails.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use herald_nats::{
    consume, publish_all, ConsumeSettings, Delivery, NatsError, Outcome, Outgoing, StageConsumer,
    StreamSettings, Topology,
};
use herald_schemas::{decode, DeadLetter, Subjects};
use tokio::{sync::oneshot, task::JoinHandle};

const NATS_URL: &str = "nats://127.0.0.1:4222";
const CAMPAIGN: i64 = 7;
const MAX_DELIVER: i64 = 3;
const ACK_WAIT: Duration = Duration::from_secs(2);

/// A stream prefix no other test or run shares.
fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!(
        "tn{}_{}_{}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's JetStream world.
#[derive(Clone)]
struct Env {
    js: jetstream::Context,
    subjects: Subjects,
    topology: Topology,
}

impl Env {
    fn durable(&self) -> String {
        format!("push-{CAMPAIGN}")
    }

    /// The push stage consumer of the test campaign: ack wait 2 s, 3 deliveries.
    async fn consumer(&self) -> PullConsumer {
        self.topology
            .stage_consumer(&StageConsumer {
                durable: self.durable(),
                stream: self.subjects.push_stream(),
                filter: self.subjects.push(CAMPAIGN),
                ack_wait: ACK_WAIT,
                max_deliver: MAX_DELIVER,
                max_ack_pending: 100,
            })
            .await
            .expect("create stage consumer")
    }

    /// Publishes `payloads` to the campaign's push subject with ids `{tag}:{index}`.
    async fn publish(&self, tag: &str, payloads: &[&str]) {
        let batch: Vec<Outgoing> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Outgoing {
                subject: self.subjects.push(CAMPAIGN),
                msg_id: format!("{CAMPAIGN}:{tag}:{i}"),
                payload: Bytes::copy_from_slice(p.as_bytes()),
            })
            .collect();
        publish_all(&self.js, &batch).await.expect("publish batch");
    }

    async fn stream_messages(&self, stream: &str) -> u64 {
        let stream = self.js.get_stream(stream).await.expect("get stream");
        stream.get_info().await.expect("stream info").state.messages
    }

    /// (not yet delivered, delivered but unacked) of the stage consumer.
    async fn lag(&self) -> (u64, usize) {
        self.topology
            .consumer_lag(&self.subjects.push_stream(), &self.durable())
            .await
            .expect("consumer lag")
    }

    /// Every dead letter, in order, with the subject it was published on.
    async fn dead_letters(&self) -> Vec<(String, DeadLetter)> {
        let stream = self
            .js
            .get_stream(self.subjects.dead_letter_stream())
            .await
            .expect("get dead-letter stream");
        let state = stream.get_info().await.expect("stream info").state;
        let mut letters = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            let msg = stream.get_raw_message(seq).await.expect("get dead letter");
            let letter: DeadLetter = decode(&msg.payload).expect("decode dead letter");
            letters.push((msg.subject.to_string(), letter));
        }
        letters
    }

    /// Starts `consume` on the stage consumer in a task; [`Running::stop`] resolves its stop
    /// future and waits for it to return.
    async fn start<H, Fut>(&self, settings: ConsumeSettings, handler: H) -> Running
    where
        H: Fn(Delivery) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let consumer = self.consumer().await;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let task = tokio::spawn(consume(
            self.js.clone(),
            self.subjects.clone(),
            consumer,
            settings,
            stop,
            handler,
        ));
        Running { stop_tx, task }
    }
}

struct Running {
    stop_tx: oneshot::Sender<()>,
    task: JoinHandle<Result<(), NatsError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("consume returns within 10 s of stop")
            .expect("consume task did not panic")
            .expect("consume returns Ok");
    }
}

fn fast_retries() -> ConsumeSettings {
    ConsumeSettings {
        concurrency: 4,
        max_deliver: MAX_DELIVER,
        ack_wait: ACK_WAIT,
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
    }
}

/// Runs `test` against fresh in-memory streams under a unique prefix, then deletes them, also
/// when the test panics.
async fn with_topology<F, Fut>(test: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let client = async_nats::connect(NATS_URL)
        .await
        .expect("connect to nats at 127.0.0.1:4222");
    let js = jetstream::new(client);
    let subjects = Subjects::new(unique_prefix());
    let topology = Topology::new(
        js.clone(),
        subjects.clone(),
        StreamSettings {
            memory: true,
            ..Default::default()
        },
    );
    topology.ensure_streams().await.expect("create streams");
    let env = Env {
        js: js.clone(),
        subjects: subjects.clone(),
        topology,
    };
    let outcome = tokio::spawn(test(env)).await;
    for stream in [
        subjects.campaigns_stream(),
        subjects.buckets_stream(),
        subjects.push_stream(),
        subjects.dead_letter_stream(),
        subjects.events_stream(),
    ] {
        js.delete_stream(&stream).await.expect("delete test stream");
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Polls `check` every 25 ms until it holds or `within` has passed.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every delivery a handler saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Delivery>>>);

impl Seen {
    fn record(&self, d: &Delivery) {
        self.0.lock().expect("seen lock").push(d.clone());
    }

    fn all(&self) -> Vec<Delivery> {
        self.0.lock().expect("seen lock").clone()
    }

    fn len(&self) -> usize {
        self.0.lock().expect("seen lock").len()
    }

    /// A handler that records each delivery here and answers `outcome` for it.
    fn handler(
        &self,
        outcome: fn(&Delivery) -> Outcome,
    ) -> impl Fn(Delivery) -> std::future::Ready<Outcome> + Clone + Send + Sync + 'static {
        let seen = self.clone();
        move |d| {
            seen.record(&d);
            std::future::ready(outcome(&d))
        }
    }
}

/// How many times each payload was delivered.
fn counts(seen: &[Delivery]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for d in seen {
        *out.entry(String::from_utf8_lossy(&d.payload).into_owned())
            .or_default() += 1;
    }
    out
}

#[tokio::test]
async fn republishing_the_same_msg_ids_stores_each_message_once() {
    with_topology(|env| async move {
        let payloads = ["a", "b", "c", "d", "e"];
        env.publish("bucket-1", &payloads).await;
        assert_eq!(env.stream_messages(&env.subjects.push_stream()).await, 5);
        // A batch re-published after a crash: the server drops every repeat.
        env.publish("bucket-1", &payloads).await;
        assert_eq!(env.stream_messages(&env.subjects.push_stream()).await, 5);
        // A new id is a new message.
        env.publish("bucket-2", &["f"]).await;
        assert_eq!(env.stream_messages(&env.subjects.push_stream()).await, 6);
    })
    .await;
}

#[tokio::test]
async fn done_acks_every_message_and_the_handler_sees_each_once() {
    with_topology(|env| async move {
        let payloads: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        env.publish("bucket-1", &refs).await;

        let seen = Seen::default();
        let running = env
            .start(fast_retries(), seen.handler(|_| Outcome::Done))
            .await;
        eventually(Duration::from_secs(10), "all messages acked", || {
            let env = env.clone();
            let seen = seen.clone();
            async move { seen.len() >= 10 && env.lag().await == (0, 0) }
        })
        .await;
        running.stop().await;

        let seen = seen.all();
        let counts = counts(&seen);
        assert_eq!(seen.len(), 10, "deliveries: {counts:?}");
        for p in &payloads {
            assert_eq!(counts.get(p), Some(&1), "payload {p}");
        }
        assert!(seen.iter().all(|d| d.delivered == 1));
        assert!(seen
            .iter()
            .all(|d| d.subject == env.subjects.push(CAMPAIGN)));
        let mut seqs: Vec<u64> = seen.iter().map(|d| d.stream_sequence).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=10).collect::<Vec<u64>>());
        assert_eq!(env.dead_letters().await.len(), 0);
    })
    .await;
}

#[tokio::test]
async fn retrying_gives_up_after_max_deliver_into_the_dead_letter_stream() {
    with_topology(|env| async move {
        env.publish("bucket-1", &["doomed"]).await;
        let seen = Seen::default();
        let running = env
            .start(fast_retries(), seen.handler(|_| Outcome::retry("boom")))
            .await;
        eventually(Duration::from_secs(15), "the dead letter", || {
            let env = env.clone();
            async move {
                env.stream_messages(&env.subjects.dead_letter_stream())
                    .await
                    == 1
                    && env.lag().await == (0, 0)
            }
        })
        .await;
        running.stop().await;

        let delivered: Vec<i64> = seen.all().iter().map(|d| d.delivered).collect();
        assert_eq!(delivered, vec![1, 2, 3]);

        let letters = env.dead_letters().await;
        assert_eq!(letters.len(), 1);
        let (subject, letter) = &letters[0];
        assert_eq!(
            subject,
            &env.subjects.dead_letter(&env.subjects.push_stream())
        );
        assert!(
            letter.reason.contains("gave up after 3 deliveries") && letter.reason.contains("boom"),
            "reason: {}",
            letter.reason
        );
        assert_eq!(letter.payload, b"doomed");
        assert_eq!(letter.delivered, 3);
        assert_eq!(letter.stream, env.subjects.push_stream());
        assert_eq!(letter.consumer, env.durable());
        assert_eq!(letter.subject, env.subjects.push(CAMPAIGN));
        assert_eq!(letter.stream_sequence, 1);
    })
    .await;
}

#[tokio::test]
async fn reject_dead_letters_at_the_first_delivery() {
    with_topology(|env| async move {
        env.publish("bucket-1", &["garbage"]).await;
        let seen = Seen::default();
        let running = env
            .start(
                fast_retries(),
                seen.handler(|_| Outcome::Reject {
                    reason: "cannot decode push batch".into(),
                }),
            )
            .await;
        eventually(Duration::from_secs(10), "the dead letter", || {
            let env = env.clone();
            async move {
                env.stream_messages(&env.subjects.dead_letter_stream())
                    .await
                    == 1
                    && env.lag().await == (0, 0)
            }
        })
        .await;
        running.stop().await;

        let delivered: Vec<i64> = seen.all().iter().map(|d| d.delivered).collect();
        assert_eq!(delivered, vec![1]);
        let letters = env.dead_letters().await;
        assert_eq!(letters.len(), 1);
        let letter = &letters[0].1;
        assert_eq!(letter.reason, "cannot decode push batch");
        assert_eq!(letter.delivered, 1);
        assert_eq!(letter.payload, b"garbage");
    })
    .await;
}

#[tokio::test]
async fn a_poison_message_does_not_block_the_good_ones() {
    with_topology(|env| async move {
        // The poison comes first, and the worker handles one message at a time: if a failing
        // message held its place, nothing behind it would move.
        let payloads: Vec<String> = std::iter::once("poison".to_string())
            .chain((0..20).map(|i| format!("good{i}")))
            .collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        env.publish("bucket-1", &refs).await;

        let seen = Seen::default();
        let settings = ConsumeSettings {
            concurrency: 1,
            ..fast_retries()
        };
        let running = env
            .start(
                settings,
                seen.handler(|d| {
                    if d.payload.as_ref() == b"poison" {
                        Outcome::retry("poisoned")
                    } else {
                        Outcome::Done
                    }
                }),
            )
            .await;
        eventually(
            Duration::from_secs(15),
            "good ones acked, poison dead-lettered",
            || {
                let env = env.clone();
                async move {
                    env.stream_messages(&env.subjects.dead_letter_stream())
                        .await
                        == 1
                        && env.lag().await == (0, 0)
                }
            },
        )
        .await;
        running.stop().await;

        let counts = counts(&seen.all());
        for i in 0..20 {
            assert_eq!(
                counts.get(&format!("good{i}")),
                Some(&1),
                "good{i}: {counts:?}"
            );
        }
        assert_eq!(counts.get("poison"), Some(&3));
        let letters = env.dead_letters().await;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].1.payload, b"poison");
    })
    .await;
}

#[tokio::test]
async fn stop_makes_an_idle_consume_return() {
    with_topology(|env| async move {
        let running = env
            .start(fast_retries(), |_d: Delivery| async { Outcome::Done })
            .await;
        running.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stop_finishes_and_acks_the_message_in_flight() {
    with_topology(|env| async move {
        env.publish("bucket-1", &["slow"]).await;
        let seen = Seen::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let running = env
            .start(fast_retries(), {
                let seen = seen.clone();
                let release = release.clone();
                move |d: Delivery| {
                    let seen = seen.clone();
                    let release = release.clone();
                    async move {
                        seen.record(&d);
                        release.notified().await;
                        Outcome::Done
                    }
                }
            })
            .await;
        eventually(Duration::from_secs(10), "the handler to start", || {
            let seen = seen.clone();
            async move { seen.len() == 1 }
        })
        .await;
        let _ = running.stop_tx.send(());
        // Stop has fired; the handler finishes afterwards and consume settles it.
        release.notify_one();
        tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .expect("consume returns within 10 s of stop")
            .expect("consume task did not panic")
            .expect("consume returns Ok");
        eventually(
            Duration::from_secs(5),
            "the in-flight message acked",
            || {
                let env = env.clone();
                async move { env.lag().await == (0, 0) }
            },
        )
        .await;
        assert_eq!(seen.len(), 1);
    })
    .await;
}

/// How a campaign's stages on other nodes learn that one node finished it: the finisher
/// deletes the consumers, and each loop must end with `ConsumerDeleted`, not go on or end
/// looking like a fault.
#[tokio::test]
async fn deleting_the_consumer_ends_consume_with_consumer_deleted() {
    with_topology(|env| async move {
        env.publish("bucket-1", &["before"]).await;
        let seen = Seen::default();
        let running = env
            .start(fast_retries(), seen.handler(|_| Outcome::Done))
            .await;
        eventually(Duration::from_secs(10), "the message is handled", || {
            let seen = seen.clone();
            async move { seen.len() == 1 }
        })
        .await;
        env.topology
            .delete_consumer(&env.subjects.push_stream(), &env.durable())
            .await
            .expect("delete the consumer");
        let ended = tokio::time::timeout(Duration::from_secs(15), running.task)
            .await
            .expect("consume returns within 15 s of the deletion")
            .expect("consume task did not panic");
        match ended {
            Err(NatsError::ConsumerDeleted(durable)) => assert_eq!(durable, env.durable()),
            other => panic!("expected ConsumerDeleted, got {other:?}"),
        }
    })
    .await;
}

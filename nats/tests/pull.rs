//! herald's pull stream against the real NATS JetStream at 127.0.0.1:4222, reached through a
//! small proxy that can lose the client's pull requests on the way or cut the connection: a
//! lost request is asked again two heartbeats later, an idle or a blocked consumer is not
//! mistaken for a lost one, a batch of one works, and a reconnect loses nothing.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use herald_nats::{PullError, PullStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

const NATS_ADDR: &str = "127.0.0.1:4222";
/// The tests' idle heartbeat: the shortest NATS recommends, so a missed one shows in 1 s.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// A pull request's subject starts so.
const PULL_SUBJECT: &[u8] = b"$JS.API.CONSUMER.MSG.NEXT.";

/// A TCP proxy to the real server that forwards every byte, except the client's pull
/// requests it is told to lose, and that can cut every connection at once.
struct Proxy {
    addr: SocketAddr,
    lose: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let lose = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let (cut, cuts) = watch::channel(0u64);
        let (l, d) = (lose.clone(), lost.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(NATS_ADDR)
                    .await
                    .expect("connect to nats at 127.0.0.1:4222");
                tokio::spawn(relay(client, server, l.clone(), d.clone(), cuts.clone()));
            }
        });
        Self {
            addr,
            lose,
            lost,
            cut,
        }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Loses the client's next `n` pull requests.
    fn lose_pull_requests(&self, n: usize) {
        self.lose.store(n, Ordering::SeqCst);
    }

    fn lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }

    /// Closes every connection open now; the client reconnects through the proxy.
    fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Relays one connection until either side closes or the connections are cut.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    lose: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    mut cuts: watch::Receiver<u64>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let down = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    let up = async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = match from_client.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut out = Vec::with_capacity(buf.len());
            let used = forward_ops(&buf, &mut out, &lose, &lost);
            buf.drain(..used);
            if to_server.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    cuts.mark_unchanged();
    tokio::select! {
        _ = down => {}
        _ = up => {}
        _ = cuts.changed() => {}
    }
}

/// Copies the complete protocol operations at the start of `buf` to `out`, leaving out the
/// pull requests to lose, and returns how many bytes it consumed.
fn forward_ops(buf: &[u8], out: &mut Vec<u8>, lose: &AtomicUsize, lost: &AtomicUsize) -> usize {
    let mut at = 0;
    while let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[at..at + eol];
        let words: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let op = words[0].to_ascii_uppercase();
        let mut end = at + eol + 2;
        if op == b"PUB" || op == b"HPUB" {
            let size: usize = std::str::from_utf8(words[words.len() - 1])
                .expect("utf-8 size")
                .parse()
                .expect("numeric size");
            if buf.len() < end + size + 2 {
                break;
            }
            end += size + 2;
            let is_pull = words[1].starts_with(PULL_SUBJECT);
            if is_pull
                && lose
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                lost.fetch_add(1, Ordering::SeqCst);
                at = end;
                continue;
            }
        }
        out.extend_from_slice(&buf[at..end]);
        at = end;
    }
    at
}

/// A fresh in-memory stream with a durable consumer `reader`; each test deletes it.
struct Scratch {
    js: jetstream::Context,
    stream: String,
    subject: String,
    consumer: String,
}

impl Scratch {
    async fn new(js: &jetstream::Context, max_ack_pending: i64) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let name = format!(
            "TPULL{}_{}_{}",
            std::process::id(),
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let subject = format!("{}.msgs", name.to_ascii_lowercase());
        let st = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .expect("create stream");
        st.create_consumer(pull::Config {
            durable_name: Some("reader".into()),
            max_ack_pending,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .expect("create consumer");
        Self {
            js: js.clone(),
            stream: name,
            subject,
            consumer: "reader".into(),
        }
    }

    async fn publish(&self, range: std::ops::Range<usize>) {
        self.publish_through(&self.js, range).await;
    }

    /// Publishes `range` on `js`'s connection, which may not be the stream's.
    async fn publish_through(&self, js: &jetstream::Context, range: std::ops::Range<usize>) {
        for i in range {
            js.publish(self.subject.clone(), i.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    }

    async fn pull(&self, batch: usize) -> PullStream {
        PullStream::open(&self.js, &self.stream, &self.consumer, batch, HEARTBEAT)
            .await
            .expect("open pull stream")
    }

    async fn delete(self) {
        self.js
            .delete_stream(&self.stream)
            .await
            .expect("delete stream");
    }
}

/// What a pull stream yielded until `want` messages arrived (acked as they come) or
/// `within` passed.
#[derive(Default)]
struct Pulled {
    messages: Vec<usize>,
    errors: Vec<PullError>,
}

async fn pull_until(
    stream: &mut PullStream,
    want: usize,
    within: Duration,
    ack: bool,
) -> (Pulled, Vec<jetstream::Message>) {
    let mut pulled = Pulled::default();
    let mut held = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while pulled.messages.len() < want {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => pulled.errors.push(e),
            Ok(Some(Ok(m))) => {
                let n = std::str::from_utf8(&m.payload)
                    .expect("utf-8 payload")
                    .parse()
                    .expect("numeric payload");
                pulled.messages.push(n);
                if ack {
                    m.ack().await.expect("ack");
                } else {
                    held.push(m);
                }
            }
        }
    }
    (pulled, held)
}

/// Every one of `0..count` exactly once.
fn assert_each_once(messages: &[usize], count: usize) {
    assert_eq!(messages.len(), count, "messages received: {messages:?}");
    let distinct: BTreeSet<usize> = messages.iter().copied().collect();
    assert_eq!(distinct, (0..count).collect(), "each message once");
}

/// A proxy, and a scratch stream whose client connects through it. Keep the proxy alive: its
/// connections close when it is dropped.
async fn through_proxy(max_ack_pending: i64) -> (Proxy, Scratch) {
    let proxy = Proxy::start().await;
    let client = async_nats::connect(proxy.url())
        .await
        .expect("connect through the proxy");
    let scratch = Scratch::new(&jetstream::new(client), max_ack_pending).await;
    (proxy, scratch)
}

/// The stall this stream exists for: the server holds no request the client counts. async-nats
/// 0.51 asks again only `expires` + 5 s after its last request (10 s here); this stream asks
/// again two heartbeats after the last thing it received.
#[tokio::test]
async fn a_lost_pull_request_is_asked_again_two_heartbeats_later() {
    let (proxy, scratch) = through_proxy(1000).await;
    scratch.publish(0..30).await;
    proxy.lose_pull_requests(1);
    let mut stream = scratch.pull(10).await;
    let started = Instant::now();
    let (pulled, _) = pull_until(&mut stream, 30, Duration::from_secs(8), true).await;
    let took = started.elapsed();
    scratch.delete().await;
    assert_eq!(proxy.lost(), 1, "the proxy lost the first pull request");
    assert_each_once(&pulled.messages, 30);
    assert_eq!(pulled.errors, vec![PullError::MissedHeartbeat]);
    // Two heartbeats (1 s) and the pulls, with room for a loaded machine; async-nats's own
    // timer would have asked again after 10 s.
    assert!(
        took < Duration::from_secs(4),
        "recovered after {took:?}, not two heartbeats"
    );
}

/// An idle consumer keeps its request alive by the server's heartbeats: no reset, no pile of
/// requests, and a message published later arrives at once.
#[tokio::test]
async fn an_idle_consumer_is_kept_by_the_heartbeats() {
    let (_proxy, scratch) = through_proxy(1000).await;
    let mut stream = scratch.pull(10).await;
    let (idle, _) = pull_until(&mut stream, 1, 6 * HEARTBEAT, true).await;
    assert!(idle.messages.is_empty());
    assert_eq!(idle.errors, vec![], "heartbeats arrived while idle");
    assert_eq!(stream.pending(), 10, "one request waiting, not a pile");
    let published = Instant::now();
    scratch.publish(0..1).await;
    let (later, _) = pull_until(&mut stream, 1, Duration::from_secs(5), true).await;
    let took = published.elapsed();
    scratch.delete().await;
    assert_each_once(&later.messages, 1);
    assert!(took < Duration::from_secs(1), "arrived after {took:?}");
}

/// A consumer at its `max_ack_pending` has a waiting request the server cannot serve yet; its
/// heartbeats must keep the stream from asking again and again.
#[tokio::test]
async fn a_consumer_at_max_ack_pending_is_not_reset() {
    let (_proxy, scratch) = through_proxy(3).await;
    scratch.publish(0..10).await;
    let mut stream = scratch.pull(10).await;
    let (first, held) = pull_until(&mut stream, 3, Duration::from_secs(5), false).await;
    assert_eq!(
        first.messages.len(),
        3,
        "max_ack_pending lets three through"
    );
    let (blocked, _) = pull_until(&mut stream, 1, 6 * HEARTBEAT, true).await;
    assert!(blocked.messages.is_empty(), "nothing past max_ack_pending");
    assert_eq!(blocked.errors, vec![], "heartbeats arrived while blocked");
    for m in held {
        m.ack().await.expect("ack");
    }
    let (rest, _) = pull_until(&mut stream, 7, Duration::from_secs(5), true).await;
    scratch.delete().await;
    let mut all = first.messages;
    all.extend(rest.messages);
    assert_each_once(&all, 10);
}

/// NATS asks that a continuous pull work with a batch of one (its threshold is then zero).
#[tokio::test]
async fn a_batch_of_one_pulls_every_message() {
    let (_proxy, scratch) = through_proxy(1000).await;
    scratch.publish(0..20).await;
    let mut stream = scratch.pull(1).await;
    let (pulled, _) = pull_until(&mut stream, 20, Duration::from_secs(10), true).await;
    scratch.delete().await;
    assert_each_once(&pulled.messages, 20);
    assert_eq!(pulled.errors, vec![]);
}

/// A cut connection: the client reconnects, and every message, those published before the
/// cut and those after, still arrives once.
#[tokio::test]
async fn a_reconnect_loses_no_message() {
    let (proxy, scratch) = through_proxy(1000).await;
    scratch.publish(0..10).await;
    let mut stream = scratch.pull(10).await;
    let (before, _) = pull_until(&mut stream, 10, Duration::from_secs(5), true).await;
    proxy.cut_connections();
    // Published on a connection of its own, while the stream's client reconnects.
    let other = jetstream::new(
        async_nats::connect(format!("nats://{NATS_ADDR}"))
            .await
            .expect("connect to nats"),
    );
    scratch.publish_through(&other, 10..20).await;
    let (after, _) = pull_until(&mut stream, 10, Duration::from_secs(10), true).await;
    scratch.delete().await;
    let mut all = before.messages;
    all.extend(after.messages);
    assert_each_once(&all, 20);
}

/// The consumer deleted under the stream ends it with `ConsumerDeleted`.
#[tokio::test]
async fn a_deleted_consumer_ends_the_stream() {
    let (_proxy, scratch) = through_proxy(1000).await;
    let mut stream = scratch.pull(10).await;
    let (idle, _) = pull_until(&mut stream, 1, HEARTBEAT, true).await;
    assert!(idle.messages.is_empty() && idle.errors.is_empty());
    scratch
        .js
        .delete_consumer_from_stream(&scratch.consumer, &scratch.stream)
        .await
        .expect("delete consumer");
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    let after = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    scratch.delete().await;
    assert!(
        matches!(next, Ok(Some(Err(PullError::ConsumerDeleted)))),
        "got {next:?}"
    );
    assert!(matches!(after, Ok(None)), "the stream ended");
}

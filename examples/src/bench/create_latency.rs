//! Latency of `campaign.create` under concurrent requesters. By default each requester sends
//! its requests back to back (a closed loop: the machine is saturated, and latency is the
//! queue in front of it). With a rate, the requesters are paced (an open loop): each request
//! has a scheduled time, and a requester still waiting for its previous reply at that time
//! is charged for the wait. The campaigns target an empty segment so the fan-out is trivial.
//! The requesters are a client of their own: one thread with its own runtime and NATS
//! connection, apart from the engine's runtime.
//!
//! [`floor`] runs the same requesters against a responder that only decodes the body and
//! replies: the request/reply round trip through NATS on this machine, below which no create
//! can answer. With a database it also commits each body as one row, grouped over concurrent
//! requests as the API groups its inserts, before it replies: the part of a create that no
//! change to herald can remove while a reply means the campaign is on disk.

use std::time::{Duration, Instant};

use herald_engine::schemas::Subjects;

/// Every request's latency, with the round it was sent in (its index in its requester's
/// sequence), sorted by latency.
pub struct Latencies {
    samples: Vec<(Duration, usize)>,
    paced: bool,
    /// Back to back, each round's window (its first request sent, its last reply) and slowest
    /// reply; paced, each request's at or above the p99, slowest first.
    windows: Vec<Window>,
}

/// When a round (or one request) began and ended, and its slowest reply.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The first request sent.
    pub start: Instant,
    /// The last reply received.
    pub end: Instant,
    /// The slowest reply's latency.
    pub slowest: Duration,
}

/// How a back-to-back run's latencies fall into rounds (see [`Latencies::rounds`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rounds {
    /// Rounds in the run (requests per requester).
    pub count: usize,
    /// The median round's slowest reply.
    pub median: Duration,
    /// The slowest round's slowest reply.
    pub slowest: Duration,
    /// Which round that was (1 is the first).
    pub slowest_round: usize,
    /// How many rounds the replies at or above the p99 came from.
    pub p99_rounds: usize,
}

impl Latencies {
    /// `samples` as (latency, round); `paced` for an open loop, whose requesters are not in
    /// step.
    pub fn new(mut samples: Vec<(Duration, usize)>, paced: bool) -> Self {
        samples.sort();
        Self {
            samples,
            paced,
            windows: Vec::new(),
        }
    }

    /// From each request's (latency, round, sent, replied), with the windows of
    /// [`Latencies::round_trace`]: back to back, each round's; paced, those of the requests at
    /// or above the p99, slowest first.
    pub fn from_requests(requests: Vec<(Duration, usize, Instant, Instant)>, paced: bool) -> Self {
        let lat = Self::new(requests.iter().map(|r| (r.0, r.1)).collect(), paced);
        let one = |&(slowest, _, start, end): &(Duration, usize, Instant, Instant)| Window {
            start,
            end,
            slowest,
        };
        let windows = if paced {
            let tail = lat.p99_tail().len();
            let mut slow: Vec<Window> = requests.iter().map(one).collect();
            slow.sort_by_key(|w| std::cmp::Reverse(w.slowest));
            slow.truncate(tail);
            slow
        } else {
            let mut rounds: Vec<Option<Window>> = Vec::new();
            for r in &requests {
                if rounds.len() <= r.1 {
                    rounds.resize(r.1 + 1, None);
                }
                let w = rounds[r.1].get_or_insert(one(r));
                *w = Window {
                    start: w.start.min(r.2),
                    end: w.end.max(r.3),
                    slowest: w.slowest.max(r.0),
                };
            }
            rounds.into_iter().flatten().collect()
        };
        Self { windows, ..lat }
    }

    /// JSON objects for `scripts/create_stalls.py`, each a window on CLOCK_MONOTONIC
    /// (seconds, as `perf record -k CLOCK_MONOTONIC` stamps its samples) with its slowest
    /// reply. Back to back, one per round; paced, where the requesters are not in step, one
    /// per request at or above the p99, slowest first (`round` is then its rank).
    pub fn round_trace(&self, label: &str) -> Vec<serde_json::Value> {
        let (now, mono_now) = (Instant::now(), monotonic_now());
        let mono = |t: Instant| {
            mono_now - now.saturating_duration_since(t).as_secs_f64()
                + t.saturating_duration_since(now).as_secs_f64()
        };
        self.windows
            .iter()
            .enumerate()
            .map(|(r, w)| {
                serde_json::json!({
                    "loop": label, "round": r + 1, "start": mono(w.start), "end": mono(w.end),
                    "slowest_ms": w.slowest.as_secs_f64() * 1e3,
                })
            })
            .collect()
    }

    /// Requests measured.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The q-quantile (0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        self.samples
            .get(self.quantile_index(q))
            .map_or(Duration::ZERO, |s| s.0)
    }

    fn quantile_index(&self, q: f64) -> usize {
        ((self.samples.len().saturating_sub(1)) as f64 * q).round() as usize
    }

    /// The samples at or above the p99, slowest last.
    fn p99_tail(&self) -> &[(Duration, usize)] {
        &self.samples[self.quantile_index(0.99).min(self.samples.len())..]
    }

    /// The mean.
    pub fn mean(&self) -> Duration {
        let n = u32::try_from(self.samples.len()).unwrap_or(u32::MAX).max(1);
        self.samples.iter().map(|s| s.0).sum::<Duration>() / n
    }

    /// Back to back, the requesters move in step: a grouped commit answers most of the
    /// requests in flight at once, so their requesters all send their next request together,
    /// and request i of every requester is one round. A stall in a round holds all of its
    /// requests, so the p99 of a run is about its slowest round. None for a paced run.
    pub fn rounds(&self) -> Option<Rounds> {
        if self.paced || self.samples.is_empty() {
            return None;
        }
        let count = self.samples.iter().map(|s| s.1).max().unwrap_or(0) + 1;
        let mut slowest_of = vec![Duration::ZERO; count];
        for &(d, r) in &self.samples {
            slowest_of[r] = slowest_of[r].max(d);
        }
        let mut tail: Vec<usize> = self.p99_tail().iter().map(|s| s.1).collect();
        tail.sort_unstable();
        tail.dedup();
        let slowest_round = (0..count).max_by_key(|&r| slowest_of[r]).unwrap_or(0) + 1;
        slowest_of.sort();
        Some(Rounds {
            count,
            median: slowest_of[(count - 1) / 2],
            slowest: slowest_of[count - 1],
            slowest_round,
            p99_rounds: tail.len(),
        })
    }

    /// `p50 … ms  p99 … ms  max … ms`.
    pub fn summary(&self) -> String {
        let ms = |q: f64| self.quantile(q).as_secs_f64() * 1e3;
        format!(
            "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(0.5),
            ms(0.99),
            ms(1.0)
        )
    }

    /// The line under a back-to-back row: its rounds. None for a paced run.
    pub fn rounds_line(&self) -> Option<String> {
        let r = self.rounds()?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Some(format!(
            "  {} rounds in step: slowest reply per round {:.2} ms (median round), {:.2} ms \
             (slowest, round {}); the replies at or above p99 are from {} round(s)",
            r.count,
            ms(r.median),
            ms(r.slowest),
            r.slowest_round,
            r.p99_rounds
        ))
    }

    /// The same as JSON, with the request count (and the rounds, back to back).
    pub fn json(&self) -> serde_json::Value {
        let ms = |q: f64| self.quantile(q).as_secs_f64() * 1e3;
        let mut v = serde_json::json!({"p50": ms(0.5), "p99": ms(0.99), "requests": self.len()});
        if let Some(r) = self.rounds() {
            v["rounds"] = serde_json::json!({
                "count": r.count,
                "median_round_ms": r.median.as_secs_f64() * 1e3,
                "slowest_round_ms": r.slowest.as_secs_f64() * 1e3,
                "slowest_round": r.slowest_round,
                "p99_rounds": r.p99_rounds,
            });
        }
        v
    }
}

/// Runs the requesters; `tag` goes into every campaign name, so two runs in one process
/// create distinct campaigns instead of repeats (which the API answers from Redis).
/// Waits until no campaign in `db` is pending or running, polling every 20 ms, and returns
/// how long after `since` that was; None if it was not so within `limit`. A full node runs
/// the campaigns it is asked to create, and this says when the last one of a burst was done.
pub async fn campaigns_final(
    db: &sea_orm::DatabaseConnection,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Option<Duration>> {
    use sea_orm::{ConnectionTrait, Statement};
    let sql = "SELECT COUNT(*) AS n FROM campaign WHERE status IN ('pending', 'running')";
    loop {
        let row = db
            .query_one(Statement::from_string(db.get_database_backend(), sql))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no count"))?;
        if row.try_get::<i64>("", "n")? == 0 {
            return Ok(Some(since.elapsed()));
        }
        if since.elapsed() > limit {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long the bench waits for a full node to finish the campaigns of its create burst.
pub const CAMPAIGNS_FINAL_LIMIT: Duration = Duration::from_secs(120);

/// The line that says when the full node had finished the campaigns it was asked to create.
pub fn campaigns_final_line(done: Option<Duration>, creates: usize) -> String {
    match done {
        Some(d) => format!(
            "  its {creates} campaigns all final {:.2} s after the first create request",
            d.as_secs_f64()
        ),
        None => format!(
            "  its {creates} campaigns not all final {} s after the first create request",
            CAMPAIGNS_FINAL_LIMIT.as_secs()
        ),
    }
}

pub async fn run(
    nats_url: &str,
    subjects: &Subjects,
    tag: &str,
    load: Load,
) -> anyhow::Result<Latencies> {
    run_on(nats_url, subjects.api_campaign_create(), tag, load).await
}

/// How many requesters send how many requests each, and how fast.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent requesters.
    pub requesters: usize,
    /// Requests per requester.
    pub per_requester: usize,
    /// Requests per second over all requesters; None sends back to back.
    pub rate: Option<f64>,
}

/// CLOCK_MONOTONIC now, in seconds.
fn monotonic_now() -> f64 {
    // SAFETY: clock_gettime only writes into the struct it is given, which is plain data.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// What the floor's responder does before it replies.
pub enum Floor {
    /// Nothing: the request/reply round trip alone.
    NoOp,
    /// Commits the body as one row of a table of its own in this database, over
    /// `connections` connections, grouped as the API groups its campaign inserts.
    Commit {
        /// The database URL.
        url: String,
        /// Connections (the API's `api.db_connections`).
        connections: u32,
    },
}

/// Most rows per commit-floor statement, as in the API's insert groups.
const MAX_GROUP: usize = 128;

/// The requesters against a responder of `kind` on its own connection to `nats_url`, on a
/// subject under `prefix`: what the same load costs with no create behind it, or with only
/// its commit.
pub async fn floor(
    nats: &async_nats::Client,
    nats_url: &str,
    prefix: &str,
    kind: Floor,
    load: Load,
) -> anyhow::Result<Latencies> {
    let commits = match kind {
        Floor::NoOp => None,
        Floor::Commit { url, connections } => Some(commit_batcher(&url, connections).await?),
    };
    let subject = format!("{prefix}.bench.floor");
    let responder = async_nats::connect(nats_url).await?;
    let mut sub = responder.subscribe(subject.clone()).await?;
    let serve = tokio::spawn(async move {
        while let Some(msg) = futures::StreamExt::next(&mut sub).await {
            let responder = responder.clone();
            let commits = commits.clone();
            tokio::spawn(async move {
                let ok = serde_json::from_slice::<serde_json::Value>(&msg.payload).is_ok();
                let mut body: bytes::Bytes =
                    br#"{"ok":true,"campaign_id":0,"duplicate":false}"#.as_slice().into();
                if let (Some(commits), true) = (commits, ok) {
                    let row = String::from_utf8_lossy(&msg.payload).into_owned();
                    if let Err(e) = commits.call(row).await {
                        // The requester fails with this, rather than waiting for a timeout.
                        let error =
                            serde_json::json!({"ok": false, "error": format!("commit floor: {e}")});
                        body = error.to_string().into();
                    }
                }
                if let (Some(reply), true) = (msg.reply, ok) {
                    let _ = responder.publish(reply, body).await;
                }
            });
        }
    });
    // Until the server has the subscription, requests find no responders.
    let mut tries = 0;
    while nats.request(subject.clone(), "{}".into()).await.is_err() {
        tries += 1;
        anyhow::ensure!(tries < 100, "the no-op responder never answered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let lat = run_on(nats_url, subject, "floor", load).await;
    serve.abort();
    lat
}

/// What a paced request scheduled at `at` and sent at `sent` is charged on top of its round
/// trip, when its requester got its previous reply at `free_at`. A requester still waiting for
/// that reply at `at` is charged from `at` (no coordinated omission). A requester that was
/// free at `at` but woke late (tokio's timer, or this process not being scheduled) is not:
/// that delay is the load generator's own, and no create was waiting in it.
fn charged_delay(
    at: tokio::time::Instant,
    free_at: tokio::time::Instant,
    sent: tokio::time::Instant,
) -> Duration {
    if free_at > at {
        sent.saturating_duration_since(at)
    } else {
        Duration::ZERO
    }
}

/// Groups request bodies into one multi-row insert each, committed before the callers get
/// their results (autocommit, with the server's `synchronous_commit`). Like the API's insert:
/// one statement text for any number of rows (an array), and every connection open with the
/// statement prepared before the first request.
async fn commit_batcher(
    url: &str,
    connections: u32,
) -> anyhow::Result<herald_engine::actors::batcher::Batcher<String, ()>> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    const INSERT: &str = "INSERT INTO bench_commit_floor (body) SELECT * FROM unnest($1::text[])";
    let insert = |bodies: Vec<String>| {
        Statement::from_sql_and_values(DbBackend::Postgres, INSERT, [bodies.into()])
    };
    let connections = connections.max(1);
    let db = herald_engine::engine::connect_db_with(url, connections, connections).await?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS bench_commit_floor (id bigserial PRIMARY KEY, body text NOT NULL)",
    )
    .await?;
    herald_engine::actors::store::prepare_on_each_connection(
        &db,
        connections as usize,
        &insert(Vec::new()),
    )
    .await?;
    let batcher = herald_engine::actors::batcher::Batcher::start(
        MAX_GROUP * 8,
        MAX_GROUP,
        connections as usize,
        move |bodies: Vec<String>| {
            let db = db.clone();
            async move {
                let n = bodies.len();
                db.execute(insert(bodies))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(vec![(); n])
            }
        },
    );
    Ok(batcher)
}

/// Runs the requesters as a client of their own: one thread with its own runtime and NATS
/// connection, as another process would be. As tasks on the bench's runtime, which a full
/// node's engine shares, a requester's reply could wait behind the node's own tasks, and that
/// wait was counted as the create's.
async fn run_on(
    nats_url: &str,
    subject: String,
    tag: &str,
    load: Load,
) -> anyhow::Result<Latencies> {
    let (url, tag) = (nats_url.to_string(), tag.to_string());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // A named thread, so a profile or `top -H` tells the requesters from the node.
    std::thread::Builder::new()
        .name("bench-requesters".into())
        .spawn(move || {
            let run = || -> anyhow::Result<Latencies> {
                let client = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                client.block_on(async {
                    let nats = async_nats::connect(&url).await?;
                    requesters(&nats, subject, &tag, load).await
                })
            };
            let _ = done_tx.send(run());
        })?;
    done_rx.await.map_err(|_| {
        anyhow::anyhow!("the requesters' thread panicked (its message is on stderr)")
    })?
}

async fn requesters(
    nats: &async_nats::Client,
    subject: String,
    tag: &str,
    load: Load,
) -> anyhow::Result<Latencies> {
    let Load {
        requesters,
        per_requester,
        rate,
    } = load;
    let run_id = std::process::id();
    // Paced: requester r sends its i-th request at start + (i * requesters + r) / rate.
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let gap = rate.map(|rate| Duration::from_secs_f64(1.0 / rate.max(1e-3)));
    let mut tasks = Vec::new();
    for r in 0..requesters {
        let nats = nats.clone();
        let subject = subject.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_requester);
            let mut free_at = tokio::time::Instant::now();
            for i in 0..per_requester {
                let body = serde_json::json!({
                    "kind": "promotion", "name": format!("latency {tag} {run_id} {r} {i}"),
                    "created_by": "bench", "starts_at": "2026-11-21T00:00:00Z",
                    "ends_at": "2026-11-28T00:00:00Z", "inform_type": "app",
                    "title": "t", "body": "b",
                    "audience": {"type": "segment", "min_points": 1_000_000_000}
                });
                let payload = serde_json::to_vec(&body)?;
                let mut late = Duration::ZERO;
                if let Some(gap) = gap {
                    let at = start + gap * (i * requesters + r) as u32;
                    tokio::time::sleep_until(at).await;
                    late = charged_delay(at, free_at, tokio::time::Instant::now());
                }
                let t = Instant::now();
                let reply = nats.request(subject.clone(), payload.into()).await?;
                out.push((t.elapsed() + late, i, t, Instant::now()));
                free_at = tokio::time::Instant::now();
                let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
                anyhow::ensure!(v["ok"] == serde_json::json!(true), "create failed: {v}");
                anyhow::ensure!(
                    v["duplicate"] == serde_json::json!(false),
                    "a latency create was taken for a repeat: {v}"
                );
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(requesters * per_requester);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Latencies::from_requests(all, gap.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_rounds_name_the_slowest_round_and_a_paced_run_has_none() {
        // 100 requesters x 20 rounds; every request of round 15 was held 3 ms longer.
        let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
        let mut samples = Vec::new();
        for round in 0..20 {
            for r in 0..100 {
                let base = if round == 15 {
                    7.0
                } else {
                    4.0 + round as f64 * 0.01
                };
                samples.push((ms(base + r as f64 * 0.001), round));
            }
        }
        let rounds = Latencies::new(samples.clone(), false).rounds().unwrap();
        let close = |a: Duration, b: f64| (a.as_secs_f64() * 1e3 - b).abs() < 1e-6;
        assert_eq!(rounds.count, 20);
        assert_eq!(rounds.p99_rounds, 1, "the 1% slowest are all round 15's");
        assert!(close(rounds.slowest, 7.099), "{rounds:?}");
        assert_eq!(rounds.slowest_round, 16);
        // The 10th of the 20 rounds' slowest replies: rounds 0..=14 and 16..=19 take
        // 4.0 + round x 0.01 + 0.099 ms, so the 10th is round 9's.
        assert!(close(rounds.median, 4.189), "{rounds:?}");
        assert!(Latencies::new(samples, true).rounds().is_none());
    }

    #[test]
    fn the_round_trace_gives_each_round_or_slow_request_its_window_and_latency() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (latency, round, sent, replied): round 1 from 0 to 5 ms, round 2 from 5 to 9 ms.
        let requests = vec![
            (ms(3), 0, t0, t0 + ms(3)),
            (ms(5), 0, t0, t0 + ms(5)),
            (ms(4), 1, t0 + ms(5), t0 + ms(9)),
            (ms(2), 1, t0 + ms(5), t0 + ms(7)),
        ];
        let lines = Latencies::from_requests(requests.clone(), false).round_trace("create");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["round"], 2);
        assert_eq!(lines[1]["loop"], "create");
        assert_eq!(lines[0]["slowest_ms"], 5.0);
        assert_eq!(lines[1]["slowest_ms"], 4.0);
        let f = |v: &serde_json::Value| v.as_f64().unwrap();
        let (start, end) = (f(&lines[0]["start"]), f(&lines[0]["end"]));
        assert!((end - start - 0.005).abs() < 1e-6, "{start} {end}");
        assert!((f(&lines[1]["start"]) - end).abs() < 1e-6);
        // On CLOCK_MONOTONIC: within a second of now.
        assert!((monotonic_now() - end).abs() < 1.0);
        // Paced: the requests at or above the p99 (here the slowest of four), with their own
        // latencies.
        let lines = Latencies::from_requests(requests, true).round_trace("create, paced");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["slowest_ms"], 5.0);
        assert_eq!(lines[0]["round"], 1);
    }

    #[test]
    fn a_requester_still_waiting_is_charged_from_its_time_and_a_late_wake_is_not() {
        let at = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        // Busy until 7 ms after its time, sent right after: charged the 7 ms and the rest.
        assert_eq!(charged_delay(at, at + ms(7), at + ms(8)), ms(8));
        // Free before its time, woken 5 ms late: not charged.
        assert_eq!(charged_delay(at, at - ms(1), at + ms(5)), Duration::ZERO);
        // Free exactly at its time.
        assert_eq!(charged_delay(at, at, at + ms(3)), Duration::ZERO);
    }
}

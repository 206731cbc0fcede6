//! Lazy coupons under a login storm: one node, five active lazy coupons (four unlimited, one
//! with stock for half the users), and a burst of login events, each user logging in about
//! twice, half of them JSON and half MessagePack. The clock runs from the first publish until
//! every expected coupon item exists and the login consumer has nothing pending.
//!
//! The publisher runs on its own thread with its own runtime and NATS connection, as a
//! separate producer would, so its CPU is measured apart from the engine's. The CPU of the
//! local NATS, Redis and PostgreSQL servers is read from `/proc` around the run, to show
//! which of them a rate is bound by.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use chrono::{Duration as Span, Utc};
use herald_engine::{
    actors::{
        coupons::login_issuer::LoginIssuer,
        event_worker::{event_durable, EventHandler},
    },
    config::Config,
    providers::{SimulatedConfig, SimulatedProvider},
    schemas::{
        encode, CouponDelivery, CouponStatusReply, CouponStatusRequest, CreateCouponReply,
        CreateCouponRequest, InformType, UserLogin,
    },
    testkit::{wait_until, TestEnv},
    Engine,
};
use serde_json::json;

use crate::proc::{server_cpu, SERVERS};

/// Unlimited lazy coupons; one more is limited to half the users.
const UNLIMITED: usize = 4;
/// How often completion is checked.
const POLL: Duration = Duration::from_millis(150);

/// What the login scenario measured.
pub struct LoginsResult {
    /// Login events published.
    pub events: usize,
    /// Users seeded (ids 1..=users).
    pub users: i64,
    /// Users who logged in at least once.
    pub distinct_users: i64,
    /// Active lazy coupons.
    pub coupons: usize,
    /// First publish to the last publish acked.
    pub publish_seconds: f64,
    /// First publish to every expected item issued (the coupons' issued counts).
    pub items_seconds: f64,
    /// First publish to every item issued and the login consumer drained.
    pub seconds: f64,
    /// Rows in `sales_promotion_coupon_item` afterwards.
    pub items: i64,
    /// Rows there should be: every coupon for every distinct user, the limited one up to its stock.
    pub expected_items: i64,
    /// Stock of the limited coupon.
    pub limited_total: i64,
    /// Items of the limited coupon.
    pub limited_items: i64,
    /// (coupon, user) pairs with more than one item.
    pub duplicates: i64,
    /// CPU seconds of this process less the publisher thread: the engine node.
    pub engine_cpu: f64,
    /// CPU seconds of the publisher thread.
    pub publisher_cpu: f64,
    /// Peak resident memory of this process during the run.
    pub peak_rss: u64,
    /// Growth of Redis' used memory.
    pub redis_added: i64,
    /// CPU seconds of each local server during the run, as in [`SERVERS`].
    pub server_cpu: Vec<(&'static str, f64)>,
}

impl LoginsResult {
    /// Login events handled per second.
    pub fn logins_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    /// Coupon items issued per second.
    pub fn items_per_sec(&self) -> f64 {
        self.items as f64 / self.seconds.max(1e-9)
    }

    /// Items of the limited coupon past its stock.
    pub fn oversold(&self) -> i64 {
        (self.limited_items - self.limited_total).max(0)
    }

    /// Expected items that do not exist.
    pub fn missing(&self) -> i64 {
        (self.expected_items - self.items).max(0)
    }

    /// The scenario's part of the benchmark's JSON line.
    pub fn json(&self) -> serde_json::Value {
        let servers: serde_json::Map<String, serde_json::Value> = self
            .server_cpu
            .iter()
            .map(|(name, cpu)| (name.to_string(), json!(cpu)))
            .collect();
        json!({
            "events": self.events,
            "users": self.users,
            "distinct_users": self.distinct_users,
            "coupons": self.coupons,
            "seconds": self.seconds,
            "items_seconds": self.items_seconds,
            "publish_seconds": self.publish_seconds,
            "logins_per_sec": self.logins_per_sec(),
            "login_items": self.items,
            "login_expected_items": self.expected_items,
            "login_items_per_sec": self.items_per_sec(),
            "login_duplicates": self.duplicates,
            "login_oversold": self.oversold(),
            "login_limited_items": self.limited_items,
            "login_limited_total": self.limited_total,
            "engine_cpu_seconds": self.engine_cpu,
            "publisher_cpu_seconds": self.publisher_cpu,
            "peak_rss_bytes": self.peak_rss,
            "redis_added_bytes": self.redis_added,
            "server_cpu_seconds": servers,
        })
    }
}

/// Seeds `users` users into `env`, starts one node with `config` and measures `events` logins.
pub async fn run(
    env: &TestEnv,
    config: Config,
    events: usize,
    users: i64,
) -> anyhow::Result<LoginsResult> {
    anyhow::ensure!(users >= 1, "--login-users: must be at least 1");
    env.seed(users).await?;
    let provider = SimulatedProvider::new(SimulatedConfig::default());
    let nats_url = config.nats.url.clone();
    let engine = Engine::builder(config)
        .provider_for_all(std::sync::Arc::new(provider))
        .start()
        .await?;
    let measured = measure(env, &nats_url, events, users).await;
    engine.shutdown().await?;
    let mut r = measured?;
    // Counted once the clock has stopped: a COUNT(*) per poll would load the database under
    // test, so the polls read the coupons' issued counts instead.
    let url = &env.config.database.url;
    r.items = sql_i64(url, "SELECT COUNT(*) FROM sales_promotion_coupon_item").await?;
    r.duplicates = sql_i64(
        url,
        "SELECT COUNT(*) FROM (SELECT coupon_id, user_account_id FROM sales_promotion_coupon_item \
         GROUP BY 1, 2 HAVING COUNT(*) > 1) d",
    )
    .await?;
    r.limited_items = sql_i64(
        url,
        "SELECT COUNT(*) FROM sales_promotion_coupon_item i JOIN sales_promotion_coupon c \
         ON c.id = i.coupon_id WHERE c.coupon_count IS NOT NULL",
    )
    .await?;
    Ok(r)
}

async fn measure(
    env: &TestEnv,
    nats_url: &str,
    events: usize,
    users: i64,
) -> anyhow::Result<LoginsResult> {
    let limited_total = (users / 2).max(1);
    let mut coupons = Vec::new();
    for i in 0..UNLIMITED {
        coupons.push(create(env, &format!("bench login {i}"), None).await?);
    }
    coupons.push(create(env, "bench login limited", Some(limited_total)).await?);
    let order = login_order(events, users);
    let distinct_users = users.min(events as i64);
    let expected_items = UNLIMITED as i64 * distinct_users + limited_total.min(distinct_users);

    // The node binds its login consumer as it starts; publish once it is there.
    let js = async_nats::jetstream::new(env.nats.clone());
    let events_stream = js.get_stream(env.subjects().events_stream()).await?;
    let durable = event_durable(&env.prefix, LoginIssuer::NAME);
    let bound = wait_until(Duration::from_secs(30), || {
        let (s, d) = (&events_stream, &durable);
        async move { s.consumer_info(d).await.is_ok() }
    })
    .await;
    anyhow::ensure!(bound, "login consumer {durable} did not appear");

    let redis_before = crate::redis_used_memory(&env.config.redis.url).await?;
    let servers_before = server_cpu();
    crate::proc::reset_peak_rss();
    let cpu0 = crate::proc::cpu_seconds();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let publisher = publish(
        nats_url.to_string(),
        env.subjects().event_user_login(),
        order,
        started_tx,
    );
    let t0 = started_rx
        .await
        .context("the publisher stopped before publishing")?;

    let deadline = Duration::from_secs(600).max(Duration::from_millis(events as u64 / 2));
    let mut items_seconds = None;
    let mut last = String::new();
    let seconds = loop {
        tokio::time::sleep(POLL).await;
        let elapsed = t0.elapsed();
        if items_seconds.is_none() {
            match issued(env, &coupons).await {
                Ok(n) if n >= expected_items => items_seconds = Some(elapsed.as_secs_f64()),
                Ok(n) => last = format!("{n} of {expected_items} items issued"),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if items_seconds.is_some() && publisher.is_finished() {
            let c = events_stream.consumer_info(&durable).await?;
            if c.num_pending == 0 && c.num_ack_pending == 0 {
                break elapsed.as_secs_f64();
            }
            last = format!(
                "consumer {durable}: {} pending, {} awaiting ack",
                c.num_pending, c.num_ack_pending
            );
        }
        if elapsed > deadline {
            anyhow::bail!("logins not done after {deadline:?}: {last}");
        }
    };
    let cpu = crate::proc::cpu_seconds() - cpu0;
    let peak_rss = crate::proc::peak_rss();
    let servers_after = server_cpu();
    let redis_added = crate::redis_used_memory(&env.config.redis.url).await? - redis_before;
    let published = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher panicked"))??;
    Ok(LoginsResult {
        events,
        users,
        distinct_users,
        coupons: coupons.len(),
        publish_seconds: published.seconds,
        items_seconds: items_seconds.unwrap_or(seconds),
        seconds,
        items: 0,
        expected_items,
        limited_total,
        limited_items: 0,
        duplicates: 0,
        engine_cpu: cpu - published.cpu,
        publisher_cpu: published.cpu,
        peak_rss,
        redis_added,
        server_cpu: SERVERS
            .iter()
            .zip(servers_before.iter().zip(&servers_after))
            .map(|(name, (b, a))| (*name, a - b))
            .collect(),
    })
}

async fn create(env: &TestEnv, name: &str, total: Option<i64>) -> anyhow::Result<i64> {
    let now = Utc::now();
    let req = CreateCouponRequest {
        name: name.into(),
        created_by: "bench".into(),
        coupon_type: 1,
        rule: json!({"amount": 10, "threshold": 100}),
        starts_at: now - Span::hours(1),
        ends_at: now + Span::days(1),
        inform_type: InformType::App,
        total,
        delivery: CouponDelivery::Lazy,
        segment: None,
    };
    let reply: CreateCouponReply = env
        .ask(env.subjects().api_coupon_create(), &req)
        .await?
        .map_err(|e| anyhow::anyhow!("creating coupon {name}: {}", e.message))?;
    Ok(reply.coupon_id)
}

/// Items issued so far over `coupons`, from their counts (bumped in the items' transaction).
async fn issued(env: &TestEnv, coupons: &[i64]) -> anyhow::Result<i64> {
    let mut n = 0;
    for &coupon_id in coupons {
        let s: CouponStatusReply = env
            .ask(
                env.subjects().api_coupon_status(),
                &CouponStatusRequest { coupon_id },
            )
            .await?
            .map_err(|e| anyhow::anyhow!("coupon {coupon_id} status: {}", e.message))?;
        n += s.issued;
    }
    Ok(n)
}

/// `events` logins of users 1..=users, every user as often as the next (give or take one),
/// in a fixed shuffled order so that first logins and repeats mix throughout the run.
fn login_order(events: usize, users: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = (0..events as i64).map(|i| i % users + 1).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}

/// What the publisher thread measured.
struct Published {
    seconds: f64,
    cpu: f64,
}

/// Publishes a login per id in `order` (even positions JSON, odd MessagePack) from a thread
/// of its own, awaiting acks a window at a time. Sends the instant of the first publish.
fn publish(
    url: String,
    subject: String,
    order: Vec<i64>,
    started: tokio::sync::oneshot::Sender<Instant>,
) -> std::thread::JoinHandle<anyhow::Result<Published>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let nats = async_nats::connect(&url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            let js = async_nats::jetstream::new(nats.clone());
            let cpu0 = crate::proc::thread_cpu_seconds();
            let t0 = Instant::now();
            let _ = started.send(t0);
            let payloads = order.into_iter().enumerate().map(|(i, user_id)| {
                Ok(Bytes::from(if i % 2 == 0 {
                    format!(r#"{{"user_id":{user_id}}}"#).into_bytes()
                } else {
                    encode(&UserLogin { user_id })?
                }))
            });
            crate::scratch::produce(js, subject, payloads).await??;
            let seconds = t0.elapsed().as_secs_f64();
            let cpu = crate::proc::thread_cpu_seconds() - cpu0;
            nats.flush().await?;
            Ok(Published { seconds, cpu })
        })
    })
}

/// Runs one query through `psql` and parses its single value. The examples have no database
/// driver of their own; these checks run once, after the clock stops.
async fn sql_i64(url: &str, sql: &str) -> anyhow::Result<i64> {
    let out = tokio::process::Command::new("psql")
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .await
        .context("running psql")?;
    anyhow::ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("psql printed {:?} for {sql}", text.trim()))
}

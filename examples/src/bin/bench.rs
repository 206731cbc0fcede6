//! herald's benchmark: the real pipeline on the real NATS, Redis and PostgreSQL, with the
//! simulated provider. All scenarios run in one process, one after another, so their ratios
//! hold on a noisy machine. Prints a table and one JSON line. See BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p herald-examples --bin bench -- --users 1000000
//! ```

#[path = "../bench/baseline.rs"]
mod baseline;
#[path = "../bench/ceiling.rs"]
mod ceiling;
#[path = "../bench/counting.rs"]
mod counting;
#[path = "../bench/create_latency.rs"]
mod create_latency;
#[path = "../bench/early_signal.rs"]
mod early_signal;
#[path = "../bench/logins.rs"]
mod logins;
#[path = "../bench/proc.rs"]
mod proc;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/scratch.rs"]
mod scratch;

use std::{sync::Arc, time::Instant};

use clap::Parser;
use fred::interfaces::ClientLike;
use herald_engine::{
    config::Config,
    schemas::{Audience, CampaignKind, CreateCampaignRequest, InformType},
    testkit::TestEnv,
    Engine,
};
use report::{cores, mb, print_columns, print_logins, print_report, Measured, PushResult, Run};
use sea_orm::ConnectionTrait;
use serde_json::json;

// As in the `herald` binary: the engine runs on mimalloc, not glibc's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(about = "Benchmark herald's pipeline against the reference design's shape and the bus")]
struct Args {
    /// Users in the full-population push.
    #[arg(long, default_value_t = 1_000_000)]
    users: i64,
    /// Provider latency in milliseconds for the main scenario.
    #[arg(long, default_value_t = 200)]
    latency_ms: u64,
    /// Users in the baseline runs (default: the smaller of --users and 200,000).
    #[arg(long)]
    baseline_users: Option<i64>,
    /// Push batches one node handles at once (pipeline.push.concurrency). With a 200 ms
    /// provider, sends in flight cap users/s at sends / 0.2 s; BENCHMARKS.md says why 3,600.
    #[arg(long, default_value_t = 3_600)]
    push_concurrency: usize,
    /// Provider calls in flight (pipeline.send_concurrency).
    #[arg(long, default_value_t = 360_000)]
    send_concurrency: usize,
    /// Concurrent requesters in the create-latency scenario.
    #[arg(long, default_value_t = 100)]
    requesters: usize,
    /// Requests per requester.
    #[arg(long, default_value_t = 20)]
    requests_each: usize,
    /// Also measure create latency with the requesters paced at this many creates per second
    /// in all (an open loop, latency counted from each request's scheduled time); 0 skips it.
    #[arg(long, default_value_t = 2000.0)]
    create_rate: f64,
    /// Event batches one node handles at once (pipeline.events.concurrency; default: config).
    #[arg(long)]
    event_concurrency: Option<usize>,
    /// Events per batch (pipeline.event_batch_size; default: config).
    #[arg(long)]
    event_batch: Option<usize>,
    /// Database connections of the API (api.db_connections; default: config).
    #[arg(long)]
    api_db_connections: Option<u32>,
    /// Serve the API on the engine's runtime instead of a thread of its own
    /// (api.own_thread = false), to compare.
    #[arg(long)]
    api_shared_runtime: bool,
    /// How often each campaign supervisor checks progress (pipeline.progress_interval_ms;
    /// the node's default). A completion recorded on the node is seen at once anyway.
    #[arg(long, default_value_t = 500)]
    progress_ms: u64,
    /// Skip the baseline scenarios.
    #[arg(long)]
    skip_baseline: bool,
    /// Run the pushes and the baselines this many times, interleaved (herald, then the
    /// baseline, each round); the table shows the median round and every round's ratio.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run only the create-latency scenario (for quick iteration).
    #[arg(long)]
    only_create: bool,
    /// With --only-create: measure on an API-only node (no fan-out).
    #[arg(long)]
    api_only: bool,
    /// With --only-create: append each back-to-back loop's rounds (the first request sent and
    /// the last reply, on CLOCK_MONOTONIC), and each paced loop's requests at or above its
    /// p99, to this file as JSON lines, for scripts/create_stalls.sh.
    #[arg(long)]
    rounds_trace: Option<std::path::PathBuf>,
    /// With --only-create: seed this many users first (the database's size, without a push).
    #[arg(long, default_value_t = 0)]
    seed_users: i64,
    /// Login events in the logins scenario.
    #[arg(long, default_value_t = 400_000)]
    logins: usize,
    /// Users in the logins scenario; each logs in about --logins / --login-users times.
    #[arg(long, default_value_t = 200_000)]
    login_users: i64,
    /// Run only the logins scenario (for quick iteration).
    #[arg(long, conflicts_with = "only_create")]
    only_logins: bool,
    /// Skip the logins scenario.
    #[arg(long, conflicts_with = "only_logins")]
    skip_logins: bool,
}

async fn redis_used_memory(url: &str) -> anyhow::Result<i64> {
    let c = herald_actors::markers::connect(url, std::time::Duration::from_secs(5)).await?;
    let info: String = c.info(Some(fred::types::InfoKind::Memory)).await?;
    let _ = c.quit().await;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

fn bench_config(env: &TestEnv, args: &Args) -> Config {
    let mut c = env.config.clone();
    c.pipeline.push.concurrency = args.push_concurrency;
    c.pipeline.push.max_ack_pending = (args.push_concurrency * 2) as i64;
    c.pipeline.push.ack_wait_secs = 30;
    c.pipeline.expand.ack_wait_secs = 30;
    c.pipeline.shard.ack_wait_secs = 30;
    c.pipeline.send_concurrency = args.send_concurrency;
    c.pipeline.claim_ttl_secs = 60;
    c.pipeline.progress_interval_ms = args.progress_ms;
    c.database.max_connections = 16;
    // A node that has been running holds its connections; the bench starts a node for each
    // push, so it opens them before the clock starts rather than during the push.
    c.database.min_connections = 16;
    if let Some(n) = args.api_db_connections {
        c.api.db_connections = n;
    }
    c.api.own_thread = !args.api_shared_runtime;
    if let Some(n) = args.event_concurrency {
        c.pipeline.events.concurrency = n;
    }
    if let Some(n) = args.event_batch {
        c.pipeline.event_batch_size = n;
    }
    c
}

async fn push(
    env: &TestEnv,
    args: &Args,
    name: &str,
    latency_ms: u64,
) -> anyhow::Result<PushResult> {
    let provider = Arc::new(counting::CountingProvider::new(args.users, latency_ms));
    let engine = Engine::builder(bench_config(env, args))
        .provider_for_all(provider.clone())
        .start()
        .await?;
    let redis_before = redis_used_memory(&env.config.redis.url).await?;
    proc::release_free_memory().await;
    proc::reset_peak_rss();
    let start_rss = proc::current_rss();
    let cpu0 = proc::CpuSnapshot::now();
    let t0 = Instant::now();
    let now = chrono::Utc::now();
    let req = CreateCampaignRequest {
        kind: CampaignKind::Promotion,
        name: format!("bench {name}"),
        created_by: "bench".into(),
        starts_at: now,
        ends_at: now + chrono::Duration::days(1),
        inform_type: InformType::App,
        title: "Double 11 is on".into(),
        body: "Open the app for your deal".into(),
        audience: Audience::All,
    };
    let reply = env
        .create(&req)
        .await?
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let status = env
        .wait_completed(reply.campaign_id, std::time::Duration::from_secs(3600))
        .await?;
    let seconds = t0.elapsed().as_secs_f64();
    let done = Instant::now();
    let cpu = proc::CpuSnapshot::since(&cpu0);
    let start_and_tail = provider.first_and_last().map(|(first, last)| {
        (
            first.saturating_duration_since(t0).as_secs_f64(),
            done.saturating_duration_since(last).as_secs_f64(),
        )
    });
    let peak_rss = proc::peak_rss();
    let redis_added = redis_used_memory(&env.config.redis.url).await? - redis_before;
    engine.shutdown().await?;
    let (duplicates, missing) = provider.duplicates_and_misses();
    Ok(PushResult {
        seconds,
        start_rss,
        start_and_tail,
        cpu,
        peak_rss,
        redis_added,
        sent: status.sent,
        duplicates,
        missing,
    })
}

/// The create-latency load: back to back, or paced at `--create-rate`.
fn load(args: &Args, paced: bool) -> create_latency::Load {
    create_latency::Load {
        requesters: args.requesters,
        per_requester: args.requests_each,
        rate: paced.then_some(args.create_rate),
    }
}

/// The paced create-latency run (`--create-rate`) on the node being measured, or None when
/// the rate is 0.
async fn paced_creates(
    env: &TestEnv,
    args: &Args,
    tag: &str,
) -> anyhow::Result<Option<create_latency::Latencies>> {
    if args.create_rate <= 0.0 {
        return Ok(None);
    }
    let tag = format!("{tag} paced");
    let lat = creates(env, args, &tag, true).await?;
    Ok(Some(lat))
}

/// The create requesters against the API of `env`'s node, back to back or (`paced`) at
/// `--create-rate`.
async fn creates(
    env: &TestEnv,
    args: &Args,
    tag: &str,
    paced: bool,
) -> anyhow::Result<create_latency::Latencies> {
    create_latency::run(
        &env.config.nats.url,
        &env.subjects(),
        tag,
        load(args, paced),
    )
    .await
}

/// The paced no-op floor (or, with `commit`, the paced commit floor), or None when
/// `--create-rate` is 0.
async fn paced_floor(
    env: &TestEnv,
    args: &Args,
    commit: bool,
) -> anyhow::Result<Option<create_latency::Latencies>> {
    if args.create_rate <= 0.0 {
        return Ok(None);
    }
    Ok(Some(floor(env, args, commit, true).await?))
}

/// The create-latency requesters against a responder that only replies (the request/reply
/// floor) or, with `commit`, commits each request as a row first, grouped over the API's
/// number of connections (the floor a create's synchronous insert adds).
async fn floor(
    env: &TestEnv,
    args: &Args,
    commit: bool,
    paced: bool,
) -> anyhow::Result<create_latency::Latencies> {
    let kind = if commit {
        create_latency::Floor::Commit {
            url: env.config.database.url.clone(),
            connections: bench_config(env, args).api.db_connections,
        }
    } else {
        create_latency::Floor::NoOp
    };
    create_latency::floor(
        &env.nats,
        &env.config.nats.url,
        &env.prefix,
        kind,
        load(args, paced),
    )
    .await
}

/// The logins scenario in an environment of its own (database, streams, Redis keys).
async fn logins(
    args: &Args,
    signals: &mut early_signal::EarlySignals,
) -> anyhow::Result<logins::LoginsResult> {
    let env = signals.new_env("logins").await?;
    let config = bench_config(&env, args);
    signals
        .run(
            &env,
            logins::run(&env, config, args.logins, args.login_users),
        )
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut signals = early_signal::EarlySignals::register()?;
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // As the `herald` binary does (herald_engine::huge_pages says why).
    if let Err(e) = herald_engine::huge_pages::disable_transparent_huge_pages() {
        eprintln!("warning: transparent huge pages stay on: {e}");
    }
    if args.only_logins {
        eprintln!(
            "logins: {} events of {} users ...",
            args.logins, args.login_users
        );
        let r = logins(&args, &mut signals).await?;
        println!();
        println!("herald benchmark: logins only, {} cores", cores());
        print_columns();
        print_logins(&r);
        println!("{}", json!({ "logins": r.json() }));
        return Ok(());
    }
    let env = signals.new_env("bench").await?;
    if args.only_create {
        return signals.run(&env, only_create(&env, &args)).await;
    }
    let measured = signals.run(&env, measure(&env, &args)).await?;
    let login = if args.skip_logins {
        Ok(None)
    } else {
        eprintln!(
            "logins: {} events of {} users ...",
            args.logins, args.login_users
        );
        logins(&args, &mut signals).await.map(Some)
    };
    let run = Run {
        users: args.users,
        latency_ms: args.latency_ms,
        create_rate: args.create_rate,
    };
    // What was measured is printed even when the logins scenario failed.
    match login {
        Ok(login) => {
            print_report(&run, measured, login);
            Ok(())
        }
        Err(e) => {
            print_report(&run, measured, None);
            Err(e.context("logins scenario"))
        }
    }
}

/// `--only-create`: the create-latency scenario alone, with the CPU per create and the bound
/// it sets on a closed loop's mean.
async fn only_create(env: &TestEnv, args: &Args) -> anyhow::Result<()> {
    if args.seed_users > 0 {
        env.seed(args.seed_users).await?;
    }
    let mut config = bench_config(env, args);
    config.node.run_pipeline = !args.api_only;
    let engine = Engine::builder(config).start().await?;
    let cpu0 = proc::CpuSnapshot::now();
    let tag = if args.api_only { "api" } else { "full" };
    let started = Instant::now();
    let lat = creates(env, args, tag, false).await?;
    let cpu = proc::CpuSnapshot::since(&cpu0);
    let campaigns_final = if args.api_only {
        None
    } else {
        Some(
            create_latency::campaigns_final(
                &env.db,
                started,
                create_latency::CAMPAIGNS_FINAL_LIMIT,
            )
            .await?,
        )
    };
    let paced = paced_creates(env, args, tag).await?;
    engine.shutdown().await?;
    let cpu1 = proc::CpuSnapshot::now();
    let floor_closed = floor(env, args, false, false).await?;
    let floor_cpu = proc::CpuSnapshot::since(&cpu1);
    let floor_paced = paced_floor(env, args, false).await?;
    let cpu2 = proc::CpuSnapshot::now();
    let commit_closed = floor(env, args, true, false).await?;
    let commit_cpu = proc::CpuSnapshot::since(&cpu2);
    let commit_paced = paced_floor(env, args, true).await?;
    let pace = format!("paced {:.0}/s", args.create_rate);
    let mut rows = vec![
        ("create latency".to_string(), &lat),
        ("floor: no-op reply".to_string(), &floor_closed),
        ("floor: reply after a commit".to_string(), &commit_closed),
    ];
    if let (Some(p), Some(f), Some(c)) = (&paced, &floor_paced, &commit_paced) {
        rows.push((format!("create latency, {pace}"), p));
        rows.push((format!("floor, {pace}"), f));
        rows.push((format!("commit floor, {pace}"), c));
    }
    for (i, (label, l)) in rows.iter().enumerate() {
        println!(
            "{label:<30} {}  ({} requesters x {})",
            l.summary(),
            args.requesters,
            args.requests_each
        );
        if let Some(line) = l.rounds_line() {
            println!("{line}");
        }
        if let (0, Some(done)) = (i, campaigns_final) {
            println!("{}", create_latency::campaigns_final_line(done, lat.len()));
        }
    }
    if let Some(path) = &args.rounds_trace {
        let mut lines = String::new();
        for (label, l) in &rows {
            for v in l.round_trace(label) {
                lines.push_str(&format!("{v}\n"));
            }
        }
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .map_err(|e| anyhow::anyhow!("writing the rounds to {}: {e}", path.display()))?;
    }
    println!(
        "cpu µs per create (requesters in the engine's process): {}",
        cpu.micros_per(lat.len() as f64)
    );
    println!(
        "cpu µs per no-op request (the same requesters):          {}",
        floor_cpu.micros_per(floor_closed.len() as f64)
    );
    println!(
        "cpu µs per request with a commit (the same requesters):  {}",
        commit_cpu.micros_per(commit_closed.len() as f64)
    );
    // Little's law: a closed loop holds `requesters` requests at once, so their mean
    // latency is requesters ÷ throughput, and throughput is at most cores ÷ CPU per request.
    let bound = |cpu: &proc::CpuSnapshot, l: &create_latency::Latencies| {
        let per = cpu.total() / l.len().max(1) as f64;
        let ms = args.requesters as f64 * per / cores().max(1) as f64 * 1e3;
        format!(
            "mean {:.2} ms, bound {ms:.2} ms",
            l.mean().as_secs_f64() * 1e3
        )
    };
    println!(
        "back to back, requesters x cpu per request / {} cores bounds the mean: create {}; no-op {}; commit {}",
        cores(),
        bound(&cpu, &lat),
        bound(&floor_cpu, &floor_closed),
        bound(&commit_cpu, &commit_closed)
    );
    Ok(())
}

/// Seeds `--users` users, then runs the pushes and baselines (in rounds), the create
/// latencies and the ceiling.
async fn measure(env: &TestEnv, args: &Args) -> anyhow::Result<Measured> {
    let t = Instant::now();
    env.seed(args.users).await?;
    // The seed's dirty pages are written now, not by the checkpointer during a measured
    // scenario. Best effort: it needs a role allowed to checkpoint.
    if let Err(e) = env.db.execute_unprepared("CHECKPOINT").await {
        eprintln!("bench: CHECKPOINT after seeding failed ({e}); the seed's writes may land in the first scenario");
    }
    let seed_secs = t.elapsed().as_secs_f64();
    eprintln!("seeded {} users in {seed_secs:.1}s", args.users);

    let rounds = args.rounds.max(1);
    let base_users = args.baseline_users.unwrap_or(args.users.min(200_000));
    let in_flight = (args.push_concurrency * 100).min(args.send_concurrency);
    let mut slows = Vec::new();
    let mut fasts = Vec::new();
    let mut bases = Vec::new();
    for round in 1..=rounds {
        let tag = if rounds > 1 {
            format!("round {round}/{rounds}: ")
        } else {
            String::new()
        };
        eprintln!("{tag}push with {} ms provider latency ...", args.latency_ms);
        slows.push(push(env, args, &format!("latency {round}"), args.latency_ms).await?);
        eprintln!("{tag}push with 0 ms provider latency ...");
        fasts.push(push(env, args, &format!("zero {round}"), 0).await?);
        for r in [&slows[round - 1], &fasts[round - 1]] {
            let (start, tail) = r.start_and_tail.unwrap_or_default();
            eprintln!(
                "  {:.0} users/s, µs per user: {}; peak RSS {:.1} MB (at start {:.1} MB); \
                 first send after {:.0} ms, completed {:.0} ms after the last",
                r.sent as f64 / r.seconds.max(1e-9),
                r.cpu.micros_per(r.sent as f64),
                mb(r.peak_rss as i64),
                mb(r.start_rss as i64),
                start * 1e3,
                tail * 1e3
            );
        }
        if !args.skip_baseline {
            eprintln!("{tag}baseline (one message and GET+SET per user), {base_users} users ...");
            let mut pair = Vec::new();
            for latency in [args.latency_ms, 0] {
                pair.push(
                    baseline::run(
                        &env.nats,
                        &env.config.redis.url,
                        &env.prefix,
                        base_users,
                        latency,
                        in_flight,
                    )
                    .await?,
                );
            }
            let fast_b = pair.pop().expect("two baseline runs");
            let slow_b = pair.pop().expect("two baseline runs");
            bases.push((slow_b, fast_b));
        }
    }

    eprintln!(
        "create latency, {} requesters x {} ...",
        args.requesters, args.requests_each
    );
    let engine = Engine::builder(bench_config(env, args)).start().await?;
    let started = Instant::now();
    let lat = creates(env, args, "full", false).await?;
    let campaigns_final =
        create_latency::campaigns_final(&env.db, started, create_latency::CAMPAIGNS_FINAL_LIMIT)
            .await?;
    let lat_paced = paced_creates(env, args, "full").await?;
    engine.shutdown().await?;
    // The same on a node that serves only the API: the request path without fan-out load.
    let mut api_only = bench_config(env, args);
    api_only.node.run_pipeline = false;
    let engine = Engine::builder(api_only).start().await?;
    let lat_api = creates(env, args, "api", false).await?;
    let lat_api_paced = paced_creates(env, args, "api").await?;
    engine.shutdown().await?;
    let lat_floor = floor(env, args, false, false).await?;
    let lat_floor_paced = paced_floor(env, args, false).await?;
    let lat_commit_floor = floor(env, args, true, false).await?;
    let lat_commit_floor_paced = paced_floor(env, args, true).await?;

    eprintln!("ceiling: raw JetStream publish + consume ...");
    let ceil = ceiling::run(&env.nats, &env.prefix, args.users).await?;

    Ok(Measured {
        seed_secs,
        slows,
        fasts,
        bases,
        lat,
        campaigns_final,
        lat_paced,
        lat_api,
        lat_api_paced,
        lat_floor,
        lat_floor_paced,
        lat_commit_floor,
        lat_commit_floor_paced,
        ceil,
    })
}

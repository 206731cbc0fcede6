//! The full run's report: the table (median rounds, ratios, latencies, ceiling, logins) and
//! the JSON line, printed once every environment is removed.

use serde_json::json;

use crate::{
    baseline::BaselineResult, ceiling::CeilingResult, create_latency::Latencies,
    logins::LoginsResult, proc,
};

/// The flags the report names.
pub struct Run {
    /// Users in the push.
    pub users: i64,
    /// Provider latency of the main push, in ms.
    pub latency_ms: u64,
    /// Paced create rate (0: not measured).
    pub create_rate: f64,
}

#[derive(Clone)]
pub struct PushResult {
    pub seconds: f64,
    /// Resident memory when the push started (left over from earlier scenarios included).
    pub start_rss: u64,
    /// From the create request to the provider's first call, and from its last call's end
    /// to `completed` being seen: the campaign's start and its tail.
    pub start_and_tail: Option<(f64, f64)>,
    pub cpu: proc::CpuSnapshot,
    pub peak_rss: u64,
    pub redis_added: i64,
    pub sent: i64,
    pub duplicates: u64,
    pub missing: u64,
}

/// What the full run measured, printed once its environment is gone.
pub struct Measured {
    pub seed_secs: f64,
    pub slows: Vec<PushResult>,
    pub fasts: Vec<PushResult>,
    pub bases: Vec<(BaselineResult, BaselineResult)>,
    pub lat: Latencies,
    /// When the full node's create-burst campaigns were all final, after the first create.
    pub campaigns_final: Option<std::time::Duration>,
    /// The full node's creates paced at `--create-rate`.
    pub lat_paced: Option<Latencies>,
    pub lat_api: Latencies,
    pub lat_api_paced: Option<Latencies>,
    pub lat_floor: Latencies,
    pub lat_floor_paced: Option<Latencies>,
    /// The floor with a grouped, committed insert before each reply.
    pub lat_commit_floor: Latencies,
    pub lat_commit_floor_paced: Option<Latencies>,
    pub ceil: CeilingResult,
}

/// The rounds of one push scenario as one row: time and CPU of the median round (by
/// users/s); for the bounds (peak RSS, Redis added) the worst round; duplicates and misses
/// summed over all rounds.
pub fn summary(rounds: &[PushResult], rate: impl Fn(&PushResult) -> f64) -> PushResult {
    let mut row = rounds[median_index(&rounds.iter().map(rate).collect::<Vec<_>>())].clone();
    row.peak_rss = rounds.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    row.redis_added = rounds.iter().map(|r| r.redis_added).max().unwrap_or(0);
    row.duplicates = rounds.iter().map(|r| r.duplicates).sum();
    row.missing = rounds.iter().map(|r| r.missing).sum();
    row
}

/// The index of the median value (the lower middle of an even count).
pub fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order[(order.len().max(1) - 1) / 2]
}

pub fn median(values: &[f64]) -> f64 {
    values[median_index(values)]
}

pub fn mb(b: i64) -> f64 {
    b as f64 / 1_048_576.0
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

pub fn print_columns() {
    println!(
        "{:<34} {:>10} {:>12} {:>9} {:>10} {:>11} {:>6} {:>6}",
        "scenario", "seconds", "users/s", "cpu s", "peak RSS", "redis add", "dups", "miss"
    );
}

/// The logins row (rate in logins/s, engine CPU) and a line of detail under it.
pub fn print_logins(r: &LoginsResult) {
    println!(
        "{:<34} {:>10.1} {:>12.0} {:>9.1} {:>8.1}MB {:>9.2}MB {:>6} {:>6}",
        format!("logins, {} lazy coupons (logins/s)", r.coupons),
        r.seconds,
        r.logins_per_sec(),
        r.engine_cpu,
        mb(r.peak_rss as i64),
        mb(r.redis_added),
        r.duplicates,
        r.missing()
    );
    let servers: Vec<String> = r
        .server_cpu
        .iter()
        .map(|(name, cpu)| format!("{name} {cpu:.1}"))
        .collect();
    println!(
        "{:<34} {} logins of {} users; {} items of {} ({:.0} items/s, all in {:.1} s); \
         limited {} of {}, oversold {}; publish {:.1} s; cpu s: publisher {:.1}, {}",
        "",
        r.events,
        r.distinct_users,
        r.items,
        r.expected_items,
        r.items_per_sec(),
        r.items_seconds,
        r.limited_items,
        r.limited_total,
        r.oversold(),
        r.publish_seconds,
        r.publisher_cpu,
        servers.join(", ")
    );
}

/// The table and the JSON line of a full run.
pub fn print_report(run: &Run, m: Measured, login: Option<LoginsResult>) {
    let Measured {
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
    } = m;
    let rounds = slows.len();
    let n = run.users as f64;
    let rate = |secs: f64, users: f64| users / secs.max(1e-9);
    let push_rate = |r: &PushResult| rate(r.seconds, r.sent as f64);
    let base_rate = |b: &BaselineResult| rate(b.seconds, b.users as f64);
    let slow = &summary(&slows, push_rate);
    let fast = &summary(&fasts, push_rate);
    println!();
    println!("herald benchmark: {} users, {} cores", run.users, cores());
    if rounds > 1 {
        println!(
            "(the median round of {rounds} by users/s, with the worst round's peak RSS and \
             Redis figure and every round's duplicates and misses; each round's ratio is \
             under the table)"
        );
    }
    print_columns();
    for (label, r) in [
        (format!("push, provider {} ms", run.latency_ms), slow),
        ("push, provider 0 ms".to_string(), fast),
    ] {
        println!(
            "{:<34} {:>10.1} {:>12.0} {:>9.1} {:>8.1}MB {:>9.2}MB {:>6} {:>6}",
            label,
            r.seconds,
            push_rate(r),
            r.cpu.engine,
            mb(r.peak_rss as i64),
            mb(r.redis_added),
            r.duplicates,
            r.missing
        );
        println!(
            "{:<34} cpu µs per user: {}",
            "",
            r.cpu.micros_per(r.sent as f64)
        );
    }
    let mut json_baseline = json!(null);
    let mut ratio_lines = Vec::new();
    if !bases.is_empty() {
        // Each round's ratio is herald's push over the baseline of the same round.
        let ratios =
            |ours: &[PushResult],
             pick: fn(&(BaselineResult, BaselineResult)) -> &BaselineResult| {
                ours.iter()
                    .zip(&bases)
                    .map(|(o, b)| push_rate(o) / base_rate(pick(b)))
                    .collect::<Vec<f64>>()
            };
        let ratio_latency = ratios(&slows, |b| &b.0);
        let ratio_zero = ratios(&fasts, |b| &b.1);
        let slow_b =
            &bases[median_index(&bases.iter().map(|b| base_rate(&b.0)).collect::<Vec<_>>())].0;
        let fast_b =
            &bases[median_index(&bases.iter().map(|b| base_rate(&b.1)).collect::<Vec<_>>())].1;
        for (label, b, ratio) in [
            (
                format!("baseline, provider {} ms", run.latency_ms),
                slow_b,
                &ratio_latency,
            ),
            ("baseline, provider 0 ms".to_string(), fast_b, &ratio_zero),
        ] {
            println!(
                "{:<34} {:>10.1} {:>12.0} {:>9.1}   herald is {:.1}x  ({} users, {} dups, {} miss)",
                label,
                b.seconds,
                base_rate(b),
                b.cpu.engine,
                median(ratio),
                b.users,
                b.duplicates,
                b.missing
            );
            println!(
                "{:<34} cpu µs per user: {}",
                "",
                b.cpu.micros_per(b.users as f64)
            );
        }
        if rounds > 1 {
            let list = |r: &[f64]| {
                r.iter()
                    .map(|x| format!("{x:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            ratio_lines.push(format!(
                "ratio per round: {} ms: {}; 0 ms: {}",
                run.latency_ms,
                list(&ratio_latency),
                list(&ratio_zero)
            ));
        }
        // A stalled pull makes a baseline round slow for a reason that is not its cost per
        // user, so the rounds it touched are named next to their ratios.
        let stalled: Vec<String> = bases
            .iter()
            .enumerate()
            .flat_map(|(i, (slow, fast))| {
                [(run.latency_ms, slow), (0, fast)]
                    .into_iter()
                    .filter(|(_, b)| b.pull_errors > 0)
                    .map(move |(ms, b)| format!("round {}, {ms} ms: {}", i + 1, b.pull_errors))
            })
            .collect();
        if !stalled.is_empty() {
            ratio_lines.push(format!(
                "baseline pull errors (a stalled consumer; that round's ratio is not a cost \
                 ratio): {}",
                stalled.join("; ")
            ));
        }
        // One figure of every baseline round, the 200 ms runs and the 0 ms runs apart.
        let per_round = |figure: fn(&BaselineResult) -> u64| {
            json!({
                "latency": bases.iter().map(|b| figure(&b.0)).collect::<Vec<_>>(),
                "zero": bases.iter().map(|b| figure(&b.1)).collect::<Vec<_>>(),
            })
        };
        json_baseline = json!({
            "users": slow_b.users,
            "latency_users_per_s": base_rate(slow_b),
            "zero_users_per_s": base_rate(fast_b),
            "ratio_latency": median(&ratio_latency),
            "ratio_zero": median(&ratio_zero),
            "ratio_latency_per_round": ratio_latency,
            "ratio_zero_per_round": ratio_zero,
            "latency_cpu_seconds_by_process": slow_b.cpu.json(),
            "zero_cpu_seconds_by_process": fast_b.cpu.json(),
            "missing_per_round": per_round(|b| b.missing),
            "pull_errors_per_round": per_round(|b| b.pull_errors),
        });
    }
    let mut rows = vec![
        ("create latency".to_string(), &lat),
        ("create latency, API-only node".to_string(), &lat_api),
        ("floor: request/reply, no-op reply".to_string(), &lat_floor),
        ("floor: reply after a commit".to_string(), &lat_commit_floor),
    ];
    if let (Some(full), Some(p), Some(f), Some(c)) = (
        &lat_paced,
        &lat_api_paced,
        &lat_floor_paced,
        &lat_commit_floor_paced,
    ) {
        rows.push((
            format!("create latency, paced {:.0}/s", run.create_rate),
            full,
        ));
        rows.push((format!("API-only, paced {:.0}/s", run.create_rate), p));
        rows.push((format!("floor, paced {:.0}/s", run.create_rate), f));
        rows.push((format!("commit floor, paced {:.0}/s", run.create_rate), c));
    }
    for (i, (label, l)) in rows.into_iter().enumerate() {
        println!("{label:<34} {}  ({} requests)", l.summary(), l.len());
        if let Some(line) = l.rounds_line() {
            println!("{line}");
        }
        if i == 0 {
            println!(
                "{}",
                crate::create_latency::campaigns_final_line(campaigns_final, l.len())
            );
        }
    }
    for line in &ratio_lines {
        println!("{line}");
    }
    println!(
        "{:<34} {:>10.1} {:>12.0}   ({} msgs of {} B, {:.0} msgs/s)",
        "ceiling: raw JetStream pub+sub",
        ceil.seconds,
        rate(ceil.seconds, n),
        ceil.messages,
        ceil.bytes_per_message,
        rate(ceil.seconds, ceil.messages as f64)
    );
    if let Some(r) = &login {
        print_logins(r);
    }
    let line = json!({
        "users": run.users,
        "seed_seconds": seed_secs,
        "rounds": rounds,
        "push_latency_users_per_s_per_round": slows.iter().map(push_rate).collect::<Vec<_>>(),
        "push_zero_users_per_s_per_round": fasts.iter().map(push_rate).collect::<Vec<_>>(),
        "push_latency": {"latency_ms": run.latency_ms, "seconds": slow.seconds, "users_per_s": push_rate(slow), "cpu_seconds": slow.cpu.engine, "cpu_seconds_by_process": slow.cpu.json(), "peak_rss_bytes": slow.peak_rss, "redis_added_bytes": slow.redis_added, "duplicates": slow.duplicates, "missing": slow.missing},
        "push_zero": {"seconds": fast.seconds, "users_per_s": push_rate(fast), "cpu_seconds": fast.cpu.engine, "cpu_seconds_by_process": fast.cpu.json(), "peak_rss_bytes": fast.peak_rss, "redis_added_bytes": fast.redis_added, "duplicates": fast.duplicates, "missing": fast.missing},
        "baseline": json_baseline,
        "create_latency_ms": lat.json(),
        "create_campaigns_final_s": campaigns_final.map(|d| d.as_secs_f64()),
        "create_latency_api_only_ms": lat_api.json(),
        "request_reply_floor_ms": lat_floor.json(),
        "commit_floor_ms": lat_commit_floor.json(),
        "create_rate_per_s": lat_api_paced.as_ref().map(|_| run.create_rate),
        "create_latency_paced_ms": lat_paced.as_ref().map(|l| l.json()),
        "create_latency_api_only_paced_ms": lat_api_paced.as_ref().map(|l| l.json()),
        "request_reply_floor_paced_ms": lat_floor_paced.as_ref().map(|l| l.json()),
        "commit_floor_paced_ms": lat_commit_floor_paced.as_ref().map(|l| l.json()),
        "ceiling": {"seconds": ceil.seconds, "users_per_s": rate(ceil.seconds, n), "messages": ceil.messages},
        "logins": login.as_ref().map(|r| r.json()),
    });
    println!("{line}");
}

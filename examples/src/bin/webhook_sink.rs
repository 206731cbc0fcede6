//! A webhook endpoint for trying herald's webhook provider: it answers `POST /push`, fails a
//! share of requests with 503 or 429 if asked to, and prints what it received every second:
//! successful pushes, distinct users, and duplicates (a user that got two successful pushes).
//!
//! ```text
//! cargo run -p herald-examples --bin webhook-sink -- --port 9000 --fail-503 0.05 --fail-429 0.05
//! HERALD__PROVIDERS__APP__KIND=webhook HERALD__PROVIDERS__APP__URL=http://127.0.0.1:9000/push herald serve
//! ```

use std::time::Duration;

use clap::Parser;
use herald_engine::testkit::{SinkConfig, WebhookSink};

#[derive(Parser)]
#[command(about = "A counting webhook sink for herald's webhook provider")]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Share of requests answered 503 (0..1).
    #[arg(long, default_value_t = 0.0)]
    fail_503: f64,
    /// Share of requests answered 429 (0..1).
    #[arg(long, default_value_t = 0.0)]
    fail_429: f64,
    /// Milliseconds to wait before answering.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = WebhookSink::start(SinkConfig {
        port: args.port,
        fail_503_rate: args.fail_503,
        fail_429_rate: args.fail_429,
        latency_ms: args.latency_ms,
        ..Default::default()
    })
    .await?;
    println!("listening on {}", sink.url());
    let mut last = u64::MAX;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let requests = sink.requests();
        if requests != last {
            println!(
                "requests {requests}  delivered {}  distinct {}  duplicates {}  503 {}  429 {}  malformed {}",
                sink.delivered_total(),
                sink.distinct(),
                sink.duplicates(),
                sink.failures_503(),
                sink.failures_429(),
                sink.malformed()
            );
            last = requests;
        }
    }
    sink.shutdown().await;
    Ok(())
}

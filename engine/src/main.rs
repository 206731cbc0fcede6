//! The `herald` command line: run a node, migrate, seed users, create and watch campaigns,
//! create, claim and inspect coupons, and `herald dev`, the one-command first run.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use herald_engine::{
    api::request,
    config::Config,
    engine::{connect_db, connect_nats, migrate},
    schemas::{
        CampaignStatusReply, CampaignStatusRequest, ClaimCouponReply, ClaimCouponRequest,
        CouponStatusReply, CouponStatusRequest, CreateCampaignReply, CreateCouponReply, Encoding,
        Subjects,
    },
    seed, shutdown_signal, Engine,
};

// The pipeline allocates many small buffers per batch (Redis frames, messages, rows); glibc's
// allocator was a quarter of the engine's instructions in a callgrind profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "herald: campaign push engine on NATS JetStream"
)]
struct Cli {
    /// Config file (TOML); default ./herald.toml when present. Env HERALD__SECTION__KEY overrides.
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM, then drain in-flight work and exit.
    Serve,
    /// Apply pending database migrations.
    Migrate,
    /// Manage demo and test users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Create and inspect campaigns through a running node's NATS API.
    Campaign {
        #[command(subcommand)]
        command: CampaignCommand,
    },
    /// Create, claim and inspect coupons through a running node's NATS API.
    Coupon {
        #[command(subcommand)]
        command: CouponCommand,
    },
    /// First run: start NATS and Redis if absent, SQLite under ./data, seed users, run a node,
    /// create a demo campaign and show its progress until it completes.
    Dev(herald_engine::dev::DevArgs),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Append N users to membership_account (with membership_point and membership_filter),
    /// then vacuum them and refresh their statistics (VACUUM (ANALYZE)).
    Seed {
        /// How many users to add.
        #[arg(long)]
        count: i64,
    },
    /// Print the number of users.
    Count,
}

#[derive(Subcommand)]
enum CampaignCommand {
    /// Create a campaign from a JSON request file ('-' for stdin).
    Create {
        /// The request body (see README: API).
        #[arg(long)]
        file: PathBuf,
        /// Send it as MessagePack instead of JSON.
        #[arg(long)]
        msgpack: bool,
    },
    /// Show a campaign's status and counters.
    Status {
        /// Campaign id.
        id: i64,
        /// Poll until the campaign reaches a final state.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum CouponCommand {
    /// Create a coupon from a JSON request file ('-' for stdin).
    Create {
        /// The request body (see README: Coupons).
        #[arg(long)]
        file: PathBuf,
        /// Send it as MessagePack instead of JSON.
        #[arg(long)]
        msgpack: bool,
    },
    /// Claim a segment coupon for a user.
    Claim {
        /// Coupon id.
        #[arg(long)]
        coupon: i64,
        /// User id.
        #[arg(long)]
        user: i64,
    },
    /// Show a coupon's stock and items issued.
    Status {
        /// Coupon id.
        id: i64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = herald_engine::huge_pages::disable_transparent_huge_pages() {
        tracing::warn!(error = %e, "transparent huge pages stay on: first touches of memory may stall for a page fault");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            let db = connect_db(&config.database.url, 2).await?;
            migrate(&db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Users { command } => {
            let db = connect_db(&config.database.url, 2).await?;
            migrate(&db).await?;
            match command {
                UsersCommand::Seed { count } => {
                    if count < 1 {
                        bail!("--count must be at least 1");
                    }
                    let t = std::time::Instant::now();
                    let r = seed::seed_users(&db, count).await?;
                    println!(
                        "seeded users {}..={} ({count}) in {:.1}s",
                        r.first_id,
                        r.last_id,
                        t.elapsed().as_secs_f64()
                    );
                }
                UsersCommand::Count => println!("{}", seed::count_users(&db).await?),
            }
            Ok(())
        }
        Command::Campaign { command } => campaign(config, command).await,
        Command::Coupon { command } => coupon(config, command).await,
        Command::Dev(args) => herald_engine::dev::run(config, args).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let engine = Engine::start(config).await?;
    shutdown_signal().await;
    tracing::info!("signal received, draining");
    engine.shutdown().await
}

async fn campaign(config: Config, command: CampaignCommand) -> anyhow::Result<()> {
    let nats = connect_nats(&config.nats.url, "herald cli").await?;
    let subjects = Subjects::new(config.nats.prefix.clone());
    match command {
        CampaignCommand::Create { file, msgpack } => {
            let body = read_json(&file)?;
            let enc = if msgpack {
                Encoding::MsgPack
            } else {
                Encoding::Json
            };
            ask::<_, CreateCampaignReply>(&nats, subjects.api_campaign_create(), enc, &body)
                .await?;
        }
        CampaignCommand::Status { id, wait } => loop {
            let reply: Result<CampaignStatusReply, _> = request(
                &nats,
                subjects.api_campaign_status(),
                Encoding::Json,
                &CampaignStatusRequest { campaign_id: id },
                Duration::from_secs(10),
            )
            .await?;
            let r = match reply {
                Ok(r) => r,
                Err(e) => bail!("{}", e.message),
            };
            println!("{}", serde_json::to_string(&r)?);
            if !wait || r.status.is_final() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    }
    Ok(())
}

async fn coupon(config: Config, command: CouponCommand) -> anyhow::Result<()> {
    let nats = connect_nats(&config.nats.url, "herald cli").await?;
    let subjects = Subjects::new(config.nats.prefix.clone());
    let json = Encoding::Json;
    match command {
        CouponCommand::Create { file, msgpack } => {
            let body = read_json(&file)?;
            let enc = if msgpack { Encoding::MsgPack } else { json };
            ask::<_, CreateCouponReply>(&nats, subjects.api_coupon_create(), enc, &body).await?;
        }
        CouponCommand::Claim { coupon, user } => {
            let body = ClaimCouponRequest {
                coupon_id: coupon,
                user_id: user,
            };
            ask::<_, ClaimCouponReply>(&nats, subjects.api_coupon_claim(), json, &body).await?;
        }
        CouponCommand::Status { id } => {
            let body = CouponStatusRequest { coupon_id: id };
            ask::<_, CouponStatusReply>(&nats, subjects.api_coupon_status(), json, &body).await?;
        }
    }
    Ok(())
}

/// Reads a JSON request body from a file, or stdin for `-`.
fn read_json(file: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

/// Sends a request, prints the reply as JSON, or fails with the error code and message.
async fn ask<T: serde::Serialize, R: serde::de::DeserializeOwned + serde::Serialize>(
    nats: &async_nats::Client,
    subject: String,
    encoding: Encoding,
    body: &T,
) -> anyhow::Result<R> {
    match request::<T, R>(nats, subject, encoding, body, Duration::from_secs(10)).await? {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r)?);
            Ok(r)
        }
        Err(e) => bail!(
            "{}: {}",
            serde_json::to_value(e.code)?.as_str().unwrap_or("error"),
            e.message
        ),
    }
}

//! The `herald` command line: run a node, migrate, seed users, create and watch campaigns,
//! and `herald dev`, the one-command first run.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use herald_engine::{
    api::request,
    config::Config,
    engine::{connect_db, connect_nats, migrate},
    schemas::{
        CampaignStatusReply, CampaignStatusRequest, CreateCampaignReply, Encoding, Subjects,
    },
    seed, Engine,
};

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
    /// First run: start NATS and Redis if absent, SQLite under ./data, seed users, run a node,
    /// create a demo campaign and show its progress until it completes.
    Dev(herald_engine::dev::DevArgs),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Append N users to membership_account (with membership_point and membership_filter).
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
        Command::Dev(args) => herald_engine::dev::run(config, args).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let engine = Engine::start(config).await?;
    shutdown_signal().await;
    tracing::info!("signal received, draining");
    engine.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn campaign(config: Config, command: CampaignCommand) -> anyhow::Result<()> {
    let nats = connect_nats(&config.nats.url, "herald cli").await?;
    let subjects = Subjects::new(config.nats.prefix.clone());
    match command {
        CampaignCommand::Create { file, msgpack } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let body: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let enc = if msgpack {
                Encoding::MsgPack
            } else {
                Encoding::Json
            };
            let reply: Result<CreateCampaignReply, _> = request(
                &nats,
                subjects.api_campaign_create(),
                enc,
                &body,
                Duration::from_secs(10),
            )
            .await?;
            match reply {
                Ok(r) => println!("{}", serde_json::to_string(&r)?),
                Err(e) => bail!(
                    "{}: {}",
                    serde_json::to_value(e.code)?.as_str().unwrap_or("error"),
                    e.message
                ),
            }
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

//! `herald dev`: the one-command first run. Starts nats-server (JetStream) and redis-server
//! as child processes when nothing listens on their configured loopback ports, uses the
//! configured database (SQLite under `./data` by default), migrates, seeds demo users, runs a
//! node with a simulated provider, creates a demo campaign through the NATS API like any
//! client would, and shows its progress until it completes. Servers it started are stopped
//! on exit; servers it found running are left alone.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use chrono::Utc;
use herald_schemas::{
    Audience, CampaignKind, CampaignStatusReply, CampaignStatusRequest, CreateCampaignReply,
    CreateCampaignRequest, Encoding, InformType, Subjects,
};
use tokio::process::{Child, Command};

use crate::{
    api::request,
    config::Config,
    engine::{connect_db, migrate},
    providers::{ProviderConfig, SimulatedConfig, SimulatedProvider},
    seed, Engine,
};

/// Options of `herald dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Demo users to seed when the database has none.
    #[arg(long, default_value_t = 10_000)]
    pub users: i64,
    /// Latency of the simulated provider, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// Keep the node running after the demo campaign completes, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Directory for the servers' data and logs.
    #[arg(long, default_value = "data")]
    pub data_dir: String,
}

/// A server process started by `herald dev`, stopped when dropped.
struct ChildServer {
    name: &'static str,
    child: Child,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Err(e) = self.child.start_kill() {
            tracing::warn!(server = self.name, error = %e, "stopping server failed");
        }
    }
}

/// Host and port of a `scheme://host:port/...` URL.
fn loopback_addr(url: &str, default_port: u16) -> Option<SocketAddr> {
    let rest = url.split("://").nth(1)?;
    let hostport = rest.split('/').next()?.rsplit('@').next()?;
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (hostport, default_port),
    };
    match host {
        "127.0.0.1" | "localhost" => Some(SocketAddr::from(([127, 0, 0, 1], port))),
        _ => None,
    }
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

async fn ensure_server(
    name: &'static str,
    url: &str,
    default_port: u16,
    data_dir: &Path,
    args: impl FnOnce(u16, &Path) -> Vec<String>,
) -> anyhow::Result<Option<ChildServer>> {
    let Some(addr) = loopback_addr(url, default_port) else {
        return Ok(None); // a remote server: not ours to start
    };
    if listening(addr) {
        println!("{name}: using the server already listening on {addr}");
        return Ok(None);
    }
    let log = std::fs::File::create(data_dir.join(format!("{name}.log")))?;
    let child = Command::new(name)
        .args(args(addr.port(), data_dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "nothing listens on {addr} and {name} could not be started ({e}); \
                 install it (apt-get install {name}) or run scripts/services.sh"
            )
        })?;
    let server = ChildServer { name, child };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !listening(addr) {
        if Instant::now() > deadline {
            bail!(
                "{name} did not start listening on {addr}; see {}/{name}.log",
                data_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{name}: started on {addr} (pid {})",
        server.child.id().unwrap_or_default()
    );
    Ok(Some(server))
}

/// Runs the demo.
pub async fn run(mut config: Config, args: DevArgs) -> anyhow::Result<()> {
    let data_dir = Path::new(&args.data_dir);
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let _nats = ensure_server(
        "nats-server",
        &config.nats.url,
        4222,
        data_dir,
        |port, dir| {
            vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-js".into(),
                "-sd".into(),
                dir.join("jetstream").display().to_string(),
            ]
        },
    )
    .await?;
    let _redis = ensure_server(
        "redis-server",
        &config.redis.url,
        6379,
        data_dir,
        |port, dir| {
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
            ]
        },
    )
    .await?;

    let db = connect_db(&config.database.url, 4).await?;
    migrate(&db).await?;
    let have = seed::count_users(&db).await?;
    if have == 0 {
        let t = Instant::now();
        seed::seed_users(&db, args.users).await?;
        println!(
            "seeded {} demo users in {:.1}s",
            args.users,
            t.elapsed().as_secs_f64()
        );
    } else {
        println!("database already has {have} users");
    }
    let users = seed::count_users(&db).await?;
    drop(db);

    // A simulated provider for every channel left at the default, so the demo can show that
    // each user got exactly one push.
    let simulated = Arc::new(SimulatedProvider::new(SimulatedConfig {
        latency_ms: args.latency_ms,
        failure_rate: 0.0,
        permanent_failure_rate: 0.0,
    }));
    let ledger = simulated.ledger();
    let mut builder = Engine::builder(config.clone());
    for t in InformType::ALL {
        if config.providers.get(t) == &ProviderConfig::default() {
            builder = builder.provider(t, simulated.clone());
        }
    }
    config.api.enabled = true;
    let engine = builder.start().await?;

    let nats = crate::engine::connect_nats(&config.nats.url, "herald dev client").await?;
    let subjects = Subjects::new(config.nats.prefix.clone());
    let now = Utc::now();
    let req = CreateCampaignRequest {
        kind: CampaignKind::Promotion,
        name: format!("Demo promotion {}", now.format("%Y-%m-%d %H:%M:%S")),
        created_by: "herald-dev".into(),
        starts_at: now,
        ends_at: now + chrono::Duration::days(7),
        inform_type: InformType::App,
        title: "Double 11 is on".into(),
        body: "Open the app for your deal".into(),
        audience: Audience::All,
    };
    let created: CreateCampaignReply = request(
        &nats,
        subjects.api_campaign_create(),
        Encoding::Json,
        &req,
        Duration::from_secs(10),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("create failed: {}", e.message))?;
    println!("created campaign {} for {users} users", created.campaign_id);

    let started = Instant::now();
    let status = loop {
        let s: CampaignStatusReply = request(
            &nats,
            subjects.api_campaign_status(),
            Encoding::Json,
            &CampaignStatusRequest {
                campaign_id: created.campaign_id,
            },
            Duration::from_secs(10),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("status failed: {}", e.message))?;
        println!(
            "campaign {}: {:<9} buckets {}/{}  sent {}  skipped {}  failed {}",
            s.campaign_id,
            s.status.as_str(),
            s.buckets_done,
            s.buckets_total,
            s.sent,
            s.skipped,
            s.failed
        );
        if s.status.is_final() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "done in {secs:.1}s: {} users/s; provider received {} pushes for {} distinct users, {} duplicates",
        (status.sent as f64 / secs.max(0.001)) as u64,
        ledger.total(),
        ledger.distinct(),
        ledger.duplicates()
    );
    if args.keep_running {
        println!("node keeps running; create more campaigns with `herald campaign create --file req.json`; Ctrl-C or SIGTERM stops");
        crate::shutdown_signal().await;
    }
    engine.shutdown().await?;
    if status.status != herald_schemas::CampaignState::Completed {
        bail!(
            "campaign ended {}: {}",
            status.status.as_str(),
            status.error.unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::loopback_addr;

    #[test]
    fn only_loopback_urls_are_ours_to_start() {
        assert_eq!(
            loopback_addr("nats://127.0.0.1:4222", 4222).unwrap().port(),
            4222
        );
        assert_eq!(
            loopback_addr("redis://localhost", 6379).unwrap().port(),
            6379
        );
        assert_eq!(
            loopback_addr("redis://u:p@127.0.0.1:6380/0", 6379)
                .unwrap()
                .port(),
            6380
        );
        assert!(loopback_addr("nats://10.0.0.5:4222", 4222).is_none());
    }
}

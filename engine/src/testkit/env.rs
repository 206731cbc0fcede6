//! An isolated herald environment on the real servers, for integration tests and the
//! benchmark: its own subject/stream prefix, Redis key prefix and PostgreSQL database, torn
//! down by [`TestEnv::cleanup`]. A test runs its body through [`TestEnv::run_test`] (the
//! benchmark through [`TestEnv::run_and_cleanup`]), so the environment goes away even when
//! an assertion fails.

use std::{
    future::Future,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use fred::interfaces::ClientLike;
use futures::{FutureExt, TryStreamExt};
use herald_schemas::{
    CampaignState, CampaignStatusReply, CampaignStatusRequest, CreateCampaignReply,
    CreateCampaignRequest, Encoding, Subjects,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

use crate::{api, config::Config, engine::connect_db, engine::migrate, seed};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The admin URL of the test PostgreSQL server (`HERALD_TEST_PG_URL` overrides). Without TLS:
/// the server is on loopback, where TLS only costs CPU (a handshake per connection and
/// encryption per query), as the README advises for `database.url` on a trusted loopback.
pub fn pg_admin_url() -> String {
    std::env::var("HERALD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// The admin connection, without sqlx's statement log: dropping a 10M-user database takes
/// seconds, and a "slow statement" warning for it is noise.
async fn connect_admin(url: &str) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = sea_orm::ConnectOptions::new(url);
    options.sqlx_logging(false).max_connections(1);
    Database::connect(options).await
}

/// Longest environment name [`TestEnv::new`] takes: with `herald_`, `_` and the prefix
/// (up to 24 bytes), the database name stays within PostgreSQL's 63.
pub const MAX_NAME_LEN: usize = 30;

/// Drops a test database; FORCE ends whatever connection is left.
async fn drop_database(admin_url: &str, db_name: &str) -> Result<(), String> {
    let drop = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
    let admin = connect_admin(admin_url)
        .await
        .map_err(|e| format!("connecting to drop database {db_name}: {e}"))?;
    let stmt = Statement::from_string(admin.get_database_backend(), drop);
    let dropped = admin.execute(stmt).await;
    let _ = admin.close().await;
    dropped
        .map(|_| ())
        .map_err(|e| format!("dropping database {db_name}: {e}"))
}

/// The servers an environment runs on.
#[derive(Debug, Clone)]
pub struct Servers {
    /// NATS URL.
    pub nats: String,
    /// A PostgreSQL URL whose user may create databases; the environment's own database is
    /// made through it and dropped again.
    pub pg_admin: String,
    /// Redis URL.
    pub redis: String,
}

impl Default for Servers {
    /// The shared servers of this machine (the engine's defaults, [`pg_admin_url`]).
    fn default() -> Self {
        let config = Config::default();
        Self {
            nats: config.nats.url,
            pg_admin: pg_admin_url(),
            redis: config.redis.url,
        }
    }
}

/// One isolated environment.
pub struct TestEnv {
    /// Subject, stream and Redis key prefix.
    pub prefix: String,
    /// A config pointing at the environment (PostgreSQL, fast timings for tests).
    pub config: Config,
    /// The environment's database.
    pub db: DatabaseConnection,
    /// A NATS client, as an outside API user would have.
    pub nats: async_nats::Client,
    db_name: String,
    admin_url: String,
}

impl TestEnv {
    /// Creates the database (migrated), and a config with a unique prefix. `name` goes into
    /// the database name, so it takes ASCII letters, digits and `_`, at most
    /// [`MAX_NAME_LEN`] of them (PostgreSQL would cut a longer name short). If a step after
    /// creating the database fails, the database is dropped again.
    pub async fn new(name: &str) -> anyhow::Result<Self> {
        Self::new_on(name, &Servers::default()).await
    }

    /// As [`TestEnv::new`], on `servers`: a [`NatsServer`](super::NatsServer),
    /// [`PgServer`](super::PgServer) or [`RedisServer`](super::RedisServer) of the test's own,
    /// say, where the shared ones are the default.
    pub async fn new_on(name: &str, servers: &Servers) -> anyhow::Result<Self> {
        let admin_url = &servers.pg_admin;
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "test environment name {name:?}: use 1 to {MAX_NAME_LEN} ASCII letters, digits or _"
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        // Letters between the numbers, so no two (pid, n, nanos) give one prefix.
        let prefix = format!("t{}p{}n{}", std::process::id(), n, nanos % 100_000);
        let db_name = format!("herald_{name}_{prefix}").to_ascii_lowercase();
        let admin = connect_admin(admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        admin
            .execute(Statement::from_string(
                admin.get_database_backend(),
                format!("CREATE DATABASE \"{db_name}\""),
            ))
            .await?;
        admin.close().await?;
        match Self::open(prefix, db_name.clone(), servers).await {
            Ok(env) => Ok(env),
            Err(e) => {
                if let Err(d) = drop_database(admin_url, &db_name).await {
                    eprintln!("{d}");
                }
                Err(e)
            }
        }
    }

    /// Creates environments named `names`, or none: if one fails, those made before it are
    /// removed. For a test on several environments (see [`TestEnv::run_test_on`]).
    pub async fn new_all<const N: usize>(names: [&str; N]) -> anyhow::Result<[Self; N]> {
        let mut envs = Vec::with_capacity(N);
        for name in names {
            match Self::new(name).await {
                Ok(env) => envs.push(env),
                Err(e) => {
                    for env in &envs {
                        if let Err(c) = env.cleanup().await {
                            eprintln!("{c:#}");
                        }
                    }
                    return Err(e.context(format!("creating test environment {name}")));
                }
            }
        }
        Ok(envs
            .try_into()
            .unwrap_or_else(|_| unreachable!("one environment per name")))
    }

    /// The config, a migrated pool and a NATS connection for a database just created.
    async fn open(prefix: String, db_name: String, servers: &Servers) -> anyhow::Result<Self> {
        let admin_url = &servers.pg_admin;
        let mut config = Config::default();
        config.nats.url = servers.nats.clone();
        config.redis.url = servers.redis.clone();
        config.nats.prefix = prefix.clone();
        // Keeps the admin URL's parameters (`?sslmode=disable`, say) for the test database.
        config.database.url = herald_migrations::with_database(admin_url, &db_name);
        config.database.max_connections = 10;
        config.pipeline.progress_interval_ms = 200;
        config.pipeline.push.ack_wait_secs = 5;
        config.pipeline.expand.ack_wait_secs = 5;
        config.pipeline.shard.ack_wait_secs = 5;
        config.pipeline.push.retry_base_ms = 200;
        config.pipeline.push.retry_max_ms = 2000;
        config.pipeline.claim_ttl_secs = 10;
        let db = connect_db(&config.database.url, 4).await?;
        migrate(&db).await?;
        let nats = crate::engine::connect_nats(&config.nats.url, "herald test client").await?;
        Ok(Self {
            prefix,
            config,
            db,
            nats,
            db_name,
            admin_url: admin_url.to_string(),
        })
    }

    /// The environment's database name.
    pub fn db_name(&self) -> &str {
        &self.db_name
    }

    /// Subject names of the environment.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(self.prefix.clone())
    }

    /// Adds `count` users.
    pub async fn seed(&self, count: i64) -> anyhow::Result<()> {
        seed::seed_users(&self.db, count).await?;
        Ok(())
    }

    /// Sends a create request (JSON) and returns the reply.
    pub async fn create(
        &self,
        req: &CreateCampaignRequest,
    ) -> anyhow::Result<Result<CreateCampaignReply, herald_schemas::ApiError>> {
        api::request(
            &self.nats,
            self.subjects().api_campaign_create(),
            Encoding::Json,
            req,
            Duration::from_secs(10),
        )
        .await
    }

    /// Sends any API request (JSON) to `subject` and returns the reply.
    pub async fn ask<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        body: &T,
    ) -> anyhow::Result<Result<R, herald_schemas::ApiError>> {
        api::request(
            &self.nats,
            subject,
            Encoding::Json,
            body,
            Duration::from_secs(10),
        )
        .await
    }

    /// Publishes events to the events stream, awaiting every ack.
    pub async fn publish_events(
        &self,
        subject: String,
        payloads: Vec<Vec<u8>>,
    ) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let mut acks = Vec::with_capacity(payloads.len());
        for p in payloads {
            acks.push(js.publish(subject.clone(), p.into()).await?);
            if acks.len() >= 1000 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        Ok(())
    }

    /// Sends a status request.
    pub async fn status(
        &self,
        campaign_id: i64,
    ) -> anyhow::Result<Result<CampaignStatusReply, herald_schemas::ApiError>> {
        api::request(
            &self.nats,
            self.subjects().api_campaign_status(),
            Encoding::Json,
            &CampaignStatusRequest { campaign_id },
            Duration::from_secs(10),
        )
        .await
    }

    /// Polls the status until the campaign is final or `timeout` passes.
    pub async fn wait_final(
        &self,
        campaign_id: i64,
        timeout: Duration,
    ) -> anyhow::Result<CampaignStatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            // No node may be answering for a moment (one restarting): keep asking.
            let last = match self.status(campaign_id).await {
                Ok(Ok(s)) if s.status.is_final() => return Ok(s),
                Ok(Ok(s)) => format!("{s:?}"),
                Ok(Err(e)) => anyhow::bail!("status: {}", e.message),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                anyhow::bail!("campaign {campaign_id} not final after {timeout:?}: {last}");
            }
            // A status read is two one-row queries, so polling often costs little and adds
            // little to the time it measures.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the status until it says completed; fails on another final state.
    pub async fn wait_completed(
        &self,
        campaign_id: i64,
        timeout: Duration,
    ) -> anyhow::Result<CampaignStatusReply> {
        let s = self.wait_final(campaign_id, timeout).await?;
        anyhow::ensure!(s.status == CampaignState::Completed, "campaign ended {s:?}");
        Ok(s)
    }

    /// Deletes the environment's streams (its own and the scratch streams named
    /// `<PREFIX>_<NAME>`), Redis keys and database. Every step is tried, and the failures
    /// are reported together.
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        let js = async_nats::jetstream::new(self.nats.clone());
        let ours = self.subjects().stream_prefix();
        // Listed first and deleted after: deleting while paging could skip a name.
        let listed: Result<Vec<String>, _> = js.stream_names().try_collect().await;
        let streams = match listed {
            // Another prefix can share ours up to a `_` (`herald` and `herald-x`); herald's
            // stream names have none after the prefix.
            Ok(all) => all
                .into_iter()
                .filter(|n| {
                    n.strip_prefix(&ours)
                        .is_some_and(|rest| !rest.contains('_'))
                })
                .collect(),
            Err(e) => {
                failed.push(format!("listing streams: {e}"));
                let s = self.subjects();
                vec![
                    s.campaigns_stream(),
                    s.buckets_stream(),
                    s.push_stream(),
                    s.dead_letter_stream(),
                    s.events_stream(),
                ]
            }
        };
        for stream in streams {
            let _ = js.delete_stream(&stream).await;
        }
        if let Err(e) = self.delete_keys().await {
            failed.push(e);
        }
        // Our own pool first; FORCE ends whatever connection is left.
        let _ = self.db.clone().close().await;
        if let Err(e) = drop_database(&self.admin_url, &self.db_name).await {
            failed.push(e);
        }
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("cleanup of {}: {}", self.prefix, failed.join("; "))
        }
    }

    async fn delete_keys(&self) -> Result<(), String> {
        let pattern = format!("{}:*", self.prefix);
        let redis = herald_actors::markers::connect(&self.config.redis.url, Duration::from_secs(5))
            .await
            .map_err(|e| format!("connecting to redis: {e}"))?;
        let deleted = herald_actors::markers::delete_matching(&redis, &pattern).await;
        let _ = redis.quit().await;
        deleted.map_err(|e| format!("deleting redis keys {pattern}: {e}"))
    }

    /// Runs `work` on this environment, then removes the environment whatever happened:
    /// `work` finished or failed, panicked (a closed stdout makes `println!` panic), or
    /// SIGINT / SIGTERM came first. So an interrupted benchmark leaves no database behind. A
    /// panic goes on after the cleanup; a signal is an error; a failed cleanup after work
    /// that succeeded is reported on stderr and the work's value returned. A second signal
    /// during the cleanup exits the process at once.
    ///
    /// When `work` did not finish, an engine it started may still be stopping (its in-flight
    /// batches end within their ack wait) and write a marker after the keys are deleted, so
    /// the keys are deleted again a second later; what comes later still stays until its TTL.
    pub async fn run_and_cleanup<T>(
        &self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let (ended, cleaned) = run_then_remove(&[self], work).await;
        let report = |what: &str, c: anyhow::Result<()>| {
            if let Err(c) = c {
                eprintln!("cleanup after {what} failed: {c:#}");
            }
        };
        match ended {
            Ended::Finished(Ok(value)) => {
                report("the work", cleaned);
                Ok(value)
            }
            Ended::Finished(Err(e)) => {
                report("an error", cleaned);
                Err(e)
            }
            Ended::Panicked(panic) => {
                report("a panic", cleaned);
                std::panic::resume_unwind(panic)
            }
            Ended::Interrupted => {
                cleaned?;
                anyhow::bail!("interrupted; {} removed", removed(&[self]))
            }
        }
    }

    /// Runs a test's `body` on this environment, then removes the environment whatever
    /// happened, as [`TestEnv::run_and_cleanup`] does, so a failing assertion leaves nothing
    /// behind. Unlike there, a failed cleanup after a passing body is an error: a test checks
    /// that its environment goes away.
    pub async fn run_test(&self, body: impl Future<Output = ()>) -> anyhow::Result<()> {
        Self::run_test_on(&[self], body).await
    }

    /// [`TestEnv::run_test`] for a test on several environments: every one is removed.
    pub async fn run_test_on(
        envs: &[&TestEnv],
        body: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (ended, cleaned) = run_then_remove(envs, body.map(Ok)).await;
        match ended {
            Ended::Finished(r) => r.and(cleaned),
            Ended::Panicked(panic) => {
                if let Err(c) = cleaned {
                    eprintln!("cleanup after a panic failed: {c:#}");
                }
                std::panic::resume_unwind(panic)
            }
            Ended::Interrupted => {
                cleaned.context("interrupted")?;
                anyhow::bail!("interrupted; {} removed", removed(envs))
            }
        }
    }
}

/// How the work handed to [`run_then_remove`] ended.
enum Ended<T> {
    /// It returned, a value or an error.
    Finished(anyhow::Result<T>),
    /// It panicked; the payload, to resume after the cleanup.
    Panicked(Box<dyn std::any::Any + Send>),
    /// SIGINT or SIGTERM came first.
    Interrupted,
}

/// Runs `work`, then removes every one of `envs` whatever happened (see
/// [`TestEnv::run_and_cleanup`]); returns how `work` ended and what the cleanup found. One
/// select over the work and the signal for all environments: nested runs would each watch the
/// signal, and the outer one would drop the inner one in the middle of its cleanup.
async fn run_then_remove<T>(
    envs: &[&TestEnv],
    work: impl Future<Output = anyhow::Result<T>>,
) -> (Ended<T>, anyhow::Result<()>) {
    let ended = tokio::select! {
        r = std::panic::AssertUnwindSafe(work).catch_unwind() => match r {
            Ok(r) => Ended::Finished(r),
            Err(panic) => Ended::Panicked(panic),
        },
        _ = crate::shutdown_signal() => Ended::Interrupted,
    };
    // tokio's handler has replaced the default one, so Ctrl-C no longer ends the process by
    // itself: a second one during the cleanup does.
    let impatient = tokio::spawn(async {
        crate::shutdown_signal().await;
        eprintln!("interrupted again: exiting without finishing the cleanup");
        std::process::exit(130);
    });
    let mut failed = Vec::new();
    for env in envs {
        if let Err(e) = env.cleanup().await {
            failed.push(format!("{e:#}"));
        }
    }
    if !matches!(ended, Ended::Finished(Ok(_))) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for env in envs {
            if let Err(e) = env.delete_keys().await {
                failed.push(e);
            }
        }
    }
    impatient.abort();
    let cleaned = if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(failed.join("; ")))
    };
    (ended, cleaned)
}

/// What the cleanup of `envs` removed, for the message of an interrupted run.
fn removed(envs: &[&TestEnv]) -> String {
    envs.iter()
        .map(|env| {
            format!(
                "database {}, streams {}* and keys {}:*",
                env.db_name,
                env.subjects().stream_prefix(),
                env.prefix
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

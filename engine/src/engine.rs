//! The embeddable engine: [`Engine::start`] connects to NATS, Redis and the database,
//! migrates, creates the streams, and runs the actor tree and the API service on this node.
//! [`Engine::shutdown`] stops pulling new work, lets in-flight work finish and settle, and
//! closes the connections.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use herald_actors::{
    markers::{self, Markers},
    provider::{Provider, Providers},
    store::Store,
    EngineRoot, RootMsg, Shared,
};
use herald_migrations::Migrator;
use herald_nats::{StreamSettings, Topology};
use herald_schemas::{InformType, Subjects};
use ractor::{Actor, ActorRef};
use sea_orm::{
    sqlx::sqlite::SqliteSynchronous, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbBackend,
};
use sea_orm_migration::MigratorTrait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// A running herald node.
pub struct Engine {
    shared: Arc<Shared>,
    root: Option<(ActorRef<RootMsg>, JoinHandle<()>)>,
    api: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

/// Builds an [`Engine`] from a [`Config`], with providers from the config unless set here.
pub struct EngineBuilder {
    config: Config,
    providers: Vec<(InformType, Arc<dyn Provider>)>,
}

impl EngineBuilder {
    /// Uses `provider` for `inform_type` instead of the configured one.
    pub fn provider(mut self, inform_type: InformType, provider: Arc<dyn Provider>) -> Self {
        self.providers.push((inform_type, provider));
        self
    }

    /// Uses `provider` for every inform type.
    pub fn provider_for_all(mut self, provider: Arc<dyn Provider>) -> Self {
        for t in InformType::ALL {
            self.providers.push((t, provider.clone()));
        }
        self
    }

    /// Connects and starts the node.
    pub async fn start(self) -> anyhow::Result<Engine> {
        Engine::start_with(self.config, self.providers).await
    }
}

/// Connects to the database (SQLite in WAL mode, so readers do not block the writer), with
/// one connection open until more are needed.
pub async fn connect_db(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    connect_db_with(url, max_connections, 1).await
}

/// [`connect_db`] with `min_connections` opened before it returns and kept open.
pub async fn connect_db_with(
    url: &str,
    max_connections: u32,
    min_connections: u32,
) -> anyhow::Result<DatabaseConnection> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let file = path.split('?').next().unwrap_or_default();
        if let Some(dir) = std::path::Path::new(file).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
    }
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max_connections)
        .min_connections(min_connections.clamp(1, max_connections.max(1)))
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false)
        // `synchronous` is a setting of each connection, so it is set as each opens; a
        // statement after the connect would reach one connection of the pool.
        .map_sqlx_sqlite_opts(|o| o.synchronous(SqliteSynchronous::Normal));
    let db = Database::connect(opts)
        .await
        .with_context(|| format!("connecting to database {}", redact(url)))?;
    if db.get_database_backend() == DbBackend::Sqlite {
        // The file keeps WAL mode once set. Set once here, not as each connection opens:
        // switching modes takes a lock that connections opening together would race for.
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}

/// Applies pending migrations.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<()> {
    Migrator::up(db, None).await.context("applying migrations")
}

/// Connects to NATS.
pub async fn connect_nats(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match &event {
                async_nats::Event::Connected | async_nats::Event::Closed => {
                    tracing::debug!(event = %event, "nats connection event")
                }
                _ => tracing::warn!(event = %event, "nats connection event"),
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(a)) if a > s => format!("{}://***{}", &url[..s], &url[a..]),
        _ => url.to_string(),
    }
}

impl Engine {
    /// A builder for a node with `config`.
    pub fn builder(config: Config) -> EngineBuilder {
        EngineBuilder {
            config,
            providers: Vec::new(),
        }
    }

    /// Starts a node with the configured providers.
    pub async fn start(config: Config) -> anyhow::Result<Engine> {
        Self::builder(config).start().await
    }

    async fn start_with(
        config: Config,
        overrides: Vec<(InformType, Arc<dyn Provider>)>,
    ) -> anyhow::Result<Engine> {
        config.validate()?;
        let node_id = if config.node.id.is_empty() {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "node".into()),
                std::process::id()
            )
        } else {
            config.node.id.clone()
        };
        let mut providers = Providers::new();
        for t in InformType::ALL {
            providers.insert(t, config.providers.get(t).build()?);
        }
        for (t, p) in overrides {
            providers.insert(t, p);
        }
        let d = &config.database;
        let db = connect_db_with(&d.url, d.max_connections, d.min_connections).await?;
        if config.database.migrate_on_start {
            migrate(&db).await?;
        }
        let redis = markers::connect(
            &config.redis.url,
            Duration::from_millis(config.redis.command_timeout_ms),
        )
        .await
        .with_context(|| format!("connecting to Redis at {}", redact(&config.redis.url)))?;
        let nats = connect_nats(&config.nats.url, &format!("herald {node_id}")).await?;
        let js = async_nats::jetstream::new(nats.clone());
        let subjects = Subjects::new(config.nats.prefix.clone());
        let topology = Topology::new(
            js.clone(),
            subjects.clone(),
            StreamSettings {
                max_age: Duration::from_secs(config.nats.stream_max_age_secs),
                max_bytes: config.nats.stream_max_bytes,
                duplicate_window: Duration::from_secs(config.nats.duplicate_window_secs),
                memory: config.nats.memory_streams,
            },
        );
        topology.ensure_streams().await?;
        let settings = config.pipeline.to_settings();
        let store = Store::new(db);
        let markers = Markers::new(
            redis.clone(),
            &subjects.redis_prefix(),
            settings.claim_ttl,
            settings.marker_ttl,
        );
        let shared = Shared::new(
            node_id.clone(),
            nats.clone(),
            topology,
            store.clone(),
            markers,
            providers,
            settings,
        );
        let stop = CancellationToken::new();
        let api = if config.api.enabled {
            let claim_ttl = shared.settings.claim_ttl;
            Some(crate::api::start(&config, &node_id, redis, nats, claim_ttl, stop.clone()).await?)
        } else {
            None
        };
        let root = if config.node.run_pipeline {
            Some(
                Actor::spawn(None, EngineRoot, shared.clone())
                    .await
                    .context("starting the engine root actor")?,
            )
        } else {
            None
        };
        tracing::info!(node = %node_id, "herald node started");
        Ok(Engine {
            shared,
            root,
            api,
            stop,
        })
    }

    /// Node state shared by the actors.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Ids of the campaigns this node is running.
    pub async fn running_campaigns(&self) -> anyhow::Result<Vec<i64>> {
        match &self.root {
            Some((root, _)) => Ok(ractor::call_t!(root, RootMsg::Running, 5000)?),
            None => Ok(Vec::new()),
        }
    }

    /// Stops pulling new work, lets in-flight work settle, stops the API, flushes NATS.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let drain = self.shared.settings.push.ack_wait * 4;
        if let Some((root, handle)) = self.root.take() {
            root.stop(Some("shutdown".into()));
            if tokio::time::timeout(drain, handle).await.is_err() {
                tracing::warn!("actors did not stop in time");
            }
        }
        if let Some(api) = self.api.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), api).await;
        }
        let _ = self.shared.nats.flush().await;
        tracing::info!(node = %self.shared.node_id, "herald node stopped");
        Ok(())
    }
}

/// An engine dropped without [`Engine::shutdown`] (an embedder's early return, an interrupted
/// benchmark) stops too, without waiting: its API stops answering and its actors stop
/// pulling; in-flight messages not acked are redelivered by JetStream.
impl Drop for Engine {
    fn drop(&mut self) {
        // The API runs on a thread of its own, which would otherwise keep answering.
        self.stop.cancel();
        if let Some((root, _)) = self.root.take() {
            root.stop(Some("engine dropped".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{FromQueryResult, Statement, TransactionTrait};

    use super::*;

    #[derive(FromQueryResult)]
    struct Pragma {
        value: i64,
    }

    /// Every connection of a SQLite pool runs in WAL mode with `synchronous = NORMAL` (1), not
    /// only the first: each transaction below holds a connection of its own.
    #[tokio::test]
    async fn every_sqlite_connection_gets_the_settings() {
        let dir = std::env::temp_dir().join(format!("herald-pragmas-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/herald.db?mode=rwc", dir.display());
        let db = connect_db_with(&url, 3, 3).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(db.begin().await.unwrap());
        }
        for txn in &held {
            let read = |sql: &str| {
                Pragma::find_by_statement(Statement::from_string(DbBackend::Sqlite, sql)).one(txn)
            };
            let sync = read("SELECT synchronous AS value FROM pragma_synchronous")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sync.value, 1);
            let wal = read("SELECT journal_mode = 'wal' AS value FROM pragma_journal_mode")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(wal.value, 1);
        }
        drop(held);
        db.close().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

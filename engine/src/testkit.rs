//! Test helpers that run real servers in-process, for integration tests, demos and the
//! benchmark. [`WebhookSink`] is an HTTP endpoint for the webhook provider that counts what
//! it received and injects failures. [`NatsServer`], [`PgServer`] and [`RedisServer`] are a
//! nats-server, a PostgreSQL cluster and a redis-server of a test's own, to kill and start
//! again.

mod env;
mod nats_server;
mod pg_server;
mod redis_server;
mod requests;
mod segment;
mod server_process;
mod webhook_sink;

pub use env::{pg_admin_url, wait_until, Servers, TestEnv, MAX_NAME_LEN};
pub use nats_server::NatsServer;
pub use pg_server::PgServer;
pub use redis_server::RedisServer;
pub use requests::promotion;
pub use segment::gold_members;
pub use server_process::TestServer;
pub use webhook_sink::{SinkConfig, SinkPush, WebhookSink};

/// The rows of `from`: a table, with a `WHERE` clause if wanted (`"campaign WHERE id > 3"`).
pub async fn count(db: &sea_orm::DatabaseConnection, from: &str) -> Result<i64, sea_orm::DbErr> {
    use sea_orm::{ConnectionTrait, FromQueryResult, Statement};
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    let n = N::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        format!("SELECT COUNT(*) AS n FROM {from}"),
    ))
    .one(db)
    .await?;
    Ok(n.map_or(0, |r| r.n))
}

//! The test kit's own promise, which the benchmark and the integration tests rely on:
//! `TestEnv::run_and_cleanup` and `TestEnv::run_test` remove the environment's database,
//! streams (scratch streams too) and Redis keys whether the work they ran returned, failed or
//! panicked.

use std::panic::AssertUnwindSafe;

use fred::interfaces::{ClientLike, KeysInterface};
use futures::{FutureExt, StreamExt};
use herald_engine::testkit::{pg_admin_url, TestEnv};
use sea_orm::{ConnectionTrait, Database, Statement};

/// A scratch stream under the environment's prefix (as the bench's baseline makes) and a key.
async fn leave_things_behind(env: &TestEnv) {
    let js = async_nats::jetstream::new(env.nats.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: env.subjects().stream("SCRATCH"),
        subjects: vec![format!("{}.scratch", env.prefix)],
        ..Default::default()
    })
    .await
    .unwrap();
    let redis = herald_engine::actors::markers::connect(
        &env.config.redis.url,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let _: () = redis
        .set(format!("{}:scratch", env.prefix), 1, None, None, false)
        .await
        .unwrap();
    let _ = redis.quit().await;
}

/// How many databases have a name `LIKE` the pattern.
async fn databases_like(pattern: &str) -> i64 {
    let admin = Database::connect(&pg_admin_url()).await.unwrap();
    let row = admin
        .query_one(Statement::from_sql_and_values(
            admin.get_database_backend(),
            "SELECT COUNT(*) AS n FROM pg_database WHERE datname LIKE $1",
            [pattern.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    let _ = admin.close().await;
    row.try_get::<i64>("", "n").unwrap()
}

async fn database_exists(env: &TestEnv) -> bool {
    databases_like(env.db_name()).await > 0
}

async fn assert_removed(env: &TestEnv) {
    assert!(!database_exists(env).await, "database left");
    let ours = env.subjects().stream_prefix();
    let js = async_nats::jetstream::new(env.nats.clone());
    let left: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| futures::future::ready(n.starts_with(&ours)))
        .collect()
        .await;
    assert!(left.is_empty(), "streams left: {left:?}");
    let redis = herald_engine::actors::markers::connect(
        &env.config.redis.url,
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let n: i64 = redis
        .exists(format!("{}:scratch", env.prefix))
        .await
        .unwrap();
    assert_eq!(n, 0, "redis key left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_cleanup_returns_the_value_and_removes_everything() {
    let env = TestEnv::new("kitok").await.unwrap();
    let v = env
        .run_and_cleanup(async {
            leave_things_behind(&env).await;
            Ok(42)
        })
        .await
        .unwrap();
    assert_eq!(v, 42);
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_still_removes_everything_and_keeps_its_error() {
    let env = TestEnv::new("kiterr").await.unwrap();
    let r: anyhow::Result<()> = env
        .run_and_cleanup(async {
            leave_things_behind(&env).await;
            anyhow::bail!("the push scenario failed")
        })
        .await;
    assert_eq!(format!("{:#}", r.unwrap_err()), "the push scenario failed");
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_run_removes_everything_then_panics_on() {
    let env = TestEnv::new("kitpanic").await.unwrap();
    let r = AssertUnwindSafe(env.run_and_cleanup(async {
        leave_things_behind(&env).await;
        if env.prefix.is_empty() {
            return Ok(());
        }
        panic!("failed printing to stdout: Broken pipe");
    }))
    .catch_unwind()
    .await;
    let panic = r.expect_err("the panic goes on");
    assert_eq!(
        panic.downcast_ref::<&str>().copied(),
        Some("failed printing to stdout: Broken pipe")
    );
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_the_streams_of_a_longer_prefix_alone() {
    let env = TestEnv::new("kitnear").await.unwrap();
    // The streams of a deployment with prefix `<ours>-x` start with our stream prefix too.
    let neighbour = herald_engine::schemas::Subjects::new(format!("{}-x", env.prefix));
    let js = async_nats::jetstream::new(env.nats.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: neighbour.push_stream(),
        subjects: vec![format!("{}.push.>", neighbour.prefix())],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(neighbour
        .push_stream()
        .starts_with(&env.subjects().stream_prefix()));
    env.cleanup().await.unwrap();
    let kept = js.get_stream(neighbour.push_stream()).await;
    js.delete_stream(neighbour.push_stream()).await.unwrap();
    assert!(kept.is_ok(), "the neighbour's stream was deleted");
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_tries_every_step_and_names_what_failed() {
    let mut env = TestEnv::new("kitredis").await.unwrap();
    leave_things_behind(&env).await;
    let redis_url = env.config.redis.url.clone();
    // Nothing listens on port 1: the Redis step fails, the others still run.
    env.config.redis.url = "redis://127.0.0.1:1".into();
    let e = env.cleanup().await.expect_err("the redis step failed");
    assert!(format!("{e:#}").contains("redis"), "{e:#}");
    env.config.redis.url = redis_url;
    assert!(!database_exists(&env).await, "database dropped");
    env.cleanup().await.unwrap();
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_test_on_two_environments_removes_both_then_panics_on() {
    let [a, b] = TestEnv::new_all(["kittwoa", "kittwob"]).await.unwrap();
    let r = AssertUnwindSafe(TestEnv::run_test_on(&[&a, &b], async {
        leave_things_behind(&a).await;
        leave_things_behind(&b).await;
        if a.prefix.is_empty() {
            return;
        }
        panic!("assertion failed: a test's own check");
    }))
    .catch_unwind()
    .await;
    let panic = r.expect_err("the panic goes on");
    assert_eq!(
        panic.downcast_ref::<&str>().copied(),
        Some("assertion failed: a test's own check")
    );
    assert_removed(&a).await;
    assert_removed(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_whose_cleanup_fails_fails() {
    let mut env = TestEnv::new("kitstrict").await.unwrap();
    leave_things_behind(&env).await;
    let redis_url = env.config.redis.url.clone();
    // Nothing listens on port 1: the Redis step fails after a body that passed.
    env.config.redis.url = "redis://127.0.0.1:1".into();
    let e = env
        .run_test(async {})
        .await
        .expect_err("the cleanup failed");
    assert!(format!("{e:#}").contains("redis"), "{e:#}");
    env.config.redis.url = redis_url;
    env.cleanup().await.unwrap();
    assert_removed(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_made_together_are_all_removed_when_one_cannot_be_made() {
    let e = TestEnv::new_all(["kitallok", "kit-all-bad"])
        .await
        .err()
        .expect("a name with '-' is refused");
    let message = format!("{e:#}");
    assert!(
        message.contains("kit-all-bad") && message.contains("ASCII"),
        "{message}"
    );
    // The first one was made (its prefix starts with this process's id) and is gone again.
    let ours = format!("herald_kitallok_t{}p%", std::process::id());
    assert_eq!(databases_like(&ours).await, 0, "databases {ours} left");

    // PostgreSQL would cut a longer database name short, and the test would then connect to
    // a database that does not exist.
    let long = "x".repeat(herald_engine::testkit::MAX_NAME_LEN + 1);
    let e = TestEnv::new(&long)
        .await
        .err()
        .expect("a long name is refused");
    assert!(format!("{e:#}").contains("ASCII"), "{e:#}");
}

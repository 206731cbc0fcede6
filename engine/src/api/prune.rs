//! Removing dedupe claims long past their window, so the claims' table and its index, which
//! every create writes to, hold about the claims of the last windows rather than one per key
//! ever used.

use std::time::Duration;

use chrono::Utc;
use herald_actors::store::Store;
use tokio_util::sync::CancellationToken;

/// When a node first prunes after it starts: after a start's burst of creates.
const FIRST_AFTER: Duration = Duration::from_secs(60);
/// How often a node prunes.
const EVERY: Duration = Duration::from_secs(300);
/// Claims one statement removes. It runs on the API's own connections, which the creates'
/// inserts use too, so it is kept short. On PostgreSQL, 451 statements removing 450,000
/// claims beside 40,000 live ones took 3.9 ms on average and 15 ms at most; the last, which
/// finds fewer and so reads every claim (nothing indexes their age), 12 ms.
const CHUNK: u64 = 1_000;
/// The pause between two statements of one round: while a backlog goes, a create finds the
/// connection the round uses free about 95% of the time.
const PAUSE: Duration = Duration::from_millis(100);
/// Statements in one round at most; a larger backlog is left for the next rounds.
const MAX_CHUNKS: usize = 500;

/// Every [`EVERY`] until `stop`, removes the claims made more than two windows ago. The claims
/// of the last window are the live ones; the second window is a margin for clocks that
/// differ between nodes. Nodes should share one `api.dedupe_window_secs`: each prunes by its
/// own.
pub(super) async fn expired_claims(store: Store, window: Duration, stop: CancellationToken) {
    let margin =
        chrono::Duration::from_std(window.saturating_mul(2)).unwrap_or(chrono::Duration::MAX);
    let mut wait = FIRST_AFTER;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = EVERY;
        let Some(before) = Utc::now().checked_sub_signed(margin) else {
            continue;
        };
        let removed = round(&store, before, &stop).await;
        if removed > 0 {
            tracing::info!(removed, "removed expired campaign dedupe claims");
        }
    }
}

/// One round: statements of [`CHUNK`] until one removes fewer, [`MAX_CHUNKS`] of them or
/// `stop`. An error ends the round; the next round tries again.
async fn round(store: &Store, before: chrono::DateTime<Utc>, stop: &CancellationToken) -> u64 {
    let mut removed = 0;
    for _ in 0..MAX_CHUNKS {
        match store.prune_dedupe_claims(before, CHUNK).await {
            Ok(n) => {
                removed += n;
                if n < CHUNK {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "removing expired dedupe claims failed; next round retries");
                break;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(PAUSE) => {}
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, Statement};

    use super::*;

    /// Adds `n` claims made at `at`, keyed `{prefix}{i}`.
    async fn add_claims(store: &Store, prefix: &str, n: u64, at: chrono::DateTime<Utc>) {
        let db = store.db();
        db.execute(Statement::from_sql_and_values(
            db.get_database_backend(),
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $1) \
             INSERT INTO campaign_dedupe (dedupe_key, campaign_id, created_at) \
             SELECT $2 || i, i, $3 FROM s",
            [(n as i64).into(), prefix.into(), at.into()],
        ))
        .await
        .unwrap();
    }

    async fn claims(store: &Store) -> i64 {
        crate::testkit::count(store.db(), "campaign_dedupe")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_round_removes_a_backlog_a_chunk_at_a_time_and_keeps_live_claims() {
        let db = crate::engine::connect_db("sqlite::memory:", 1)
            .await
            .unwrap();
        crate::engine::migrate(&db).await.unwrap();
        let store = Store::new(db);
        let now = Utc::now();
        add_claims(
            &store,
            "old ",
            2 * CHUNK + 500,
            now - chrono::Duration::hours(3),
        )
        .await;
        add_claims(&store, "live ", 3, now - chrono::Duration::minutes(5)).await;
        let stop = CancellationToken::new();
        let cut = now - chrono::Duration::hours(1);
        assert_eq!(round(&store, cut, &stop).await, 2 * CHUNK + 500);
        assert_eq!(claims(&store).await, 3, "the live claims stay");
        assert_eq!(round(&store, cut, &stop).await, 0);
    }
}

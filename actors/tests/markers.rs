//! Idempotency markers against the real Redis at 127.0.0.1:6379: claim, confirm, release,
//! claim expiry, block leases shared by overlapping batches, id ranges across bitmap keys,
//! the memory cost of a million confirmed users, and racing claimers. Each test runs under its own key prefix and deletes its keys after.

use std::{
    collections::HashMap,
    future::Future,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fred::{
    clients::Client,
    interfaces::{ClientLike, HashesInterface, KeysInterface},
    types::CustomCommand,
};
use futures::{StreamExt, TryStreamExt};
use herald_actors::markers::{
    block_of, connect, CampaignRef, ClaimState, Markers, Release, Settled, BLOCK_IDS,
};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const CAMPAIGN: i64 = 42;
/// Long enough for any test, short enough that a crashed run's keys go away by themselves.
const MARKER_TTL: Duration = Duration::from_secs(300);

/// A key prefix no other test or run shares.
fn unique_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!(
        "tm{}_{}_{}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `test` with fresh markers under a unique prefix, then deletes every key under that
/// prefix, also when the test panics.
async fn with_markers<F, Fut>(claim_ttl: Duration, test: F)
where
    F: FnOnce(Markers, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let client = connect(REDIS_URL, Duration::from_secs(10))
        .await
        .expect("connect to redis at 127.0.0.1:6379");
    let prefix = unique_prefix();
    let markers = Markers::new(client.clone(), &prefix, claim_ttl, MARKER_TTL);
    let outcome = tokio::spawn(test(markers, prefix.clone())).await;
    let leftovers = keys_under(&client, &prefix).await;
    if !leftovers.is_empty() {
        let _: i64 = client.del(leftovers).await.expect("delete test keys");
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn keys_under(client: &Client, prefix: &str) -> Vec<String> {
    client
        .custom(
            CustomCommand::new_static("KEYS", None::<u16>, false),
            vec![format!("{prefix}:*")],
        )
        .await
        .expect("KEYS")
}

fn bitmap_key(prefix: &str, campaign: i64, user: i64) -> String {
    format!("{prefix}:c:{campaign}.0:done:{}", user >> 20)
}

/// The claims hash of a user's id range, and the field of the user's lease block in it.
fn claim_slot(prefix: &str, campaign: i64, user: i64) -> (String, String) {
    (
        format!("{prefix}:c:{campaign}.0:claims:{}", user >> 20),
        block_of(user & ((1 << 20) - 1)).to_string(),
    )
}

/// Who holds the lease on a user's block: the token part of `token|deadline`.
async fn claim_holder(client: &Client, prefix: &str, campaign: i64, user: i64) -> Option<String> {
    let (key, field) = claim_slot(prefix, campaign, user);
    let v: Option<String> = client.hget(key, field).await.unwrap();
    v.map(|v| v.split('|').next().unwrap_or_default().to_string())
}

async fn memory_usage(client: &Client, key: &str) -> i64 {
    client
        .custom(
            CustomCommand::new_static("MEMORY", None::<u16>, false),
            vec!["USAGE", key],
        )
        .await
        .expect("MEMORY USAGE")
}

/// Polls `check` every 25 ms until it holds or `within` has passed.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn all(state: ClaimState, n: usize) -> Vec<ClaimState> {
    vec![state; n]
}

#[tokio::test]
async fn fresh_users_are_claimed_and_another_token_finds_them_busy() {
    with_markers(Duration::from_secs(30), |m, _| async move {
        let users = [1, 2, 3];
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Claimed, 3)
        );
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Busy, 3)
        );
        // Another campaign's markers are separate.
        assert_eq!(
            m.claim(CAMPAIGN + 1, &users, "b").await.unwrap(),
            all(ClaimState::Claimed, 3)
        );
        // A partly overlapping batch: the overlap's block is busy, a block a never took is
        // free. Users 1..=3 and 40 are in blocks 0 and 1.
        assert_eq!(
            m.claim(CAMPAIGN, &[3, 40], "b").await.unwrap(),
            vec![ClaimState::Busy, ClaimState::Claimed]
        );
        assert!(m.claim(CAMPAIGN, &[], "b").await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn same_token_claiming_again_is_not_someone_elses_claim() {
    // What fred does when it re-sends a claim after a reconnect: the second run of the script
    // finds our own token and must answer Claimed, not Busy.
    with_markers(Duration::from_secs(30), |m, _| async move {
        let users = [10, 11, 12];
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Claimed, 3)
        );
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Claimed, 3)
        );
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Busy, 3)
        );
    })
    .await;
}

#[tokio::test]
async fn confirmed_users_are_done_for_every_token() {
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        let users = [7, 8, 9];
        assert!(!m.is_done(CAMPAIGN, 7).await.unwrap());
        m.claim(CAMPAIGN, &users, "a").await.unwrap();
        let release = Release {
            token: "a",
            users: &users,
        };
        let totals = m
            .confirm_totals(CAMPAIGN, "b1", Settled::Sent, &users, Some(release))
            .await
            .unwrap();
        assert_eq!((totals.sent, totals.failed), (3, 0));
        for token in ["a", "b", "c"] {
            assert_eq!(
                m.claim(CAMPAIGN, &users, token).await.unwrap(),
                all(ClaimState::Done, 3),
                "token {token}"
            );
        }
        for user in users {
            assert!(m.is_done(CAMPAIGN, user).await.unwrap(), "user {user}");
        }
        assert!(!m.is_done(CAMPAIGN, 6).await.unwrap());
        assert!(!m.is_done(CAMPAIGN, 10).await.unwrap());
        // The confirm dropped our lease: only done bits remain.
        for user in users {
            assert_eq!(
                claim_holder(m.client(), &prefix, CAMPAIGN, user).await,
                None,
                "user {user}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn confirming_the_same_users_twice_adds_nothing_to_the_batch_total() {
    with_markers(Duration::from_secs(30), |m, _| async move {
        let first = [100, 101, 102];
        m.claim(CAMPAIGN, &first, "a").await.unwrap();
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &first)
                .await
                .unwrap(),
            3
        );
        // A redelivered batch confirms the same users again.
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &first)
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &first)
                .await
                .unwrap(),
            3
        );
        // Two more users of the same batch, with one repeat among them.
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &[102, 103, 104])
                .await
                .unwrap(),
            5
        );
        // Another batch has its own total.
        assert_eq!(
            m.confirm(CAMPAIGN, "b2", Settled::Sent, &[200])
                .await
                .unwrap(),
            1
        );
        // An empty confirm reads the total without changing it.
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &[]).await.unwrap(),
            5
        );
    })
    .await;
}

#[tokio::test]
async fn sent_and_failed_totals_are_separate() {
    with_markers(Duration::from_secs(30), |m, _| async move {
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &[1, 2, 3])
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Failed, &[4, 5])
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &[]).await.unwrap(),
            3
        );
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Failed, &[6])
                .await
                .unwrap(),
            3
        );
        // A failed user is settled too: nobody claims it again.
        assert_eq!(
            m.claim(CAMPAIGN, &[4, 5, 6], "z").await.unwrap(),
            all(ClaimState::Done, 3)
        );
        // A user settled once does not count again under the other kind.
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &[4])
                .await
                .unwrap(),
            3
        );
    })
    .await;
}

#[tokio::test]
async fn forgetting_batches_drops_only_their_totals_in_every_campaign_named() {
    with_markers(Duration::from_secs(30), |m, _| async move {
        let other = CampaignRef {
            id: CAMPAIGN + 1,
            epoch: 7,
        };
        m.confirm(CAMPAIGN, "1:0", Settled::Sent, &[1, 2])
            .await
            .unwrap();
        m.confirm(CAMPAIGN, "1:0", Settled::Failed, &[3])
            .await
            .unwrap();
        m.confirm(CAMPAIGN, "1:1", Settled::Sent, &[40])
            .await
            .unwrap();
        m.confirm(other, "1:0", Settled::Sent, &[1, 2, 3])
            .await
            .unwrap();
        m.forget_batches(&[(CAMPAIGN.into(), "1:0".into()), (other, "1:0".into())])
            .await
            .unwrap();
        // The forgotten totals start again from nothing; the other batch keeps its own.
        for (campaign, kind) in [
            (CampaignRef::from(CAMPAIGN), Settled::Sent),
            (CAMPAIGN.into(), Settled::Failed),
            (other, Settled::Sent),
        ] {
            assert_eq!(m.confirm(campaign, "1:0", kind, &[]).await.unwrap(), 0);
        }
        assert_eq!(
            m.confirm(CAMPAIGN, "1:1", Settled::Sent, &[])
                .await
                .unwrap(),
            1
        );
        // The users stay done: only the running totals went.
        assert_eq!(
            m.claim(CAMPAIGN, &[1, 2, 3], "z").await.unwrap(),
            all(ClaimState::Done, 3)
        );
    })
    .await;
}

#[tokio::test]
async fn release_lets_another_token_claim() {
    with_markers(Duration::from_secs(30), |m, _| async move {
        let users = [20, 21];
        m.claim(CAMPAIGN, &users, "a").await.unwrap();
        // Only the owner's release counts.
        m.release(CAMPAIGN, &users, "b").await.unwrap();
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Busy, 2)
        );
        m.release(CAMPAIGN, &users, "a").await.unwrap();
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Claimed, 2)
        );
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Busy, 2)
        );
        // Releasing never marks anyone done.
        assert!(!m.is_done(CAMPAIGN, 20).await.unwrap());
        m.release(CAMPAIGN, &[], "b").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_claim_expires_after_claim_ttl() {
    let ttl = Duration::from_millis(300);
    with_markers(ttl, |m, _| async move {
        let users = [30, 31];
        let claimed_at = Instant::now();
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Claimed, 2)
        );
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Busy, 2)
        );
        eventually(Duration::from_secs(5), "the claim to expire", || {
            let m = m.clone();
            async move {
                m.claim(CAMPAIGN, &users, "b").await.unwrap() == all(ClaimState::Claimed, 2)
            }
        })
        .await;
        // Redis expires the key at its TTL, not before (allow for clock granularity).
        assert!(
            claimed_at.elapsed() >= ttl - Duration::from_millis(50),
            "claim expired after {:?}, before its ttl {ttl:?}",
            claimed_at.elapsed()
        );
        // The new claim belongs to b now.
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Busy, 2)
        );
    })
    .await;
}

#[tokio::test]
async fn user_ids_in_different_bitmap_ranges_all_work() {
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        // Around the 2^20 key boundary and far into later ranges.
        let users = [5, 1_048_575, 1_048_576, 3_000_000, 10_000_000];
        assert_eq!(
            m.claim(CAMPAIGN, &users, "a").await.unwrap(),
            all(ClaimState::Claimed, 5)
        );
        assert_eq!(
            m.confirm(CAMPAIGN, "b1", Settled::Sent, &users)
                .await
                .unwrap(),
            5
        );
        for user in users {
            assert!(m.is_done(CAMPAIGN, user).await.unwrap(), "user {user}");
        }
        for user in [4, 6, 1_048_574, 1_048_577, 2_999_999, 3_000_001, 10_000_001] {
            assert!(!m.is_done(CAMPAIGN, user).await.unwrap(), "user {user}");
        }
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Done, 5)
        );

        let bitmaps: Vec<String> = users
            .iter()
            .map(|u| bitmap_key(&prefix, CAMPAIGN, *u))
            .collect();
        let present: i64 = m.client().exists(bitmaps.clone()).await.unwrap();
        assert_eq!(present, 5, "one bitmap per range: {bitmaps:?}");

        m.forget_campaign(CAMPAIGN, 10_000_000).await.unwrap();
        let present: i64 = m.client().exists(bitmaps).await.unwrap();
        assert_eq!(present, 0);
        assert_eq!(keys_under(m.client(), &prefix).await, Vec::<String>::new());
        for user in users {
            assert!(
                !m.is_done(CAMPAIGN, user).await.unwrap(),
                "user {user} after forget"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_million_confirmed_users_cost_bits_not_keys() {
    // Documents the ~1.25 MB per 10M users property: one bit per user, not one key. Redis
    // grows a string below 1 MB by doubling what it needs, so a bitmap holds up to twice its
    // bits' bytes (125 KB here); where the last doubling lands depends on how the batches
    // arrive, so the bound is that, not the bits alone.
    const USERS: i64 = 1_000_000;
    const BATCH: i64 = 1_000;
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        let started = Instant::now();
        futures::stream::iter(0..USERS / BATCH)
            .map(|b| {
                let m = m.clone();
                async move {
                    let users: Vec<i64> = (b * BATCH + 1..=(b + 1) * BATCH).collect();
                    let field = format!("b{b}");
                    let total = m.confirm(CAMPAIGN, &field, Settled::Sent, &users).await?;
                    assert_eq!(total, BATCH, "batch {b}");
                    Ok::<_, herald_actors::markers::MarkerError>(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<()>()
            .await
            .unwrap();
        eprintln!("confirmed {USERS} users in {:?}", started.elapsed());

        for user in [1, 2, 524_288, 999_999, USERS] {
            assert!(m.is_done(CAMPAIGN, user).await.unwrap(), "user {user}");
        }
        assert!(!m.is_done(CAMPAIGN, 0).await.unwrap());
        assert!(!m.is_done(CAMPAIGN, USERS + 1).await.unwrap());

        let mut bitmap_bytes = 0;
        for chunk in 0..=(USERS >> 20) {
            let key = format!("{prefix}:c:{CAMPAIGN}.0:done:{chunk}");
            bitmap_bytes += memory_usage(m.client(), &key).await;
        }
        eprintln!("bitmaps for {USERS} users: {bitmap_bytes} bytes");
        assert!(bitmap_bytes > 0);
        let bits_bytes = USERS / 8;
        assert!(
            bitmap_bytes <= 2 * bits_bytes + 8_192,
            "bitmaps take {bitmap_bytes} bytes for {bits_bytes} bytes of bits"
        );
        // No per-user keys: the bitmaps and the progress hash are all there is.
        let keys = keys_under(m.client(), &prefix).await;
        assert_eq!(keys.len() as i64, (USERS >> 20) + 2, "keys: {keys:?}");

        m.forget_campaign(CAMPAIGN, USERS).await.unwrap();
        assert_eq!(keys_under(m.client(), &prefix).await, Vec::<String>::new());
    })
    .await;
}

#[tokio::test]
async fn racing_claimers_get_each_user_exactly_once() {
    const TASKS: usize = 8;
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        let users: Vec<i64> = (1_000..1_100).collect();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let m = m.clone();
            let barrier = barrier.clone();
            // Each claimer walks the users in its own order and in small batches, so the
            // scripts of different claimers interleave.
            let mut order = users.clone();
            order.rotate_left(t * 13);
            if t % 2 == 1 {
                order.reverse();
            }
            tasks.push(tokio::spawn(async move {
                let token = format!("token-{t}");
                barrier.wait().await;
                let mut won = Vec::new();
                for batch in order.chunks(10) {
                    let states = m.claim(CAMPAIGN, batch, &token).await.unwrap();
                    for (user, state) in batch.iter().zip(states) {
                        assert_ne!(state, ClaimState::Done, "user {user}");
                        if state == ClaimState::Claimed {
                            won.push(*user);
                        }
                    }
                }
                (token, won)
            }));
        }
        let mut owners: HashMap<i64, Vec<String>> = HashMap::new();
        for task in tasks {
            let (token, won) = task.await.unwrap();
            for user in won {
                owners.entry(user).or_default().push(token.clone());
            }
        }
        for user in &users {
            let tokens = owners.get(user).cloned().unwrap_or_default();
            assert_eq!(tokens.len(), 1, "user {user} claimed by {tokens:?}");
            // Redis agrees on who holds it.
            let holder = claim_holder(m.client(), &prefix, CAMPAIGN, *user).await;
            assert_eq!(holder.as_deref(), Some(tokens[0].as_str()), "user {user}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_batch_of_thousands_mixing_done_busy_and_free_users_over_ranges() {
    // The scripts work per id range in slices of a thousand or so arguments: a batch larger
    // than a slice, with its ranges interleaved and a user listed twice, must still answer
    // each user in order.
    with_markers(Duration::from_secs(30), |m, _| async move {
        let users: Vec<i64> = (0..6_000i64)
            .map(|i| if i % 2 == 0 { i } else { (3 << 20) + i })
            .collect();
        // Every third block is leased by b; elsewhere every third user is done.
        let busy_block = |u: &i64| block_of(*u) % 3 == 1;
        let done: Vec<i64> = users
            .iter()
            .copied()
            .filter(|u| !busy_block(u) && u % 3 == 0)
            .collect();
        let busy: Vec<i64> = users.iter().copied().filter(busy_block).collect();
        assert_eq!(
            m.claim(CAMPAIGN, &done, "a").await.unwrap(),
            all(ClaimState::Claimed, done.len())
        );
        let release = Release {
            token: "a",
            users: &done,
        };
        let totals = m
            .confirm_totals(CAMPAIGN, "b1", Settled::Sent, &done, Some(release))
            .await
            .unwrap();
        assert_eq!(totals.sent, done.len() as i64);
        assert_eq!(
            m.claim(CAMPAIGN, &busy, "b").await.unwrap(),
            all(ClaimState::Claimed, busy.len())
        );

        let mut batch = users.clone();
        batch.push(users[5]);
        let expect: Vec<ClaimState> = batch
            .iter()
            .map(|u| {
                if busy_block(u) {
                    ClaimState::Busy
                } else if u % 3 == 0 {
                    ClaimState::Done
                } else {
                    ClaimState::Claimed
                }
            })
            .collect();
        assert_eq!(m.claim(CAMPAIGN, &batch, "c").await.unwrap(), expect);

        // Confirming everything adds only the users not confirmed before, once each, and
        // frees every claim: a third token then finds all of them done.
        let fresh = (batch.len() - 1 - done.len()) as i64;
        assert_eq!(
            m.confirm(CAMPAIGN, "b2", Settled::Sent, &batch)
                .await
                .unwrap(),
            fresh
        );
        assert_eq!(
            m.claim(CAMPAIGN, &batch, "d").await.unwrap(),
            all(ClaimState::Done, batch.len())
        );

        // Release drops only the caller's own claims.
        let later: Vec<i64> = (10_000..12_500).collect();
        m.claim(CAMPAIGN, &later, "e").await.unwrap();
        m.release(CAMPAIGN, &later, "f").await.unwrap();
        assert_eq!(
            m.claim(CAMPAIGN, &later, "g").await.unwrap(),
            all(ClaimState::Busy, later.len())
        );
        m.release(CAMPAIGN, &later, "e").await.unwrap();
        assert_eq!(
            m.claim(CAMPAIGN, &later, "g").await.unwrap(),
            all(ClaimState::Claimed, later.len())
        );
    })
    .await;
}

#[tokio::test]
async fn batches_that_share_a_block_exclude_each_other_whatever_users_they_list() {
    // What a bucket expanded twice with a shifted cut would produce: batches whose users
    // differ but fall in the same block. Only one of them may hold the block.
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        let first: Vec<i64> = (0..10).collect();
        let shifted: Vec<i64> = (5..20).collect();
        let neighbours: Vec<i64> = (10..BLOCK_IDS).collect();
        assert_eq!(
            m.claim(CAMPAIGN, &first, "a").await.unwrap(),
            all(ClaimState::Claimed, first.len())
        );
        assert_eq!(
            m.claim(CAMPAIGN, &shifted, "b").await.unwrap(),
            all(ClaimState::Busy, shifted.len())
        );
        assert_eq!(
            m.claim(CAMPAIGN, &neighbours, "c").await.unwrap(),
            all(ClaimState::Busy, neighbours.len())
        );
        // The next block is free for anyone.
        assert_eq!(
            m.claim(CAMPAIGN, &[BLOCK_IDS], "c").await.unwrap(),
            vec![ClaimState::Claimed]
        );
        // Once a's users are confirmed and its lease dropped, the shifted batch finds a's
        // users done and claims the rest.
        let release = Release {
            token: "a",
            users: &first,
        };
        m.confirm_totals(CAMPAIGN, "a", Settled::Sent, &first, Some(release))
            .await
            .unwrap();
        let expect: Vec<ClaimState> = shifted
            .iter()
            .map(|u| {
                if *u < 10 {
                    ClaimState::Done
                } else {
                    ClaimState::Claimed
                }
            })
            .collect();
        assert_eq!(m.claim(CAMPAIGN, &shifted, "b").await.unwrap(), expect);
        assert_eq!(
            claim_holder(m.client(), &prefix, CAMPAIGN, 0)
                .await
                .as_deref(),
            Some("b")
        );
    })
    .await;
}

#[tokio::test]
async fn a_confirm_keeps_leases_unless_it_releases_and_drops_only_its_own() {
    with_markers(Duration::from_secs(30), |m, prefix| async move {
        let users = [1, 2, 3];
        m.claim(CAMPAIGN, &users, "a").await.unwrap();
        // Without a release the lease stays: the batch has failures still to settle.
        m.confirm(CAMPAIGN, "b1", Settled::Sent, &users[..1])
            .await
            .unwrap();
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            vec![ClaimState::Done, ClaimState::Busy, ClaimState::Busy]
        );
        // Someone else's release in a confirm leaves a's lease alone.
        let theirs = Release {
            token: "b",
            users: &users,
        };
        m.confirm_totals(CAMPAIGN, "b2", Settled::Sent, &[], Some(theirs))
            .await
            .unwrap();
        assert_eq!(
            claim_holder(m.client(), &prefix, CAMPAIGN, 2)
                .await
                .as_deref(),
            Some("a")
        );
        // a settles the rest as failed and releases in the same call.
        let ours = Release {
            token: "a",
            users: &users,
        };
        let totals = m
            .confirm_totals(CAMPAIGN, "b1", Settled::Failed, &users[1..], Some(ours))
            .await
            .unwrap();
        assert_eq!((totals.sent, totals.failed), (1, 2));
        assert_eq!(claim_holder(m.client(), &prefix, CAMPAIGN, 2).await, None);
        assert_eq!(
            m.claim(CAMPAIGN, &users, "b").await.unwrap(),
            all(ClaimState::Done, 3)
        );
    })
    .await;
}

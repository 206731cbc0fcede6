//! [`Ledger`]: counts successful deliveries per `(campaign_id, user_id)`, so a test or the
//! benchmark can say exactly who got a push, who got it twice and who got none.
//!
//! It is sharded (64 mutex-guarded maps keyed by a cheap integer hash) so that many
//! concurrent senders rarely meet on a lock, and a 10M-user campaign costs about 16 bytes
//! of map entry per user.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
};

use super::rng::mix64;

const SHARDS: usize = 64;

/// Deliveries per user of one campaign.
type Users = HashMap<i64, u32, BuildHasherDefault<IdHasher>>;
/// Per campaign, per user.
type Shard = HashMap<i64, Users, BuildHasherDefault<IdHasher>>;

/// Successful deliveries per `(campaign_id, user_id)`, plus attempt counts. Cloning shares
/// the same ledger.
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    shards: [Mutex<Shard>; SHARDS],
    total: AtomicU64,
    distinct: AtomicU64,
    duplicates: AtomicU64,
    attempts: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            total: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        }
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one send attempt, successful or not.
    pub fn record_attempt(&self) {
        self.inner.attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one successful delivery to `user_id` for `campaign_id`; returns how many
    /// deliveries that pair has had now (1 on the first).
    pub fn record_delivery(&self, campaign_id: i64, user_id: i64) -> u32 {
        let mut shard = self.shard(campaign_id, user_id);
        let count = shard
            .entry(campaign_id)
            .or_default()
            .entry(user_id)
            .or_insert(0);
        *count = count.saturating_add(1);
        let count = *count;
        drop(shard);
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        if count == 1 {
            self.inner.distinct.fetch_add(1, Ordering::Relaxed);
        } else {
            self.inner.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        count
    }

    /// Successful deliveries, repeats included.
    pub fn total(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// `(campaign_id, user_id)` pairs delivered at least once.
    pub fn distinct(&self) -> u64 {
        self.inner.distinct.load(Ordering::Relaxed)
    }

    /// Deliveries beyond the first, summed over all pairs: 0 means exactly-once.
    pub fn duplicates(&self) -> u64 {
        self.inner.duplicates.load(Ordering::Relaxed)
    }

    /// Send attempts, failures included.
    pub fn attempts(&self) -> u64 {
        self.inner.attempts.load(Ordering::Relaxed)
    }

    /// Deliveries to `user_id` for `campaign_id`.
    pub fn count(&self, campaign_id: i64, user_id: i64) -> u32 {
        self.shard(campaign_id, user_id)
            .get(&campaign_id)
            .and_then(|users| users.get(&user_id))
            .copied()
            .unwrap_or(0)
    }

    /// The users of `user_ids` that never got a delivery for `campaign_id`, in input order.
    pub fn missing(&self, campaign_id: i64, user_ids: impl Iterator<Item = i64>) -> Vec<i64> {
        user_ids
            .filter(|&user_id| self.count(campaign_id, user_id) == 0)
            .collect()
    }

    /// Forgets everything. Sends that run concurrently may or may not be counted.
    pub fn clear(&self) {
        for shard in &self.inner.shards {
            *lock(shard) = Shard::default();
        }
        self.inner.total.store(0, Ordering::Relaxed);
        self.inner.distinct.store(0, Ordering::Relaxed);
        self.inner.duplicates.store(0, Ordering::Relaxed);
        self.inner.attempts.store(0, Ordering::Relaxed);
    }

    fn shard(&self, campaign_id: i64, user_id: i64) -> MutexGuard<'_, Shard> {
        let hash = mix64((campaign_id as u64).rotate_left(32) ^ user_id as u64);
        lock(&self.inner.shards[(hash % SHARDS as u64) as usize])
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("total", &self.total())
            .field("distinct", &self.distinct())
            .field("duplicates", &self.duplicates())
            .field("attempts", &self.attempts())
            .finish()
    }
}

/// A map of counters is still consistent after a panicking holder: keep using it.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hashes integer ids with one multiply and a mix: far cheaper than SipHash, and ids are not
/// attacker-chosen here.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_totals_distinct_and_duplicates() {
        let ledger = Ledger::new();
        assert_eq!(ledger.record_delivery(1, 10), 1);
        assert_eq!(ledger.record_delivery(1, 10), 2);
        assert_eq!(ledger.record_delivery(1, 10), 3);
        ledger.record_delivery(1, 11);
        ledger.record_delivery(2, 10);
        assert_eq!(ledger.total(), 5);
        assert_eq!(ledger.distinct(), 3);
        assert_eq!(ledger.duplicates(), 2);
        assert_eq!(ledger.count(1, 10), 3);
        assert_eq!(ledger.count(2, 11), 0);
        assert_eq!(ledger.missing(1, 9..=12), vec![9, 12]);

        let shared = ledger.clone();
        shared.clear();
        assert_eq!(
            (ledger.total(), ledger.distinct(), ledger.count(1, 10)),
            (0, 0, 0)
        );
    }

    #[test]
    fn concurrent_recording_loses_nothing() {
        let ledger = Ledger::new();
        std::thread::scope(|s| {
            for t in 0..4 {
                let ledger = &ledger;
                s.spawn(move || {
                    for user in 0..10_000 {
                        ledger.record_delivery(t % 2, user);
                    }
                });
            }
        });
        assert_eq!(ledger.total(), 40_000);
        assert_eq!(ledger.distinct(), 20_000);
        assert_eq!(ledger.duplicates(), 20_000);
        assert!(ledger.missing(0, 0..10_000).is_empty());
    }
}

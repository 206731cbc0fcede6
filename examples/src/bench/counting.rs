//! A provider for the benchmark: sleeps the provider latency per call (a batch call as one,
//! like a provider's batch endpoint) and counts deliveries per user
//! in one byte per user id, so counting 10M users costs 10 MB instead of a hash map that
//! would dwarf the engine's own memory in the peak-RSS figure.

use std::{
    sync::atomic::{AtomicU64, AtomicU8, Ordering},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use herald_engine::{Provider, Push, SendError};

pub struct CountingProvider {
    latency: Duration,
    counts: Vec<AtomicU8>,
    /// When this provider was made; the two below are microseconds after it (0: none yet).
    born: Instant,
    first_call: AtomicU64,
    last_call_end: AtomicU64,
}

impl CountingProvider {
    pub fn new(users: i64, latency_ms: u64) -> Self {
        Self {
            latency: Duration::from_millis(latency_ms),
            counts: (0..=users).map(|_| AtomicU8::new(0)).collect(),
            born: Instant::now(),
            first_call: AtomicU64::new(0),
            last_call_end: AtomicU64::new(0),
        }
    }

    /// When the first batch call came in and when the last one ended, if any did.
    pub fn first_and_last(&self) -> Option<(Instant, Instant)> {
        let at = |us: u64| self.born + Duration::from_micros(us);
        match (
            self.first_call.load(Ordering::Relaxed),
            self.last_call_end.load(Ordering::Relaxed),
        ) {
            (0, _) | (_, 0) => None,
            (first, last) => Some((at(first), at(last))),
        }
    }

    fn now_us(&self) -> u64 {
        (self.born.elapsed().as_micros() as u64).max(1)
    }

    /// (users with more than one delivery, users with none) among ids 1..=users.
    pub fn duplicates_and_misses(&self) -> (u64, u64) {
        let mut dups = 0;
        let mut misses = 0;
        for c in self.counts.iter().skip(1) {
            match c.load(Ordering::Relaxed) {
                0 => misses += 1,
                1 => {}
                _ => dups += 1,
            }
        }
        (dups, misses)
    }
}

#[async_trait]
impl Provider for CountingProvider {
    fn name(&self) -> &str {
        "bench-counting"
    }

    async fn send(&self, push: &Push) -> Result<(), SendError> {
        let mut one = self.send_batch(std::slice::from_ref(push)).await;
        one.pop().expect("one result per push")
    }

    /// One latency for the whole batch, as a provider's batch endpoint takes.
    async fn send_batch(&self, pushes: &[Push]) -> Vec<Result<(), SendError>> {
        let _ = self.first_call.compare_exchange(
            0,
            self.now_us(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let out = pushes.iter().map(|p| self.count(p)).collect();
        self.last_call_end
            .fetch_max(self.now_us(), Ordering::Relaxed);
        out
    }
}

impl CountingProvider {
    fn count(&self, push: &Push) -> Result<(), SendError> {
        match self.counts.get(push.user_id as usize) {
            Some(c) => {
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_add(1))
                });
                Ok(())
            }
            None => Err(SendError::Permanent {
                reason: format!("user {} outside the seeded range", push.user_id),
            }),
        }
    }
}

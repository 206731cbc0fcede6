//! A provider for the benchmark: sleeps the provider latency per call (a batch call as one,
//! like a provider's batch endpoint) and counts deliveries per user
//! in one byte per user id, so counting 10M users costs 10 MB instead of a hash map that
//! would dwarf the engine's own memory in the peak-RSS figure.

use std::{
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use herald_engine::{Provider, Push, SendError};

pub struct CountingProvider {
    latency: Duration,
    counts: Vec<AtomicU8>,
}

impl CountingProvider {
    pub fn new(users: i64, latency_ms: u64) -> Self {
        Self {
            latency: Duration::from_millis(latency_ms),
            counts: (0..=users).map(|_| AtomicU8::new(0)).collect(),
        }
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
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        pushes.iter().map(|p| self.count(p)).collect()
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

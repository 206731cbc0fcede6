//! A tiny lock-free random source (splitmix64 over an atomic counter): enough to pick which
//! simulated sends fail, without a `rand` dependency.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Splitmix64: every call advances a shared counter and mixes it, so concurrent callers
/// never contend on a lock and never see the same value.
#[derive(Debug)]
pub(crate) struct SplitMix64 {
    state: AtomicU64,
}

impl SplitMix64 {
    /// A source that yields the same sequence for the same seed.
    pub(crate) fn with_seed(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    /// A source seeded differently in every process and every instance.
    pub(crate) fn from_entropy() -> Self {
        Self::with_seed(RandomState::new().build_hasher().finish())
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let z = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        mix64(z)
    }

    /// Uniform in `[0, 1)`: `next_f64() < rate` is true for a `rate` share of calls,
    /// always for 1.0 and never for 0.0.
    pub(crate) fn next_f64(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The splitmix64 finaliser: spreads every input bit over the output.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_values_in_range() {
        let a = SplitMix64::with_seed(7);
        let b = SplitMix64::with_seed(7);
        for _ in 0..1000 {
            let (x, y) = (a.next_f64(), b.next_f64());
            assert_eq!(x, y);
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn rate_share_is_roughly_kept() {
        let rng = SplitMix64::with_seed(42);
        let hits = (0..100_000).filter(|_| rng.next_f64() < 0.3).count();
        assert!((28_000..32_000).contains(&hits), "{hits}");
    }
}

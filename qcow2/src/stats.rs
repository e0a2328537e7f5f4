//! Counters bumped from many threads without sharing a cache line between them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const SHARDS: usize = 16;

#[derive(Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// A counter split into per-thread shards: an increment touches only its thread's shard
/// (threads beyond 16 share), a read sums them.
#[derive(Default)]
pub(crate) struct ShardedCounter([Padded; SHARDS]);

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

impl ShardedCounter {
    /// Adds `n`.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let i = SHARD.try_with(|s| *s).unwrap_or(0);
        if let Some(p) = self.0.get(i) {
            p.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The sum over all shards.
    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).fold(0u64, u64::wrapping_add)
    }
}

/// L2 table cache counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Table lookups served from the cache.
    pub hits: u64,
    /// Tables read from the image into the cache.
    pub misses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_threads() {
        let c = std::sync::Arc::new(ShardedCounter::default());
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(1)))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.get(), 20_000);
    }
}

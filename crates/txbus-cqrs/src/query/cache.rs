//! The query result cache: bounded, sharded, with a time to live, and valid only while the
//! checkpoints a query depends on stay where they were when the result was computed.
//!
//! A hit costs a hash, one uncontended lock of one shard, a map lookup, a clock read and a
//! read of each dependency's watch value: no I/O, no await.

use std::any::{Any, TypeId};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Settings of the query cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    max_entries: usize,
    ttl: Duration,
    shards: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            ttl: Duration::from_secs(60),
            shards: 16,
        }
    }
}

impl CacheOptions {
    /// The most results kept; past it the oldest are evicted. 0 turns the cache off.
    /// Default: 10 000.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// How long a result is served at most, even when its dependencies have not moved.
    /// Default: 60 seconds.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How many independently locked shards the cache is split into (at least 1).
    /// Default: 16.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n.max(1);
        self
    }
}

/// Counters of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Queries answered from the cache.
    pub hits: u64,
    /// Queries that ran their handler (no entry, expired, or a dependency moved).
    pub misses: u64,
    /// Results held now.
    pub entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    type_id: TypeId,
    query: Vec<u8>,
}

impl Key {
    pub(crate) fn new(type_id: TypeId, query: Vec<u8>) -> Self {
        Self { type_id, query }
    }
}

/// A cached result, type-erased.
pub(crate) type Value = Arc<dyn Any + Send + Sync>;

struct Entry {
    value: Value,
    checkpoints: Box<[u64]>,
    expires_at: Instant,
    inserted: u64,
}

pub(crate) struct Cache {
    shards: Box<[Mutex<HashMap<Key, Entry>>]>,
    per_shard: usize,
    ttl: Duration,
    tick: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Cache {
    pub(crate) fn new(options: CacheOptions) -> Self {
        let shards = options.shards.max(1).min(options.max_entries.max(1));
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: options.max_entries.div_ceil(shards),
            ttl: options.ttl,
            tick: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.per_shard > 0
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Entry>> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() % self.shards.len() as u64) as usize;
        // A panic while holding a shard cannot leave an entry half-written: the map is
        // only changed by single insert/remove calls. Keep serving.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The result stored for `key`, if it has not expired and every dependency is still at
    /// the checkpoint it was computed at; a stale entry is removed.
    pub(crate) fn get(&self, key: &Key, deps: &[watch::Receiver<u64>]) -> Option<Value> {
        let mut shard = self.shard(key);
        let fresh = shard.get(key).map(|entry| {
            entry.expires_at > Instant::now()
                && entry.checkpoints.len() == deps.len()
                && entry
                    .checkpoints
                    .iter()
                    .zip(deps)
                    .all(|(at, rx)| *rx.borrow() == *at)
        });
        match fresh {
            Some(true) => {
                let value = shard.get(key).map(|e| e.value.clone());
                drop(shard);
                self.hits.fetch_add(1, Ordering::Relaxed);
                value
            }
            Some(false) => {
                shard.remove(key);
                drop(shard);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                drop(shard);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Keeps `value`, computed with the dependencies at `checkpoints`. A full shard drops its
    /// expired entries, then its oldest.
    pub(crate) fn insert(&self, key: Key, value: Value, checkpoints: Box<[u64]>) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let entry = Entry {
            value,
            checkpoints,
            expires_at: now + self.ttl,
            inserted: self.tick.fetch_add(1, Ordering::Relaxed),
        };
        let mut shard = self.shard(&key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.expires_at > now);
            while shard.len() >= self.per_shard {
                let oldest = shard
                    .iter()
                    .min_by_key(|(_, e)| e.inserted)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => shard.remove(&k),
                    None => break,
                };
            }
        }
        shard.insert(key, entry);
    }

    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self
                .shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key::new(TypeId::of::<u8>(), vec![n])
    }

    fn value(n: u32) -> Value {
        Arc::new(n)
    }

    fn read(v: Option<Value>) -> Option<u32> {
        v.and_then(|v| v.downcast_ref::<u32>().copied())
    }

    #[test]
    fn served_while_dependencies_stay() {
        let cache = Cache::new(CacheOptions::default());
        let (tx, rx) = watch::channel(5u64);
        cache.insert(key(1), value(10), vec![5].into());
        assert_eq!(
            read(cache.get(&key(1), std::slice::from_ref(&rx))),
            Some(10)
        );
        tx.send_replace(6);
        assert_eq!(read(cache.get(&key(1), std::slice::from_ref(&rx))), None);
        assert_eq!(cache.stats().entries, 0, "a stale entry is removed");
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().misses, 1);
    }

    #[test]
    fn bounded_by_evicting_the_oldest() {
        let cache = Cache::new(CacheOptions::default().max_entries(4).shards(1));
        for n in 0..10u8 {
            cache.insert(key(n), value(n.into()), Box::new([]));
        }
        assert_eq!(cache.stats().entries, 4);
        assert_eq!(read(cache.get(&key(0), &[])), None);
        assert_eq!(read(cache.get(&key(9), &[])), Some(9));
    }

    #[test]
    fn expires_after_its_ttl() {
        let cache = Cache::new(CacheOptions::default().ttl(Duration::ZERO));
        cache.insert(key(1), value(1), Box::new([]));
        assert_eq!(read(cache.get(&key(1), &[])), None);
    }

    #[test]
    fn zero_entries_turns_it_off() {
        let cache = Cache::new(CacheOptions::default().max_entries(0));
        cache.insert(key(1), value(1), Box::new([]));
        assert_eq!(read(cache.get(&key(1), &[])), None);
    }
}

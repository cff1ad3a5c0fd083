//! The text-embedding cache (L1, in the worker): encoder outputs by
//! (encoder weights, token ids, length, dtype), least recently used first out,
//! bounded by bytes. A farm renders the same prompts over many seeds and
//! sizes; each distinct prompt is encoded once per encoder.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::EngineError;

/// Cache key: SHA-256 of (the encoder's weights identity, see [`crate::identity`], dtype, length, token ids).
pub type CacheKey = [u8; 32];

/// The key of one encoding.
pub fn cache_key(encoder: &[u8; 32], dtype: DType, max_length: usize, ids: &[u32]) -> CacheKey {
    let mut hasher = Sha256::new();
    hasher.update(encoder);
    hasher.update(dtype.as_str().as_bytes());
    hasher.update((max_length as u64).to_le_bytes());
    for id in ids {
        hasher.update(id.to_le_bytes());
    }
    hasher.finalize().into()
}

/// Counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub bytes: usize,
}

struct Entry {
    tensors: Vec<Tensor>,
    bytes: usize,
    tick: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<CacheKey, Entry>,
    recency: BTreeMap<u64, CacheKey>,
    tick: u64,
    stats: CacheStats,
}

/// An LRU cache of encoder outputs, bounded by bytes; `Send + Sync`.
pub struct EmbeddingCache {
    capacity_bytes: usize,
    inner: Mutex<Inner>,
}

fn size_of(tensors: &[Tensor]) -> usize {
    tensors.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
}

impl EmbeddingCache {
    /// A cache holding at most `capacity_bytes` of tensors.
    pub fn new(capacity_bytes: usize) -> Self {
        EmbeddingCache { capacity_bytes, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map is consistent between statements; a panic elsewhere cannot tear it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached tensors for `key`, or `compute()`'s, which are then cached.
    /// Results larger than the whole cache are returned but not kept.
    ///
    /// # Errors
    /// `compute`'s error; nothing is cached then.
    pub fn get_or_insert(
        &self,
        key: CacheKey,
        compute: impl FnOnce() -> Result<Vec<Tensor>, EngineError>,
    ) -> Result<Vec<Tensor>, EngineError> {
        {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some(entry) = inner.entries.get_mut(&key) {
                let old = std::mem::replace(&mut entry.tick, tick);
                let tensors = entry.tensors.clone();
                inner.recency.remove(&old);
                inner.recency.insert(tick, key);
                inner.stats.hits += 1;
                return Ok(tensors);
            }
            inner.stats.misses += 1;
        }
        // Encode outside the lock: other prompts need not wait.
        let tensors = compute()?;
        let bytes = size_of(&tensors);
        if bytes <= self.capacity_bytes {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            if let Some(old) = inner.entries.insert(key, Entry { tensors: tensors.clone(), bytes, tick }) {
                inner.recency.remove(&old.tick);
                inner.stats.bytes -= old.bytes;
            }
            inner.recency.insert(tick, key);
            inner.stats.bytes += bytes;
            while inner.stats.bytes > self.capacity_bytes {
                let Some((_, oldest)) = inner.recency.pop_first() else { break };
                if let Some(evicted) = inner.entries.remove(&oldest) {
                    inner.stats.bytes -= evicted.bytes;
                }
            }
            inner.stats.entries = inner.entries.len();
        }
        Ok(tensors)
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats { entries: inner.entries.len(), ..inner.stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(n: usize) -> Vec<Tensor> {
        vec![Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()]
    }

    #[test]
    fn hits_misses_and_lru_eviction_by_bytes() {
        let cache = EmbeddingCache::new(100); // bytes: room for 25 f32 values
        let key = |i: u32| cache_key(&[0; 32], DType::F32, 77, &[i]);
        let mut computed = 0;
        for i in [1, 2, 1] {
            cache
                .get_or_insert(key(i), || {
                    computed += 1;
                    Ok(tensor(10))
                })
                .unwrap();
        }
        assert_eq!(computed, 2);
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 2, entries: 2, bytes: 80 });
        // A third entry evicts the least recently used one (2, since 1 was just used).
        cache.get_or_insert(key(3), || Ok(tensor(10))).unwrap();
        assert_eq!(cache.stats().entries, 2);
        cache.get_or_insert(key(1), || panic!("1 must still be cached")).unwrap();
        let mut recomputed = false;
        cache
            .get_or_insert(key(2), || {
                recomputed = true;
                Ok(tensor(10))
            })
            .unwrap();
        assert!(recomputed, "2 was evicted");
        assert!(cache.stats().bytes <= 100);
        // Too big to keep: returned, not cached.
        cache.get_or_insert(key(9), || Ok(tensor(1000))).unwrap();
        assert!(cache.stats().bytes <= 100);
    }

    #[test]
    fn keys_tell_encoders_lengths_dtypes_and_ids_apart() {
        let base = cache_key(&[1; 32], DType::F32, 77, &[5, 6]);
        assert_ne!(base, cache_key(&[2; 32], DType::F32, 77, &[5, 6]));
        assert_ne!(base, cache_key(&[1; 32], DType::F16, 77, &[5, 6]));
        assert_ne!(base, cache_key(&[1; 32], DType::F32, 256, &[5, 6]));
        assert_ne!(base, cache_key(&[1; 32], DType::F32, 77, &[6, 5]));
        assert_eq!(base, cache_key(&[1; 32], DType::F32, 77, &[5, 6]));
    }
}

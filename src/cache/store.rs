//! The moka store: bounded by bytes (weigher), each object expiring at its own time (`Expiry`).
//!
//! One moka entry per URL (primary key) holds that URL's `Vary` variants side by side, so a
//! purge by URL removes every variant at once. Purges by prefix and tag scan the store (moka
//! iterates without blocking readers); they return how many stored responses they touched.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use moka::sync::Cache;
use moka::Expiry;

use super::entry::Entry;
use super::key::{KeyHasher, KeyParts, PrehashedKey};

/// Variants of one URL kept side by side at most; the oldest goes first.
const MAX_VARIANTS: usize = 16;

/// All stored variants of one URL.
#[derive(Debug, Default)]
pub struct Object {
    pub variants: Vec<Arc<Entry>>,
}

impl Object {
    fn weight(&self) -> u32 {
        self.variants
            .iter()
            .fold(0u32, |w, e| w.saturating_add(e.weight()))
    }

    fn time_to_live(&self, now: SystemTime) -> Duration {
        self.variants
            .iter()
            .map(|e| e.time_to_live(now))
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Shared cache storage. Cloning is cheap and shares the same store.
#[derive(Clone)]
pub struct Store {
    inner: Cache<u64, Arc<Object>, PrehashedKey>,
    /// URLs recently found uncacheable, with how long to remember it.
    hit_for_miss: Cache<u64, Duration, PrehashedKey>,
    hasher: KeyHasher,
}

struct ObjectExpiry;

impl Expiry<u64, Arc<Object>> for ObjectExpiry {
    fn expire_after_create(
        &self,
        _: &u64,
        value: &Arc<Object>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.time_to_live(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _: &u64,
        value: &Arc<Object>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.time_to_live(SystemTime::now()))
    }
}

struct MarkerExpiry;

impl Expiry<u64, Duration> for MarkerExpiry {
    fn expire_after_create(
        &self,
        _: &u64,
        value: &Duration,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(*value)
    }
}

/// What to purge.
#[derive(Debug, Clone)]
pub enum PurgeTarget<'a> {
    /// Every variant of these exact URLs (both schemes).
    Url {
        host: &'a str,
        path_and_query: &'a str,
    },
    /// Every URL of `host` whose path starts with `prefix`.
    Prefix { host: &'a str, prefix: &'a str },
    /// Every response tagged `tag` (exact match).
    Tag(&'a str),
    /// Everything.
    All,
}

impl Store {
    /// A store holding at most `capacity_bytes` of entries (bodies, headers and overhead).
    pub fn new(capacity_bytes: u64) -> Store {
        let inner = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &u64, v: &Arc<Object>| v.weight())
            .expire_after(ObjectExpiry)
            .build_with_hasher(PrehashedKey);
        let hit_for_miss = Cache::builder()
            .max_capacity(100_000)
            .expire_after(MarkerExpiry)
            .build_with_hasher(PrehashedKey);
        Store {
            inner,
            hit_for_miss,
            hasher: KeyHasher::default(),
        }
    }

    /// The primary key hash for `parts`.
    pub fn hash(&self, parts: &KeyParts<'_>) -> u64 {
        self.hasher.hash(parts)
    }

    /// The stored response for these parts whose `Vary` values match `request`.
    pub fn get(
        &self,
        hash: u64,
        parts: &KeyParts<'_>,
        extra: Option<&str>,
        request: &HeaderMap,
    ) -> Option<Arc<Entry>> {
        let object = self.inner.get(&hash)?;
        object
            .variants
            .iter()
            .rev()
            .find(|e| e.key.matches(parts) && e.vary.matches(request, extra))
            .cloned()
    }

    /// True when anything (any variant) is stored under `hash`.
    pub fn contains(&self, hash: u64) -> bool {
        self.inner.contains_key(&hash)
    }

    /// Stores an entry under `hash`, replacing the variant with the same `Vary` values.
    pub fn insert(&self, hash: u64, entry: Entry) {
        self.insert_shared(hash, entry);
    }

    /// Like [`Store::insert`], returning the stored entry.
    pub fn insert_shared(&self, hash: u64, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        let stored = entry.clone();
        let now = SystemTime::now();
        let mut variants: Vec<Arc<Entry>> = match self.inner.get(&hash) {
            Some(old) => old
                .variants
                .iter()
                .filter(|e| {
                    e.key == entry.key && e.vary != entry.vary && !e.time_to_live(now).is_zero()
                })
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if variants.len() >= MAX_VARIANTS {
            variants.remove(0);
        }
        variants.push(entry);
        // A write to moka costs more than a read; most inserts have no marker to clear.
        if self.hit_for_miss.contains_key(&hash) {
            self.hit_for_miss.invalidate(&hash);
        }
        self.inner.insert(hash, Arc::new(Object { variants }));
        stored
    }

    /// Removes every variant stored under `hash`.
    pub fn remove(&self, hash: u64) {
        self.inner.invalidate(&hash);
    }

    /// Remembers that the URL under `hash` was uncacheable, for `ttl`.
    pub fn mark_hit_for_miss(&self, hash: u64, ttl: Duration) {
        if !ttl.is_zero() {
            self.hit_for_miss.insert(hash, ttl);
        }
    }

    /// True when the URL under `hash` was recently uncacheable.
    pub fn is_hit_for_miss(&self, hash: u64) -> bool {
        self.hit_for_miss.contains_key(&hash)
    }

    /// Purges matching responses; `soft` marks them stale instead of removing them (so
    /// stale-if-error still protects the origin). Returns how many stored responses matched.
    pub fn purge(&self, target: &PurgeTarget<'_>, soft: bool) -> usize {
        let now = SystemTime::now();
        if let PurgeTarget::Url {
            host,
            path_and_query,
        } = target
        {
            let mut n = 0;
            for https in [false, true] {
                let parts = KeyParts {
                    https,
                    host,
                    path_and_query,
                };
                let hash = self.hash(&parts);
                n += self.purge_object(hash, now, soft, &|e: &Entry| e.key.matches(&parts));
            }
            self.hit_for_miss.invalidate_all();
            return n;
        }
        let pred = |e: &Entry| match target {
            PurgeTarget::Prefix { host, prefix } => {
                *e.key.host == **host && e.key.path_and_query.starts_with(*prefix)
            }
            PurgeTarget::Tag(tag) => e.tags.iter().any(|t| **t == **tag),
            PurgeTarget::All => true,
            PurgeTarget::Url { .. } => false,
        };
        let keys: Vec<u64> = self
            .inner
            .iter()
            .filter(|(_, obj)| obj.variants.iter().any(|e| pred(e)))
            .map(|(k, _)| *k)
            .collect();
        let n = keys
            .into_iter()
            .map(|k| self.purge_object(k, now, soft, &pred))
            .sum();
        if matches!(target, PurgeTarget::All) {
            self.hit_for_miss.invalidate_all();
        }
        n
    }

    fn purge_object(
        &self,
        hash: u64,
        now: SystemTime,
        soft: bool,
        pred: &dyn Fn(&Entry) -> bool,
    ) -> usize {
        let Some(obj) = self.inner.get(&hash) else {
            return 0;
        };
        let (hit, keep): (Vec<_>, Vec<_>) = obj.variants.iter().cloned().partition(|e| pred(e));
        if hit.is_empty() {
            return 0;
        }
        if soft {
            for e in &hit {
                e.soft_purge(now);
            }
        } else if keep.is_empty() {
            self.inner.invalidate(&hash);
        } else {
            self.inner.insert(hash, Arc::new(Object { variants: keep }));
        }
        hit.len()
    }

    /// Number of stored URLs (approximate until pending maintenance runs).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Stored bytes as weighed (approximate until pending maintenance runs).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Runs pending maintenance (evictions, counters); for tests and metrics.
    pub fn sync(&self) {
        self.inner.run_pending_tasks();
    }
}

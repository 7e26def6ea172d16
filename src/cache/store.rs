//! The moka store: bounded by bytes (weigher), each entry expiring at its own time (`Expiry`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use moka::sync::Cache;
use moka::Expiry;

use super::entry::Entry;
use super::key::{KeyHasher, KeyParts};

/// Shared cache storage. Cloning is cheap and shares the same store.
#[derive(Clone)]
pub struct Store {
    inner: Cache<u64, Arc<Entry>>,
    hasher: KeyHasher,
}

struct PerEntryExpiry;

impl Expiry<u64, Arc<Entry>> for PerEntryExpiry {
    fn expire_after_create(
        &self,
        _: &u64,
        value: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.time_to_live(SystemTime::now()))
    }

    fn expire_after_update(
        &self,
        _: &u64,
        value: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.time_to_live(SystemTime::now()))
    }
}

impl Store {
    /// A store holding at most `capacity_bytes` of entries (bodies, headers and overhead).
    pub fn new(capacity_bytes: u64) -> Store {
        let inner = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &u64, v: &Arc<Entry>| v.weight())
            .expire_after(PerEntryExpiry)
            .build();
        Store {
            inner,
            hasher: KeyHasher::default(),
        }
    }

    /// The primary key hash for `parts`.
    pub fn hash(&self, parts: &KeyParts<'_>) -> u64 {
        self.hasher.hash(parts)
    }

    /// Looks up a stored response for these parts whose `Vary` values match `request`.
    pub fn get(&self, hash: u64, parts: &KeyParts<'_>, request: &HeaderMap) -> Option<Arc<Entry>> {
        let entry = self.inner.get(&hash)?;
        (entry.key.matches(parts) && entry.vary.matches(request)).then_some(entry)
    }

    /// Stores an entry under `hash`, replacing any previous one.
    pub fn insert(&self, hash: u64, entry: Entry) {
        self.inner.insert(hash, Arc::new(entry));
    }

    /// Removes the entry for `hash`, if any.
    pub fn remove(&self, hash: u64) {
        self.inner.invalidate(&hash);
    }

    /// Number of stored entries (approximate until pending maintenance runs).
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

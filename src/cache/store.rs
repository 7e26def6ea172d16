//! The moka store: bounded by bytes (weigher), each object expiring at its own time (`Expiry`).
//!
//! One moka entry per URL (primary key) holds that URL's `Vary` variants side by side, so a
//! purge by URL removes every variant at once. Purges by prefix and tag scan the store (moka
//! iterates without blocking readers); they return how many stored responses they touched.
//!
//! Within a URL, variants are kept by use: when the list is full, the one used least recently
//! goes, and one never used since it was stored goes before any other. How fast a URL may gain
//! new variants is bounded too ([`Store::admit_variant`]), so a stream of junk values of a
//! varied-on header is served but cannot churn the list.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use tokio::time::Instant;

use super::entry::Entry;
use super::key::{KeyHasher, KeyParts, OwnedKey, PrehashedKey, VaryKey};
use super::policy::NoStoreReason;

// There is no setting for how many variants a URL keeps, so the bounds below are constants
// too. Variants of one URL are few in practice (encodings, a handful of languages); a URL that
// legitimately has more, such as one varying on raw `Accept-Language`, still fills its list
// within about two seconds of demand, and a variant refused meanwhile is answered like a pass.

/// Variants of one URL kept side by side at most; when full, the least recently used goes.
const MAX_VARIANTS: usize = 16;

/// New variants one URL may gain per second, on average (beyond its first).
const NEW_VARIANTS_PER_SECOND: u64 = 4;

/// New variants one URL may gain at once, after a quiet spell.
const NEW_VARIANTS_BURST: u64 = 8;

/// How fast one URL may gain new variants: a token bucket kept as one atomic (GCRA: when the
/// next new variant is due, in microseconds since the store started). Shared by every version
/// of the URL's [`Object`], so replacing the variant list keeps the count.
#[derive(Debug, Default)]
struct VariantBudget {
    next_due: AtomicU64,
}

impl VariantBudget {
    /// Microseconds between two new variants at the sustained rate.
    const INTERVAL: u64 = 1_000_000 / NEW_VARIANTS_PER_SECOND;
    /// How far ahead of `now` the due time may run: the burst.
    const TOLERANCE: u64 = Self::INTERVAL * (NEW_VARIANTS_BURST - 1);

    /// Takes one new variant's allowance at `now` (microseconds since the store started);
    /// false when the burst is spent and the rate has not earned another yet.
    fn take(&self, now: u64) -> bool {
        let mut due = self.next_due.load(Ordering::Relaxed);
        loop {
            let from = due.max(now);
            if from - now > Self::TOLERANCE {
                return false;
            }
            match self.next_due.compare_exchange_weak(
                due,
                from.saturating_add(Self::INTERVAL),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => due = seen,
            }
        }
    }
}

/// All stored variants of one URL. Never changed once stored: a change stores a new version.
#[derive(Debug)]
pub struct Object {
    pub variants: Vec<Arc<Entry>>,
    /// This version of the URL's variant list, from 1, one more at each change. A hit marks
    /// its entry with it ([`Entry::mark_used`]), which orders the variants by last use at the
    /// cost of a load per hit, where a shared counter bumped per hit would be a contended
    /// read-modify-write; uses between two changes of the list need no order, as only a
    /// change evicts.
    version: u64,
    budget: Arc<VariantBudget>,
}

impl Object {
    /// The version after `old` (or a URL's first) holding `variants`.
    fn next(old: Option<&Object>, variants: Vec<Arc<Entry>>) -> Object {
        Object {
            variants,
            version: old.map_or(1, |o| o.version.saturating_add(1)),
            budget: old.map(|o| o.budget.clone()).unwrap_or_default(),
        }
    }

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
    /// The origin of the variant budgets' clock.
    started: Instant,
    /// Where this store's writes go once a resize replaced it ([`Store::resized`]).
    successor: Arc<Successor>,
    /// Objects that left the store, by why (moka's eviction listener counts them).
    removed: Arc<RemovalCounts>,
    /// Set when a resize replaced this store: what its cache drops then is not counted.
    retired: Arc<AtomicBool>,
    /// URLs stored in slices (`proxy::slice`), by the hash of the URL's own key: how many
    /// slice keys each may have, so that a purge by URL reaches every slice. An entry per
    /// sliced URL (large files: few), removed by a hard purge of the URL.
    sliced: Arc<std::sync::Mutex<std::collections::HashMap<u64, u32>>>,
    /// Set once any extent (partial content, `proxy::partial`) has been stored: until then a
    /// miss does not look for one (most origins never send a 206 unasked).
    partials: Arc<AtomicBool>,
}

/// What a resize leaves behind in the store it replaced, for the requests that still hold
/// that store (they began before the reload): their writes and purges go on in the store in
/// service, so nothing stored is lost and nothing purged comes back.
#[derive(Default)]
struct Successor {
    next: OnceLock<Store>,
    /// Held while the entries are copied, and by every purge or removal: a purge cannot
    /// interleave with the copy (an entry copied after it was purged would come back).
    moving: Mutex<()>,
}

/// Objects (URLs) removed from the store since start, by cause, in [`Removals`]' order.
#[derive(Debug, Default)]
struct RemovalCounts([AtomicU64; 4]);

impl RemovalCounts {
    fn count(&self, cause: RemovalCause) {
        let i = match cause {
            RemovalCause::Size => 0,
            RemovalCause::Expired => 1,
            RemovalCause::Explicit => 2,
            RemovalCause::Replaced => 3,
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Objects (all the variants of one URL) that left the store since it started, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removals {
    /// Pushed out to stay within `cache.memory` (moka's admission and LRU).
    pub size: u64,
    /// Past their retention (lifetime and stale windows).
    pub expired: u64,
    /// Removed by a purge (or a hard purge of their last variants).
    pub explicit: u64,
    /// Replaced by a new version of their variant list (a new variant, a refresh, a purge
    /// of some of their variants).
    pub replaced: u64,
}

/// What the store holds, counted by walking it ([`Store::summary`]).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// URLs stored.
    pub objects: u64,
    /// Stored responses (variants) over all URLs.
    pub variants: u64,
    /// Their weight (bytes as weighed against the capacity).
    pub bytes: u64,
    /// The hosts holding the most bytes, most first: host, bytes, objects.
    pub top_hosts: Vec<(Box<str>, u64, u64)>,
}

/// The objects' cache, bounded by weight in bytes, each object expiring at its own time;
/// what it removes is counted in `counts` unless `retired` (a resize replaced it).
fn objects(
    capacity_bytes: u64,
    counts: &Arc<RemovalCounts>,
    retired: &Arc<AtomicBool>,
) -> Cache<u64, Arc<Object>, PrehashedKey> {
    let (counts, retired) = (counts.clone(), retired.clone());
    // Called as moka removes an object (on the writing thread, or its maintenance): one
    // relaxed add, never on the hit path.
    let listener = move |_: Arc<u64>, _: Arc<Object>, cause: RemovalCause| {
        if !retired.load(Ordering::Relaxed) {
            counts.count(cause);
        }
    };
    Cache::builder()
        .max_capacity(capacity_bytes)
        .weigher(|_: &u64, v: &Arc<Object>| v.weight())
        .expire_after(ObjectExpiry)
        .eviction_listener(listener)
        .build_with_hasher(PrehashedKey)
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
        let removed = Arc::new(RemovalCounts::default());
        let retired = Arc::new(AtomicBool::new(false));
        let hit_for_miss = Cache::builder()
            .max_capacity(100_000)
            .expire_after(MarkerExpiry)
            .build_with_hasher(PrehashedKey);
        Store {
            inner: objects(capacity_bytes, &removed, &retired),
            hit_for_miss,
            hasher: KeyHasher::default(),
            started: Instant::now(),
            successor: Arc::default(),
            removed,
            retired,
            sliced: Arc::default(),
            partials: Arc::default(),
        }
    }

    /// The store bounded by `capacity_bytes` that replaces this one (a reload changed
    /// `cache.memory`), holding what this one holds as far as it fits.
    ///
    /// moka fixes a cache's bound when it is built, so a new cache is built and every stored
    /// URL is copied into it (shared, not duplicated: the objects are `Arc`s). A smaller bound
    /// evicts by the new cache's own policy as the copies arrive, so what no longer fits
    /// goes and nothing else. Writes and purges made afterwards through this store (by
    /// requests that began before the swap) are passed on to the new one. Blocking: it walks
    /// the whole store; run it off the async workers.
    pub fn resized(&self, capacity_bytes: u64) -> Store {
        let retired = Arc::new(AtomicBool::new(false));
        let next = Store {
            inner: objects(capacity_bytes, &self.removed, &retired),
            hit_for_miss: self.hit_for_miss.clone(),
            hasher: self.hasher.clone(),
            started: self.started,
            successor: Arc::default(),
            removed: self.removed.clone(),
            retired,
            sliced: self.sliced.clone(),
            partials: self.partials.clone(),
        };
        let _moving = self
            .successor
            .moving
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let next = self.successor.next.get_or_init(|| next).clone();
        for (hash, object) in self.inner.iter() {
            // Not over what a write that already went to `next` stored.
            next.inner.entry(*hash).or_insert(object);
        }
        next.inner.run_pending_tasks();
        // The copies are the ones in service: drop this cache's references now rather than
        // when the last request holding it ends (not counted as purges).
        self.retired.store(true, Ordering::Relaxed);
        self.inner.invalidate_all();
        self.inner.run_pending_tasks();
        next
    }

    /// The store in service after resizes of this one, if any.
    fn successor(&self) -> Option<&Store> {
        self.successor.next.get()
    }

    /// The capacity in bytes this store was built with.
    pub fn capacity(&self) -> u64 {
        self.inner.policy().max_capacity().unwrap_or(0)
    }

    /// The primary key hash for `parts`.
    pub fn hash(&self, parts: &KeyParts<'_>) -> u64 {
        self.hasher.hash(parts)
    }

    /// The stored response for these parts whose `Vary` values match `request`, marked as
    /// used (no allocation, no lock: a load and, when the list changed since, a store).
    pub fn get(
        &self,
        hash: u64,
        parts: &KeyParts<'_>,
        extra: Option<&str>,
        request: &HeaderMap,
    ) -> Option<Arc<Entry>> {
        let Some(object) = self.inner.get(&hash) else {
            // A request that began before a resize looks in the store that replaced this one.
            return self.successor()?.get(hash, parts, extra, request);
        };
        let entry = object
            .variants
            .iter()
            .rev()
            .find(|e| e.key.matches(parts) && e.vary.matches(request, extra))?;
        entry.mark_used(object.version);
        Some(entry.clone())
    }

    /// Whether a response for `key` varying as `vary` may be stored, as far as the URL's
    /// variant count goes: always for a variant already held (stale or not) and for a URL's
    /// first; a new variant takes one from the URL's budget (8 at once, 4 per second after
    /// that). Past it: [`NoStoreReason::VariantRate`], and the response is to be served
    /// without being stored. Ask once per response, before [`Store::insert`], which stores
    /// whatever it is given.
    pub fn admit_variant(
        &self,
        hash: u64,
        key: &OwnedKey,
        vary: &VaryKey,
    ) -> Result<(), NoStoreReason> {
        self.admit_variant_at(hash, key, vary, self.started.elapsed())
    }

    /// [`Store::admit_variant`] at `now`, the time since the store started.
    fn admit_variant_at(
        &self,
        hash: u64,
        key: &OwnedKey,
        vary: &VaryKey,
        now: Duration,
    ) -> Result<(), NoStoreReason> {
        let Some(object) = self.inner.get(&hash) else {
            return match self.successor() {
                Some(next) => next.admit_variant_at(hash, key, vary, now),
                None => Ok(()),
            };
        };
        let mut same_url = false;
        for e in &object.variants {
            if e.key == *key {
                if e.vary == *vary {
                    return Ok(());
                }
                same_url = true;
            }
        }
        // An object of another URL under the same hash would be replaced whole: a first.
        let now = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
        if !same_url || object.budget.take(now) {
            Ok(())
        } else {
            Err(NoStoreReason::VariantRate)
        }
    }

    /// True when anything (any variant) is stored under `hash`.
    pub fn contains(&self, hash: u64) -> bool {
        self.inner.contains_key(&hash) || self.successor().is_some_and(|n| n.contains(hash))
    }

    /// Stores an entry under `hash`, replacing the variant with the same `Vary` values (whose
    /// use it keeps). When the URL already has 16 variants, the one used least recently
    /// goes: first any never used since stored, the oldest of them first.
    pub fn insert(&self, hash: u64, entry: Entry) {
        self.insert_shared(hash, entry);
    }

    /// Like [`Store::insert`], returning the stored entry.
    pub fn insert_shared(&self, hash: u64, entry: Entry) -> Arc<Entry> {
        if let Some(next) = self.successor() {
            return next.insert_shared(hash, entry);
        }
        let entry = Arc::new(entry);
        let stored = entry.clone();
        let now = SystemTime::now();
        let old = self.inner.get(&hash);
        let mut variants: Vec<Arc<Entry>> = Vec::new();
        for e in old.iter().flat_map(|o| o.variants.iter()) {
            if e.key != entry.key {
                continue;
            }
            if e.vary == entry.vary {
                // A refresh or a refetch keeps the use of the entry it replaces.
                entry.mark_used(e.last_used());
            } else if !e.time_to_live(now).is_zero() {
                variants.push(e.clone());
            }
        }
        if variants.len() >= MAX_VARIANTS {
            // `min_by_key` returns the first of equal minima: the list is in the order stored.
            if let Some((i, _)) = variants
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used())
            {
                variants.remove(i);
            }
        }
        variants.push(entry);
        // A write to moka costs more than a read; most inserts have no marker to clear.
        if self.hit_for_miss.contains_key(&hash) {
            self.hit_for_miss.invalidate(&hash);
        }
        let object = Object::next(old.as_deref(), variants);
        self.inner.insert(hash, Arc::new(object));
        stored
    }

    /// Removes every variant stored under `hash`.
    pub fn remove(&self, hash: u64) {
        let _moving = self
            .successor
            .moving
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match self.successor() {
            Some(next) => next.remove(hash),
            None => self.inner.invalidate(&hash),
        }
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
        let _moving = self
            .successor
            .moving
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(next) = self.successor() {
            return next.purge(target, soft);
        }
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
                n += self.purge_slices(&parts, now, soft);
                let partial = Store::partial_path(path_and_query);
                let extent = KeyParts {
                    path_and_query: &partial,
                    ..parts
                };
                let extent_hash = self.hash(&extent);
                n += self.purge_object(extent_hash, now, soft, &|e: &Entry| e.key.matches(&extent));
                // Only this URL's marker: clearing them all would turn collapsing back on for
                // every uncacheable URL on each purge or write.
                self.hit_for_miss.invalidate(&hash);
            }
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
            if !soft {
                self.sliced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
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
            self.inner
                .insert(hash, Arc::new(Object::next(Some(&obj), keep)));
        }
        hit.len()
    }

    /// The key parts of slice `index` of the URL `parts` names: the URL with `#slice=N`
    /// after it (a fragment never reaches a cache, so no request's key is one of these).
    pub fn slice_path(path_and_query: &str, index: u32) -> String {
        format!("{path_and_query}#slice={index}")
    }

    /// The key path of a URL's stored extent (partial content, `proxy::partial`).
    pub fn partial_path(path_and_query: &str) -> String {
        format!("{path_and_query}#partial")
    }

    /// Records that an extent (partial content) is being stored.
    pub fn note_partial(&self) {
        if !self.partials.load(Ordering::Relaxed) {
            self.partials.store(true, Ordering::Relaxed);
        }
    }

    /// Whether any extent was ever stored (see [`Store::note_partial`]).
    pub fn has_partials(&self) -> bool {
        self.partials.load(Ordering::Relaxed)
    }

    /// Records that slice `index` of the URL whose own key hashes to `url_hash` may be
    /// stored, for purges by URL.
    pub fn note_slice(&self, url_hash: u64, index: u32) {
        let mut map = self.sliced.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(url_hash).or_insert(0);
        *n = (*n).max(index.saturating_add(1));
    }

    /// Purges the slices of the URL `parts` (see [`Store::note_slice`]).
    fn purge_slices(&self, parts: &KeyParts<'_>, now: SystemTime, soft: bool) -> usize {
        let url_hash = self.hash(parts);
        let count = {
            let mut map = self.sliced.lock().unwrap_or_else(|p| p.into_inner());
            if soft {
                map.get(&url_hash).copied()
            } else {
                map.remove(&url_hash)
            }
        };
        let Some(count) = count else { return 0 };
        let mut n = 0;
        for i in 0..count {
            let path = Store::slice_path(parts.path_and_query, i);
            let slice = KeyParts {
                path_and_query: &path,
                ..*parts
            };
            let hash = self.hash(&slice);
            n += self.purge_object(hash, now, soft, &|e: &Entry| e.key.matches(&slice));
        }
        n
    }

    /// Number of stored URLs (approximate until pending maintenance runs).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Stored bytes as weighed (approximate until pending maintenance runs).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Every stored variant of a URL, both schemes (`http` first), as a purge by URL finds
    /// them: `host` and `path_and_query` as keyed (`proxy::Proxy::key_of`).
    pub fn variants(&self, host: &str, path_and_query: &str) -> Vec<Arc<Entry>> {
        let mut out = Vec::new();
        for https in [false, true] {
            let parts = KeyParts {
                https,
                host,
                path_and_query,
            };
            if let Some(object) = self.inner.get(&self.hash(&parts)) {
                let of_url = object.variants.iter().filter(|e| e.key.matches(&parts));
                out.extend(of_url.cloned());
            }
        }
        out
    }

    /// Objects removed since the store started, by cause (after pending maintenance).
    pub fn removals(&self) -> Removals {
        self.inner.run_pending_tasks();
        let [size, expired, explicit, replaced] = &self.removed.0;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Removals {
            size: load(size),
            expired: load(expired),
            explicit: load(explicit),
            replaced: load(replaced),
        }
    }

    /// Walks the whole store (moka iterates without blocking readers; for the admin
    /// listener, not the request path): objects, variants, bytes, and the `top` hosts by
    /// bytes.
    pub fn summary(&self, top: usize) -> Summary {
        let mut hosts: std::collections::HashMap<Box<str>, (u64, u64)> = Default::default();
        let mut sum = Summary::default();
        for (_, object) in self.inner.iter() {
            sum.objects += 1;
            sum.variants += object.variants.len() as u64;
            let weight = u64::from(object.weight());
            sum.bytes += weight;
            // Objects sharing a hash (a collision) are one URL's in practice: counted under
            // their first variant's host.
            if let Some(first) = object.variants.first() {
                if let Some(h) = hosts.get_mut(&*first.key.host) {
                    h.0 += weight;
                    h.1 += 1;
                } else {
                    hosts.insert(first.key.host.clone(), (weight, 1));
                }
            }
        }
        let mut hosts: Vec<(Box<str>, u64, u64)> =
            hosts.into_iter().map(|(h, (b, o))| (h, b, o)).collect();
        hosts.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        hosts.truncate(top);
        sum.top_hosts = hosts;
        sum
    }

    /// Runs pending maintenance (evictions, counters); for tests and metrics.
    pub fn sync(&self) {
        self.inner.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderValue, StatusCode};

    use super::*;
    use crate::cache::policy::StoreDecision;

    const URL: KeyParts<'static> = KeyParts {
        https: false,
        host: "site.test",
        path_and_query: "/page",
    };

    /// A request asking for `Accept-Language: lang`.
    fn asking(lang: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(lang) {
            h.insert(http::header::ACCEPT_LANGUAGE, v);
        }
        h
    }

    fn vary(lang: &str) -> VaryKey {
        let mut response = HeaderMap::new();
        response.insert(
            http::header::VARY,
            HeaderValue::from_static("Accept-Language"),
        );
        VaryKey::from_response(&response, &asking(lang))
    }

    /// The `lang` variant of `parts`, fresh for a minute.
    fn variant(parts: &KeyParts<'_>, lang: &str) -> Entry {
        Entry::new(
            OwnedKey::new(parts),
            vary(lang),
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(lang.to_owned()),
            SystemTime::now(),
            Duration::ZERO,
            StoreDecision::fresh_for(Duration::from_secs(60)),
            Box::new([]),
        )
    }

    fn hit(store: &Store, lang: &str) -> bool {
        store
            .get(store.hash(&URL), &URL, None, &asking(lang))
            .is_some()
    }

    fn store_variant(store: &Store, lang: &str) {
        store.insert(store.hash(&URL), variant(&URL, lang));
    }

    /// `n` URLs `/r{i}` stored in `store`, each with a body of `size` bytes.
    fn fill_urls(store: &Store, n: usize, size: usize) {
        for i in 0..n {
            let path = format!("/r{i}");
            let parts = KeyParts {
                path_and_query: &path,
                ..URL
            };
            let mut e = variant(&parts, "en");
            e.body = Bytes::from(vec![b'x'; size]);
            store.insert(store.hash(&parts), e);
        }
        store.sync();
    }

    fn holds(store: &Store, i: usize) -> bool {
        let path = format!("/r{i}");
        let parts = KeyParts {
            path_and_query: &path,
            ..URL
        };
        store
            .get(store.hash(&parts), &parts, None, &asking("en"))
            .is_some()
    }

    #[test]
    fn a_larger_store_keeps_everything_the_smaller_held() {
        let store = Store::new(1 << 20);
        fill_urls(&store, 100, 1000);
        let before = store.entry_count();
        assert_eq!(before, 100);
        let bigger = store.resized(1 << 30);
        bigger.sync();
        assert_eq!(bigger.capacity(), 1 << 30);
        assert_eq!(bigger.entry_count(), 100);
        assert!((0..100).all(|i| holds(&bigger, i)));
    }

    #[test]
    fn a_smaller_store_evicts_only_what_no_longer_fits() {
        let store = Store::new(1 << 30);
        fill_urls(&store, 200, 10_000);
        let smaller = store.resized(500_000);
        smaller.sync();
        assert!(
            smaller.weighted_size() <= 500_000,
            "{}",
            smaller.weighted_size()
        );
        let kept = (0..200).filter(|&i| holds(&smaller, i)).count();
        // About 40 objects of ~10 KB fit in 500 KB; what fits is kept.
        assert!(kept >= 30, "only {kept} kept");
        assert!(kept < 60, "{kept} kept");
    }

    #[test]
    fn writes_and_purges_through_a_replaced_store_reach_the_new_one() {
        let old = Store::new(1 << 30);
        store_variant(&old, "en");
        let new = old.resized(1 << 29);
        // A request that began before the swap still holds `old`.
        assert!(hit(&old, "en"), "reads fall through to the new store");
        store_variant(&old, "de");
        assert!(
            hit(&new, "de"),
            "a write through the old store lands in the new one"
        );
        let purged = old.purge(
            &PurgeTarget::Url {
                host: URL.host,
                path_and_query: URL.path_and_query,
            },
            false,
        );
        assert_eq!(purged, 2);
        assert!(!hit(&new, "en") && !hit(&new, "de"));
        // A resize after the purge does not bring anything back.
        let newer = new.resized(1 << 28);
        assert!(!hit(&newer, "en"));
    }

    #[test]
    fn removals_are_counted_by_cause() {
        let store = Store::new(1 << 30);
        store_variant(&store, "en");
        store_variant(&store, "fr");
        store.purge(
            &PurgeTarget::Url {
                host: URL.host,
                path_and_query: URL.path_and_query,
            },
            false,
        );
        let r = store.removals();
        assert_eq!((r.replaced, r.explicit, r.size), (1, 1, 0), "{r:?}");
    }

    #[test]
    fn summary_lists_hosts_by_bytes_and_variants_by_url() {
        let store = Store::new(1 << 30);
        store_variant(&store, "en");
        store_variant(&store, "fr");
        let other = KeyParts {
            host: "small.test",
            ..URL
        };
        store.insert(store.hash(&other), variant(&other, "en"));
        store.sync();
        let s = store.summary(10);
        assert_eq!((s.objects, s.variants), (2, 3));
        let hosts: Vec<(&str, u64)> = s.top_hosts.iter().map(|h| (&*h.0, h.2)).collect();
        assert_eq!(hosts, [("site.test", 1), ("small.test", 1)]);
        assert_eq!(s.bytes, s.top_hosts.iter().map(|h| h.1).sum::<u64>());
        assert_eq!(store.summary(1).top_hosts.len(), 1);
        let v = store.variants(URL.host, URL.path_and_query);
        let langs: Vec<&[u8]> = v.iter().map(|e| &e.body[..]).collect();
        assert_eq!(langs, [&b"en"[..], b"fr"]);
        assert!(store.variants(URL.host, "/none").is_empty());
    }

    #[test]
    fn a_url_purge_clears_only_that_urls_hit_for_miss_marker() {
        let store = Store::new(1 << 30);
        let other = KeyParts {
            path_and_query: "/other",
            ..URL
        };
        let (a, b) = (store.hash(&URL), store.hash(&other));
        store.mark_hit_for_miss(a, Duration::from_secs(60));
        store.mark_hit_for_miss(b, Duration::from_secs(60));
        store.purge(
            &PurgeTarget::Url {
                host: URL.host,
                path_and_query: URL.path_and_query,
            },
            false,
        );
        store.sync();
        assert!(!store.is_hit_for_miss(a), "the purged URL collapses again");
        assert!(store.is_hit_for_miss(b), "other URLs keep their marker");
    }

    #[test]
    fn junk_variants_do_not_push_out_a_used_one() {
        let store = Store::new(1 << 30);
        store_variant(&store, "en");
        for _ in 0..5 {
            assert!(hit(&store, "en"));
        }
        for i in 0..40 {
            store_variant(&store, &format!("junk-{i}"));
        }
        assert!(hit(&store, "en"), "the used variant is kept");
        assert!(!hit(&store, "junk-0"), "unused variants went first");
        assert!(hit(&store, "junk-39"), "the newest is kept");
        let hash = store.hash(&URL);
        let count = store.inner.get(&hash).map_or(0, |o| o.variants.len());
        assert_eq!(count, MAX_VARIANTS);
    }

    #[test]
    fn a_full_variant_list_drops_the_least_recently_used() {
        let store = Store::new(1 << 30);
        for i in 0..MAX_VARIANTS {
            store_variant(&store, &format!("v{i}"));
        }
        assert!(hit(&store, "v0"));
        store_variant(&store, "a");
        assert!(!hit(&store, "v1"), "never used: first to go, oldest first");
        for i in 2..MAX_VARIANTS {
            assert!(hit(&store, &format!("v{i}")));
        }
        assert!(hit(&store, "a"));
        // v0 was used, but before the list last changed; every other variant since.
        store_variant(&store, "b");
        assert!(!hit(&store, "v0"), "the least recently used went");
        assert!(hit(&store, "v2") && hit(&store, "a") && hit(&store, "b"));
    }

    #[test]
    fn a_replaced_variant_keeps_its_use() {
        let store = Store::new(1 << 30);
        for i in 0..MAX_VARIANTS {
            store_variant(&store, &format!("v{i}"));
        }
        for i in 0..MAX_VARIANTS {
            assert!(hit(&store, &format!("v{i}")));
        }
        // A refresh (or a refetch) of v0 stores a new entry, used as much as the one it
        // replaced: not the one to go, though the others are all used too.
        store_variant(&store, "v0");
        store_variant(&store, "a");
        assert!(hit(&store, "v0"));
        assert!(!hit(&store, "v1"), "the oldest of equally used went");
    }

    #[test]
    fn new_variants_are_bounded_per_url_per_second() {
        let store = Store::new(1 << 30);
        let hash = store.hash(&URL);
        let key = OwnedKey::new(&URL);
        let admit = |lang: &str, ms: u64| {
            store.admit_variant_at(hash, &key, &vary(lang), Duration::from_millis(ms))
        };
        assert_eq!(admit("en", 0), Ok(()), "a URL's first variant");
        store_variant(&store, "en");
        for i in 0..NEW_VARIANTS_BURST {
            assert_eq!(admit(&format!("j{i}"), 0), Ok(()), "within the burst");
        }
        assert_eq!(admit("late", 0), Err(NoStoreReason::VariantRate));
        assert_eq!(admit("late", 200), Err(NoStoreReason::VariantRate));
        assert_eq!(admit("en", 0), Ok(()), "a variant held needs no allowance");
        assert_eq!(admit("late", 250), Ok(()), "one more per 1/4 s");
        assert_eq!(admit("later", 250), Err(NoStoreReason::VariantRate));

        // After a quiet spell, a burst again, and no more.
        let mut admitted = 0;
        for i in 0..20 {
            if admit(&format!("k{i}"), 60_000).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, NEW_VARIANTS_BURST);

        // The budget is per URL, and survives changes of the variant list.
        let other = KeyParts {
            path_and_query: "/other",
            ..URL
        };
        let other_hash = store.hash(&other);
        store.insert(other_hash, variant(&other, "en"));
        let other_key = OwnedKey::new(&other);
        let at = Duration::from_secs(60);
        assert_eq!(
            store.admit_variant_at(other_hash, &other_key, &vary("fr"), at),
            Ok(())
        );
        store_variant(&store, "j0");
        assert_eq!(admit("k99", 60_000), Err(NoStoreReason::VariantRate));
    }
}

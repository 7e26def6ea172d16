//! `[cache]`: the store's bounds (memory, largest object, what fills may hold) and when bodies
//! go to memory files for `sendfile`.

use super::Checker;
use crate::config::raw::RawCache;
use crate::config::Cache;

/// `[cache]`, each bound checked alone and against the others (an object larger than the
/// store, fills that could not hold one object).
pub(super) fn cache(ck: &mut Checker<'_>, raw: &RawCache) -> Cache {
    let mut cache = Cache::default();
    if let Some(m) = &raw.memory {
        if m.get_ref().0 < (1 << 20) {
            ck.error(m.span(), "cache.memory", "must be at least 1MiB");
        } else {
            cache.memory = m.get_ref().0;
        }
    }
    if let Some(m) = &raw.max_object_size {
        // moka weighs entries in u32 units; keep a margin for headers.
        if m.get_ref().0 == 0 || m.get_ref().0 > (2 << 30) {
            ck.error(
                m.span(),
                "cache.max_object_size",
                "must be between 1B and 2GiB",
            );
        } else {
            cache.max_object_size = m.get_ref().0;
        }
    }
    if let Some(m) = &raw.sendfile_min_size {
        // Smaller slices are never sent from the file (cache::mapped::MIN_SEND).
        if m.get_ref().0 < 32 << 10 {
            ck.error(
                m.span(),
                "cache.sendfile_min_size",
                "must be at least 32KiB",
            );
        } else {
            cache.sendfile_min_size = Some(m.get_ref().0);
        }
    }
    if let Some(name) = &raw.cache_control_field {
        let reserved = ["cache-control", "cdn-cache-control", "surrogate-control"];
        match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
            Ok(n) if !reserved.contains(&n.as_str()) => cache.cache_control_field = n,
            Ok(_) => ck.error(
                name.span(),
                "cache.cache_control_field",
                "must be a field of this cache's own, not one other caches read",
            ),
            Err(_) => ck.error(
                name.span(),
                "cache.cache_control_field",
                format!("{:?} is not a field name", name.get_ref()),
            ),
        }
    }
    if raw.sendfile == Some(false) {
        cache.sendfile_min_size = None;
    }
    if cache.max_object_size > cache.memory {
        let span = raw
            .max_object_size
            .as_ref()
            .map(|m| m.span())
            .unwrap_or(0..0);
        ck.error(span, "cache.max_object_size", "is larger than cache.memory");
    }
    cache.fill_memory = (cache.memory / 4).max(cache.max_object_size);
    if let Some(m) = &raw.fill_memory {
        if m.get_ref().0 < cache.max_object_size {
            ck.error(
                m.span(),
                "cache.fill_memory",
                "must be at least cache.max_object_size",
            );
        } else {
            cache.fill_memory = m.get_ref().0;
        }
    }
    cache
}

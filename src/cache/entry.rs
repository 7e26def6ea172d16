//! A stored response: headers prepared for clients at store time, body as shared `Bytes`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::key::{OwnedKey, VaryKey};

/// One stored response. Immutable once stored; a refresh stores a new entry.
#[derive(Debug)]
pub struct Entry {
    pub key: OwnedKey,
    pub vary: VaryKey,
    pub status: StatusCode,
    /// Response headers ready for a client: hop-by-hop fields removed, `Via` added, no `Age`.
    pub headers: HeaderMap,
    /// The whole body, shared by every client that reads it.
    pub body: Bytes,
    /// When the response arrived (RFC 9111 `response_time`).
    pub response_time: SystemTime,
    /// Corrected initial age (§4.2.3).
    pub initial_age: Duration,
    /// Freshness lifetime (§4.2.1).
    pub lifetime: Duration,
}

impl Entry {
    /// Bytes this entry costs the store: body, header names and values, and a fixed overhead
    /// for the entry, its key and the map's bookkeeping.
    pub fn weight(&self) -> u32 {
        const OVERHEAD: usize = 256;
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let total = self.body.len()
            + headers
            + self.key.host.len()
            + self.key.path_and_query.len()
            + OVERHEAD;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Current age at `now` (§4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        super::policy::current_age(self.initial_age, self.response_time, now)
    }

    /// True while the entry is fresh at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.age(now) < self.lifetime
    }

    /// How long the store should keep the entry from now.
    pub fn time_to_live(&self, now: SystemTime) -> Duration {
        self.lifetime.saturating_sub(self.age(now))
    }
}

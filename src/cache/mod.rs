//! The HTTP cache: keys, RFC 9111 policy, the byte-bounded moka store, and the in-flight fills
//! that collapse concurrent misses into one origin request.
//!
//! This module knows nothing of origins or sockets: `proxy` asks it what is stored, whether a
//! response may be stored and for how long, and hands it entries to keep.

pub mod entry;
pub mod fill;
pub mod key;
#[cfg(target_os = "linux")]
pub mod mapped;
pub mod policy;
pub mod store;

pub use entry::Entry;
pub use key::{KeyParts, OwnedKey, VaryKey};
pub use policy::{CacheControl, NoStoreReason};
pub use store::{PurgeTarget, Removals, Store, Summary};

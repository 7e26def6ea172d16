//! The HTTP cache: keys, RFC 9111 policy, and the byte-bounded moka store.
//!
//! This module knows nothing of origins or sockets: `proxy` asks it what is stored, whether a
//! response may be stored and for how long, and hands it entries to keep.

pub mod entry;
pub mod key;
pub mod policy;
pub mod store;

pub use entry::Entry;
pub use key::{KeyParts, OwnedKey, VaryKey};
pub use policy::{CacheControl, NoStoreReason};
pub use store::Store;

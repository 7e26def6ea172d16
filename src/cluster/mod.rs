//! A fleet of nodes acting as one cache: who the members are ([`Membership`], fed by etcd, a
//! static list or DNS), which member owns a key, filling from the owner, and purges applied
//! everywhere ([`Purge`], carried by etcd or forwarded to static peers).
//!
//! This file holds the types the parts share; each part has its own file.

pub mod dns;
pub mod peer;
pub mod ring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cache::PurgeTarget;

pub mod etcd;

/// One node of the fleet, as the others know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id (`cluster.node`): unique in the fleet, stable across restarts.
    pub id: Arc<str>,
    /// Where peers reach its peer listener (`cluster.advertise`).
    pub address: SocketAddr,
    /// When it joined, as it said (etcd) or as this node first saw it.
    pub since: SystemTime,
}

/// The live members as this node knows them, this node included, sorted by id. Whatever
/// discovers them (etcd, a static list, DNS) sets the whole list; whatever needs them (key
/// ownership, `/cluster`) reads the latest or waits for a change. Cloning shares it.
#[derive(Clone)]
pub struct Membership {
    tx: Arc<watch::Sender<Arc<[Member]>>>,
}

impl Membership {
    /// A membership of this node alone.
    pub fn new(this: Member) -> Membership {
        let (tx, _) = watch::channel(Arc::from(vec![this]));
        Membership { tx: Arc::new(tx) }
    }

    /// Replaces the member list (sorted by id here); receivers are told only when it changed.
    pub fn set(&self, mut members: Vec<Member>) {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        let members: Arc<[Member]> = Arc::from(members);
        self.tx.send_if_modified(|current| {
            if *current == members {
                return false;
            }
            *current = members;
            true
        });
    }

    /// The members now.
    pub fn current(&self) -> Arc<[Member]> {
        self.tx.borrow().clone()
    }

    /// A receiver told of every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<[Member]>> {
        self.tx.subscribe()
    }
}

/// A purge accepted at one node, to be applied at every node: what etcd stores under
/// `/edgecache/<name>/purges/` and what is forwarded to static peers, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    pub target: Target,
    /// Mark stale instead of removing.
    pub soft: bool,
    /// The node that accepted it.
    pub node: String,
}

/// An owned [`PurgeTarget`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Target {
    Url {
        host: String,
        path_and_query: String,
    },
    Prefix {
        host: String,
        prefix: String,
    },
    Tag {
        tag: String,
    },
    All,
}

impl Target {
    /// The store's view of it.
    pub fn as_store(&self) -> PurgeTarget<'_> {
        match self {
            Target::Url {
                host,
                path_and_query,
            } => PurgeTarget::Url {
                host,
                path_and_query,
            },
            Target::Prefix { host, prefix } => PurgeTarget::Prefix { host, prefix },
            Target::Tag { tag } => PurgeTarget::Tag(tag),
            Target::All => PurgeTarget::All,
        }
    }
}

impl From<&PurgeTarget<'_>> for Target {
    fn from(t: &PurgeTarget<'_>) -> Target {
        match *t {
            PurgeTarget::Url {
                host,
                path_and_query,
            } => Target::Url {
                host: host.to_owned(),
                path_and_query: path_and_query.to_owned(),
            },
            PurgeTarget::Prefix { host, prefix } => Target::Prefix {
                host: host.to_owned(),
                prefix: prefix.to_owned(),
            },
            PurgeTarget::Tag(tag) => Target::Tag {
                tag: tag.to_owned(),
            },
            PurgeTarget::All => Target::All,
        }
    }
}

/// Where a purge accepted at this node goes so that every other node applies it: etcd
/// (`etcd.rs`) or the static peers. Publishing never blocks the caller; a purge that cannot be
/// sent is logged and counted by the publisher.
pub trait Publish: Send + Sync {
    fn publish(&self, purge: Purge);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, port: u16) -> Member {
        Member {
            id: Arc::from(id),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            since: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_list_is_sorted_and_receivers_hear_only_changes() {
        let m = Membership::new(member("b", 2));
        let mut rx = m.subscribe();
        rx.mark_unchanged();
        m.set(vec![member("c", 3), member("a", 1), member("b", 2)]);
        assert!(rx.has_changed().unwrap_or(false));
        rx.mark_unchanged();
        let now = m.current();
        let ids: Vec<&str> = now.iter().map(|x| &*x.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        m.set(vec![member("b", 2), member("a", 1), member("c", 3)]);
        assert!(!rx.has_changed().unwrap_or(true), "same list: no change");
    }

    #[test]
    fn purges_travel_as_json_and_back() {
        let p = Purge {
            target: Target::from(&PurgeTarget::Url {
                host: "a.test",
                path_and_query: "/x?y",
            }),
            soft: true,
            node: "fra1-a".into(),
        };
        let text = serde_json::to_string(&p).unwrap_or_default();
        assert!(text.contains("\"kind\":\"url\""), "{text}");
        let back: Purge = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(back, p);
    }
}

//! `peers_dns`: the members are the A/AAAA records of one name (a Kubernetes headless
//! Service), each at the configured port, asked again when the answer's TTL runs out. A
//! member found this way is known by its address (`10.0.0.2:7400`), this node by its id.
//! The resolver is the origins' (`origin::dns`), so `[dns]` servers and TTL bounds apply.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use super::{Member, Membership};
use crate::origin::dns::Resolver;

/// How soon a failed lookup is tried again: the members last seen stay meanwhile.
const RETRY: Duration = Duration::from_secs(2);

/// Follows `name`'s records into `membership` until `stop` turns true.
pub async fn follow(
    resolver: Resolver,
    name: String,
    port: u16,
    this: Member,
    membership: Membership,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = match resolver.addresses(&name).await {
            Ok((ips, valid_until)) => {
                let mut members: Vec<Member> = ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .map(|address| {
                        if address == this.address {
                            this.clone()
                        } else {
                            Member {
                                id: address.to_string().into(),
                                address,
                                since: std::time::SystemTime::now(),
                            }
                        }
                    })
                    .collect();
                // This node serves whatever DNS says (it may not be published yet).
                if !members.iter().any(|m| m.address == this.address) {
                    members.push(this.clone());
                }
                keep_since(&membership, &mut members);
                membership.set(members);
                valid_until
                    .saturating_duration_since(std::time::Instant::now())
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "peers_dns lookup failed; keeping the members last seen");
                RETRY
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// A member seen before keeps its `since`, so an unchanged answer is no membership change.
fn keep_since(membership: &Membership, members: &mut [Member]) {
    let before = membership.current();
    for m in members.iter_mut() {
        if let Some(old) = before.iter().find(|o| o.address == m.address) {
            m.since = old.since;
        }
    }
}

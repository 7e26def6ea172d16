//! The cap on open connections per client address (`server.max_connections_per_client`).
//!
//! Counted by the socket's peer (canonical: an IPv4-mapped peer as IPv4) when the connection
//! is accepted: no request, and so no client a proxy names, exists yet. Trusted proxies are
//! exempt, since all of their clients arrive on their connections. Not the request rates
//! (`proxy::limit`).
//!
//! A connection past the cap is closed at once, reset (zero linger) and unanswered. nginx's
//! `limit_conn` answers 503 because it counts requests in progress, after their headers were
//! read; counting at accept, an answer would first cost a TLS handshake and a header read
//! for a client already holding its share, which is what the cap is there to bound. The
//! reset also leaves no TIME_WAIT socket here for each refused attempt.
//!
//! Connections are counted whether a cap is set or not (a lock and a map entry per accepted
//! connection, small beside the accept itself), so that a cap set by a reload applies to the
//! connections already open.
//!
//! Memory: an address is in the table only while it has a connection open, and every open
//! connection holds one of `max_connections` slots, so the table never has more entries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;

/// Open connections by peer address, for one node (shared by every listener). A reload
/// changes the cap and the exempt networks in place ([`PerClient::set`]): connections
/// already open stay counted.
#[derive(Debug)]
pub struct PerClient {
    /// Connections are counted with a cap or without (`usize::MAX`), so that a cap a reload
    /// sets counts the connections already open.
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    max: usize,
    exempt: Vec<IpNet>,
    open: HashMap<IpAddr, usize>,
}

/// Held by a counted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Slot(Option<(Arc<PerClient>, IpAddr)>);

impl PerClient {
    /// At most `max` connections per address (no cap when `None`); addresses in `exempt` are
    /// not counted.
    pub fn new(max: Option<usize>, exempt: Vec<IpNet>) -> PerClient {
        let per = PerClient {
            table: Mutex::new(Table {
                max: usize::MAX,
                exempt: Vec::new(),
                open: HashMap::new(),
            }),
        };
        per.set(max, exempt);
        per
    }

    /// Changes the cap and the exempt networks (a reload). Connections open stay counted; an
    /// address above a lowered cap gets no new one until enough of its own have closed.
    pub fn set(&self, max: Option<usize>, exempt: Vec<IpNet>) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.max = max.unwrap_or(usize::MAX);
        table.exempt = exempt;
    }

    /// A place for one more connection from `peer`, or `None` when it has `max` open.
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.exempt.iter().any(|n| n.contains(&peer)) {
            return Some(Slot(None));
        }
        let max = table.max;
        let n = table.open.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(Some((self.clone(), peer))))
    }

    /// Open connections counted for `peer`.
    #[cfg(test)]
    fn open(&self, peer: IpAddr) -> usize {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.open.get(&peer).copied().unwrap_or(0)
    }

    /// Addresses with a connection counted.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some((per, peer)) = self.0.take() else {
            return;
        };
        let mut table = per.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = table.open.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.open.remove(&peer);
            }
        }
    }
}

/// Closes a connection refused by the cap: reset, so no TIME_WAIT socket stays behind.
pub fn refuse(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn at_most_max_per_address_and_a_closed_one_frees_its_place() {
        let per = Arc::new(PerClient::new(Some(2), Vec::new()));
        let a1 = per.enter(ip("192.0.2.1")).expect("first");
        let a2 = per.enter(ip("192.0.2.1")).expect("second");
        assert!(per.enter(ip("192.0.2.1")).is_none(), "third");
        let b = per.enter(ip("192.0.2.2")).expect("another address");
        assert_eq!(per.open(ip("192.0.2.1")), 2);
        drop(a1);
        let a3 = per.enter(ip("192.0.2.1")).expect("a place again");
        drop((a2, a3, b));
        assert_eq!(per.open(ip("192.0.2.1")), 0);
    }

    #[test]
    fn a_cap_set_later_counts_the_connections_already_open() {
        let per = Arc::new(PerClient::new(None, Vec::new()));
        let open: Vec<Slot> = (0..3)
            .map(|_| per.enter(ip("192.0.2.1")).expect("no cap"))
            .collect();
        per.set(Some(3), Vec::new());
        assert!(per.enter(ip("192.0.2.1")).is_none(), "three already open");
        per.set(Some(3), vec!["192.0.2.0/24".parse().expect("net")]);
        assert!(per.enter(ip("192.0.2.1")).is_some(), "exempt now");
        per.set(Some(3), Vec::new());
        drop(open);
        assert_eq!(per.open(ip("192.0.2.1")), 0);
        per.set(None, Vec::new());
        let many: Vec<Slot> = (0..10)
            .map(|_| per.enter(ip("192.0.2.1")).expect("no cap"))
            .collect();
        assert_eq!(per.open(ip("192.0.2.1")), 10);
        drop(many);
    }

    #[test]
    fn only_addresses_with_open_connections_are_kept() {
        let per = Arc::new(PerClient::new(Some(1), Vec::new()));
        for i in 0..1000u32 {
            let slot = per.enter(IpAddr::from(i.to_be_bytes()));
            assert!(slot.is_some());
        }
        assert_eq!(per.addresses(), 0, "each slot was dropped at once");
        let held: Vec<Slot> = (0..10u32)
            .filter_map(|i| per.enter(IpAddr::from(i.to_be_bytes())))
            .collect();
        // Refused attempts add nothing either.
        for _ in 0..100 {
            assert!(per.enter(IpAddr::from(3u32.to_be_bytes())).is_none());
        }
        assert_eq!(per.addresses(), 10);
        drop(held);
        assert_eq!(per.addresses(), 0);
    }

    #[test]
    fn trusted_proxies_are_not_counted() {
        let per = Arc::new(PerClient::new(
            Some(1),
            vec!["10.0.0.0/8".parse().expect("net")],
        ));
        let held: Vec<Slot> = (0..5)
            .map(|_| per.enter(ip("10.1.2.3")).expect("exempt"))
            .collect();
        assert_eq!(per.addresses(), 0);
        assert!(per.enter(ip("192.0.2.1")).is_some());
        drop(held);
    }
}

//! Which member owns a key: rendezvous (highest-random-weight) hashing. Every member scores
//! `weight(member, key)` and the highest score owns the key, so a member that joins takes
//! about 1/N of the keys from the others and one that leaves gives away only its own.
//!
//! Every node of a fleet must compute the same owner, so nothing here is randomly keyed (the
//! store's `KeyHasher` is, per process, and must not be used). The functions are fixed and
//! written here: FNV-1a over the key's parts, then the SplitMix64 finaliser to spread the
//! bits (FNV alone clusters similar URLs). Members are scored by their peer address, which
//! every discovery (etcd, a static list, DNS) gives all nodes alike. Pure: no I/O, no clock,
//! no allocation per lookup.

use std::net::SocketAddr;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// SplitMix64's finaliser (Steele, Lea, Flood 2014): a bijection that makes every input bit
/// flip about half of the output bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fleet-wide hash of a primary key: the scheme, the host and the path and query as
/// keyed (the same parts as the store's key, hashed with fixed constants).
pub fn key_hash(https: bool, host: &str, path_and_query: &str) -> u64 {
    let mut h = fnv(FNV_OFFSET, &[u8::from(https)]);
    h = fnv(h, host.as_bytes());
    // A separator no host contains, so "a" + "b/" and "ab" + "/" differ.
    h = fnv(h, &[0xff]);
    h = fnv(h, path_and_query.as_bytes());
    mix(h)
}

/// A member's seed, from its peer address (IP octets and port).
pub fn member_seed(address: &SocketAddr) -> u64 {
    let h = match address.ip() {
        std::net::IpAddr::V4(ip) => fnv(FNV_OFFSET, &ip.octets()),
        std::net::IpAddr::V6(ip) => fnv(FNV_OFFSET, &ip.octets()),
    };
    mix(fnv(h, &address.port().to_be_bytes()))
}

/// A member's score for a key.
pub fn weight(seed: u64, key: u64) -> u64 {
    mix(seed ^ mix(key.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The index (into `seeds`' order) of the member with the highest weight for `key`, among
/// those `eligible` accepts; ties (vanishingly rare) go to the first. `None` when none is
/// eligible.
pub fn owner(
    key: u64,
    seeds: impl Iterator<Item = u64>,
    mut eligible: impl FnMut(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, seed) in seeds.enumerate() {
        if !eligible(i) {
            continue;
        }
        let w = weight(seed, key);
        if best.is_none_or(|(_, b)| w > b) {
            best = Some((i, w));
        }
    }
    best.map(|(i, _)| i)
}

/// What a simulation of `members` members over `keys` keys shows: the load spread (the most
/// keys one member owns ÷ the mean) and the share of keys that move when one member joins and
/// when one leaves. For the unit tests and `examples/rendezvous.rs`.
#[derive(Debug, Clone, Copy)]
pub struct Simulation {
    pub spread: f64,
    pub moved_on_join: f64,
    pub moved_on_leave: f64,
}

/// Runs the simulation over members at `10.0.<i/256>.<i%256>:7400` and keys `/object/<n>`.
pub fn simulate(members: usize, keys: usize) -> Simulation {
    let addr =
        |i: usize| SocketAddr::from(([10, 0, ((i >> 8) & 0xff) as u8, (i & 0xff) as u8], 7400));
    let seeds: Vec<u64> = (0..=members).map(|i| member_seed(&addr(i))).collect();
    let mut counts = vec![0usize; members];
    let (mut moved_join, mut moved_leave) = (0usize, 0usize);
    let mut path = String::with_capacity(32);
    for n in 0..keys {
        use std::fmt::Write;
        path.clear();
        let _ = write!(path, "/object/{n}");
        let k = key_hash(true, "www.example.com", &path);
        let Some(now) = owner(k, seeds[..members].iter().copied(), |_| true) else {
            continue;
        };
        counts[now] += 1;
        // Member `members` joins.
        if owner(k, seeds.iter().copied(), |_| true) != Some(now) {
            moved_join += 1;
        }
        // Member 0 leaves.
        if owner(k, seeds[..members].iter().copied(), |i| i != 0) != Some(now) {
            moved_leave += 1;
        }
    }
    let mean = keys as f64 / members as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    Simulation {
        spread: max / mean,
        moved_on_join: moved_join as f64 / keys as f64,
        moved_on_leave: moved_leave as f64 / keys as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_functions_are_fixed() {
        // Pinned: every node of a fleet, of every version, must agree on owners. A change
        // here moves every key in a fleet being upgraded node by node.
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
        assert_eq!(
            key_hash(false, "a.test", "/"),
            key_hash(false, "a.test", "/")
        );
        assert_ne!(
            key_hash(false, "a.test", "/"),
            key_hash(true, "a.test", "/")
        );
        assert_ne!(key_hash(false, "a", "b/"), key_hash(false, "ab", "/"));
    }

    #[test]
    fn all_nodes_agree() {
        // The same members in any order name the same owner (by address, not position).
        let addrs: Vec<SocketAddr> = (0..5)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7400 + i)))
            .collect();
        let mut reversed = addrs.clone();
        reversed.reverse();
        for n in 0..1000 {
            let k = key_hash(false, "a.test", &format!("/{n}"));
            let a = owner(k, addrs.iter().map(member_seed), |_| true).map(|i| addrs[i]);
            let b = owner(k, reversed.iter().map(member_seed), |_| true).map(|i| reversed[i]);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn ineligible_members_are_skipped() {
        assert_eq!(owner(1, std::iter::empty(), |_| true), None);
        assert_eq!(owner(1, [5u64, 6].into_iter(), |_| false), None);
        assert_eq!(owner(1, [5u64, 6].into_iter(), |i| i == 1), Some(1));
    }

    #[test]
    fn load_spreads_and_changes_move_about_one_nth() {
        for (members, max_spread) in [(3, 1.03), (10, 1.06), (100, 1.3)] {
            let s = simulate(members, 100_000);
            assert!(s.spread < max_spread, "{members} members: {s:?}");
            let ideal_join = 1.0 / (members + 1) as f64;
            let ideal_leave = 1.0 / members as f64;
            assert!(
                (s.moved_on_join - ideal_join).abs() < ideal_join * 0.25,
                "{members} members: {s:?}"
            );
            assert!(
                (s.moved_on_leave - ideal_leave).abs() < ideal_leave * 0.25,
                "{members} members: {s:?}"
            );
        }
    }
}

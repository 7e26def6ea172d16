//! Matching a request's host to a configured site: exact names, `*.suffix` wildcards, and an
//! explicit `*` catch-all. A host that matches nothing is never forwarded.

use crate::config::Site;

/// Host name lookup table built once from the configuration.
///
/// Names are kept sorted and found by binary search: the table is small and fixed, and a
/// handful of byte comparisons cost less per request than hashing the host (SipHash) did.
#[derive(Debug, Default)]
pub struct SiteTable {
    exact: Names,
    wildcard: Names,
    catch_all: Option<usize>,
}

/// Sorted (name, site index) pairs. Validation refuses a name served twice; were one given
/// twice anyway, the later site would win, as a map insert does.
#[derive(Debug, Default)]
struct Names(Vec<(Box<str>, usize)>);

impl Names {
    fn insert(&mut self, name: &str, site: usize) {
        match self.0.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => self.0[i].1 = site,
            Err(i) => self.0.insert(i, (name.into(), site)),
        }
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| self.0[i].1)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl SiteTable {
    pub fn new(sites: &[Site]) -> SiteTable {
        let mut t = SiteTable::default();
        for (i, site) in sites.iter().enumerate() {
            for h in &site.hosts {
                if h == "*" {
                    t.catch_all = Some(i);
                } else if let Some(suffix) = h.strip_prefix("*.") {
                    t.wildcard.insert(suffix, i);
                } else {
                    t.exact.insert(h, i);
                }
            }
        }
        t
    }

    /// The site serving `host` (lowercase, without port). A wildcard matches one or more
    /// leading labels; the longest matching suffix wins.
    pub fn find(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(i);
        }
        if !self.wildcard.is_empty() {
            let mut rest = host;
            while let Some(dot) = rest.find('.') {
                rest = &rest[dot + 1..];
                if let Some(i) = self.wildcard.get(rest) {
                    return Some(i);
                }
            }
        }
        self.catch_all
    }
}

/// Splits a `Host` value into its lowercase host part, dropping any port. Returns `None`
/// for values that are not a plausible host.
pub fn host_without_port(authority: &str) -> Option<&str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets, as configured names do.
        let end = rest.find(']')?;
        &authority[..end + 2]
    } else {
        match authority.rfind(':') {
            Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &authority[..i],
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SiteTable {
        SiteTable::new(&[
            Site::new(vec!["static.example.com".into()], 0),
            Site::new(vec!["*.example.com".into()], 0),
        ])
    }

    #[test]
    fn exact_then_wildcard_and_no_catch_all_by_default() {
        let t = table();
        assert_eq!(t.find("static.example.com"), Some(0));
        assert_eq!(t.find("img.example.com"), Some(1));
        assert_eq!(t.find("a.b.example.com"), Some(1));
        assert_eq!(t.find("example.com"), None);
        assert_eq!(t.find("evil.com"), None);
    }

    #[test]
    fn many_names_in_any_order() {
        let names: Vec<String> = (0..50).rev().map(|i| format!("h{i}.test")).collect();
        let sites: Vec<Site> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Site::new(vec![n.clone(), format!("*.w{i}.test")], 0))
            .collect();
        let t = SiteTable::new(&sites);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(t.find(n), Some(i), "{n}");
            assert_eq!(t.find(&format!("a.b.w{i}.test")), Some(i));
        }
        assert_eq!(t.find("h50.test"), None);
        assert_eq!(
            t.find("w1.test"),
            None,
            "a wildcard needs a label before it"
        );
    }

    #[test]
    fn hosts_lose_ports() {
        assert_eq!(host_without_port("a.com:8080"), Some("a.com"));
        assert_eq!(host_without_port("a.com"), Some("a.com"));
        assert_eq!(host_without_port("a.com."), Some("a.com"));
        assert_eq!(host_without_port("[::1]:80"), Some("[::1]"));
        assert_eq!(host_without_port("a.com:x"), None);
        assert_eq!(host_without_port(""), None);
    }
}

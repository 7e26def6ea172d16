//! Where a client is: its address (from the socket, or `X-Forwarded-For` walked right to left
//! through trusted proxies), and its country and continent (from the configured CIDR table,
//! then a country header set by a trusted hop). Pure lookups: no I/O, no clock.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// An ISO 3166 alpha-2 country code or a two-letter continent code, uppercase.
pub type Code = [u8; 2];

/// A client's location as far as it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub ip: IpAddr,
    pub country: Option<Code>,
    pub continent: Option<Code>,
}

/// Locates clients from the configured sources.
#[derive(Debug, Clone, Default)]
pub struct Locator {
    /// CIDR table, most specific first.
    networks: Vec<(IpNet, Code)>,
    header: Option<HeaderName>,
    trusted: Vec<IpNet>,
}

impl Locator {
    pub fn new(
        mut networks: Vec<(IpNet, Code)>,
        header: Option<HeaderName>,
        trusted: Vec<IpNet>,
    ) -> Locator {
        networks.sort_by_key(|n| std::cmp::Reverse(n.0.prefix_len()));
        Locator {
            networks,
            header,
            trusted,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Locates the client of a request that arrived from `peer`.
    pub fn locate(&self, peer: IpAddr, headers: &HeaderMap) -> Location {
        let trusted_peer = self.is_trusted(peer);
        let ip = if trusted_peer {
            self.client_ip(peer, headers)
        } else {
            peer
        };
        let mut country = self
            .networks
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, c)| *c);
        if country.is_none() && trusted_peer {
            if let Some(h) = &self.header {
                country = headers.get(h).and_then(|v| code(v.as_bytes()));
            }
        }
        Location {
            ip,
            country,
            continent: country.and_then(continent_of),
        }
    }

    /// The first address, from the right of `X-Forwarded-For`, that is not a trusted proxy.
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut hops: Vec<IpAddr> = Vec::new();
        for v in headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for part in v.split(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip),
                    // An unparseable hop ends what can be believed.
                    Err(_) => hops.clear(),
                }
            }
        }
        for ip in hops.into_iter().rev() {
            if !self.is_trusted(ip) {
                return ip;
            }
        }
        peer
    }
}

/// Parses a two-letter code (case-insensitive).
pub fn code(text: &[u8]) -> Option<Code> {
    match text {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

/// Continent codes, as GeoIP databases use them.
pub const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

/// Country codes by continent (the assignment GeoIP country databases use).
const BY_CONTINENT: [(&str, &str); 7] = [
    ("EU", "AD AL AT AX BA BE BG BY CH CY CZ DE DK EE ES FI FO FR GB GG GI GR HR HU IE IM IS IT JE LI LT LU LV MC MD ME MK MT NL NO PL PT RO RS RU SE SI SJ SK SM UA VA XK"),
    ("AS", "AE AF AM AZ BD BH BN BT CC CN CX GE HK ID IL IN IO IQ IR JO JP KG KH KP KR KW KZ LA LB LK MM MN MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TL TM TR TW UZ VN YE"),
    ("AF", "AO BF BI BJ BW CD CF CG CI CM CV DJ DZ EG EH ER ET GA GH GM GN GQ GW KE KM LR LS LY MA MG ML MR MU MW MZ NA NE NG RE RW SC SD SH SL SN SO SS ST SZ TD TG TN TZ UG YT ZA ZM ZW"),
    ("NA", "AG AI AW BB BL BM BQ BS BZ CA CR CU CW DM DO GD GL GP GT HN HT JM KN KY LC MF MQ MS MX NI PA PM PR SV SX TC TT UM US VC VG VI"),
    ("SA", "AR BO BR CL CO EC FK GF GY PE PY SR UY VE"),
    ("OC", "AS AU CK FJ FM GU KI MH MP NC NF NR NU NZ PF PG PN PW SB TK TO TV VU WF WS"),
    ("AN", "AQ BV GS HM TF"),
];

/// The continent of a country, if known.
pub fn continent_of(country: Code) -> Option<Code> {
    let c = std::str::from_utf8(&country).ok()?;
    BY_CONTINENT
        .iter()
        .find(|(_, list)| list.split(' ').any(|x| x == c))
        .and_then(|(cont, _)| code(cont.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn locator() -> Locator {
        Locator::new(
            vec![
                ("203.0.113.0/24".parse().expect("net"), *b"DE"),
                ("203.0.113.128/25".parse().expect("net"), *b"JP"),
            ],
            Some(HeaderName::from_static("cf-ipcountry")),
            vec!["10.0.0.0/8".parse().expect("net")],
        )
    }

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn check(peer: &str, hdrs: &[(&str, &str)], ip: &str, country: Option<&[u8; 2]>) {
        let l = locator().locate(peer.parse().expect("ip"), &headers(hdrs));
        assert_eq!(l.ip, ip.parse::<IpAddr>().expect("ip"), "{peer} {hdrs:?}");
        assert_eq!(l.country, country.copied(), "{peer} {hdrs:?}");
    }

    #[test]
    fn cidr_table_most_specific_first() {
        check("203.0.113.5", &[], "203.0.113.5", Some(b"DE"));
        check("203.0.113.200", &[], "203.0.113.200", Some(b"JP"));
        check("198.51.100.1", &[], "198.51.100.1", None);
    }

    #[test]
    fn forwarded_for_and_header_only_from_trusted_peers() {
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "203.0.113.9")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.7")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "198.51.100.1",
            &[("x-forwarded-for", "203.0.113.9")],
            "198.51.100.1",
            None,
        );
        check(
            "10.1.2.3",
            &[("cf-ipcountry", "fr")],
            "10.1.2.3",
            Some(b"FR"),
        );
        check(
            "198.51.100.1",
            &[("cf-ipcountry", "FR")],
            "198.51.100.1",
            None,
        );
        check("10.1.2.3", &[("cf-ipcountry", "XXX")], "10.1.2.3", None);
    }

    #[test]
    fn continents() {
        assert_eq!(continent_of(*b"DE"), Some(*b"EU"));
        assert_eq!(continent_of(*b"JP"), Some(*b"AS"));
        assert_eq!(continent_of(*b"US"), Some(*b"NA"));
        assert_eq!(continent_of(*b"BR"), Some(*b"SA"));
        assert_eq!(continent_of(*b"NG"), Some(*b"AF"));
        assert_eq!(continent_of(*b"AU"), Some(*b"OC"));
        assert_eq!(continent_of(*b"ZZ"), None);
    }
}

//! Where a client is: its address (from the socket, or the one field trusted proxies write,
//! `X-Forwarded-For` or `Forwarded`, walked right to left through them), and its country and
//! continent (from the configured CIDR table, then a country header set by a trusted hop,
//! then a MaxMind-format database).
//! Pure lookups: no I/O, no clock.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A MaxMind DB (`.mmdb`) file: MaxMind's GeoIP2/GeoLite2 Country or City, DB-IP's, or any
/// database with the flat `country_code` schema (such as ip-location-db's).
///
/// The file is read into memory rather than mapped: mapping needs `unsafe`, and a file that is
/// overwritten in place while mapped (a plain `cp` of a new release over the old one) makes
/// every later lookup fault the whole process. A country database is a few megabytes, and a
/// new file takes effect on restart with no window in which it is half-written.
pub struct Database {
    path: PathBuf,
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .field("type", &self.reader.metadata().database_type)
            .finish()
    }
}

/// The fields edgecache reads from a record, borrowed from the database's bytes (no
/// allocation per lookup); every other field is skipped.
#[derive(serde::Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    continent: Option<ContinentCode<'a>>,
    /// The flat schema of ip-location-db and similar databases.
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct ContinentCode<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

impl Database {
    /// Reads and checks a database file.
    pub fn open(path: &Path) -> Result<Database, String> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| e.to_string())?;
        if reader.metadata().ip_version != 4 && reader.metadata().ip_version != 6 {
            return Err(format!(
                "unsupported ip_version {}",
                reader.metadata().ip_version
            ));
        }
        Ok(Database {
            path: path.to_owned(),
            reader,
        })
    }

    /// The database's own name for what it holds (e.g. `GeoIP2-Country`).
    pub fn kind(&self) -> &str {
        &self.reader.metadata().database_type
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Country and continent of `ip`, as far as the database knows them.
    pub fn lookup(&self, ip: IpAddr) -> (Option<Code>, Option<Code>) {
        let Ok(found) = self.reader.lookup(ip) else {
            return (None, None);
        };
        let Ok(Some(rec)) = found.decode::<Record<'_>>() else {
            return (None, None);
        };
        let country = rec
            .country
            .and_then(|c| c.iso_code)
            .or(rec.country_code)
            .or_else(|| rec.registered_country.and_then(|c| c.iso_code))
            .and_then(|c| code(c.as_bytes()));
        let continent = rec
            .continent
            .and_then(|c| c.code)
            .and_then(|c| code(c.as_bytes()));
        (country, continent)
    }
}

/// The database in use, replaced whole by [`DatabaseSlot::reload`] (SIGHUP): lookups in flight
/// keep the one they started with.
#[derive(Debug)]
pub struct DatabaseSlot {
    current: std::sync::RwLock<Arc<Database>>,
}

impl DatabaseSlot {
    pub fn new(db: Arc<Database>) -> DatabaseSlot {
        DatabaseSlot {
            current: std::sync::RwLock::new(db),
        }
    }

    /// The database lookups use now.
    pub fn get(&self) -> Arc<Database> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the file again; on success later lookups use it, on failure the old one stays.
    pub fn reload(&self) -> Result<Arc<Database>, String> {
        let path = self.get().path().to_owned();
        let fresh =
            Arc::new(Database::open(&path).map_err(|e| format!("{}: {e}", path.display()))?);
        match self.current.write() {
            Ok(mut g) => *g = fresh.clone(),
            Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
        }
        Ok(fresh)
    }
}

/// The field a trusted hop names its client in (nginx's `real_ip_header`). Only that one is
/// read: a hop that writes `Forwarded` passes a client's own `X-Forwarded-For` through
/// untouched, and the reverse, so believing the other field would believe the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressHeader {
    /// `X-Forwarded-For` (the default).
    #[default]
    XForwardedFor,
    /// The `for=` parameters of `Forwarded` (RFC 7239).
    Forwarded,
}

impl AddressHeader {
    /// The field's name, lowercase, as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressHeader::XForwardedFor => "x-forwarded-for",
            AddressHeader::Forwarded => "forwarded",
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Locates clients from the configured sources.
#[derive(Debug, Clone, Default)]
pub struct Locator {
    /// CIDR table, most specific first.
    networks: Vec<(IpNet, Code)>,
    header: Option<HeaderName>,
    trusted: Vec<IpNet>,
    address_header: AddressHeader,
    database: Option<Arc<DatabaseSlot>>,
}

impl Locator {
    /// A locator that reads clients from `X-Forwarded-For` (see [`Locator::with_address_header`]).
    pub fn new(
        mut networks: Vec<(IpNet, Code)>,
        header: Option<HeaderName>,
        trusted: Vec<IpNet>,
        database: Option<Arc<Database>>,
    ) -> Locator {
        networks.sort_by_key(|n| std::cmp::Reverse(n.0.prefix_len()));
        Locator {
            networks,
            header,
            trusted,
            address_header: AddressHeader::default(),
            database: database.map(|d| Arc::new(DatabaseSlot::new(d))),
        }
    }

    /// Reads trusted hops' clients from `field` instead.
    pub fn with_address_header(mut self, field: AddressHeader) -> Locator {
        self.address_header = field;
        self
    }

    /// The database slot, when one is configured.
    pub fn database(&self) -> Option<&DatabaseSlot> {
        self.database.as_deref()
    }

    /// Whether `ip` is a trusted proxy, whose forwarding fields are believed.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request that arrived from `peer`: `peer` itself unless it is a trusted
    /// proxy, else the address that proxy names (see [`Locator::client_ip`]).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.is_trusted(peer) {
            self.client_ip(peer, headers)
        } else {
            peer
        }
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
        let mut continent = None;
        if country.is_none() {
            if let Some(slot) = &self.database {
                (country, continent) = slot.get().lookup(ip);
            }
        }
        Location {
            ip,
            country,
            continent: continent.or_else(|| country.and_then(continent_of)),
        }
    }

    /// The first address from the right of the configured field (`X-Forwarded-For`, or the
    /// `for=` parameters of `Forwarded`) that is not a trusted proxy; `peer` when there is
    /// none. Walked from the right with no list collected: each hop is checked as it is read,
    /// and anything unreadable ends what can be believed.
    fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let name = match self.address_header {
            AddressHeader::XForwardedFor => &X_FORWARDED_FOR,
            AddressHeader::Forwarded => &http::header::FORWARDED,
        };
        for line in headers.get_all(name).iter().rev() {
            let Ok(text) = line.to_str() else {
                return peer;
            };
            for element in text.rsplit(',') {
                let hop = match self.address_header {
                    AddressHeader::XForwardedFor => element.trim().parse::<IpAddr>().ok(),
                    AddressHeader::Forwarded => element
                        .split(';')
                        .find_map(|pair| {
                            let (k, v) = pair.split_once('=')?;
                            k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                        })
                        .and_then(forwarded_node),
                };
                match hop.map(|ip| ip.to_canonical()) {
                    Some(ip) if self.is_trusted(ip) => {}
                    Some(ip) => return ip,
                    // `unknown`, an obfuscated name or garbage: nothing left of it holds.
                    None => return peer,
                }
            }
        }
        peer
    }
}

/// The address of a `Forwarded` node: `192.0.2.1`, `"192.0.2.1:8080"`, `"[2001:db8::1]:443"`.
fn forwarded_node(text: &str) -> Option<IpAddr> {
    let t = text.trim_matches('"');
    if let Some(rest) = t.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    t.parse().ok().or_else(|| {
        t.rsplit_once(':')?
            .0
            .parse::<std::net::Ipv4Addr>()
            .ok()
            .map(IpAddr::V4)
    })
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
            None,
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
        check_with(AddressHeader::XForwardedFor, peer, hdrs, ip, country);
    }

    fn check_with(
        field: AddressHeader,
        peer: &str,
        hdrs: &[(&str, &str)],
        ip: &str,
        country: Option<&[u8; 2]>,
    ) {
        let l = locator()
            .with_address_header(field)
            .locate(peer.parse().expect("ip"), &headers(hdrs));
        assert_eq!(
            l.ip,
            ip.parse::<IpAddr>().expect("ip"),
            "{field:?} {peer} {hdrs:?}"
        );
        assert_eq!(l.country, country.copied(), "{field:?} {peer} {hdrs:?}");
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
    fn forwarded_for_walks_lines_and_hops_from_the_right() {
        check(
            "10.1.2.3",
            &[
                ("x-forwarded-for", "203.0.113.200"),
                ("x-forwarded-for", "203.0.113.9, 10.0.0.7"),
            ],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "10.1.2.3",
            &[
                ("x-forwarded-for", "203.0.113.200"),
                ("x-forwarded-for", "10.0.0.7"),
            ],
            "203.0.113.200",
            Some(b"JP"),
        );
        // Garbage to the right of every untrusted hop: believe nobody it names.
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "203.0.113.9, junk, 10.0.0.7")],
            "10.1.2.3",
            None,
        );
        // Garbage further left than the client does not matter.
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "junk, 203.0.113.9, 10.0.0.7")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "10.0.0.7, 10.0.0.8")],
            "10.1.2.3",
            None,
        );
        check("10.1.2.3", &[("x-forwarded-for", "")], "10.1.2.3", None);
    }

    #[test]
    fn forwarded_header_when_configured() {
        let check = |peer, hdrs, ip, country| {
            check_with(AddressHeader::Forwarded, peer, hdrs, ip, country);
        };
        check(
            "10.1.2.3",
            &[("forwarded", "for=203.0.113.9;proto=https, for=10.0.0.7")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "10.1.2.3",
            &[("forwarded", "for=\"203.0.113.9:4711\"")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check(
            "10.1.2.3",
            &[("forwarded", "For=\"[2001:db8::1]:443\"")],
            "2001:db8::1",
            None,
        );
        check(
            "10.1.2.3",
            &[("forwarded", "for=203.0.113.9, for=unknown")],
            "10.1.2.3",
            None,
        );
        check(
            "10.1.2.3",
            &[("forwarded", "for=203.0.113.9, proto=https")],
            "10.1.2.3",
            None,
        );
        check(
            "198.51.100.1",
            &[("forwarded", "for=203.0.113.9")],
            "198.51.100.1",
            None,
        );
    }

    /// Issue 19: a hop writes one field and passes the other through as the client sent it.
    #[test]
    fn only_the_configured_field_is_read() {
        let both = [
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.200"),
        ];
        check("10.1.2.3", &both, "203.0.113.9", Some(b"DE"));
        check_with(
            AddressHeader::Forwarded,
            "10.1.2.3",
            &both,
            "203.0.113.200",
            Some(b"JP"),
        );
        // No fallback to the other field when the configured one is absent.
        check(
            "10.1.2.3",
            &[("forwarded", "for=203.0.113.9")],
            "10.1.2.3",
            None,
        );
        check_with(
            AddressHeader::Forwarded,
            "10.1.2.3",
            &[("x-forwarded-for", "203.0.113.9")],
            "10.1.2.3",
            None,
        );
    }

    #[test]
    fn ipv4_mapped_hops_are_ipv4() {
        // A trusted hop on a dual-stack socket may write its clients in the mapped form.
        check(
            "10.1.2.3",
            &[("x-forwarded-for", "::ffff:203.0.113.9, ::ffff:10.0.0.7")],
            "203.0.113.9",
            Some(b"DE"),
        );
        check_with(
            AddressHeader::Forwarded,
            "10.1.2.3",
            &[("forwarded", "for=\"[::ffff:203.0.113.200]:443\"")],
            "203.0.113.200",
            Some(b"JP"),
        );
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

//! `[geo]`: where clients are. The database is opened here (a file that does not open is a
//! problem in the file, at its name); the header, trusted proxies and CIDR table are parsed.

use std::path::Path;
use std::sync::Arc;

use super::{parse_cidr, Checker};
use crate::config::raw::RawGeo;
use crate::config::Geo;

/// `[geo]`: the database, the country header, the proxies believed, the CIDR table.
pub(super) fn geo(ck: &mut Checker<'_>, raw: &RawGeo, base: &Path) -> Geo {
    let mut g = Geo::default();
    if let Some(d) = &raw.database {
        let path = base.join(d.get_ref());
        match crate::geo::Database::open(&path) {
            Ok(db) => g.database = Some(Arc::new(db)),
            Err(e) => ck.error(
                d.span(),
                "geo.database",
                format!("cannot use {} as a MaxMind database: {e}", path.display()),
            ),
        }
    }
    if let Some(h) = &raw.header {
        match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => g.header = Some(n),
            Err(_) => ck.error(
                h.span(),
                "geo.header",
                format!("{:?} is not a header name", h.get_ref()),
            ),
        }
    }
    for p in &raw.trusted_proxies {
        match parse_cidr(p.get_ref()) {
            Some(n) => g.trusted_proxies.push(n),
            None => ck.error(
                p.span(),
                "geo.trusted_proxies",
                format!("{:?} is not an IP address or CIDR block", p.get_ref()),
            ),
        }
    }
    for (i, n) in raw.networks.iter().enumerate() {
        let net = parse_cidr(n.cidr.get_ref());
        let country = crate::geo::code(n.country.get_ref().as_bytes());
        match (net, country) {
            (Some(net), Some(c)) => g.networks.push((net, c)),
            (None, _) => ck.error(
                n.cidr.span(),
                format!("geo.networks[{i}].cidr"),
                format!("{:?} is not a CIDR block", n.cidr.get_ref()),
            ),
            (_, None) => ck.error(
                n.country.span(),
                format!("geo.networks[{i}].country"),
                "must be a two-letter country code",
            ),
        }
    }
    g
}

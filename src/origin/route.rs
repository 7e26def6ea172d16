//! A site's route for a client: which of its `[[sites.routes]]` (and so which pools, in
//! order) serves a client at a location. The first route whose `match` names the client's
//! continent, country or network wins; a route without `match`, or else the last route,
//! serves everyone else.
//!
//! Pure: the location is a parameter (found by `geo`), the routes come validated from
//! `config`; no I/O, no clock. `select` then picks an origin among the route's pools.

use crate::config::{Route, RouteMatch};
use crate::geo::Location;

/// The route for a client at `loc`: the first that matches, else the last; `None` only when
/// there are no routes.
pub(crate) fn find<'a>(routes: &'a [Route], loc: &Location) -> Option<&'a Route> {
    routes
        .iter()
        .find(|r| r.matcher.as_ref().is_none_or(|m| matches(m, loc)))
        .or_else(|| routes.last())
}

/// Whether a route's `match` names the client's continent, its country or a network that
/// holds its address.
fn matches(m: &RouteMatch, loc: &Location) -> bool {
    loc.continent.is_some_and(|c| m.continents.contains(&c))
        || loc.country.is_some_and(|c| m.countries.contains(&c))
        || m.cidrs.iter().any(|n| n.contains(&loc.ip))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;

    fn route(name: &str, matcher: Option<RouteMatch>) -> Route {
        Route {
            name: Arc::from(name),
            matcher,
            pools: Vec::new(),
        }
    }

    /// The name of the route chosen for a client at `ip` in `country` (and `continent`).
    fn check(routes: &[Route], ip: &str, country: Option<&[u8; 2]>, expected: Option<&str>) {
        let loc = Location {
            ip: ip.parse::<IpAddr>().expect("test address"),
            country: country.copied(),
            continent: country.and_then(|c| match c {
                b"DE" | b"FR" => Some(*b"EU"),
                b"US" => Some(*b"NA"),
                _ => None,
            }),
        };
        assert_eq!(
            find(routes, &loc).map(|r| &*r.name),
            expected,
            "{ip} {country:?}"
        );
    }

    #[test]
    fn first_match_wins_and_the_last_route_serves_the_rest() {
        let routes = [
            route(
                "office",
                Some(RouteMatch {
                    cidrs: vec!["10.0.0.0/8".parse().expect("net")],
                    ..RouteMatch::default()
                }),
            ),
            route(
                "france",
                Some(RouteMatch {
                    countries: vec![*b"FR"],
                    ..RouteMatch::default()
                }),
            ),
            route(
                "europe",
                Some(RouteMatch {
                    continents: vec![*b"EU"],
                    ..RouteMatch::default()
                }),
            ),
            route(
                "rest",
                Some(RouteMatch {
                    countries: vec![*b"JP"],
                    ..RouteMatch::default()
                }),
            ),
        ];
        check(&routes, "10.1.2.3", Some(b"FR"), Some("office"));
        check(&routes, "192.0.2.1", Some(b"FR"), Some("france"));
        check(&routes, "192.0.2.1", Some(b"DE"), Some("europe"));
        // Matches no route: the last one, though its own `match` names another country.
        check(&routes, "192.0.2.1", Some(b"US"), Some("rest"));
        check(&routes, "192.0.2.1", None, Some("rest"));
        check(&[], "192.0.2.1", Some(b"FR"), None);
    }

    #[test]
    fn a_route_without_match_serves_every_client_that_reaches_it() {
        let routes = [
            route("default", None),
            route(
                "never",
                Some(RouteMatch {
                    countries: vec![*b"FR"],
                    ..RouteMatch::default()
                }),
            ),
        ];
        check(&routes, "192.0.2.1", Some(b"FR"), Some("default"));
    }
}

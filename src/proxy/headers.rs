//! Header rules at the proxy boundary: hop-by-hop fields, forwarding fields a client may not
//! set, and the fields we add (`Via`, `X-Forwarded-*`).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Ages below this are answered from `AGE_DIGITS`, without allocating.
const STATIC_AGES: usize = 10_000;

/// "0000" to "9999", four digits each, built at compile time: an `Age` value is a slice of
/// it with the leading zeros skipped, a `'static` `HeaderValue` that needs no allocation to
/// make, clone or drop. `HeaderValue::from(u64)` allocates a buffer on every hit.
static AGE_DIGITS: [u8; 4 * STATIC_AGES] = {
    let mut t = [0u8; 4 * STATIC_AGES];
    let mut n = 0;
    while n < STATIC_AGES {
        t[4 * n] = b'0' + (n / 1000) as u8;
        t[4 * n + 1] = b'0' + (n / 100 % 10) as u8;
        t[4 * n + 2] = b'0' + (n / 10 % 10) as u8;
        t[4 * n + 3] = b'0' + (n % 10) as u8;
        n += 1;
    }
    t
};

/// The `Age` field's value for `secs` seconds.
pub fn age_value(secs: u64) -> HeaderValue {
    if let Ok(n) = usize::try_from(secs) {
        if n < STATIC_AGES {
            let digits = if n >= 1000 {
                4
            } else if n >= 100 {
                3
            } else if n >= 10 {
                2
            } else {
                1
            };
            let end = 4 * n + 4;
            let text: &'static [u8] = &AGE_DIGITS[end - digits..end];
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from_static(text)) {
                return v;
            }
        }
    }
    HeaderValue::from(secs)
}

/// True for the fixed hop-by-hop fields (the ones `Connection` names are checked apart).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name.as_str().starts_with("proxy-")
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field it names,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and all `Proxy-*` fields.
///
/// One look at the field names first: most messages carry none of these, and removing by
/// name costs a hash and a probe per name even when the field is absent.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // RFC 9112 §6.3: `Transfer-Encoding` overrides `Content-Length`, and the message was read
    // by its transfer coding. Once the coding is removed here the length would be taken as
    // the framing of what we send on, cutting the body off silently.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // The fields `Connection` names, each removed as its token is read (one pass; a value is
    // a cheap shared clone). `close` names no field and `keep-alive` goes below with the
    // rest, so the usual value costs no lookup.
    let mut index = 0;
    while let Some(value) = headers
        .get_all(header::CONNECTION)
        .iter()
        .nth(index)
        .cloned()
    {
        index += 1;
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if !is_hop_by_hop(&name) {
                    headers.remove(name);
                }
            }
        }
    }
    remove_where(headers, is_hop_by_hop);
}

/// Removes every field whose name satisfies `doomed`: one name at a time, found by a scan of
/// the few field names a message has, rather than collected into a list first.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|k| doomed(k)).cloned() {
        headers.remove(name);
    }
}

/// Fields that could steer an origin's routing or rewriting and that no client may set.
const ALWAYS_DROPPED: &[&str] = &[
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
];

/// Prepares a client's request headers for an origin.
///
/// `X-Forwarded-*` and `Forwarded` are kept only from a `trusted` peer (a proxy in front of
/// us); `X-Forwarded-For` then gets the peer appended, otherwise it is replaced by the peer.
pub fn forward_request_headers(
    headers: &mut HeaderMap,
    peer: IpAddr,
    https: bool,
    host: &HeaderValue,
    trusted: bool,
    via: &HeaderValue,
) {
    remove_hop_by_hop(headers);
    let prior_xff = if trusted {
        combined(headers, &X_FORWARDED_FOR)
    } else {
        None
    };
    let prior_proto = trusted
        .then(|| headers.get(&X_FORWARDED_PROTO).cloned())
        .flatten();
    let prior_host = trusted
        .then(|| headers.get(&X_FORWARDED_HOST).cloned())
        .flatten();
    // Dropped whoever sent them, or (Forwarded) unless a trusted proxy did; X-Forwarded-*
    // are rebuilt below from what was kept.
    let doomed = |k: &HeaderName| {
        let n = k.as_str();
        (matches!(n.as_bytes().first(), Some(b'x' | b't')) && ALWAYS_DROPPED.contains(&n))
            || n.starts_with("x-forwarded-")
            || (!trusted && k == header::FORWARDED)
    };
    if headers.keys().any(doomed) {
        remove_where(headers, doomed);
    }
    let prior = prior_xff.unwrap_or_default();
    let mut xff = bytes::BytesMut::with_capacity(prior.len() + 2 + 39);
    if !prior.is_empty() {
        xff.extend_from_slice(prior.as_bytes());
        xff.extend_from_slice(b", ");
    }
    push_ip(&mut xff, peer);
    if let Ok(v) = HeaderValue::from_maybe_shared(xff.freeze()) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        prior_proto
            .unwrap_or_else(|| HeaderValue::from_static(if https { "https" } else { "http" })),
    );
    headers.insert(
        X_FORWARDED_HOST.clone(),
        prior_host.unwrap_or_else(|| host.clone()),
    );
    headers.append(header::VIA, via.clone());
}

/// Appends `ip` in its usual text form. IPv4 is written digit by digit: through `Display`
/// (the formatting machinery, then a `String`) it cost as much as the rest of the request's
/// forwarding fields together, on every miss.
fn push_ip(out: &mut bytes::BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b".");
                }
                if octet >= 100 {
                    out.extend_from_slice(&[b'0' + octet / 100]);
                }
                if octet >= 10 {
                    out.extend_from_slice(&[b'0' + octet / 10 % 10]);
                }
                out.extend_from_slice(&[b'0' + octet % 10]);
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// Joins all field lines of `name` with `, `.
fn combined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out = String::new();
    for v in headers.get_all(name) {
        let Ok(s) = v.to_str() else { continue };
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(s.trim());
    }
    (!out.is_empty()).then_some(out)
}

/// The `Via` value for a message of `version` received by this node.
pub fn via_value(version: Version, name: &str) -> HeaderValue {
    let proto = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    HeaderValue::from_str(&format!("{proto} {name}"))
        .unwrap_or(HeaderValue::from_static("1.1 edgecache"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_values_match_decimal_formatting() {
        for secs in [
            0,
            1,
            9,
            10,
            42,
            99,
            100,
            999,
            1000,
            3600,
            9999,
            10_000,
            86_400,
            u64::MAX,
        ] {
            assert_eq!(age_value(secs), secs.to_string().as_str(), "{secs}");
        }
        for secs in 0..STATIC_AGES as u64 {
            assert_eq!(
                age_value(secs).to_str().ok(),
                Some(secs.to_string().as_str())
            );
        }
    }

    fn map(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept"]);
    }

    #[test]
    fn peer_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.7.250",
            "::1",
            "2001:db8::17",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut out = bytes::BytesMut::new();
            push_ip(&mut out, ip);
            assert_eq!(&out[..], ip.to_string().as_bytes());
        }
    }

    #[test]
    fn every_field_connection_names_goes_whatever_its_case() {
        let mut h = map(&[
            ("connection", "close"),
            ("connection", "Cache-Control , x-a,,X-B"),
            ("cache-control", "no-cache"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-c"]);
    }

    /// The fields forwarded for a request from `peer` to site.example, through edgecache.
    fn forward_for(h: &mut HeaderMap, peer: &str, https: bool, trusted: bool) {
        let host = HeaderValue::from_static("site.example");
        let via = HeaderValue::from_static("1.1 edgecache");
        let peer = peer.parse().expect("ip");
        forward_request_headers(h, peer, https, &host, trusted, &via);
    }

    #[test]
    fn untrusted_forwarding_fields_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=6.6.6.6"),
            ("x-original-url", "/admin"),
        ]);
        forward_for(&mut h, "192.0.2.1", true, false);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-host"], "site.example");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(h.get("x-forwarded-prefix").is_none());
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-original-url").is_none());
        assert_eq!(h["via"], "1.1 edgecache");
    }

    #[test]
    fn trusted_peer_chain_is_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        forward_for(&mut h, "10.0.0.1", false, true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}

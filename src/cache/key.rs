//! Cache keys: a primary key (scheme, host, path and query) hashed without allocating, and the
//! secondary key that `Vary` adds (the request's values of the listed headers).

use std::hash::{BuildHasher, Hash, Hasher};

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The parts of a request that make its primary cache key, borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyParts<'a> {
    pub https: bool,
    /// Lowercase host without port.
    pub host: &'a str,
    /// Path and query exactly as received (`/a/b?x=1`).
    pub path_and_query: &'a str,
}

/// Hashes key parts. One builder per store, so keys are not predictable from outside.
#[derive(Debug, Clone)]
pub struct KeyHasher {
    state: std::collections::hash_map::RandomState,
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher {
            state: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl KeyHasher {
    /// The 64-bit primary key. Entries also keep the parts, so a collision is detected on
    /// lookup and never serves another URL's content.
    pub fn hash(&self, parts: &KeyParts<'_>) -> u64 {
        let mut h = self.state.build_hasher();
        parts.https.hash(&mut h);
        parts.host.hash(&mut h);
        parts.path_and_query.hash(&mut h);
        h.finish()
    }
}

/// Hasher state for maps keyed by a [`KeyHasher`] output: the key already is a keyed SipHash
/// of the URL, uniformly spread and unpredictable from outside, so hashing it a second time
/// (what moka's default `RandomState` would do on every lookup) only costs time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrehashedKey;

impl BuildHasher for PrehashedKey {
    type Hasher = Prehashed;

    fn build_hasher(&self) -> Prehashed {
        Prehashed(0)
    }
}

/// See [`PrehashedKey`]. A `u64` key hashes to itself; anything else is folded in FNV-1a
/// style, so the hasher stays correct if ever used for another key type.
#[derive(Debug, Clone, Copy)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The owned form of [`KeyParts`], kept in an entry to verify a hash match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedKey {
    pub https: bool,
    pub host: Box<str>,
    pub path_and_query: Box<str>,
}

impl OwnedKey {
    pub fn new(parts: &KeyParts<'_>) -> Self {
        OwnedKey {
            https: parts.https,
            host: parts.host.into(),
            path_and_query: parts.path_and_query.into(),
        }
    }

    /// The borrowed form, for lookups.
    pub fn parts(&self) -> KeyParts<'_> {
        KeyParts {
            https: self.https,
            host: &self.host,
            path_and_query: &self.path_and_query,
        }
    }

    pub fn matches(&self, parts: &KeyParts<'_>) -> bool {
        self.https == parts.https
            && *self.host == *parts.host
            && *self.path_and_query == *parts.path_and_query
    }

    /// The URL this key stands for, for logs and purge listings.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.host, self.path_and_query)
    }
}

/// The request header values a stored response varies on (`Vary`), normalised, plus any
/// site-configured key material (headers and cookies added to the key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaryKey {
    fields: Vec<(HeaderName, Option<Box<str>>)>,
    extra: Option<Box<str>>,
}

impl VaryKey {
    /// Builds the secondary key from the response's `Vary` and the request's headers.
    /// Returns an empty key when the response does not vary.
    pub fn from_response(response: &HeaderMap, request: &HeaderMap) -> VaryKey {
        VaryKey::build(response, request, None)
    }

    /// Like [`VaryKey::from_response`], leaving out `skip` (`Accept-Encoding` for a response
    /// the cache compresses itself, which serves every client from one entry).
    pub fn from_response_except(
        response: &HeaderMap,
        request: &HeaderMap,
        skip: &HeaderName,
    ) -> VaryKey {
        VaryKey::build(response, request, Some(skip))
    }

    fn build(response: &HeaderMap, request: &HeaderMap, skip: Option<&HeaderName>) -> VaryKey {
        let mut fields = Vec::new();
        for v in response.get_all(http::header::VARY) {
            let Ok(text) = v.to_str() else { continue };
            for name in text.split(',') {
                let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) else {
                    continue;
                };
                if fields.iter().any(|(n, _)| *n == name) || skip == Some(&name) {
                    continue;
                }
                let value = vary_value(&name, request);
                fields.push((name, value));
            }
        }
        VaryKey {
            fields,
            extra: None,
        }
    }

    /// Adds site key material (see [`key_extra`]).
    pub fn with_extra(mut self, extra: Option<Box<str>>) -> VaryKey {
        self.extra = extra;
        self
    }

    /// True when `request` has the same values for every varying header and the same extra
    /// key material.
    pub fn matches(&self, request: &HeaderMap, extra: Option<&str>) -> bool {
        self.extra.as_deref() == extra
            && self.fields.iter().all(|(name, stored)| {
                let value = vary_value(name, request);
                value.as_deref() == stored.as_deref()
            })
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields varied on, lowercase, each with the request's value it was stored for
    /// (`None`: the request had none), for listings (`GET /cache`).
    pub fn fields(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v.as_deref()))
    }

    /// Site key material added to the key, if any (headers and cookies a site keys on).
    pub fn extra(&self) -> Option<&str> {
        self.extra.as_deref()
    }
}

/// The path and query as they enter the key: parameters sorted, dropped, or some removed.
/// Borrows when nothing changes.
pub fn normalise_query<'a>(
    path_and_query: &'a str,
    sort: bool,
    ignore_all: bool,
    ignore: &[String],
) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    if ignore_all {
        return Cow::Borrowed(path);
    }
    if !sort && ignore.is_empty() {
        return Cow::Borrowed(path_and_query);
    }
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(n, _)| n);
            !ignore.iter().any(|i| i == name)
        })
        .collect();
    if sort {
        params.sort_unstable();
    }
    if params.is_empty() {
        return Cow::Borrowed(path);
    }
    Cow::Owned(format!("{path}?{}", params.join("&")))
}

/// Site key material from request headers and cookies; `None` when the site adds none.
pub fn key_extra(
    request: &HeaderMap,
    headers: &[HeaderName],
    cookies: &[String],
) -> Option<Box<str>> {
    if headers.is_empty() && cookies.is_empty() {
        return None;
    }
    let mut out = String::new();
    for h in headers {
        out.push_str(h.as_str());
        out.push('=');
        if let Some(v) = normalised(request.get_all(h).iter()) {
            out.push_str(&v);
        }
        out.push('\n');
    }
    for name in cookies {
        out.push_str("cookie:");
        out.push_str(name);
        out.push('=');
        let value = request
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| n == name)
            .map(|(_, v)| v);
        if let Some(v) = value {
            out.push_str(v);
        }
        out.push('\n');
    }
    Some(out.into_boxed_str())
}

/// A request's value for one `Vary` field. `Accept-Encoding` is a set of codings whose order
/// and case carry no meaning, so it is lowercased and sorted: `gzip, br` and `BR,gzip` share
/// a variant. `Accept-Language` keeps its order (a browser lists by preference) but not its
/// case or spacing (language ranges are case-insensitive, RFC 4647 §2): `en-US, de; q=0.50`
/// and `en-us,de;q=0.5` share one. Other fields are kept as sent, bar list spacing.
fn vary_value(name: &HeaderName, request: &HeaderMap) -> Option<Box<str>> {
    let joined = normalised(request.get_all(name).iter())?;
    if name == http::header::ACCEPT_LANGUAGE {
        return Some(languages(&joined));
    }
    if name != http::header::ACCEPT_ENCODING {
        return Some(joined);
    }
    let mut codings: Vec<String> = joined
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    codings.sort_unstable();
    codings.dedup();
    Some(codings.join(",").into_boxed_str())
}

/// `Accept-Language` items (already joined with `,`) lowercased, with no space around `;` and
/// `=`, and the weight written shortest (`q=0.50` as `q=0.5`, `q=1.0` dropped).
fn languages(joined: &str) -> Box<str> {
    let mut out = String::with_capacity(joined.len());
    for item in joined.split(',') {
        let mut parts = item.split(';');
        let range = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&range);
        for param in parts {
            let Some((k, v)) = param.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "q" {
                let v = if v.contains('.') {
                    v.trim_end_matches('0').trim_end_matches('.')
                } else {
                    v
                };
                if v == "1" {
                    continue;
                }
                out.push_str(";q=");
                out.push_str(v);
            } else {
                out.push(';');
                out.push_str(&k);
                out.push('=');
                out.push_str(v);
            }
        }
    }
    out.into_boxed_str()
}

/// Joins field lines with `,` and drops the optional whitespace around list items, so that
/// `gzip, br` and `gzip,br` compare equal.
fn normalised<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<Box<str>> {
    let mut out = String::new();
    let mut any = false;
    for v in values {
        any = true;
        for item in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(item);
        }
    }
    any.then(|| out.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prehashed_key_hashes_to_itself() {
        let b = PrehashedKey;
        for k in [0u64, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(b.hash_one(k), k);
        }
        // Other key types still spread.
        assert_ne!(b.hash_one("a"), b.hash_one("b"));
    }

    #[test]
    fn hash_distinguishes_parts() {
        let k = KeyHasher::default();
        let a = KeyParts {
            https: false,
            host: "a.com",
            path_and_query: "/x",
        };
        let b = KeyParts { https: true, ..a };
        let c = KeyParts {
            host: "a.co",
            path_and_query: "m/x",
            ..a
        };
        assert_eq!(k.hash(&a), k.hash(&a));
        assert_ne!(k.hash(&a), k.hash(&b));
        assert_ne!(k.hash(&a), k.hash(&c));
        assert!(OwnedKey::new(&a).matches(&a));
        assert!(!OwnedKey::new(&a).matches(&b));
        assert_eq!(OwnedKey::new(&b).url(), "https://a.com/x");
    }

    #[test]
    fn vary_matches_normalised_values() {
        let mut resp = HeaderMap::new();
        resp.insert("vary", HeaderValue::from_static("Accept-Encoding"));
        let mut req = HeaderMap::new();
        req.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        let key = VaryKey::from_response(&resp, &req);
        let mut other = HeaderMap::new();
        other.insert("accept-encoding", HeaderValue::from_static("gzip,br"));
        assert!(key.matches(&other, None));
        other.insert("accept-encoding", HeaderValue::from_static("identity"));
        assert!(!key.matches(&other, None));
        assert!(
            !key.matches(&HeaderMap::new(), None),
            "absent differs from present"
        );
        other.insert("accept-encoding", HeaderValue::from_static("BR, gzip"));
        assert!(
            key.matches(&other, None),
            "order and case of codings do not matter"
        );
    }

    #[test]
    fn accept_language_is_compared_without_case_or_spacing() {
        let mut resp = HeaderMap::new();
        resp.insert("vary", HeaderValue::from_static("Accept-Language"));
        let req = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("accept-language", HeaderValue::from_static(v));
            h
        };
        let key = VaryKey::from_response(&resp, &req("en-US, de;q=0.5"));
        for same in [
            "en-us,de;q=0.5",
            "EN-us , de; q=0.50",
            "en-US;q=1.0, de;Q=0.5",
        ] {
            assert!(key.matches(&req(same), None), "{same}");
        }
        for other in ["de;q=0.5, en-US", "en-US, de;q=0.6", "en-GB, de;q=0.5"] {
            assert!(!key.matches(&req(other), None), "{other}");
        }
    }

    #[test]
    fn query_normalisation() {
        assert_eq!(
            normalise_query("/a?b=1&a=2", true, false, &[]),
            "/a?a=2&b=1"
        );
        assert_eq!(normalise_query("/a?b=1&a=2", false, true, &[]), "/a");
        assert_eq!(
            normalise_query("/a?utm_source=x&id=3", false, false, &["utm_source".into()]),
            "/a?id=3"
        );
        assert_eq!(
            normalise_query("/a?utm_source=x", false, false, &["utm_source".into()]),
            "/a"
        );
        assert!(matches!(
            normalise_query("/a?x=1", false, false, &[]),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn extra_key_material_from_headers_and_cookies() {
        let mut req = HeaderMap::new();
        req.insert("x-device", HeaderValue::from_static("mobile"));
        req.insert("cookie", HeaderValue::from_static("session=abc; lang=de"));
        let e = key_extra(
            &req,
            &[HeaderName::from_static("x-device")],
            &["lang".into()],
        )
        .expect("extra");
        assert_eq!(&*e, "x-device=mobile\ncookie:lang=de\n");
        assert!(key_extra(&req, &[], &[]).is_none());
    }
}

//! `Cache-Control` directives (RFC 9111 §5.2) parsed once into [`CacheControl`], and which
//! field this cache takes them from: `CDN-Cache-Control` (RFC 9213), else
//! `Surrogate-Control`, else `Cache-Control` ([`response_directives`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Parsed `Cache-Control` directives (request or response). Unknown directives are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    /// Unqualified `no-cache`: store, but revalidate before every use.
    pub no_cache: bool,
    /// `no-cache="field, ..."`: those fields are not stored; the rest is reusable.
    pub no_cache_fields: Vec<Box<str>>,
    /// Unqualified `private`: a shared cache does not store the response.
    pub private: bool,
    /// `private="field, ..."`: a shared cache stores the response without those fields.
    pub private_fields: Vec<Box<str>>,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    /// `must-understand` (RFC 9111 §5.2.2.3): store only when the status code's caching rules
    /// are understood, and then `no-store` is overridden.
    pub must_understand: bool,
    pub only_if_cached: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// RFC 9111 §1.2.2: delta-seconds greater than 2^31 are taken as 2^31.
pub(super) const DELTA_MAX: u64 = 1 << 31;

impl CacheControl {
    /// Parses every `Cache-Control` field line of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> CacheControl {
        Self::parse_values(headers.get_all(header::CACHE_CONTROL).iter())
    }

    /// Parses directive lists; when a directive repeats, its first occurrence wins (§4.2.1).
    pub fn parse_values<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in values {
            let Ok(text) = value.to_str() else { continue };
            for (name, arg) in Directives::new(text) {
                let seconds = || -> Option<u64> {
                    let a = arg?;
                    if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                        // An invalid delta is treated as zero: the response is stale (§4.2.1).
                        return Some(0);
                    }
                    Some(a.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
                };
                let set = |slot: &mut Option<u64>| {
                    if slot.is_none() {
                        *slot = seconds();
                    }
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => match arg {
                        Some(fields) => cc.no_cache_fields.extend(field_list(fields)),
                        None => cc.no_cache = true,
                    },
                    "private" => match arg {
                        Some(fields) => cc.private_fields.extend(field_list(fields)),
                        None => cc.private = true,
                    },
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "must-understand" => cc.must_understand = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "max-age" => set(&mut cc.max_age),
                    "s-maxage" => set(&mut cc.s_maxage),
                    // `max-stale` without a value accepts any staleness.
                    "max-stale" if cc.max_stale.is_none() => {
                        cc.max_stale = if arg.is_none() {
                            Some(u64::MAX)
                        } else {
                            seconds()
                        };
                    }
                    "min-fresh" => set(&mut cc.min_fresh),
                    "stale-while-revalidate" => set(&mut cc.stale_while_revalidate),
                    "stale-if-error" => set(&mut cc.stale_if_error),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits a qualified directive's field list (`"set-cookie, x-a"`) into lowercase names.
fn field_list(text: &str) -> impl Iterator<Item = Box<str>> + '_ {
    text.split(',')
        .map(|f| f.trim())
        .filter(|f| !f.is_empty())
        .map(|f| f.to_ascii_lowercase().into_boxed_str())
}

/// Iterates `name[=value]` pairs of a directive list, honouring quoted strings.
struct Directives<'a> {
    rest: &'a str,
}

impl<'a> Directives<'a> {
    fn new(text: &'a str) -> Self {
        Directives { rest: text }
    }
}

impl<'a> Iterator for Directives<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest.trim_start_matches([',', ' ', '\t']);
            if s.is_empty() {
                return None;
            }
            let name_end = s.find(['=', ',']).unwrap_or(s.len());
            let name = s[..name_end].trim();
            if s[name_end..].starts_with('=') {
                let after = s[name_end + 1..].trim_start();
                if let Some(quoted) = after.strip_prefix('"') {
                    // Quoted string: find the closing quote, skipping escaped characters.
                    let bytes = quoted.as_bytes();
                    let mut i = 0;
                    while i < bytes.len() && bytes[i] != b'"' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    let end = i.min(quoted.len());
                    let value = &quoted[..end];
                    let tail = quoted.get(end + 1..).unwrap_or("");
                    self.rest = tail.find(',').map(|i| &tail[i..]).unwrap_or("");
                    if name.is_empty() {
                        continue;
                    }
                    return Some((name, Some(value)));
                }
                let end = after.find(',').unwrap_or(after.len());
                let value = after[..end].trim();
                self.rest = &after[end..];
                if name.is_empty() {
                    continue;
                }
                return Some((name, Some(value)));
            }
            self.rest = &s[name_end..];
            if name.is_empty() {
                continue;
            }
            return Some((name, None));
        }
    }
}

/// Response fields read by this cache, as names built at compile time: looking a field up by
/// `&str` parses the name on every call. `Surrogate-Control`, `Surrogate-Key` and `Cache-Tag`
/// are for this cache only (not passed on); `CDN-Cache-Control` targets every CDN on the
/// path and is passed on (RFC 9213 §2.1).
pub static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");
pub static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
/// The default name of the targeted field this cache alone obeys (`cache.cache_control_field`).
pub static EDGECACHE_CACHE_CONTROL: HeaderName = HeaderName::from_static("edgecache-cache-control");

/// The directives this cache obeys, from the first of these that applies: `own` (this cache's
/// targeted field), `CDN-Cache-Control` (RFC 9213), `Surrogate-Control`, else
/// `Cache-Control`. When a targeted field is used, `Cache-Control` and `Expires` are ignored;
/// the boolean says so.
///
/// A targeted field applies when present, not empty, and valid as RFC 9213 §2.1 defines it:
/// a Structured Fields Dictionary whose known directives have their types (see
/// [`targeted`]); otherwise it is ignored whole, as if absent. A valid field with no directive
/// this cache knows still applies (RFC 9213's `CDN-Cache-Control: none` example: the origin
/// lifts `Cache-Control` for CDNs). `Surrogate-Control` (no specification of its own) is read
/// with the `Cache-Control` grammar and applies when it holds a directive this cache knows.
pub fn response_directives(headers: &HeaderMap, own: &HeaderName) -> (CacheControl, bool) {
    for name in [own, &CDN_CACHE_CONTROL] {
        if let Some(cc) = targeted(headers, name) {
            return (cc, true);
        }
    }
    if present(headers, &SURROGATE_CONTROL) {
        let cc = CacheControl::parse_values(headers.get_all(&SURROGATE_CONTROL).iter());
        if cc != CacheControl::default() {
            return (cc, true);
        }
    }
    (CacheControl::from_headers(headers), false)
}

/// Whether `name` is present with something other than whitespace.
fn present(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
}

/// A targeted field (RFC 9213 §2.1) as directives, or `None` when it is to be ignored: absent,
/// empty, not a Structured Fields Dictionary (its lines joined as RFC 9651 §4.2 says), or a
/// known directive with a value of the wrong type: delta-seconds must be non-negative
/// Integers, `no-store`, `public`, `must-revalidate` and `proxy-revalidate` the Boolean true
/// (written bare), `no-cache` and `private` true or a String listing fields. RFC 9213 says
/// implementations "SHOULD NOT consume values that violate these inferred constraints";
/// taking the rest of a field whose `no-store` was unreadable would be a guess, so nothing of
/// it is taken. Unknown directives and parameters are ignored.
pub fn targeted(headers: &HeaderMap, name: &HeaderName) -> Option<CacheControl> {
    if !present(headers, name) {
        return None;
    }
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let mut dict: sfv::Dictionary = sfv::Parser::new(first.as_bytes()).parse().ok()?;
    for line in lines {
        dict = sfv::Parser::new(line.as_bytes())
            .parse_dictionary_with_visitor(dict)
            .ok()?;
    }
    let mut cc = CacheControl::default();
    for (key, entry) in &dict {
        let item = match entry {
            sfv::ListEntry::Item(item) => Some(&item.bare_item),
            sfv::ListEntry::InnerList(_) => None,
        };
        let delta = || -> Option<Option<u64>> {
            let n = i64::from(item?.as_integer()?);
            let n = u64::try_from(n).ok()?;
            Some(Some(n.min(DELTA_MAX)))
        };
        let flag = || -> Option<bool> { item?.as_boolean().filter(|&b| b) };
        let fields = || -> Option<Result<bool, Vec<Box<str>>>> {
            let item = item?;
            if let Some(b) = item.as_boolean() {
                return b.then_some(Ok(true));
            }
            let list = item.as_string()?.as_str();
            Some(Err(field_list(list).collect()))
        };
        match key.as_str() {
            "max-age" => cc.max_age = delta()?,
            "s-maxage" => cc.s_maxage = delta()?,
            "stale-while-revalidate" => cc.stale_while_revalidate = delta()?,
            "stale-if-error" => cc.stale_if_error = delta()?,
            "no-store" => cc.no_store = flag()?,
            "public" => cc.public = flag()?,
            "must-revalidate" => cc.must_revalidate = flag()?,
            "proxy-revalidate" => cc.proxy_revalidate = flag()?,
            "must-understand" => cc.must_understand = flag()?,
            "no-cache" => match fields()? {
                Ok(all) => cc.no_cache = all,
                Err(list) => cc.no_cache_fields = list,
            },
            "private" => match fields()? {
                Ok(all) => cc.private = all,
                Err(list) => cc.private_fields = list,
            },
            _ => {}
        }
    }
    Some(cc)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::cc;
    use super::*;

    fn targeted_of(values: &[&str]) -> Option<CacheControl> {
        let mut h = HeaderMap::new();
        for v in values {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append(&CDN_CACHE_CONTROL, v);
            }
        }
        targeted(&h, &CDN_CACHE_CONTROL)
    }

    #[test]
    fn targeted_fields_are_structured_dictionaries_rfc_9213_section_2_1() {
        let c =
            targeted_of(&["max-age=60, no-cache=\"x-a, X-B\", stale-if-error=30"]).expect("valid");
        assert_eq!((c.max_age, c.stale_if_error), (Some(60), Some(30)));
        assert_eq!(c.no_cache_fields, vec![Box::from("x-a"), Box::from("x-b")]);
        assert!(!c.no_cache);
        let c = targeted_of(&["no-store", "private"]).expect("two lines, one dictionary");
        assert!(c.no_store && c.private);
        let c = targeted_of(&["none"]).expect("valid, with nothing this cache knows");
        assert_eq!(c, CacheControl::default());
        let c = targeted_of(&["max-age=60;a=1, x-ext=(1 2), y=\"s\""]).expect("unknown ones");
        assert_eq!(c.max_age, Some(60));
        let c = targeted_of(&["max-age=99999999999"]).expect("large");
        assert_eq!(c.max_age, Some(DELTA_MAX));
        for invalid in [
            "max-age=\"60\"",
            "max-age=abc",
            "max-age=1.5",
            "max-age=-1",
            "max-age=(60)",
            "no-store=1",
            "no-store=?0",
            "public=\"yes\"",
            "private=abc",
            "Max-Age=60",
            "max-age=60,",
            "max-age=60 no-store",
            "max-age=60, no-store=\"",
        ] {
            assert_eq!(targeted_of(&[invalid]), None, "{invalid}");
        }
        assert_eq!(
            targeted_of(&["max-age=60", "no-store=3"]),
            None,
            "a bad line spoils all"
        );
        assert_eq!(targeted_of(&["  "]), None, "empty");
    }

    #[test]
    fn our_own_field_then_cdn_cache_control_then_cache_control() {
        let mut h = HeaderMap::new();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=1"));
        h.insert(&CDN_CACHE_CONTROL, HeaderValue::from_static("max-age=2"));
        h.insert(
            &EDGECACHE_CACHE_CONTROL,
            HeaderValue::from_static("max-age=3"),
        );
        let at = |h: &HeaderMap| response_directives(h, &EDGECACHE_CACHE_CONTROL);
        assert_eq!(at(&h), (cc("max-age=3"), true));
        h.insert(
            &EDGECACHE_CACHE_CONTROL,
            HeaderValue::from_static("max-age=x"),
        );
        assert_eq!(
            at(&h),
            (cc("max-age=2"), true),
            "an invalid own field is ignored"
        );
        h.insert(
            &CDN_CACHE_CONTROL,
            HeaderValue::from_static("max-age=\"2\""),
        );
        assert_eq!(at(&h), (cc("max-age=1"), false), "then Cache-Control");
        h.insert(&SURROGATE_CONTROL, HeaderValue::from_static("max-age=4"));
        assert_eq!(
            at(&h),
            (cc("max-age=4"), true),
            "Surrogate-Control before it"
        );
    }

    #[test]
    fn directives_parse() {
        let c = cc(
            "public, max-age=60, s-maxage=\"120\", no-cache=\"set-cookie, foo\", stale-if-error=5",
        );
        assert!(c.public && !c.no_cache);
        assert_eq!(
            c.no_cache_fields,
            vec![Box::from("set-cookie"), Box::from("foo")]
        );
        assert_eq!(
            (c.max_age, c.s_maxage, c.stale_if_error),
            (Some(60), Some(120), Some(5))
        );
        let c = cc("MAX-AGE=10,max-age=20");
        assert_eq!(c.max_age, Some(10), "first occurrence wins");
        let c = cc("max-age=abc");
        assert_eq!(c.max_age, Some(0), "invalid delta is stale");
        let c = cc("max-age=99999999999999999999");
        assert_eq!(c.max_age, Some(DELTA_MAX));
        let c = cc("max-stale");
        assert_eq!(c.max_stale, Some(u64::MAX));
        let c = cc(",,  no-store ,");
        assert!(c.no_store);
    }
}

/// Properties of the directive parser over generated input.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// Every directive this parser knows; anything else is ignored.
    const KNOWN: [&str; 14] = [
        "must-understand",
        "no-store",
        "no-cache",
        "private",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "only-if-cached",
        "max-age",
        "s-maxage",
        "max-stale",
        "min-fresh",
        "stale-while-revalidate",
        "stale-if-error",
    ];

    fn parse(text: &str) -> CacheControl {
        match HeaderValue::from_str(text) {
            Ok(v) => CacheControl::parse_values(std::iter::once(&v)),
            Err(e) => panic!("{text:?} is a field value: {e}"),
        }
    }

    /// A known directive as `(name, argument)`: no argument, delta-seconds (sometimes
    /// invalid or past 2^31), or a quoted field list.
    fn known() -> impl Strategy<Value = (String, Option<String>)> {
        let arg = prop_oneof![
            Just(None),
            (0u64..100_000).prop_map(|n| Some(n.to_string())),
            Just(Some("99999999999999999999".to_owned())),
            Just(Some("-1".to_owned())),
            "[a-z-]{1,8}(, ?[a-z-]{1,8}){0,2}".prop_map(|f| Some(format!("\"{f}\""))),
        ];
        (proptest::sample::select(&KNOWN[..]), arg).prop_map(|(n, a)| (n.to_owned(), a))
    }

    /// A directive this parser does not know, with any argument the grammar allows:
    /// a token, or a quoted string holding commas, `=`, escaped quotes and known names.
    fn unknown() -> impl Strategy<Value = String> {
        let name = "[a-z][a-z0-9-]{0,10}".prop_filter("unknown", |n| {
            !KNOWN.iter().any(|k| k.eq_ignore_ascii_case(n))
        });
        let arg = prop_oneof![
            Just(String::new()),
            "=[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,8}",
            "(max-age=1|no-store|, |=|\\\\\"|[ a-z]){0,6}".prop_map(|q| format!("=\"{q}\"")),
        ];
        (name, arg).prop_map(|(n, a)| format!("{n}{a}"))
    }

    fn joined(list: &[(String, Option<String>)]) -> Vec<String> {
        list.iter()
            .map(|(n, a)| match a {
                Some(a) => format!("{n}={a}"),
                None => n.clone(),
            })
            .collect()
    }

    /// Optional whitespace (RFC 9110 §5.6.3 OWS: spaces and tabs).
    fn ows() -> impl Strategy<Value = String> {
        "[ \t]{0,3}"
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn cache_control_never_panics_on_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..120),
            text in any::<String>(),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                for name in [&header::CACHE_CONTROL, &CDN_CACHE_CONTROL, &SURROGATE_CONTROL] {
                    h.append(name, v.clone());
                }
            }
            let _ = CacheControl::from_headers(&h);
            let _ = response_directives(&h, &EDGECACHE_CACHE_CONTROL);
            // The directive splitter on any text, not only what a field value may hold: it
            // ends, and yields no more items than there are bytes.
            prop_assert!(Directives::new(&text).count() <= text.len());
        }

        /// RFC 9111 §5.2: directive names are case-insensitive; RFC 9110 §5.6.1: a list may
        /// have whitespace around its commas and empty elements.
        #[test]
        fn cache_control_ignores_case_and_whitespace_around_commas(
            list in proptest::collection::vec(known(), 1..6),
            upper in proptest::collection::vec(any::<bool>(), 64),
            spaces in proptest::collection::vec((ows(), ows(), 0usize..2), 6),
        ) {
            let plain = joined(&list).join(",");
            let mut varied = String::new();
            for (i, d) in joined(&list).iter().enumerate() {
                let (before, after, empty) = &spaces[i];
                if i > 0 {
                    varied.push_str(before);
                    varied.push_str(&",".repeat(1 + empty));
                    varied.push_str(after);
                }
                let (name, arg) = d
                    .split_once('=')
                    .map_or((d.as_str(), None), |(n, a)| (n, Some(a)));
                let cased = name.chars().zip(&upper);
                varied.extend(cased.map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c }));
                if let Some(a) = arg {
                    varied.push('=');
                    varied.push_str(a);
                }
            }
            prop_assert_eq!(parse(&varied), parse(&plain), "{:?} vs {:?}", varied, plain);
        }

        /// RFC 9111 §5.2.3: a cache ignores directives it does not know, in every field it
        /// reads directives from, and one with a quoted argument hides nothing after it.
        #[test]
        fn unknown_directives_are_ignored(
            list in proptest::collection::vec(known(), 0..5),
            extra in proptest::collection::vec((unknown(), 0usize..6), 1..4),
        ) {
            let plain = joined(&list);
            let mut with = plain.clone();
            for (u, at) in &extra {
                with.insert((*at).min(with.len()), u.clone());
            }
            let (plain, with) = (plain.join(", "), with.join(", "));
            prop_assert_eq!(parse(&with), parse(&plain), "{:?}", with);
            // (`CDN-Cache-Control` has the Structured Fields grammar instead: `targeted_*`.)
            for name in [&SURROGATE_CONTROL, &header::CACHE_CONTROL] {
                let fields = |v: &str| {
                    let mut h = HeaderMap::new();
                    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=7"));
                    if let Ok(v) = HeaderValue::from_str(v) {
                        h.insert(name, v);
                    }
                    response_directives(&h, &EDGECACHE_CACHE_CONTROL)
                };
                prop_assert_eq!(fields(&with), fields(&plain), "{}: {:?}", name, with);
            }
        }
    }
}

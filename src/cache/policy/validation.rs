//! Validation against a stored response: a client's preconditions (`If-Match`,
//! `If-None-Match`, `If-Modified-Since`, `If-Unmodified-Since`, `If-Range`) evaluated in RFC
//! 9110 §13.2.2's order ([`evaluate_preconditions`]), entity-tag comparison, and the header
//! refresh a 304 from the origin brings (RFC 9111 §3.2, §4.3.4).

use http::header::{self, HeaderMap};

use super::http_date;

/// The result of evaluating a client's preconditions against a stored response
/// (RFC 9110 §13.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Send the response (and honour `Range` if any).
    Proceed,
    /// Send the response, but ignore `Range` (`If-Range` did not match).
    IgnoreRange,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates `If-Match`, `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since` and
/// `If-Range` of a GET/HEAD request against the stored response's headers.
pub fn evaluate_preconditions(request: &HeaderMap, stored: &HeaderMap) -> Precondition {
    // Most requests carry no precondition: nothing stored needs parsing for them. One pass
    // over the request's few names (a byte comparison each for standard names) costs less
    // than a hash probe per conditional field.
    let conditional = request.keys().any(|n| {
        n == header::IF_MATCH
            || n == header::IF_NONE_MATCH
            || n == header::IF_MODIFIED_SINCE
            || n == header::IF_UNMODIFIED_SINCE
            || n == header::IF_RANGE
    });
    if !conditional {
        return Precondition::Proceed;
    }
    let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
    let last_modified = stored.get(header::LAST_MODIFIED).and_then(http_date);
    // `*` holds for any current representation (RFC 9110 §13.1.1, §13.1.2): the stored one,
    // with or without an ETag.
    if let Some(im) = joined(request, header::IF_MATCH) {
        if !(im.trim() == "*" || etag.is_some_and(|e| list_matches(&im, e, true))) {
            return Precondition::Failed;
        }
    } else if let Some(ius) = request.get(header::IF_UNMODIFIED_SINCE).and_then(http_date) {
        // Ignored when there is no Last-Modified to compare (RFC 9110 §13.1.4).
        if last_modified.is_some_and(|lm| lm > ius) {
            return Precondition::Failed;
        }
    }
    if let Some(inm) = joined(request, header::IF_NONE_MATCH) {
        if inm.trim() == "*" || etag.is_some_and(|e| list_matches(&inm, e, false)) {
            return Precondition::NotModified;
        }
    } else if let Some(ims) = request.get(header::IF_MODIFIED_SINCE).and_then(http_date) {
        // RFC 9111 §4.3.2: a cache answering for a stored response without Last-Modified
        // takes its Date as the time it was last modified (no later than that).
        let modified = last_modified.or_else(|| stored.get(header::DATE).and_then(http_date));
        if modified.is_some_and(|lm| lm <= ims) {
            return Precondition::NotModified;
        }
    }
    if request.contains_key(header::RANGE) {
        if let Some(ir) = request.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
            let ir = ir.trim();
            let ok = if ir.starts_with('"') || ir.starts_with("W/") {
                // A strong comparison: weak tags never match If-Range.
                etag.is_some_and(|e| !e.starts_with("W/") && !ir.starts_with("W/") && e == ir)
            } else {
                httpdate::parse_http_date(ir)
                    .ok()
                    .is_some_and(|d| last_modified == Some(d))
            };
            if !ok {
                return Precondition::IgnoreRange;
            }
        }
    }
    Precondition::Proceed
}

fn joined(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v.to_str().ok()?;
        match &mut out {
            Some(o) => {
                o.push(',');
                o.push_str(s);
            }
            None => out = Some(s.to_owned()),
        }
    }
    out
}

/// True when `etag` is in the entity-tag `list` (or the list is `*`). Weak comparison ignores
/// the `W/` prefix; strong comparison fails on any weak tag.
pub fn list_matches(list: &str, etag: &str, strong: bool) -> bool {
    let list = list.trim();
    if list == "*" {
        return !etag.is_empty();
    }
    if etag.is_empty() || (strong && etag.starts_with("W/")) {
        return false;
    }
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let mine = opaque(etag);
    split_etags(list).any(|t| !(strong && t.starts_with("W/")) && opaque(t) == mine)
}

/// Splits an entity-tag list, honouring commas inside quotes.
fn split_etags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let s = rest.trim_start_matches([',', ' ', '\t']);
        if s.is_empty() {
            return None;
        }
        let start_quote = s.find('"')?;
        let end = s[start_quote + 1..]
            .find('"')
            .map(|i| start_quote + 1 + i + 1)
            .unwrap_or(s.len());
        rest = &s[end..];
        Some(s[..end].trim())
    })
}

/// Header fields a 304 carries from the stored response (RFC 9110 §15.4.5).
pub const NOT_MODIFIED_FIELDS: [header::HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
];

/// Updates stored headers from a 304 (RFC 9111 §3.2, §4.3.4): every field of the 304 replaces
/// the stored one, except `Content-Length` and fields the stored body depends on.
pub fn refresh_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    let mut replaced: Vec<&header::HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if name == header::CONTENT_LENGTH
            || name == header::CONTENT_ENCODING
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_RANGE
        {
            continue;
        }
        if !replaced.contains(&name) {
            stored.remove(name);
            replaced.push(name);
        }
        stored.append(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::headers;
    use super::*;

    fn pre(req: &[(&str, &str)], stored: &[(&str, &str)]) -> Precondition {
        evaluate_preconditions(&headers(req), &headers(stored))
    }

    #[test]
    fn preconditions_rfc_9110_section_13() {
        let stored = [
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT"),
        ];
        assert_eq!(
            pre(&[("if-none-match", "\"v1\"")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "W/\"v1\"")], &stored),
            Precondition::NotModified,
            "weak comparison"
        );
        assert_eq!(
            pre(&[("if-none-match", "\"x\", \"v1\"")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "*")], &stored),
            Precondition::NotModified
        );
        assert_eq!(
            pre(&[("if-none-match", "\"x\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::NotModified
        );
        assert_eq!(
            pre(
                &[("if-modified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[
                    ("if-none-match", "\"x\""),
                    ("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")
                ],
                &stored
            ),
            Precondition::Proceed,
            "If-None-Match takes precedence"
        );
        assert_eq!(pre(&[("if-match", "\"x\"")], &stored), Precondition::Failed);
        assert_eq!(
            pre(&[("if-match", "\"v1\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(
                &[("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT")],
                &stored
            ),
            Precondition::Failed
        );
        assert_eq!(
            pre(&[("range", "bytes=0-1"), ("if-range", "\"v1\"")], &stored),
            Precondition::Proceed
        );
        assert_eq!(
            pre(&[("range", "bytes=0-1"), ("if-range", "\"v0\"")], &stored),
            Precondition::IgnoreRange
        );
        assert_eq!(
            pre(
                &[
                    ("range", "bytes=0-1"),
                    ("if-range", "Tue, 03 Nov 2026 10:00:00 GMT")
                ],
                &stored
            ),
            Precondition::Proceed
        );
        let weak = [("etag", "W/\"v1\"")];
        assert_eq!(
            pre(&[("if-match", "W/\"v1\"")], &weak),
            Precondition::Failed,
            "If-Match is strong"
        );
    }

    /// Found by the property `preconditions_follow_rfc_9110_section_13_2_2`: a stored response
    /// without Last-Modified answered If-Unmodified-Since with 412.
    #[test]
    fn if_modified_since_uses_date_without_last_modified_rfc_9111_section_4_3_2() {
        let mut stored = HeaderMap::new();
        stored.insert(
            header::DATE,
            http::HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        let ask = |since: &'static str| {
            let mut req = HeaderMap::new();
            req.insert(
                header::IF_MODIFIED_SINCE,
                http::HeaderValue::from_static(since),
            );
            evaluate_preconditions(&req, &stored)
        };
        assert_eq!(
            ask("Sun, 06 Nov 1994 08:49:37 GMT"),
            Precondition::NotModified
        );
        assert_eq!(
            ask("Mon, 07 Nov 1994 08:49:37 GMT"),
            Precondition::NotModified
        );
        assert_eq!(ask("Sat, 05 Nov 1994 08:49:37 GMT"), Precondition::Proceed);
    }

    #[test]
    fn if_unmodified_since_without_last_modified_is_ignored_rfc_9110_section_13_1_4() {
        let since = [("if-unmodified-since", "Mon, 02 Nov 2026 10:00:00 GMT")];
        assert_eq!(pre(&since, &[("etag", "\"v1\"")]), Precondition::Proceed);
        assert_eq!(pre(&since, &[]), Precondition::Proceed);
    }

    /// Found by the same property: `*` needed a stored ETag, so a GET with `If-Match: *`
    /// got 412 and one with `If-None-Match: *` got 200 from a response stored without one.
    #[test]
    fn star_matches_a_stored_response_without_an_etag_rfc_9110_section_13_1_1() {
        assert_eq!(pre(&[("if-match", "*")], &[]), Precondition::Proceed);
        assert_eq!(
            pre(&[("if-none-match", "*")], &[]),
            Precondition::NotModified
        );
        let dated = [("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")];
        assert_eq!(pre(&[("if-match", "*")], &dated), Precondition::Proceed);
        assert_eq!(pre(&[("if-match", "\"v1\"")], &dated), Precondition::Failed);
        assert_eq!(
            pre(&[("if-none-match", " * ")], &dated),
            Precondition::NotModified
        );
    }

    #[test]
    fn refresh_from_304_section_3_2() {
        let mut stored = headers(&[
            ("cache-control", "max-age=10"),
            ("content-length", "5"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        refresh_headers(
            &mut stored,
            &headers(&[
                ("cache-control", "max-age=99"),
                ("content-length", "0"),
                ("x-a", "3"),
            ]),
        );
        assert_eq!(stored["cache-control"], "max-age=99");
        assert_eq!(stored["content-length"], "5");
        assert_eq!(stored.get_all("x-a").iter().count(), 1);
    }
}

/// Properties of precondition evaluation over generated input.
#[cfg(test)]
mod props {
    use std::time::{Duration, SystemTime};

    use http::header::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    use super::*;

    /// An entity tag from a small alphabet, so that lists often hold the stored one.
    #[derive(Debug, Clone, PartialEq)]
    struct Tag {
        weak: bool,
        opaque: String,
    }

    impl Tag {
        fn text(&self) -> String {
            format!("{}\"{}\"", if self.weak { "W/" } else { "" }, self.opaque)
        }
    }

    fn tag() -> impl Strategy<Value = Tag> {
        (any::<bool>(), "[ab,]{0,2}").prop_map(|(weak, opaque)| Tag { weak, opaque })
    }

    /// `*`, or a list of tags sent on one line or one line per tag.
    #[derive(Debug, Clone)]
    enum Tags {
        Any,
        List(Vec<Tag>, bool),
    }

    fn tags() -> impl Strategy<Value = Tags> {
        prop_oneof![
            1 => Just(Tags::Any),
            4 => (proptest::collection::vec(tag(), 1..4), any::<bool>())
                .prop_map(|(t, lines)| Tags::List(t, lines)),
        ]
    }

    /// A date `n` seconds after a base, or a value that is no HTTP-date.
    fn date() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![1 => Just(None), 4 => (0u64..3).prop_map(Some)]
    }

    const BASE: u64 = 1_790_000_000;

    fn date_text(d: Option<u64>) -> String {
        match d {
            Some(n) => {
                httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(BASE + n))
            }
            None => "yesterday".to_owned(),
        }
    }

    #[derive(Debug, Clone)]
    enum IfRange {
        Tag(Tag),
        Date(Option<u64>),
    }

    /// A stored response's validators and a GET's preconditions.
    #[derive(Debug, Clone)]
    struct Case {
        etag: Option<Tag>,
        last_modified: Option<u64>,
        if_match: Option<Tags>,
        if_none_match: Option<Tags>,
        if_modified_since: Option<Option<u64>>,
        if_unmodified_since: Option<Option<u64>>,
        range: bool,
        if_range: Option<IfRange>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            proptest::option::of(tag()),
            proptest::option::of(0u64..3),
            proptest::option::of(tags()),
            proptest::option::of(tags()),
            proptest::option::of(date()),
            proptest::option::of(date()),
            any::<bool>(),
            proptest::option::of(prop_oneof![
                tag().prop_map(IfRange::Tag),
                date().prop_map(IfRange::Date),
            ]),
        )
            .prop_map(
                |(etag, last_modified, if_match, if_none_match, ims, ius, range, if_range)| Case {
                    etag,
                    last_modified,
                    if_match,
                    if_none_match,
                    if_modified_since: ims,
                    if_unmodified_since: ius,
                    range,
                    if_range,
                },
            )
    }

    impl Case {
        fn evaluate(&self) -> Precondition {
            let mut stored = HeaderMap::new();
            let value =
                |s: String| HeaderValue::from_str(&s).expect("generated values are visible ASCII");
            if let Some(e) = &self.etag {
                stored.insert(header::ETAG, value(e.text()));
            }
            if let Some(lm) = self.last_modified {
                stored.insert(header::LAST_MODIFIED, value(date_text(Some(lm))));
            }
            let mut req = HeaderMap::new();
            for (name, tags) in [
                (header::IF_MATCH, &self.if_match),
                (header::IF_NONE_MATCH, &self.if_none_match),
            ] {
                match tags {
                    None => {}
                    Some(Tags::Any) => {
                        req.append(name, HeaderValue::from_static("*"));
                    }
                    Some(Tags::List(list, false)) => {
                        let line = list.iter().map(Tag::text).collect::<Vec<_>>().join(", ");
                        req.append(name, value(line));
                    }
                    Some(Tags::List(list, true)) => {
                        for t in list {
                            req.append(name.clone(), value(t.text()));
                        }
                    }
                }
            }
            for (name, d) in [
                (header::IF_MODIFIED_SINCE, self.if_modified_since),
                (header::IF_UNMODIFIED_SINCE, self.if_unmodified_since),
            ] {
                if let Some(d) = d {
                    req.insert(name, value(date_text(d)));
                }
            }
            if self.range {
                req.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
            }
            match &self.if_range {
                Some(IfRange::Tag(t)) => {
                    req.insert(header::IF_RANGE, value(t.text()));
                }
                Some(IfRange::Date(d)) => {
                    req.insert(header::IF_RANGE, value(date_text(*d)));
                }
                None => {}
            }
            evaluate_preconditions(&req, &stored)
        }

        /// RFC 9110 §13.2.2's order, read off the RFC, for a GET that found this stored
        /// response (a current representation, so `*` matches it, §13.1.1, §13.1.2).
        fn expected(&self) -> Precondition {
            let strong_match = |t: &Tag| {
                self.etag
                    .as_ref()
                    .is_some_and(|e| !e.weak && !t.weak && e.opaque == t.opaque)
            };
            let weak_match = |t: &Tag| self.etag.as_ref().is_some_and(|e| e.opaque == t.opaque);
            // 1. If-Match; 2. without it, If-Unmodified-Since, ignored when it is no date or
            // there is no Last-Modified to compare (§13.1.4).
            match (&self.if_match, self.if_unmodified_since) {
                (Some(Tags::Any), _) => {}
                (Some(Tags::List(list, _)), _) => {
                    if !list.iter().any(strong_match) {
                        return Precondition::Failed;
                    }
                }
                (None, Some(Some(since))) => {
                    if self.last_modified.is_some_and(|lm| lm > since) {
                        return Precondition::Failed;
                    }
                }
                (None, _) => {}
            }
            // 3. If-None-Match; 4. without it, If-Modified-Since (§13.1.3: ignored when no date).
            match (&self.if_none_match, self.if_modified_since) {
                (Some(Tags::Any), _) => return Precondition::NotModified,
                (Some(Tags::List(list, _)), _) => {
                    if list.iter().any(weak_match) {
                        return Precondition::NotModified;
                    }
                }
                (None, Some(Some(since))) => {
                    if self.last_modified.is_some_and(|lm| lm <= since) {
                        return Precondition::NotModified;
                    }
                }
                (None, _) => {}
            }
            // 5. If-Range, only with Range (§13.1.5): a strong match of the tag, or the date
            // exactly the stored Last-Modified.
            let range_holds = match &self.if_range {
                _ if !self.range => true,
                None => true,
                Some(IfRange::Tag(t)) => strong_match(t),
                Some(IfRange::Date(d)) => d.is_some() && *d == self.last_modified,
            };
            if range_holds {
                Precondition::Proceed
            } else {
                Precondition::IgnoreRange
            }
        }
    }

    /// Field values of any bytes a field may hold, under the names that matter here.
    fn fields(names: &'static [&'static str]) -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec(
            (
                proptest::sample::select(names),
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            0..8,
        )
        .prop_map(|list| {
            let mut h = HeaderMap::new();
            for (name, bytes) in list {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    h.append(HeaderName::from_static(name), v);
                }
            }
            h
        })
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn preconditions_never_panic_on_any_bytes(
            request in fields(&[
                "if-match",
                "if-none-match",
                "if-modified-since",
                "if-unmodified-since",
                "if-range",
                "range",
            ]),
            stored in fields(&["etag", "last-modified"]),
        ) {
            let _ = evaluate_preconditions(&request, &stored);
        }

        #[test]
        fn preconditions_follow_rfc_9110_section_13_2_2(c in case()) {
            prop_assert_eq!(c.evaluate(), c.expected(), "{:?}", c);
        }

        /// §13.1.2: `If-None-Match: *` is false when there is a current representation,
        /// and a GET then gets 304, whatever If-Modified-Since or If-Range say.
        #[test]
        fn if_none_match_star_with_a_stored_etag_is_not_modified(
            mut c in case(),
            etag in tag(),
        ) {
            c.etag = Some(etag);
            c.if_none_match = Some(Tags::Any);
            c.if_match = None;
            c.if_unmodified_since = None;
            prop_assert_eq!(c.evaluate(), Precondition::NotModified);
        }

        /// §13.2.2: If-Match is evaluated first; when it fails, the answer is 412 whatever
        /// If-None-Match (which would say 304) and the date fields say.
        #[test]
        fn a_failing_if_match_wins_over_if_none_match(
            mut c in case(),
            list in proptest::collection::vec(tag(), 1..4),
        ) {
            let stored = c.etag.clone();
            let list: Vec<Tag> = list
                .into_iter()
                .filter(|t| {
                    !stored.as_ref().is_some_and(|e| !e.weak && !t.weak && e.opaque == t.opaque)
                })
                .collect();
            prop_assume!(!list.is_empty());
            c.if_match = Some(Tags::List(list, false));
            c.if_none_match = Some(c.if_none_match.clone().unwrap_or(Tags::Any));
            prop_assert_eq!(c.evaluate(), Precondition::Failed);
        }
    }
}

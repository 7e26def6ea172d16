//! Byte ranges (RFC 9110 §14): parsing `Range` against a known length, and building single and
//! multipart 206 bodies from a stored object.

use bytes::{Bytes, BytesMut};

/// Most ranges honoured in one request; more are ignored (the whole object is sent), which
/// keeps a many-small-ranges request from costing more than the object itself.
const MAX_RANGES: usize = 64;

/// What a `Range` header asks of an object of a given length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ranges {
    /// Not a byte-range request we honour: send the whole object.
    Ignore,
    /// No requested range overlaps the object: 416.
    Unsatisfiable,
    /// Inclusive `(first, last)` byte positions, in request order.
    Satisfiable(Vec<(u64, u64)>),
}

/// Parses a `Range` value for an object of `len` bytes.
pub fn parse(value: &str, len: u64) -> Ranges {
    let Some((unit, set)) = value.split_once('=') else {
        return Ranges::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ranges::Ignore;
    }
    let mut out = Vec::new();
    let mut any = false;
    for spec in set.split(',') {
        let spec = spec.trim();
        if spec.is_empty() {
            continue;
        }
        any = true;
        let Some((a, b)) = spec.split_once('-') else {
            return Ranges::Ignore;
        };
        let (a, b) = (a.trim(), b.trim());
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if a.is_empty() {
            // Suffix: the last N bytes.
            if !digits(b) {
                return Ranges::Ignore;
            }
            let n: u64 = b.parse().unwrap_or(u64::MAX);
            if n > 0 && len > 0 {
                out.push((len.saturating_sub(n), len - 1));
            }
            continue;
        }
        if !digits(a) || !(b.is_empty() || digits(b)) {
            return Ranges::Ignore;
        }
        let first: u64 = a.parse().unwrap_or(u64::MAX);
        let last: u64 = if b.is_empty() {
            u64::MAX
        } else {
            b.parse().unwrap_or(u64::MAX)
        };
        if last < first {
            return Ranges::Ignore;
        }
        if first < len {
            out.push((first, last.min(len - 1)));
        }
    }
    if !any || out.len() > MAX_RANGES {
        return Ranges::Ignore;
    }
    if out.is_empty() {
        Ranges::Unsatisfiable
    } else {
        Ranges::Satisfiable(coalesce(out))
    }
}

/// Merges ranges that overlap or touch (RFC 9110 §14.2 lets a server coalesce them), so the
/// parts sent never add up to more than the object: `bytes=0-,0-,0-,…` is one range, not
/// the object many times over. Ranges that neither overlap nor touch keep the order asked.
fn coalesce(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    if ranges.len() < 2 {
        return ranges;
    }
    let mut sorted = ranges.clone();
    sorted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (first, last) in sorted {
        match merged.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    if merged.len() == ranges.len() {
        ranges
    } else {
        merged
    }
}

/// The `Content-Range` value for one range.
pub fn content_range(first: u64, last: u64, len: u64) -> String {
    format!("bytes {first}-{last}/{len}")
}

/// The length of the body [`multipart`] makes, computed without making it (for HEAD).
pub fn multipart_len(
    len: u64,
    ranges: &[(u64, u64)],
    content_type: Option<&str>,
    boundary: &str,
) -> u64 {
    let boundary = boundary.len() as u64;
    let ct = content_type.map_or(0, |c| "Content-Type: ".len() as u64 + c.len() as u64 + 2);
    let parts: u64 = ranges
        .iter()
        .map(|&(first, last)| {
            let cr = content_range(first, last, len).len() as u64;
            // CRLF "--" boundary CRLF, Content-Type line, "Content-Range: " value CRLF CRLF, bytes
            2 + 2 + boundary + 2 + ct + "Content-Range: ".len() as u64 + cr + 4 + (last - first + 1)
        })
        .sum();
    // CRLF "--" boundary "--" CRLF
    parts + 2 + 2 + boundary + 2 + 2
}

/// A `multipart/byteranges` body for several ranges of `body`.
pub fn multipart(
    body: &Bytes,
    ranges: &[(u64, u64)],
    content_type: Option<&str>,
    boundary: &str,
) -> Bytes {
    let len = body.len() as u64;
    let mut out = BytesMut::new();
    for &(first, last) in ranges {
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = content_type {
            out.extend_from_slice(b"Content-Type: ");
            out.extend_from_slice(ct.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Content-Range: ");
        out.extend_from_slice(content_range(first, last, len).as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&body[first as usize..=last as usize]);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(v: &str, len: u64, expected: Ranges) {
        assert_eq!(parse(v, len), expected, "{v}");
    }

    #[test]
    fn range_forms_rfc_9110_section_14() {
        use Ranges::*;
        check("bytes=0-9", 100, Satisfiable(vec![(0, 9)]));
        check("bytes=90-", 100, Satisfiable(vec![(90, 99)]));
        check("bytes=-10", 100, Satisfiable(vec![(90, 99)]));
        check("bytes=-1000", 100, Satisfiable(vec![(0, 99)]));
        check("bytes=95-200", 100, Satisfiable(vec![(95, 99)]));
        check("bytes=0-0, 5-9", 100, Satisfiable(vec![(0, 0), (5, 9)]));
        check("bytes=100-", 100, Unsatisfiable);
        check("bytes=-0", 100, Unsatisfiable);
        check("bytes=200-300, 100-", 100, Unsatisfiable);
        check("bytes=100-, 0-1", 100, Satisfiable(vec![(0, 1)]));
        check("bytes=9-1", 100, Ignore);
        check("items=0-1", 100, Ignore);
        check("bytes=a-b", 100, Ignore);
        check("bytes=", 100, Ignore);
        check("BYTES=0-1", 100, Satisfiable(vec![(0, 1)]));
    }

    #[test]
    fn overlapping_and_touching_ranges_are_coalesced_rfc_9110_section_14_2() {
        use Ranges::*;
        check("bytes=0-,0-,0-,0-", 100, Satisfiable(vec![(0, 99)]));
        check("bytes=0-9,10-19", 100, Satisfiable(vec![(0, 19)]));
        check(
            "bytes=50-59,0-9,5-20",
            100,
            Satisfiable(vec![(0, 20), (50, 59)]),
        );
        check("bytes=-10,0-", 100, Satisfiable(vec![(0, 99)]));
        // Apart: kept in the order asked.
        check("bytes=50-59,0-9", 100, Satisfiable(vec![(50, 59), (0, 9)]));
        let many = format!("bytes={}", vec!["0-"; 64].join(","));
        check(&many, 1024, Satisfiable(vec![(0, 1023)]));
    }

    #[test]
    fn multipart_len_is_the_length_of_the_body() {
        let body = Bytes::from_static(b"0123456789abcdef");
        for (ranges, ct) in [
            (vec![(0, 1), (8, 9)], Some("text/plain")),
            (vec![(3, 3), (5, 15), (0, 0)], None),
        ] {
            let m = multipart(&body, &ranges, ct, "edgecache-00ff");
            assert_eq!(
                multipart_len(16, &ranges, ct, "edgecache-00ff"),
                m.len() as u64
            );
        }
    }

    #[test]
    fn multipart_body() {
        let body = Bytes::from_static(b"0123456789");
        let m = multipart(&body, &[(0, 1), (8, 9)], Some("text/plain"), "B");
        let text = String::from_utf8(m.to_vec()).expect("utf8");
        assert!(text.contains("Content-Range: bytes 0-1/10\r\n\r\n01\r\n--B"));
        assert!(text.contains("Content-Range: bytes 8-9/10\r\n\r\n89\r\n--B--\r\n"));
    }
}

/// Properties of `Range` parsing and multipart bodies over generated input.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// One range-spec as a client may write it, the numbers near the object's length or huge.
    fn spec(len: u64) -> impl Strategy<Value = String> {
        let near = prop_oneof![
            4 => 0..len.saturating_add(4),
            1 => Just(u64::MAX),
            1 => any::<u64>(),
        ];
        let n = || near.clone().prop_map(|n| n.to_string());
        prop_oneof![
            // Narrow ranges, so that several stay apart after coalescing.
            8 => (0..len.saturating_add(4), 0u64..3)
                .prop_map(|(a, k)| format!("{a}-{}", a.saturating_add(k))),
            1 => (n(), n()).prop_map(|(a, b)| format!("{a}-{b}")),
            1 => n().prop_map(|a| format!("{a}-")),
            1 => n().prop_map(|b| format!("-{b}")),
            1 => Just("99999999999999999999999-".to_owned()),
            1 => Just("-99999999999999999999999".to_owned()),
        ]
    }

    /// A `Range` value: mostly well formed for an object of `len`, sometimes not at all.
    fn value(len: u64) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (
                "(bytes|BYTES|Bytes) ?= ?",
                proptest::collection::vec((spec(len), "[ \t]{0,2}", "(,[ \t]?){1,2}"), 1..8),
            )
                .prop_map(|(unit, specs)| {
                    let mut v = unit;
                    for (s, ws, comma) in specs {
                        v.push_str(&ws);
                        v.push_str(&s);
                        v.push_str(&comma);
                    }
                    v
                }),
            1 => "[bytes=0-9, \t-]{0,30}",
            1 => any::<String>(),
        ]
    }

    /// The byte positions `value` asks for that exist in an object of `len`, read off the
    /// RFC 9110 §14.1.2 grammar by hand (only for values made by `value` that parse).
    fn requested(value: &str, len: u64) -> Vec<bool> {
        let mut covered = vec![false; len as usize];
        let set = value.split_once('=').map_or("", |(_, s)| s);
        for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((a, b)) = spec.split_once('-') else {
                continue;
            };
            let num = |s: &str| s.trim().parse::<u64>().unwrap_or(u64::MAX);
            let (first, last) = match (a.trim().is_empty(), b.trim().is_empty()) {
                (true, _) => (len.saturating_sub(num(b)), len.saturating_sub(1)),
                (false, true) => (num(a), u64::MAX),
                (false, false) => (num(a), num(b)),
            };
            if a.trim().is_empty() && num(b) == 0 {
                continue;
            }
            for i in first..=last.min(len.saturating_sub(1)) {
                if i < len {
                    covered[i as usize] = true;
                }
            }
        }
        covered
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn range_never_panics(text in any::<String>(), len in any::<u64>()) {
            let _ = parse(&text, len);
        }

        /// Every range lies inside the object; no two overlap or touch (they were
        /// coalesced, RFC 9110 §14.2), so they add up to at most the object; at most 64.
        #[test]
        fn satisfiable_ranges_are_inside_the_object_apart_and_no_larger_than_it(
            (len, v) in prop_oneof![0u64..64, any::<u64>()]
                .prop_flat_map(|len| (Just(len), value(len))),
        ) {
            let Ranges::Satisfiable(ranges) = parse(&v, len) else { return Ok(()) };
            prop_assert!(!ranges.is_empty() && ranges.len() <= MAX_RANGES);
            for &(first, last) in &ranges {
                prop_assert!(
                    first <= last && last < len,
                    "{:?} of {} in {:?}", (first, last), len, v
                );
            }
            let mut sorted = ranges.clone();
            sorted.sort_unstable();
            for w in sorted.windows(2) {
                prop_assert!(
                    w[0].1.saturating_add(1) < w[1].0,
                    "{:?} overlap or touch in {:?}", w, v
                );
            }
            let total = ranges.iter().map(|&(f, l)| u128::from(l - f) + 1).sum::<u128>();
            prop_assert!(total <= u128::from(len));
        }

        /// Coalescing loses and adds nothing: the parts cover exactly the bytes asked for.
        #[test]
        fn satisfiable_ranges_cover_exactly_what_was_asked(
            (len, v) in (1u64..48).prop_flat_map(|len| (Just(len), value(len))),
        ) {
            if let Ranges::Satisfiable(ranges) = parse(&v, len) {
                let mut covered = vec![false; len as usize];
                for (first, last) in ranges {
                    for i in first..=last {
                        covered[i as usize] = true;
                    }
                }
                prop_assert_eq!(covered, requested(&v, len), "{:?}", v);
            }
        }

        /// The multipart body is as long as `multipart_len` says (HEAD and Content-Length
        /// rely on it), and each part holds the object's bytes at its range.
        #[test]
        fn multipart_parts_are_the_objects_bytes_and_multipart_len_is_exact(
            (body, v) in proptest::collection::vec(any::<u8>(), 1..200)
                .prop_flat_map(|b| { let len = b.len() as u64; (Just(b), value(len)) }),
            content_type in proptest::option::of("[ -~]{0,20}"),
            boundary in "[0-9a-zA-Z'()+_,./:=?-]{1,40}",
        ) {
            let len = body.len() as u64;
            let Ranges::Satisfiable(ranges) = parse(&v, len) else { return Ok(()) };
            let body = Bytes::from(body);
            let ct = content_type.as_deref();
            let m = multipart(&body, &ranges, ct, &boundary);
            prop_assert_eq!(multipart_len(len, &ranges, ct, &boundary), m.len() as u64);
            // Walk the body: each part's head as RFC 9110 §14.6 lays it out, then its bytes.
            let mut rest = &m[..];
            for &(first, last) in &ranges {
                let mut head = format!("\r\n--{boundary}\r\n");
                if let Some(ct) = ct {
                    head.push_str(&format!("Content-Type: {ct}\r\n"));
                }
                head.push_str(&format!("Content-Range: bytes {first}-{last}/{len}\r\n\r\n"));
                prop_assert!(
                    rest.starts_with(head.as_bytes()),
                    "{:?}", String::from_utf8_lossy(rest)
                );
                rest = &rest[head.len()..];
                let part = (last - first + 1) as usize;
                prop_assert_eq!(&rest[..part], &body[first as usize..=last as usize]);
                rest = &rest[part..];
            }
            let end = format!("\r\n--{boundary}--\r\n");
            prop_assert_eq!(rest, end.as_bytes());
        }
    }
}

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

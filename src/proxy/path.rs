//! The request path, normalised once before routing, keying, rules and forwarding, so the
//! cache key, the rules and the origin all see the one path (RFC 3986 §6.2.2).
//!
//! Percent-encoded unreserved characters are decoded (§6.2.2.2: `%7E` is `~`, `%2e` is `.`),
//! the hex digits of the encodings that stay are uppercased (§6.2.2.1), and dot segments are
//! removed as §5.2.4 does, except that a path climbing above the root is refused rather than
//! clamped: `/a/../../etc/passwd` walks out of an origin that maps paths onto files, and no
//! honest client sends it. Encoded slashes (`%2F`) and backslashes (`\`, `%5C`) are kept as
//! they are (an origin may give them meaning) unless the site refuses them.
//!
//! Written here rather than taken from a URL crate: `url` resolves dot segments but clamps at
//! the root and decodes nothing, and `http::Uri` does neither; what is wanted is the refusal
//! and one pass that borrows when nothing changes (the path of nearly every request).

use std::borrow::Cow;

/// Why a path cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path has an encoded slash or a backslash")]
    EscapedSlash,
    #[error("the path has an invalid percent-encoding")]
    BadEncoding,
}

/// Normalises `path` (no query). Borrows when it is already normal.
pub fn normalise(path: &str, refuse_escaped_slashes: bool) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    // The common case in one scan: no percent sign, no backslash, no dot segment.
    let suspicious = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || b == b'\\' || (b == b'.' && i > 0 && bytes[i - 1] == b'/'));
    if !suspicious {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path, refuse_escaped_slashes)?;
    let resolved = remove_dot_segments(&decoded)?;
    if resolved == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(resolved))
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes percent-encoded unreserved characters and uppercases the hex of the others.
fn decode_unreserved(path: &str, refuse_escaped_slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    // Bytes, not chars: only ASCII sequences change, so whatever UTF-8 the path holds stays
    // whole.
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' && refuse_escaped_slashes {
            return Err(PathError::EscapedSlash);
        }
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let c = hi << 4 | lo;
        if is_unreserved(c) {
            out.push(c);
        } else {
            if refuse_escaped_slashes && (c == b'/' || c == b'\\') {
                return Err(PathError::EscapedSlash);
            }
            out.extend_from_slice(&[
                b'%',
                b"0123456789ABCDEF"[usize::from(hi)],
                b"0123456789ABCDEF"[usize::from(lo)],
            ]);
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| PathError::BadEncoding)
}

/// RFC 3986 §5.2.4 on an absolute path, refusing a `..` that would leave the root.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut rest = path.strip_prefix('/').unwrap_or(path);
    // The last segment decides whether the result ends with a slash: `/a/b/..` is `/a/`.
    let mut trailing_slash;
    loop {
        let (segment, more) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        match segment {
            "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
        match more {
            Some(m) => rest = m,
            None => break,
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        assert_eq!(
            normalise(input, false).as_deref().map_err(|e| *e),
            expected,
            "{input}"
        );
    }

    #[test]
    fn dot_segments_rfc_3986_section_5_2_4() {
        check("/a/b/c/./../../g", Ok("/a/g"));
        check("/mid/content=5/../6", Ok("/mid/6"));
        check("/a/b/..", Ok("/a/"));
        check("/a/b/.", Ok("/a/b/"));
        check("/a/./b", Ok("/a/b"));
        check("/.", Ok("/"));
        check("/a/..", Ok("/"));
        check("/a/.b/..c/", Ok("/a/.b/..c/"));
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        check("/static/../../../etc/passwd", Err(PathError::AboveRoot));
        check("/a/%2e%2e/%2e%2e/etc/passwd", Err(PathError::AboveRoot));
        check("/a/.%2e/.%2e/etc/passwd", Err(PathError::AboveRoot));
        check("/..", Err(PathError::AboveRoot));
        check("/%2E%2E/x", Err(PathError::AboveRoot));
    }

    #[test]
    fn unreserved_encodings_decode_rfc_3986_section_6_2_2_2() {
        check("/%7Euser/%41bc", Ok("/~user/Abc"));
        check("/a%2fb", Ok("/a%2Fb"));
        check("/a%20b", Ok("/a%20b"));
        check("/caf%c3%a9", Ok("/caf%C3%A9"));
        check("/a/%2e/b", Ok("/a/b"));
        check("/50%", Err(PathError::BadEncoding));
        check("/%zz", Err(PathError::BadEncoding));
    }

    #[test]
    fn a_normal_path_is_borrowed() {
        for p in ["/", "/a/b.css", "/a.b/c?", "/index.html"] {
            assert!(matches!(normalise(p, true), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn escaped_slashes_are_kept_or_refused() {
        assert_eq!(normalise("/a%2Fb", false).as_deref(), Ok("/a%2Fb"));
        assert_eq!(normalise("/a\\b", false).as_deref(), Ok("/a\\b"));
        for p in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b"] {
            assert_eq!(normalise(p, true), Err(PathError::EscapedSlash), "{p}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in [
            "/a/b/../c/%7e/./d%2f",
            "/x/%2E/y/..",
            "/%41%42/./",
            "/a//b/../c",
        ] {
            let once = normalise(p, false).expect("normal").into_owned();
            assert_eq!(normalise(&once, false).as_deref(), Ok(once.as_str()), "{p}");
        }
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    /// A path segment as clients spell them: names, dots, encoded dots and other unreserved
    /// characters, reserved encodings, empty segments.
    fn segment() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("a"),
            Just("b.c"),
            Just(""),
            Just("."),
            Just(".."),
            Just("%2e"),
            Just("%2E%2e"),
            Just(".%2e"),
            Just("%41"),
            Just("%7e"),
            Just("%2F"),
            Just("%20"),
            Just("..."),
            Just(".a"),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    /// The same path with its unreserved encodings spelled out (`%2e` is `.`): RFC 3986
    /// §6.2.2.2 makes them equivalent.
    fn decoded(p: &str) -> String {
        p.replace("%2e", ".")
            .replace("%2E", ".")
            .replace("%41", "A")
            .replace("%7e", "~")
    }

    proptest! {
        #![proptest_config(crate::testing::props())]

        #[test]
        fn normalising_is_idempotent(p in path()) {
            if let Ok(once) = normalise(&p, false) {
                let twice = normalise(&once, false);
                prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()));
            }
        }

        #[test]
        fn a_normal_path_never_climbs_or_keeps_a_dot_segment(p in path()) {
            if let Ok(n) = normalise(&p, false) {
                prop_assert!(n.starts_with('/'));
                for seg in n.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{} -> {}", p, n);
                }
            }
        }

        #[test]
        fn a_path_is_refused_exactly_when_it_climbs_above_the_root(p in path()) {
            // Walk the decoded segments as a stack: popping an empty stack climbs.
            let mut depth = 0i32;
            let mut climbs = false;
            for seg in decoded(&p).split('/').skip(1) {
                match seg {
                    "." => {}
                    ".." => {
                        depth -= 1;
                        climbs |= depth < 0;
                    }
                    _ => depth += 1,
                }
            }
            prop_assert_eq!(normalise(&p, false).is_err(), climbs, "{}", p);
        }

        #[test]
        fn equivalent_encodings_normalise_alike(p in path()) {
            let a = normalise(&p, false).map(|c| c.into_owned());
            let b = normalise(&decoded(&p), false).map(|c| c.into_owned());
            prop_assert_eq!(a, b);
        }

        #[test]
        fn arbitrary_bytes_never_panic(p in "/[ -~]{0,40}") {
            let _ = normalise(&p, true);
            let _ = normalise(&p, false);
        }
    }
}

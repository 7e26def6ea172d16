//! Request ids: the `request_id` of the access log, sent to origins as `X-Request-Id`.
//!
//! An id made here is 32 lowercase hex digits, like nginx's `$request_id`: a prefix drawn at
//! random once per process, then a sequence number. Making one is an atomic increment; it is
//! written from a fixed array, with no allocation. No crate (`uuid`, `ulid`) is needed for
//! that, and ids from different nodes and restarts differ by their prefix.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The most bytes of a trusted `X-Request-Id` kept; a longer one is replaced.
pub const MAX_GIVEN_LEN: usize = 128;

/// An id made by this process (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(u64);

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The process's random prefix, drawn on first use.
fn prefix() -> u64 {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    *PREFIX.get_or_init(|| {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 8];
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            // No system randomness: the clock and the process id still tell nodes apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            return nanos ^ (u64::from(std::process::id()) << 32);
        }
        u64::from_be_bytes(bytes)
    })
}

impl RequestId {
    /// The next id of this process.
    pub fn next() -> RequestId {
        RequestId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id's 32 hex digits.
    pub fn to_bytes(self) -> [u8; 32] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, word) in [prefix(), self.0].into_iter().enumerate() {
            for (j, b) in word.to_be_bytes().into_iter().enumerate() {
                out[i * 16 + j * 2] = HEX[usize::from(b >> 4)];
                out[i * 16 + j * 2 + 1] = HEX[usize::from(b & 0xf)];
            }
        }
        out
    }

    /// The id as a header value (for the request to the origin).
    pub fn header_value(self) -> http::HeaderValue {
        // 32 hex digits are always a valid header value.
        http::HeaderValue::from_bytes(&self.to_bytes())
            .unwrap_or(http::HeaderValue::from_static("-"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&bytes).unwrap_or("-"))
    }
}

/// Whether a trusted proxy's `X-Request-Id` may be kept as the request's id: 1 to
/// [`MAX_GIVEN_LEN`] visible ASCII characters (no space, quote-safe in both log formats
/// since values are escaped, and no control character that could start a line).
pub fn acceptable(given: &[u8]) -> bool {
    !given.is_empty() && given.len() <= MAX_GIVEN_LEN && given.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_sharing_the_prefix_and_distinct() {
        let (a, b) = (RequestId::next(), RequestId::next());
        let (ta, tb) = (a.to_string(), b.to_string());
        assert_eq!(ta.len(), 32);
        assert!(ta
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(ta, tb);
        assert_eq!(ta[..16], tb[..16], "one prefix per process");
        assert_eq!(a.header_value().as_bytes(), ta.as_bytes());
    }

    #[test]
    fn given_ids_are_visible_ascii_of_bounded_length() {
        assert!(acceptable(b"abc-123_X.y:z"));
        assert!(acceptable(&[b'a'; MAX_GIVEN_LEN]));
        for bad in [
            &b""[..],
            b"a b",
            b"a\nb",
            b"a\x1b[2K",
            b"caf\xc3\xa9",
            &[b'a'; MAX_GIVEN_LEN + 1],
        ] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }
}

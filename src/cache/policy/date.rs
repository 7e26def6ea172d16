//! HTTP-dates (RFC 9110 §5.6.7): IMF-fixdate, RFC 850 and asctime, with the last IMF-fixdate
//! remembered per thread.

use std::time::SystemTime;

use http::header::HeaderValue;

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
const IMF_FIXDATE_LEN: usize = 29;

thread_local! {
    /// The last IMF-fixdate parsed on this thread and its time. An origin's `Date` is the same
    /// text for every response within a second, and each miss reads it twice (freshness and
    /// age); comparing 29 bytes is a tenth of parsing them. Same text, same time: the memo
    /// cannot change an answer.
    static LAST_FIXDATE: std::cell::Cell<Option<([u8; IMF_FIXDATE_LEN], SystemTime)>> =
        const { std::cell::Cell::new(None) };
}

/// Parses an HTTP-date (IMF-fixdate, RFC 850 or asctime).
pub fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    let bytes = value.as_bytes();
    let fixed = <[u8; IMF_FIXDATE_LEN]>::try_from(bytes).ok();
    if let (Some(text), Some((last, time))) = (fixed, LAST_FIXDATE.get()) {
        if text == last {
            return Some(time);
        }
    }
    let text = value.to_str().ok()?.trim();
    let time = match httpdate::parse_http_date(text) {
        Ok(t) => t,
        Err(_) => httpdate::parse_http_date(&recased(text)?).ok()?,
    };
    if let Some(text) = fixed {
        LAST_FIXDATE.set(Some((text, time)));
    }
    Some(time)
}

/// `text` with its day and month names in the case the grammar writes them (`Sun`, `Nov`,
/// `Sunday`) and `GMT` in capitals, or `None` when that changes nothing. Senders that write
/// `SUN, 06 NOV 1994` or `sun, 06 nov 1994` mean the same date; RFC 9110 §5.6.7 asks
/// recipients to be lenient with dates, and dropping such a response's `Expires` or `Date`
/// would change its freshness.
fn recased(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            out.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            out.push(c);
            word_start = true;
        }
    }
    let out = out.replace("Gmt", "GMT");
    (out != text).then_some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn http_dates_parse_the_same_when_the_last_one_is_remembered() {
        let a = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
        let b = HeaderValue::from_static("Mon, 07 Nov 1994 08:49:37 GMT");
        let rfc850 = HeaderValue::from_static("Sunday, 06-Nov-94 08:49:37 GMT");
        let bad = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 XYZ");
        let ta = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let tb = ta + Duration::from_secs(86_400);
        for _ in 0..2 {
            assert_eq!(http_date(&a), Some(ta));
            assert_eq!(http_date(&a), Some(ta));
            assert_eq!(http_date(&b), Some(tb));
            assert_eq!(http_date(&rfc850), Some(ta));
            assert_eq!(http_date(&bad), None);
            assert_eq!(http_date(&b), Some(tb));
        }
    }

    /// RFC 9110 §5.6.7: all three formats, and day and month names in any letter case.
    #[test]
    fn every_format_and_any_letter_case() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        for text in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "sun, 06 nov 1994 08:49:37 gmt",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "SUNDAY, 06-NOV-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                http_date(&HeaderValue::from_static(text)),
                Some(t),
                "{text}"
            );
        }
        assert_eq!(
            http_date(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 EST")),
            None
        );
    }
}

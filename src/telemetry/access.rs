//! The access log: one INFO event per request on [`ACCESS_TARGET`], written when the response
//! body ends, so it has the bytes sent and whether the body was sent whole.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Version};

use super::{CacheResult, RequestId, ACCESS_TARGET};

/// True when access-log events would be recorded; checked once per request so that no log
/// record is built when the access log is off.
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// A request's id as the access log writes it: a trusted proxy's `X-Request-Id` (checked
/// by `request_id::acceptable`), or one made here.
#[derive(Debug, Clone)]
pub enum LoggedId {
    Given(HeaderValue),
    Made(RequestId),
}

/// One request's access-log record, completed when the response body ends.
#[derive(Debug)]
pub struct AccessLog {
    pub start: tokio::time::Instant,
    /// The socket's peer (nginx's `$realip_remote_addr`).
    pub client: IpAddr,
    /// The client a trusted proxy names (`geo::Locator::client`), else the peer again
    /// (nginx's `$remote_addr` under `real_ip_header`).
    pub forwarded_client: IpAddr,
    pub method: Method,
    pub version: Version,
    pub host: String,
    pub path: String,
    pub status: u16,
    /// What happened to the request; `None` (written `-`) until it is answered.
    pub cache: Option<CacheResult>,
    pub origin: Option<Arc<str>>,
    pub origin_ms: Option<f64>,
    /// The geo route (`[[sites.routes]]` name) that chose the origin.
    pub route: Option<Arc<str>>,
    /// The fleet member that answered a miss instead of an origin (peer fill); the field is
    /// left out of the line when none did.
    pub peer: Option<Arc<str>>,
    pub aborted: bool,
    /// The client's `User-Agent` and `Referer`, shared with the request (no copy).
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    pub request_id: LoggedId,
    /// `TLSv1.3`, `TLSv1.2`; `None` (written `-`) for plain HTTP.
    pub tls_version: Option<&'static str>,
}

/// A header's value as text for the log: `-` when absent; bytes that are not UTF-8 replaced
/// (borrowed, not copied, when they are).
fn header_text(v: &Option<HeaderValue>) -> std::borrow::Cow<'_, str> {
    match v {
        Some(v) => String::from_utf8_lossy(v.as_bytes()),
        None => std::borrow::Cow::Borrowed("-"),
    }
}

impl AccessLog {
    /// Writes the access-log line: `bytes` sent, and whether the body was sent completely.
    ///
    /// What the client sent (host, method, path) is recorded as string values, never through
    /// `Display`: the text format then writes them quoted, with `"`, `\` and control
    /// characters escaped (`\n`, `\u{1b}`), so a value cannot end its field, add one
    /// (`host=evil.test status=200`) or start a line; the JSON format writes them as JSON
    /// strings. `Display` values are written bare in the text format.
    pub fn emit(&self, bytes: u64, complete: bool) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let made;
        let request_id = match &self.request_id {
            // Acceptable ids are visible ASCII.
            LoggedId::Given(v) => v.to_str().unwrap_or("-"),
            LoggedId::Made(id) => {
                made = id.to_bytes();
                std::str::from_utf8(&made).unwrap_or("-")
            }
        };
        tracing::info!(
            target: ACCESS_TARGET,
            client = %self.client,
            forwarded_client = %self.forwarded_client,
            host = self.host.as_str(),
            method = self.method.as_str(),
            path = self.path.as_str(),
            version = ?self.version,
            status = self.status,
            bytes,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            cache = self.cache.map_or("-", CacheResult::as_str),
            origin = self.origin.as_deref().unwrap_or("-"),
            origin_ms = self.origin_ms.map(|m| (m * 1000.0).round() / 1000.0),
            route = self.route.as_deref().unwrap_or("-"),
            peer = self.peer.as_deref(),
            complete = complete && !self.aborted,
            request_id,
            tls_version = self.tls_version.unwrap_or("-"),
            user_agent = &*header_text(&self.user_agent),
            referer = &*header_text(&self.referer),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    /// A writer into a shared buffer, for a subscriber whose output a test reads.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
        }
    }

    /// A refused request whose host and path try to add fields and a line of their own.
    fn forged() -> AccessLog {
        AccessLog {
            start: tokio::time::Instant::now(),
            client: IpAddr::from([127, 0, 0, 1]),
            forwarded_client: IpAddr::from([127, 0, 0, 1]),
            method: Method::GET,
            version: Version::HTTP_11,
            host: "evil.test status=200 cache=\"hit\" x=\\".to_owned(),
            path: "/a\" status=200\n2025-01-01T00:00:00Z  INFO edgecache::access: request \
                   status=200\r\u{1b}[2K\t\u{7f}"
                .to_owned(),
            status: 421,
            cache: Some(CacheResult::Refused),
            origin: None,
            origin_ms: None,
            route: None,
            peer: None,
            aborted: false,
            user_agent: Some(HeaderValue::from_static("curl/8 status=200 \"x")),
            referer: HeaderValue::from_bytes(b"https://a.test/\xff\" cache=hit").ok(),
            request_id: LoggedId::Given(HeaderValue::from_static("abc\"=1")),
            tls_version: None,
        }
    }

    /// The fields of a text-format line after its message, as `(key, raw value)`: a quoted
    /// value runs to the first `"` not escaped by `\`.
    fn text_fields(line: &str) -> Vec<(String, String)> {
        let rest = line.split_once(" request ").map_or("", |(_, r)| r);
        let mut fields = Vec::new();
        let mut chars = rest.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                value.push(chars.next().unwrap_or('"'));
                while let Some(c) = chars.next() {
                    value.push(c);
                    if c == '\\' {
                        value.extend(chars.next());
                    } else if c == '"' {
                        break;
                    }
                }
                chars.next(); // the space after the value
            } else {
                value = chars.by_ref().take_while(|&c| c != ' ').collect();
            }
            fields.push((key.trim().to_owned(), value));
        }
        fields
    }

    #[test]
    fn client_values_cannot_forge_text_log_fields_or_lines() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let log = forged();
        tracing::subscriber::with_default(subscriber, || log.emit(0, true));

        let text = out.text();
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        let fields = text_fields(text.trim_end());
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "client",
                "forwarded_client",
                "host",
                "method",
                "path",
                "version",
                "status",
                "bytes",
                "duration_ms",
                "cache",
                "origin",
                "route",
                "complete",
                "request_id",
                "tls_version",
                "user_agent",
                "referer"
            ],
            "{text}"
        );
        let value = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("status"), Some("421"));
        assert_eq!(value("cache"), Some("\"refused\""));
        // Quoted, with `"` and `\` escaped: what Rust's `{:?}` writes for a string.
        assert_eq!(
            value("host"),
            Some(r#""evil.test status=200 cache=\"hit\" x=\\""#)
        );
        assert_eq!(value("host"), Some(format!("{:?}", log.host).as_str()));
        assert_eq!(value("path"), Some(format!("{:?}", log.path).as_str()));
        assert_eq!(value("method"), Some("\"GET\""));
        assert_eq!(value("user_agent"), Some(r#""curl/8 status=200 \"x""#));
        // Invalid UTF-8 replaced by U+FFFD, printable; the quote escaped.
        assert_eq!(
            value("referer"),
            Some("\"https://a.test/\u{fffd}\\\" cache=hit\"")
        );
        assert_eq!(value("request_id"), Some(r#""abc\"=1""#));
        assert_eq!(value("tls_version"), Some("\"-\""));
        assert!(
            !text.contains(['\r', '\u{1b}', '\t', '\u{7f}']),
            "control characters escaped: {text:?}"
        );
    }

    #[test]
    fn client_values_stay_json_strings() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .finish();
        let log = forged();
        tracing::subscriber::with_default(subscriber, || log.emit(0, true));

        let text = out.text();
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON line");
        assert_eq!(v["host"], log.host.as_str());
        assert_eq!(v["path"], log.path.as_str());
        assert_eq!(v["method"], "GET");
        assert_eq!(v["status"], 421);
        assert_eq!(v["cache"], "refused");
        assert_eq!(v["user_agent"], "curl/8 status=200 \"x");
        assert_eq!(v["referer"], "https://a.test/\u{fffd}\" cache=hit");
        assert_eq!(v["request_id"], "abc\"=1");
        assert_eq!(v["forwarded_client"], "127.0.0.1");
        assert_eq!(v["tls_version"], "-");
    }
}

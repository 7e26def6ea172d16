//! Compression at the edge (`[sites.compression]`): which responses are compressed, which
//! stored form a client is sent (`Accept-Encoding`, RFC 9110 §12.5.3), and the codecs.
//!
//! A cacheable response is compressed once, when its fill completes, on a blocking thread:
//! the encoded forms are stored beside the identity body in the same entry
//! (`cache::Entry::forms`), so a hit only chooses among prepared bodies. Responses that are
//! not stored are compressed as they stream when the site says so ([`Encoder`]); a stored
//! response in a coding the client does not accept is decoded as it is sent ([`Decoder`]).
//! A leaf: `http`, `bytes` and the codec crates only.

use std::io::{self, Read, Write};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

/// A content coding edgecache reads, and (all but `deflate`) writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coding {
    Br,
    Zstd,
    Gzip,
    /// zlib (RFC 1950) as `deflate` means in HTTP: decoded for clients, never produced.
    Deflate,
}

impl Coding {
    /// The codings a site may be configured to produce, in the default order of preference.
    pub const PRODUCED: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

    /// The token in `Content-Encoding` and `Accept-Encoding`.
    pub const fn name(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }

    /// The coding named `token` (any case; `x-gzip` is gzip, RFC 9110 §8.4.1.3).
    pub fn parse(token: &str) -> Option<Coding> {
        let t = token.trim();
        [Coding::Br, Coding::Zstd, Coding::Gzip, Coding::Deflate]
            .into_iter()
            .find(|c| t.eq_ignore_ascii_case(c.name()))
            .or_else(|| t.eq_ignore_ascii_case("x-gzip").then_some(Coding::Gzip))
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.name())
    }
}

/// Compression levels, one per produced coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Levels {
    /// Brotli quality, 0..=11.
    pub br: u32,
    /// zstd level, 1..=22.
    pub zstd: i32,
    /// gzip level, 1..=9.
    pub gzip: u32,
}

impl Default for Levels {
    /// Chosen for a compression paid once per object: br 5 and zstd 6 are within a few
    /// percent of their top sizes on text at a small part of their top cost; gzip 6 is
    /// zlib's own default.
    fn default() -> Levels {
        Levels {
            br: 5,
            zstd: 6,
            gzip: 6,
        }
    }
}

/// `[sites.compression]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Compression {
    pub enabled: bool,
    /// What this site produces, in its order of preference (a client's q-values first).
    pub encodings: Vec<Coding>,
    /// Media types compressed: `type/subtype`, `type/*`, or `type/*+suffix`, lowercase.
    pub types: Vec<String>,
    /// Smaller bodies (by `Content-Length`, or by their size once read) are not compressed.
    pub min_size: u64,
    pub levels: Levels,
    /// Responses that are not stored are compressed as they stream (else passed through).
    pub stream: bool,
}

/// The media types compressed by default: text, scripts, data formats, SVG, WebAssembly, and
/// the font formats that are not compressed already (WOFF and WOFF2 are).
pub const DEFAULT_TYPES: [&str; 16] = [
    "text/*",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/json",
    "application/*+json",
    "application/xml",
    "application/*+xml",
    "application/xhtml+xml",
    "image/svg+xml",
    "image/x-icon",
    "application/wasm",
    "font/ttf",
    "font/otf",
    "application/vnd.ms-fontobject",
    "application/x-font-ttf",
];

impl Default for Compression {
    fn default() -> Compression {
        Compression {
            enabled: true,
            encodings: Coding::PRODUCED.to_vec(),
            types: DEFAULT_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            min_size: 1024,
            levels: Levels::default(),
            stream: true,
        }
    }
}

/// What to do with a response from the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: sent and stored as it came.
    Keep,
    /// Identity content of a compressible type: encoded forms are made.
    Encode,
    /// Already in this coding: a client that does not accept it gets it decoded.
    Decode(Coding),
}

impl Compression {
    /// The plan for a response with `status` and `headers`, whose length is `length` when
    /// known. Only 200 responses are transformed, never one that says `no-transform`
    /// (RFC 9110 §7.7), nor one in a coding chain or an unknown coding.
    pub fn plan(&self, status: StatusCode, headers: &HeaderMap, length: Option<u64>) -> Plan {
        if !self.enabled || status != StatusCode::OK || no_transform(headers) {
            return Plan::Keep;
        }
        if headers.contains_key(header::CONTENT_RANGE) {
            return Plan::Keep;
        }
        let mut codings = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        match (codings.next(), codings.next()) {
            (None, _) => {}
            (Some(one), None) => {
                return Coding::parse(one).map_or(Plan::Keep, Plan::Decode);
            }
            _ => return Plan::Keep,
        }
        if self.encodings.is_empty() || length.is_some_and(|n| n < self.min_size) {
            return Plan::Keep;
        }
        match headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        {
            Some(ct) if type_matches(&self.types, ct) => Plan::Encode,
            _ => Plan::Keep,
        }
    }
}

/// True when `Cache-Control` carries `no-transform`.
fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
}

/// True when the media type of `content_type` matches one of `patterns`.
pub fn type_matches(patterns: &[String], content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let Some((ty, sub)) = media.split_once('/') else {
        return false;
    };
    patterns.iter().any(|p| {
        let Some((pty, psub)) = p.split_once('/') else {
            return false;
        };
        if !pty.eq_ignore_ascii_case(ty) {
            return false;
        }
        match psub.strip_prefix('*') {
            Some("") => true,
            // `*+json`: any subtype with that structured-syntax suffix.
            Some(suffix) => {
                sub.len() > suffix.len()
                    && sub.as_bytes()[sub.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
            None => psub.eq_ignore_ascii_case(sub),
        }
    })
}

/// True when `pattern` is a media-type pattern [`type_matches`] understands.
pub fn valid_type_pattern(pattern: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match pattern.split_once('/') {
        Some((ty, sub)) => {
            token(ty)
                && match sub.strip_prefix('*') {
                    Some("") => true,
                    Some(suffix) => suffix.starts_with('+') && token(&suffix[1..]),
                    None => token(sub),
                }
        }
        None => false,
    }
}

/// The weights (thousandths) a request's `Accept-Encoding` gives the codings edgecache
/// knows, read in one pass over the field's bytes with no allocation (a hit pays this).
/// The first listing of a coding counts; `None`: not listed.
#[derive(Default)]
struct Weights {
    br: Option<u16>,
    zstd: Option<u16>,
    gzip: Option<u16>,
    deflate: Option<u16>,
    identity: Option<u16>,
    star: Option<u16>,
}

impl Weights {
    fn of(request: &HeaderMap) -> Weights {
        let mut w = Weights::default();
        for value in request.get_all(header::ACCEPT_ENCODING) {
            for item in value.as_bytes().split(|&b| b == b',') {
                let mut parts = item.split(|&b| b == b';');
                let name = trim(parts.next().unwrap_or(b""));
                if name.is_empty() {
                    continue;
                }
                let q = parts
                    .find_map(|p| {
                        let p = trim(p);
                        let v = p.strip_prefix(b"q=").or_else(|| p.strip_prefix(b"Q="))?;
                        Some(qvalue(trim(v)))
                    })
                    .unwrap_or(1000);
                let slot = match name.len() {
                    1 if name == b"*" => &mut w.star,
                    2 if name.eq_ignore_ascii_case(b"br") => &mut w.br,
                    4 if name.eq_ignore_ascii_case(b"zstd") => &mut w.zstd,
                    4 if name.eq_ignore_ascii_case(b"gzip") => &mut w.gzip,
                    6 if name.eq_ignore_ascii_case(b"x-gzip") => &mut w.gzip,
                    7 if name.eq_ignore_ascii_case(b"deflate") => &mut w.deflate,
                    8 if name.eq_ignore_ascii_case(b"identity") => &mut w.identity,
                    _ => continue,
                };
                if slot.is_none() {
                    *slot = Some(q);
                }
            }
        }
        w
    }

    /// The weight of `coding`: its own, else `*`'s, else 0.
    fn of_coding(&self, coding: Coding) -> u16 {
        let own = match coding {
            Coding::Br => self.br,
            Coding::Zstd => self.zstd,
            Coding::Gzip => self.gzip,
            Coding::Deflate => self.deflate,
        };
        own.or(self.star).unwrap_or(0)
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// A qvalue (RFC 9110 §12.4.2) in thousandths; anything unreadable counts as 0.
fn qvalue(v: &[u8]) -> u16 {
    let (whole, frac) = match v {
        [b'0'] => return 0,
        [b'1'] => return 1000,
        [b'0', b'.', rest @ ..] => (0u16, rest),
        [b'1', b'.', rest @ ..] => (1000u16, rest),
        _ => return 0,
    };
    if frac.len() > 3 {
        return 0;
    }
    let mut f = 0u16;
    let mut scale = 100u16;
    for &b in frac {
        if !b.is_ascii_digit() {
            return 0;
        }
        f += u16::from(b - b'0') * scale;
        scale /= 10;
    }
    if whole == 1000 && f > 0 {
        return 0;
    }
    whole + f
}

/// Which of `forms` (encoded bodies, in the site's order of preference) to send for
/// `request`, or `None` for the identity body. The client's highest q wins, the site's order
/// among equals; identity only when the client names it with a higher q than every form it
/// accepts, or accepts none (RFC 9110 §12.5.3: `identity;q=0` is respected as far as there
/// is another form; with none acceptable, the identity body is sent, as the RFC asks). A
/// request without `Accept-Encoding` gets identity.
pub fn negotiate(request: &HeaderMap, forms: &[Coding]) -> Option<usize> {
    if forms.is_empty() || !request.contains_key(header::ACCEPT_ENCODING) {
        return None;
    }
    let w = Weights::of(request);
    let mut best: Option<(usize, u16)> = None;
    for (i, &c) in forms.iter().enumerate() {
        let q = w.of_coding(c);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((i, q));
        }
    }
    let (i, q) = best?;
    match w.identity {
        Some(iq) if iq > q => None,
        _ => Some(i),
    }
}

/// True when `request` accepts `coding` (listed with q > 0, or under `*`). A request
/// without `Accept-Encoding` accepts none here: such clients (scripts, old tools) are sent
/// identity, as nginx's `gunzip` does.
pub fn accepts(request: &HeaderMap, coding: Coding) -> bool {
    request.contains_key(header::ACCEPT_ENCODING) && Weights::of(request).of_coding(coding) > 0
}

/// `body` encoded whole with `coding` (blocking; run off the async workers).
pub fn encode(coding: Coding, levels: &Levels, body: &[u8]) -> io::Result<Vec<u8>> {
    match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 3),
                flate2::Compression::new(levels.gzip),
            );
            e.write_all(body)?;
            e.finish()
        }
        Coding::Br => {
            let out = Vec::with_capacity(body.len() / 3);
            let mut w = brotli::CompressorWriter::new(out, 16 * 1024, levels.br, 22);
            w.write_all(body)?;
            Ok(w.into_inner())
        }
        Coding::Zstd => zstd::bulk::compress(body, levels.zstd),
        Coding::Deflate => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "deflate is decoded, not produced",
        )),
    }
}

/// Encoded forms of `body` for each of `codings`, those that save at least a sixteenth of
/// its size, in the same order, with their total size below `budget` (the identity body
/// already counted): what a fill stores beside the identity body. Blocking.
pub fn forms(
    codings: &[Coding],
    levels: &Levels,
    body: &Bytes,
    budget: u64,
) -> Vec<(Coding, Bytes)> {
    let mut out = Vec::new();
    let mut used = 0u64;
    for &c in codings {
        let Ok(encoded) = encode(c, levels, body) else {
            continue;
        };
        let n = encoded.len() as u64;
        if n + (body.len() as u64 / 16) > body.len() as u64 || used + n > budget {
            continue;
        }
        used += n;
        out.push((c, Bytes::from(encoded)));
    }
    out
}

/// Reads a stored body in `coding`, decoded, a bounded chunk at a time (a small input that
/// decodes to gigabytes is sent in chunks like any other, never held whole).
pub struct Decoder {
    inner: Box<dyn Read + Send>,
}

/// The most a decoder produces per chunk.
const CHUNK: usize = 32 * 1024;

impl Decoder {
    pub fn new(coding: Coding, body: Bytes) -> Decoder {
        let input = io::Cursor::new(body);
        let inner: Box<dyn Read + Send> = match coding {
            Coding::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            Coding::Deflate => Box::new(flate2::bufread::ZlibDecoder::new(input)),
            Coding::Br => Box::new(brotli::Decompressor::new(input, 8 * 1024)),
            Coding::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
                Ok(d) => Box::new(d),
                Err(e) => Box::new(Failing(Some(e))),
            },
        };
        Decoder { inner }
    }

    /// The next chunk of decoded bytes; `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        Ok(Some(Bytes::from(buf)))
    }
}

/// A reader that fails once with the error a decoder could not be made with.
struct Failing(Option<io::Error>);

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| io::Error::other("decoder unavailable")))
    }
}

/// Compresses a body as it streams: each chunk written is flushed out at once (a client
/// reading an event stream or a slow page sees it as it comes), with memory bounded by the
/// codec's window.
pub struct Encoder {
    kind: EncoderKind,
}

enum EncoderKind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Encoder {
    /// `None` for a coding that is not produced.
    pub fn new(coding: Coding, levels: &Levels) -> Option<Encoder> {
        let kind = match coding {
            Coding::Gzip => EncoderKind::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(levels.gzip),
            )),
            // A streamed body pays per request: brotli's window kept to 4 MiB (lgwin 22).
            Coding::Br => EncoderKind::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                levels.br,
                22,
            ))),
            Coding::Zstd => {
                EncoderKind::Zstd(zstd::stream::write::Encoder::new(Vec::new(), levels.zstd).ok()?)
            }
            Coding::Deflate => return None,
        };
        Some(Encoder { kind })
    }

    /// Encodes `data` and returns what is ready to send (possibly empty).
    pub fn push(&mut self, data: &[u8]) -> io::Result<Bytes> {
        let out = match &mut self.kind {
            EncoderKind::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
            EncoderKind::Br(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
            EncoderKind::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
        };
        Ok(Bytes::from(std::mem::take(out)))
    }

    /// Ends the stream and returns the last bytes.
    pub fn finish(self) -> io::Result<Bytes> {
        let out = match self.kind {
            EncoderKind::Gzip(e) => e.finish()?,
            EncoderKind::Br(e) => e.into_inner(),
            EncoderKind::Zstd(e) => e.finish()?,
        };
        Ok(Bytes::from(out))
    }
}

/// `etag` as a weak validator (an encoded form is not byte-identical to the identity body,
/// so it may not claim its strong validator, RFC 9110 §8.8.3); weak ones are kept.
pub fn weak_etag(etag: &HeaderValue) -> HeaderValue {
    let b = etag.as_bytes();
    if b.starts_with(b"W/") {
        return etag.clone();
    }
    let mut v = Vec::with_capacity(b.len() + 2);
    v.extend_from_slice(b"W/");
    v.extend_from_slice(b);
    HeaderValue::from_bytes(&v).unwrap_or_else(|_| etag.clone())
}

/// Adds `Accept-Encoding` to `Vary` unless it is there already (or `Vary: *`).
pub fn add_vary(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|f| f == "*" || f.eq_ignore_ascii_case("accept-encoding"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ae: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in ae {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const ALL: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

    #[test]
    fn negotiation_follows_q_values_then_the_sites_order() {
        assert_eq!(negotiate(&req(&[]), &ALL), None, "no field: identity");
        assert_eq!(negotiate(&req(&["gzip, deflate, br, zstd"]), &ALL), Some(0));
        assert_eq!(negotiate(&req(&["gzip"]), &ALL), Some(2));
        assert_eq!(negotiate(&req(&["GZIP", "zstd"]), &ALL), Some(1));
        assert_eq!(negotiate(&req(&["br;q=0.5, gzip"]), &ALL), Some(2));
        assert_eq!(negotiate(&req(&["br;q=0, gzip;q=0"]), &ALL), None);
        assert_eq!(negotiate(&req(&["*"]), &ALL), Some(0));
        assert_eq!(negotiate(&req(&["*;q=0.5, br;q=0"]), &ALL), Some(1));
        assert_eq!(negotiate(&req(&["x-gzip"]), &ALL), Some(2));
        assert_eq!(negotiate(&req(&["identity"]), &ALL), None);
        assert_eq!(
            negotiate(&req(&[""]), &ALL),
            None,
            "empty: no coding wanted"
        );
        assert_eq!(
            negotiate(&req(&["gzip;q=0.1, identity;q=0"]), &ALL),
            Some(2),
            "identity refused: the form it accepts, however low"
        );
        assert_eq!(
            negotiate(&req(&["gzip;q=0.5, identity;q=1"]), &ALL),
            None,
            "identity named with a higher q"
        );
        assert_eq!(negotiate(&req(&["gzip;q=0.5, *"]), &ALL), Some(0));
        assert_eq!(negotiate(&req(&["br;q=1.001"]), &ALL), None, "bad q: 0");
        assert_eq!(negotiate(&req(&["gzip, br"]), &[]), None);
    }

    #[test]
    fn accepts_reads_like_negotiate() {
        assert!(!accepts(&req(&[]), Coding::Gzip));
        assert!(accepts(&req(&["gzip"]), Coding::Gzip));
        assert!(!accepts(&req(&["gzip;q=0"]), Coding::Gzip));
        assert!(accepts(&req(&["*"]), Coding::Br));
        assert!(!accepts(&req(&["br"]), Coding::Gzip));
    }

    #[test]
    fn plans() {
        let c = Compression::default();
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/css; charset=utf-8"),
        );
        assert_eq!(c.plan(StatusCode::OK, &h, Some(4096)), Plan::Encode);
        assert_eq!(c.plan(StatusCode::OK, &h, None), Plan::Encode);
        assert_eq!(c.plan(StatusCode::OK, &h, Some(100)), Plan::Keep, "small");
        assert_eq!(c.plan(StatusCode::NOT_FOUND, &h, Some(4096)), Plan::Keep);
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60, No-Transform"),
        );
        assert_eq!(c.plan(StatusCode::OK, &h, Some(4096)), Plan::Keep);
        h.remove(header::CACHE_CONTROL);
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            c.plan(StatusCode::OK, &h, Some(4096)),
            Plan::Decode(Coding::Gzip)
        );
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        assert_eq!(c.plan(StatusCode::OK, &h, Some(4096)), Plan::Keep);
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert_eq!(c.plan(StatusCode::OK, &h, Some(4096)), Plan::Encode);
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert_eq!(c.plan(StatusCode::OK, &h, Some(4096)), Plan::Keep);
        let off = Compression {
            enabled: false,
            ..Compression::default()
        };
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        assert_eq!(off.plan(StatusCode::OK, &h, Some(4096)), Plan::Keep);
    }

    #[test]
    fn type_patterns() {
        let t: Vec<String> = DEFAULT_TYPES.iter().map(|s| (*s).to_owned()).collect();
        for yes in [
            "text/html",
            "TEXT/CSS;charset=utf-8",
            "application/ld+json",
            "application/rss+xml",
            "image/svg+xml",
            "application/wasm",
        ] {
            assert!(type_matches(&t, yes), "{yes}");
        }
        for no in [
            "image/png",
            "font/woff2",
            "application/octet-stream",
            "json",
            "",
        ] {
            assert!(!type_matches(&t, no), "{no}");
        }
        assert!(t.iter().all(|p| valid_type_pattern(p)));
        for bad in ["text", "*/*", "text/*json", "a/b c", "/x"] {
            assert!(!valid_type_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn every_coding_round_trips_whole_and_streamed() {
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i} of a stylesheet {{ color: red }}\n").into_bytes())
            .collect();
        let body = Bytes::from(text.clone());
        let levels = Levels::default();
        let made = forms(&Coding::PRODUCED, &levels, &body, u64::MAX);
        assert_eq!(made.len(), 3, "text compresses in every coding");
        for (coding, encoded) in made {
            assert!(encoded.len() < text.len() / 4, "{coding:?}");
            let mut d = Decoder::new(coding, encoded);
            let mut back = Vec::new();
            while let Some(chunk) = d.next_chunk().expect("decodes") {
                assert!(chunk.len() <= CHUNK);
                back.extend_from_slice(&chunk);
            }
            assert_eq!(back, text, "{coding:?}");

            let mut e = Encoder::new(coding, &levels).expect("produced");
            let mut streamed = Vec::new();
            for piece in text.chunks(7000) {
                streamed.extend_from_slice(&e.push(piece).expect("encodes"));
            }
            streamed.extend_from_slice(&e.finish().expect("ends"));
            let mut d = Decoder::new(coding, Bytes::from(streamed));
            let mut back = Vec::new();
            while let Some(chunk) = d.next_chunk().expect("decodes") {
                back.extend_from_slice(&chunk);
            }
            assert_eq!(back, text, "streamed {coding:?}");
        }
    }

    #[test]
    fn incompressible_bodies_and_budgets_store_no_form() {
        let mut x = 0x1234_5678_u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let body = Bytes::from(noise);
        assert!(forms(&Coding::PRODUCED, &Levels::default(), &body, u64::MAX).is_empty());
        let text = Bytes::from(vec![b'a'; 8192]);
        assert!(forms(&Coding::PRODUCED, &Levels::default(), &text, 10).is_empty());
    }

    #[test]
    fn a_corrupt_body_fails_to_decode_rather_than_panicking() {
        for c in [Coding::Gzip, Coding::Br, Coding::Zstd, Coding::Deflate] {
            let mut d = Decoder::new(c, Bytes::from_static(b"\x1f\x8b not really compressed"));
            let mut result = Ok(None);
            for _ in 0..4 {
                result = d.next_chunk();
                if !matches!(result, Ok(Some(_))) {
                    break;
                }
            }
            assert!(result.is_err(), "{c:?}");
        }
    }

    #[test]
    fn weak_etags_and_vary() {
        assert_eq!(weak_etag(&HeaderValue::from_static("\"a\"")), "W/\"a\"");
        assert_eq!(weak_etag(&HeaderValue::from_static("W/\"a\"")), "W/\"a\"");
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut h = HeaderMap::new();
        h.insert(
            header::VARY,
            HeaderValue::from_static("Origin, accept-encoding"),
        );
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
    }
}

//! Text to [`RawConfig`], with every parse error of the file at once, each at its position and
//! in words rather than Rust type names.
//!
//! serde stops at the first error. To report the others, the document is parsed once (with
//! `toml_edit`, which keeps every key's and value's position) and deserialized again after
//! each error with the item it was about taken out: the key and its value for an unknown key
//! or a wrong type, the table for a missing key. This is a compiler's error recovery applied
//! to the one deserializer, chosen over a second, hand-written schema walk because the serde
//! types stay the only description of the file: a key added to `raw.rs` is checked here with
//! no further change. A syntax error cannot be recovered from (the document does not parse),
//! so it is reported alone.
//!
//! Each retry deserializes the whole document again; a file has tens of keys and a report
//! stops after [`MAX_ERRORS`], so the cost stays far below a millisecond per error.

use std::ops::Range;

use serde::Deserialize;
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::{key_at, parse_message, Checker};
use crate::config::raw::RawConfig;

/// A report stops after this many parse errors (a file of another program, say).
const MAX_ERRORS: usize = 100;

/// The file's raw configuration, or every parse error found in it (already in `ck`).
pub(super) fn raw(ck: &mut Checker<'_>) -> Option<RawConfig> {
    let text = ck.text;
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = syntax_span(text, e.span());
            let at = span.as_ref().and_then(|s| text.get(s.start..));
            let message = parse_message(e.message(), at);
            let key = span.as_ref().and_then(|s| key_at(text, s.start));
            ck.raw_error(span.map_or(0, |s| s.start), key, message);
            return None;
        }
    };
    let mut root = doc.as_table().clone();
    // Tables from which something was taken out: their own "missing field" is a consequence
    // of an error already reported, not a new one.
    let mut touched: Vec<Vec<Seg>> = Vec::new();
    for _ in 0..MAX_ERRORS {
        let de = toml_edit::de::Deserializer::from(toml_edit::DocumentMut::from(root.clone()));
        let e = match RawConfig::deserialize(de) {
            Ok(raw) if ck.errors.is_empty() => return Some(raw),
            Ok(_) => return None,
            Err(e) => e,
        };
        let Some(span) = e.span() else {
            ck.raw_error(0, None, human(e.message()));
            return None;
        };
        let path = find(&root, span.start, &mut Vec::new());
        let consequence = e.message().starts_with("missing field")
            && path.as_ref().is_some_and(|p| touched.contains(p));
        if !consequence {
            ck.raw_error(span.start, key_at(text, span.start), human(e.message()));
        }
        let path = path.filter(|p| !p.is_empty())?;
        if !remove(&mut root, &path) {
            return None;
        }
        touched.push(path[..path.len() - 1].to_vec());
    }
    None
}

/// Where a syntax error is. For a table header without its `]` (`[server` on line 2) the
/// parser points past the header's line, at the start of the next one; the mistake is at
/// the end of the header's own line, so that is where it is reported.
fn syntax_span(text: &str, span: Option<Range<usize>>) -> Option<Range<usize>> {
    let span = span?;
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    if line_start == start && start > 0 {
        let prev_start = text[..start - 1].rfind('\n').map_or(0, |i| i + 1);
        let prev = text[prev_start..start - 1].trim_end_matches('\r');
        let code = prev.split('#').next().unwrap_or("").trim_end();
        if code.trim_start().starts_with('[') && !code.ends_with(']') {
            let end = prev_start + code.len();
            return Some(end..end);
        }
    }
    Some(span)
}

/// One step of a path into the document: a key of a table, or an element of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

/// The deepest item at `offset`: a key (with its value), a value, or a table's header.
fn find(table: &dyn TableLike, offset: usize, at: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    let mut best: Option<Vec<Seg>> = None;
    for (k, item) in table.iter() {
        at.push(Seg::Key(k.to_owned()));
        let key_span = table.key(k).and_then(|key| key.span());
        if contains(key_span, offset) || contains(item.span(), offset) {
            best = deeper(best, Some(at.clone()));
        }
        best = deeper(best, find_item(item, offset, at));
        at.pop();
    }
    best
}

fn find_item(item: &Item, offset: usize, at: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    match item {
        Item::Table(t) => find(t, offset, at),
        Item::ArrayOfTables(a) => {
            let mut best = None;
            for (i, t) in a.iter().enumerate() {
                at.push(Seg::Index(i));
                if contains(t.span(), offset) {
                    best = deeper(best, Some(at.clone()));
                }
                best = deeper(best, find(t, offset, at));
                at.pop();
            }
            best
        }
        Item::Value(v) => find_value(v, offset, at),
        Item::None => None,
    }
}

fn find_value(v: &Value, offset: usize, at: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    match v {
        Value::InlineTable(t) => find(t, offset, at),
        Value::Array(a) => {
            let mut best = None;
            for (i, e) in a.iter().enumerate() {
                // Only tables inside a list are taken out on their own; a wrong element of a
                // list of strings takes the whole key out (what it is reported against).
                if let Value::InlineTable(t) = e {
                    at.push(Seg::Index(i));
                    if contains(e.span(), offset) {
                        best = deeper(best, Some(at.clone()));
                    }
                    best = deeper(best, find(t, offset, at));
                    at.pop();
                }
            }
            best
        }
        _ => None,
    }
}

fn deeper(a: Option<Vec<Seg>>, b: Option<Vec<Seg>>) -> Option<Vec<Seg>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.len() > a.len() { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Takes the item at `path` out of the document; false when there is none.
fn remove(table: &mut dyn TableLike, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k).is_some(),
        [Seg::Key(k), Seg::Index(n)] => match table.get_mut(k) {
            Some(Item::ArrayOfTables(a)) if *n < a.len() => {
                a.remove(*n);
                true
            }
            Some(Item::Value(Value::Array(a))) if *n < a.len() => {
                a.remove(*n);
                true
            }
            _ => false,
        },
        [Seg::Key(k), Seg::Index(n), rest @ ..] => match table.get_mut(k) {
            Some(Item::ArrayOfTables(a)) => a.get_mut(*n).is_some_and(|t| remove(t, rest)),
            Some(Item::Value(Value::Array(a))) => match a.get_mut(*n) {
                Some(Value::InlineTable(t)) => remove(t, rest),
                _ => false,
            },
            _ => false,
        },
        [Seg::Key(k), rest @ ..] => match table.get_mut(k) {
            Some(Item::Table(t)) => remove(t, rest),
            Some(Item::Value(Value::InlineTable(t))) => remove(t, rest),
            _ => false,
        },
        _ => false,
    }
}

/// serde's message in words: the TOML types and plain descriptions in place of Rust's
/// (`usize`, `a sequence`, `struct RawHealth`), `key` in place of `field`. The one place the
/// deserializer's wording is rewritten, so every key says the same thing for the same type.
pub(super) fn human(message: &str) -> String {
    let m = message.trim();
    if let Some(rest) = m.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`" / "…, there are no fields"
        let (name, known) = rest.split_once(", ").unwrap_or((rest, ""));
        let known = known
            .strip_prefix("expected one of ")
            .or_else(|| known.strip_prefix("expected "))
            .map(|k| k.replace('`', ""));
        return match known {
            Some(k) => format!("unknown key {name} (known keys: {k})"),
            None => format!("unknown key {name}"),
        };
    }
    if let Some(rest) = m.strip_prefix("missing field ") {
        return format!("{rest} is required here");
    }
    for (head, words) in [("invalid type: ", "is"), ("invalid value: ", "is")] {
        if let Some(rest) = m.strip_prefix(head) {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                return format!(
                    "{} {words} not {}",
                    found_words(found),
                    expected_words(expected)
                );
            }
        }
    }
    m.to_owned()
}

/// What serde says it found (`string "x"`, `integer `5``, `sequence`, `map`) in TOML's words.
fn found_words(found: &str) -> String {
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "a table".to_owned(),
        "unit value" | "unit" => "an empty value".to_owned(),
        other => other
            .replace("floating point", "number")
            .replace("string ", "text ")
            .replace("integer ", "number ")
            .replace("boolean ", ""),
    }
}

/// What serde says it expected, in words.
fn expected_words(expected: &str) -> String {
    let e = expected.trim();
    let w = match e {
        "usize" | "u64" | "u32" | "u8" => "a whole number (0 or more)",
        "u16" => "a number from 0 to 65535",
        "i64" | "i32" | "isize" => "a whole number",
        "f64" | "f32" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "string" => "text in quotes",
        "a sequence" => "a list in [ ]",
        "a map" => "a table",
        "option" => "a value",
        _ if e.starts_with("struct ") || e.starts_with("a map") => "a table",
        _ if e.starts_with("enum ") => "one of the documented values",
        other => return other.to_owned(),
    };
    w.to_owned()
}

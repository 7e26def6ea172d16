//! Properties of the loader over generated text: it never panics, and every problem it
//! reports reads `FILE:LINE:COLUMN: ` on a line of its own, at a place inside the text.

use proptest::prelude::*;

use super::*;

const SHIPPED: &str = include_str!("../../../config/edgecache.toml");

const HEADERS: &[&str] = &[
    "[server]",
    "[cache]",
    "[admin]",
    "[tls]",
    "[[tls.certificates]]",
    "[[origins]]",
    "[origins.health]",
    "[health]",
    "[dns]",
    "[retries]",
    "[[pools]]",
    "[geo]",
    "[[geo.networks]]",
    "[[sites]]",
    "[[sites.routes]]",
    "[sites.cache]",
    "[[sites.rules]]",
    "[ sites . cache ]",
    "[[ x ]]",
    "[server",
];

/// Every key `raw.rs` knows, and a few it does not.
const KEYS: &[&str] = &[
    "admin",
    "budget",
    "bypass",
    "ca",
    "cache",
    "cert",
    "cidr",
    "cidrs",
    "client_address_header",
    "client_cert",
    "client_key",
    "client_no_cache",
    "connect_timeout",
    "continents",
    "countries",
    "country",
    "database",
    "enabled",
    "expect_status",
    "fall",
    "fill_memory",
    "h2_max_concurrent_streams",
    "h2_max_pending_resets",
    "header",
    "header_read_timeout",
    "heuristic_fraction",
    "heuristic_max",
    "hit_for_miss",
    "host_header",
    "hosts",
    "http",
    "https",
    "idle_timeout",
    "interval",
    "keep",
    "key",
    "key_cookies",
    "key_headers",
    "listen",
    "match",
    "max_connections",
    "max_header_bytes",
    "max_idle_connections",
    "max_object_size",
    "max_ttl",
    "memory",
    "min_per_second",
    "min_ttl",
    "name",
    "networks",
    "origin",
    "origins",
    "path",
    "pools",
    "prefix",
    "purge_allow",
    "query",
    "query_ignore",
    "region",
    "rise",
    "sendfile",
    "sendfile_min_size",
    "shutdown_grace",
    "spill_latency",
    "stale_if_error",
    "stale_while_revalidate",
    "status_ttl",
    "store_set_cookie",
    "timeout",
    "token",
    "token_env",
    "trusted_proxies",
    "ttl",
    "url",
    "via_name",
    "weight",
    "workers",
    "memroy",
    "\"quoted key\"",
    "a.b",
    "é",
];

/// Scalars that are right for some key and wrong for most.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "\"127.0.0.1:0\"",
                "\"0.0.0.0:8080\"",
                "\"[::]:8443\"",
                "\"localhost\"",
                "\"1GiB\"",
                "\"512 MiB\"",
                "\"10s\"",
                "\"5 parsecs\"",
                "\"http://127.0.0.1:9\"",
                "\"https://x:1\"",
                "\"a\"",
                "\"\"",
                "\"*.example.com\"",
                "\"10.0.0.0/8\"",
                "\"GET\"",
                "\"é😀\"",
                "'literal'",
                "\"\"\"multi\nline\"\"\"",
                "\"\\u00e9\"",
                "\"\\uD800\"",
                "0",
                "1",
                "-1",
                "18446744073709551616",
                "1.5",
                "nan",
                "true",
                "1979-05-27T07:32:00Z",
                "{ continents = [\"EU\"] }",
                "{}",
                "[]",
            ][..]
        )
        .prop_map(str::to_owned),
        "\"[ -~é😀]{0,12}\"",
    ]
}

/// Values of the type most keys take, with content validation refuses.
fn plausible() -> impl Strategy<Value = String> {
    proptest::sample::select(
        &[
            "\"\"",
            "\"localhost\"",
            "\"0.0.0.0:8080\"",
            "\"127.0.0.1:9090\"",
            "\"5 parsecs\"",
            "\"0s\"",
            "\"0B\"",
            "\"1TiB\"",
            "\"ftp://x\"",
            "\"http://\"",
            "\"*\"",
            "\"GET\"",
            "\"10.0.0.0/33\"",
            "\"nope\"",
            "\"é\"",
            "0",
            "2000000",
            "[\"\"]",
            "[\"a\", \"a\"]",
        ][..],
    )
    .prop_map(str::to_owned)
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => scalar(),
        1 => proptest::collection::vec(scalar(), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        1 => proptest::collection::vec(scalar(), 1..3)
            .prop_map(|v| format!("[\n  {},\n]", v.join(",\n  "))),
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::sample::select(HEADERS).prop_map(str::to_owned),
        6 => (proptest::sample::select(KEYS), "[ \t]{0,2}", value())
            .prop_map(|(k, ws, v)| format!("{k}{ws}={ws}{v}")),
        1 => Just("# a comment é".to_owned()),
        1 => Just(String::new()),
        1 => "[^\n]{0,20}",
    ]
}

/// TOML-shaped text: mostly lines of known tables and keys, some junk.
fn tomlish() -> impl Strategy<Value = String> {
    proptest::collection::vec(line(), 0..30).prop_map(|l| l.join("\n"))
}

/// An edit of the shipped configuration.
#[derive(Debug, Clone)]
enum Edit {
    /// Characters cut out at a place, and a line put in.
    Splice(usize, usize, String),
    /// A setting's value replaced.
    Value(usize, String),
    /// A commented-out line (`# [health]`, `# workers = 2`) made live.
    Uncomment(usize),
}

/// The shipped configuration, a few edits away: deep in a file that is otherwise valid,
/// so validation (not only parsing) has its say.
fn edited() -> impl Strategy<Value = String> {
    let chars = SHIPPED.chars().count();
    let lines = SHIPPED.lines().count();
    let edit = prop_oneof![
        1 => (0..chars, 0usize..12, line())
            .prop_map(|(at, cut, put)| Edit::Splice(at, cut, put)),
        3 => (0..lines, prop_oneof![3 => plausible(), 1 => value()])
            .prop_map(|(i, v)| Edit::Value(i, v)),
        3 => (0..lines).prop_map(Edit::Uncomment),
    ];
    proptest::collection::vec(edit, 1..5).prop_map(|edits| {
        let mut lines: Vec<String> = SHIPPED.lines().map(str::to_owned).collect();
        for e in edits {
            match e {
                Edit::Value(i, v) => {
                    if let Some((key, _)) = lines[i].split_once(" = ") {
                        if !key.starts_with('#') {
                            lines[i] = format!("{key} = {v}");
                        }
                    }
                }
                Edit::Uncomment(i) => {
                    let live = lines[i]
                        .strip_prefix("# ")
                        .map(|l| l.split("  #").next().unwrap_or(l));
                    // Settings and table headers only, not the prose around them.
                    if let Some(l) = live.filter(|l| l.starts_with('[') || l.contains(" = ")) {
                        lines[i] = l.to_owned();
                    }
                }
                Edit::Splice(at, cut, put) => {
                    let mut text: Vec<char> = lines.join("\n").chars().collect();
                    let at = at.min(text.len());
                    let end = (at + cut).min(text.len());
                    text.splice(at..end, put.chars());
                    lines = text
                        .into_iter()
                        .collect::<String>()
                        .lines()
                        .map(str::to_owned)
                        .collect();
                    lines.resize(SHIPPED.lines().count().max(lines.len()), String::new());
                }
            }
        }
        lines.join("\n")
    })
}

fn check_report(text: &str) -> Result<(), TestCaseError> {
    let base = Path::new("/nonexistent/edgecache-props");
    let Err(e) = Config::from_toml(text, "t.toml", base) else {
        return Ok(());
    };
    let Error::Invalid(diagnostics) = &e else {
        return Err(TestCaseError::fail(format!("not a diagnostic: {e}")));
    };
    prop_assert!(!diagnostics.is_empty());
    let report = e.to_string();
    prop_assert_eq!(
        report.lines().count(),
        diagnostics.len(),
        "one line each:\n{}",
        report
    );
    let lines = text.lines().count() + 1;
    for l in report.lines() {
        let mut parts = l.splitn(4, ':');
        let (file, line, column) = (parts.next(), parts.next(), parts.next());
        let number = |n: Option<&str>| n.and_then(|n| n.parse::<usize>().ok());
        prop_assert_eq!(file, Some("t.toml"), "{}", l);
        prop_assert!(
            number(line).is_some_and(|n| (1..=lines).contains(&n)),
            "{}",
            l
        );
        prop_assert!(number(column).is_some_and(|n| n >= 1), "{}", l);
        let rest = parts.next().unwrap_or("");
        prop_assert!(
            rest.starts_with(' ') && !rest.ends_with(": "),
            "says what is wrong: {}",
            l
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(crate::testing::props())]

    #[test]
    fn any_text_is_loaded_or_reported_by_position(text in any::<String>()) {
        check_report(&text)?;
    }

    #[test]
    fn toml_shaped_text_is_loaded_or_reported_by_position(text in tomlish()) {
        check_report(&text)?;
    }

    #[test]
    fn an_edited_shipped_config_is_loaded_or_reported_by_position(text in edited()) {
        check_report(&text)?;
    }
}

//! The configuration commands through the real binary: every parse error in one run, words
//! instead of Rust types, what the file may not say, where the file is found, warnings,
//! `check --print` and the `route` dry run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::make_cert;

const BIN: &str = env!("CARGO_BIN_EXE_edgecache");

const BASE: &str = "[[origins]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\n\
                    [[sites]]\nhosts = [\"example.com\"]\norigin = \"a\"\n";

/// A configuration file in a directory of its own.
struct File {
    dir: tempfile::TempDir,
    path: PathBuf,
}

fn file(text: &str) -> File {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgecache.toml");
    std::fs::write(&path, text).expect("write config");
    File { dir, path }
}

fn edgecache(args: &[&str], config: &Path) -> Output {
    Command::new(BIN)
        .env_remove("EDGECACHE_CONFIG")
        .env_remove("EDGECACHE_ADMIN_TOKEN")
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("run edgecache")
}

/// stderr of a `check` that must fail, with the file's path shortened to `bad.toml`.
fn check_fails(text: &str) -> Vec<String> {
    let f = file(text);
    let out = edgecache(&["check"], &f.path);
    assert!(!out.status.success(), "{text}");
    String::from_utf8_lossy(&out.stderr)
        .replace(&f.path.display().to_string(), "bad.toml")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn several_broken_keys_are_all_reported_in_one_run() {
    let e = check_fails(&format!(
        "[server]\nworkers = \"two\"\nbogus = 1\n[cache]\nmemory = \"1GiB\"\nsendfile = \"yes\"\n{BASE}\
         weight = 3\n[[sites.rules]]\nttl = \"5s\"\n[[sites.rules]]\nprefix = \"/a\"\nttl = 5\n"
    ));
    assert_eq!(
        e,
        [
            "bad.toml:2:11: server.workers: text \"two\" is not a whole number (0 or more)",
            "bad.toml:3:1: server.bogus: unknown key `bogus` (known keys: http, https, workers, \
             header_read_timeout, idle_timeout, send_timeout, max_header_bytes, max_connections, \
             shutdown_grace, h2_max_concurrent_streams, h2_max_pending_resets, trusted_proxies, \
             client_address_header, via_name, rate_per_client, burst_per_client, \
             max_connections_per_client, upgrade_socket)",
            "bad.toml:6:12: cache.sendfile: text \"yes\" is not true or false",
            "bad.toml:13:1: sites[0].weight: unknown key `weight` (known keys: hosts, origin, \
             routes, cache, rules, methods, escaped_slashes, limits, compression)",
            "bad.toml:18:7: sites[0].rules[1].ttl: number `5` is not a duration such as \
             \"500ms\", \"5s\", \"2m\", \"1h\" or \"1d\"",
        ]
    );
}

#[test]
fn a_rule_without_path_or_prefix_is_reported_at_the_rule() {
    let e = check_fails(&format!(
        "{BASE}[[sites.rules]]\nprefix = \"/a\"\n[[sites.rules]]\nttl = \"5s\"\n"
    ));
    assert_eq!(
        e,
        ["bad.toml:9:1: sites[0].rules[1]: a rule needs path (glob) or prefix"]
    );
}

#[test]
fn a_header_missing_its_bracket_is_reported_on_its_line() {
    let e = check_fails("# edge\n[server\nhttp = [\"127.0.0.1:8080\"]\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("bad.toml:2:8: "), "{e:?}");
}

#[test]
fn wrong_types_are_named_without_rust_type_names() {
    let e = check_fails(
        "[server]\nworkers = \"x\"\nhttp = \"x\"\nmax_connections = -3\n\
         h2_max_concurrent_streams = 1.5\n[cache]\nsendfile = 1\n[admin]\npublic_metrics = \"no\"\n\
         [retries]\nbudget = \"x\"\nmin_per_second = []\n[health]\nexpect_status = [70000]\n\
         [[origins]]\nname = 1\nurl = \"http://127.0.0.1:9\"\nhealth = 5\nfail_on = \"502\"\n\
         [[sites]]\nhosts = [\"h\"]\norigin = \"a\"\nmethods = \"GET\"\n\
         [sites.cache]\nheuristic_fraction = \"x\"\nquery_ignore = \"utm\"\nstatus_ttl = 1\n",
    );
    assert!(e.len() >= 15, "{e:#?}");
    for line in &e {
        for word in [
            "usize", "u16", "u32", "u64", "i64", "f64", "sequence", "map", "struct", "enum",
            "Option", "field",
        ] {
            assert!(!line.contains(word), "{word:?} in {line}");
        }
    }
    for want in [
        "server.http: text \"x\" is not a list in [ ]",
        "server.max_connections: number `-3` is not a whole number (0 or more)",
        "health.expect_status: number `70000` is not a number from 0 to 65535",
        "origins[0].health: number `5` is not a table",
        "cache.sendfile: number `1` is not true or false",
    ] {
        assert!(e.iter().any(|l| l.contains(want)), "{want}: {e:#?}");
    }
}

#[test]
fn an_origin_url_with_a_query_or_credentials_is_refused() {
    for (url, want) in [
        (
            "http://user:secret@127.0.0.1:9",
            "must not carry user:password@",
        ),
        ("http://127.0.0.1:9/?token=1", "must not have a query"),
    ] {
        let e = check_fails(&BASE.replace("http://127.0.0.1:9", url));
        assert!(
            e[0].starts_with(&format!("bad.toml:3:7: origins[0].url: {want}")),
            "{url}: {e:?}"
        );
    }
}

#[test]
fn sizes_in_mb_are_refused_not_read_as_mib() {
    let e = check_fails(&format!("[cache]\nmemory = \"512MB\"\n{BASE}"));
    assert_eq!(
        e,
        [
            "bad.toml:2:10: cache.memory: invalid size \"512MB\": \"MB\" is ambiguous; write MiB \
          (a power of 1024) or the number of bytes"
        ]
    );
}

#[test]
fn the_file_comes_from_c_then_edgecache_config_then_etc() {
    let f = file(BASE);
    let out = edgecache(&["check"], &f.path);
    assert!(out.status.success());
    let short = Command::new(BIN)
        .env_remove("EDGECACHE_CONFIG")
        .args(["check", "--config"])
        .arg(&f.path)
        .output()
        .expect("run");
    assert!(short.status.success());
    let from_env = Command::new(BIN)
        .env("EDGECACHE_CONFIG", &f.path)
        .arg("check")
        .output()
        .expect("run");
    assert!(
        from_env.status.success(),
        "{}",
        String::from_utf8_lossy(&from_env.stderr)
    );
    assert!(String::from_utf8_lossy(&from_env.stdout).contains("is valid"));
    // -c wins over the environment.
    let missing = f.dir.path().join("missing.toml");
    let both = Command::new(BIN)
        .env("EDGECACHE_CONFIG", &f.path)
        .args(["check", "-c"])
        .arg(&missing)
        .output()
        .expect("run");
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("missing.toml"));
    // Neither: the service default, named in the error when it is not there.
    if !Path::new("/etc/edgecache/edgecache.toml").exists() {
        let none = Command::new(BIN)
            .env_remove("EDGECACHE_CONFIG")
            .arg("check")
            .output()
            .expect("run");
        assert!(!none.status.success());
        assert!(
            String::from_utf8_lossy(&none.stderr)
                .contains("read configuration /etc/edgecache/edgecache.toml"),
            "{}",
            String::from_utf8_lossy(&none.stderr)
        );
    }
    let help = Command::new(BIN)
        .args(["check", "--help"])
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("-c, --config <FILE>"), "{help}");
    assert!(help.contains("EDGECACHE_CONFIG"), "{help}");
    assert!(help.contains("/etc/edgecache/edgecache.toml"), "{help}");
}

#[test]
fn check_warns_and_still_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = make_cert(dir.path(), "other", &["other.test"]);
    let text = format!(
        "[server]\nhttp = [\"127.0.0.1:0\"]\nhttps = [\"127.0.0.1:0\"]\n\
         [[tls.certificates]]\nhosts = [\"example.com\"]\ncert = \"other.crt\"\nkey = \"other.key\"\n\
         [admin]\nlisten = \"0.0.0.0:9090\"\n\
         {BASE}[[origins]]\nname = \"spare\"\nurl = \"http://127.0.0.1:10\"\n"
    );
    let path = dir.path().join("edgecache.toml");
    std::fs::write(&path, text).expect("write");
    let out = edgecache(&["check"], &path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "w.toml");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "w.toml:6:8: warning: tls.certificates[0].cert: its names cover none of the sites' \
             hosts: clients reaching it would see a name mismatch",
            "w.toml:5:10: warning: tls.certificates[0].hosts: \"example.com\" is not among the \
             certificate's names: clients would refuse it for that name",
            "w.toml:17:8: warning: origins[1].name: origin \"spare\" is in no pool or site that a \
             route uses: it is never sent a request",
            "w.toml:9:10: warning: admin.listen: 0.0.0.0:9090 is not a loopback address and no \
             token is set: /metrics, /origins, purge and reload are refused to everyone, and \
             /healthz is open to the network",
        ],
        "{err}"
    );
    assert!(cert.cert_path.exists());
}

#[test]
fn check_print_is_accepted_again_and_prints_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_cert(dir.path(), "site", &["example.com", "*.example.com"]);
    let text = "[server]\nhttp = [\"127.0.0.1:0\"]\nhttps = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                rate_per_client = \"100/s\"\n\
                [[tls.certificates]]\nhosts = [\"example.com\", \"*.example.com\"]\ncert = \"site.crt\"\nkey = \"site.key\"\n\
                [cache]\nmemory = \"1GiB\"\nsendfile = false\n\
                [health]\npath = \"/ping\"\n\
                [[origins]]\nname = \"eu-1\"\nurl = \"https://127.0.0.1:9001\"\nweight = 3\n\
                [[origins]]\nname = \"us-1\"\nurl = \"http://127.0.0.1:9002\"\n[origins.health]\nenabled = false\n\
                [[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\nspill_latency = \"250ms\"\n\
                [[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
                [geo]\nheader = \"CF-IPCountry\"\n[[geo.networks]]\ncidr = \"192.0.2.0/24\"\ncountry = \"FR\"\n\
                [[sites]]\nhosts = [\"*.example.com\"]\n[sites.cache]\nquery = \"sort\"\n\
                [[sites.routes]]\nmatch = { continents = [\"EU\"] }\npools = [\"eu\", \"us\"]\n\
                [[sites.routes]]\nname = \"rest\"\npools = [\"us\"]\n\
                [[sites.rules]]\nprefix = \"/api/\"\nttl = \"5s\"\nstatus_ttl = { 404 = \"30s\" }\n\
                [[sites]]\nhosts = [\"example.com\"]\norigin = \"us-1\"\n\
                [admin]\nlisten = \"127.0.0.1:0\"\npurge_allow = [\"127.0.0.1\"]\n\
                [log]\naccess = \"access.log\"\nformat = \"json\"\nlevel = \"debug\"\n";
    let path = dir.path().join("edgecache.toml");
    std::fs::write(&path, text).expect("write");
    let first = edgecache(&["check", "--print"], &path);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let printed = String::from_utf8_lossy(&first.stdout).into_owned();
    for want in [
        "idle_timeout = \"1m\"",
        "format = \"json\"",
        "level = \"debug\"",
        "error = \"stderr\"",
        "max_header_bytes = \"32KiB\"",
        "memory = \"1GiB\"",
        "sendfile = false",
        "[origins.health]\npath = \"/ping\"\ninterval = \"5s\"",
        "spill_latency = \"250ms\"",
        "origin = \"us-1\"",
        "name = \"sites[0].routes[0]\"",
        "status_ttl = { 404 = \"30s\" }",
        "heuristic_fraction = 0.1",
        "budget = 0.2",
    ] {
        assert!(printed.contains(want), "{want}:\n{printed}");
    }
    // Printed elsewhere: every file it names is absolute.
    let other = tempfile::tempdir().expect("tempdir");
    let again_path = other.path().join("printed.toml");
    std::fs::write(&again_path, &printed).expect("write");
    let second = edgecache(&["check", "--print"], &again_path);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let reprinted = String::from_utf8_lossy(&second.stdout).into_owned();
    let body = |t: &str| t.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&printed), body(&reprinted));
    // And the printed file serves what the original does.
    let summary = |p: &Path| {
        let out = edgecache(&["check"], p);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(summary(&path), summary(&again_path));
}

const GEO: &str = "[server]\nhttp = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
                   [geo]\nheader = \"CF-IPCountry\"\n[[geo.networks]]\ncidr = \"192.0.2.0/24\"\ncountry = \"FR\"\n\
                   [[origins]]\nname = \"eu-1\"\nurl = \"http://127.0.0.1:9001\"\n\
                   [[origins]]\nname = \"us-1\"\nurl = \"http://127.0.0.1:9002\"\n\
                   [[pools]]\nname = \"eu\"\norigins = [\"eu-1\"]\n\
                   [[pools]]\nname = \"us\"\norigins = [\"us-1\"]\n\
                   [[sites]]\nhosts = [\"*.example.com\"]\n\
                   [[sites.routes]]\nname = \"europe\"\nmatch = { continents = [\"EU\"] }\npools = [\"eu\", \"us\"]\n\
                   [[sites.routes]]\nname = \"rest\"\npools = [\"us\", \"eu\"]\n\
                   [[sites.rules]]\nprefix = \"/api/\"\nbypass = true\n";

fn route(f: &File, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .env_remove("EDGECACHE_CONFIG")
        .arg("route")
        .arg("-c")
        .arg(&f.path)
        .args(args)
        .output()
        .expect("run route");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn route_explains_a_geo_route_by_client_address() {
    let f = file(GEO);
    let (ok, out, err) = route(
        &f,
        &["--client", "192.0.2.7", "http://img.example.com/api/v1"],
    );
    assert!(ok, "{err}");
    for want in [
        "site: sites[0] (*.example.com): host \"img.example.com\" matched the wildcard \"*.example.com\"",
        "rule: sites[0].rules[0]: \"/api/v1\" matched prefix \"/api/\" (first match wins); bypass",
        "client: 192.0.2.7\n",
        "location: country FR, continent EU (from [[geo.networks]] 192.0.2.0/24)",
        "route: europe: matched continent EU",
        "no measurements offline: configured order",
        "  pool 1: eu\n    eu-1 http://127.0.0.1:9001 weight 1",
        "  pool 2: us\n    us-1 http://127.0.0.1:9002 weight 1",
    ] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
}

#[test]
fn route_believes_a_country_header_only_from_a_trusted_proxy() {
    let f = file(GEO);
    let (ok, out, err) = route(
        &f,
        &[
            "--client",
            "10.1.2.3",
            "--header",
            "CF-IPCountry=DE",
            "http://img.example.com/a.png",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "location: country DE, continent EU (from the cf-ipcountry header of a trusted proxy)"
        ),
        "{out}"
    );
    assert!(out.contains("route: europe: matched continent EU"), "{out}");
    assert!(
        out.contains("rule: none of the site's 1 rules matches \"/a.png\""),
        "{out}"
    );

    let (ok, out, _) = route(
        &f,
        &[
            "--client",
            "203.0.113.9",
            "--header",
            "CF-IPCountry=DE",
            "http://img.example.com/a.png",
        ],
    );
    assert!(ok);
    assert!(
        out.contains("the cf-ipcountry header is ignored: 203.0.113.9 is not a trusted proxy"),
        "{out}"
    );
    assert!(out.contains("route: rest: has no match"), "{out}");
    assert!(out.contains("  pool 1: us\n"), "{out}");
}

#[test]
fn route_refuses_a_host_no_site_serves() {
    let f = file(GEO);
    let (ok, out, err) = route(&f, &["--client", "192.0.2.7", "http://example.org/"]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("no site serves host \"example.org\": the request would be refused (421), never forwarded"),
        "{err}"
    );
    let (ok, _, err) = route(
        &f,
        &[
            "--client",
            "192.0.2.7",
            "--header",
            "nonsense",
            "http://a.example.com/",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("header \"nonsense\" is not NAME=VALUE"),
        "{err}"
    );
}

#[test]
fn check_describes_a_fleet_and_print_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "[server]\nhttp = [\"127.0.0.1:0\"]\n\
                [[origins]]\nname = \"o\"\nurl = \"http://127.0.0.1:9002\"\n\
                [[sites]]\nhosts = [\"example.com\"]\norigin = \"o\"\n\
                [cluster]\nname = \"pop-fra1\"\nnode = \"fra1-a\"\nlisten = \"127.0.0.1:7400\"\n\
                peers = [\"127.0.0.1:7400\", \"127.0.0.1:7401\"]\nhot_copies = true\npeer_timeout = \"500ms\"\n";
    let path = dir.path().join("edgecache.toml");
    std::fs::write(&path, text).expect("write");
    let out = edgecache(&["check"], &path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        summary.contains(
            "cluster pop-fra1: node fra1-a, peer listener 127.0.0.1:7400 (advertised 127.0.0.1:7400), 2 static peers, hot copies on non-owners"
        ),
        "{summary}"
    );
    let first = edgecache(&["check", "--print"], &path);
    let printed = String::from_utf8_lossy(&first.stdout).into_owned();
    for want in [
        "[cluster]\nname = \"pop-fra1\"\nnode = \"fra1-a\"\nlisten = \"127.0.0.1:7400\"\nadvertise = \"127.0.0.1:7400\"",
        "peers = [\"127.0.0.1:7400\", \"127.0.0.1:7401\"]",
        "lease_ttl = \"5s\"\nhot_copies = true\npeer_timeout = \"500ms\"",
    ] {
        assert!(printed.contains(want), "{want}:\n{printed}");
    }
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &printed).expect("write");
    let second = edgecache(&["check", "--print"], &again);
    let body = |t: &[u8]| {
        String::from_utf8_lossy(t)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&first.stdout), body(&second.stdout));
    // A fleet member must be in its own static list.
    std::fs::write(&path, text.replace("\"127.0.0.1:7400\", ", "")).expect("write");
    let out = edgecache(&["check"], &path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster.peers: must list this node's own advertise address 127.0.0.1:7400"),
        "{err}"
    );
}

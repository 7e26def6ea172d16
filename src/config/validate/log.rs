//! `[log]`: the access and error logs' destinations (paths relative to the configuration's
//! directory), their format and the default filter. Files are opened at start, not here:
//! `check` creates no file.

use std::path::Path;

use toml::Spanned;

use super::Checker;
use crate::config::raw::RawLog;
use crate::telemetry::{Destination, LogFormat, LogSettings};

/// `[log]`, each key checked alone.
pub(super) fn log(ck: &mut Checker<'_>, raw: &RawLog, base: &Path) -> LogSettings {
    let mut log = LogSettings::default();
    if let Some(a) = &raw.access {
        if let Some(d) = destination(ck, a, "log.access", base, true) {
            log.access = d;
        }
    }
    if let Some(e) = &raw.error {
        if let Some(d) = destination(ck, e, "log.error", base, false) {
            log.error = d;
        }
    }
    if let Some(f) = &raw.format {
        match f.get_ref().as_str() {
            "text" => log.format = LogFormat::Text,
            "json" => log.format = LogFormat::Json,
            other => ck.error(
                f.span(),
                "log.format",
                format!("{other:?} is not a log format (text or json)"),
            ),
        }
    }
    if let Some(l) = &raw.level {
        match tracing_subscriber::EnvFilter::try_new(l.get_ref()) {
            Ok(_) => log.level = Some(l.get_ref().clone()),
            Err(e) => ck.error(
                l.span(),
                "log.level",
                format!("{:?} is not a log filter: {e}", l.get_ref()),
            ),
        }
    }
    log
}

/// `stdout`, `stderr`, `off` (where `may_be_off`) or a file path.
fn destination(
    ck: &mut Checker<'_>,
    v: &Spanned<String>,
    key: &str,
    base: &Path,
    may_be_off: bool,
) -> Option<Destination> {
    match v.get_ref().as_str() {
        "stdout" => Some(Destination::Stdout),
        "stderr" => Some(Destination::Stderr),
        "off" if may_be_off => Some(Destination::Off),
        "off" => {
            ck.error(
                v.span(),
                key,
                "the error log cannot be turned off (RUST_LOG or log.level filters it)",
            );
            None
        }
        p if p.trim().is_empty() || p.ends_with('/') => {
            ck.error(v.span(), key, "must be stdout, stderr, off or a file path");
            None
        }
        p => Some(Destination::File(base.join(p))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{errors, MINIMAL};
    use crate::config::Config;
    use crate::telemetry::{Destination, LogFormat, LogSettings};

    fn load(section: &str) -> LogSettings {
        let text = format!("{MINIMAL}[log]\n{section}");
        match Config::from_toml(&text, "t.toml", Path::new("/etc/edgecache")) {
            Ok(c) => c.log,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_are_stdout_and_stderr_in_text() {
        assert_eq!(load(""), LogSettings::default());
        assert_eq!(LogSettings::default().access, Destination::Stdout);
        assert_eq!(LogSettings::default().error, Destination::Stderr);
    }

    #[test]
    fn files_are_relative_to_the_configuration() {
        let log = load(
            "access = \"logs/access.log\"\nerror = \"/var/log/edgecache/error.log\"\n\
             format = \"json\"\nlevel = \"edgecache=debug\"\n",
        );
        assert_eq!(
            log.access,
            Destination::File("/etc/edgecache/logs/access.log".into())
        );
        assert_eq!(
            log.error,
            Destination::File("/var/log/edgecache/error.log".into())
        );
        assert_eq!(log.format, LogFormat::Json);
        assert_eq!(log.level.as_deref(), Some("edgecache=debug"));
        assert_eq!(load("access = \"off\"\n").access, Destination::Off);
    }

    #[test]
    fn bad_values_are_reported_at_their_keys() {
        let e = errors(&format!(
            "{MINIMAL}[log]\naccess = \"\"\nerror = \"off\"\nformat = \"xml\"\nlevel = \"a=b=c\"\n"
        ));
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:8:10: log.access: must be"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("t.toml:9:9: log.error: the error log cannot be turned off"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("t.toml:10:10: log.format: \"xml\" is not a log format"),
            "{e:?}"
        );
        assert!(
            e[3].starts_with("t.toml:11:9: log.level: \"a=b=c\" is not a log filter"),
            "{e:?}"
        );
        let e = errors(&format!("{MINIMAL}[log]\nacess = \"off\"\n"));
        assert!(e[0].contains("log.acess: unknown key `acess`"), "{e:?}");
    }
}

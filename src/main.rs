//! The `edgecache` command: `run`, `check`, `route` and `demo`. All logic lives in the library; this
//! file parses arguments, sets up logging and the runtime, and reports errors for a person.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use edgecache::notify;
use edgecache::telemetry::{self, LogFormat};
use edgecache::Config;

/// jemalloc rather than the C library's allocator. An idle connection gives hyper's buffers
/// back (`server::park`); with the C library's allocator most of that memory stayed in the
/// process (5,000 idle connections: 14.8 KiB of resident memory each for 3.8 KiB in use),
/// while jemalloc returns freed pages to the system within a second (`.cargo/config.toml`).
/// Hit throughput was within noise of the C library's in the same benchmark run.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What each signal does to `run` (and `demo`), shown at the end of `--help`.
const SIGNALS: &str = "\
Signals (run, demo):
  SIGTERM, SIGINT  stop accepting, let in-flight requests finish within shutdown_grace, exit
  SIGHUP           reload: read the configuration file again and swap it in, keeping the
                   cache (as POST /reload on the admin listener); a bad file changes nothing
  SIGUSR1          reopen the [log] access and error files by their paths (logrotate's
                   postrotate); lines buffered before it go to the old file
  SIGUSR2          ignored (logged); reserved, never stops the process
  SIGQUIT          not handled: the default action (exit with a core dump)

Upgrade (server.upgrade_socket set): start the new binary with the same configuration; it
takes the listening sockets over from the running process, which then drains within
shutdown_grace and exits. No connection is refused; the new process starts with an empty
cache.

Environment:
  EDGECACHE_CONFIG       the configuration file when -c/--config is not given
                         (default /etc/edgecache/edgecache.toml)
  RUST_LOG               log filter, over [log] level (default info),
                         e.g. edgecache=debug,edgecache::access=off
  EDGECACHE_ADMIN_TOKEN  the admin bearer token when [admin] sets neither token nor token_env";

/// `--version`: `edgecache 0.1.0 (commit 0123456789ab, release)`.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EDGECACHE_COMMIT"),
    ", ",
    env!("EDGECACHE_PROFILE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "edgecache",
    version = VERSION,
    about = "An edge caching reverse proxy",
    after_help = SIGNALS
)]
struct Cli {
    /// Log format, over [log] format (default text); the level comes from RUST_LOG, else
    /// [log] level (default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// The configuration file, shared by `run`, `check` and `route`.
#[derive(clap::Args)]
struct ConfigFile {
    /// The configuration file; relative paths inside it are read from its directory.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        env = "EDGECACHE_CONFIG",
        default_value = "/etc/edgecache/edgecache.toml"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    #[command(after_help = SIGNALS)]
    Run {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Load and validate a configuration file and print what would be served; problems go to
    /// stderr as FILE:LINE:COLUMN: key: message (exit 1), warnings as FILE:LINE:COLUMN: warning:
    /// (exit 0).
    Check {
        #[command(flatten)]
        config: ConfigFile,
        /// Print the effective configuration instead, every default filled in, as TOML that
        /// check accepts again.
        #[arg(long)]
        print: bool,
    },
    /// Show which site, rule, route, pools and origins a request would get, and why, without
    /// sending anything.
    Route {
        #[command(flatten)]
        config: ConfigFile,
        /// The address the request comes from (the connection's peer).
        #[arg(long, value_name = "IP")]
        client: IpAddr,
        /// A request header, as NAME=VALUE; may be repeated.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// The request's URL, e.g. http://static.example.com/app.js
        url: String,
    },
    /// Start a sample origin and edgecache in front of it, and print commands to try.
    #[command(after_help = SIGNALS)]
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// The admin listener (metrics, purge, origins, reload), with a token made at start.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.map(|f| match f {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Check { config, print } => match Config::load(&config.path) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("{}", w.as_warning());
                }
                if print {
                    print!("{}", c.to_toml());
                } else {
                    println!("{}", c.summary());
                }
                ExitCode::SUCCESS
            }
            Err(e) => report_config(&e),
        },
        Command::Route {
            config,
            client,
            headers,
            url,
        } => {
            let config = match Config::load(&config.path) {
                Ok(c) => c,
                Err(e) => return report_config(&e),
            };
            match edgecache::dryrun::route(&config, client, &headers, &url) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => report(&e),
            }
        }
        Command::Run { config } => {
            let config = match Config::load(&config.path) {
                Ok(c) => c,
                Err(e) => return report_config(&e),
            };
            let mut log = config.log.clone();
            log.format = format.unwrap_or(log.format);
            let logs = match telemetry::init(&log) {
                Ok(l) => l,
                Err(e) => return report(&e),
            };
            for w in &config.warnings {
                tracing::warn!(warning = %w, "configuration");
            }
            raise_open_file_limit();
            let workers = config.server.workers;
            // Dropped at exit, after the runtime: what the access log buffered is written.
            run_runtime(workers, async move {
                let mut signals =
                    Signals::install().map_err(|e| format!("install signal handlers: {e}"))?;
                let node = edgecache::start(config)
                    .await
                    .map_err(|e| Box::new(e) as BoxError)?;
                if node.took_over() {
                    notify::ready_as_main_process();
                } else {
                    notify::ready();
                }
                if signals.wait_for_stop(Some(&node), &logs).await == Stop::Signal {
                    notify::stopping();
                }
                tracing::info!("shutting down");
                node.shutdown().await;
                logs.flush();
                Ok(())
            })
        }
        Command::Demo { http, https, admin } => {
            let log = telemetry::LogSettings {
                format: format.unwrap_or_default(),
                ..Default::default()
            };
            let logs = match telemetry::init(&log) {
                Ok(l) => l,
                Err(e) => return report(&e),
            };
            raise_open_file_limit();
            let dir = std::env::temp_dir().join(format!("edgecache-demo-{}", std::process::id()));
            let code = run_runtime(None, demo(http, https, admin, dir.clone(), &logs));
            logs.flush();
            // The configuration holds the admin token: leave nothing behind.
            let _ = std::fs::remove_dir_all(&dir);
            code
        }
    }
}

/// `edgecache demo`: the sample origin, its configuration written to `dir`, and a node.
async fn demo(
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    logs: &telemetry::Logs,
) -> Result<(), BoxError> {
    use edgecache::demo;
    let mut signals = Signals::install().map_err(|e| format!("install signal handlers: {e}"))?;
    let origin = demo::start_sample_origin(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut setup = demo::Setup {
        http,
        https,
        admin,
        origin,
        token: demo::token()?,
    };
    let (config, path) = demo::write_config(&dir, &setup)?;
    let node = edgecache::start(config).await?;
    (setup.http, setup.https) = (node.http_addrs()[0], node.https_addrs()[0]);
    setup.admin = node.admin_addr().unwrap_or(admin);
    println!("{}", demo::instructions(&setup, &path));
    notify::ready();
    signals.wait_for_stop(Some(&node), logs).await;
    notify::stopping();
    node.shutdown().await;
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Raises the soft limit on open files to the hard limit, as servers that hold many sockets
/// do (nginx's `worker_rlimit_nofile`, Go's runtime): client connections, origin connections
/// and the memory files of large stored bodies all count against it, and the usual soft
/// default of 1024 is far below what a cache node needs.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(current), Some(maximum)) = (lim.current, lim.maximum) else {
        return;
    };
    if current >= maximum {
        return;
    }
    let raised = Rlimit {
        current: Some(maximum),
        maximum: Some(maximum),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(from = current, to = maximum, "raised the open-file limit"),
        Err(e) => {
            tracing::warn!(error = %e, limit = current, "could not raise the open-file limit")
        }
    }
}

fn run_runtime(
    workers: Option<usize>,
    fut: impl std::future::Future<Output = Result<(), BoxError>>,
) -> ExitCode {
    // One worker: a current-thread runtime, every task in one FIFO queue. The multi-thread
    // scheduler keeps at most 256 tasks in a worker's own queue and moves half of them to the
    // shared queue when it overflows, which it then serves one task per ~60 polls; an HTTP/2
    // stream is a task, so 512 streams in flight left some of them waiting tens of
    // milliseconds (HTTP/2 p99.9 at 1 KiB: 23-35 ms multi-thread, 14 ms current-thread, with
    // 4% more requests/s, measured side by side on one pinned core). With several workers the
    // shared queue is checked every other poll, so an overflowed task waits about as long as
    // one in a worker's own queue.
    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers {
            b.worker_threads(n);
        }
        b.global_queue_interval(2);
        b
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => return report(&e),
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&*e),
    }
}

/// Prints configuration problems one per line, `FILE:LINE:COLUMN: key: what is wrong`.
fn report_config(e: &edgecache::config::Error) -> ExitCode {
    match e {
        edgecache::config::Error::Invalid(_) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        other => report(other),
    }
}

/// Prints an error and its sources for a person, and returns a failure exit code.
fn report(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("edgecache: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::FAILURE
}

/// The signals `run` and `demo` act on (listed in `--help`). They are installed before any
/// listener is bound, so from the first "listening" log line on none of them has its default
/// action, which for SIGHUP, SIGUSR1 and SIGUSR2 is to end the process and lose the cache.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Returns on SIGTERM or SIGINT, or when a new process took the listeners over (saying
    /// which). Meanwhile SIGHUP reloads the configuration (`node::Reloader`),
    /// SIGUSR1 reopens the log files (logrotate's signal for nginx-style servers) and SIGUSR2
    /// is logged and otherwise ignored.
    async fn wait_for_stop(
        &mut self,
        node: Option<&edgecache::Node>,
        logs: &telemetry::Logs,
    ) -> Stop {
        loop {
            tokio::select! {
                _ = self.term.recv() => return Stop::Signal,
                _ = self.int.recv() => return Stop::Signal,
                // A new process took the listeners over (server.upgrade_socket): drain as
                // for SIGTERM.
                _ = handed_over(node) => return Stop::HandedOver,
                _ = self.hup.recv() => match node {
                    // The reload logs what it did, or every problem.
                    Some(n) if n.reloadable() => {
                        let reloader = n.reloader();
                        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                    }
                    Some(n) => match n.reload_geo_database() {
                        Ok(Some(db)) => tracing::info!(database = %db, "SIGHUP: no configuration file; geo database reloaded"),
                        Ok(None) => tracing::info!("SIGHUP: no configuration file or geo database to reload"),
                        Err(e) => tracing::error!(error = %e, "geo database reload failed; keeping the one in use"),
                    },
                    None => tracing::info!("SIGHUP: nothing to reload yet"),
                },
                // Opening a file and writing out one buffer: short enough to do here.
                _ = self.usr1.recv() => match logs.reopen() {
                    Ok(()) if logs.files().next().is_none() => {
                        tracing::info!("SIGUSR1: no log files to reopen; logs go to stdout and stderr");
                    }
                    Ok(()) => tracing::info!("SIGUSR1: log files reopened"),
                    Err(e) => tracing::error!(error = %e, "SIGUSR1: a log file could not be reopened; its lines still go to the old file"),
                },
                _ = self.usr2.recv() => {
                    tracing::warn!("SIGUSR2 ignored: it has no meaning yet");
                }
            }
        }
    }
}

/// Why `wait_for_stop` returned.
#[derive(PartialEq, Eq)]
enum Stop {
    /// SIGTERM or SIGINT: the service stops.
    Signal,
    /// A new process took the listeners over and is the service now: the old one drains and
    /// exits without telling the service manager it stops.
    HandedOver,
}

/// Completes when a new process has taken the node's listeners over; never without a node.
async fn handed_over(node: Option<&edgecache::Node>) {
    match node {
        Some(n) => n.handed_over().await,
        None => std::future::pending().await,
    }
}

/// Elsewhere only Ctrl-C is known.
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn wait_for_stop(
        &mut self,
        _node: Option<&edgecache::Node>,
        _logs: &telemetry::Logs,
    ) -> Stop {
        let _ = tokio::signal::ctrl_c().await;
        Stop::Signal
    }
}

//! The `edgecache` command: `run`, `check` and `demo`. All logic lives in the library; this
//! file parses arguments, sets up logging and the runtime, and reports errors for a person.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use edgecache::telemetry::{self, LogFormat};
use edgecache::Config;

#[derive(Parser)]
#[command(name = "edgecache", version, about = "An edge caching reverse proxy")]
struct Cli {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    Run {
        #[arg(long, default_value = "config/edgecache.toml")]
        config: PathBuf,
    },
    /// Load and validate a configuration file and print what would be served.
    Check {
        #[arg(long, default_value = "config/edgecache.toml")]
        config: PathBuf,
    },
    /// Start a sample origin and edgecache in front of it, and print commands to try.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    };
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => report_config(&e),
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return report_config(&e),
            };
            telemetry::init(format);
            raise_open_file_limit();
            let workers = config.server.workers;
            run_runtime(workers, async move {
                let node = edgecache::start(config)
                    .await
                    .map_err(|e| Box::new(e) as BoxError)?;
                wait_for_signal(Some(&node)).await;
                tracing::info!("shutting down");
                node.shutdown().await;
                Ok(())
            })
        }
        Command::Demo { http, https } => {
            telemetry::init(format);
            raise_open_file_limit();
            run_runtime(None, async move {
                let origin =
                    edgecache::demo::start_sample_origin(SocketAddr::from(([127, 0, 0, 1], 0)))
                        .await?;
                let config = edgecache::demo::config(http, https, origin)?;
                let node = edgecache::start(config)
                    .await
                    .map_err(|e| Box::new(e) as BoxError)?;
                let (h, s) = (node.http_addrs()[0], node.https_addrs()[0]);
                println!("{}", edgecache::demo::instructions(h, s, origin));
                wait_for_signal(None).await;
                node.shutdown().await;
                Ok(())
            })
        }
    }
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

/// Waits for SIGTERM or SIGINT. SIGHUP meanwhile reads the geo database again (`node`).
async fn wait_for_signal(node: Option<&edgecache::Node>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return,
                _ = term.recv() => return,
                _ = hup.recv() => match node.map(|n| n.reload_geo_database()) {
                    Some(Ok(Some(db))) => tracing::info!(database = %db, "geo database reloaded"),
                    Some(Ok(None)) | None => tracing::info!("SIGHUP: no geo database to reload"),
                    Some(Err(e)) => tracing::error!(error = %e, "geo database reload failed; keeping the one in use"),
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = node;
        let _ = ctrl_c.await;
    }
}

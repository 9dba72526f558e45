//! `pgfleet`: check a pgfleet configuration, or watch a fleet's status.
//!
//! ```text
//! pgfleet check CONFIG [--connect]      validate CONFIG, print the effective settings
//!                                        (--connect: also connect to every server)
//! pgfleet status CONFIG [--watch]       start a fleet, print its status table
//!                                        (--watch: SIGHUP reloads CONFIG)
//! ```
//!
//! Exit codes: `0` success; `1` the fleet did not become ready in time (the
//! status table is printed anyway) or it could not start, or `check --connect`
//! could not connect to a server; `2` the configuration is unreadable or
//! invalid, or the command line is wrong.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `warn`).

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgfleet::{Config, Fleet};
use tracing_subscriber::EnvFilter;

/// Exit code of a configuration that cannot be read or is invalid (clap uses
/// the same code for a bad command line).
const EXIT_CONFIG: u8 = 2;
/// Exit code of a fleet that did not become ready, or could not start, or of a
/// `check --connect` that could not reach a server.
const EXIT_NOT_READY: u8 = 1;
/// Time between two tables of `status --watch`.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// ANSI: clear the screen and move the cursor home.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

/// Check a pgfleet configuration, or watch a fleet's status.
#[derive(Debug, Parser)]
#[command(name = "pgfleet", version, propagate_version = true)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file and print the effective settings as TOML.
    ///
    /// Every key is shown, defaults filled in; passwords (including those
    /// read from `${VAR}`) are printed as `***`. An invalid config prints the
    /// error, naming the key and its line, and exits with status 2.
    Check {
        /// The TOML config file.
        config: PathBuf,
        /// Also open one connection to every server of every cluster, the way
        /// the pools do (connect_timeout, TLS as configured, authentication),
        /// and print what failed; exits with status 1 if any server fails.
        #[arg(long)]
        connect: bool,
    },
    /// Start a fleet and print its status table.
    ///
    /// One row per server: role, health, replay/insert LSN, lag in bytes and
    /// time, read weight, pool (in use/idle/open/max), lease counters, restarts.
    /// Waits for every server's first probe (at most --wait) before printing;
    /// exits with status 1 if the fleet was not ready by then (the table is
    /// printed anyway), 2 if the config is invalid.
    Status {
        /// The TOML config file.
        config: PathBuf,
        /// Print the table again every second until Ctrl-C, then shut the
        /// fleet down and exit 0.
        #[arg(short, long)]
        watch: bool,
        /// Longest to wait for the first probes of every server and a known
        /// primary before the first table (humantime: "500ms", "10s", "1m").
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
        wait: Duration,
    },
}

/// A humantime duration of at most a day (as the config's durations).
fn parse_duration(text: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(24 * 60 * 60);
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d > MAX {
        return Err(format!("at most {}", humantime::format_duration(MAX)));
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .init();
    match cli.command {
        Command::Check { config, connect } => check(&config, connect).await,
        Command::Status {
            config,
            watch,
            wait,
        } => status(&config, watch, wait).await,
    }
}

/// Loads `path`, or prints why it cannot and returns the exit code to use.
fn load(path: &Path) -> Result<Config, ExitCode> {
    // ConfigError names the key and line, and never holds a password.
    Config::from_path(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `pgfleet check`.
async fn check(path: &Path, connect: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Config's Serialize writes every URL redacted.
    let toml = match toml::to_string_pretty(&config) {
        Ok(toml) => toml,
        Err(e) => {
            eprintln!("error: printing the config as TOML: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = format!(
        "# {}: valid. Effective settings, defaults filled in, passwords shown as ***.\n\n{toml}",
        path.display()
    );
    if emit(&out).is_err() {
        return ExitCode::FAILURE;
    }
    if !connect {
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    let mut lines = String::from("\n# connections\n");
    for cluster in cluster_names(&config) {
        let Some(one) = config.cluster(cluster) else {
            continue;
        };
        let names = std::iter::once(one.primary.name.as_str())
            .chain(one.replicas.iter().map(|r| r.name.as_str()));
        for server in names {
            // Errors name the server and what failed; never a password.
            let result = match pgfleet::check_cluster_server(&config, cluster, server).await {
                Ok(true) => "ok (TLS)".to_owned(),
                Ok(false) => "ok (no TLS)".to_owned(),
                Err(e) => {
                    failed += 1;
                    format!("FAILED: {e}")
                }
            };
            lines.push_str(&format!("# {cluster}/{server}: {result}\n"));
        }
    }
    if emit(&lines).is_err() {
        return ExitCode::FAILURE;
    }
    if failed > 0 {
        eprintln!("error: {failed} server(s) could not be reached");
        return ExitCode::from(EXIT_NOT_READY);
    }
    ExitCode::SUCCESS
}

/// Every cluster's name: the top-level one first, then `[clusters.NAME]` in order.
fn cluster_names(config: &Config) -> impl Iterator<Item = &str> {
    std::iter::once(pgfleet::DEFAULT_CLUSTER).chain(config.clusters.keys().map(String::as_str))
}

/// `pgfleet status`.
async fn status(path: &Path, watch: bool, wait: Duration) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let fleet = match Fleet::start(config).await {
        Ok(fleet) => fleet,
        Err(pgfleet::Error::Config(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: starting the fleet: {e}");
            return ExitCode::from(EXIT_NOT_READY);
        }
    };
    let code = if watch {
        watch_status(&fleet, path, wait).await
    } else {
        let ready = fleet.wait_ready(wait).await;
        let printed = emit(&format!("{}\n", fleet.status()));
        if !ready {
            eprintln!(
                "error: the fleet was not ready after {} (a server not probed yet, or no primary)",
                humantime::format_duration(wait)
            );
        }
        if ready && printed.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_NOT_READY)
        }
    };
    fleet.shutdown().await;
    code
}

/// `pgfleet status --watch`: a table every second until Ctrl-C; SIGHUP reloads the
/// configuration file (a rejected one leaves the running configuration in force).
async fn watch_status(fleet: &Fleet, path: &Path, wait: Duration) -> ExitCode {
    // Polled from here on, so Ctrl-C is caught from the first wait.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: SIGHUP reloads are off: {e}");
            None
        }
    };
    let terminal = io::stdout().is_terminal();
    tokio::select! {
        _ = &mut ctrl_c => return ExitCode::SUCCESS,
        ready = fleet.wait_ready(wait) => if !ready {
            eprintln!(
                "warning: the fleet was not ready after {}; watching anyway",
                humantime::format_duration(wait)
            );
        },
    }
    let mut first = true;
    loop {
        let table = fleet.status().to_string();
        let out = if terminal {
            format!("{CLEAR_SCREEN}{table}\n\n(every {WATCH_EVERY:?}; Ctrl-C to stop)\n")
        } else if first {
            format!("{table}\n")
        } else {
            // Not a terminal (a pipe or file): tables one after another.
            format!("\n{table}\n")
        };
        first = false;
        if emit(&out).is_err() {
            // Stdout closed (e.g. piped into `head`): nobody is watching.
            return ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = &mut ctrl_c => return ExitCode::SUCCESS,
            () = tokio::time::sleep(WATCH_EVERY) => {}
            Some(()) = async { hangup.as_mut()?.recv().await } => reload(fleet, path).await,
        }
    }
}

/// SIGHUP: re-reads the configuration file and applies it; says on stderr what changed
/// or why it was rejected.
async fn reload(fleet: &Fleet, path: &Path) {
    let config = match pgfleet::Config::from_path(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("reload rejected, the running configuration stays: {e}");
            return;
        }
    };
    match fleet.reload(config).await {
        Ok(r) => eprintln!(
            "reloaded {}: kept {:?}, resized {:?}, replaced {:?}, added {:?}, removed {:?}",
            path.display(),
            r.kept,
            r.resized,
            r.replaced,
            r.added,
            r.removed
        ),
        Err(e) => eprintln!("reload rejected, the running configuration stays: {e}"),
    }
}

/// Writes `text` to stdout and flushes it. Errors (a closed pipe) are
/// returned, not panicked on as `print!` would.
fn emit(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

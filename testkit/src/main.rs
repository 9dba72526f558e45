//! `pgfleet-testkit up [--replicas N] [--tls]`: start a local cluster, print its pgfleet config,
//! run until Ctrl-C or SIGTERM, then stop everything.

use std::process::ExitCode;

use pgfleet_testkit::{LocalCluster, MAX_REPLICAS};

/// The usage text.
const USAGE: &str = "\
usage: pgfleet-testkit up [--replicas N] [--tls]
       pgfleet-testkit --help

  up              start a local PostgreSQL primary and N streaming replicas (default 2, at most 4),
                  each behind a TCP proxy; print a pgfleet TOML config for it on stdout;
                  run until Ctrl-C or SIGTERM, then stop the servers and remove their files.
    --tls         the servers also accept TLS, with a certificate for localhost and 127.0.0.1
                  signed by a fresh CA; the printed config requires TLS and verifies it
                  ([fleet.tls] sslmode verify-full, sslrootcert the CA file; pgfleet's
                  feature tls).

environment:
  PG_BIN                        directory of initdb/pg_ctl/pg_basebackup (default: newest
                                /usr/lib/postgresql/*/bin, then PATH)
  PGFLEET_TESTKIT_MAX_CLUSTERS  clusters allowed at once on this machine (default 3)";

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    /// Print usage and exit 0.
    Help,
    /// Start a cluster.
    Up {
        /// How many replicas.
        replicas: usize,
        /// Whether the servers accept TLS and the config requires it.
        tls: bool,
    },
}

/// Parses the arguments after the program name.
fn parse(args: &[String]) -> Result<Cmd, String> {
    let mut it = args.iter().map(String::as_str);
    match it.next() {
        Some("-h" | "--help" | "help") => Ok(Cmd::Help),
        Some("up") => {
            let mut replicas = 2;
            let mut tls = false;
            while let Some(arg) = it.next() {
                let value = match arg {
                    "--tls" => {
                        tls = true;
                        continue;
                    }
                    "--replicas" => it.next().ok_or("--replicas needs a number")?,
                    _ if arg.starts_with("--replicas=") => &arg["--replicas=".len()..],
                    "-h" | "--help" => return Ok(Cmd::Help),
                    _ => return Err(format!("unexpected argument {arg:?}")),
                };
                replicas = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_REPLICAS)
                    .ok_or_else(|| {
                        format!("--replicas takes 0 to {MAX_REPLICAS}, not {value:?}")
                    })?;
            }
            Ok(Cmd::Up { replicas, tls })
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("missing command".to_owned()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (replicas, tls) = match parse(&args) {
        Ok(Cmd::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Cmd::Up { replicas, tls }) => (replicas, tls),
        Err(e) => {
            eprintln!("pgfleet-testkit: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgfleet-testkit: building the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(up(replicas, tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgfleet-testkit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the cluster, prints the config, waits for a signal; the cluster is dropped (stopped and
/// removed) on return.
async fn up(replicas: usize, tls: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Listen before starting, so a signal during startup still tears down cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cluster = tokio::select! {
        c = LocalCluster::builder().replicas(replicas).tls(tls).start() => c?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let config = match tls {
        true => cluster
            .pgfleet_tls_toml()
            .ok_or_else(|| anyhow::anyhow!("a cluster started with TLS has no CA"))?,
        false => cluster.pgfleet_toml(),
    };
    println!("{config}");
    eprintln!("# cluster dir: {}", cluster.dir().display());
    if let Some(ca) = cluster.ca_cert_path() {
        eprintln!("# CA certificate (sslrootcert): {}", ca.display());
    }
    for node in cluster.nodes() {
        eprintln!(
            "# {}: server 127.0.0.1:{}, proxy 127.0.0.1:{}, superuser {}, log {}",
            node.name(),
            node.port(),
            node.proxy_port(),
            node.superuser_url(),
            node.log_file().display()
        );
    }
    eprintln!("# running; Ctrl-C or SIGTERM stops the cluster");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("# stopping");
    drop(cluster);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_arguments() {
        let up = |replicas, tls| Ok(Cmd::Up { replicas, tls });
        assert_eq!(parse(&args("up")), up(2, false));
        assert_eq!(parse(&args("up --replicas 0")), up(0, false));
        assert_eq!(parse(&args("up --replicas=4")), up(4, false));
        assert_eq!(parse(&args("up --tls")), up(2, true));
        assert_eq!(parse(&args("up --tls --replicas 1")), up(1, true));
        assert_eq!(parse(&args("up --replicas=3 --tls")), up(3, true));
        assert!(parse(&args("up --tls=yes")).is_err());
        assert_eq!(parse(&args("--help")), Ok(Cmd::Help));
        assert!(parse(&args("up --replicas 5")).is_err());
        assert!(parse(&args("up --replicas")).is_err());
        assert!(parse(&args("up --bogus")).is_err());
        assert!(parse(&args("down")).is_err());
        assert!(parse(&[]).is_err());
    }
}

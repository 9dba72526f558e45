//! The chaos suite: every fault scenario, in sequence, each on its own local cluster
//! (primary + 2 replicas) with the checker's workload running through the fault.
//!
//! `cargo run --release --example chaos` runs them all (about 2 minutes) and prints one
//! row per scenario: leases (in all, and per server: primary/replica1/replica2), writes
//! acknowledged, writes lost, stale reads, hung leases, the longest lease wait, the time to
//! leave rotation and to serve again, and errors by kind. Its last line is `chaos: lost writes N, stale reads N, hung leases N`; it exits
//! non-zero if any of them is not 0 or a scenario's own check failed.
//!
//! `cargo run --release --example chaos -- replica_kill9 primary_restart` runs only the
//! scenarios named. The workload and the scenarios live in `examples/chaos/checker.rs`,
//! shared with the tests `tests/chaos_*.rs`.

#[path = "chaos/checker.rs"]
mod checker;

use std::process::ExitCode;
use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = if args.is_empty() {
        checker::SCENARIOS.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    if let Some(bad) = names.iter().find(|n| !checker::SCENARIOS.contains(n)) {
        eprintln!(
            "no scenario {bad:?}; scenarios: {}",
            checker::SCENARIOS.join(" ")
        );
        return ExitCode::from(2);
    }

    let began = Instant::now();
    let mut reports = Vec::new();
    let mut could_not_run = Vec::new();
    for name in names {
        println!(">>> {name}");
        match checker::run(name).await {
            Ok(r) => {
                println!("{}\n", r.describe());
                reports.push(r);
            }
            Err(e) => {
                println!("{name}: could not run: {e:#}\n");
                could_not_run.push(name);
            }
        }
    }

    println!("{}", checker::Report::header());
    for r in &reports {
        println!("{}", r.row());
    }
    for name in &could_not_run {
        println!("{name:<17} could not run");
    }
    let lost: u64 = reports.iter().map(|r| r.lost).sum();
    let stale: u64 = reports.iter().map(|r| r.stale).sum();
    let hung: u64 = reports.iter().map(|r| r.hung + r.hung_queries).sum();
    let failed = reports.iter().filter(|r| !r.failures.is_empty()).count() + could_not_run.len();
    println!(
        "{} scenarios in {:.0?}; {failed} with failed checks",
        reports.len() + could_not_run.len(),
        began.elapsed()
    );
    println!("chaos: lost writes {lost}, stale reads {stale}, hung leases {hung}");
    if lost > 0 || stale > 0 || hung > 0 || failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

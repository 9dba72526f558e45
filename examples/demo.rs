//! The fleet at work: a local replicated cluster, a mixed workload, and faults.
//!
//! `cargo run --example demo` starts a primary and two replicas through the testkit,
//! starts a fleet on them, and runs writers, read-your-writes readers and session
//! readers for about 20 seconds while it pauses replay on one replica and kills the
//! other. It prints the status table every second and ends with a summary; it exits
//! non-zero if any read was stale (checked on the data each read returned).
//!
//! `cargo run --example demo -- --config pgfleet.toml` runs the same workload against
//! an existing cluster, without faults. The config's application role needs to be able
//! to create a table named `pgfleet_demo`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgfleet::{Config, Consistency, Fleet, Intent, Role};
use pgfleet_testkit::LocalCluster;

const WRITERS: i32 = 8;
const SESSION_READERS: usize = 4;
const EVENTUAL_READERS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(20);

/// What the workload saw.
#[derive(Default)]
struct Tally {
    /// Leases granted (failed attempts are counted in `errors`).
    leases: AtomicU64,
    writes: AtomicU64,
    ryw_reads: AtomicU64,
    ryw_on_replicas: AtomicU64,
    fallbacks: AtomicU64,
    stale: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, e: &pgfleet::Error) {
        let kind = match (e.kind(), e.sqlstate()) {
            (k, Some(code)) => format!("{k}/{code}"),
            ("Postgres", None) => "Postgres/connection".to_owned(),
            (k, None) => k.to_owned(),
        };
        *self
            .errors
            .lock()
            .expect("tally lock")
            .entry(kind)
            .or_default() += 1;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, cluster) = match args.as_slice() {
        [] => {
            println!("starting a local cluster (primary + 2 replicas)...");
            let cluster = LocalCluster::builder().replicas(2).start().await?;
            let toml = cluster.pgfleet_toml_with(
                "[fleet]\nprobe_interval = \"100ms\"\nprobe_timeout = \"500ms\"\nfailure_threshold = 3\ndown_after = \"1s\"\nrestart = { min_backoff = \"200ms\", max_backoff = \"2s\" }\n\n[consistency]\nryw_wait = \"100ms\"",
            );
            (Config::from_toml_str(&toml)?, Some(cluster))
        }
        [flag, path] if flag == "--config" => (Config::from_path(path)?, None),
        _ => {
            eprintln!("usage: demo [--config FILE]");
            std::process::exit(2);
        }
    };
    let fleet = Fleet::start(config).await?;
    anyhow::ensure!(
        fleet.wait_ready(Duration::from_secs(30)).await,
        "fleet not ready:\n{}",
        fleet.status()
    );
    setup(&fleet).await?;
    println!("{}\n", fleet.status());

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..WRITERS {
        tasks.push(tokio::spawn(writer(
            fleet.clone(),
            id,
            tally.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..SESSION_READERS {
        tasks.push(tokio::spawn(session_reader(
            fleet.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }
    for _ in 0..EVENTUAL_READERS {
        tasks.push(tokio::spawn(eventual_reader(
            fleet.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }

    let started = Instant::now();
    let mut step = 0;
    while started.elapsed() < RUN_FOR {
        tokio::time::sleep(Duration::from_secs(1)).await;
        step += 1;
        if let Some(c) = &cluster {
            match step {
                4 => {
                    println!(">>> pausing replay on replica1: it leaves read-your-writes rotation");
                    c.pause_replay(c.replica(0)).await?;
                }
                8 => {
                    println!(">>> resuming replay on replica1");
                    c.resume_replay(c.replica(0)).await?;
                }
                11 => {
                    println!(">>> kill -9 replica2: it leaves rotation; its actor is restarted");
                    c.kill9(c.replica(1)).await?;
                }
                14 => {
                    println!(">>> starting replica2 again");
                    c.start(c.replica(1)).await?;
                }
                _ => {}
            }
        }
        println!("t={step:>2}s\n{}\n", fleet.status());
    }
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await?;
    }
    let status = fleet.status();
    fleet.shutdown().await;

    let leases = tally.leases.load(Ordering::Relaxed);
    let ryw = tally.ryw_reads.load(Ordering::Relaxed).max(1);
    let on_replicas = tally.ryw_on_replicas.load(Ordering::Relaxed);
    let stale = tally.stale.load(Ordering::Relaxed);
    let errors = tally.errors.lock().expect("tally lock").clone();
    println!("summary");
    for s in &status.servers {
        println!(
            "  {:<10} leases {:>7}  fallbacks {:>6}  restarts {}",
            s.name, s.leases, s.fallbacks, s.restarts
        );
    }
    println!(
        "  writes acknowledged: {}",
        tally.writes.load(Ordering::Relaxed)
    );
    println!("  errors by kind: {errors:?}");
    println!("leases: {leases}");
    println!(
        "ryw served by replicas: {:.1}%",
        on_replicas as f64 * 100.0 / ryw as f64
    );
    println!("fallbacks: {}", tally.fallbacks.load(Ordering::Relaxed));
    println!("stale reads: {stale}");
    println!("errors: {}", errors.values().sum::<u64>());
    if stale > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn setup(fleet: &Fleet) -> anyhow::Result<()> {
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(
        "DROP TABLE IF EXISTS pgfleet_demo; \
         CREATE TABLE pgfleet_demo (k int PRIMARY KEY, v bigint NOT NULL); \
         INSERT INTO pgfleet_demo SELECT g, 0 FROM generate_series(0, 63) g;",
    )
    .await
    .context("creating the demo table")?;
    let token = w.commit_token().await?;
    drop(w);
    // Readers start at once: let every replica have the table first (eventual reads
    // would otherwise be right to say it does not exist yet).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = fleet.status();
        let caught_up = status
            .servers
            .iter()
            .filter(|s| s.role == Role::Replica)
            .all(|s| s.lsn.is_some_and(|l| l >= token.lsn()));
        if caught_up {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "replicas did not replay the setup:\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bumps its own row, then reads it back with read-your-writes: the read must return
/// exactly the value written (only this writer touches the row).
async fn writer(fleet: Fleet, id: i32, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let written = async {
            let mut w = fleet.lease(Intent::Write).await?;
            tally.leases.fetch_add(1, Ordering::Relaxed);
            let row = w
                .query_one(
                    "UPDATE pgfleet_demo SET v = v + 1 WHERE k = $1 RETURNING v",
                    &[&id],
                )
                .await
                .map_err(|e| w.error(e))?;
            let token = w.commit_token().await?;
            Ok::<_, pgfleet::Error>((row.get::<_, i64>(0), token))
        }
        .await;
        let (v, token) = match written {
            Ok(x) => x,
            Err(e) => {
                tally.error(&e);
                continue;
            }
        };
        tally.writes.fetch_add(1, Ordering::Relaxed);
        let read = async {
            let r = fleet.lease(Intent::read_after(&token)).await?;
            tally.leases.fetch_add(1, Ordering::Relaxed);
            let row = r
                .query_one("SELECT v FROM pgfleet_demo WHERE k = $1", &[&id])
                .await
                .map_err(|e| r.error(e))?;
            Ok::<_, pgfleet::Error>((row.get::<_, i64>(0), r.role(), r.is_fallback()))
        }
        .await;
        match read {
            Ok((seen, role, fallback)) => {
                tally.ryw_reads.fetch_add(1, Ordering::Relaxed);
                if role == Role::Replica {
                    tally.ryw_on_replicas.fetch_add(1, Ordering::Relaxed);
                }
                if fallback {
                    tally.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                if seen != v {
                    tally.stale.fetch_add(1, Ordering::Relaxed);
                    eprintln!("STALE: writer {id} wrote {v}, read {seen}");
                }
            }
            Err(e) => tally.error(&e),
        }
    }
}

/// A session reading every writer's row: no value ever goes down (monotonic reads), for
/// any row, whichever server serves the read.
async fn session_reader(fleet: Fleet, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let session = fleet.session();
    let mut seen: BTreeMap<i32, i64> = BTreeMap::new();
    while !stop.load(Ordering::Acquire) {
        let read = async {
            let r = session.lease(Intent::read()).await?;
            tally.leases.fetch_add(1, Ordering::Relaxed);
            let rows = r
                .query("SELECT k, v FROM pgfleet_demo", &[])
                .await
                .map_err(|e| r.error(e))?;
            let values: Vec<(i32, i64)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
            Ok::<_, pgfleet::Error>((values, r.is_fallback()))
        }
        .await;
        match read {
            Ok((values, fallback)) => {
                if fallback {
                    tally.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                for (k, v) in values {
                    let last = seen.entry(k).or_insert(v);
                    if v < *last {
                        tally.stale.fetch_add(1, Ordering::Relaxed);
                        eprintln!("STALE: session read row {k} = {v} after seeing {last}");
                    }
                    *last = (*last).max(v);
                }
            }
            Err(e) => tally.error(&e),
        }
    }
}

/// Plain eventual reads: spread over fresh replicas.
async fn eventual_reader(fleet: Fleet, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let read = async {
            let r = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
            tally.leases.fetch_add(1, Ordering::Relaxed);
            r.query_one("SELECT sum(v) FROM pgfleet_demo", &[])
                .await
                .map_err(|e| r.error(e))?;
            Ok::<_, pgfleet::Error>(r.is_fallback())
        }
        .await;
        match read {
            Ok(true) => {
                tally.fallbacks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => tally.error(&e),
        }
    }
}

//! End-to-end benchmark: what pgfleet costs and what its read-your-writes buys.
//!
//! `cargo run --release --example bench` (about 4 minutes; `-- --quick` for a smoke run)
//! starts a testkit cluster (a primary and two streaming replicas), fills
//! `kv(k int primary key, v bigint)` with 10 000 rows, and measures:
//!
//! 1. **Lease overhead** in process: `fleet.lease(Read(Eventual))` + drop against the bare
//!    pool's `get()` + drop, sequentially and from 64 tasks (no query), interleaved.
//! 2. **End-to-end point reads** (`SELECT v FROM kv WHERE k = $1`, one round trip with
//!    `query_typed`) at 1, 16 and 64 concurrent tasks through a fleet whose only read
//!    target is replica1 against a bare deadpool pool on replica1 (both 16 connections),
//!    interleaved over several rounds; then, for information, through a fleet over both
//!    replicas against bare pools on both taken in turn.
//! 3. **Read-your-writes**: writer sessions update their own row, take the commit token and
//!    read the row back, with 8 and 64 sessions, replicas streaming freely and with
//!    `recovery_min_apply_delay = 20ms`; pgfleet against the policies it replaces (poll,
//!    pick-one, time window: see `bench/baseline.rs`), all on the same workload.
//!
//! It prints the tables, writes `target/bench/bench.csv`, `target/bench/throughput.svg`
//! and `target/bench/ryw.svg`, and ends with one summary line. It exits non-zero if a
//! pgfleet read-your-writes read returned a stale value.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pgfleet::{Config, Consistency, Fleet, Intent, Role};
use pgfleet_testkit::LocalCluster;
use tokio_postgres::types::Type;

#[path = "bench/baseline.rs"]
mod baseline;
#[path = "bench/chart.rs"]
mod chart;

use baseline::{BarePool, Baseline, Policy};

/// Rows in `kv`.
const ROWS: i32 = 10_000;
/// Connections per pool, bare and pgfleet alike.
const POOL: usize = 16;
/// Concurrency levels of the end-to-end reads.
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Alternating slices per side in one end-to-end run.
const SLICES: usize = 10;
/// Writer sessions of the read-your-writes runs.
const SESSIONS: [usize; 2] = [8, 64];
/// Replica apply delays of the read-your-writes runs.
const DELAYS_MS: [u64; 2] = [0, 20];
/// Tasks of the concurrent lease micro-benchmark.
const MICRO_TASKS: usize = 64;

pub(crate) const READ_SQL: &str = "SELECT v FROM kv WHERE k = $1";
pub(crate) const WRITE_SQL: &str = "UPDATE kv SET v = v + 1 WHERE k = $1 RETURNING v";

/// How long each phase runs.
struct Plan {
    micro_ops: usize,
    micro_rounds: usize,
    rounds: usize,
    phase: Duration,
    info_phase: Duration,
    ryw_phase: Duration,
    settle: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                micro_ops: 5_000,
                micro_rounds: 2,
                rounds: 2,
                phase: Duration::from_millis(300),
                info_phase: Duration::from_millis(300),
                ryw_phase: Duration::from_millis(500),
                settle: Duration::from_millis(300),
            }
        } else {
            Plan {
                micro_ops: 50_000,
                micro_rounds: 5,
                rounds: 5,
                phase: Duration::from_secs(5),
                info_phase: Duration::from_secs(3),
                ryw_phase: Duration::from_secs(4),
                settle: Duration::from_secs(1),
            }
        }
    }
}

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(run(Plan::new(quick)));
    drop(rt);
    match outcome {
        Ok(o) => {
            if o.stale > 0 {
                eprintln!(
                    "bench: FAILED: pgfleet served {} stale read-your-writes reads",
                    o.stale
                );
            }
            println!("{}", o.summary);
            if o.stale > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `main` needs once the cluster is gone.
struct Outcome {
    summary: String,
    stale: u64,
}

async fn run(plan: Plan) -> Result<Outcome> {
    let started = Instant::now();
    progress("starting a cluster: primary + 2 replicas");
    let cluster = LocalCluster::builder()
        .replicas(2)
        .start()
        .await
        .context("starting the testkit cluster")?;
    let setup = cluster.app_client(cluster.primary()).await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE kv(k int PRIMARY KEY, v bigint NOT NULL); \
             INSERT INTO kv SELECT g, 0 FROM generate_series(0, {}) g; ANALYZE kv",
            ROWS - 1
        ))
        .await
        .context("creating kv")?;
    drop(setup);
    cluster.wait_all_replayed(Duration::from_secs(60)).await?;

    let mut csv = Csv::default();

    // Bare pools, as an application without pgfleet has them. Both sides connect straight
    // to the servers, not through the testkit's fault-injection proxies.
    let bare_r1 = baseline::pool(&cluster.replica(0).direct_url(), POOL)?;
    let bare_r2 = baseline::pool(&cluster.replica(1).direct_url(), POOL)?;
    let bare_primary = baseline::pool(&cluster.primary().direct_url(), POOL)?;
    let bare_primary_read = baseline::pool(&cluster.primary().direct_url(), POOL)?;
    for p in [&bare_r1, &bare_r2, &bare_primary, &bare_primary_read] {
        baseline::warm(p, POOL).await?;
    }

    // ---- Fleet with replica1 as its only read target.
    let single = start_fleet(&cluster, true).await?;
    warm_fleet(&single, POOL, false).await?;

    // ---- 1. Lease overhead, in process.
    let micro = micro_section(&plan, &single, &bare_r1).await?;
    print_micro(&micro, &mut csv);

    // ---- 2. End-to-end point reads.
    let bare = Reader::Bare(bare_r1.clone());
    let fleet1 = Reader::Fleet(single.clone());
    let mut overhead = Vec::new();
    for &c in &CONCURRENCY {
        let mut row = OverheadRow {
            concurrency: c,
            bare: Vec::new(),
            fleet: Vec::new(),
            ratios: Vec::new(),
        };
        for round in 0..plan.rounds {
            // Each run is SLICES short slices per side in ABBA order, so drift within
            // the run (the machine warming up, a checkpoint) falls on both sides alike.
            let slice = plan.phase / SLICES as u32;
            let (mut bs, mut fs) = (Vec::new(), Vec::new());
            for k in 0..SLICES {
                let fleet_first = (k + round) % 4 == 1 || (k + round) % 4 == 2;
                if fleet_first {
                    fs.push(read_phase(&fleet1, c, slice).await?);
                    bs.push(read_phase(&bare, c, slice).await?);
                } else {
                    bs.push(read_phase(&bare, c, slice).await?);
                    fs.push(read_phase(&fleet1, c, slice).await?);
                }
            }
            let (b, f) = (Phase::merge(bs), Phase::merge(fs));
            progress(&format!(
                "reads c={c} round {}/{}: bare {:.0}/s fleet {:.0}/s ratio {:.3}",
                round + 1,
                plan.rounds,
                b.rps(),
                f.rps(),
                f.rps() / b.rps()
            ));
            row.ratios.push(f.rps() / b.rps());
            row.bare.push(b);
            row.fleet.push(f);
        }
        overhead.push(row);
    }
    // One round each: a new session per read (as the HTTP layer resumes one per
    // request), whose release reads the replica's position on the connection.
    let per_session = Reader::FleetSession(single.clone());
    let mut sessions = Vec::new();
    for &c in &CONCURRENCY {
        let b = read_phase(&bare, c, plan.info_phase).await?;
        let f = read_phase(&per_session, c, plan.info_phase).await?;
        progress(&format!(
            "reads c={c} with a session per read: bare {:.0}/s fleet {:.0}/s",
            b.rps(),
            f.rps()
        ));
        sessions.push(InfoRow {
            concurrency: c,
            bare: b,
            fleet: f,
        });
    }
    let left = single.shutdown().await;
    if left > 0 {
        bail!("{left} leases of the single-replica fleet were still out at shutdown");
    }
    drop(single);

    // ---- Fleet over both replicas: for information, then read-your-writes.
    let both = start_fleet(&cluster, false).await?;
    warm_fleet(&both, 2 * POOL, true).await?;
    let fleet2 = Reader::Fleet(both.clone());
    let bare_rr = Reader::BareRoundRobin(
        Arc::new([bare_r1.clone(), bare_r2.clone()]),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut info = Vec::new();
    for &c in &CONCURRENCY {
        let b = read_phase(&bare_rr, c, plan.info_phase).await?;
        let f = read_phase(&fleet2, c, plan.info_phase).await?;
        progress(&format!(
            "reads c={c} over both replicas: bare round robin {:.0}/s fleet {:.0}/s",
            b.rps(),
            f.rps()
        ));
        info.push(InfoRow {
            concurrency: c,
            bare: b,
            fleet: f,
        });
    }
    print_overhead(&overhead, &sessions, &info, &mut csv);

    // ---- 3. Read-your-writes.
    let base = Arc::new(Baseline::new(
        bare_primary.clone(),
        bare_primary_read.clone(),
        vec![bare_r1.clone(), bare_r2.clone()],
    ));
    let mut ryw = Vec::new();
    for &delay in &DELAYS_MS {
        for r in cluster.replicas() {
            cluster
                .set_apply_delay(r, Duration::from_millis(delay))
                .await?;
        }
        // Let replay catch up to the new regime and the fleet's probes see it.
        tokio::time::sleep(plan.settle).await;
        for &sessions in &SESSIONS {
            let before = both.status();
            let mut t = ryw_fleet(&both, sessions, plan.ryw_phase).await?;
            let after = both.status();
            t.checks = after.wait_probes - before.wait_probes;
            let waited = after.ryw_waited - before.ryw_waited;
            progress(&format!(
                "ryw {sessions} sessions delay {delay}ms pgfleet: {} reads, {:.1}% on replicas",
                t.reads,
                t.replica_pct()
            ));
            ryw.push(RywRun {
                policy: "pgfleet",
                sessions,
                delay_ms: delay,
                tally: t,
                router_waits: Some(waited),
            });
            for policy in Policy::ALL {
                let t = ryw_baseline(&base, policy, sessions, plan.ryw_phase).await?;
                progress(&format!(
                    "ryw {sessions} sessions delay {delay}ms {}: {} reads, {:.1}% on replicas",
                    policy.name(),
                    t.reads,
                    t.replica_pct()
                ));
                ryw.push(RywRun {
                    policy: policy.name(),
                    sessions,
                    delay_ms: delay,
                    tally: t,
                    router_waits: None,
                });
            }
        }
    }
    print_ryw(&ryw, &mut csv);
    let left = both.shutdown().await;
    if left > 0 {
        bail!("{left} leases of the two-replica fleet were still out at shutdown");
    }
    drop(both);
    drop(base);
    for p in [bare_r1, bare_r2, bare_primary, bare_primary_read] {
        p.close();
    }

    // ---- Summary, files.
    let x = micro
        .iter()
        .map(|m| median(&m.ratios))
        .fold(f64::NAN, f64::max);
    let y = overhead
        .iter()
        .map(|r| median(&r.ratios))
        .fold(f64::NAN, f64::min);
    let fleet_runs = || ryw.iter().filter(|r| r.policy == "pgfleet");
    let z = fleet_runs()
        .map(|r| r.tally.replica_pct())
        .fold(f64::NAN, f64::min);
    let a = fleet_runs()
        .find(|r| r.sessions == 8 && r.delay_ms == 20)
        .map_or(f64::NAN, |r| r.tally.wait_ms(0.50));
    let checks = |sessions: usize| {
        fleet_runs()
            .filter(|r| r.sessions == sessions)
            .map(|r| r.tally.checks_per_read())
            .fold(f64::NAN, f64::max)
    };
    let (c8, c64) = (checks(8), checks(64));
    let stale: u64 = fleet_runs().map(|r| r.tally.stale).sum();
    for (metric, value) in [
        ("lease_overhead_x", x),
        ("e2e_ratio_min", y),
        ("ryw_on_replicas_min_pct", z),
        ("ryw_wait_p50_ms_8_sessions_20ms", a),
        ("checks_per_ryw_read_8_sessions", c8),
        ("checks_per_ryw_read_64_sessions", c64),
        ("stale_reads", stale as f64),
    ] {
        csv.add("summary", "pgfleet", None, None, metric, value);
    }

    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let csv_path = dir.join("bench.csv");
    std::fs::write(&csv_path, &csv.text)
        .with_context(|| format!("writing {}", csv_path.display()))?;
    let throughput = draw_throughput(&dir, &overhead, &info)?;
    let ryw_svg = draw_ryw(&dir, &ryw)?;
    println!(
        "\nwrote {}, {}, {} ({:.0} s in all)",
        rel(&csv_path),
        rel(&throughput),
        rel(&ryw_svg),
        started.elapsed().as_secs_f64()
    );

    drop(cluster);
    Ok(Outcome {
        summary: format!(
            "bench: lease overhead {x:.2}x, e2e ratio {y:.2}, ryw on replicas {z:.0}%, \
             ryw wait p50 {a:.1} ms at 20 ms delay, checks per ryw read {c8:.2} at 8 writers \
             {c64:.2} at 64 writers"
        ),
        stale,
    })
}

fn progress(what: &str) {
    eprintln!("bench: {what}");
}

/// `path` relative to the current directory when it is below it.
fn rel(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|d| path.strip_prefix(d).ok().map(PathBuf::from))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

// ------------------------------------------------------------------------------------
// Fleets and readers

async fn start_fleet(cluster: &LocalCluster, single_replica: bool) -> Result<Fleet> {
    // Straight to the servers, like the bare pools.
    let mut toml = cluster.pgfleet_toml();
    for node in cluster.nodes() {
        toml = toml.replace(&node.url(), &node.direct_url());
    }
    let mut config = Config::from_toml_str(&toml)?;
    config.primary.pool_size = POOL;
    for r in &mut config.replicas {
        r.pool_size = POOL;
    }
    if single_replica {
        config.replicas[1].weight = 0;
    }
    let fleet = Fleet::start(config).await?;
    if !fleet.wait_ready(Duration::from_secs(30)).await {
        bail!("the fleet was not ready in 30 s:\n{}", fleet.status());
    }
    Ok(fleet)
}

/// Opens the fleet's pools: `readers` eventual-read leases held at once (one after the
/// other, so least-outstanding spreads them), and with `primary` the primary's write and
/// read pools too.
async fn warm_fleet(fleet: &Fleet, readers: usize, primary: bool) -> Result<()> {
    let mut held = Vec::new();
    for _ in 0..readers {
        held.push(fleet.lease(Intent::Read(Consistency::Eventual)).await?);
    }
    if primary {
        for _ in 0..POOL {
            held.push(fleet.lease(Intent::Write).await?);
            held.push(fleet.lease(Intent::Read(Consistency::Strong)).await?);
        }
    }
    Ok(())
}

/// One point read on `c`: a single round trip (unnamed statement with typed parameters),
/// the same on both sides.
async fn read_v(c: &tokio_postgres::Client, k: i32) -> Result<i64> {
    Ok(c.query_typed_one(READ_SQL, &[(&k, Type::INT4)])
        .await?
        .try_get(0)?)
}

/// A source of read connections: a bare pool or a fleet (eventual reads).
#[derive(Clone)]
enum Reader {
    Bare(BarePool),
    /// Bare pools on several servers, taken in turn (the fair comparison for a fleet
    /// spreading reads over them).
    BareRoundRobin(Arc<[BarePool]>, Arc<AtomicUsize>),
    Fleet(Fleet),
    /// A fleet, with a new session per read (the HTTP layer's pattern).
    FleetSession(Fleet),
}

impl Reader {
    async fn checkout_drop(&self) -> Result<()> {
        match self {
            Reader::Bare(p) => drop(baseline::get(p).await?),
            Reader::BareRoundRobin(pools, rr) => {
                let p = &pools[rr.fetch_add(1, Ordering::Relaxed) % pools.len()];
                drop(baseline::get(p).await?)
            }
            Reader::Fleet(f) => drop(f.lease(Intent::Read(Consistency::Eventual)).await?),
            Reader::FleetSession(f) => drop(
                f.session()
                    .lease(Intent::Read(Consistency::Eventual))
                    .await?,
            ),
        }
        Ok(())
    }

    async fn point_read(&self, k: i32) -> Result<i64> {
        match self {
            Reader::Bare(p) => read_v(&*baseline::get(p).await?, k).await,
            Reader::BareRoundRobin(pools, rr) => {
                let p = &pools[rr.fetch_add(1, Ordering::Relaxed) % pools.len()];
                read_v(&*baseline::get(p).await?, k).await
            }
            Reader::Fleet(f) => {
                let lease = f.lease(Intent::Read(Consistency::Eventual)).await?;
                read_v(&lease, k).await
            }
            Reader::FleetSession(f) => {
                let session = f.session();
                let lease = session.lease(Intent::Read(Consistency::Eventual)).await?;
                read_v(&lease, k).await
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// 1. Lease overhead

struct Micro {
    name: &'static str,
    tasks: usize,
    /// Nanoseconds per checkout + drop, one per round.
    bare_ns: Vec<f64>,
    fleet_ns: Vec<f64>,
    /// fleet / bare, one per round.
    ratios: Vec<f64>,
}

async fn micro_section(plan: &Plan, fleet: &Fleet, bare: &BarePool) -> Result<Vec<Micro>> {
    let bare = Reader::Bare(bare.clone());
    let fleet = Reader::Fleet(fleet.clone());
    let n = plan.micro_ops;
    // Warm-up, unrecorded.
    micro_run(&bare, n / 10, 1).await?;
    micro_run(&fleet, n / 10, 1).await?;
    let mut out = Vec::new();
    for (name, tasks) in [("sequential", 1), ("64 tasks", MICRO_TASKS)] {
        let mut m = Micro {
            name,
            tasks,
            bare_ns: Vec::new(),
            fleet_ns: Vec::new(),
            ratios: Vec::new(),
        };
        for round in 0..plan.micro_rounds {
            let (b, f) = if round % 2 == 0 {
                let b = micro_run(&bare, n, tasks).await?;
                (b, micro_run(&fleet, n, tasks).await?)
            } else {
                let f = micro_run(&fleet, n, tasks).await?;
                (micro_run(&bare, n, tasks).await?, f)
            };
            m.bare_ns.push(b);
            m.fleet_ns.push(f);
            m.ratios.push(f / b);
        }
        progress(&format!(
            "lease overhead {name}: median ratio {:.2}",
            median(&m.ratios)
        ));
        out.push(m);
    }
    Ok(out)
}

/// `n` checkouts + drops spread over `tasks` tasks; nanoseconds per operation.
async fn micro_run(r: &Reader, n: usize, tasks: usize) -> Result<f64> {
    let per_task = n.div_ceil(tasks).max(1);
    let start = Instant::now();
    if tasks == 1 {
        for _ in 0..per_task {
            r.checkout_drop().await?;
        }
    } else {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        r.checkout_drop().await?;
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        for h in handles {
            h.await??;
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / (per_task * tasks) as f64)
}

fn print_micro(micro: &[Micro], csv: &mut Csv) {
    println!("\n== Lease overhead: lease + drop vs bare pool get + drop (in process, no query) ==");
    println!(
        "{:<12} {:>8} {:>12} {:>12} {:>14}",
        "mode", "tasks", "bare ns/op", "fleet ns/op", "ratio (median)"
    );
    for m in micro {
        let (b, f, r) = (median(&m.bare_ns), median(&m.fleet_ns), median(&m.ratios));
        println!(
            "{:<12} {:>8} {:>12.0} {:>12.0} {:>13.2}x",
            m.name, m.tasks, b, f, r
        );
        let name = if m.tasks == 1 { "sequential" } else { "tasks" };
        csv.add("micro", name, Some(m.tasks), None, "bare_ns_per_op", b);
        csv.add("micro", name, Some(m.tasks), None, "fleet_ns_per_op", f);
        csv.add("micro", name, Some(m.tasks), None, "ratio", r);
    }
}

// ------------------------------------------------------------------------------------
// 2. End-to-end point reads

struct Phase {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    /// Latency of each read (checkout + query + release), microseconds, sorted.
    lat_us: Vec<u32>,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    /// Several slices of one side as one phase: their reads over their summed time.
    fn merge(slices: Vec<Phase>) -> Phase {
        let mut all = Phase {
            ops: 0,
            errors: 0,
            first_error: None,
            secs: 0.0,
            lat_us: Vec::new(),
        };
        for p in slices {
            all.ops += p.ops;
            all.errors += p.errors;
            all.secs += p.secs;
            all.lat_us.extend(p.lat_us);
            if all.first_error.is_none() {
                all.first_error = p.first_error;
            }
        }
        all.lat_us.sort_unstable();
        all
    }
}

/// Both replicas, for information: bare round robin and the fleet, one phase each.
struct InfoRow {
    concurrency: usize,
    bare: Phase,
    fleet: Phase,
}

struct OverheadRow {
    concurrency: usize,
    bare: Vec<Phase>,
    fleet: Vec<Phase>,
    ratios: Vec<f64>,
}

/// `tasks` tasks doing point reads on random keys for `dur`.
async fn read_phase(reader: &Reader, tasks: usize, dur: Duration) -> Result<Phase> {
    let start = Instant::now();
    let stop = start + dur;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let r = reader.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < stop {
                    let k = fastrand::i32(0..ROWS);
                    let t0 = Instant::now();
                    match r.point_read(k).await {
                        Ok(_) => lat.push(micros(t0.elapsed())),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    let mut phase = Phase {
        ops: 0,
        errors: 0,
        first_error: None,
        secs: 0.0,
        lat_us: Vec::new(),
    };
    for h in handles {
        let (lat, errors, first) = h.await?;
        phase.lat_us.extend(lat);
        phase.errors += errors;
        if phase.first_error.is_none() {
            phase.first_error = first;
        }
    }
    phase.secs = start.elapsed().as_secs_f64();
    phase.ops = phase.lat_us.len() as u64;
    phase.lat_us.sort_unstable();
    if phase.ops == 0 {
        return Err(anyhow!(
            "no read succeeded in {dur:?}: {}",
            phase.first_error.unwrap_or_default()
        ));
    }
    Ok(phase)
}

/// Median reads/s, pooled p50/p99 (ms) and errors of `phases`.
fn phase_figures(phases: &[Phase]) -> (f64, f64, f64, u64) {
    let rps: Vec<f64> = phases.iter().map(Phase::rps).collect();
    let mut lat: Vec<u32> = phases
        .iter()
        .flat_map(|p| p.lat_us.iter().copied())
        .collect();
    lat.sort_unstable();
    (
        median(&rps),
        percentile(&lat, 0.50) / 1000.0,
        percentile(&lat, 0.99) / 1000.0,
        phases.iter().map(|p| p.errors).sum(),
    )
}

fn print_overhead(rows: &[OverheadRow], sessions: &[InfoRow], info: &[InfoRow], csv: &mut Csv) {
    println!(
        "\n== End-to-end point reads (SELECT v FROM kv WHERE k = $1; query_typed: one round trip, unnamed statement) =="
    );
    println!(
        "rounds: {} per concurrency, each {SLICES} slices per side interleaved ABBA; reads/s is the median round, \
         p50/p99 over all rounds; ratio is the median of the per-round fleet/bare ratios \
         (info rows: one round each; `session per read`: a new fleet.session() per read, as the HTTP layer \
         per request, whose release reads the replica's position on the connection; `both`: fleet over both \
         replicas / bare pools on both in turn)",
        rows.first().map_or(0, |r| r.ratios.len())
    );
    println!(
        "{:<30} {:>6} {:>10} {:>9} {:>9} {:>7} {:>7}",
        "target", "conc", "reads/s", "p50 ms", "p99 ms", "ratio", "errors"
    );
    let mut line = |name: &str, csv_name: &str, c: usize, phases: &[Phase], ratio: Option<f64>| {
        let (rps, p50, p99, errors) = phase_figures(phases);
        println!(
            "{:<30} {:>6} {:>10.0} {:>9.3} {:>9.3} {:>7} {:>7}",
            name,
            c,
            rps,
            p50,
            p99,
            ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            errors
        );
        csv.add("e2e", csv_name, Some(c), None, "reads_per_s", rps);
        csv.add("e2e", csv_name, Some(c), None, "p50_ms", p50);
        csv.add("e2e", csv_name, Some(c), None, "p99_ms", p99);
        csv.add("e2e", csv_name, Some(c), None, "errors", errors as f64);
        if let Some(r) = ratio {
            csv.add("e2e", csv_name, Some(c), None, "ratio_fleet_bare", r);
        }
        for p in phases {
            if let Some(e) = &p.first_error {
                println!("    first error: {e}");
                break;
            }
        }
    };
    for r in rows {
        line("bare pool (replica1)", "bare", r.concurrency, &r.bare, None);
        line(
            "fleet (replica1 only)",
            "fleet_single",
            r.concurrency,
            &r.fleet,
            Some(median(&r.ratios)),
        );
    }
    let info_groups = [
        (
            sessions,
            [
                ("bare pool (replica1), info", "bare_session_info"),
                ("fleet, session per read, info", "fleet_session"),
            ],
        ),
        (
            info,
            [
                ("bare round robin (both), info", "bare_rr_both"),
                ("fleet (both replicas), info", "fleet_both"),
            ],
        ),
    ];
    for (group, [bare_name, fleet_name]) in info_groups {
        for r in group {
            line(
                bare_name.0,
                bare_name.1,
                r.concurrency,
                std::slice::from_ref(&r.bare),
                None,
            );
            line(
                fleet_name.0,
                fleet_name.1,
                r.concurrency,
                std::slice::from_ref(&r.fleet),
                Some(r.fleet.rps() / r.bare.rps()),
            );
        }
    }
    for r in rows {
        let ratios: Vec<String> = r.ratios.iter().map(|x| format!("{x:.3}")).collect();
        println!("ratios at {:>2}: {}", r.concurrency, ratios.join(" "));
    }
}

// ------------------------------------------------------------------------------------
// 3. Read-your-writes

/// What the sessions of one read-your-writes run saw.
#[derive(Default)]
struct Tally {
    reads: u64,
    on_replica: u64,
    /// Reads per replica (index 0 is replica1).
    by_replica: Vec<u64>,
    /// Reads that returned another value than the session had just written.
    stale: u64,
    /// LSN checks sent to replicas (pgfleet: its on-demand probes).
    checks: u64,
    errors: u64,
    first_error: Option<String>,
    /// From "read requested" to "connection in hand", microseconds (sorted at the end).
    waits_us: Vec<u32>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.reads += o.reads;
        self.on_replica += o.on_replica;
        for (i, n) in o.by_replica.iter().enumerate() {
            self.count_on(i, *n);
        }
        self.stale += o.stale;
        self.checks += o.checks;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.waits_us.extend(o.waits_us);
    }

    fn count_on(&mut self, replica: usize, n: u64) {
        if self.by_replica.len() <= replica {
            self.by_replica.resize(replica + 1, 0);
        }
        self.by_replica[replica] += n;
    }

    /// `replica`: index of the replica that served the read (0 is replica1), `None` for
    /// the primary.
    fn record(&mut self, wait: Duration, replica: Option<usize>, stale: bool, checks: u32) {
        self.reads += 1;
        if let Some(i) = replica {
            self.on_replica += 1;
            self.count_on(i, 1);
        }
        self.stale += u64::from(stale);
        self.checks += u64::from(checks);
        self.waits_us.push(micros(wait));
    }

    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{e:#}"));
    }

    fn replica_pct(&self) -> f64 {
        if self.reads == 0 {
            return f64::NAN;
        }
        self.on_replica as f64 * 100.0 / self.reads as f64
    }

    /// Shares of the replica reads per replica, in percent: "50/50".
    fn split(&self) -> String {
        if self.on_replica == 0 {
            return "-".to_owned();
        }
        let shares: Vec<String> = (0..self.by_replica.len().max(2))
            .map(|i| {
                let n = self.by_replica.get(i).copied().unwrap_or(0);
                format!("{:.0}", n as f64 * 100.0 / self.on_replica as f64)
            })
            .collect();
        shares.join("/")
    }

    fn wait_ms(&self, p: f64) -> f64 {
        percentile(&self.waits_us, p) / 1000.0
    }

    fn checks_per_read(&self) -> f64 {
        if self.reads == 0 {
            return f64::NAN;
        }
        self.checks as f64 / self.reads as f64
    }
}

struct RywRun {
    policy: &'static str,
    sessions: usize,
    delay_ms: u64,
    tally: Tally,
    /// pgfleet: reads the router parked until a replica caught up.
    router_waits: Option<u64>,
}

/// Runs `sessions` sessions of `one` (a write and its read-back) for `dur`.
async fn sessions_for<F, Fut>(sessions: usize, dur: Duration, one: F) -> Result<Tally>
where
    F: Fn(i32, Tally) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Tally, Result<()>)> + Send + 'static,
{
    let stop = Instant::now() + dur;
    let handles: Vec<_> = (0..sessions as i32)
        .map(|k| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut t = Tally::default();
                while Instant::now() < stop {
                    let (back, r) = one(k, t).await;
                    t = back;
                    if let Err(e) = r {
                        t.error(&e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        all.merge(h.await?);
    }
    all.waits_us.sort_unstable();
    Ok(all)
}

/// pgfleet: write under a write lease, `commit_token`, read back under
/// `read_after(&token)`. The wait is `fleet.lease` for the read.
async fn ryw_fleet(fleet: &Fleet, sessions: usize, dur: Duration) -> Result<Tally> {
    let fleet = fleet.clone();
    sessions_for(sessions, dur, move |k, mut t| {
        let fleet = fleet.clone();
        async move {
            let r: Result<()> = async {
                let (v, token) = {
                    let mut w = fleet.lease(Intent::Write).await?;
                    let v: i64 = w
                        .query_typed_one(WRITE_SQL, &[(&k, Type::INT4)])
                        .await?
                        .try_get(0)?;
                    (v, w.commit_token().await?)
                };
                let t0 = Instant::now();
                let lease = fleet.lease(Intent::read_after(&token)).await?;
                let wait = t0.elapsed();
                let got = read_v(&lease, k).await?;
                t.record(wait, replica_index(&lease), got != v, 0);
                Ok(())
            }
            .await;
            (t, r)
        }
    })
    .await
}

/// The replica a lease is on (0 for "replica1", the testkit's names), `None` off replicas.
fn replica_index(lease: &pgfleet::Lease) -> Option<usize> {
    if lease.role() != Role::Replica {
        return None;
    }
    let n: usize = lease.server().strip_prefix("replica")?.parse().ok()?;
    n.checked_sub(1)
}

/// A baseline policy on bare pools: write, insert LSN, its own checks, read back.
async fn ryw_baseline(
    base: &Arc<Baseline>,
    policy: Policy,
    sessions: usize,
    dur: Duration,
) -> Result<Tally> {
    let base = base.clone();
    sessions_for(sessions, dur, move |k, mut t| {
        let base = base.clone();
        async move {
            let r: Result<()> = async {
                let (v, lsn) = base.write(k).await?;
                let written = Instant::now();
                let t0 = Instant::now();
                let got = base.acquire(policy, &lsn, written).await?;
                let wait = t0.elapsed();
                let value = read_v(&got.conn, k).await?;
                t.record(wait, got.replica, value != v, got.checks);
                Ok(())
            }
            .await;
            (t, r)
        }
    })
    .await
}

fn print_ryw(runs: &[RywRun], csv: &mut Csv) {
    println!("\n== Read-your-writes: write own row, take the token, read it back ==");
    println!(
        "wait = read requested -> connection in hand (pgfleet: fleet.lease(read_after); baselines: \
         incl. their LSN checks); checks = LSN checks sent to replicas per read (pgfleet: on-demand \
         probes, status.wait_probes)"
    );
    println!(
        "{:>8} {:>6} {:<12} {:>8} {:>10} {:>7} {:>9} {:>9} {:>6} {:>8} {:>7} {:>8}",
        "sessions",
        "delay",
        "policy",
        "reads",
        "replicas%",
        "r1/r2",
        "wait p50",
        "wait p99",
        "stale",
        "checks/r",
        "errors",
        "parked"
    );
    for r in runs {
        let t = &r.tally;
        println!(
            "{:>8} {:>4}ms {:<12} {:>8} {:>9.1}% {:>7} {:>7.2}ms {:>7.2}ms {:>6} {:>8.2} {:>7} {:>8}",
            r.sessions,
            r.delay_ms,
            r.policy,
            t.reads,
            t.replica_pct(),
            t.split(),
            t.wait_ms(0.50),
            t.wait_ms(0.99),
            t.stale,
            t.checks_per_read(),
            t.errors,
            r.router_waits
                .map_or_else(|| "-".to_owned(), |w| w.to_string()),
        );
        if let Some(e) = &t.first_error {
            println!("    first error: {e}");
        }
        let (s, d) = (Some(r.sessions), Some(r.delay_ms));
        let name = r.policy.replace(' ', "_");
        csv.add("ryw", &name, s, d, "reads", t.reads as f64);
        csv.add("ryw", &name, s, d, "on_replicas_pct", t.replica_pct());
        for (i, n) in t.by_replica.iter().enumerate() {
            let metric = format!("on_replica{}_pct", i + 1);
            csv.add(
                "ryw",
                &name,
                s,
                d,
                &metric,
                *n as f64 * 100.0 / t.reads.max(1) as f64,
            );
        }
        csv.add("ryw", &name, s, d, "wait_p50_ms", t.wait_ms(0.50));
        csv.add("ryw", &name, s, d, "wait_p99_ms", t.wait_ms(0.99));
        csv.add("ryw", &name, s, d, "stale_reads", t.stale as f64);
        csv.add("ryw", &name, s, d, "checks_per_read", t.checks_per_read());
        csv.add("ryw", &name, s, d, "errors", t.errors as f64);
        if let Some(w) = r.router_waits {
            csv.add("ryw", &name, s, d, "router_waits", w as f64);
        }
    }
}

// ------------------------------------------------------------------------------------
// Output

/// `section,name,concurrency,delay_ms,metric,value` rows.
struct Csv {
    text: String,
}

impl Default for Csv {
    fn default() -> Self {
        Csv {
            text: "section,name,concurrency,delay_ms,metric,value\n".to_owned(),
        }
    }
}

impl Csv {
    fn add(
        &mut self,
        section: &str,
        name: &str,
        concurrency: Option<usize>,
        delay_ms: Option<u64>,
        metric: &str,
        value: f64,
    ) {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let _ = writeln!(
            self.text,
            "{section},{name},{},{},{metric},{value}",
            opt(concurrency.map(|c| c as u64)),
            opt(delay_ms)
        );
    }
}

fn draw_throughput(dir: &Path, rows: &[OverheadRow], info: &[InfoRow]) -> Result<PathBuf> {
    let path = dir.join("throughput.svg");
    let categories: Vec<String> = CONCURRENCY.iter().map(|c| c.to_string()).collect();
    let rps = |f: &dyn Fn(&OverheadRow) -> &[Phase]| -> Vec<Option<f64>> {
        rows.iter().map(|r| Some(phase_figures(f(r)).0)).collect()
    };
    let series = vec![
        chart::Series {
            name: "bare pool (replica1)".into(),
            values: rps(&|r| &r.bare),
        },
        chart::Series {
            name: "pgfleet, replica1 only".into(),
            values: rps(&|r| &r.fleet),
        },
        chart::Series {
            name: "pgfleet, both replicas".into(),
            values: info.iter().map(|r| Some(r.fleet.rps())).collect(),
        },
        chart::Series {
            name: "bare pools, round robin over both replicas".into(),
            values: info.iter().map(|r| Some(r.bare.rps())).collect(),
        },
    ];
    chart::lines(
        &path,
        "Point reads per second vs concurrency",
        "concurrent tasks",
        "reads/s",
        &categories,
        &series,
    )?;
    Ok(path)
}

fn draw_ryw(dir: &Path, runs: &[RywRun]) -> Result<PathBuf> {
    let path = dir.join("ryw.svg");
    let mut groups: Vec<(usize, u64)> = Vec::new();
    let mut policies: Vec<&str> = Vec::new();
    for r in runs {
        if !groups.contains(&(r.sessions, r.delay_ms)) {
            groups.push((r.sessions, r.delay_ms));
        }
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    let categories: Vec<String> = groups
        .iter()
        .map(|(s, d)| format!("{s} sessions, {d} ms delay"))
        .collect();
    let series: Vec<chart::Series> = policies
        .iter()
        .map(|p| chart::Series {
            name: (*p).to_owned(),
            values: groups
                .iter()
                .map(|g| {
                    runs.iter()
                        .find(|r| r.policy == *p && (r.sessions, r.delay_ms) == *g)
                        .map(|r| r.tally.wait_ms(0.50))
                })
                .collect(),
        })
        .collect();
    chart::grouped_bars(
        &path,
        "Read-your-writes: added wait p50 (ms) by policy",
        "wait p50 (ms)",
        &categories,
        &series,
    )?;
    Ok(path)
}

// ------------------------------------------------------------------------------------
// Numbers

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest-rank percentile of sorted `values`; NaN when empty.
fn percentile<T: Copy + Into<f64>>(sorted: &[T], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].into()
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

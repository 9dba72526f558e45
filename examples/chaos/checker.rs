//! The chaos checker: a workload of concurrent sessions that write unique rows and read
//! them back (read-your-writes and monotonic reads), recording every acknowledged write;
//! the fault scenarios that run it on a local testkit cluster (primary + 2 replicas); and
//! the report each scenario ends with.
//!
//! Shared by `examples/chaos.rs` (every scenario in sequence) and `tests/chaos_*.rs` (one
//! scenario each), so the example and the tests run the same code.
//!
//! The workload, on a table `chaos(key bigint primary key, value bigint, writer int,
//! token text)`:
//!
//! - **writers**: sessions ([`Fleet::session`]) that alternately INSERT a row with a key of
//!   their own and UPDATE their own counter row (a negative key). A write is
//!   *acknowledged* when its query returned Ok and [`pgfleet::Lease::commit_token`]
//!   returned Ok; only then is it recorded. A write that failed after it was sent (its
//!   outcome unknown) is *unacknowledged* and not counted as lost if missing. After each
//!   acknowledged write the writer reads its row back, alternately through its session
//!   and through a sessionless `read_after(token)` (the token round-tripped through its
//!   text form): the read must return the value written, else it is a stale read.
//! - **session readers**: sessions that read every counter row; a session read returning
//!   a counter lower than one the same session saw before is a stale read (monotonic
//!   reads). Writer sessions are checked the same way on their session reads.
//! - **eventual readers**: plain eventual reads, unchecked (they may go back in time; how
//!   often they did is reported, to show the hazard the sessions avoid was real).
//!
//! Staleness is judged only on the data a read returned, never on which server served it.
//! At the end everything acknowledged is checked against the primary (a strong read):
//! every acknowledged write missing there is a lost write.
//!
//! How scenario `standby_older` makes a restarted standby come back older than it was is in
//! `older.rs` (shared with `tests/restarted_standby_older.rs`).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pgfleet::{
    Config, Consistency, Error, Fleet, Health, Intent, Lease, Lsn, Role, ServerStatus, Token,
};
use pgfleet_testkit::{ClusterBuilder, LocalCluster};

#[path = "older.rs"]
pub mod older;

/// Every scenario, in the order the example runs them.
pub const SCENARIOS: &[&str] = &[
    "replica_kill9",
    "replica_hang",
    "replication_lag",
    "primary_restart",
    "connection_storm",
    "failing_actor",
    "standby_older",
];

/// The fleet settings of every scenario (a scenario may tweak them): fast probing so
/// faults are seen quickly, a short `down_after` so dead servers' actors are restarted.
pub const FLEET_TOML: &str = "[fleet]\n\
    probe_interval = \"50ms\"\n\
    probe_timeout = \"500ms\"\n\
    connect_timeout = \"1s\"\n\
    lease_timeout = \"2s\"\n\
    down_after = \"1s\"\n\
    failure_threshold = 3\n\
    tcp_user_timeout = \"3s\"\n\
    restart = { min_backoff = \"100ms\", max_backoff = \"1s\" }\n\
    \n\
    [consistency]\n\
    ryw_wait = \"100ms\"\n";

/// The servers of every scenario's cluster, as the fleet names them.
pub const SERVERS: &[&str] = &["primary", "replica1", "replica2"];

/// Writer sessions.
const WRITERS: i32 = 3;
/// Session readers (monotonic reads).
const SESSION_READERS: usize = 2;
/// Plain eventual readers.
const EVENTUAL_READERS: usize = 1;
/// Pause between two iterations of a workload task: a small load on a 2-core machine.
const PACE: Duration = Duration::from_millis(5);
/// A query taking longer than this is reported as hung (and abandoned).
const QUERY_LIMIT: Duration = Duration::from_secs(10);
/// Writer `w` inserts keys `(w + 1) * KEY_SPAN + seq`; counters are `-(w + 1)`.
const KEY_SPAN: i64 = 1_000_000_000;
/// Bulk writes (scenario `standby_older`) use keys from here up.
const BULK_BASE: i64 = 1_000_000_000_000;
/// How many details (stale reads, lost writes, hangs) a report keeps.
const MAX_DETAILS: usize = 20;

// ---------------------------------------------------------------------------------------
// The tally: what the workload saw.

#[derive(Debug, Default)]
struct Inner {
    lease_calls: u64,
    leases: u64,
    per_server: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    errors_by_op: BTreeMap<String, u64>,
    /// (when, operation, kind) of every error.
    error_log: Vec<(Instant, &'static str, String)>,
    longest_wait: Duration,
    longest_wait_what: String,
    hung: u64,
    hung_queries: u64,
    acked_rows: Vec<(i64, i64)>,
    acked_counters: BTreeMap<i64, Vec<i64>>,
    acked_ranges: Vec<(i64, i64)>,
    ack_times: Vec<Instant>,
    latest: Option<(Token, i64, i64)>,
    unacked: u64,
    stale: u64,
    ryw_reads: u64,
    ryw_on_replica: u64,
    session_reads: u64,
    eventual_reads: u64,
    eventual_went_back: u64,
    details: Vec<String>,
    /// Checks that could not be made (first few).
    broken: Vec<String>,
}

/// What the workload saw, shared by its tasks.
#[derive(Debug)]
pub struct Tally {
    inner: Mutex<Inner>,
    /// A lease call longer than this is a hung lease.
    pub hung_bound: Duration,
    /// When the tally started (times in details are relative to it).
    pub started: Instant,
    acked: AtomicU64,
    leases: AtomicU64,
}

impl Tally {
    fn new(config: &Config) -> Tally {
        Tally {
            inner: Mutex::new(Inner::default()),
            hung_bound: config.fleet.lease_timeout
                + config.consistency.ryw_wait
                + Duration::from_millis(500),
            started: Instant::now(),
            acked: AtomicU64::new(0),
            leases: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn at(&self) -> String {
        format!("+{:.2}s", self.started.elapsed().as_secs_f64())
    }

    fn detail(g: &mut Inner, d: String) {
        if g.details.len() < MAX_DETAILS {
            g.details.push(d);
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Leases granted so far.
    pub fn leases(&self) -> u64 {
        self.leases.load(Ordering::Acquire)
    }

    /// Acknowledged writes whose acknowledgement came after `t`.
    pub fn acks_since(&self, t: Instant) -> usize {
        self.lock().ack_times.iter().filter(|&&a| a > t).count()
    }

    /// The latest acknowledged write: its token, key and value.
    pub fn latest(&self) -> Option<(Token, i64, i64)> {
        self.lock().latest
    }

    /// Errors of operation `op` between `from` and `to`, by kind.
    pub fn errors_between(&self, op: &str, from: Instant, to: Instant) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (at, o, kind) in &self.lock().error_log {
            if *o == op && *at >= from && *at <= to {
                *out.entry(kind.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Records an error of operation `op`.
    pub fn error(&self, op: &'static str, e: &Error) {
        self.error_kind(op, kind(e));
    }

    fn error_kind(&self, op: &'static str, kind: String) {
        let mut g = self.lock();
        *g.errors.entry(kind.clone()).or_default() += 1;
        *g.errors_by_op.entry(format!("{op}: {kind}")).or_default() += 1;
        g.error_log.push((Instant::now(), op, kind));
    }

    /// Runs one lease call: times it and records it ([`Tally::record`]). A call that never
    /// returns is abandoned after the hung bound plus 10 s.
    pub async fn lease(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<Lease, Error>>,
    ) -> Option<Lease> {
        let t = Instant::now();
        let r = tokio::time::timeout(self.never_returns(), call).await;
        self.record(op, t.elapsed(), &r);
        r.ok().and_then(Result::ok)
    }

    /// How long a lease call may run before it is abandoned as never returning.
    pub fn never_returns(&self) -> Duration {
        self.hung_bound + Duration::from_secs(10)
    }

    /// Records one lease call of operation `op` that took `took` (longest wait, hung
    /// leases) and its outcome: a grant counted per server, an error by kind, or `Err(_)`
    /// for a call abandoned because it never returned. For lease calls made outside
    /// [`Tally::lease`] (the connection storm times its own).
    pub fn record(
        &self,
        op: &'static str,
        took: Duration,
        r: &Result<Result<Lease, Error>, tokio::time::error::Elapsed>,
    ) {
        let mut g = self.lock();
        g.lease_calls += 1;
        if took > g.longest_wait {
            g.longest_wait = took;
            g.longest_wait_what = format!(
                "{op} at {}: {}",
                self.at(),
                match r {
                    Ok(Ok(l)) => format!("granted on {}", l.server()),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(_) => "never returned".into(),
                }
            );
        }
        if took > self.hung_bound {
            g.hung += 1;
            let d = format!("HUNG LEASE: {op} took {took:?} at {}", self.at());
            Self::detail(&mut g, d);
        }
        drop(g);
        match r {
            Ok(Ok(l)) => {
                self.leases.fetch_add(1, Ordering::AcqRel);
                let mut g = self.lock();
                g.leases += 1;
                *g.per_server.entry(l.server().to_owned()).or_default() += 1;
            }
            Ok(Err(e)) => self.error(op, e),
            Err(_) => self.error_kind(op, "LeaseNeverReturned".into()),
        }
    }

    /// Runs one query on `lease`: its error is classified by the lease ([`Lease::error`]);
    /// a query that takes longer than [`QUERY_LIMIT`] is abandoned and reported hung.
    pub async fn query<T>(
        &self,
        op: &'static str,
        lease: &Lease,
        q: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Option<T> {
        match tokio::time::timeout(QUERY_LIMIT, q).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.error(op, &lease.error(e));
                None
            }
            Err(_) => {
                self.hung_query(op, lease);
                None
            }
        }
    }

    /// Records `op` on `lease` abandoned after [`QUERY_LIMIT`]: a hung query.
    fn hung_query(&self, op: &'static str, lease: &Lease) {
        self.error_kind(op, "QueryHung".into());
        let mut g = self.lock();
        g.hung_queries += 1;
        let d = format!(
            "HUNG QUERY: {op} on {} for {QUERY_LIMIT:?} at {}",
            lease.server(),
            self.at()
        );
        Self::detail(&mut g, d);
    }

    /// Records a check the workload could not make (a failure of the run, not of the
    /// fault).
    fn broken(&self, what: String) {
        let mut g = self.lock();
        g.broken.push(what);
    }

    fn unacked(&self) {
        self.lock().unacked += 1;
    }

    fn ack_row(&self, key: i64, value: i64, token: Token) {
        let mut g = self.lock();
        g.acked_rows.push((key, value));
        g.ack_times.push(Instant::now());
        g.latest = Some((token, key, value));
        drop(g);
        self.acked.fetch_add(1, Ordering::AcqRel);
    }

    fn ack_counter(&self, key: i64, value: i64, token: Token) {
        let mut g = self.lock();
        g.acked_counters.entry(key).or_default().push(value);
        g.ack_times.push(Instant::now());
        g.latest = Some((token, key, value));
        drop(g);
        self.acked.fetch_add(1, Ordering::AcqRel);
    }

    /// Records a bulk write of every key in `lo..=hi` (value = key) as acknowledged.
    pub fn ack_range(&self, lo: i64, hi: i64) {
        let mut g = self.lock();
        g.acked_ranges.push((lo, hi));
        g.ack_times.push(Instant::now());
        drop(g);
        self.acked.fetch_add(1, Ordering::AcqRel);
    }

    /// Records a stale read: `what` the read should have returned, on which lease.
    pub fn stale(&self, what: &str, lease: &Lease) {
        let mut g = self.lock();
        g.stale += 1;
        let d = format!(
            "STALE READ at {}: {what} (served by {}, {}, fallback {}, {:?})",
            self.at(),
            lease.server(),
            lease.role(),
            lease.is_fallback(),
            lease.intent()
        );
        Self::detail(&mut g, d);
    }

    fn ryw_read(&self, lease: &Lease) {
        let mut g = self.lock();
        g.ryw_reads += 1;
        if lease.role() == Role::Replica {
            g.ryw_on_replica += 1;
        }
    }
}

/// The kind of an error: the `pgfleet::Error` variant's name; for `Postgres`, with the
/// SQLSTATE or `conn` for a connection error.
pub fn kind(e: &Error) -> String {
    match (e.kind(), e.sqlstate()) {
        ("Postgres", Some(code)) => format!("Postgres/{code}"),
        ("Postgres", None) => "Postgres/conn".into(),
        (k, _) => k.into(),
    }
}

// ---------------------------------------------------------------------------------------
// The workload tasks.

/// A session's monotonic-read check: the highest value it saw per counter row.
#[derive(Debug, Default)]
struct Seen(HashMap<i64, i64>);

impl Seen {
    /// Checks the counter rows a session read returned; records stale reads.
    fn check(&mut self, tally: &Tally, lease: &Lease, rows: &[tokio_postgres::Row], who: &str) {
        for row in rows {
            let (Ok(key), Ok(value)) = (row.try_get::<_, i64>(0), row.try_get::<_, i64>(1)) else {
                continue;
            };
            if key >= 0 {
                continue;
            }
            let max = self.0.entry(key).or_insert(value);
            if value < *max {
                tally.stale(
                    &format!("{who}: counter {key} read {value} after the session had seen {max}"),
                    lease,
                );
            }
            *max = (*max).max(value);
        }
    }

    fn wrote(&mut self, key: i64, value: i64) {
        let max = self.0.entry(key).or_insert(value);
        *max = (*max).max(value);
    }
}

const INSERT_SQL: &str = "INSERT INTO chaos (key, value, writer, token) VALUES ($1, $2, $3, $4)";
const UPDATE_SQL: &str =
    "UPDATE chaos SET value = value + 1, token = $2 WHERE key = $1 RETURNING value";
const READ_BACK_SQL: &str = "SELECT key, value FROM chaos WHERE key < 0 OR key = $1";
const COUNTERS_SQL: &str = "SELECT key, value FROM chaos WHERE key < 0";

/// A writer session: alternately inserts a row of its own and bumps its counter row, then
/// reads the write back (read-your-writes) through its session or a sessionless
/// `read_after(token)`.
async fn writer(fleet: Fleet, w: i32, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let session = fleet.session();
    let counter = -(i64::from(w) + 1);
    let mut seen = Seen::default();
    let mut seq = 0i64;
    let who = format!("writer {w}");
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(PACE).await;
        seq += 1;
        let insert = seq % 2 == 1;
        let key = if insert {
            (i64::from(w) + 1) * KEY_SPAN + seq
        } else {
            counter
        };
        let Some(mut lease) = tally.lease("write", session.lease(Intent::Write)).await else {
            continue;
        };
        let prev = session.token().map(|t| t.to_string());
        let written = if insert {
            let value = seq * 10 + i64::from(w);
            let n = tally
                .query(
                    "write",
                    &lease,
                    lease.execute(INSERT_SQL, &[&key, &value, &w, &prev]),
                )
                .await;
            match n {
                Some(1) => Some(value),
                Some(n) => {
                    tally.error_kind("write", format!("InsertedRows{n}"));
                    None
                }
                None => None,
            }
        } else {
            tally
                .query(
                    "write",
                    &lease,
                    lease.query_one(UPDATE_SQL, &[&counter, &prev]),
                )
                .await
                .and_then(|row| row.try_get::<_, i64>(0).ok())
        };
        let Some(value) = written else {
            tally.unacked();
            continue;
        };
        let token = match tokio::time::timeout(QUERY_LIMIT, lease.commit_token()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tally.error("commit_token", &e);
                tally.unacked();
                continue;
            }
            Err(_) => {
                tally.hung_query("commit_token", &lease);
                tally.unacked();
                continue;
            }
        };
        drop(lease);
        if insert {
            tally.ack_row(key, value, token);
        } else {
            tally.ack_counter(key, value, token);
            seen.wrote(key, value);
        }

        // Read it back: through the session, or sessionless with the token in its text form.
        let via_session = seq % 4 < 2;
        let read = if via_session {
            tally
                .lease("read-your-writes", session.lease(Intent::read()))
                .await
        } else {
            match token.to_string().parse::<Token>() {
                Ok(t) if t == token => {
                    tally
                        .lease("read-your-writes", fleet.lease(Intent::read_after(&t)))
                        .await
                }
                other => {
                    // Not an error of the fault: the token's text form is broken.
                    tally.broken(format!(
                        "{who}: token {token} did not parse back from its text: {other:?}"
                    ));
                    continue;
                }
            }
        };
        let Some(lease) = read else {
            continue;
        };
        let Some(rows) = tally
            .query(
                "read-your-writes",
                &lease,
                lease.query(READ_BACK_SQL, &[&key]),
            )
            .await
        else {
            continue;
        };
        tally.ryw_read(&lease);
        let got = rows
            .iter()
            .find(|r| r.try_get::<_, i64>(0).ok() == Some(key))
            .and_then(|r| r.try_get::<_, i64>(1).ok());
        if got != Some(value) {
            tally.stale(
                &format!(
                    "{who} wrote key {key} = {value} (token {token}) and read back {got:?} via {}",
                    if via_session {
                        "its session"
                    } else {
                        "read_after(token)"
                    }
                ),
                &lease,
            );
        }
        if via_session {
            seen.check(&tally, &lease, &rows, &who);
        }
    }
}

/// A session reading every counter row: values never go back (monotonic reads).
async fn session_reader(fleet: Fleet, id: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let session = fleet.session();
    let mut seen = Seen::default();
    let who = format!("session reader {id}");
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(PACE).await;
        let Some(lease) = tally
            .lease("session read", session.lease(Intent::read()))
            .await
        else {
            continue;
        };
        let Some(rows) = tally
            .query("session read", &lease, lease.query(COUNTERS_SQL, &[]))
            .await
        else {
            continue;
        };
        tally.lock().session_reads += 1;
        seen.check(&tally, &lease, &rows, &who);
    }
}

/// Plain eventual reads of the counters: no guarantee; counts how often they went back.
async fn eventual_reader(fleet: Fleet, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut max: HashMap<i64, i64> = HashMap::new();
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(PACE).await;
        let Some(lease) = tally
            .lease(
                "eventual read",
                fleet.lease(Intent::Read(Consistency::Eventual)),
            )
            .await
        else {
            continue;
        };
        let Some(rows) = tally
            .query("eventual read", &lease, lease.query(COUNTERS_SQL, &[]))
            .await
        else {
            continue;
        };
        let mut back = false;
        for row in &rows {
            if let (Ok(k), Ok(v)) = (row.try_get::<_, i64>(0), row.try_get::<_, i64>(1)) {
                let m = max.entry(k).or_insert(v);
                back |= v < *m;
                *m = (*m).max(v);
            }
        }
        let mut g = tally.lock();
        g.eventual_reads += 1;
        g.eventual_went_back += u64::from(back);
    }
}

// ---------------------------------------------------------------------------------------
// The report.

/// What one scenario saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub scenario: String,
    pub runtime: Duration,
    /// Lease calls made by the workload (granted or not).
    pub lease_calls: u64,
    /// Leases granted.
    pub leases: u64,
    pub writes_acked: u64,
    pub writes_unacked: u64,
    pub lost: u64,
    pub stale: u64,
    /// Lease calls longer than `lease_timeout + ryw_wait + 500 ms`.
    pub hung: u64,
    /// Queries abandoned after 10 s.
    pub hung_queries: u64,
    pub errors: BTreeMap<String, u64>,
    pub errors_by_op: BTreeMap<String, u64>,
    pub longest_wait: Duration,
    pub longest_wait_what: String,
    pub per_server: BTreeMap<String, u64>,
    pub ryw_reads: u64,
    pub ryw_on_replica: u64,
    pub session_reads: u64,
    pub eventual_reads: u64,
    pub eventual_went_back: u64,
    /// From the fault to the server leaving rotation, as the fleet's status shows it.
    pub leave_rotation: Option<Duration>,
    /// From the end of the fault to the server serving again.
    pub serve_again: Option<Duration>,
    /// Scenario-specific checks that failed.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    /// Stale reads, lost writes, hangs (the first few).
    pub details: Vec<String>,
    /// The fleet's status table at the end.
    pub status: String,
}

fn ms(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_secs(10) => format!("{}ms", d.as_millis()),
        Some(d) => format!("{:.1}s", d.as_secs_f64()),
    }
}

impl Report {
    /// Lost writes, stale reads, hung leases and queries all 0, and no scenario check failed.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.stale == 0
            && self.hung == 0
            && self.hung_queries == 0
            && self.failures.is_empty()
    }

    /// Leases granted per server, in [`SERVERS`] order, joined by `/`.
    pub fn per_server_column(&self) -> String {
        SERVERS
            .iter()
            .map(|s| self.per_server.get(*s).copied().unwrap_or(0).to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The column names of [`Report::row`].
    pub fn header() -> String {
        format!(
            "{:<17} {:>7} {:>17} {:>6} {:>5} {:>5} {:>4} {:>8} {:>7} {:>7} {:>6} {:<4}  errors by kind",
            "scenario",
            "leases",
            "p/r1/r2",
            "acked",
            "lost",
            "stale",
            "hung",
            "wait_max",
            "leave",
            "back",
            "time",
            "ok"
        )
    }

    /// One line: scenario, leases, leases per server (primary/replica1/replica2), writes
    /// acknowledged, writes lost, stale reads, hung leases, longest lease wait, time to
    /// leave rotation, time to serve again, runtime, pass/fail, errors by kind.
    pub fn row(&self) -> String {
        let errors = if self.errors.is_empty() {
            "-".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, n)| format!("{k}:{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "{:<17} {:>7} {:>17} {:>6} {:>5} {:>5} {:>4} {:>8} {:>7} {:>7} {:>5.1}s {:<4}  {}",
            self.scenario,
            self.leases,
            self.per_server_column(),
            self.writes_acked,
            self.lost,
            self.stale,
            self.hung + self.hung_queries,
            ms(Some(self.longest_wait)),
            ms(self.leave_rotation),
            ms(self.serve_again),
            self.runtime.as_secs_f64(),
            if self.passed() { "pass" } else { "FAIL" },
            errors
        )
    }

    /// Everything, on several lines.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}\n{}", Self::header(), self.row());
        let _ = writeln!(
            s,
            "  lease calls {}, granted {}; per server {:?}",
            self.lease_calls, self.leases, self.per_server
        );
        let _ = writeln!(
            s,
            "  writes acknowledged {}, unacknowledged (outcome unknown or failed) {}, lost {}",
            self.writes_acked, self.writes_unacked, self.lost
        );
        let _ = writeln!(
            s,
            "  read-your-writes reads {} ({} on replicas), session reads {}, eventual reads {} \
             ({} went back in time: allowed for plain eventual reads)",
            self.ryw_reads,
            self.ryw_on_replica,
            self.session_reads,
            self.eventual_reads,
            self.eventual_went_back
        );
        let _ = writeln!(
            s,
            "  stale reads {}, hung leases {}, hung queries {}; longest lease wait {:?} ({})",
            self.stale, self.hung, self.hung_queries, self.longest_wait, self.longest_wait_what
        );
        for (k, n) in &self.errors_by_op {
            let _ = writeln!(s, "  error  {k} x{n}");
        }
        for n in &self.notes {
            let _ = writeln!(s, "  note   {n}");
        }
        for d in &self.details {
            let _ = writeln!(s, "  detail {d}");
        }
        for f in &self.failures {
            let _ = writeln!(s, "  FAILED {f}");
        }
        let _ = write!(s, "{}", self.status);
        s
    }

    /// Panics with the whole report unless [`Report::passed`].
    pub fn assert_passed(&self) {
        assert!(
            self.passed(),
            "scenario {} failed: lost {}, stale {}, hung leases {}, hung queries {}, failures {:?}\n{}",
            self.scenario,
            self.lost,
            self.stale,
            self.hung,
            self.hung_queries,
            self.failures,
            self.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The harness: a cluster, a fleet, the workload.

/// Polls `cond` every 10 ms until it holds (returns how long that took) or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `name`'s status.
pub fn server(fleet: &Fleet, name: &str) -> Option<ServerStatus> {
    fleet.status().server(name).cloned()
}

/// `name`'s health (`Starting` if unknown).
pub fn health(fleet: &Fleet, name: &str) -> Health {
    server(fleet, name).map_or(Health::Starting, |s| s.health)
}

/// Whether `name` is out of read rotation: unhealthy, or suspect (its last probe
/// failed), which new leases already avoid.
pub fn out_of_rotation(fleet: &Fleet, name: &str) -> bool {
    server(fleet, name).is_none_or(|s| s.suspect || s.health != Health::Healthy)
}

/// Leases granted on `name` so far (all of the fleet's, not only the workload's).
pub fn leases_on(fleet: &Fleet, name: &str) -> u64 {
    server(fleet, name).map_or(0, |s| s.leases)
}

/// A running scenario: its cluster, its fleet, the workload on it, and its report.
#[derive(Debug)]
pub struct Harness {
    pub cluster: Arc<LocalCluster>,
    pub fleet: Fleet,
    pub config: Config,
    pub tally: Arc<Tally>,
    pub report: Report,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Harness {
    /// Starts a cluster (primary + 2 replicas) and a fleet on it with [`FLEET_TOML`] and
    /// `tweak`, creates the table, waits until both replicas serve, and starts the workload.
    pub async fn start(scenario: &str, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Harness> {
        Self::start_with(scenario, |b| b, tweak).await
    }

    /// [`Harness::start`], with `cluster` applied to the cluster's builder first (e.g.
    /// [`ClusterBuilder::replica_setting`]s).
    pub async fn start_with(
        scenario: &str,
        cluster: impl FnOnce(ClusterBuilder) -> ClusterBuilder,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Harness> {
        let started = Instant::now();
        let cluster = cluster(LocalCluster::builder().replicas(2)).start().await?;
        let mut config = Config::from_toml_str(&cluster.pgfleet_toml_with(FLEET_TOML))?;
        tweak(&mut config);
        config.validate()?;
        let fleet = Fleet::start(config.clone()).await?;
        anyhow::ensure!(
            fleet.wait_ready(Duration::from_secs(30)).await,
            "fleet not ready:\n{}",
            fleet.status()
        );
        {
            let w = fleet.lease(Intent::Write).await?;
            let mut sql = "DROP TABLE IF EXISTS chaos; \
                CREATE TABLE chaos (key bigint PRIMARY KEY, value bigint NOT NULL, \
                writer int NOT NULL, token text); "
                .to_owned();
            for w in 0..WRITERS {
                let _ = write!(
                    sql,
                    "INSERT INTO chaos VALUES ({}, 0, {w}, NULL); ",
                    -(i64::from(w) + 1)
                );
            }
            w.batch_execute(&sql).await?;
        }
        cluster.wait_all_replayed(Duration::from_secs(30)).await?;
        for &name in &SERVERS[1..] {
            let f = &fleet;
            let served = wait_until(Duration::from_secs(15), || async move {
                match f.lease(Intent::Read(Consistency::Eventual)).await {
                    Ok(l) => l.server() == name,
                    Err(_) => false,
                }
            })
            .await;
            anyhow::ensure!(
                served.is_some(),
                "{name} never served an eventual read before the scenario:\n{}",
                fleet.status()
            );
        }
        let tally = Arc::new(Tally::new(&config));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            tasks.push(tokio::spawn(writer(
                fleet.clone(),
                w,
                tally.clone(),
                stop.clone(),
            )));
        }
        for id in 0..SESSION_READERS {
            tasks.push(tokio::spawn(session_reader(
                fleet.clone(),
                id,
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
        Ok(Harness {
            cluster: Arc::new(cluster),
            fleet,
            config,
            tally,
            report: Report {
                scenario: scenario.to_owned(),
                ..Report::default()
            },
            stop,
            tasks,
            started,
        })
    }

    /// Records a failed scenario check.
    pub fn fail(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("chaos {}: FAILED {what}", self.report.scenario);
        self.report.failures.push(what);
    }

    /// Records a note for the report.
    pub fn note(&mut self, what: impl Into<String>) {
        self.report.notes.push(what.into());
    }

    /// Waits until the workload has `acks` more acknowledged writes and at least `min`
    /// has passed (keeping the load on through a fault); a failure if writes stall for 20 s
    /// beyond `min`.
    pub async fn progress(&mut self, what: &str, acks: u64, min: Duration) {
        let t = Instant::now();
        let target = self.tally.acked() + acks;
        let tally = &self.tally;
        let done = wait_until(min + Duration::from_secs(20), || async move {
            tally.acked() >= target && t.elapsed() >= min
        })
        .await;
        if done.is_none() {
            let got = self.tally.acked() + acks - target;
            self.fail(format!(
                "{what}: only {got} of {acks} writes acknowledged in {:?}",
                t.elapsed()
            ));
        }
    }

    /// Waits for `what` (a failed check if it does not happen within `timeout`); returns
    /// how long it took.
    pub async fn expect<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: F,
    ) -> Option<Duration>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let r = wait_until(timeout, cond).await;
        if r.is_none() {
            let status = self.fleet.status();
            self.fail(format!("{what}: not within {timeout:?}\n{status}"));
        }
        r
    }

    /// Waits until `name` is healthy and has been granted a lease after this call: the
    /// time to serve again.
    pub async fn serves_again(&mut self, name: &str) -> Option<Duration> {
        let base = leases_on(&self.fleet, name);
        let fleet = self.fleet.clone();
        self.expect(
            &format!("{name} to serve again"),
            Duration::from_secs(30),
            || {
                let f = fleet.clone();
                async move { health(&f, name) == Health::Healthy && leases_on(&f, name) > base }
            },
        )
        .await
    }

    /// Stops the workload, checks every acknowledged write against the primary, shuts
    /// the fleet down and returns the report (the cluster is dropped: its servers stop).
    pub async fn finish(mut self) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::Release);
        for t in std::mem::take(&mut self.tasks) {
            let abort = t.abort_handle();
            match tokio::time::timeout(Duration::from_secs(30), t).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail(format!("a workload task panicked: {e}")),
                Err(_) => {
                    abort.abort();
                    self.fail("a workload task did not stop within 30 s");
                }
            }
        }
        let (lost, lost_details) = verify(&self.fleet, &self.tally).await?;
        {
            let acked = self.tally.acked();
            let g = self.tally.lock();
            let r = &mut self.report;
            r.lease_calls = g.lease_calls;
            r.leases = g.leases;
            r.writes_acked = acked;
            r.writes_unacked = g.unacked;
            r.lost = lost;
            r.stale = g.stale;
            r.hung = g.hung;
            r.hung_queries = g.hung_queries;
            r.errors = g.errors.clone();
            r.errors_by_op = g.errors_by_op.clone();
            r.longest_wait = g.longest_wait;
            r.longest_wait_what = g.longest_wait_what.clone();
            r.per_server = g.per_server.clone();
            r.ryw_reads = g.ryw_reads;
            r.ryw_on_replica = g.ryw_on_replica;
            r.session_reads = g.session_reads;
            r.eventual_reads = g.eventual_reads;
            r.eventual_went_back = g.eventual_went_back;
            r.details = g.details.clone();
            r.details.extend(lost_details);
            r.failures
                .extend(g.broken.iter().take(MAX_DETAILS).cloned());
            // A run whose reads all failed checks nothing.
            if g.ryw_reads == 0 {
                r.failures
                    .push("no read-your-writes read returned data".into());
            }
            if g.session_reads == 0 {
                r.failures.push("no session read returned data".into());
            }
        }
        self.report.status = self.fleet.status().to_string();
        let left = self.fleet.shutdown().await;
        if left > 0 {
            self.note(format!("{left} leases still out at shutdown"));
        }
        self.report.runtime = self.started.elapsed();
        Ok(std::mem::take(&mut self.report))
    }
}

impl Drop for Harness {
    /// A scenario that returns early (`?`) without [`Harness::finish`] leaves no workload
    /// running: the tasks are told to stop and aborted (a no-op for finished ones).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A spawned task aborted when dropped before it finished, so a scenario that returns
/// early with `?` leaves nothing of it running. Awaiting it awaits the task.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Reads everything from the primary (strong reads, retried while it is away) and counts
/// acknowledged writes that are missing or changed.
async fn verify(fleet: &Fleet, tally: &Tally) -> anyhow::Result<(u64, Vec<String>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let lease = loop {
        match fleet.lease(Intent::Read(Consistency::Strong)).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("verify: strong lease failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("verify: no strong lease on the primary: {e}"),
        }
    };
    anyhow::ensure!(lease.role() == Role::Primary, "verify: not on the primary");
    let rows = lease
        .query("SELECT key, value FROM chaos WHERE key < $1", &[&BULK_BASE])
        .await?;
    let mut on_primary = HashMap::with_capacity(rows.len());
    for r in &rows {
        on_primary.insert(r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?);
    }
    let (rows_acked, counters, ranges) = {
        let g = tally.lock();
        (
            g.acked_rows.clone(),
            g.acked_counters.clone(),
            g.acked_ranges.clone(),
        )
    };
    let mut lost = 0u64;
    let mut details = Vec::new();
    let mut detail = |d: String| {
        if details.len() < MAX_DETAILS {
            details.push(d);
        }
    };
    for (k, v) in rows_acked {
        let got = on_primary.get(&k);
        if got != Some(&v) {
            lost += 1;
            detail(format!(
                "LOST WRITE: key {k} = {v} acknowledged; the primary has {got:?}"
            ));
        }
    }
    for (k, values) in counters {
        // One writer per counter, one increment at a time: each acknowledged value must
        // be above the one before, or an acknowledged increment was lost and redone.
        let repeats = values.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
        if repeats > 0 {
            lost += repeats;
            detail(format!(
                "LOST WRITE: counter {k} acknowledged a value not above the one before it {repeats} times"
            ));
        }
        let fin = on_primary.get(&k).copied().unwrap_or(i64::MIN);
        let missing = values.iter().filter(|&&v| v > fin).count() as u64;
        if missing > 0 {
            lost += missing;
            detail(format!(
                "LOST WRITE: counter {k} acknowledged up to {:?}; the primary has {fin}",
                values.iter().max()
            ));
        }
    }
    for (lo, hi) in ranges {
        let n: i64 = lease
            .query_one(
                "SELECT count(*) FROM chaos WHERE key BETWEEN $1 AND $2 AND value = key",
                &[&lo, &hi],
            )
            .await?
            .try_get(0)?;
        let want = hi - lo + 1;
        if n != want {
            lost += 1;
            detail(format!(
                "LOST WRITE: bulk write of {want} rows from key {lo}: the primary has {n}"
            ));
        }
    }
    Ok((lost, details))
}

// ---------------------------------------------------------------------------------------
// The scenarios.

/// Runs the scenario called `name` (one of [`SCENARIOS`]).
pub async fn run(name: &str) -> anyhow::Result<Report> {
    match name {
        "replica_kill9" => replica_kill9().await,
        "replica_hang" => replica_hang().await,
        "replication_lag" => replication_lag().await,
        "primary_restart" => primary_restart().await,
        "connection_storm" => connection_storm().await,
        "failing_actor" => failing_actor().await,
        "standby_older" => standby_older().await,
        other => anyhow::bail!("no scenario {other:?}; scenarios: {SCENARIOS:?}"),
    }
}

/// Before the fault: the workload reaches every server.
async fn warm_up(h: &mut Harness) {
    h.progress("warm-up", 30, Duration::from_millis(500)).await;
}

/// `replica1` is killed with `kill -9` under load, stays down through its actor's
/// `down_after` and restarts, then is started again: it leaves rotation and serves again.
pub async fn replica_kill9() -> anyhow::Result<Report> {
    let mut h = Harness::start("replica_kill9", |_| {}).await?;
    warm_up(&mut h).await;
    let fleet = h.fleet.clone();
    let (killed, left) = tokio::join!(
        h.cluster.kill9(h.cluster.replica(0)),
        wait_until(Duration::from_secs(20), || {
            let f = fleet.clone();
            async move { out_of_rotation(&f, "replica1") }
        })
    );
    killed?;
    h.report.leave_rotation = left;
    if left.is_none() {
        h.fail("replica1 did not leave rotation within 20 s of kill -9");
    }
    // Down for a while: its actor fails after down_after and is restarted with backoff.
    let down = h.config.fleet.down_after * 3;
    h.progress("writes while replica1 is down", 30, down).await;
    let restarts = server(&h.fleet, "replica1").map_or(0, |s| s.restarts);
    h.note(format!("replica1 actor restarts while down: {restarts}"));
    h.cluster.start(h.cluster.replica(0)).await?;
    h.report.serve_again = h.serves_again("replica1").await;
    h.progress("writes after replica1 is back", 30, Duration::from_secs(1))
        .await;
    h.finish().await
}

/// `replica1` hangs: its proxy blackholes traffic mid-run (no RST, no answer), then passes
/// again.
pub async fn replica_hang() -> anyhow::Result<Report> {
    let mut h = Harness::start("replica_hang", |_| {}).await?;
    warm_up(&mut h).await;
    h.cluster.replica(0).proxy().blackhole();
    let fleet = h.fleet.clone();
    h.report.leave_rotation = h
        .expect(
            "replica1 to leave rotation after the blackhole",
            Duration::from_secs(20),
            || {
                let f = fleet.clone();
                async move { out_of_rotation(&f, "replica1") }
            },
        )
        .await;
    h.progress("writes while replica1 hangs", 30, Duration::from_secs(3))
        .await;
    h.cluster.replica(0).proxy().pass();
    h.report.serve_again = h.serves_again("replica1").await;
    h.progress("writes after replica1 is back", 30, Duration::from_secs(1))
        .await;
    h.finish().await
}

/// The apply delay of scenario `replication_lag`.
const APPLY_DELAY: Duration = Duration::from_millis(500);

/// The most lag seen on a replica during a phase of `replication_lag`.
#[derive(Debug, Default)]
struct LagSeen {
    samples: u64,
    /// The fleet's status: time lag and bytes behind.
    status_time: Duration,
    status_bytes: u64,
    /// Measured: the primary's insert LSN minus the replica's replay LSN.
    measured_bytes: u64,
    measure_error: Option<String>,
}

/// Replication lag on `replica1`: replay paused, then resumed with an apply delay of
/// 500 ms (the lag must show, in the fleet's status and measured on the servers), then the
/// delay removed. Sessions and read-your-writes reads must not see the lag; plain eventual
/// reads may.
pub async fn replication_lag() -> anyhow::Result<Report> {
    let mut h = Harness::start("replication_lag", |_| {}).await?;
    warm_up(&mut h).await;
    let cluster = h.cluster.clone();
    let r1 = cluster.replica(0);
    let paused_at = Instant::now();
    h.cluster.pause_replay(r1).await?;
    let fleet = h.fleet.clone();
    h.report.leave_rotation = h
        .expect(
            "the fleet to see replica1's replay paused",
            Duration::from_secs(10),
            || {
                let f = fleet.clone();
                async move { server(&f, "replica1").is_some_and(|s| s.paused) }
            },
        )
        .await
        .map(|_| paused_at.elapsed());
    h.progress("writes while replay is paused", 30, Duration::from_secs(2))
        .await;
    let lag = server(&h.fleet, "replica1").and_then(|s| s.lag_bytes);
    h.note(format!("replica1 lag with replay paused: {lag:?} bytes"));
    h.cluster.resume_replay(r1).await?;
    h.cluster.set_apply_delay(r1, APPLY_DELAY).await?;
    let delay_began = Instant::now();
    let ryw_before = h.tally.lock().ryw_reads;
    // While the writes run, sample replica1's lag: as the fleet sees it, and as measured
    // directly (the primary's insert LSN, then replica1's replay LSN). Only samples taken
    // once the backlog of the pause is replayed count (a replica without the delay catches
    // up within milliseconds): from twice the delay on, what is left is the delay's.
    let phase_done = AtomicBool::new(false);
    let su_primary = h.cluster.superuser_client(h.cluster.primary()).await?;
    let su_r1 = h.cluster.superuser_client(r1).await?;
    let sampler = async {
        let mut lag = LagSeen::default();
        while !phase_done.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if delay_began.elapsed() < APPLY_DELAY * 2 {
                continue;
            }
            let seen = server(&fleet, "replica1");
            let behind = async {
                let p: Lsn = su_primary
                    .query_one("SELECT pg_current_wal_insert_lsn()", &[])
                    .await?
                    .try_get(0)?;
                let r: Lsn = su_r1
                    .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                    .await?
                    .try_get(0)?;
                anyhow::Ok(u64::from(p).saturating_sub(u64::from(r)))
            }
            .await;
            lag.samples += 1;
            if let Some(s) = seen {
                lag.status_bytes = lag.status_bytes.max(s.lag_bytes.unwrap_or(0));
                lag.status_time = lag.status_time.max(s.lag.unwrap_or_default());
            }
            match behind {
                Ok(b) => lag.measured_bytes = lag.measured_bytes.max(b),
                Err(e) => lag.measure_error = Some(format!("{e:#}")),
            }
        }
        lag
    };
    let (lag, ()) = tokio::join!(sampler, async {
        h.progress("writes with an apply delay", 30, APPLY_DELAY * 6)
            .await;
        phase_done.store(true, Ordering::Release);
    });
    let ryw_during = h.tally.lock().ryw_reads - ryw_before;
    h.note(format!(
        "replica1 with a {APPLY_DELAY:?} apply delay, {} samples from {:?} on: the fleet saw up to \
         {:?} and {} bytes behind; measured up to {} bytes behind the primary's insert LSN; \
         {ryw_during} read-your-writes reads meanwhile",
        lag.samples,
        APPLY_DELAY * 2,
        lag.status_time,
        lag.status_bytes,
        lag.measured_bytes
    ));
    if let Some(e) = &lag.measure_error {
        h.fail(format!(
            "measuring replica1's replay against the primary: {e}"
        ));
    }
    if lag.samples == 0 {
        h.fail("the apply delay phase ended before any lag sample");
    }
    if lag.measured_bytes == 0 {
        h.fail(format!(
            "replica1's replay LSN was never behind the primary's insert LSN with a {APPLY_DELAY:?} apply delay"
        ));
    }
    // Replay waits for each commit until it is APPLY_DELAY old: the time lag hovers
    // around the delay, so its maximum is at least half of it.
    if lag.status_time < APPLY_DELAY / 2 || lag.status_bytes == 0 {
        h.fail(format!(
            "the fleet did not see replica1 behind with a {APPLY_DELAY:?} apply delay: time lag up to {:?} \
             (at least half the delay expected), {} bytes",
            lag.status_time, lag.status_bytes
        ));
    }
    if ryw_during == 0 {
        h.fail("no read-your-writes read ran during the apply delay");
    }
    h.cluster.set_apply_delay(r1, Duration::ZERO).await?;
    let base = leases_on(&h.fleet, "replica1");
    let fleet = h.fleet.clone();
    h.report.serve_again = h
        .expect(
            "replica1 caught up (time lag under 100 ms) and serving",
            Duration::from_secs(30),
            || {
                let f = fleet.clone();
                async move {
                    server(&f, "replica1").is_some_and(|s| {
                        !s.paused
                            && s.health == Health::Healthy
                            && s.lag.is_some_and(|l| l < Duration::from_millis(100))
                            && s.leases > base
                    })
                }
            },
        )
        .await;
    h.progress("writes after the lag", 30, Duration::from_secs(1))
        .await;
    h.finish().await
}

/// Error kinds ([`kind`]) a write may fail with while the primary restarts with
/// `pg_ctl restart -m fast`, and nothing else:
/// - `Postgres/57P01` (admin_shutdown): the fast shutdown terminates running queries;
/// - `Postgres/57P03` (cannot_connect_now): the server is shutting down or starting up;
/// - `Postgres/conn`: the connection closed under a query, or an I/O error on it;
/// - `Connect`: a new connection refused while the server is down;
/// - `NoPrimary`, `Timeout`: a lease that waited out `lease_timeout` for a primary.
const GAP_KINDS: &[&str] = &[
    "Postgres/57P01",
    "Postgres/57P03",
    "Postgres/conn",
    "Connect",
    "NoPrimary",
    "Timeout",
];

/// The primary restarts (`pg_ctl restart -m fast`): writes fail with a typed error during
/// the gap and succeed after it; no acknowledged write is lost.
///
/// A restart often takes less than `lease_timeout`, so write leases asked for during the
/// gap may simply wait for the primary and succeed. What must fail is a write in flight
/// when the primary goes down: one long write (an INSERT that sleeps 30 s) is running
/// across the restart, and must end with a typed error, its row absent.
pub async fn primary_restart() -> anyhow::Result<Report> {
    let mut h = Harness::start("primary_restart", |_| {}).await?;
    warm_up(&mut h).await;
    let long_key = 900 * KEY_SPAN;
    // Ok(rows), or Err((kind, what happened)).
    let long_write = {
        let fleet = h.fleet.clone();
        AbortOnDrop(tokio::spawn(async move {
            let lease = fleet.lease(Intent::Write).await.map_err(|e| {
                let k = kind(&e);
                (k, format!("the lease failed: {e}"))
            })?;
            let t = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                lease.execute(
                    "INSERT INTO chaos (key, value, writer, token) \
                     SELECT $1, 0, -2, NULL FROM pg_sleep(30)",
                    &[&long_key],
                ),
            )
            .await;
            match r {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => {
                    let e = lease.error(e);
                    Err((kind(&e), format!("after {:?}: {e}", t.elapsed())))
                }
                Err(_) => Err(("QueryHung".to_owned(), "no answer in 30 s".to_owned())),
            }
        }))
    };
    let su = h.cluster.superuser_client(h.cluster.primary()).await?;
    let su = &su;
    let running = wait_until(Duration::from_secs(10), || async move {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query LIKE '%FROM pg_sleep(30)' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .is_ok_and(|r| r.try_get::<_, i64>(0).is_ok_and(|n| n == 1))
    })
    .await;
    if running.is_none() {
        h.fail("the long write never ran on the primary");
    }
    let fleet = h.fleet.clone();
    let began = Instant::now();
    let (restarted, left) = tokio::join!(
        h.cluster.restart(h.cluster.primary()),
        wait_until(Duration::from_secs(20), || {
            let f = fleet.clone();
            async move { f.status().primary_down || health(&f, "primary") != Health::Healthy }
        })
    );
    restarted?;
    let back = Instant::now();
    h.report.leave_rotation = left;
    if left.is_none() {
        h.note("the fleet never saw the primary down (the restart was faster than its probes)");
    }
    h.note(format!("pg_ctl restart took {:?}", back - began));
    match tokio::time::timeout(Duration::from_secs(40), long_write).await {
        Ok(Ok(Err((k, what)))) if GAP_KINDS.contains(&k.as_str()) => {
            h.note(format!(
                "the write in flight across the restart failed: {k} {what}"
            ));
        }
        Ok(Ok(Err((k, what)))) => h.fail(format!(
            "the write in flight across the restart failed with {k} ({what}): not a kind expected of a \
             restarting primary {GAP_KINDS:?}"
        )),
        Ok(Ok(Ok(n))) => h.fail(format!(
            "the write in flight across the restart succeeded ({n} rows)"
        )),
        Ok(Err(e)) => h.fail(format!("the long write task panicked: {e}")),
        Err(_) => h.fail("the write in flight across the restart hung"),
    }
    let tally = h.tally.clone();
    h.report.serve_again = h
        .expect(
            "a write acknowledged after the restart",
            Duration::from_secs(30),
            || {
                let t = tally.clone();
                async move { t.acks_since(back) > 0 }
            },
        )
        .await;
    let gap_end = Instant::now();
    h.progress("writes after the restart", 50, Duration::from_secs(1))
        .await;
    let mut gap_errors = h.tally.errors_between("write", began, gap_end);
    for (k, n) in h.tally.errors_between("commit_token", began, gap_end) {
        *gap_errors.entry(format!("commit_token {k}")).or_default() += n;
    }
    h.note(format!(
        "workload write errors during the gap: {gap_errors:?}"
    ));
    for (k, n) in &gap_errors {
        let k = k.trim_start_matches("commit_token ");
        if !GAP_KINDS.contains(&k) {
            h.fail(format!(
                "write failed during the gap with {k} x{n}: not a kind expected of a restarting primary \
                 {GAP_KINDS:?}"
            ));
        }
    }
    // The failed write left nothing behind.
    let n: i64 = h
        .fleet
        .lease(Intent::Read(Consistency::Strong))
        .await?
        .query_one("SELECT count(*) FROM chaos WHERE key = $1", &[&long_key])
        .await?
        .try_get(0)?;
    if n != 0 {
        h.fail("the write that failed across the restart is on the primary");
    }
    h.finish().await
}

/// Tasks in the connection storm.
const STORM: usize = 1000;

/// What one storm lease did.
#[derive(Debug)]
enum StormOutcome {
    Granted(Duration),
    TimedOut(Duration),
    Other(Duration, String),
    NeverReturned,
}

/// A connection storm: 1000 tasks ask for leases at once on pools of 8 (while the workload
/// runs): every lease succeeds or fails with `Timeout` within `lease_timeout` + 100 ms.
/// The storm's lease calls count in the report like the workload's (leases, errors by
/// kind under `storm`, longest wait).
pub async fn connection_storm() -> anyhow::Result<Report> {
    let mut h = Harness::start("connection_storm", |c| {
        c.primary.pool_size = 8;
        for r in &mut c.replicas {
            r.pool_size = 8;
        }
    })
    .await?;
    warm_up(&mut h).await;
    let lease_timeout = h.config.fleet.lease_timeout;
    let bound = lease_timeout + Duration::from_millis(100);
    let latest = h.tally.latest().map(|(t, _, _)| t);
    let gate = Arc::new(tokio::sync::Barrier::new(STORM));
    let tasks: Vec<_> = (0..STORM)
        .map(|i| {
            let fleet = h.fleet.clone();
            let gate = gate.clone();
            let tally = h.tally.clone();
            AbortOnDrop(tokio::spawn(async move {
                let intent = match (i % 4, latest) {
                    (0, _) => Intent::Write,
                    (1, _) => Intent::Read(Consistency::Eventual),
                    (2, _) => Intent::Read(Consistency::Strong),
                    (_, Some(t)) => Intent::read_after(&t),
                    (_, None) => Intent::read(),
                };
                gate.wait().await;
                let t = Instant::now();
                let r = tokio::time::timeout(tally.never_returns(), fleet.lease(intent)).await;
                let took = t.elapsed();
                // Into the report's leases, errors by kind and longest wait (and hung
                // leases, for a call that never returned).
                tally.record("storm", took, &r);
                match r {
                    Ok(Ok(lease)) => {
                        // Hold it 100 ms, as real work would: 250 writes on a pool of 8
                        // need about 3 s, longer than lease_timeout, so some must time out.
                        let _ = tokio::time::timeout(
                            QUERY_LIMIT,
                            lease.simple_query("SELECT pg_sleep(0.1)"),
                        )
                        .await;
                        StormOutcome::Granted(took)
                    }
                    Ok(Err(Error::Timeout { .. })) => StormOutcome::TimedOut(took),
                    Ok(Err(e)) => StormOutcome::Other(took, kind(&e)),
                    Err(_) => StormOutcome::NeverReturned,
                }
            }))
        })
        .collect();
    let storm_began = Instant::now();
    let (mut granted, mut timed_out, mut late, mut hung) = (0u64, 0u64, 0u64, 0u64);
    let mut other = BTreeMap::<String, u64>::new();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        match t.await {
            Ok(StormOutcome::Granted(d))
            | Ok(StormOutcome::TimedOut(d))
            | Ok(StormOutcome::Other(d, _))
                if d > bound =>
            {
                late += 1;
                slowest = slowest.max(d);
            }
            Ok(StormOutcome::Granted(d)) => {
                granted += 1;
                slowest = slowest.max(d);
            }
            Ok(StormOutcome::TimedOut(d)) => {
                timed_out += 1;
                slowest = slowest.max(d);
            }
            Ok(StormOutcome::Other(d, k)) => {
                *other.entry(k).or_default() += 1;
                slowest = slowest.max(d);
            }
            Ok(StormOutcome::NeverReturned) => hung += 1,
            Err(e) => {
                h.fail(format!("a storm task panicked: {e}"));
            }
        }
    }
    let storm_took = storm_began.elapsed();
    h.note(format!(
        "storm of {STORM} leases on pools of 8 took {storm_took:?}: {granted} granted, {timed_out} Timeout, \
         other errors {other:?}, {late} over {bound:?}, {hung} never returned; slowest {slowest:?}"
    ));
    if late > 0 {
        h.fail(format!(
            "{late} storm leases took longer than lease_timeout + 100 ms (slowest {slowest:?})"
        ));
    }
    if !other.is_empty() {
        h.fail(format!(
            "storm leases failed with something other than Timeout: {other:?}"
        ));
    }
    if granted == 0 {
        h.fail("no storm lease was granted");
    }
    if timed_out == 0 {
        h.fail("no storm lease timed out: the storm did not exhaust the pools");
    }
    h.progress("writes after the storm", 30, Duration::from_secs(1))
        .await;
    // The storm's leases are in the tally (a call that never returned is a hung lease).
    h.finish().await
}

/// A server actor that keeps failing: `replica2`'s server is stopped, so its actor fails
/// after `down_after` every time it is restarted. The supervisor keeps restarting it with
/// growing backoff; the rest of the fleet serves; once the server is back, it serves again.
pub async fn failing_actor() -> anyhow::Result<Report> {
    const RESTARTS: usize = 5;
    let mut h = Harness::start("failing_actor", |c| {
        c.fleet.restart.min_backoff = Duration::from_millis(200);
        c.fleet.restart.max_backoff = Duration::from_millis(3200);
    })
    .await?;
    warm_up(&mut h).await;
    let fleet = h.fleet.clone();
    let cluster = h.cluster.clone();
    let r2 = cluster.replica(1);
    let stopped_at = Instant::now();
    h.cluster.stop(r2).await?;
    h.report.leave_rotation = h
        .expect(
            "replica2 to leave rotation after its server stopped",
            Duration::from_secs(20),
            || {
                let f = fleet.clone();
                async move { health(&f, "replica2") != Health::Healthy }
            },
        )
        .await
        .map(|_| stopped_at.elapsed());
    let others_before = (
        leases_on(&h.fleet, "primary"),
        leases_on(&h.fleet, "replica1"),
    );
    let restarts_before = server(&h.fleet, "replica2").map_or(0, |s| s.restarts);
    // Watch the status: each restart is a window in `Restarting` (the backoff), then a new
    // incarnation that fails again after down_after.
    let mut windows = Vec::<Duration>::new();
    let mut failures_at = Vec::<Instant>::new();
    let mut in_window: Option<Instant> = None;
    let mut last_restarts = restarts_before;
    let watch_until = Instant::now() + Duration::from_secs(40);
    while windows.len() < RESTARTS && Instant::now() < watch_until {
        let s = server(&h.fleet, "replica2");
        let restarting = s.as_ref().is_some_and(|s| s.health == Health::Restarting);
        let restarts = s.as_ref().map_or(0, |s| s.restarts);
        let now = Instant::now();
        if restarts > last_restarts {
            failures_at.push(now);
            last_restarts = restarts;
        }
        match (in_window, restarting) {
            (None, true) => in_window = Some(now),
            (Some(t), false) => {
                windows.push(now - t);
                in_window = None;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = server(&h.fleet, "replica2");
    let restarts = status.as_ref().map_or(0, |s| s.restarts);
    let intervals: Vec<Duration> = failures_at.windows(2).map(|w| w[1] - w[0]).collect();
    h.note(format!(
        "replica2 restarts {restarts_before} -> {restarts}; backoff windows (Restarting) {windows:?}; \
         between failures {intervals:?}; last error {:?}",
        status.as_ref().and_then(|s| s.last_error.clone())
    ));
    if windows.len() < RESTARTS {
        h.fail(format!(
            "only {} restart windows seen in 40 s (restarts {restarts_before} -> {restarts})",
            windows.len()
        ));
    }
    if (restarts as usize) < restarts_before as usize + windows.len() {
        h.fail(format!(
            "status restarts did not grow with the restarts: {restarts_before} -> {restarts}"
        ));
    }
    // Equal jitter keeps each backoff within [d/2, d] of an exponential curve, so the
    // windows never shrink (beyond polling noise) and the last is at least twice the first.
    let slack = Duration::from_millis(100);
    for w in windows.windows(2) {
        if w[1] + slack < w[0] {
            h.fail(format!(
                "backoff shrank: {:?} after {:?} ({windows:?})",
                w[1], w[0]
            ));
        }
    }
    if let (Some(first), Some(last)) = (windows.first(), windows.last()) {
        if windows.len() >= 3 && *last < *first * 2 {
            h.fail(format!("backoff did not grow: {windows:?}"));
        }
    }
    for i in &intervals {
        if *i < h.config.fleet.down_after {
            h.fail(format!(
                "the actor failed again {i:?} after the previous failure, before down_after"
            ));
        }
    }
    let others_after = (
        leases_on(&h.fleet, "primary"),
        leases_on(&h.fleet, "replica1"),
    );
    if others_after.0 <= others_before.0 || others_after.1 <= others_before.1 {
        h.fail(format!(
            "the rest of the fleet did not serve while replica2 kept failing: primary {} -> {}, replica1 {} -> {}",
            others_before.0, others_after.0, others_before.1, others_after.1
        ));
    }
    h.cluster.start(r2).await?;
    h.report.serve_again = h.serves_again("replica2").await;
    h.progress("writes after replica2 is back", 30, Duration::from_secs(1))
        .await;
    h.finish().await
}

/// Rows of each bulk write in `standby_older`.
const BULK: i64 = 40_000;
/// How long `standby_older` reads after the bulk token once replica1 accepts connections
/// again.
const READ_WINDOW: Duration = Duration::from_secs(3);
/// How long after the kill a held replay keeps replica1 below the bulk token at most: it
/// only has to outlast the restart and the read window, and is released after the window.
const HOLD: Duration = Duration::from_secs(30);
/// Rounds of `standby_older` in which replica1 is killed after the fleet saw it past the
/// token, at most: they repeat until one brings it back older than the token.
const CACHED_ATTEMPTS: i64 = 3;

/// A replica that comes back older than it was: `replica1` is killed with `kill -9` after
/// a bulk write (a clean stop would write a restartpoint and hide the problem) and started
/// at once. No read after the bulk write's token may miss any of its rows, and no session
/// read goes back in time, whichever server serves them.
///
/// Round 0 kills it right after the write (whether it comes back older is a race, only
/// reported). The next rounds first let the fleet see replica1 past the token, so its
/// cached position would let the old incarnation's data pass for fresh, and force the
/// hazard ([`older`]): recovery on the replicas writes no page, and an apply delay set
/// before the kill holds the bulk commit back after the restart. They repeat (at most
/// [`CACHED_ATTEMPTS`]) until replica1 is seen older than the token right after its start:
/// a failed check if it never is. After each round, once replica1 has caught up, it must
/// serve reads after the token again (a fresh probe put it back).
pub async fn standby_older() -> anyhow::Result<Report> {
    let mut h = Harness::start_with("standby_older", older::keep_consistency_early, |c| {
        // Failure detection slower than a kill -9 and restart, so the fleet may not notice
        // the restart through failed probes: only the postmaster start time shows it.
        c.fleet.probe_interval = Duration::from_millis(500);
        c.fleet.failure_threshold = 5;
        c.fleet.down_after = Duration::from_secs(5);
    })
    .await?;
    warm_up(&mut h).await;
    let mut hazard = false;
    let mut round = 0;
    while !hazard && round <= CACHED_ATTEMPTS {
        let cached = round > 0;
        let replay = older_round(&mut h, round, cached).await?;
        hazard = cached && replay.older();
        round += 1;
    }
    if !hazard {
        h.fail(format!(
            "replica1 never came back older than the bulk token in {CACHED_ATTEMPTS} rounds \
             (the hazard did not happen; nothing was tested)"
        ));
    }
    h.progress("writes after the restarts", 30, Duration::from_secs(1))
        .await;
    h.finish().await
}

/// One round of [`standby_older`]: a bulk write, `kill -9` of replica1 (`cached`: once the
/// fleet saw it past the token, with its replay held), reads after the token through the
/// restart, then replica1 released and serving reads after the token again. Returns where
/// replica1's replay stood right after its start.
async fn older_round(h: &mut Harness, round: i64, cached: bool) -> anyhow::Result<older::Replay> {
    let cluster = h.cluster.clone();
    let r1 = cluster.replica(0);
    let lo = BULK_BASE + round * 10_000_000;
    let hi = lo + BULK - 1;
    let (token, committed_at) = {
        let mut w = h.fleet.lease(Intent::Write).await?;
        w.execute(
            "INSERT INTO chaos (key, value, writer, token) \
             SELECT g, g, -1, NULL FROM generate_series($1::bigint, $2::bigint) g",
            &[&lo, &hi],
        )
        .await?;
        (w.commit_token().await?, Instant::now())
    };
    h.tally.ack_range(lo, hi);
    let mut held = None;
    if cached {
        let fleet = h.fleet.clone();
        h.expect(
            "the fleet to see replica1 past the bulk token",
            Duration::from_secs(20),
            || {
                let f = fleet.clone();
                async move {
                    server(&f, "replica1").is_some_and(|s| {
                        s.health == Health::Healthy && s.lsn.is_some_and(|l| l >= token.lsn())
                    })
                }
            },
        )
        .await;
        held = Some(older::hold_replay(&cluster, r1, committed_at, HOLD).await?);
    }
    let killed_at = Instant::now();
    h.cluster.kill9(r1).await?;
    let started = OnceLock::<Instant>::new();
    let gave_up = AtomicBool::new(false);
    let restart = async {
        let r = async {
            cluster.start(r1).await?;
            started.get_or_init(Instant::now);
            older::replay_at_start(&cluster, r1, &token).await
        }
        .await;
        gave_up.store(r.is_err(), Ordering::Release);
        r
    };
    let tally = h.tally.clone();
    let fleet = h.fleet.clone();
    let count_sql = "SELECT count(*) FROM chaos WHERE key BETWEEN $1 AND $2";
    let reads = async {
        let (session, ignored) = fleet.session_from(token);
        let mut served = BTreeMap::<String, u64>::new();
        let mut first_on_r1 = None;
        if let Some(e) = ignored {
            tally.error_kind("bulk read", format!("SessionFromIgnored({e})"));
        }
        let mut n = 0u64;
        while !gave_up.load(Ordering::Acquire)
            && started.get().is_none_or(|t| t.elapsed() < READ_WINDOW)
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
            n += 1;
            let lease = if n % 2 == 0 {
                tally
                    .lease("bulk read", fleet.lease(Intent::read_after(&token)))
                    .await
            } else {
                tally
                    .lease("bulk read", session.lease(Intent::read()))
                    .await
            };
            let Some(lease) = lease else { continue };
            let Some(got) = count_rows(&tally, &lease, count_sql, lo, hi).await else {
                continue;
            };
            tally.ryw_read(&lease);
            if got != BULK {
                tally.stale(
                    &format!(
                        "round {round}: a read after the bulk token {token} saw {got} of its {BULK} rows \
                         ({:?} after the kill)",
                        killed_at.elapsed()
                    ),
                    &lease,
                );
            }
            if lease.server() == "replica1" && first_on_r1.is_none() {
                first_on_r1 = started.get().map(|t| t.elapsed());
            }
            *served.entry(lease.server().to_owned()).or_default() += 1;
        }
        (served, first_on_r1)
    };
    let (restarted, (served, first_on_r1)) = tokio::join!(restart, reads);
    let (su, replay) = restarted?;
    // Still held at the end of the window? Then replica1 was older than the token for all
    // of it, and every read above that it served would have missed rows.
    let replay_end = older::replay_lsn(&su).await?;
    let released_at = Instant::now();
    if held.is_some() {
        older::release_replay(&cluster, r1).await?;
    }
    h.note(format!(
        "round {round} ({}): kill -9 and start took {:?}; replica1 replay at start {} vs token {} \
         (older: {}), after the {READ_WINDOW:?} window {}; apply delay {held:?}; bulk reads served by \
         {served:?}; first on replica1 {first_on_r1:?} after its start",
        if cached {
            "replica1 cached past the token, replay held"
        } else {
            "killed right after the write"
        },
        started.get().map(|t| *t - killed_at),
        replay.at_start,
        token.lsn(),
        replay.older(),
        replay_end,
    ));
    // Caught up, replica1 serves reads after the token again, with every row.
    let tally = h.tally.clone();
    let back = h
        .expect(
            &format!("round {round}: replica1 to serve a read after the bulk token again"),
            Duration::from_secs(30),
            || {
                let (tally, fleet) = (tally.clone(), fleet.clone());
                async move {
                    let Some(lease) = tally
                        .lease("bulk read", fleet.lease(Intent::read_after(&token)))
                        .await
                    else {
                        return false;
                    };
                    if lease.server() != "replica1" {
                        return false;
                    }
                    // A failed query (recorded) says nothing of the data: try again.
                    let Some(got) = count_rows(&tally, &lease, count_sql, lo, hi).await else {
                        return false;
                    };
                    tally.ryw_read(&lease);
                    if got != BULK {
                        tally.stale(
                            &format!(
                                "round {round}: replica1 back saw {got:?} of the {BULK} rows of token {token}"
                            ),
                            &lease,
                        );
                    }
                    true
                }
            },
        )
        .await;
    if cached && replay.older() && h.report.serve_again.is_none() {
        // From the release of the held replay: catching up, a fresh probe, a read served.
        h.report.serve_again = back.map(|_| released_at.elapsed());
    }
    Ok(replay)
}

/// Counts the bulk rows `lo..=hi` on `lease` (`None` if the query failed; recorded).
async fn count_rows(tally: &Tally, lease: &Lease, sql: &str, lo: i64, hi: i64) -> Option<i64> {
    let row = tally
        .query("bulk read", lease, lease.query_one(sql, &[&lo, &hi]))
        .await?;
    match row.try_get(0) {
        Ok(n) => Some(n),
        Err(e) => {
            tally.error("bulk read", &lease.error(e));
            None
        }
    }
}

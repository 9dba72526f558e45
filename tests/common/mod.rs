//! Helpers shared by the integration tests: fleets on testkit clusters, and waiting on
//! conditions with a deadline (never a bare sleep).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::time::{Duration, Instant};

use pgfleet::{Config, Fleet};
use pgfleet_testkit::LocalCluster;

/// Fast probing so tests see changes quickly.
pub const FAST: &str = "[fleet]\nprobe_interval = \"50ms\"\nprobe_timeout = \"500ms\"\nconnect_timeout = \"1s\"\nlease_timeout = \"2s\"\ndown_after = \"1s\"\n";

/// A config for `cluster` with `tables` (TOML) placed first, then `tweak` applied.
pub fn config(cluster: &LocalCluster, tables: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c =
        Config::from_toml_str(&cluster.pgfleet_toml_with(tables)).expect("testkit config parses");
    tweak(&mut c);
    c.validate().expect("tweaked config is valid");
    c
}

/// Starts a fleet and waits until every server was probed and a primary is known.
pub async fn start(config: Config) -> Fleet {
    let fleet = Fleet::start(config).await.expect("fleet starts");
    assert!(
        fleet.wait_ready(Duration::from_secs(20)).await,
        "fleet ready:\n{}",
        fleet.status()
    );
    fleet
}

/// Starts a fleet on `cluster` with the FAST settings.
pub async fn fast_fleet(cluster: &LocalCluster) -> Fleet {
    start(config(cluster, FAST, |_| {})).await
}

/// Polls `cond` every 10 ms until it is true or `timeout` passes; returns how long it took.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Retries `op` every 10 ms until it succeeds or 10 s pass; returns its value, or panics
/// with the last error.
pub async fn wait_for_ok<T, E, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let timeout = Duration::from_secs(10);
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last error: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Installs a tracing subscriber once (RUST_LOG controls it; quiet by default).
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A table name unique to this test (tests share clusters).
pub fn table(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        std::process::id() as u64 * 1000 + fastrand_u16() as u64
    )
}

fn fastrand_u16() -> u16 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u16
}

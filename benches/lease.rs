//! Lease overhead: `fleet.lease()` + drop against the bare pool's checkout + drop (same
//! pool library, same pool size, warm), sequential and with 64 concurrent tasks; and the
//! selection function alone for 2, 8 and 64 servers. No query runs in the timed region.
//!
//! Needs the PostgreSQL server binaries (it starts a testkit cluster). `cargo bench`.

#![allow(missing_docs)]

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pgfleet::{Config, Consistency, Fleet, Intent, Strategy};
use pgfleet_testkit::bare::{bare_pool, BarePool};
use pgfleet_testkit::LocalCluster;

const POOL: usize = 16;
const TASKS: u64 = 64;

fn lease_overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (cluster, fleet, bare_replica, bare_primary) = rt.block_on(async {
        let cluster = LocalCluster::builder()
            .replicas(1)
            .start()
            .await
            .expect("cluster");
        let mut config = Config::from_toml_str(&cluster.pgfleet_toml()).expect("config");
        config.primary.pool_size = POOL;
        config.replicas[0].pool_size = POOL;
        let fleet = Fleet::start(config).await.expect("fleet");
        assert!(fleet.wait_ready(Duration::from_secs(20)).await);
        let pool = |url: String| -> BarePool { bare_pool(&url, POOL).expect("pool") };
        let bare_replica = pool(cluster.replica(0).url());
        let bare_primary = pool(cluster.primary().url());
        // Warm every pool to its full size.
        let mut held = Vec::new();
        for _ in 0..POOL {
            held.push(
                fleet
                    .lease(Intent::Read(Consistency::Eventual))
                    .await
                    .expect("lease"),
            );
        }
        drop(held);
        let mut held = Vec::new();
        for _ in 0..POOL {
            held.push(fleet.lease(Intent::Write).await.expect("lease"));
        }
        drop(held);
        for p in [&bare_replica, &bare_primary] {
            let held: Vec<_> = futures_util::future::join_all((0..POOL).map(|_| p.get())).await;
            drop(held);
        }
        (cluster, fleet, bare_replica, bare_primary)
    });

    let mut g = c.benchmark_group("lease_drop_sequential");
    g.bench_function("bare_pool_replica", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(bare_replica.get().await.expect("get")) })
    });
    g.bench_function("fleet_eventual", |b| {
        b.to_async(&rt).iter(|| async {
            drop(
                fleet
                    .lease(Intent::Read(Consistency::Eventual))
                    .await
                    .expect("lease"),
            )
        })
    });
    g.bench_function("bare_pool_primary", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(bare_primary.get().await.expect("get")) })
    });
    g.bench_function("fleet_write", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(fleet.lease(Intent::Write).await.expect("lease")) })
    });
    g.bench_function("router_message", |b| {
        b.to_async(&rt).iter(|| async {
            let router = fleet.router().await.expect("router");
            let lease = pgfleet::ractor::call!(
                router,
                pgfleet::RouterMsg::Lease,
                Intent::Read(Consistency::Eventual)
            )
            .expect("call")
            .expect("lease");
            drop(lease)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lease_drop_64_tasks");
    g.bench_function("bare_pool_replica", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = bare_replica.clone();
            concurrent(iters, move || {
                let pool = pool.clone();
                async move { drop(pool.get().await.expect("get")) }
            })
        })
    });
    g.bench_function("fleet_eventual", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let fleet = fleet.clone();
            concurrent(iters, move || {
                let fleet = fleet.clone();
                async move {
                    drop(
                        fleet
                            .lease(Intent::Read(Consistency::Eventual))
                            .await
                            .expect("lease"),
                    )
                }
            })
        })
    });
    g.bench_function("fleet_write", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let fleet = fleet.clone();
            concurrent(iters, move || {
                let fleet = fleet.clone();
                async move { drop(fleet.lease(Intent::Write).await.expect("lease")) }
            })
        })
    });
    g.finish();
    rt.block_on(fleet.shutdown());
    drop(cluster);
}

/// Runs `iters` operations spread over 64 tasks; returns the wall time.
async fn concurrent<F, Fut>(iters: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per_task = iters.div_ceil(TASKS);
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    op().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    // Normalise to `iters` operations.
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_task * TASKS) as f64)
}

fn selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [2usize, 8, 64] {
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i as u32 % 3)).collect();
        let seq: Vec<u16> = (0..n as u16).collect();
        let rr = AtomicUsize::new(0);
        for (name, strategy) in [
            ("least_outstanding", Strategy::LeastOutstanding),
            ("round_robin", Strategy::RoundRobin),
            ("random", Strategy::Random),
        ] {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    pgfleet::__bench::select(
                        strategy,
                        std::hint::black_box(&weights),
                        &seq,
                        &rr,
                        |i| i % 5 != 4,
                        |i| (i as u64 * 7) % 11,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, selection, lease_overhead);
criterion_main!(benches);

//! The eventual-read lease path allocates nothing beyond what the pool itself does:
//! counted with a global counting allocator, against a bare deadpool pool doing the same
//! checkout + drop on the same replica.

#![allow(unsafe_code)] // a counting global allocator; the library itself forbids unsafe

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgfleet::{Consistency, Intent};
use pgfleet_testkit::LocalCluster;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUNDS: u64 = 2000;

#[tokio::test(flavor = "current_thread")]
async fn eventual_lease_allocates_no_more_than_the_pool() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let config = common::config(cluster, common::FAST, |c| {
        // Only replica1 reads, so both sides use one server's pool.
        c.replicas[1].weight = 0;
        c.replicas[0].pool_size = 4;
    });
    let fleet = common::start(config).await;
    let bare = pgfleet_testkit::bare::bare_pool(&cluster.replica(0).url(), 4)
        .map_err(anyhow::Error::msg)?;
    // Warm both: connections open, statement caches and lazy statics initialised.
    for _ in 0..50 {
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        assert_eq!(l.server(), "replica1");
        drop(l);
        drop(bare.get().await?);
    }
    COUNTING.store(true, Ordering::SeqCst);
    let before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..ROUNDS {
        drop(bare.get().await?);
    }
    let bare_allocs = ALLOCS.load(Ordering::SeqCst) - before;
    let before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..ROUNDS {
        drop(fleet.lease(Intent::Read(Consistency::Eventual)).await?);
    }
    let fleet_allocs = ALLOCS.load(Ordering::SeqCst) - before;
    COUNTING.store(false, Ordering::SeqCst);

    println!(
        "allocations per checkout: bare pool {:.2}, fleet lease {:.2}",
        bare_allocs as f64 / ROUNDS as f64,
        fleet_allocs as f64 / ROUNDS as f64
    );
    // Background probes allocate too (they run on this same thread between leases), so
    // allow a small margin per lease; a per-lease allocation would add a full 1.0.
    assert!(
        fleet_allocs as f64 / ROUNDS as f64 <= bare_allocs as f64 / ROUNDS as f64 + 0.5,
        "fleet lease allocates more than the pool: {fleet_allocs} vs {bare_allocs} over {ROUNDS}"
    );
    fleet.shutdown().await;
    Ok(())
}

//! Chaos: a replica that hangs (its proxy blackholes traffic mid-run, then passes again): it
//! leaves rotation, no lease hangs, and it serves again.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_replica_loses_no_write_and_hangs_no_lease() -> anyhow::Result<()> {
    common::trace();
    let report = checker::replica_hang().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

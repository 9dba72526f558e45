//! Chaos: a replica killed with `kill -9` under load, then started again: it leaves rotation and
//! serves again.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_loses_no_write_and_serves_no_stale_read() -> anyhow::Result<()> {
    common::trace();
    let report = checker::replica_kill9().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

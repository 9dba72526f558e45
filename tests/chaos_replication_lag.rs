//! Chaos: replication lag on a replica (replay paused, then a 500 ms apply delay, then
//! resumed): sessions and read-your-writes reads never see it.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_lag_is_invisible_to_sessions() -> anyhow::Result<()> {
    common::trace();
    let report = checker::replication_lag().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

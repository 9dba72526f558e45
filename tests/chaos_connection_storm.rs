//! Chaos: a connection storm of 1000 tasks on pools of 8: every lease succeeds or fails with
//! `Timeout` within `lease_timeout` + 100 ms; none hangs.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm_leases_succeed_or_time_out_in_time() -> anyhow::Result<()> {
    common::trace();
    let report = checker::connection_storm().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

//! Chaos: the primary restarts (`pg_ctl restart -m fast`): writes fail with a typed error
//! during the gap and succeed after it; no acknowledged write is lost.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_restart_fails_writes_typed_and_loses_none() -> anyhow::Result<()> {
    common::trace();
    let report = checker::primary_restart().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

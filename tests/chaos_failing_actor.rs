//! Chaos: a server actor that keeps failing (its server stopped): the supervisor keeps
//! restarting it with growing backoff while the rest of the fleet serves.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_actor_is_restarted_with_growing_backoff() -> anyhow::Result<()> {
    common::trace();
    let report = checker::failing_actor().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

//! Chaos: a replica that comes back older than it was (`kill -9` right after a bulk write,
//! started at once): no read after the write's token misses it, no session read goes back.
//!
//! The workload and the scenario are in `examples/chaos/checker.rs`, shared with
//! `cargo run --example chaos`: no acknowledged write may be lost, no read may be stale
//! (judged on the data it returned), no lease may hang; plus the scenario's own checks.

mod common;

#[path = "../examples/chaos/checker.rs"]
mod checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_older_standby_serves_no_stale_read() -> anyhow::Result<()> {
    common::trace();
    let report = checker::standby_older().await?;
    println!("{}", report.describe());
    report.assert_passed();
    Ok(())
}

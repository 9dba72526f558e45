//! Leasing through the router actor directly, as a task that already speaks ractor would.
//!
//! `fleet.router()` returns the current router; `ractor::call!` with `RouterMsg::Lease`
//! gets exactly the decision `fleet.lease` makes. When the router is restarted (here on
//! purpose), the old reference stops answering: resolve `fleet.router()` again.

use std::time::Duration;

use pgfleet::ractor::call;
use pgfleet::{Config, Fleet, Intent, RouterMsg};
use pgfleet_testkit::LocalCluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let fleet = Fleet::start(Config::from_toml_str(&cluster.pgfleet_toml())?).await?;
    anyhow::ensure!(
        fleet.wait_ready(Duration::from_secs(20)).await,
        "fleet not ready"
    );

    let router = fleet.router()?;
    let lease = call!(router, RouterMsg::Lease, Intent::read())??;
    println!("router leased {} (role {})", lease.server(), lease.role());
    drop(lease);

    // Simulate a router crash: the supervisor starts a new one at once.
    fleet.debug_fail_router();
    let stale = call!(router, RouterMsg::Lease, Intent::read());
    println!(
        "old router ref after the restart: {}",
        if stale.is_err() {
            "gone (resolve again)"
        } else {
            "answered"
        }
    );

    let new_router = loop {
        if let Ok(r) = fleet.router() {
            if r.get_id() != router.get_id() {
                break r;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let lease = call!(new_router, RouterMsg::Lease, Intent::Write)??;
    println!("new router leased {} for a write", lease.server());
    drop(lease);
    fleet.shutdown().await;
    Ok(())
}

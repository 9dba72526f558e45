//! Leasing through the router actor directly, as a task that already speaks ractor would.
//!
//! `fleet.router()` returns the current router; `ractor::call!` with `RouterMsg::Lease`
//! gets exactly the decision `fleet.lease` makes. When the router is restarted (here on
//! purpose), the old reference stops answering: resolve `fleet.router()` again (it
//! waits while the new router starts).

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

    let router = fleet.router().await?;
    let lease = call!(router, RouterMsg::Lease, Intent::read())??;
    println!("router leased {} (role {})", lease.server(), lease.role());
    drop(lease);

    // Simulate a router crash: the supervisor starts a new one at once (with backoff
    // if it kept failing). Leases that need no wait keep being decided meanwhile.
    fleet.debug_fail_router();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let new_router = loop {
        // `fleet.router()` waits while no router runs; poll until it is the new one.
        let r = fleet.router().await?;
        if r.get_id() != router.get_id() {
            break r;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no new router within 10 s"
        );
        // Until the supervisor retires the dead one, `router()` still returns it.
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The old reference is dead now: its calls fail at once, they never hang.
    let stale = call!(router, RouterMsg::Lease, Intent::read());
    println!(
        "old router ref after the restart: {}",
        match stale {
            Err(e) => format!("fails ({e}): resolve fleet.router() again"),
            Ok(_) => "answered (unexpected)".to_string(),
        }
    );
    let lease = call!(new_router, RouterMsg::Lease, Intent::Write)??;
    println!("new router leased {} for a write", lease.server());
    drop(lease);
    fleet.shutdown().await;
    Ok(())
}

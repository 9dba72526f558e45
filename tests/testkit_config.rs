//! The config the testkit prints (`cargo run -p pgfleet-testkit -- up`) is one pgfleet
//! accepts, and a fleet started from it finds the primary and replicas in their roles.

mod common;

use pgfleet::{Config, Role};
use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_config_is_accepted_and_works() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let config = Config::from_toml_str(&cluster.pgfleet_toml())?;
    assert_eq!(config.replicas.len(), 2);
    let fleet = common::start(config).await;
    let status = fleet.status();
    assert_eq!(
        status.server("primary").map(|s| s.role),
        Some(Role::Primary)
    );
    for r in ["replica1", "replica2"] {
        assert_eq!(
            status.server(r).map(|s| s.role),
            Some(Role::Replica),
            "{status}"
        );
    }
    fleet.shutdown().await;
    Ok(())
}

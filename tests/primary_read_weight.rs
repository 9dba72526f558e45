//! A primary `read_weight` > 0 puts the primary into read rotation: it takes its share of
//! eventual reads (not as a fallback), still on a read-only connection.

mod common;

use std::collections::HashMap;

use pgfleet::{Consistency, Error, Intent, Role, Strategy};
use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_with_read_weight_serves_its_share() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let config = common::config(cluster, common::FAST, |c| {
        c.primary.read_weight = 2;
        c.fleet.strategy = Strategy::RoundRobin;
    });
    let fleet = common::start(config).await;
    let mut by_server: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        assert!(!l.is_fallback(), "a server in rotation is not a fallback");
        *by_server.entry(l.server().to_string()).or_default() += 1;
    }
    // Weights 2:1:1 over round robin: exactly half on the primary.
    assert_eq!(by_server.get("primary"), Some(&200), "{by_server:?}");
    assert_eq!(by_server.get("replica1"), Some(&100), "{by_server:?}");

    // A read on the primary still refuses writes.
    let l = loop {
        let l = fleet.lease(Intent::Read(Consistency::Eventual)).await?;
        if l.role() == Role::Primary {
            break l;
        }
    };
    let err = l
        .batch_execute("CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1)")
        .await
        .expect_err("read-only");
    assert!(matches!(l.error(err), Error::ReadOnly { .. }));
    fleet.shutdown().await;
    Ok(())
}

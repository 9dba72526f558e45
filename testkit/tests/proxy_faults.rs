//! The per-node proxy: blackhole hangs connects and open connections, reset closes them, delay slows them.

use std::time::{Duration, Instant};

use pgfleet_testkit::{LocalCluster, ProxyMode};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_reset_and_delay() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(0).start().await?;
    let node = cluster.primary();
    let proxy = node.proxy();
    assert_eq!(proxy.mode(), ProxyMode::Pass);

    // Blackhole: a connect attempt hangs until the client gives up.
    proxy.blackhole();
    let attempt = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_postgres::connect(&node.url(), NoTls),
    )
    .await;
    assert!(
        attempt.is_err(),
        "connect through a black hole did not hang"
    );

    proxy.pass();
    let client = cluster.app_client(node).await?;
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);

    // Blackhole also freezes connections that are already open.
    proxy.blackhole();
    let frozen = tokio::time::timeout(
        Duration::from_millis(300),
        client.query_one("SELECT 1", &[]),
    )
    .await;
    assert!(
        frozen.is_err(),
        "an open connection answered through a black hole"
    );

    // Reset closes open connections at once, and new ones too.
    proxy.pass();
    let client = cluster.app_client(node).await?;
    client.query_one("SELECT 1", &[]).await?;
    proxy.reset();
    let r = tokio::time::timeout(Duration::from_secs(5), client.query_one("SELECT 1", &[])).await?;
    assert!(r.is_err(), "a query on a reset connection succeeded");
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&node.url(), NoTls),
    )
    .await?;
    assert!(r.is_err(), "a connect through a resetting proxy succeeded");

    // Delay: a round trip takes at least two delayed chunks.
    proxy.delay(Duration::from_millis(100));
    let client = cluster.app_client(node).await?;
    let t = Instant::now();
    client.query_one("SELECT 1", &[]).await?;
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "delay not applied: {:?}",
        t.elapsed()
    );

    // The direct URL bypasses the proxy.
    proxy.blackhole();
    let (direct, conn) = tokio_postgres::connect(&node.direct_url(), NoTls).await?;
    tokio::spawn(conn);
    direct.query_one("SELECT 1", &[]).await?;
    Ok(())
}

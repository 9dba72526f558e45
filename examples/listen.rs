//! LISTEN/NOTIFY through the fleet: two subscriptions to one channel (one LISTEN on the
//! primary), a few notifications sent with `pg_notify` under a write lease, then the
//! listener's backend is terminated: both subscriptions see `Reconnected`, and
//! notifications flow again.
//!
//! `cargo run --example listen` (needs the PostgreSQL server binaries, like the tests).

use std::time::Duration;

use pgfleet::{Config, Fleet, Intent, ListenEvent, Subscription};
use pgfleet_testkit::LocalCluster;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let fleet = Fleet::start(Config::from_toml_str(&cluster.pgfleet_toml())?).await?;
    anyhow::ensure!(
        fleet.wait_ready(Duration::from_secs(20)).await,
        "fleet not ready"
    );

    // `listen` returns once LISTEN is in effect: nothing sent after it is missed.
    let mut mailer = fleet.listen("orders").await?;
    let mut audit = fleet.listen("orders").await?;

    for id in 1..=3 {
        notify(&fleet, "orders", &format!("order {id}")).await?;
    }
    for _ in 1..=3 {
        show("mailer", &mut mailer).await?;
        show("audit ", &mut audit).await?;
    }

    // Kill the listener's session, as a DBA (or a failover) might.
    let admin = cluster.superuser_client(cluster.primary()).await?;
    let n = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'pgfleet-listener'",
            &[],
        )
        .await?;
    println!("terminated {n} listener backend(s)");
    // Reconnected: LISTEN is back, but whatever was sent meanwhile is lost; an
    // application re-reads the state the channel announces here.
    show("mailer", &mut mailer).await?;
    show("audit ", &mut audit).await?;

    notify(&fleet, "orders", "order 4").await?;
    show("mailer", &mut mailer).await?;
    show("audit ", &mut audit).await?;

    fleet.shutdown().await;
    Ok(())
}

/// Sends one notification under a write lease (the primary).
async fn notify(fleet: &Fleet, channel: &str, payload: &str) -> anyhow::Result<()> {
    let lease = fleet.lease(Intent::Write).await?;
    lease
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(|e| lease.error(e))?;
    Ok(())
}

/// Prints the subscription's next event.
async fn show(who: &str, sub: &mut Subscription) -> anyhow::Result<()> {
    let event = tokio::time::timeout(Duration::from_secs(20), sub.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
    match event {
        ListenEvent::Notification(n) => println!(
            "{who} <- {:?} on {:?} (from backend {})",
            n.payload, n.channel, n.process_id
        ),
        ListenEvent::Reconnected => {
            println!("{who} <- Reconnected: notifications may have been missed; reload")
        }
        ListenEvent::Lagged { missed } => println!("{who} <- Lagged: missed {missed}; reload"),
        other => println!("{who} <- {other:?}"),
    }
    Ok(())
}

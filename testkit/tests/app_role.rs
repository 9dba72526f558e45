//! The application role: not a superuser, a member of pg_monitor, password-authenticated over TCP.

use pgfleet_testkit::{LocalCluster, APP_USER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_is_a_monitor_but_not_a_superuser() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let client = cluster.app_client(cluster.primary()).await?;
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, pg_has_role(current_user, 'pg_monitor', 'member')
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), APP_USER);
    assert!(!row.get::<_, bool>(1), "app role must not be a superuser");
    assert!(
        row.get::<_, bool>(2),
        "app role must be a member of pg_monitor"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_reads_replay_state_on_a_replica() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let client = cluster.app_client(cluster.replica(0)).await?;
    let row = client
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, pg_is_wal_replay_paused(),
                    (SELECT status FROM pg_stat_wal_receiver)",
            &[],
        )
        .await?;
    let lsn: Option<String> = row.get(0);
    assert!(lsn.is_some_and(|l| l.contains('/')), "a replay LSN");
    assert!(!row.get::<_, bool>(1));
    // pg_monitor may read pg_stat_wal_receiver's columns.
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("streaming")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_need_the_password() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let wrong = cluster
        .primary()
        .direct_url()
        .replace("pgfleet_app_pw", "wrong");
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("password authentication failed"), "{err}");
    Ok(())
}

//! `.tls(true)`: the servers serve the generated certificate, its key is private to the
//! server's OS user, replicas stream over TLS, and plaintext clients still connect.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use pgfleet_testkit::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_its_certificate() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder()
        .replicas(1)
        .tls(true)
        .start()
        .await?;
    let ca = cluster.ca_cert_path().expect("a TLS cluster has a CA");
    assert!(std::fs::read_to_string(ca)?.starts_with("-----BEGIN CERTIFICATE-----"));

    // The TLS config (what `up --tls` prints): the plain one behind a `[fleet.tls]` table that
    // verifies every server against this CA. (tests/tls.rs in pgfleet parses and uses it.)
    let toml = cluster
        .pgfleet_tls_toml()
        .expect("a TLS cluster has a TLS config");
    let tls_table = format!(
        "[fleet.tls]\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"\n\n",
        ca.display()
    );
    assert_eq!(toml, format!("{tls_table}{}", cluster.pgfleet_toml()));

    // The testkit's clients connect without TLS: ssl = on still accepts them.
    let client = cluster.superuser_client(cluster.primary()).await?;
    let row = client
        .query_one(
            "SELECT current_setting('ssl'), current_setting('ssl_key_file')",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "on");
    let key = std::path::PathBuf::from(row.get::<_, String>(1));
    let meta = std::fs::metadata(&key)?;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{}",
        key.display()
    );
    let data_owner = std::fs::metadata(cluster.primary().data_dir())?.uid();
    assert_eq!(
        meta.uid(),
        data_owner,
        "the key belongs to the server's user"
    );

    // The replica inherited the settings and streams over TLS (libpq's default, prefer).
    cluster
        .wait_streaming(cluster.replica(0), Duration::from_secs(30))
        .await?;
    let row = client
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await?;
    assert_eq!(
        row.get::<_, Option<bool>>(0),
        Some(true),
        "{}",
        cluster.primary().log_tail(20)
    );
    let replica = cluster.superuser_client(cluster.replica(0)).await?;
    let row = replica
        .query_one("SELECT current_setting('ssl')", &[])
        .await?;
    assert_eq!(row.get::<_, String>(0), "on");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_cluster_has_no_ca() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(0).start().await?;
    assert!(cluster.ca_cert_path().is_none());
    assert!(cluster.pgfleet_tls_toml().is_none());
    let client = cluster.superuser_client(cluster.primary()).await?;
    let row = client
        .query_one("SELECT current_setting('ssl')", &[])
        .await?;
    assert_eq!(
        row.get::<_, String>(0),
        "off",
        "TLS settings leaked into the template"
    );
    Ok(())
}

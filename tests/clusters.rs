//! Many clusters under one fleet (`[clusters.NAME]`): one supervisor for all, each
//! cluster its own servers, router and topology; `fleet.cluster(name)` is a lookup in a
//! registry fixed at start; an unknown name is a typed error, or the default cluster
//! when configured so; tokens of one cluster are foreign to another.

mod common;

use std::time::Duration;

use pgfleet::{Config, Error, Fleet, Intent, TokenError, UnknownCluster, DEFAULT_CLUSTER};
use pgfleet_testkit::LocalCluster;

/// `cluster`'s servers as the `[clusters.NAME]` section `name`.
fn as_section(cluster: &LocalCluster, name: &str) -> String {
    cluster
        .pgfleet_toml()
        .replace("[[replicas]]", &format!("[[clusters.{name}.replicas]]"))
        .replace("[primary]", &format!("[clusters.{name}.primary]"))
}

async fn two_cluster_fleet(
    a: &LocalCluster,
    b: &LocalCluster,
    unknown: UnknownCluster,
) -> anyhow::Result<Fleet> {
    let toml = format!(
        "{}\n{}",
        a.pgfleet_toml_with(common::FAST),
        as_section(b, "tenant_b")
    );
    let mut config = Config::from_toml_str(&toml)?;
    config.fleet.unknown_cluster = unknown;
    Ok(common::start(config).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_under_one_fleet() -> anyhow::Result<()> {
    common::trace();
    let a = LocalCluster::shared().await?;
    let b = LocalCluster::builder()
        .replicas(1)
        .own_system_id(true)
        .start()
        .await?;
    let fleet = two_cluster_fleet(a, &b, UnknownCluster::Error).await?;
    assert_eq!(fleet.cluster_name(), DEFAULT_CLUSTER);
    assert_eq!(
        fleet.cluster_names().collect::<Vec<_>>(),
        vec![DEFAULT_CLUSTER, "tenant_b"]
    );
    let tb = fleet.cluster("tenant_b")?;
    assert_eq!(tb.cluster_name(), "tenant_b");
    assert!(
        tb.wait_ready(Duration::from_secs(20)).await,
        "{}",
        tb.status()
    );

    // Each cluster's leases go to its own servers: a table made through one is not
    // in the other.
    let t = common::table("clusters");
    let token_b = {
        let mut w = tb.lease(Intent::Write).await?;
        w.batch_execute(&format!(
            "CREATE TABLE {t} (v text); INSERT INTO {t} VALUES ('b')"
        ))
        .await?;
        w.commit_token().await?
    };
    let r = tb.lease(Intent::read_after(&token_b)).await?;
    let v: String = r
        .query_one(&format!("SELECT v FROM {t}"), &[])
        .await?
        .get(0);
    assert_eq!(v, "b");
    drop(r);
    let w = fleet.lease(Intent::Write).await?;
    let exists: bool = w
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t])
        .await?
        .get(0);
    assert!(!exists, "the default cluster must not see tenant_b's table");
    drop(w);
    assert_eq!(tb.status().servers.len(), 2);
    assert_eq!(fleet.status().servers.len(), 3);

    // A token of tenant_b is foreign to the default cluster: ignored, with the reason.
    let (_, ignored) = fleet.session_from(token_b);
    assert!(
        matches!(ignored, Some(TokenError::ForeignSystem { .. })),
        "{ignored:?}"
    );
    let r = fleet.lease(Intent::read_after(&token_b)).await?;
    assert!(matches!(
        r.ignored_token(),
        Some(TokenError::ForeignSystem { .. })
    ));
    drop(r);

    // Unknown names are a typed error here.
    match fleet.cluster("nope") {
        Err(Error::UnknownCluster { name }) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownCluster, got {other:?}"),
    }
    // Every handle is the same tree: shutting down through one stops all.
    {
        let w = tb.lease(Intent::Write).await?;
        w.batch_execute(&format!("DROP TABLE {t}")).await?;
    }
    assert_eq!(fleet.shutdown().await, 0);
    assert!(matches!(
        tb.lease(Intent::read()).await,
        Err(Error::ShuttingDown)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_can_mean_the_default_cluster() -> anyhow::Result<()> {
    common::trace();
    let a = LocalCluster::shared().await?;
    let fleet = common::start(Config::from_toml_str(&format!(
        "{}\n{}",
        a.pgfleet_toml_with(&format!("{}unknown_cluster = \"default\"\n", common::FAST)),
        as_section(a, "alias")
    ))?)
    .await;
    let other = fleet.cluster("no_such_tenant")?;
    assert_eq!(other.cluster_name(), DEFAULT_CLUSTER);
    drop(other.lease(Intent::Write).await?);
    assert_eq!(fleet.cluster("alias")?.cluster_name(), "alias");
    fleet.shutdown().await;
    Ok(())
}

/// `check_cluster_server` reaches a server of a `[clusters.NAME]` table; errors name
/// the cluster's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_cluster_server_names_the_clusters_keys() -> anyhow::Result<()> {
    common::trace();
    let a = LocalCluster::shared().await?;
    let section = as_section(a, "tenant_b");
    let config = Config::from_toml_str(&format!("{}\n{section}", a.pgfleet_toml()))?;
    assert_eq!(
        pgfleet::check_cluster_server(&config, "tenant_b", "replica1")
            .await
            .ok(),
        Some(false),
        "reachable, without TLS"
    );
    for (cluster, server, want) in [
        ("tenant_x", "primary", "no cluster is named `tenant_x`"),
        ("tenant_b", "replica9", "no server is named `replica9`"),
    ] {
        let err = pgfleet::check_cluster_server(&config, cluster, server)
            .await
            .expect_err(want);
        assert!(err.to_string().contains(want), "{err}");
    }

    // A CA file that does not exist, on tenant_b's primary.
    let url = a.primary().url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let broken = format!(
        "[clusters.tenant_b.primary]\nname = \"primary\"\nurl = \"{url}{sep}sslmode=verify-full&sslrootcert=%2Fnonexistent%2Fca.pem\"\n"
    );
    // Checked when the config is read, named by its key in the cluster's table.
    let err =
        Config::from_toml_str(&format!("{}\n{broken}", a.pgfleet_toml())).expect_err("no CA file");
    assert!(
        err.to_string().starts_with("clusters.tenant_b.primary.url"),
        "{err}"
    );
    Ok(())
}

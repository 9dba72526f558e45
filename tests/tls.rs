#![cfg(feature = "tls")]
//! TLS (feature `tls`): `sslmode` and `sslrootcert` against a cluster whose servers serve a
//! certificate for `localhost` and `127.0.0.1` signed by the testkit's CA.
//!
//! One TLS cluster (primary + 1 replica) is shared by every test here; the test that needs a
//! server without TLS shares a second, plain one (primary only).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use pgfleet::{check_server, Config, ConnectError, Error, Intent, TlsError, TlsMode};
use pgfleet_testkit::LocalCluster;
use tokio::sync::OnceCell;

use common::{start, wait_for, FAST};

/// A host name that resolves nowhere: with `hostaddr` the connection goes to 127.0.0.1, and
/// the certificate is checked against this name, which it does not hold.
const WRONG_NAME: &str = "pgfleet-not-in-the-certificate";

async fn tls_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceCell<LocalCluster> = OnceCell::const_new();
    CLUSTER
        .get_or_init(|| async {
            LocalCluster::builder()
                .replicas(1)
                .tls(true)
                .start()
                .await
                .expect("TLS cluster starts")
        })
        .await
}

async fn plain_cluster() -> &'static LocalCluster {
    static CLUSTER: OnceCell<LocalCluster> = OnceCell::const_new();
    CLUSTER
        .get_or_init(|| async {
            LocalCluster::builder()
                .replicas(0)
                .start()
                .await
                .expect("plain cluster starts")
        })
        .await
}

fn ca(cluster: &LocalCluster) -> String {
    cluster
        .ca_cert_path()
        .expect("TLS cluster has a CA")
        .display()
        .to_string()
}

/// `url` (the testkit's, to 127.0.0.1) with another host and extra query parameters.
fn url_with(url: &str, host: &str, query: &str) -> String {
    let url = url.replacen("@127.0.0.1:", &format!("@{host}:"), 1);
    format!("{url}?{query}")
}

/// A config with only the primary, at `url`, and the FAST settings plus `tables`.
fn primary_only(url: &str, tables: &str) -> Config {
    let text = format!("{FAST}{tables}\n[primary]\nname = \"primary\"\nurl = \"{url}\"\n");
    Config::from_toml_str(&text).expect("config parses")
}

/// Whether the lease's own connection is encrypted, as the server sees it.
async fn lease_is_encrypted(fleet: &pgfleet::Fleet, intent: Intent) -> (String, bool) {
    let lease = fleet.lease(intent).await.expect("lease");
    let row = lease
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (lease.server().to_owned(), row.get(0))
}

fn tls_error(result: Result<bool, Error>, server: &str) -> TlsError {
    match result {
        Err(Error::Connect {
            server: s,
            source: ConnectError::Tls(e),
        }) if s == server => e,
        other => panic!("expected a TLS connect error on {server}, got {other:?}"),
    }
}

#[tokio::test]
async fn verify_full_to_localhost_leases_over_tls() {
    common::trace();
    let cluster = tls_cluster().await;
    // The fleet-wide keys, and host names the certificate holds.
    let tables = format!(
        "{FAST}\n[fleet.tls]\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
        ca(cluster)
    );
    let text = cluster
        .pgfleet_toml_with(&tables)
        .replace("@127.0.0.1:", "@localhost:");
    let config = Config::from_toml_str(&text).expect("config parses");
    assert_eq!(config.fleet.tls.sslmode, TlsMode::VerifyFull);
    assert_eq!(check_server(&config, "primary").await.ok(), Some(true));
    assert_eq!(check_server(&config, "replica1").await.ok(), Some(true));

    let fleet = start(config).await;
    assert_eq!(
        lease_is_encrypted(&fleet, Intent::Write).await,
        ("primary".to_owned(), true)
    );
    wait_for(
        "an eventual read on the replica",
        Duration::from_secs(10),
        || async {
            let (server, ssl) = lease_is_encrypted(&fleet, Intent::read()).await;
            assert!(ssl, "read lease on {server} is not encrypted");
            server == "replica1"
        },
    )
    .await;
    fleet.shutdown().await;
}

/// The testkit's TLS config (what `pgfleet-testkit up --tls` prints) parses and verifies
/// every server.
#[tokio::test]
async fn the_testkit_tls_config_verifies_every_server() {
    let cluster = tls_cluster().await;
    let text = cluster
        .pgfleet_tls_toml()
        .expect("a TLS cluster has a TLS config");
    let config = Config::from_toml_str(&text).expect("the testkit's TLS config parses");
    assert_eq!(config.fleet.tls.sslmode, TlsMode::VerifyFull);
    assert_eq!(
        config.fleet.tls.sslrootcert.as_deref(),
        cluster.ca_cert_path()
    );
    for server in ["primary", "replica1"] {
        assert_eq!(
            check_server(&config, server).await.ok(),
            Some(true),
            "{server} over TLS"
        );
    }
}

/// The sniffer sits above TLS: it sees `ReadyForQuery` in plaintext, so a connection released
/// inside `BEGIN` is rolled back and reused (same backend), and a clean one is reused as is.
#[tokio::test]
async fn sniffer_tracks_transactions_over_tls() {
    common::trace();
    let cluster = tls_cluster().await;
    let url = url_with(
        &cluster.primary().url(),
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca(cluster)),
    );
    let mut config = primary_only(&url, "");
    config.primary.pool_size = 1;
    let fleet = start(config).await;

    let lease = fleet.lease(Intent::Write).await.expect("lease");
    let pid = pid_of(&lease).await;
    lease.batch_execute("BEGIN").await.expect("begin");
    drop(lease);

    let lease = fleet.lease(Intent::Write).await.expect("lease after BEGIN");
    assert_eq!(
        pid_of(&lease).await,
        pid,
        "the connection was rolled back and reused"
    );
    // SAVEPOINT works only inside a transaction block: 25P01 shows there is none.
    let err = lease
        .batch_execute("SAVEPOINT s")
        .await
        .expect_err("no transaction block left");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("25P01"),
        "{err}"
    );
    let row = lease
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query");
    assert!(row.get::<_, bool>(0), "not encrypted");
    drop(lease);

    let lease = fleet.lease(Intent::Write).await.expect("third lease");
    assert_eq!(pid_of(&lease).await, pid, "a clean connection is reused");
    drop(lease);
    fleet.shutdown().await;
}

#[tokio::test]
async fn verify_full_rejects_a_name_the_certificate_does_not_hold() {
    common::trace();
    let cluster = tls_cluster().await;
    let url = url_with(
        &cluster.primary().url(),
        WRONG_NAME,
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            ca(cluster)
        ),
    );
    let config = primary_only(&url, "");
    let err = check_server(&config, "primary").await;
    let shown = format!("{}", err.as_ref().expect_err("rejected"));
    assert!(
        shown.contains("server primary") && shown.contains(WRONG_NAME),
        "{shown}"
    );
    assert!(!shown.contains(pgfleet_testkit::APP_PASSWORD), "{shown}");
    match tls_error(err, "primary") {
        TlsError::HostnameMismatch { host, presented } => {
            assert_eq!(host, WRONG_NAME);
            assert!(presented.iter().any(|n| n == "localhost"), "{presented:?}");
        }
        other => panic!("expected a host name mismatch, got {other:?}"),
    }

    // A fleet on it never connects and says why in its status.
    let fleet = pgfleet::Fleet::start(config).await.expect("fleet starts");
    wait_for(
        "the TLS error in the status",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("primary")
                .and_then(|s| s.last_error.clone())
                .is_some_and(|e| e.contains("not valid for host"))
        },
    )
    .await;
    assert!(matches!(
        fleet.lease(Intent::Write).await,
        Err(Error::NoPrimary { .. })
    ));
    fleet.shutdown().await;
}

#[tokio::test]
async fn verify_ca_accepts_a_name_the_certificate_does_not_hold() {
    common::trace();
    let cluster = tls_cluster().await;
    let url = url_with(
        &cluster.primary().url(),
        WRONG_NAME,
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-ca&sslrootcert={}",
            ca(cluster)
        ),
    );
    let config = primary_only(&url, "");
    assert_eq!(check_server(&config, "primary").await.ok(), Some(true));
    let fleet = start(config).await;
    assert!(lease_is_encrypted(&fleet, Intent::Write).await.1);
    fleet.shutdown().await;
}

#[tokio::test]
async fn require_without_a_ca_encrypts_without_verifying() {
    common::trace();
    let cluster = tls_cluster().await;
    // A name the certificate does not hold, and no CA: require does not check.
    let url = url_with(
        &cluster.primary().url(),
        WRONG_NAME,
        "hostaddr=127.0.0.1&sslmode=require",
    );
    let config = primary_only(&url, "");
    assert_eq!(check_server(&config, "primary").await.ok(), Some(true));
    let fleet = start(config).await;
    assert!(lease_is_encrypted(&fleet, Intent::Write).await.1);
    fleet.shutdown().await;

    // SCRAM binds to the TLS channel (tls-server-end-point), so a man in the middle cannot
    // relay the authentication even though require checks no certificate.
    let config = primary_only(&format!("{url}&channel_binding=require"), "");
    assert_eq!(check_server(&config, "primary").await.ok(), Some(true));

    // The default, prefer, uses TLS when the server offers it.
    let config = primary_only(&cluster.primary().url(), "");
    assert_eq!(config.fleet.tls.sslmode, TlsMode::Prefer);
    assert_eq!(check_server(&config, "primary").await.ok(), Some(true));
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_certificate_is_rejected() {
    common::trace();
    let cluster = tls_cluster().await;
    let dir = tempfile_dir("foreign-ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign = params.self_signed(&key).expect("CA");
    let path = dir.join("foreign-ca.pem");
    std::fs::write(&path, foreign.pem()).expect("write CA");

    // verify-ca, and require with a CA (which verifies the chain, as in libpq).
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = url_with(
            &cluster.primary().url(),
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", path.display()),
        );
        let config = primary_only(&url, "");
        match tls_error(check_server(&config, "primary").await, "primary") {
            TlsError::UntrustedCertificate { reason } => {
                assert!(
                    reason.contains("not signed by a CA in sslrootcert"),
                    "{mode}: {reason}"
                )
            }
            other => panic!("{mode}: expected an untrusted certificate, got {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_rejected() {
    common::trace();
    let cluster = plain_cluster().await;
    let url = url_with(&cluster.primary().url(), "127.0.0.1", "sslmode=require");
    let config = primary_only(&url, "");
    assert_eq!(
        tls_error(check_server(&config, "primary").await, "primary"),
        TlsError::NotSupported {
            mode: TlsMode::Require
        }
    );

    // prefer goes on in plaintext on the same socket, and leases work.
    let config = primary_only(
        &cluster.primary().url(),
        "[fleet.tls]\nsslmode = \"prefer\"\n",
    );
    assert_eq!(check_server(&config, "primary").await.ok(), Some(false));
    let fleet = start(config).await;
    assert!(!lease_is_encrypted(&fleet, Intent::Write).await.1);
    fleet.shutdown().await;
}

async fn pid_of(lease: &pgfleet::Lease) -> i32 {
    let row = lease
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid");
    row.get(0)
}

/// A fresh directory for this test's files.
fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfleet-tls-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

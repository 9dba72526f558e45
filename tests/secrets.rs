//! Passwords never reach Debug, Display, status or errors, even when a server rejects them.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use pgfleet::{ConnectError, Error, Fleet, Intent};
use pgfleet_testkit::LocalCluster;

const WRONG: &str = "hunter2-wrong-secret";

/// What a call may take beyond its own timeout (scheduling on a busy machine).
const SLACK: Duration = Duration::from_millis(500);

/// Runs `call`, which must return within `bound` (its own timeout) plus [`SLACK`]:
/// panics if it does not, even if it never returns.
async fn bounded<T>(what: &str, bound: Duration, call: impl Future<Output = T>) -> T {
    let limit = bound + SLACK;
    let t = Instant::now();
    let r = tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"));
    let took = t.elapsed();
    assert!(took <= limit, "{what} took {took:?}, more than {limit:?}");
    r
}

/// Neither the error's text nor its Debug holds the password.
fn assert_no_password(err: &Error) {
    assert!(!err.to_string().contains(WRONG), "error text leaks: {err}");
    assert!(!format!("{err:?}").contains(WRONG), "error Debug leaks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_reported_without_the_password() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let good = cluster.replica(0).url();
    let bad = replace_password(&good, WRONG);
    let config = common::config(cluster, common::FAST, |c| {
        c.replicas[0].url = bad.parse().expect("url parses");
    });
    assert!(!format!("{config:?}").contains(WRONG), "config Debug leaks");
    let lease_timeout = config.fleet.lease_timeout;
    // Checked directly, the server's error is typed: a failed startup (authentication),
    // naming the server, within the connect timeout.
    let err = bounded(
        "check_server with a wrong password",
        config.fleet.connect_timeout + config.fleet.probe_timeout,
        pgfleet::check_server(&config, "replica1"),
    )
    .await
    .expect_err("a wrong password is refused");
    assert!(
        matches!(&err, Error::Connect { server, source: ConnectError::Startup(_) } if server == "replica1"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    assert_no_password(&err);
    let fleet = Fleet::start(config).await?;
    // The bad replica is probed, fails authentication, and is reported with a reason.
    common::wait_for(
        "replica1 to report its error",
        Duration::from_secs(10),
        || {
            let s = fleet.status();
            async move {
                s.server("replica1")
                    .and_then(|r| r.last_error.clone())
                    .is_some_and(|e| e.contains("password authentication failed"))
            }
        },
    )
    .await;
    let status = fleet.status();
    let table = status.to_string();
    assert!(!table.contains(WRONG), "status table leaks: {table}");
    assert!(!format!("{status:?}").contains(WRONG), "status Debug leaks");
    assert!(!format!("{fleet:?}").contains(WRONG), "fleet Debug leaks");
    // The rest of the fleet serves: eventual reads go to replica2 (or fall back).
    for _ in 0..20 {
        let r = bounded(
            "a read with replica1's password wrong",
            lease_timeout,
            fleet.lease(Intent::read()),
        )
        .await?;
        assert_ne!(r.server(), "replica1");
        r.simple_query("SELECT 1").await?;
    }
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_primary_errors_without_the_password() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let bad = replace_password(&cluster.primary().url(), WRONG);
    let config = common::config(
        cluster,
        "[fleet]\nprobe_interval = \"50ms\"\nlease_timeout = \"300ms\"",
        |c| {
            c.primary.url = bad.parse().expect("url parses");
            c.replicas.clear();
        },
    );
    let lease_timeout = config.fleet.lease_timeout;
    let fleet = Fleet::start(config).await?;
    // Probed first, so the error below can say why.
    common::wait_for(
        "the primary to report its error",
        Duration::from_secs(10),
        || {
            let s = fleet.status();
            async move {
                s.server("primary")
                    .and_then(|r| r.last_error.clone())
                    .is_some_and(|e| e.contains("password authentication failed"))
            }
        },
    )
    .await;
    let err = bounded(
        "a write with the primary's password wrong",
        lease_timeout,
        fleet.lease(Intent::Write),
    )
    .await
    .expect_err("no primary can be reached");
    // Typed, with the probes' reason (the failed authentication), and no password.
    match &err {
        Error::NoPrimary { waited, cause } => {
            assert!(*waited <= lease_timeout + SLACK, "{err:?}");
            assert!(
                cause
                    .as_deref()
                    .is_some_and(|c| c.contains("password authentication failed")),
                "{err:?}"
            );
        }
        other => panic!("expected NoPrimary, got {other:?}"),
    }
    assert_no_password(&err);
    fleet.shutdown().await;
    Ok(())
}

fn replace_password(url: &str, password: &str) -> String {
    // postgres://user:pw@host:port/db
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (userinfo, host) = rest.split_once('@').expect("userinfo");
    let user = userinfo.split(':').next().expect("user");
    format!("{scheme}://{user}:{password}@{host}")
}

/// HMAC signing keys (`[http] keys`) never reach Debug, serialized output or errors,
/// whether written literally or read from the environment; nor the layer's Debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_signing_keys_are_never_shown() -> anyhow::Result<()> {
    const LITERAL: &str = "literal-signing-key-hunter2-0123456789abcdef";
    const FROM_ENV: &str = "env-signing-key-hunter3-0123456789abcdef0123";
    const SHORT: &str = "short-key-hunter4";
    const VAR: &str = "PGFLEET_SECRETS_TEST_HTTP_KEY";
    std::env::set_var(VAR, FROM_ENV);
    let primary = "[primary]\nurl = \"postgres://app@127.0.0.1:1/app\"\n";
    let text = format!("[http]\nkeys = [\"{LITERAL}\", \"${{{VAR}}}\"]\n{primary}");
    let config = pgfleet::Config::from_toml_str(&text)?;
    let shown = [
        format!("{config:?}"),
        format!("{:?}", config.http),
        toml::to_string(&config)?,
    ];
    for s in &shown {
        assert!(!s.contains(LITERAL) && !s.contains(FROM_ENV), "leak: {s}");
    }
    // Serialized, a literal key is `***` and an environment key its variable.
    assert!(shown[2].contains(&format!("${{{VAR}}}")), "{}", shown[2]);
    assert!(shown[2].contains("\"***\""), "{}", shown[2]);

    // Errors about keys never quote them: too short, or of the wrong type.
    for bad in [
        format!("[http]\nkeys = [\"{SHORT}\"]\n{primary}"),
        format!("[http]\nkeys = \"{SHORT}\"\n{primary}"),
        format!("[http]\nkeys = [\"{SHORT}\", 3]\n{primary}"),
        format!("[http]\nkeys = [{{ k = \"{SHORT}\" }}]\n{primary}"),
    ] {
        let err = pgfleet::Config::from_toml_str(&bad).expect_err("bad key");
        assert!(
            !err.to_string().contains(SHORT) && !format!("{err:?}").contains(SHORT),
            "leak in {err}"
        );
        assert!(
            err.key().is_some_and(|k| k.starts_with("http.keys")),
            "{err}"
        );
    }

    #[cfg(feature = "axum")]
    {
        // No cluster needed: the fleet starts and its servers stay unreachable.
        let fleet = pgfleet::Fleet::start(config).await?;
        let layer = pgfleet::SessionLayer::new(&fleet)?;
        let shown = format!("{layer:?} {:?}", layer.signer());
        assert!(
            !shown.contains(LITERAL) && !shown.contains(FROM_ENV),
            "leak: {shown}"
        );
        fleet.shutdown().await;
    }
    Ok(())
}

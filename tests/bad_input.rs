//! Bad input, tried on purpose: malformed and forged tokens (garbage, truncated, an LSN
//! far ahead of the primary, another system identifier, a timeline the cluster never had)
//! through the public API and a running fleet; unreachable and blackholed hosts at start;
//! invalid URLs; and property-based tests of token and config parsing. Each gets a typed
//! error (or a safe answer), no panic, and nothing hangs.
//!
//! Covered elsewhere: wrong passwords (tests/secrets.rs), config errors and URL fuzzing
//! (tests/config.rs), token unit tests (src/token.rs).

mod common;

use std::time::{Duration, Instant};

use pgfleet::ractor::call;
use pgfleet::{
    Config, ConfigError, Consistency, Error, Fleet, Health, Intent, Lsn, ReplicaConfig, Role,
    RouterMsg, ServerUrl, Token, TokenError,
};
use pgfleet_testkit::LocalCluster;
use proptest::prelude::*;

/// Anything that should answer at once gets this long before it counts as hung.
const HANG: Duration = Duration::from_secs(10);

/// Runs `f`, failing the test if it takes longer than [`HANG`]; returns its output and
/// how long it took.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    match tokio::time::timeout(HANG, f).await {
        Ok(v) => (v, t.elapsed()),
        Err(_) => panic!("{what} hung for {HANG:?}"),
    }
}

fn is_malformed(r: &Result<Token, TokenError>) -> bool {
    matches!(r, Err(TokenError::Malformed { .. }))
}

// ---------------------------------------------------------------------------------------
// Token texts.

#[test]
fn malformed_token_texts_are_typed_errors() {
    let valid = "v2.6f1c2d3e4a5b6c7d.1.0/03000148";
    assert!(valid.parse::<Token>().is_ok());
    let long = format!("{valid}{}", "0".repeat(10_000));
    let garbage = [
        "",
        " ",
        "garbage",
        "null",
        "v1",
        "v2.",
        "V1.6f1c2d3e4a5b6c7d.1.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.1.0/03000148.",
        "v2.6f1c2d3e4a5b6c7d.1.0/03000148/1",
        "v2.6f1c2d3e4a5b6c7d.1.0x0/03000148",
        "v2.6f1c2d3e4a5b6c7d.-1.0/03000148",
        "v2.-6f1c2d3e4a5b6c7d.1.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.0.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.100000000.0/03000148",
        "v2.16f1c2d3e4a5b6c7d.1.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.1.100000000/0",
        "v2.6f1c2d3e4a5b6c7d.1.0/100000000",
        "v2.6f1c2d3e4a5b6c7d.1.g/1",
        "v2.6f1c2d3e4a5b6c7d.1.0/03000148\0",
        "v2.6f1c2d3e4a5b6c7d.1.０/3000148",
        "v2.６f1c2d3e4a5b6c7d.1.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.1.0/03000148\n",
        "v2.6f1c2d3e4a5b6c7d. 1.0/03000148",
        "v2.6f1c2d3e4a5b6c7d.1 .0/03000148",
        "\u{feff}v2.6f1c2d3e4a5b6c7d.1.0/03000148",
        &long,
    ];
    for text in garbage {
        let r = text.parse::<Token>();
        assert!(is_malformed(&r), "{text:?} gave {r:?}");
        let e = r.expect_err("malformed");
        // Typed all the way up: a pgfleet::Error wrapping the token error.
        let e: Error = e.into();
        assert!(
            matches!(e, Error::Token(TokenError::Malformed { .. })),
            "{e:?}"
        );
        assert!(!e.is_retryable(), "a malformed token is not retryable");
    }
    // Every truncation of a valid token is malformed: fixed-width fields, so no prefix
    // reads as another (earlier) position.
    for cut in 0..valid.len() {
        let text = &valid[..cut];
        let r = text.parse::<Token>();
        assert!(is_malformed(&r), "{text:?} gave {r:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Forged tokens through a running fleet.

/// A fleet on the shared cluster, a table with one row, and a real token of that write.
async fn fleet_with_a_write(
    cluster: &LocalCluster,
    prefix: &str,
    tweak: impl FnOnce(&mut Config),
) -> anyhow::Result<(Fleet, String, Token)> {
    let fleet = common::start(common::config(cluster, common::FAST, tweak)).await;
    let table = common::table(prefix);
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text); INSERT INTO {table} VALUES (1, 'one')"
    ))
    .await?;
    let token = w.commit_token().await?;
    drop(w);
    // Reads that ignore a token are eventual reads: let every replica have the table.
    cluster
        .wait_all_replayed(std::time::Duration::from_secs(20))
        .await?;
    Ok((fleet, table, token))
}

/// Reads the one row of `table` on `lease`.
async fn read_row(lease: &pgfleet::Lease, table: &str) -> anyhow::Result<String> {
    Ok(lease
        .query_one(&format!("SELECT v FROM {table} WHERE id = 1"), &[])
        .await?
        .try_get(0)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_get_typed_errors_or_safe_reads() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let (fleet, table, real) = fleet_with_a_write(cluster, "forged", |_| {}).await?;
    let bound = fleet_bound();
    assert_eq!(
        real.to_string().parse::<Token>(),
        Ok(real),
        "text round trip"
    );
    assert_eq!(fleet.check_token(&real), Ok(()));

    // A position far ahead of the primary (forged, or from a lost history). No replica
    // has it, so before falling back the fleet probes the primary afresh: still ahead,
    // the read gets a typed error in bounded time (never a hang, never a read that
    // pretends to follow it). `check_token` (no I/O) cannot know and lets it pass.
    let far = Lsn(real.lsn().as_u64() + (1 << 40));
    let forged_text = format!(
        "v2.{:016x}.{:x}.FFFFFFFF/FFFFFFFF",
        real.system_id(),
        real.timeline()
    );
    let expect_ahead = |r: &Result<pgfleet::Lease, Error>, ahead: &Token| match r {
        Err(Error::Token(TokenError::AheadOfPrimary { primary, theirs })) => {
            assert_eq!(*theirs, ahead.lsn());
            assert!(
                *primary >= real.lsn() && *primary < ahead.lsn(),
                "{primary}"
            );
        }
        Err(e) => panic!("a read after {ahead}: expected AheadOfPrimary, got {e:?}"),
        Ok(l) => panic!("a read after {ahead} was served by {}", l.server()),
    };
    for ahead in [
        Token::new(real.system_id(), real.timeline(), far),
        forged_text.parse::<Token>()?,
    ] {
        assert_eq!(fleet.check_token(&ahead), Ok(()), "no I/O, no judgement");
        let (r, took) = bounded("a read after a token far ahead", async {
            fleet.lease(Intent::read_after(&ahead)).await
        })
        .await;
        expect_ahead(&r, &ahead);
        assert!(
            took <= bound,
            "a read after {ahead} took {took:?} (bound {bound:?})"
        );
        assert!(matches!(
            fleet.verify_token(&ahead).await,
            Err(TokenError::AheadOfPrimary { .. })
        ));
        // The router actor decides the same.
        let router = fleet.router().await?;
        let (r, _) = bounded("the router's answer", async {
            call!(router, RouterMsg::Lease, Intent::read_after(&ahead))
        })
        .await;
        expect_ahead(&r?, &ahead);
        println!("read after {ahead}: refused in {took:?}");

        // A session resumed from it: its reads get the same typed error, never hang.
        let (session, ignored) = fleet.session_from(ahead);
        assert_eq!(ignored, None);
        let (r, took) = bounded("a session read after a token far ahead", async {
            session.lease(Intent::read()).await
        })
        .await;
        expect_ahead(&r, &ahead);
        assert!(took <= bound, "session read took {took:?}");
    }
    // The real token is still served, by a replica (it has replayed it).
    let lease = fleet.lease(Intent::read_after(&real)).await?;
    assert_eq!(read_row(&lease, &table).await?, "one");
    drop(lease);

    // Another system identifier: not ours, ignored with its typed reason; the read is
    // served as an eventual read.
    let foreign = Token::new(real.system_id() ^ 0x5eed, real.timeline(), real.lsn());
    assert!(
        matches!(fleet.check_token(&foreign), Err(TokenError::ForeignSystem { ours, theirs })
            if ours == real.system_id() && theirs == foreign.system_id()),
        "{:?}",
        fleet.check_token(&foreign)
    );
    let (r, took) = bounded("a read after a foreign token", async {
        fleet.lease(Intent::read_after(&foreign)).await
    })
    .await;
    let lease = r?;
    assert!(
        matches!(
            lease.ignored_token(),
            Some(TokenError::ForeignSystem { .. })
        ),
        "{:?}",
        lease.ignored_token()
    );
    assert_eq!(read_row(&lease, &table).await?, "one");
    assert!(took <= bound, "took {took:?}");
    drop(lease);
    let (session, ignored) = fleet.session_from(foreign);
    assert!(
        matches!(ignored, Some(TokenError::ForeignSystem { .. })),
        "{ignored:?}"
    );
    assert_eq!(session.token(), None, "a foreign token is not observed");
    let lease = session.lease(Intent::read()).await?;
    assert_eq!(read_row(&lease, &table).await?, "one");
    drop(lease);

    // A timeline the cluster never had: a typed error, at once, from the fleet and from
    // the router actor alike.
    let future_tl = Token::new(real.system_id(), real.timeline() + 7, real.lsn());
    let expect_unknown = |r: &Result<(), TokenError>| {
        matches!(r, Err(TokenError::UnknownTimeline { current, theirs })
            if *current == real.timeline() && *theirs == real.timeline() + 7)
    };
    assert!(
        expect_unknown(&fleet.check_token(&future_tl)),
        "{:?}",
        fleet.check_token(&future_tl)
    );
    let (r, took) = bounded("a read after an unknown timeline", async {
        fleet.lease(Intent::read_after(&future_tl)).await
    })
    .await;
    match r {
        Err(Error::Token(e)) => assert!(expect_unknown(&Err(e.clone())), "{e:?}"),
        other => panic!("a read after {future_tl}: {other:?}"),
    }
    assert!(took <= bound, "took {took:?}");
    let router = fleet.router().await?;
    let (r, _) = bounded("the router's answer", async {
        call!(router, RouterMsg::Lease, Intent::read_after(&future_tl))
    })
    .await;
    match r {
        Ok(Err(Error::Token(TokenError::UnknownTimeline { .. }))) => {}
        other => panic!("the router on {future_tl}: {other:?}"),
    }
    let (session, ignored) = fleet.session_from(future_tl);
    assert!(
        matches!(ignored, Some(TokenError::UnknownTimeline { .. })),
        "{ignored:?}"
    );
    assert_eq!(session.token(), None);
    // Writes and strong reads do not carry tokens: unaffected.
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(w);
    fleet.shutdown().await;
    Ok(())
}

/// With `fallback = "error"`, a token far ahead of every server gets a typed
/// `AheadOfPrimary` error in bounded time (a token only the replicas lack gets
/// `NoFreshReplica`: tests/fallback_error.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_far_ahead_with_fallback_error_is_a_typed_error() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let (fleet, table, real) = fleet_with_a_write(cluster, "forged_err", |c| {
        c.consistency.fallback = pgfleet::Fallback::Error;
    })
    .await?;
    let ahead = Token::new(
        real.system_id(),
        real.timeline(),
        Lsn(real.lsn().as_u64() + (1 << 40)),
    );
    let (r, took) = bounded("a read after a token far ahead", async {
        fleet.lease(Intent::read_after(&ahead)).await
    })
    .await;
    // The primary has not reached it either: refused as forged, not as a replica's lag.
    match r {
        Err(Error::Token(e @ TokenError::AheadOfPrimary { .. })) => {
            println!("{e} (after {took:?})")
        }
        Err(e) => panic!("expected AheadOfPrimary, got {e:?}"),
        Ok(l) => panic!("a read after {ahead} was served by {}", l.server()),
    }
    assert!(took <= fleet_bound(), "took {took:?}");
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(w);
    fleet.shutdown().await;
    Ok(())
}

/// `lease_timeout` (2 s in `common::FAST`) plus slack: the most any lease may take here.
fn fleet_bound() -> Duration {
    Duration::from_secs(2) + Duration::from_millis(500)
}

// ---------------------------------------------------------------------------------------
// Unreachable hosts at start.

/// `url` with its `127.0.0.1:PORT` replaced by `addr`.
fn with_addr(url: &str, addr: &str) -> String {
    let (scheme, rest) = url.split_once('@').expect("userinfo@host");
    let (_, path) = rest.split_once('/').expect("host/db");
    format!("{scheme}@{addr}/{path}")
}

fn health_of(fleet: &Fleet, name: &str) -> Health {
    fleet
        .status()
        .server(name)
        .map_or(Health::Starting, |s| s.health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_replicas_at_start_are_unhealthy_and_the_rest_serves() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    // A blackholed address: a bound listener that never accepts. The kernel completes the
    // TCP handshake (up to its backlog) and then nothing answers: only the whole-connect
    // timeout ends it.
    let hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let hole_addr = hole.local_addr()?.to_string();
    let good = cluster.replica(0).url();
    let refused: ServerUrl = with_addr(&good, "127.0.0.1:1").parse()?;
    let holed: ServerUrl = with_addr(&good, &hole_addr).parse()?;
    let config = common::config(cluster, common::FAST, |c| {
        c.replicas[0].url = refused;
        c.replicas.push(ReplicaConfig::new("replica3", holed));
    });
    let lease_bound = config.fleet.lease_timeout + Duration::from_millis(500);

    let (fleet, took) = bounded("Fleet::start", Fleet::start(config)).await;
    let fleet = fleet?;
    println!("Fleet::start returned in {took:?}");
    assert!(took < Duration::from_secs(2), "start took {took:?}");
    let (ready, took) = bounded("wait_ready", fleet.wait_ready(Duration::from_secs(8))).await;
    assert!(
        ready,
        "every server probed once, a primary known:\n{}",
        fleet.status()
    );
    println!("ready in {took:?}\n{}", fleet.status());
    for name in ["replica1", "replica3"] {
        common::wait_for(
            &format!("{name} to be reported down"),
            Duration::from_secs(10),
            || async {
                matches!(
                    health_of(&fleet, name),
                    Health::Unhealthy | Health::Restarting
                ) && fleet
                    .status()
                    .server(name)
                    .is_some_and(|s| s.last_error.is_some())
            },
        )
        .await;
    }
    // Long enough for their actors to give up (down_after) and be restarted.
    common::wait_for(
        "replica3's actor to be restarted",
        Duration::from_secs(15),
        || async {
            fleet
                .status()
                .server("replica3")
                .is_some_and(|s| s.restarts >= 1)
        },
    )
    .await;
    let status = fleet.status();
    println!("{status}");
    assert_eq!(
        status.server("replica2").map(|s| s.health),
        Some(Health::Healthy),
        "{status}"
    );

    let table = common::table("unreachable");
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text); INSERT INTO {table} VALUES (1, 'one')"
    ))
    .await?;
    let token = w.commit_token().await?;
    drop(w);
    // Eventual reads may see replica2 before it replayed the new table.
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..30 {
        let intent = if i % 2 == 0 {
            Intent::Read(Consistency::Eventual)
        } else {
            Intent::read_after(&token)
        };
        let (r, took) = bounded("a read with two replicas unreachable", fleet.lease(intent)).await;
        let lease = r.unwrap_or_else(|e| panic!("read {i}: {e:?}\n{}", fleet.status()));
        assert!(
            ["replica2", "primary"].contains(&lease.server()),
            "read {i} on {}",
            lease.server()
        );
        assert_eq!(read_row(&lease, &table).await?, "one", "read {i}");
        assert!(took <= lease_bound, "read {i} took {took:?}");
        *served.entry(lease.server().to_owned()).or_default() += 1;
    }
    println!("reads with replica1 refused and replica3 blackholed: {served:?}");
    assert!(
        served.get("replica2").is_some_and(|&n| n > 0),
        "the reachable replica serves reads: {served:?}"
    );
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(w);
    let (left, took) = bounded("shutdown", fleet.shutdown()).await;
    println!("shutdown in {took:?}, {left} leases left");
    drop(hole);
    Ok(())
}

/// An unreachable primary at start: the fleet starts (with the default
/// `fleet.start_wait = "0s"`), is not ready, and writes fail with `NoPrimary` in bounded
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_primary_at_start_fails_writes_in_time() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let refused: ServerUrl = with_addr(&cluster.primary().url(), "127.0.0.1:1").parse()?;
    let config = common::config(cluster, common::FAST, |c| {
        c.primary.url = refused;
    });
    let bound = config.fleet.lease_timeout + Duration::from_millis(500);
    let (fleet, took) = bounded("Fleet::start", Fleet::start(config)).await;
    let fleet = fleet?;
    assert!(took < Duration::from_secs(2), "start took {took:?}");
    let (ready, _) = bounded("wait_ready", fleet.wait_ready(Duration::from_secs(2))).await;
    assert!(!ready, "no primary can be known:\n{}", fleet.status());
    for intent in [Intent::Write, Intent::Read(Consistency::Strong)] {
        let (r, took) = bounded("a lease needing the primary", fleet.lease(intent)).await;
        assert!(
            matches!(r, Err(Error::NoPrimary { .. })),
            "{intent:?}: {r:?}"
        );
        // The error says why, from the probes: the primary refuses connections.
        let text = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            text.contains("primary:") && text.to_lowercase().contains("refused"),
            "{text}"
        );
        assert!(took <= bound, "{intent:?} took {took:?}");
    }
    // Reads that do not need the primary answer in bounded time, whatever they answer.
    let (r, took) = bounded("an eventual read", fleet.lease(Intent::read())).await;
    println!(
        "eventual read with the primary unreachable: {:?} in {took:?}",
        r.as_ref().map(|l| l.server().to_owned())
    );
    assert!(took <= bound, "took {took:?}");
    drop(r);
    let status = fleet.status();
    assert!(status.primary_down, "{status}");
    bounded("shutdown", fleet.shutdown()).await;
    Ok(())
}

/// `fleet.start_wait`: a `start` that must wait for a primary is a config choice. With the
/// primary unreachable it fails with `NoPrimary` (saying why) once the wait is over, and
/// stops what it started; with the primary up it returns once the primary is known, so
/// the first write needs no wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_waits_for_a_primary_or_fails_typed() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let wait = Duration::from_millis(1500);
    let refused: ServerUrl = with_addr(&cluster.primary().url(), "127.0.0.1:1").parse()?;
    let config = common::config(cluster, common::FAST, |c| {
        c.primary.url = refused;
        c.fleet.start_wait = wait;
    });
    let (r, took) = bounded("Fleet::start", Fleet::start(config)).await;
    match r {
        Err(e @ Error::NoPrimary { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("primary:") && text.to_lowercase().contains("refused"),
                "{text}"
            );
            println!("start_wait: {e} after {took:?}");
        }
        Err(e) => panic!("expected NoPrimary, got {e:?}"),
        Ok(f) => panic!("started without a primary:\n{}", f.status()),
    }
    assert!(
        took >= wait && took <= wait + Duration::from_secs(1),
        "start gave up after {took:?} (start_wait {wait:?})"
    );

    let config = common::config(cluster, common::FAST, |c| {
        c.fleet.start_wait = Duration::from_secs(20);
    });
    let (fleet, took) = bounded("Fleet::start", Fleet::start(config)).await;
    let fleet = fleet?;
    let status = fleet.status();
    assert!(
        !status.primary_down
            && status
                .servers
                .iter()
                .any(|s| s.role == Role::Primary && s.health == Health::Healthy),
        "start returned after {took:?} without a known primary:\n{status}"
    );
    let w = fleet.lease(Intent::Write).await?;
    assert_eq!(w.role(), Role::Primary);
    drop(w);
    bounded("shutdown", fleet.shutdown()).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Invalid URLs and configs.

#[test]
fn invalid_urls_are_config_errors_naming_the_key() {
    let good = "postgres://app@10.0.0.1:5432/app";
    let bad: &[&str] = &[
        "",
        "   ",
        "localhost",
        "10.0.0.1:5432",
        "postgres://",
        "postgres:///app",
        "postgres://app@/app",
        "postgres://app@h:0/app",
        "postgres://app@h:99999/app",
        "postgres://app@h:port/app",
        "postgres://app@[::1/app",
        "postgres://app@h/app?connect_timeout=soon",
        "postgres://app@h/app?no_such_option=1",
        "postgres://app@h/app?sslmode=sometimes",
        "postgres://app@h1,h2/app",
        "postgres://app:${1NOT_A_VAR}@h/app",
        "http://app@h/app",
        "host=h",
        "host=h user=app port=x",
        "user=app",
    ];
    for (i, url) in bad.iter().enumerate() {
        // As the primary's URL, and as the second replica's.
        let url = url.replace('\\', "\\\\").replace('"', "\\\"");
        for (text, key) in [
            (format!("[primary]\nurl = \"{url}\"\n"), "primary.url"),
            (
                format!(
                    "[primary]\nurl = \"{good}\"\n[[replicas]]\nname = \"a\"\nurl = \"{good}\"\n\
                     [[replicas]]\nname = \"b\"\nurl = \"{url}\"\n"
                ),
                "replicas[1].url",
            ),
        ] {
            let e = match Config::from_toml_str(&text) {
                Ok(_) => panic!("case {i}: {url:?} parsed"),
                Err(e) => e,
            };
            assert_eq!(e.key(), Some(key), "case {i}: {url:?}: {e}");
            assert!(e.to_string().starts_with(key), "case {i}: {e}");
            let e: Error = e.into();
            assert!(matches!(e, Error::Config(_)), "case {i}: {e:?}");
        }
        assert!(
            url.parse::<ServerUrl>().is_err(),
            "case {i}: {url:?} parsed as a ServerUrl"
        );
    }
    // A URL of the wrong type, and a URL-shaped value where a duration belongs.
    for (text, key) in [
        ("[primary]\nurl = 5\n".to_owned(), "primary.url"),
        (
            format!("[fleet]\nlease_timeout = \"{good}\"\n[primary]\nurl = \"{good}\"\n"),
            "fleet.lease_timeout",
        ),
    ] {
        let e = Config::from_toml_str(&text).expect_err("invalid");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        assert_eq!(e.key(), Some(key), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_start_rejects_an_invalid_config_with_a_typed_error() -> anyhow::Result<()> {
    let url: ServerUrl = "postgres://app@127.0.0.1:1/app".parse()?;
    let mut config = Config::new(pgfleet::PrimaryConfig::new(url.clone()));
    config.replicas.push(ReplicaConfig::new("r1", url.clone()));
    config.replicas.push(ReplicaConfig::new("r2", url));
    for (tweak, key) in [
        (
            (|c: &mut Config| c.replicas[1].pool_size = 0) as fn(&mut Config),
            "replicas[1].pool_size",
        ),
        (|c| c.replicas[1].name = "r1".into(), "replicas[1].name"),
        (
            |c| c.fleet.lease_timeout = Duration::ZERO,
            "fleet.lease_timeout",
        ),
    ] {
        let mut c = config.clone();
        tweak(&mut c);
        let (r, _) = bounded("Fleet::start", Fleet::start(c)).await;
        match r {
            Err(Error::Config(e)) => assert_eq!(e.key(), Some(key), "{e}"),
            Err(e) => panic!("{key}: expected a config error, got {e:?}"),
            Ok(f) => panic!("{key}: started {f:?}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Property-based: token texts and config values.

/// A valid token's text and one of several mutations of it.
fn mutated_token() -> impl Strategy<Value = String> {
    (
        any::<u64>(),
        1u32..,
        any::<u64>(),
        0usize..64,
        any::<char>(),
        0u8..4,
    )
        .prop_map(|(sys, tl, lsn, at, c, how)| {
            let text = Token::new(sys, tl, Lsn(lsn)).to_string();
            let at = (0..=at.min(text.len()))
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            let mut t = text.clone();
            match how {
                0 => t.truncate(at),
                1 => t.insert(at, c),
                2 if at < t.len() => {
                    t.remove(at);
                }
                _ => {
                    if at < t.len() {
                        t.remove(at);
                    }
                    t.insert(at, c);
                }
            }
            t
        })
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any text parses to a token that round-trips, or to a `Malformed` error.
    #[test]
    fn token_text_parses_or_is_malformed(text in "\\PC{0,80}") {
        match text.parse::<Token>() {
            Ok(t) => prop_assert_eq!(t.to_string().parse::<Token>(), Ok(t)),
            Err(e) => prop_assert!(matches!(e, TokenError::Malformed { .. }), "{:?}", e),
        }
    }

    /// Mutated valid tokens: no panic; a typed error or a token that round-trips.
    #[test]
    fn mutated_tokens_parse_or_are_malformed(text in mutated_token()) {
        match text.parse::<Token>() {
            Ok(t) => prop_assert_eq!(t.to_string().parse::<Token>(), Ok(t)),
            Err(e) => prop_assert!(matches!(e, TokenError::Malformed { .. }), "{:?}", e),
        }
    }

    /// Forged tokens of any system, timeline and position round-trip through their text.
    #[test]
    fn forged_tokens_round_trip(sys in any::<u64>(), tl in 1u32.., lsn in any::<u64>()) {
        let t = Token::new(sys, tl, Lsn(lsn));
        let parsed: Token = t.to_string().parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!((parsed.system_id(), parsed.timeline(), parsed.lsn()), (sys, tl, Lsn(lsn)));
    }

    /// Any value for a `[fleet]` or `[consistency]` key: the config is valid, or the error
    /// is typed and names a key of those tables (never a panic).
    #[test]
    fn config_values_are_valid_or_name_their_key(
        key in prop::sample::select(vec![
            "fleet.lease_timeout", "fleet.probe_interval", "fleet.probe_timeout",
            "fleet.connect_timeout", "fleet.tcp_keepalive", "fleet.tcp_user_timeout",
            "fleet.failure_threshold", "fleet.down_after", "fleet.slow_start",
            "fleet.max_waiters", "fleet.shutdown_timeout", "fleet.strategy",
            "fleet.restart.min_backoff", "fleet.restart.max_backoff", "fleet.restart.stable_after",
            "consistency.max_lag_bytes", "consistency.max_lag", "consistency.ryw_wait",
            "consistency.fallback", "consistency.default_read",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            (0u64..100_000, prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "y", ""]))
                .prop_map(|(n, u)| format!("\"{n}{u}\"")),
            "[a-z_ ]{0,12}".prop_map(|s| format!("\"{s}\"")),
            Just("\"-1s\"".to_owned()),
            Just("true".to_owned()),
            Just("1.5".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ],
    ) {
        let (table, name) = key.rsplit_once('.').expect("table.key");
        let text = format!("[{table}]\n{name} = {value}\n[primary]\nurl = \"postgres://app@h/app\"\n");
        match Config::from_toml_str(&text) {
            Ok(c) => prop_assert!(c.validate().is_ok()),
            Err(e) => {
                let k = e.key().map(str::to_owned);
                prop_assert!(
                    k.as_deref().is_some_and(|k| k.starts_with("fleet.") || k.starts_with("consistency.")),
                    "{} = {}: {} (key {:?})", key, value, e, k
                );
                let e: Error = e.into();
                prop_assert!(matches!(e, Error::Config(_)));
            }
        }
    }
}

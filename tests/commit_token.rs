//! Write tokens: taken after COMMIT (never inside a transaction that wrote), naming the
//! cluster, timeline and a position at or past the write; a stable text form; a read
//! after a token sees the write; foreign and impossible tokens are typed, never panics; an
//! `Lsn` goes to the server and back as a `pg_lsn` parameter.

mod common;

use pgfleet::{Error, Intent, Lsn, Role, Token, TokenError};
use pgfleet_testkit::LocalCluster;

/// (system identifier, timeline of the last checkpoint) read as superuser.
async fn control(cluster: &LocalCluster) -> anyhow::Result<(u64, u32)> {
    let su = cluster.superuser_client(cluster.primary()).await?;
    let row = su
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system()), \
             (SELECT timeline_id FROM pg_control_checkpoint())",
            &[],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i32>(1) as u32))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_names_the_committed_write() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let table = common::table("tok_write");
    let (system_id, timeline) = control(cluster).await?;
    let w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!(
        "CREATE TABLE {table} (id int4 PRIMARY KEY, v text)"
    ))
    .await?;
    drop(w);
    let su = cluster.superuser_client(cluster.primary()).await?;

    for i in 0..20 {
        let mut w = fleet.lease(Intent::Write).await?;
        let before: Lsn = w
            .query_one("SELECT pg_current_wal_insert_lsn()", &[])
            .await?
            .get(0);
        let v = format!("value {i}");
        w.execute(&format!("INSERT INTO {table} VALUES ($1, $2)"), &[&i, &v])
            .await?;
        let token = w.commit_token().await?;
        drop(w);
        let after: Lsn = su
            .query_one("SELECT pg_current_wal_insert_lsn()", &[])
            .await?
            .get(0);
        assert!(
            token.lsn() > before,
            "token {token} not past the position before the write ({before})"
        );
        assert!(
            token.lsn() <= after,
            "token {token} beyond the primary's position ({after})"
        );
        assert_eq!(token.system_id(), system_id, "token names this cluster");
        assert_eq!(token.timeline(), timeline);

        let text = token.to_string();
        assert!(text.starts_with("v2."), "{text}");
        assert_eq!(
            text.parse::<Token>(),
            Ok(token),
            "text form round-trips: {text}"
        );

        // A read after the token sees the write, wherever it is served.
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let got: Option<String> = r
            .query_opt(&format!("SELECT v FROM {table} WHERE id = $1"), &[&i])
            .await?
            .map(|row| row.get(0));
        assert_eq!(
            got.as_deref(),
            Some(v.as_str()),
            "read after {token} on {} ({:?})",
            r.server(),
            r.role()
        );
        assert!(r.ignored_token().is_none());
    }
    let status = fleet.status();
    println!("{status}");
    assert_eq!(status.ryw_on_replica + status.ryw_on_primary, 20);
    fleet
        .lease(Intent::Write)
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_inside_a_transaction_that_wrote() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let table = common::table("tok_tx");
    let mut w = fleet.lease(Intent::Write).await?;
    w.batch_execute(&format!("CREATE TABLE {table} (id int4)"))
        .await?;

    w.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await?;
    let r = w.commit_token().await;
    assert!(matches!(r, Err(Error::OpenTransaction)), "{r:?}");
    // Still inside the transaction, which can go on and commit; then a token is fine.
    w.batch_execute(&format!("INSERT INTO {table} VALUES (2); COMMIT"))
        .await?;
    let token = w.commit_token().await?;

    // A transaction that has not written has nothing to wait for: a token is fine.
    w.batch_execute("BEGIN; SELECT 1").await?;
    let inside = w.commit_token().await?;
    assert!(inside.lsn() >= token.lsn());
    w.batch_execute("COMMIT").await?;
    drop(w);

    let r = fleet.lease(Intent::read_after(&token)).await?;
    let n: i64 = r
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    assert_eq!(
        n,
        2,
        "both rows committed, visible after the token on {}",
        r.server()
    );
    drop(r);
    fleet
        .lease(Intent::Write)
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_impossible_tokens() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let (system_id, timeline) = control(cluster).await?;
    let mut w = fleet.lease(Intent::Write).await?;
    let token = w.commit_token().await?;
    drop(w);

    // Another cluster's token: not ours, ignored with its reason; the read is served.
    let foreign = Token::new(system_id ^ 1, token.timeline(), token.lsn());
    let r = fleet.lease(Intent::read_after(&foreign)).await?;
    assert_eq!(
        r.ignored_token(),
        Some(&TokenError::ForeignSystem {
            ours: system_id,
            theirs: system_id ^ 1
        })
    );
    let one: i32 = r.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    assert_eq!(r.role(), Role::Replica, "served as an eventual read");
    drop(r);
    assert!(matches!(
        fleet.check_token(&foreign),
        Err(TokenError::ForeignSystem { .. })
    ));
    let (_, ignored) = fleet.session_from(foreign);
    assert!(matches!(ignored, Some(TokenError::ForeignSystem { .. })));

    // A timeline this cluster never had: a typed error.
    let future = Token::new(system_id, 999, token.lsn());
    let r = fleet.lease(Intent::read_after(&future)).await;
    assert!(
        matches!(
            &r,
            Err(Error::Token(TokenError::UnknownTimeline { current, theirs: 999 })) if *current == timeline
        ),
        "{r:?}"
    );
    assert!(!r.as_ref().is_err_and(|e| e.is_retryable()));

    // Our own token is checked fine.
    assert_eq!(fleet.check_token(&token), Ok(()));
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsn_parameters_round_trip_through_the_server() -> anyhow::Result<()> {
    let cluster = LocalCluster::shared().await?;
    let su = cluster.superuser_client(cluster.primary()).await?;
    let now: Lsn = su
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await?
        .get(0);
    for lsn in [Lsn::ZERO, Lsn(1), now, Lsn(0x16_B374_D848), Lsn(u64::MAX)] {
        // Sent in binary as a parameter, read back in binary and as the server's own text.
        let row = su
            .query_one("SELECT $1::pg_lsn, $1::pg_lsn::text", &[&lsn])
            .await?;
        assert_eq!(row.get::<_, Lsn>(0), lsn);
        assert_eq!(row.get::<_, String>(1), lsn.to_string());
    }
    // Compared by the server with its own position ($1 and $2 are inferred as pg_lsn).
    let row = su
        .query_one(
            "SELECT pg_current_wal_insert_lsn() >= $1, pg_current_wal_insert_lsn() >= $2",
            &[&now, &Lsn(u64::MAX)],
        )
        .await?;
    assert!(row.get::<_, bool>(0), "the position went back past {now}");
    assert!(
        !row.get::<_, bool>(1),
        "the server's position is at or past {}",
        Lsn(u64::MAX)
    );
    Ok(())
}

#[test]
fn garbage_token_text_is_an_error() -> anyhow::Result<()> {
    let long = "7".repeat(1000);
    let long_valid_prefix = format!("v1.1.1.0/{}", "1".repeat(1000));
    let cases = [
        "",
        "v1",
        "v1.",
        "v1...",
        "v1.x.1.0/0",
        "v1.1.0.0/1",
        "v1.1.1.0/",
        "v1.1.1./1",
        "v1.1.1.0/1/2",
        "v1.1.1.0/1.",
        "v1.1.1.g/1",
        "v2.1.1.0/1",
        "V1.1.1.0/1",
        "v1.ffffffffffffffff1.1.0/1",
        "v1.1.1ffffffff.0/1",
        "v1.-1.1.0/1",
        "v1.1.1.0/-1",
        "v1.1.1.100000000/0",
        "v1.1.1.0/100000000",
        "v1.é.1.0/1",
        "v1.1.1.0/1\0",
        "\u{feff}v1.1.1.0/1",
        long.as_str(),
        long_valid_prefix.as_str(),
    ];
    for text in cases {
        let r = std::panic::catch_unwind(|| text.parse::<Token>());
        let shown: String = text.chars().take(40).collect();
        match r {
            Ok(Err(TokenError::Malformed { .. })) => {}
            Ok(other) => panic!("{shown:?} parsed to {other:?}"),
            Err(_) => panic!("parsing {shown:?} panicked"),
        }
    }
    // And a valid one parses, for contrast.
    let t: Token = "v2.6f1c2d3e4a5b6c7d.1.0/03000148".parse()?;
    assert_eq!(
        (t.system_id(), t.timeline(), t.lsn()),
        (0x6f1c2d3e4a5b6c7d, 1, Lsn(0x3000148))
    );
    Ok(())
}

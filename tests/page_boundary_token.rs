//! DESIGN §3 pitfall 3: when the primary's WAL ends exactly on a segment boundary,
//! `pg_current_wal_insert_lsn()` points 40 bytes past it (past the next segment's long
//! page header) while a standby's replay position stops at the boundary. On an idle
//! primary that raw position is never reached. A commit token taken there must be
//! normalised down to the boundary, so an idle, caught-up replica serves the read.

mod common;

use std::time::Duration;

use pgfleet::{Intent, Lsn, Role, Token};
use pgfleet_testkit::LocalCluster;

const SEGMENT: u64 = 16 * 1024 * 1024;
const LONG_PAGE_HEADER: u64 = 40;

async fn lsn_of(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Lsn> {
    let text: String = client.query_one(sql, &[]).await?.get(0);
    Ok(text.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_at_a_segment_boundary_is_served_by_an_idle_caught_up_replica() -> anyhow::Result<()>
{
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    let fleet = common::fast_fleet(&cluster).await;
    let su = cluster.superuser_client(cluster.primary()).await?;
    let replica_su = cluster.superuser_client(replica).await?;
    let segment: String = su
        .query_one(
            "SELECT pg_size_bytes(current_setting('wal_segment_size'))::text",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        segment.parse::<u64>()?,
        SEGMENT,
        "the testkit's WAL segment size"
    );

    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute("CREATE TABLE pb (id int PRIMARY KEY)")
            .await?;
    }

    // Background WAL (e.g. the bgwriter's running-xacts record) can land at any moment
    // and move the primary off the boundary: detect it and try again.
    for attempt in 1..=8 {
        // A switch needs WAL since the last one: write something first.
        {
            let w = fleet.lease(Intent::Write).await?;
            w.execute("INSERT INTO pb VALUES ($1)", &[&attempt]).await?;
        }
        su.batch_execute("SELECT pg_switch_wal()").await?;
        let raw = lsn_of(&su, "SELECT pg_current_wal_insert_lsn()::text").await?;
        if raw.as_u64() % SEGMENT != LONG_PAGE_HEADER {
            println!("attempt {attempt}: insert LSN {raw} is not 40 bytes past a segment boundary; retrying");
            continue;
        }
        let boundary = Lsn(raw.as_u64() - LONG_PAGE_HEADER);

        // The replica replays up to the boundary, and the fleet has seen it there.
        cluster
            .wait_replayed(replica, &boundary.to_string(), Duration::from_secs(30))
            .await?;
        common::wait_for(
            "the fleet to see replica1 at the boundary",
            Duration::from_secs(10),
            || async {
                fleet
                    .status()
                    .server("replica1")
                    .is_some_and(|s| s.lsn.is_some_and(|l| l >= boundary))
            },
        )
        .await;

        // No writes since the switch: the token is the boundary, not the raw position.
        // (Not served by a fallback means a replica had it within `ryw_wait`.)
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.commit_token().await?
        };
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let seen: i64 = r
            .query_one("SELECT count(*) FROM pb WHERE id = $1", &[&attempt])
            .await?
            .get(0);
        let (server, role, fallback, waited) =
            (r.server().to_owned(), r.role(), r.is_fallback(), r.waited());
        drop(r);
        let replayed = lsn_of(&replica_su, "SELECT pg_last_wal_replay_lsn()::text").await?;

        // The raw insert position, as an unnormalised token would carry it: the idle
        // replica never reaches it, so such a read can only fall back.
        let raw_token = Token::new(token.system_id(), token.timeline(), raw);
        let rr = fleet.lease(Intent::read_after(&raw_token)).await?;
        rr.simple_query("SELECT 1").await?;
        let raw_fallback = rr.is_fallback();
        drop(rr);

        let still = lsn_of(&su, "SELECT pg_current_wal_insert_lsn()::text").await?;
        if still != raw {
            println!("attempt {attempt}: background WAL moved the primary from {raw} to {still}; retrying");
            continue;
        }
        println!(
            "attempt {attempt}: raw insert LSN {raw}, token {token}, replica replayed {replayed}; \
             read served by {server} (fallback {fallback}) after {waited:?}"
        );
        assert_eq!(
            token.lsn(),
            boundary,
            "the token must be normalised down to the segment boundary"
        );
        assert_eq!(token.lsn().as_u64() % SEGMENT, 0);
        assert_eq!(
            replayed, boundary,
            "the idle replica's replay position stops at the boundary, short of the raw insert LSN {raw}"
        );
        assert_eq!(
            seen, 1,
            "the read after the token must see the row written before the switch"
        );
        assert!(
            !fallback,
            "an idle replica that replayed up to the boundary should serve the read; served by {server}\n{}",
            fleet.status()
        );
        assert_eq!(role, Role::Replica);
        assert_eq!(server, "replica1");
        assert!(
            raw_fallback,
            "a read after the raw insert LSN {raw} cannot be served by a replica at {replayed}"
        );
        fleet.shutdown().await;
        return Ok(());
    }
    panic!("background WAL kept moving the primary off the segment boundary");
}

//! DESIGN §3 pitfall 3: when the primary's WAL ends exactly on a page boundary,
//! `pg_current_wal_insert_lsn()` points past the next page's header (40 bytes at a segment
//! start, 24 at any other page start) while a standby's replay position stops at the
//! boundary. On an idle primary that raw position is never reached. A commit token taken
//! there must be normalised down to the boundary, so an idle, caught-up replica serves the
//! read. One test per kind of boundary, each on its own cluster (they move the WAL around).

mod common;

use std::time::Duration;

use pgfleet::{Fleet, Intent, Lsn, Role, Token};
use pgfleet_testkit::LocalCluster;
use tokio_postgres::Client;

const SEGMENT: u64 = 16 * 1024 * 1024;
const BLOCK: u64 = 8192;

/// How many times a test puts the WAL end on a boundary before giving up: background WAL
/// (e.g. the bgwriter's running-xacts record) can land at any moment and move it off.
const ATTEMPTS: i32 = 8;

/// The kind of page boundary the primary's WAL ends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boundary {
    /// The start of a WAL segment: the next page has a long header.
    Segment,
    /// The start of any other page: a short header.
    Page,
}

impl Boundary {
    /// The header the raw insert position points past.
    fn header(self) -> u64 {
        match self {
            Boundary::Segment => 40,
            Boundary::Page => 24,
        }
    }

    /// Which boundary the raw insert position `raw` sits just past, if any.
    fn of(raw: Lsn) -> Option<Boundary> {
        let in_segment = raw.as_u64() % SEGMENT;
        if in_segment == Boundary::Segment.header() {
            Some(Boundary::Segment)
        } else if in_segment >= BLOCK && raw.as_u64() % BLOCK == Boundary::Page.header() {
            Some(Boundary::Page)
        } else {
            None
        }
    }
}

/// A one-replica cluster, a fleet on it, table `pb`, and superuser clients.
struct Fixture {
    /// Started by the test, dropped (stopped) with it.
    cluster: LocalCluster,
    /// Probes every 50 ms, so it sees the replica at the boundary quickly.
    fleet: Fleet,
    /// Superuser on the primary: WAL positions, `pg_switch_wal`, logical messages.
    su: Client,
    /// Superuser on the replica: its replay position.
    replica_su: Client,
}

impl Fixture {
    async fn start() -> anyhow::Result<Fixture> {
        common::trace();
        let cluster = LocalCluster::builder().replicas(1).start().await?;
        let fleet = common::fast_fleet(&cluster).await;
        let su = cluster.superuser_client(cluster.primary()).await?;
        let replica_su = cluster.superuser_client(cluster.replica(0)).await?;
        let row = su
            .query_one(
                "SELECT current_setting('wal_block_size'), \
                 pg_size_bytes(current_setting('wal_segment_size'))::text",
                &[],
            )
            .await?;
        let (block, segment): (String, String) = (row.get(0), row.get(1));
        assert_eq!(block.parse::<u64>()?, BLOCK, "the server's WAL block size");
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
        Ok(Fixture {
            cluster,
            fleet,
            su,
            replica_su,
        })
    }

    /// Writes row `id` through the fleet (a committed write: WAL, flushed).
    async fn write_row(&self, id: i32) -> anyhow::Result<()> {
        let w = self.fleet.lease(Intent::Write).await?;
        w.execute("INSERT INTO pb VALUES ($1)", &[&id]).await?;
        Ok(())
    }

    /// With the primary's raw insert position at `raw`, just past a `kind` boundary, and no
    /// write since row `id`: the write lease's token is the boundary, an idle replica serves a
    /// read after it (and sees row `id`), and a token at `raw` can only fall back.
    ///
    /// Returns `Ok(false)` when background WAL moved the primary meanwhile: try again.
    async fn check_token_at(&self, kind: Boundary, raw: Lsn, id: i32) -> anyhow::Result<bool> {
        assert_eq!(
            Boundary::of(raw),
            Some(kind),
            "{raw} is not just past a {kind:?} boundary"
        );
        let boundary = Lsn(raw.as_u64() - kind.header());
        let fleet = &self.fleet;

        // The replica replays up to the boundary, and the fleet has seen it there.
        self.cluster
            .wait_replayed(
                self.cluster.replica(0),
                &boundary.to_string(),
                Duration::from_secs(15),
            )
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

        // No writes since the boundary was reached: the token is the boundary, not the raw
        // position. (Not served by a fallback means a replica had it within `ryw_wait`.)
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.commit_token().await?
        };
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let seen: i64 = r
            .query_one("SELECT count(*) FROM pb WHERE id = $1", &[&id])
            .await?
            .get(0);
        let (server, role, fallback, waited) =
            (r.server().to_owned(), r.role(), r.is_fallback(), r.waited());
        drop(r);
        let replayed = lsn_of(&self.replica_su, "SELECT pg_last_wal_replay_lsn()::text").await?;

        // The raw insert position, as an unnormalised token would carry it: the idle
        // replica never reaches it, so such a read can only fall back.
        let raw_token = Token::new(token.system_id(), token.timeline(), raw);
        let rr = fleet.lease(Intent::read_after(&raw_token)).await?;
        rr.simple_query("SELECT 1").await?;
        let raw_fallback = rr.is_fallback();
        drop(rr);

        let still = insert_lsn(&self.su).await?;
        if still != raw {
            println!("row {id}: background WAL moved the primary from {raw} to {still}; retrying");
            return Ok(false);
        }
        println!(
            "row {id}: raw insert LSN {raw}, token {token}, replica replayed {replayed}; \
             read served by {server} (fallback {fallback}) after {waited:?}"
        );
        assert_eq!(
            token.lsn(),
            boundary,
            "the token must be normalised down to the {kind:?} boundary"
        );
        assert_eq!(token.lsn().as_u64() % BLOCK, 0);
        assert_eq!(
            token.lsn().as_u64() % SEGMENT == 0,
            kind == Boundary::Segment,
            "a {kind:?} boundary {} a segment start",
            if kind == Boundary::Segment {
                "is"
            } else {
                "is not"
            }
        );
        assert_eq!(
            replayed, boundary,
            "the idle replica's replay position stops at the boundary, short of the raw insert LSN {raw}"
        );
        assert_eq!(
            seen, 1,
            "the read after the token must see the row written before the boundary"
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
        Ok(true)
    }
}

async fn lsn_of(client: &Client, sql: &str) -> anyhow::Result<Lsn> {
    let text: String = client.query_one(sql, &[]).await?.get(0);
    Ok(text.parse()?)
}

/// The primary's raw insert position (not normalised).
async fn insert_lsn(su: &Client) -> anyhow::Result<Lsn> {
    lsn_of(su, "SELECT pg_current_wal_insert_lsn()::text").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_at_a_segment_boundary_is_served_by_an_idle_caught_up_replica() -> anyhow::Result<()>
{
    let f = Fixture::start().await?;
    for attempt in 1..=ATTEMPTS {
        // A switch needs WAL since the last one: write something first.
        f.write_row(attempt).await?;
        f.su.batch_execute("SELECT pg_switch_wal()").await?;
        let raw = insert_lsn(&f.su).await?;
        if Boundary::of(raw) != Some(Boundary::Segment) {
            println!("attempt {attempt}: insert LSN {raw} is not 40 bytes past a segment boundary; retrying");
            continue;
        }
        if f.check_token_at(Boundary::Segment, raw, attempt).await? {
            println!("segment boundary reached on attempt {attempt}");
            f.fleet.shutdown().await;
            return Ok(());
        }
    }
    panic!("background WAL kept moving the primary off the segment boundary");
}

/// The prefix of the padding messages (WAL records of resource manager LogicalMessage).
const PAD: &str = "pb";

/// The shortest message the padding uses: from 229 bytes on, the record's main data (24-byte
/// message header, prefix with its NUL, message) takes the long data header, whose size no
/// longer changes with the length.
const MIN_PAD: u64 = 256;

/// Emits a non-transactional logical message of `n` bytes: exactly one WAL record, no
/// transaction. Returns the LSN where the record ends.
async fn emit(su: &Client, n: u64) -> anyhow::Result<Lsn> {
    let n = i32::try_from(n)?;
    let text: String = su
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, repeat('x', $2))::text",
            &[&PAD, &n],
        )
        .await?
        .get(0);
    Ok(text.parse()?)
}

/// How many bytes a padding record takes beyond its message, rounded as records are (MAXALIGN,
/// 8 bytes): `align8(fixed + N) - N` for a sample length `N`, measured from LSN deltas rather
/// than assumed from struct sizes. For a message of `n = left - overhead` bytes, `fixed + n`
/// is then within 8 bytes below `left`, so a record that fits the page ends exactly `left`
/// bytes on, whatever `fixed` is (`left` is a multiple of 8).
async fn padding_overhead(su: &Client) -> anyhow::Result<u64> {
    const N: u64 = 300;
    let mut best: Option<u64> = None;
    for _ in 0..4 {
        let start = insert_lsn(su).await?;
        let end = emit(su, N).await?;
        let (start, end) = (start.as_u64(), end.as_u64());
        // A record crossing a page also holds the next page's header: measure another.
        if start / BLOCK != (end - 1) / BLOCK {
            continue;
        }
        // Background WAL between the two statements only makes the delta larger.
        let overhead = end - start - N;
        best = Some(best.map_or(overhead, |b| b.min(overhead)));
    }
    let overhead =
        best.ok_or_else(|| anyhow::anyhow!("every calibration record crossed a page"))?;
    assert_eq!(
        (N + overhead) % 8,
        0,
        "records are MAXALIGNed to 8 bytes (overhead {overhead})"
    );
    Ok(overhead)
}

/// Pads the primary's WAL with logical messages so that it ends exactly at the end of a page
/// that is not the last of its segment. Returns the raw insert position afterwards, which is
/// just past the next page's short header unless background WAL interfered.
async fn pad_to_page_end(su: &Client, overhead: u64) -> anyhow::Result<Lsn> {
    // One record that ends the page, after at most two fillers to get into range.
    for _ in 0..3 {
        let pos = insert_lsn(su).await?.as_u64();
        let left = BLOCK - pos % BLOCK;
        if left < overhead + MIN_PAD || (pos + left) % SEGMENT == 0 {
            // Too little room for a long-data-header record, or the page ends a segment (its
            // end would be a segment boundary): a filler longer than the room left continues
            // on the next page after its header, and ends well short of that page's end.
            let end = emit(su, left.max(MIN_PAD)).await?;
            println!(
                "filler from {} ({left} bytes left on the page) to {end}",
                Lsn(pos)
            );
            continue;
        }
        emit(su, left - overhead).await?;
        break;
    }
    insert_lsn(su).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_at_a_page_boundary_is_served_by_an_idle_caught_up_replica() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let overhead = padding_overhead(&f.su).await?;
    println!("a padding record takes its message length + {overhead} bytes");
    for attempt in 1..=ATTEMPTS {
        // The row to read back, written before the padding: nothing is written after it.
        f.write_row(attempt).await?;
        let raw = pad_to_page_end(&f.su, overhead).await?;
        if Boundary::of(raw) != Some(Boundary::Page) {
            println!("attempt {attempt}: insert LSN {raw} is not 24 bytes past a page boundary; retrying");
            continue;
        }
        if f.check_token_at(Boundary::Page, raw, attempt).await? {
            println!("page boundary reached on attempt {attempt}");
            f.fleet.shutdown().await;
            return Ok(());
        }
    }
    panic!("background WAL kept moving the primary off the page boundary");
}

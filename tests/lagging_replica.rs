//! A replica more than `max_lag_bytes` behind the primary serves no eventual reads
//! (lag is primary − replica, DESIGN §3 pitfall 7: a lagging replica is excluded, never
//! preferred), and serves them again once it has caught up. A session's eventual reads
//! keep that bound on top of the session's mark.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use pgfleet::{Consistency, Health, Intent, Role};
use pgfleet_testkit::LocalCluster;

const EVENTUAL: Intent = Intent::Read(Consistency::Eventual);
const MIB: u64 = 1024 * 1024;
const ROWS: i64 = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_beyond_max_lag_bytes_is_excluded_until_it_catches_up() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    let tables = format!(
        "{}[consistency]\nmax_lag_bytes = {MIB}\nmax_lag = \"60s\"\n",
        common::FAST
    );
    let fleet = common::start(common::config(&cluster, &tables, |_| {})).await;

    // The table exists everywhere; its rows will not reach the paused replica. A
    // session writes it: its mark is a position replica1 will have replayed.
    let session = fleet.session();
    let w = session.lease(Intent::Write).await?;
    w.batch_execute("CREATE TABLE lag_t (id int8 PRIMARY KEY, pad text NOT NULL)")
        .await?;
    drop(w);
    let mark = session.settled_token().await.expect("the session wrote");
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;

    cluster.pause_replay(cluster.replica(0)).await?;
    let mut w = fleet.lease(Intent::Write).await?;
    assert_eq!(w.role(), Role::Primary);
    let before = w
        .query_one("SELECT pg_current_wal_insert_lsn()", &[])
        .await?
        .get::<_, pgfleet::Lsn>(0);
    let n = w
        .execute(
            "INSERT INTO lag_t SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, $1::int8) g",
            &[&ROWS],
        )
        .await?;
    assert_eq!(n, ROWS as u64);
    let token = w.commit_token().await?;
    drop(w);
    let written = token.lsn().bytes_since(before);
    assert!(written > 2 * MIB, "wrote only {written} bytes of WAL");

    // replica2 streams and replays; replica1 receives but does not replay.
    cluster
        .wait_replayed(
            cluster.replica(1),
            &token.lsn().to_string(),
            Duration::from_secs(30),
        )
        .await?;
    let f = fleet.clone();
    common::wait_for(
        "status: replica1 > 1 MiB behind, replica2 within bounds",
        Duration::from_secs(20),
        || {
            let s = f.status();
            async move {
                let r1 = s.server("replica1").expect("replica1");
                let r2 = s.server("replica2").expect("replica2");
                r1.lag_bytes.is_some_and(|b| b > MIB) && r2.lag_bytes.is_some_and(|b| b <= MIB)
            }
        },
    )
    .await;
    let status = fleet.status();
    println!("{status}");
    let r1 = status.server("replica1").expect("replica1");
    assert_eq!(
        r1.health,
        Health::Healthy,
        "replica1 is excluded for its lag, not its health"
    );
    assert!(r1.paused, "status shows replica1's replay paused");
    assert!(
        r1.lag_bytes.expect("known") <= written + MIB,
        "lag is primary − replica: {status}"
    );

    // 200 eventual reads: none on replica1, all on a replica that has the rows.
    let mut by_server: HashMap<String, usize> = HashMap::new();
    for i in 0..200 {
        let lease = fleet.lease(EVENTUAL).await?;
        assert_ne!(
            lease.server(),
            "replica1",
            "lease {i} went to the lagging replica:\n{}",
            fleet.status()
        );
        let count: i64 = lease
            .query_one("SELECT count(*) FROM lag_t", &[])
            .await?
            .get(0);
        assert_eq!(
            count,
            ROWS,
            "lease {i} on {} saw stale data",
            lease.server()
        );
        *by_server.entry(lease.server().to_string()).or_default() += 1;
    }
    // The same through sessions: replica1 has replayed their mark but is beyond
    // max_lag_bytes, so it serves none of them either.
    assert!(mark.lsn() <= before, "the mark {mark} predates the pause");
    // replica1 has replayed the mark: a read after it alone may go there.
    common::wait_for(
        "replica1 to serve a read after the session's mark",
        Duration::from_secs(10),
        || async {
            let r = fleet
                .lease(Intent::read_after(&mark))
                .await
                .expect("read after the mark");
            r.server() == "replica1"
        },
    )
    .await;
    // Each read in a new session at that mark: a session's own reads raise its mark to
    // what they saw (replica2's position), which would exclude replica1 anyway.
    for i in 0..100 {
        let (resumed, rejected) = fleet.session_from(mark);
        assert!(rejected.is_none(), "{rejected:?}");
        let lease = resumed.lease(EVENTUAL).await?;
        assert_ne!(
            lease.server(),
            "replica1",
            "session lease {i} went to the lagging replica:\n{}",
            fleet.status()
        );
        *by_server.entry(lease.server().to_string()).or_default() += 1;
    }
    println!("while replica1 lags: {by_server:?}");
    assert_eq!(
        by_server.get("replica2"),
        Some(&300),
        "the fresh replica serves them: {by_server:?}"
    );

    // The paused replica really is stale: what it would have served.
    let direct = cluster.superuser_client(cluster.replica(0)).await?;
    let stale: i64 = direct
        .query_one("SELECT count(*) FROM lag_t", &[])
        .await?
        .get(0);
    assert_eq!(stale, 0, "replica1 has not replayed the rows");

    // Resumed, it catches up and serves eventual reads again, with the rows.
    cluster.resume_replay(cluster.replica(0)).await?;
    let f = fleet.clone();
    common::wait_for(
        "replica1 serves eventual reads again",
        Duration::from_secs(30),
        || {
            let f = f.clone();
            async move {
                for _ in 0..20 {
                    let lease = f.lease(EVENTUAL).await.expect("eventual lease");
                    if lease.server() == "replica1" {
                        let count: i64 = lease
                            .query_one("SELECT count(*) FROM lag_t", &[])
                            .await
                            .expect("count")
                            .get(0);
                        assert_eq!(count, ROWS, "replica1 serves only once it has the rows");
                        return true;
                    }
                }
                false
            }
        },
    )
    .await;
    let r1 = fleet
        .status()
        .server("replica1")
        .cloned()
        .expect("replica1");
    assert!(
        !r1.paused && r1.lag_bytes.is_some_and(|b| b <= MIB),
        "{r1:?}"
    );
    fleet.shutdown().await;
    Ok(())
}

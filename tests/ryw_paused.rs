//! Read-your-writes when every replica has paused replay (DESIGN §3): no replica can
//! catch up, so a read after a token falls back to the primary at once instead of
//! waiting out `ryw_wait`, and still sees its write. Once replay resumes, the same
//! reads are served by replicas again and still see their writes.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Intent, Role};
use pgfleet_testkit::LocalCluster;

const ROUNDS: i32 = 200;
const RYW_WAIT: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ryw_falls_back_at_once_when_every_replica_is_paused() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    let tables = format!("{}\n[consistency]\nryw_wait = \"100ms\"\n", common::FAST);
    let fleet = common::start(common::config(&cluster, &tables, |_| {})).await;

    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute(
            "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0)",
        )
        .await?;
    }
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;

    // Pause replay on both replicas, and wait until the fleet sees both paused.
    for r in cluster.replicas() {
        cluster.pause_replay(r).await?;
    }
    common::wait_for(
        "the fleet to see both replicas paused",
        Duration::from_secs(10),
        || async {
            let s = fleet.status();
            ["replica1", "replica2"]
                .iter()
                .all(|n| s.server(n).is_some_and(|x| x.paused))
        },
    )
    .await;
    let waited_before = fleet.status().ryw_waited;

    // Every read after a fresh write: no replica can have it, so the primary serves it.
    let mut read_time = Duration::ZERO;
    let mut last_token = None;
    for i in 1..=ROUNDS {
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            let n = w.execute("UPDATE kv SET v = $1 WHERE k = 1", &[&i]).await?;
            assert_eq!(n, 1);
            w.commit_token().await?
        };
        let started = Instant::now();
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let v: i32 = r
            .query_one("SELECT v FROM kv WHERE k = 1", &[])
            .await?
            .get(0);
        read_time += started.elapsed();
        assert_eq!(
            v,
            i,
            "round {i}: read after the write must see it (served by {})",
            r.server()
        );
        assert!(
            r.is_fallback(),
            "round {i}: replay is paused everywhere, yet {} served it",
            r.server()
        );
        assert_eq!(r.role(), Role::Primary, "round {i}");
        assert_eq!(r.server(), "primary", "round {i}");
        last_token = Some(token);
    }
    let bound = RYW_WAIT * ROUNDS as u32 / 4;
    println!("{ROUNDS} reads with both replicas paused took {read_time:?} (bound {bound:?})");
    assert!(
        read_time < bound,
        "falling back should be immediate when every replica is paused: {ROUNDS} reads took {read_time:?}, \
         bound {bound:?} ({ROUNDS} x ryw_wait = {:?})\n{}",
        RYW_WAIT * ROUNDS as u32,
        fleet.status()
    );
    let status = fleet.status();
    assert_eq!(
        status.ryw_waited, waited_before,
        "no read should have been parked at the router while every replica is paused\n{status}"
    );

    // Resume, and wait until both replicas have replayed the last write and the fleet knows.
    for r in cluster.replicas() {
        cluster.resume_replay(r).await?;
    }
    let last = last_token.expect("rounds ran").lsn();
    for r in cluster.replicas() {
        cluster
            .wait_replayed(r, &last.to_string(), Duration::from_secs(30))
            .await?;
    }
    common::wait_for(
        "the fleet to see both replicas resumed and caught up",
        Duration::from_secs(10),
        || async {
            let s = fleet.status();
            ["replica1", "replica2"].iter().all(|n| {
                s.server(n)
                    .is_some_and(|x| !x.paused && x.lsn.is_some_and(|l| l >= last))
            })
        },
    )
    .await;

    let mut on_replica = 0;
    let mut servers = std::collections::BTreeMap::<String, u32>::new();
    for i in ROUNDS + 1..=2 * ROUNDS {
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.execute("UPDATE kv SET v = $1 WHERE k = 1", &[&i]).await?;
            w.commit_token().await?
        };
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let v: i32 = r
            .query_one("SELECT v FROM kv WHERE k = 1", &[])
            .await?
            .get(0);
        assert_eq!(
            v,
            i,
            "round {i}: read after the write must see it (served by {})",
            r.server()
        );
        if !r.is_fallback() && r.role() == Role::Replica {
            on_replica += 1;
        }
        *servers.entry(r.server().to_owned()).or_default() += 1;
    }
    println!("after resuming: {on_replica}/{ROUNDS} reads on replicas; by server {servers:?}");
    assert!(
        on_replica * 10 >= ROUNDS * 9,
        "after replay resumed, at least 90% of read-after-write reads should be served by replicas; \
         got {on_replica}/{ROUNDS} ({servers:?})\n{}",
        fleet.status()
    );
    fleet.shutdown().await;
    Ok(())
}

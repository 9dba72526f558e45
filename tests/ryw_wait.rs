//! Read-your-writes waits at the router for a replica that is behind the token but
//! catching up (DESIGN §3: "else wait up to `ryw_wait`"), and is then served by that
//! replica with the write visible; a replica that cannot catch up (replay paused)
//! makes the read fall back at once instead of waiting out `ryw_wait`.

mod common;

use std::time::Duration;

use pgfleet::{Consistency, Intent, Role};
use pgfleet_testkit::LocalCluster;

const RYW_WAIT: Duration = Duration::from_secs(2);
/// `recovery_min_apply_delay` on the replica: each commit becomes visible there this
/// long after it happened on the primary.
const APPLY_DELAY: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ryw_waits_for_a_catching_up_replica_and_falls_back_at_once_from_a_paused_one(
) -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let replica = cluster.replica(0);
    let tables = format!(
        "{}\n[consistency]\nryw_wait = \"2s\"\n",
        common::FAST.replace("lease_timeout = \"2s\"", "lease_timeout = \"3s\"")
    );
    let fleet = common::start(common::config(&cluster, &tables, |c| {
        assert_eq!(c.consistency.ryw_wait, RYW_WAIT);
        assert_eq!(c.fleet.lease_timeout, Duration::from_secs(3));
    }))
    .await;

    {
        let w = fleet.lease(Intent::Write).await?;
        w.batch_execute("CREATE TABLE rw (id int PRIMARY KEY, v text NOT NULL)")
            .await?;
    }
    cluster.wait_all_replayed(Duration::from_secs(30)).await?;

    // Case 1: the replica is streaming and replaying, but every commit reaches it only
    // APPLY_DELAY late. The read must wait for it rather than fall back.
    cluster.set_apply_delay(replica, APPLY_DELAY).await?;
    for round in 1..=3 {
        let value = format!("delayed-{round}");
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.execute("INSERT INTO rw VALUES ($1, $2)", &[&round, &value])
                .await?;
            w.commit_token().await?
        };
        let waited_before = fleet.status().ryw_waited;
        let f = fleet.clone();
        let reader = tokio::spawn(async move {
            let r = f.lease(Intent::read_after(&token)).await?;
            let v: Option<String> = r
                .query_opt("SELECT v FROM rw WHERE id = $1", &[&round])
                .await?
                .map(|row| row.get(0));
            anyhow::Ok((
                r.server().to_owned(),
                r.role(),
                r.is_fallback(),
                r.waited(),
                v,
            ))
        });
        // The lease is parked at the router, not fallen back.
        common::wait_for(
            "the read to be parked at the router",
            Duration::from_secs(2),
            || async { fleet.status().ryw_waited > waited_before },
        )
        .await;
        assert!(
            !reader.is_finished(),
            "round {round}: the read finished although the replica cannot show the write for {APPLY_DELAY:?}"
        );
        let (server, role, fallback, waited, v) = reader.await??;
        println!("round {round}: served by {server} (fallback {fallback}) after {waited:?}");
        assert_eq!(
            v.as_deref(),
            Some(value.as_str()),
            "round {round}: read after the write (served by {server}) must see it"
        );
        assert!(
            !fallback,
            "round {round}: a catching-up replica should serve it, not a fallback\n{}",
            fleet.status()
        );
        assert_eq!(role, Role::Replica, "round {round}");
        assert_eq!(server, "replica1", "round {round}");
        // The write is invisible on the replica for APPLY_DELAY after its commit; it was
        // seen there, so the lease waited; and it did not wait out ryw_wait.
        assert!(
            waited >= APPLY_DELAY / 2 && waited < RYW_WAIT,
            "round {round}: waited {waited:?}, expected about {APPLY_DELAY:?} (< ryw_wait {RYW_WAIT:?})"
        );
    }
    cluster.set_apply_delay(replica, Duration::ZERO).await?;

    // Case 2: replay paused. The replica cannot catch up, so the read falls back at once.
    cluster.pause_replay(replica).await?;
    common::wait_for(
        "the fleet to see replay paused",
        Duration::from_secs(10),
        || async { fleet.status().server("replica1").is_some_and(|s| s.paused) },
    )
    .await;
    // Open the primary's read-only (fallback) pool first, so `waited` measures routing,
    // not a new connection.
    {
        let r = fleet.lease(Intent::Read(Consistency::Strong)).await?;
        r.simple_query("SELECT 1").await?;
    }
    for round in 10..13 {
        let value = format!("paused-{round}");
        let token = {
            let mut w = fleet.lease(Intent::Write).await?;
            w.execute("INSERT INTO rw VALUES ($1, $2)", &[&round, &value])
                .await?;
            w.commit_token().await?
        };
        let waited_before = fleet.status().ryw_waited;
        let r = fleet.lease(Intent::read_after(&token)).await?;
        let v: Option<String> = r
            .query_opt("SELECT v FROM rw WHERE id = $1", &[&round])
            .await?
            .map(|row| row.get(0));
        println!(
            "paused round {round}: served by {} after {:?}",
            r.server(),
            r.waited()
        );
        assert_eq!(
            v.as_deref(),
            Some(value.as_str()),
            "round {round}: must see its write"
        );
        assert!(
            r.is_fallback(),
            "round {round}: the paused replica served it"
        );
        assert_eq!(r.role(), Role::Primary, "round {round}");
        assert!(
            r.waited() < RYW_WAIT / 4,
            "round {round}: falling back from a paused replica took {:?}; it should be at once (ryw_wait {RYW_WAIT:?})",
            r.waited()
        );
        assert_eq!(
            fleet.status().ryw_waited,
            waited_before,
            "round {round}: the read was parked"
        );
    }
    cluster.resume_replay(replica).await?;
    fleet.shutdown().await;
    Ok(())
}

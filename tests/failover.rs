//! Following a failover without a restart (DESIGN §3): roles come from probes, so
//! writes move to a promoted replica as soon as its probe shows it; tokens from before
//! the promotion are honoured at or below the switch point and refused above it with
//! `WriteMayBeLost` (never a silent stale read); two live primaries refuse writes with
//! `SplitBrain` until one steps down. Each test breaks its own cluster.

mod common;

use std::time::{Duration, Instant};

use pgfleet::{Error, Intent, Role};
use pgfleet_testkit::LocalCluster;

fn tables() -> String {
    format!("{}\n[consistency]\nryw_wait = \"200ms\"\n", common::FAST)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promotion_and_tokens_past_the_switch_point_are_refused(
) -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(2).start().await?;
    // Room for a read that starts before the promotion to see it (below).
    let config = common::config(&cluster, &tables(), |c| {
        c.fleet.lease_timeout = Duration::from_secs(10)
    });
    let fleet_cfg = config.fleet.clone();
    let fleet = common::start(config).await;

    let (token_kept, token_lost) = {
        let mut w = fleet.lease(Intent::Write).await?;
        w.batch_execute("CREATE TABLE fo (id int PRIMARY KEY); INSERT INTO fo VALUES (1)")
            .await?;
        let kept = w.commit_token().await?;
        drop(w);
        cluster.wait_all_replayed(Duration::from_secs(30)).await?;

        // replica1 stops receiving WAL: the next write never reaches it.
        let su = cluster.superuser_client(cluster.replica(0)).await?;
        su.batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
            .await?;
        su.batch_execute("SELECT pg_reload_conf()").await?;
        common::wait_for(
            "replica1's WAL receiver to stop",
            Duration::from_secs(30),
            || async {
                su.query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 0)
            },
        )
        .await;
        // replica2 receives the next write but does not replay it: no replica can serve
        // a read after it.
        cluster.pause_replay(cluster.replica(1)).await?;
        let mut w = fleet.lease(Intent::Write).await?;
        w.execute("INSERT INTO fo VALUES (2)", &[]).await?;
        let lost = w.commit_token().await?;
        (kept, lost)
    };
    assert!(token_lost.lsn() > token_kept.lsn());

    // The primary dies; replica1 (which never got row 2) is promoted.
    cluster.kill9(cluster.primary()).await?;
    common::wait_for(
        "the fleet to see the primary down",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("primary")
                .is_some_and(|s| s.health != pgfleet::Health::Healthy || s.suspect)
        },
    )
    .await;
    // A read after the lost write, asked while no primary is known: it waits for one,
    // and the one it gets is on a timeline that does not have the write.
    let racing = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            fleet
                .lease(Intent::read_after(&token_lost))
                .await
                .map(|r| r.server().to_owned())
        })
    };
    cluster.promote(cluster.replica(0)).await?;
    let promoted = Instant::now();
    match racing.await? {
        Err(Error::WriteMayBeLost { token_lsn, .. }) => assert_eq!(token_lsn, token_lost.lsn()),
        other => panic!("a read after the lost write, asked before the promotion: {other:?}"),
    }

    // The first write after the promotion waits for the new primary and lands there.
    let mut w = fleet.lease(Intent::Write).await?;
    let bound = fleet_cfg.lease_timeout + fleet_cfg.probe_interval * fleet_cfg.failure_threshold;
    assert!(
        promoted.elapsed() <= bound + Duration::from_secs(1),
        "write lease took {:?} after the promotion (bound {bound:?})",
        promoted.elapsed()
    );
    assert_eq!((w.server(), w.role()), ("replica1", Role::Primary));
    w.execute("INSERT INTO fo VALUES (3)", &[]).await?;
    let token_new = w.commit_token().await?;
    drop(w);
    assert_eq!(token_new.timeline(), token_kept.timeline() + 1);

    let status = fleet.status();
    let r1 = status.server("replica1").expect("replica1");
    assert_eq!(
        (r1.role, r1.timeline),
        (Role::Primary, Some(token_new.timeline()))
    );
    // replica2 followed the dead primary: reported as not streaming, not guessed.
    common::wait_for(
        "replica2 reported as not streaming",
        Duration::from_secs(10),
        || async {
            fleet
                .status()
                .server("replica2")
                .is_some_and(|s| !s.streaming)
        },
    )
    .await;

    // A token from before the switch point is honoured and sees its write.
    let r = fleet.lease(Intent::read_after(&token_kept)).await?;
    let n: i64 = r
        .query_one("SELECT count(*) FROM fo WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(n, 1, "served by {}", r.server());
    drop(r);

    // A token past it names a write the new timeline does not have: a typed error.
    match fleet.lease(Intent::read_after(&token_lost)).await {
        Err(Error::WriteMayBeLost {
            token_lsn,
            token_timeline,
            current_timeline,
        }) => {
            assert_eq!(token_lsn, token_lost.lsn());
            assert_eq!(token_timeline, token_lost.timeline());
            assert_eq!(current_timeline, token_new.timeline());
        }
        other => panic!("expected WriteMayBeLost, got {other:?}"),
    }
    // The same through a session whose mark is that token.
    let (session, ignored) = fleet.session_from(token_lost);
    assert!(ignored.is_none());
    assert!(matches!(
        session.lease(Intent::read()).await,
        Err(Error::WriteMayBeLost { .. })
    ));
    // The lost row is indeed not there.
    let r = fleet.lease(Intent::read_after(&token_new)).await?;
    let ids: Vec<i32> = r
        .query("SELECT id FROM fo ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids, vec![1, 3]);
    drop(r);

    // Eventual reads keep working. Weights follow roles: the promoted replica1 takes
    // the primary's read_weight (0), so it serves reads only as the fallback (replica2
    // still follows the dead primary, its lag unknown).
    let r = fleet.lease(Intent::read()).await?;
    r.query_one("SELECT 1", &[]).await?;
    assert_eq!(
        (r.server(), r.role(), r.is_fallback()),
        ("replica1", Role::Primary, true),
        "\n{}",
        fleet.status()
    );
    drop(r);
    let status = fleet.status();
    let r1 = status.server("replica1").expect("replica1");
    assert_eq!((r1.role, r1.weight), (Role::Primary, 0), "\n{status}");
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_primaries_refuse_writes_until_one_steps_down() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let fleet = common::start(common::config(&cluster, &tables(), |_| {})).await;

    // A second node claims primary while the first still answers.
    cluster.promote(cluster.replica(0)).await?;
    common::wait_for("split brain seen", Duration::from_secs(10), || async {
        fleet.status().split_brain
    })
    .await;
    match fleet.lease(Intent::Write).await {
        Err(e @ Error::SplitBrain { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("primary") && text.contains("replica1"),
                "{text}"
            );
        }
        other => panic!("expected SplitBrain, got {other:?}"),
    }

    // The old primary steps down (stops): writes go to the one left.
    cluster.stop(cluster.primary()).await?;
    let w = common::wait_for_ok("a write after the old primary stopped", || async {
        fleet.lease(Intent::Write).await
    })
    .await;
    assert_eq!((w.server(), w.role()), ("replica1", Role::Primary));
    w.batch_execute("CREATE TABLE after_split (id int)").await?;
    drop(w);
    assert!(!fleet.status().split_brain);
    fleet.shutdown().await;
    Ok(())
}

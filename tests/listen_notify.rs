//! LISTEN/NOTIFY: `fleet.listen(channel)` delivers every notification of its channel to
//! each of its subscribers (and to no one else), survives a terminated backend, a
//! primary restart and a listener crash by reconnecting and saying `Reconnected`, and
//! UNLISTENs a channel once its last subscriber is gone.

mod common;

use std::time::Duration;

use pgfleet::{Error, Fleet, Intent, ListenEvent, Subscription};
use pgfleet_testkit::LocalCluster;

/// Generous bound for an event that should come at once.
const SOON: Duration = Duration::from_secs(10);
/// Bound for recovery after a fault (reconnect backoff, server restart).
const RECOVERY: Duration = Duration::from_secs(30);

/// Sends `payload` on `channel` through a write lease; returns the sending backend's pid.
async fn notify(fleet: &Fleet, channel: &str, payload: &str) -> anyhow::Result<i32> {
    let lease = fleet.lease(Intent::Write).await?;
    lease
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(|e| lease.error(e))?;
    let row = lease
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| lease.error(e))?;
    Ok(row.get(0))
}

/// The next event, which must come within `within`.
async fn next_event(sub: &mut Subscription, within: Duration) -> ListenEvent {
    tokio::time::timeout(within, sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no event on {:?} within {within:?}", sub.channel()))
        .unwrap_or_else(|| panic!("stream of {:?} ended", sub.channel()))
}

/// Asserts the next event is the notification `payload` on `channel`; returns its pid.
async fn expect_notification(sub: &mut Subscription, channel: &str, payload: &str) -> i32 {
    match next_event(sub, SOON).await {
        ListenEvent::Notification(n) => {
            assert_eq!(n.channel, channel);
            assert_eq!(n.payload, payload);
            n.process_id
        }
        other => panic!("expected notification {payload:?} on {channel:?}, got {other:?}"),
    }
}

/// Waits for `Reconnected` on `sub`; nothing else may come first (no NOTIFY is sent
/// while the fault is in progress).
async fn expect_reconnected(sub: &mut Subscription) {
    match next_event(sub, RECOVERY).await {
        ListenEvent::Reconnected => {}
        other => panic!("expected Reconnected, got {other:?}"),
    }
}

/// After a fault: sends `payload` (retrying the lease until the primary takes writes)
/// and asserts every subscriber receives it. Should the listener reconnect once more in
/// between (the notification is then legitimately missed, and the subscriber is told),
/// it sends again.
async fn notify_after_fault(fleet: &Fleet, subs: &mut [&mut Subscription], payload: &str) {
    let channel = subs[0].channel().to_owned();
    let deadline = tokio::time::Instant::now() + RECOVERY;
    'send: loop {
        common::wait_for("a write lease that can NOTIFY", RECOVERY, || async {
            notify(fleet, &channel, payload).await.is_ok()
        })
        .await;
        for sub in subs.iter_mut() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match next_event(sub, left).await {
                ListenEvent::Notification(n) if n.payload == payload => {
                    assert_eq!(n.channel, channel)
                }
                // The send may have been lost: send again. (Events left over from an
                // earlier round, a Reconnected or the same payload, only end a round.)
                ListenEvent::Reconnected => continue 'send,
                other => panic!("unexpected event after the fault: {other:?}"),
            }
        }
        return;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_every_subscriber_of_their_channel_and_no_other() -> anyhow::Result<()>
{
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    // Channels are database-wide and tests share the cluster: unique names.
    let ch = common::table("ch");
    let other = format!("{ch}_other");

    let mut a1 = fleet.listen(&ch).await?;
    let mut a2 = fleet.listen(&ch).await?;
    let mut b = fleet.listen(&other).await?;
    assert_eq!(a1.channel(), ch);

    let payloads = ["one", "it's two ✓", ""];
    let mut pids = Vec::new();
    for p in payloads {
        pids.push(notify(&fleet, &ch, p).await?);
    }
    for sub in [&mut a1, &mut a2] {
        for (p, pid) in payloads.iter().zip(&pids) {
            assert_eq!(expect_notification(sub, &ch, p).await, *pid);
        }
    }
    // Nothing of `ch` reached `b`: the first thing it sees is what was sent on its own
    // channel afterwards.
    notify(&fleet, &other, "marker").await?;
    expect_notification(&mut b, &other, "marker").await;
    // ... and `other` reached neither subscriber of `ch`.
    notify(&fleet, &ch, "four").await?;
    expect_notification(&mut a1, &ch, "four").await;
    expect_notification(&mut a2, &ch, "four").await;

    let listening = fleet
        .debug_listening_channels()
        .await
        .expect("listener connected");
    assert!(
        listening.contains(&ch) && listening.contains(&other),
        "{listening:?}"
    );
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_subscriber_gone_unlistens_and_a_new_one_listens_again() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let ch = common::table("unl");

    let first = fleet.listen(&ch).await?;
    let mut second = fleet.listen(&ch).await?;
    let listens = |fleet: &Fleet| {
        let fleet = fleet.clone();
        let ch = ch.clone();
        async move {
            fleet
                .debug_listening_channels()
                .await
                .expect("listener connected")
                .contains(&ch)
        }
    };
    assert!(listens(&fleet).await);

    // One subscriber left: still LISTENed, and it still receives.
    drop(first);
    assert!(listens(&fleet).await);
    notify(&fleet, &ch, "still").await?;
    expect_notification(&mut second, &ch, "still").await;

    drop(second);
    common::wait_for("UNLISTEN after the last subscriber", SOON, || async {
        !listens(&fleet).await
    })
    .await;

    // Subscribing again LISTENs again, and `listen` returns only once it is in effect.
    let mut third = fleet.listen(&ch).await?;
    assert!(listens(&fleet).await);
    notify(&fleet, &ch, "again").await?;
    expect_notification(&mut third, &ch, "again").await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_are_checked_and_taken_exactly() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;

    for bad in [String::new(), "x".repeat(64), "a\0b".to_owned()] {
        match fleet.listen(&bad).await {
            Err(Error::InvalidChannel { channel, .. }) => assert_eq!(channel, bad),
            other => panic!("{bad:?}: expected InvalidChannel, got {other:?}"),
        }
    }

    // Quotes, spaces and case survive (the name is quoted, as pg_notify takes it).
    let odd = format!("Or\"ders {}", common::table("Q"));
    let mut sub = fleet.listen(&odd).await?;
    let mut lower = fleet.listen(&odd.to_lowercase()).await?;
    notify(&fleet, &odd, "exact").await?;
    expect_notification(&mut sub, &odd, "exact").await;
    notify(&fleet, &odd.to_lowercase(), "lower").await?;
    expect_notification(&mut lower, &odd.to_lowercase(), "lower").await;
    // The exact-case subscriber did not get the lower-case channel's notification.
    notify(&fleet, &odd, "exact2").await?;
    expect_notification(&mut sub, &odd, "exact2").await;

    // The longest name PostgreSQL keeps works.
    let longest = format!("{}{}", common::table("l"), "x".repeat(63))
        .split_at(63)
        .0
        .to_owned();
    let mut long = fleet.listen(&longest).await?;
    notify(&fleet, &longest, "long").await?;
    expect_notification(&mut long, &longest, "long").await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_listener_is_restarted_and_says_reconnected() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let ch = common::table("crash");
    let mut a = fleet.listen(&ch).await?;
    let mut b = fleet.listen(&ch).await?;

    assert!(fleet.debug_fail_listener());
    expect_reconnected(&mut a).await;
    expect_reconnected(&mut b).await;
    notify(&fleet, &ch, "after restart").await?;
    expect_notification(&mut a, &ch, "after restart").await;
    expect_notification(&mut b, &ch, "after restart").await;
    fleet.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_subscriptions() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::shared().await?;
    let fleet = common::fast_fleet(cluster).await;
    let ch = common::table("shut");
    let mut sub = fleet.listen(&ch).await?;
    notify(&fleet, &ch, "last").await?;
    // Wait until it is buffered, so shutdown cannot race the delivery.
    let n = next_event(&mut sub, SOON).await;
    fleet.shutdown().await;
    assert!(matches!(n, ListenEvent::Notification(_)), "{n:?}");
    let end = tokio::time::timeout(SOON, sub.recv()).await?;
    assert_eq!(end, None, "the stream ends at shutdown");
    assert!(matches!(fleet.listen(&ch).await, Err(Error::ShuttingDown)));
    Ok(())
}

/// Own cluster: the listener's backend is terminated, then the primary restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_terminated_backend_and_a_primary_restart() -> anyhow::Result<()> {
    common::trace();
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let fleet = common::fast_fleet(&cluster).await;
    let ch = common::table("re");
    let mut a = fleet.listen(&ch).await?;
    let mut b = fleet.listen(&ch).await?;
    let mut c = fleet.listen(&format!("{ch}_c")).await?;
    notify(&fleet, &ch, "before").await?;
    expect_notification(&mut a, &ch, "before").await;
    expect_notification(&mut b, &ch, "before").await;

    // Three subscriptions, two channels: one listener connection.
    let su = cluster.superuser_client(cluster.primary()).await?;
    let killed: i64 = su
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'pgfleet-listener'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(killed, 1, "exactly one listener backend");
    for sub in [&mut a, &mut b, &mut c] {
        expect_reconnected(sub).await;
    }
    notify(&fleet, &ch, "after terminate").await?;
    expect_notification(&mut a, &ch, "after terminate").await;
    expect_notification(&mut b, &ch, "after terminate").await;
    drop(su);

    cluster.restart(cluster.primary()).await?;
    for sub in [&mut a, &mut b, &mut c] {
        expect_reconnected(sub).await;
    }
    notify_after_fault(&fleet, &mut [&mut a, &mut b], "after restart").await;
    let c_ch = c.channel().to_owned();
    notify_after_fault(&fleet, &mut [&mut c], "c after restart").await;
    assert!(fleet
        .debug_listening_channels()
        .await
        .is_some_and(|l| l.contains(&ch) && l.contains(&c_ch)));
    fleet.shutdown().await;
    Ok(())
}

//! Dropping a cluster, normally or while a task panics, stops its servers and removes its files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgfleet_testkit::LocalCluster;

/// How long the processes and files may take to disappear after the drop.
const DEADLINE: Duration = Duration::from_secs(15);

/// A server process recorded while the cluster ran: the pid and its start time (field 22 of
/// `/proc/<pid>/stat`), so that a later process reusing the pid is not taken for it.
#[derive(Debug, Clone, Copy)]
struct Proc {
    /// The pid.
    pid: i32,
    /// Start time in clock ticks since boot.
    start: u64,
}

/// (state, parent pid, start time) from `/proc/<pid>/stat`; `None` when there is no such process.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

impl Proc {
    /// The process now running as `pid`.
    fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|(_, _, start)| Self { pid, start })
    }

    /// Still the same process and not a zombie (a zombie has exited; only its reaper is missing).
    fn running(self) -> bool {
        matches!(stat(self.pid), Some((state, _, start)) if start == self.start && state != 'Z' && state != 'X')
    }
}

/// What a cluster leaves behind if its teardown fails.
#[derive(Debug)]
struct Footprint {
    /// Every postmaster and its children (backends, WAL sender/receiver, checkpointer, ...).
    procs: Vec<Proc>,
    /// The cluster dir and every node's data dir.
    dirs: Vec<PathBuf>,
}

/// Records the processes and directories of a running cluster.
fn footprint(cluster: &LocalCluster) -> Footprint {
    let mut procs = Vec::new();
    let mut dirs = vec![cluster.dir().to_owned()];
    for node in cluster.nodes() {
        let text = std::fs::read_to_string(node.data_dir().join("postmaster.pid"))
            .expect("a running node has a postmaster.pid");
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid");
        let postmaster = Proc::of(pid).expect("the postmaster exists");
        assert!(
            postmaster.running(),
            "{}: postmaster not running",
            node.name()
        );
        procs.push(postmaster);
        let children = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&p| stat(p).is_some_and(|(_, ppid, _)| ppid == pid))
            .filter_map(Proc::of);
        procs.extend(children);
        dirs.push(node.data_dir().to_owned());
    }
    // A primary and a replica: two postmasters with several children each.
    assert!(procs.len() > 4, "too few server processes found: {procs:?}");
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    Footprint { procs, dirs }
}

/// Waits until no recorded process runs and no recorded directory exists.
async fn assert_cleaned_up(footprint: &Footprint) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let running: Vec<i32> = footprint
            .procs
            .iter()
            .filter(|p| p.running())
            .map(|p| p.pid)
            .collect();
        let dirs: Vec<&PathBuf> = footprint.dirs.iter().filter(|d| d.exists()).collect();
        if running.is_empty() && dirs.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{DEADLINE:?} after the drop, processes {running:?} still run and {dirs:?} still exist"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_cluster_stops_its_servers_and_removes_its_files() -> anyhow::Result<()> {
    let cluster = LocalCluster::builder().replicas(1).start().await?;
    let footprint = footprint(&cluster);
    drop(cluster);
    assert_cleaned_up(&footprint).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_dropped_by_a_panic_is_cleaned_up_too() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let cluster = LocalCluster::builder()
            .replicas(1)
            .start()
            .await
            .expect("start a cluster");
        tx.send(footprint(&cluster)).expect("the test waits for it");
        panic!("a test failing while it owns a cluster");
    });
    let footprint = match rx.await {
        Ok(f) => f,
        Err(_) => anyhow::bail!("the task ended without a cluster: {:?}", task.await),
    };
    let err = task.await.expect_err("the task panics");
    assert!(err.is_panic(), "{err}");
    assert_cleaned_up(&footprint).await;
    Ok(())
}

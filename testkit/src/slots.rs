//! The bound on how many clusters run at once: a process-wide semaphore plus flock'ed slot files
//! shared by every process (test binary) on the machine.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Error;

/// The environment variable that overrides [`DEFAULT_MAX_CLUSTERS`].
pub const MAX_CLUSTERS_ENV: &str = "PGFLEET_TESTKIT_MAX_CLUSTERS";

/// How many clusters may run at once on the machine unless [`MAX_CLUSTERS_ENV`] says otherwise.
pub const DEFAULT_MAX_CLUSTERS: usize = 3;

/// How long [`acquire`] waits for a slot before [`Error::NoSlot`].
const WAIT_LIMIT: Duration = Duration::from_secs(300);

/// How often a waiter retries the slot files while all are taken.
const RETRY: Duration = Duration::from_millis(100);

/// A held slot: released when dropped (the flock goes with the file descriptor, also when the
/// process dies).
#[derive(Debug)]
pub(crate) struct Slot {
    /// This process's share of the bound.
    _permit: OwnedSemaphorePermit,
    /// The locked slot file.
    _file: File,
    /// Which slot, for logs.
    index: usize,
}

impl Slot {
    /// The slot's number.
    pub(crate) fn index(&self) -> usize {
        self.index
    }
}

/// The configured bound: [`MAX_CLUSTERS_ENV`], else [`DEFAULT_MAX_CLUSTERS`].
pub(crate) fn max_clusters() -> Result<usize, Error> {
    parse_max_clusters(std::env::var(MAX_CLUSTERS_ENV).ok())
}

/// The bound from the value of [`MAX_CLUSTERS_ENV`] (`None`: unset).
fn parse_max_clusters(value: Option<String>) -> Result<usize, Error> {
    match value {
        None => Ok(DEFAULT_MAX_CLUSTERS),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(Error::InvalidEnv {
                name: MAX_CLUSTERS_ENV,
                value: v,
                reason: "expected a whole number of clusters, at least 1",
            }),
        },
    }
}

/// Waits for a free slot on this machine: one of the process-wide semaphore's [`max_clusters`]
/// permits, then one of as many slot files in `<temp_dir>/pgfleet-testkit-slots/`.
pub(crate) async fn acquire() -> Result<Slot, Error> {
    let max = max_clusters()?;
    // Sized by the bound in force at the first start; the env var is read once in practice.
    static SEMAPHORE: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let semaphore = SEMAPHORE
        .get_or_init(|| Arc::new(Semaphore::new(max)))
        .clone();
    let dir = std::env::temp_dir().join("pgfleet-testkit-slots");
    acquire_from(semaphore, &dir, max, WAIT_LIMIT).await
}

/// Waits for a slot: first a permit of `semaphore` (this process's share, so that its own
/// clusters queue in order without polling), then an exclusive `flock` on the first free of the
/// slot files `slot-0.lock` .. `slot-<max - 1>.lock` in `dir` (created as needed), which every
/// other process, and every other semaphore, using `dir` contends for. Both are released when
/// the [`Slot`] is dropped, and the lock also when the process dies.
///
/// # Errors
///
/// [`Error::NoSlot`] after `wait_limit` without a slot; [`Error::Io`] if `dir` or a slot file
/// cannot be created, opened or locked.
async fn acquire_from(
    semaphore: Arc<Semaphore>,
    dir: &Path,
    max: usize,
    wait_limit: Duration,
) -> Result<Slot, Error> {
    let started = Instant::now();
    let no_slot = || Error::NoSlot {
        waited: started.elapsed(),
        max,
    };
    let permit = tokio::time::timeout(wait_limit, semaphore.acquire_owned())
        .await
        .map_err(|_| no_slot())?
        .map_err(|_| Error::io("cluster slot semaphore", std::io::Error::other("closed")))?;

    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // Other users' test runs share the slots; best effort, as the dir may be someone else's.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));

    let mut logged = false;
    loop {
        for index in 0..max {
            let path: PathBuf = dir.join(format!("slot-{index}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o666)
                .open(&path)
                // A slot file created by another user may be read-only for us; flock needs no write.
                .or_else(|_| File::open(&path))
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    tracing::debug!(target: "pgfleet_testkit::slots", "took cluster slot {index}");
                    return Ok(Slot {
                        _permit: permit,
                        _file: file,
                        index,
                    });
                }
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {}
                Err(e) => {
                    return Err(Error::io(format!("locking {}", path.display()), e.into()));
                }
            }
        }
        if !logged {
            tracing::info!(
                target: "pgfleet_testkit::slots",
                "all {max} cluster slots are taken by other processes; waiting ({MAX_CLUSTERS_ENV} raises the bound)"
            );
            logged = true;
        }
        if started.elapsed() >= wait_limit {
            return Err(no_slot());
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::task::JoinHandle;

    use super::*;

    /// Long enough that a waiter which could proceed would have (slot files are retried every
    /// 100 ms, a semaphore hands over at once); the tests check "still waiting" with it.
    const STILL_WAITING: Duration = Duration::from_millis(400);

    /// Generous: how long a waiter may take to get a slot that was released.
    const PROCEEDS_WITHIN: Duration = Duration::from_secs(5);

    /// The env var that makes [`child_process_holding_a_slot`] hold a slot in this dir.
    const HOLD_DIR_ENV: &str = "PGFLEET_TESTKIT_TEST_HOLD_SLOT_DIR";

    /// What the child prints once it holds the slot.
    const HELD: &str = "pgfleet-testkit-test: slot held";

    /// Starts an acquisition of one of `max` slots in `dir` in the background.
    fn spawn_acquire(
        semaphore: &Arc<Semaphore>,
        dir: &Path,
        max: usize,
    ) -> JoinHandle<Result<Slot, Error>> {
        let (semaphore, dir) = (semaphore.clone(), dir.to_owned());
        tokio::spawn(
            async move { acquire_from(semaphore, &dir, max, Duration::from_secs(30)).await },
        )
    }

    /// Asserts that `waiter` is still waiting after [`STILL_WAITING`].
    async fn assert_waits(waiter: &mut JoinHandle<Result<Slot, Error>>) {
        let r = tokio::time::timeout(STILL_WAITING, waiter).await;
        assert!(r.is_err(), "got a slot while none was free: {r:?}");
    }

    /// Waits (bounded) for `waiter` to get its slot.
    async fn slot_of(waiter: JoinHandle<Result<Slot, Error>>) -> Slot {
        tokio::time::timeout(PROCEEDS_WITHIN, waiter)
            .await
            .expect("a slot was released, but the waiter still waits")
            .expect("join")
            .expect("a slot")
    }

    #[test]
    fn the_bound_comes_from_the_env_value() {
        assert_eq!(parse_max_clusters(None).ok(), Some(DEFAULT_MAX_CLUSTERS));
        assert_eq!(parse_max_clusters(Some(" 1 ".to_owned())).ok(), Some(1));
        assert_eq!(parse_max_clusters(Some("8".to_owned())).ok(), Some(8));
        for bad in ["0", "-1", "two", ""] {
            let r = parse_max_clusters(Some(bad.to_owned()));
            assert!(
                matches!(&r, Err(Error::InvalidEnv { name: MAX_CLUSTERS_ENV, value, .. }) if value == bad),
                "{bad:?}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn within_a_process_a_start_past_the_bound_waits_for_a_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let semaphore = Arc::new(Semaphore::new(2));
        let first = slot_of(spawn_acquire(&semaphore, dir.path(), 2)).await;
        let second = slot_of(spawn_acquire(&semaphore, dir.path(), 2)).await;
        assert_ne!(first.index(), second.index());

        let mut third = spawn_acquire(&semaphore, dir.path(), 2);
        assert_waits(&mut third).await;
        let freed = second.index();
        drop(second);
        let third = slot_of(third).await;
        assert_eq!(third.index(), freed);

        // And a wait has a limit.
        let r = acquire_from(semaphore.clone(), dir.path(), 2, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(Error::NoSlot { max: 2, .. })), "{r:?}");
        drop((first, third));
    }

    #[tokio::test]
    async fn slot_files_bound_processes_together_and_die_with_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Another test binary, as far as the slot files can tell: this one, running only the
        // test below, which takes the single slot and holds it until killed.
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "slots::tests::child_process_holding_a_slot",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLD_DIR_ENV, dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the test binary");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let held = async {
            while let Some(line) = lines.next_line().await.expect("read") {
                if line.contains(HELD) {
                    return true;
                }
            }
            false
        };
        let held = tokio::time::timeout(Duration::from_secs(30), held).await;
        assert_eq!(held, Ok(true), "the child did not take the slot");

        // A semaphore of our own has a permit free: only the slot file holds this back.
        let ours = Arc::new(Semaphore::new(1));
        let mut waiter = spawn_acquire(&ours, dir.path(), 1);
        assert_waits(&mut waiter).await;
        // SIGKILL: no Drop runs in the child; the kernel drops its lock with its descriptors.
        child.kill().await.expect("kill the child");
        assert_eq!(slot_of(waiter).await.index(), 0);
    }

    /// Not a test: the child of [`slot_files_bound_processes_together_and_die_with_them`]. Takes
    /// the only slot in the dir named by [`HOLD_DIR_ENV`], says so, and holds it until stdin
    /// closes or it is killed. Without the variable it does nothing.
    #[tokio::test]
    #[ignore = "run by slot_files_bound_processes_together_and_die_with_them"]
    async fn child_process_holding_a_slot() {
        let Some(dir) = std::env::var_os(HOLD_DIR_ENV) else {
            return;
        };
        let semaphore = Arc::new(Semaphore::new(1));
        let _slot = acquire_from(semaphore, Path::new(&dir), 1, Duration::from_secs(10))
            .await
            .expect("the slot is free");
        println!("{HELD}");
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }
}

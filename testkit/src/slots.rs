//! The bound on how many clusters run at once: a process-wide semaphore plus flock'ed slot files
//! shared by every process (test binary) on the machine.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use tokio::sync::{Semaphore, SemaphorePermit};

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
    _permit: SemaphorePermit<'static>,
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

/// The configured bound.
pub(crate) fn max_clusters() -> Result<usize, Error> {
    match std::env::var(MAX_CLUSTERS_ENV) {
        Err(_) => Ok(DEFAULT_MAX_CLUSTERS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(Error::InvalidEnv {
                name: MAX_CLUSTERS_ENV,
                value: v,
                reason: "expected a whole number of clusters, at least 1",
            }),
        },
    }
}

/// Waits for a free slot.
pub(crate) async fn acquire() -> Result<Slot, Error> {
    let max = max_clusters()?;
    static SEMAPHORE: OnceLock<Semaphore> = OnceLock::new();
    let started = Instant::now();
    let no_slot = || Error::NoSlot {
        waited: started.elapsed(),
        max,
    };
    let permit = tokio::time::timeout(
        WAIT_LIMIT,
        SEMAPHORE.get_or_init(|| Semaphore::new(max)).acquire(),
    )
    .await
    .map_err(|_| no_slot())?
    .map_err(|_| Error::io("cluster slot semaphore", std::io::Error::other("closed")))?;

    let dir = std::env::temp_dir().join("pgfleet-testkit-slots");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // Other users' test runs share the slots; best effort, as the dir may be someone else's.
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));

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
        if started.elapsed() >= WAIT_LIMIT {
            return Err(no_slot());
        }
        tokio::time::sleep(RETRY).await;
    }
}

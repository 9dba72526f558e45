//! OS processes: reading `/proc`, signalling postmasters, synchronous teardown and the exit watchdog.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::Error;

/// A process identity that survives pid reuse: pid plus start time (in clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcId {
    /// The pid.
    pub(crate) pid: i32,
    /// Field 22 of `/proc/<pid>/stat`.
    start: u64,
}

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy)]
struct Stat {
    /// R, S, D, Z, X, ...
    state: char,
    /// The parent pid.
    ppid: i32,
    /// Start time in clock ticks since boot.
    start: u64,
}

/// Parses `/proc/<pid>/stat`; `None` when the process does not exist (any more).
fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the text of a `/proc/<pid>/stat` file (the command name may hold spaces and parens).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

impl ProcId {
    /// The identity of a live `pid`, if it exists.
    pub(crate) fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|s| Self {
            pid,
            start: s.start,
        })
    }

    /// Still running: exists, is the same process, and is not a zombie awaiting its reaper.
    /// Not running is what the testkit calls dead: gone, replaced by another process under the
    /// same pid, or a zombie (which holds no memory and no files any more).
    pub(crate) fn is_running(self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start == self.start && s.state != 'Z' && s.state != 'X')
    }

    /// Stopped by a signal (SIGSTOP): state `T`.
    pub(crate) fn is_stopped(self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start == self.start && s.state == 'T')
    }

    /// Whether one argument of its command line (`/proc/<pid>/cmdline`) is `data_dir`, as in
    /// the `postgres -D <data_dir>` that `pg_ctl start` runs (the postmaster keeps its original
    /// command line; only its children rewrite theirs). Paths compare by component, so a trailing
    /// or doubled slash does not matter. False when the process is gone.
    fn names_data_dir(self, data_dir: &Path) -> bool {
        let Ok(bytes) = std::fs::read(format!("/proc/{}/cmdline", self.pid)) else {
            return false;
        };
        bytes
            .split(|b| *b == 0)
            .any(|arg| !arg.is_empty() && Path::new(OsStr::from_bytes(arg)) == data_dir)
    }

    /// Sends `sig`; errors (already gone) are ignored.
    pub(crate) fn signal(self, sig: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }
}

/// The direct children of `parent` (the backends and auxiliary processes of a postmaster).
pub(crate) fn children_of(parent: i32) -> Vec<ProcId> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = stat(pid)?;
            (s.ppid == parent).then_some(ProcId {
                pid,
                start: s.start,
            })
        })
        .collect()
}

/// The postmaster pid from the first line of `<data_dir>/postmaster.pid`, if the file exists.
pub(crate) fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The running postmaster of `data_dir`: the pid in its `postmaster.pid`, but only if that
/// process runs (not a zombie) and its command line names `data_dir`. After a `kill -9` the file
/// stays behind and its pid may since have been reused by an unrelated process, which we must
/// never signal; this is the one check every signalling path (teardown, `kill9`) and `start` use.
pub(crate) fn running_postmaster(data_dir: &Path) -> Option<ProcId> {
    postmaster_pid(data_dir)
        .and_then(ProcId::of)
        .filter(|p| p.is_running() && p.names_data_dir(data_dir))
}

/// Synchronous teardown for `Drop`: immediate shutdown (SIGQUIT, as `pg_ctl stop -m immediate`)
/// of every postmaster under `dir`, SIGKILL for any left after `grace`, then removal of `dir`.
/// Only postmasters that [`running_postmaster`] confirms are signalled (with their children).
pub(crate) fn teardown(dir: &Path, grace: Duration) {
    let mut procs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if let Some(p) = running_postmaster(&e.path()) {
                procs.extend(children_of(p.pid));
                p.signal(Signal::QUIT);
                procs.push(p);
            }
        }
    }
    let deadline = Instant::now() + grace;
    while procs.iter().any(|p| p.is_running()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for p in procs.iter().filter(|p| p.is_running()) {
        p.signal(Signal::KILL);
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(target: "pgfleet_testkit::process", "removing {}: {e}", dir.display());
        }
    }
}

/// The shell script of the watchdog: waits for EOF on stdin (our process is gone: it exited, panicked
/// with abort, or was SIGKILLed), then tears the cluster down like [`teardown`]. As there, a pid
/// from a `postmaster.pid` is signalled only if that process's command line has the data dir as
/// one of its arguments (a stale file's pid may have been reused).
const WATCHDOG: &str = r#"
dir="$1"
while read -r _line; do :; done
pids=""
for f in "$dir"/*/postmaster.pid; do
  [ -f "$f" ] || continue
  d="${f%/postmaster.pid}"
  p=$(head -n 1 "$f")
  case "$p" in ''|*[!0-9]*) continue ;; esac
  tr '\000' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$d" || continue
  kill -QUIT "$p" 2>/dev/null && pids="$pids $p"
done
i=0
while [ $i -lt 200 ]; do
  alive=""
  for p in $pids; do
    if [ -r "/proc/$p/stat" ] && ! grep -q ') Z' "/proc/$p/stat" 2>/dev/null; then alive="$alive $p"; fi
  done
  [ -z "$alive" ] && break
  sleep 0.05
  i=$((i + 1))
done
for p in $alive; do kill -KILL "$p" 2>/dev/null; done
rm -rf "$dir"
"#;

/// A `sh` process that cleans up a cluster dir once this process is gone (see [`WATCHDOG`]).
///
/// Needed because the shared cluster lives in a `static` and is never dropped, and because a
/// panic with `panic = "abort"` or a SIGKILL of the test binary skips every `Drop`.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// The watchdog process, killed and reaped on drop (after our own teardown).
    child: Child,
    /// The write end of its stdin: the kernel closes it when this process dies, whatever the cause.
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts the watchdog for `dir`.
    pub(crate) fn spawn(dir: &Path) -> Result<Self, Error> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("pgfleet-testkit-watchdog")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in our process group: a Ctrl-C must not kill it before it has cleaned up.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io("spawning the cleanup watchdog (sh)", e))?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Our own teardown already ran; the watchdog has nothing left to do.
        let _ = self.child.kill();
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "1234 (postgres: a (b) c) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start, 98765);
    }

    /// A stand-in for a server: `sh` reading its stdin until EOF, with `arg` on its command line.
    fn fake_process(arg: &Path) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg("while read -r _l; do :; done")
            .arg("pgfleet-testkit-fake")
            .arg("-D")
            .arg(arg)
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    /// A cluster dir holding `ours/postmaster.pid` naming a fake postmaster whose command line has
    /// `-D <dir>/ours`, and `reused/postmaster.pid` naming an unrelated live process (its command
    /// line names `<dir>/reused2`, of which `<dir>/reused` is a prefix), as after pid reuse.
    fn dir_with_stale_pid() -> (PathBuf, Child, Child) {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let (ours, reused) = (dir.join("ours"), dir.join("reused"));
        std::fs::create_dir(&ours).expect("mkdir");
        std::fs::create_dir(&reused).expect("mkdir");
        let postmaster = fake_process(&ours);
        let unrelated = fake_process(&dir.join("reused2"));
        for (data_dir, child) in [(&ours, &postmaster), (&reused, &unrelated)] {
            let text = format!("{}\n{}\n", child.id(), data_dir.display());
            std::fs::write(data_dir.join("postmaster.pid"), text).expect("write");
        }
        (dir, postmaster, unrelated)
    }

    /// Waits (bounded) for `child` to exit and returns the signal that ended it.
    fn exit_signal(child: &mut Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.signal();
            }
            assert!(Instant::now() < deadline, "process did not exit in 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts the outcome of a teardown of [`dir_with_stale_pid`], then ends the unrelated process.
    fn assert_only_ours_signalled(dir: &Path, mut postmaster: Child, mut unrelated: Child) {
        assert_eq!(
            exit_signal(&mut postmaster),
            Some(Signal::QUIT.as_raw()),
            "our postmaster gets SIGQUIT"
        );
        let untouched = unrelated.try_wait().expect("try_wait").is_none();
        let _ = unrelated.kill();
        let _ = unrelated.wait();
        assert!(untouched, "a process that reused a stale pid was signalled");
        assert!(!dir.exists(), "{} not removed", dir.display());
    }

    #[test]
    fn running_postmaster_needs_the_data_dir_on_the_command_line() {
        let (dir, mut postmaster, mut unrelated) = dir_with_stale_pid();
        let found = running_postmaster(&dir.join("ours")).map(|p| p.pid);
        let reused = running_postmaster(&dir.join("reused"));
        let missing = running_postmaster(&dir.join("nothing-here"));
        for c in [&mut postmaster, &mut unrelated] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, Some(postmaster.id() as i32));
        assert_eq!(reused, None, "an unrelated process taken for a postmaster");
        assert_eq!(missing, None);
    }

    #[test]
    fn teardown_signals_only_the_postmasters_of_its_data_dirs() {
        let (dir, postmaster, unrelated) = dir_with_stale_pid();
        teardown(&dir, Duration::from_secs(5));
        assert_only_ours_signalled(&dir, postmaster, unrelated);
    }

    #[test]
    fn the_watchdog_signals_only_the_postmasters_of_its_data_dirs() {
        let (dir, postmaster, unrelated) = dir_with_stale_pid();
        let mut watchdog = Watchdog::spawn(&dir).expect("watchdog");
        // As when this process dies: the watchdog sees EOF and cleans up.
        drop(watchdog.stdin.take());
        assert_eq!(
            exit_signal(&mut watchdog.child),
            None,
            "the watchdog exits normally"
        );
        assert_only_ours_signalled(&dir, postmaster, unrelated);
    }

    #[test]
    fn a_zombie_is_not_running() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let id = ProcId::of(child.id() as i32).expect("just spawned, not yet reaped");
        let deadline = Instant::now() + Duration::from_secs(10);
        while id.is_running() {
            assert!(Instant::now() < deadline, "`true` did not exit in 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Exited but not reaped (we have not waited): a zombie, which still has a /proc entry.
        let state = stat(id.pid).map(|s| s.state);
        let _ = child.wait();
        assert_eq!(state, Some('Z'));
    }

    #[test]
    fn own_process_is_running() {
        let me = ProcId::of(std::process::id() as i32).expect("self");
        assert!(me.is_running());
    }
}

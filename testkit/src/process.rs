//! OS processes: reading `/proc`, signalling postmasters, synchronous teardown and the exit watchdog.

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
    pub(crate) fn is_running(self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start == self.start && s.state != 'Z' && s.state != 'X')
    }

    /// Gone entirely: no such process, or the pid now names another one. A zombie is not gone:
    /// its pid still answers `kill(pid, 0)`.
    pub(crate) fn is_gone(self) -> bool {
        !matches!(stat(self.pid), Some(s) if s.start == self.start)
    }

    /// Stopped by a signal (SIGSTOP): state `T`.
    pub(crate) fn is_stopped(self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start == self.start && s.state == 'T')
    }

    /// Its command line, arguments joined by spaces ("" when gone).
    pub(crate) fn cmdline(self) -> String {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
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

/// Synchronous teardown for `Drop`: immediate shutdown (SIGQUIT, as `pg_ctl stop -m immediate`)
/// of every postmaster under `dir`, SIGKILL for any left after `grace`, then removal of `dir`.
pub(crate) fn teardown(dir: &Path, grace: Duration) {
    let mut procs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if let Some(p) = postmaster_pid(&e.path()).and_then(ProcId::of) {
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
/// with abort, or was SIGKILLed), then tears the cluster down like [`teardown`].
const WATCHDOG: &str = r#"
dir="$1"
while read -r _line; do :; done
pids=""
for f in "$dir"/*/postmaster.pid; do
  [ -f "$f" ] || continue
  p=$(head -n 1 "$f")
  case "$p" in ''|*[!0-9]*) continue ;; esac
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
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "1234 (postgres: a (b) c) S 1 1234 1234 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start, 98765);
    }

    #[test]
    fn own_process_is_running() {
        let me = ProcId::of(std::process::id() as i32).expect("self");
        assert!(me.is_running());
        assert!(!me.is_gone());
    }
}

//! Finding the PostgreSQL server binaries, the OS user to run them as, and running them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::Error;

/// The programs the testkit needs, all from one directory.
const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "pg_basebackup"];

/// Where the PostgreSQL server binaries live.
#[derive(Debug, Clone)]
pub(crate) struct PgBins {
    /// The directory holding `initdb`, `pg_ctl`, `pg_basebackup` and `postgres`.
    dir: PathBuf,
}

impl PgBins {
    /// `PG_BIN`, else the highest version under `/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`.
    pub(crate) fn find() -> Result<Self, Error> {
        if let Some(dir) = std::env::var_os("PG_BIN") {
            let dir = PathBuf::from(dir);
            return match missing(&dir) {
                None => Ok(Self { dir }),
                Some(bin) => Err(Error::BinariesNotFound {
                    detail: format!("PG_BIN={} has no {bin}", dir.display()),
                }),
            };
        }
        if let Some(dir) = highest_versioned(Path::new("/usr/lib/postgresql")) {
            return Ok(Self { dir });
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && missing(&dir).is_none() {
                return Ok(Self { dir });
            }
        }
        Err(Error::BinariesNotFound {
            detail:
                "PG_BIN is unset, /usr/lib/postgresql/*/bin has none, and initdb is not on PATH"
                    .to_owned(),
        })
    }

    /// The full path of one program.
    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The first required program missing from `dir`, if any.
fn missing(dir: &Path) -> Option<&'static str> {
    REQUIRED.into_iter().find(|b| !dir.join(b).is_file())
}

/// `<root>/<version>/bin` with the highest numeric version that has every required program.
fn highest_versioned(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = parse_version(&e.file_name().to_string_lossy())?;
            let bin = e.path().join("bin");
            missing(&bin).is_none().then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// "15" -> [15], "9.6" -> [9, 6]; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

/// The OS user the servers run as when the testkit itself runs as root (initdb refuses root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    /// The `postgres` user's uid.
    pub(crate) uid: u32,
    /// The `postgres` user's primary gid.
    pub(crate) gid: u32,
}

impl RunAs {
    /// `Some(postgres)` when we are root, `None` (run directly) otherwise.
    pub(crate) fn detect() -> Result<Option<Self>, Error> {
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| Error::NoPostgresUser {
            detail: format!("reading /etc/passwd: {e}"),
        })?;
        parse_passwd(&passwd, "postgres")
            .map(Some)
            .ok_or_else(|| Error::NoPostgresUser {
                detail: "no such entry in /etc/passwd".to_owned(),
            })
    }

    /// Hands `path` to this user (so the servers can write there).
    pub(crate) fn chown(self, path: &Path) -> Result<(), Error> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| Error::io(format!("chown {}", path.display()), e))
    }
}

/// The uid and gid of `user` in an `/etc/passwd` text.
fn parse_passwd(passwd: &str, user: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(RunAs { uid, gid })
    })
}

/// A PostgreSQL program invocation: run as the right user, in the cluster dir, output captured.
pub(crate) fn command(
    program: &Path,
    run_as: Option<RunAs>,
    cwd: &Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Our own process group: a Ctrl-C meant for the test runner must not reach the servers
        // before the testkit stops them itself.
        .process_group(0)
        .kill_on_drop(true);
    // Stray libpq variables of the caller must not redirect our tools.
    for var in [
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSERVICE",
        "PGDATA",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(u) = run_as {
        // The caller's HOME (root's) is unreadable to that user, and libpq in a replica's WAL
        // receiver gives up on TLS when it cannot look for ~/.postgresql/postgresql.crt.
        cmd.uid(u.uid).gid(u.gid).env("HOME", cwd);
    }
    cmd
}

/// Runs `cmd` to completion; a non-zero exit becomes [`Error::Command`] with its output and `log_tail`.
pub(crate) async fn run(
    mut cmd: tokio::process::Command,
    what: &str,
    log: Option<&Path>,
) -> Result<Output, Error> {
    tracing::debug!(target: "pgfleet_testkit::bins", "{what}: {:?}", cmd.as_std());
    let out = cmd.output().await.map_err(|e| {
        Error::io(
            format!("{what}: spawning {:?}", cmd.as_std().get_program()),
            e,
        )
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut output = String::new();
    output.push_str(String::from_utf8_lossy(&out.stdout).trim());
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        output.push('\n');
        output.push_str(stderr.trim());
    }
    if let Some(log) = log {
        let tail = log_tail(log, 30);
        if !tail.is_empty() {
            output.push_str(&format!(
                "\n--- last lines of {} ---\n{tail}",
                log.display()
            ));
        }
    }
    Err(Error::Command {
        what: what.to_owned(),
        status: out.status.to_string(),
        output,
    })
}

/// The last `n` lines of a log file ("" when unreadable).
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `--name=value` style argument helper for paths.
pub(crate) fn arg_path(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from(flag);
    s.push(OsStr::new("="));
    s.push(path.as_os_str());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("15") > parse_version("9.6"));
        assert!(parse_version("16") > parse_version("15"));
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            parse_passwd(passwd, "postgres"),
            Some(RunAs { uid: 101, gid: 104 })
        );
        assert_eq!(parse_passwd(passwd, "nobody"), None);
        assert_eq!(parse_passwd("postgres:x:abc:1:::\n", "postgres"), None);
    }

    #[test]
    fn finds_installed_binaries() {
        // The machine this runs on is expected to have PostgreSQL (the integration tests need it too).
        let bins = PgBins::find().expect("PostgreSQL binaries");
        assert!(bins.bin("initdb").is_file());
    }
}

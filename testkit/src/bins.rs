//! Finding the PostgreSQL server binaries, the OS user to run them as, and running them.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::Error;

/// The programs the testkit needs, all from one directory.
const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "pg_basebackup"];

/// Where the server binaries are looked for when `PG_BIN` is unset: Debian's layout, one
/// `<version>/bin` per installed major version.
const VERSIONED_ROOT: &str = "/usr/lib/postgresql";

/// Where the PostgreSQL server binaries live.
#[derive(Debug, Clone)]
pub(crate) struct PgBins {
    /// The directory holding `initdb`, `pg_ctl`, `pg_basebackup` and `postgres`.
    dir: PathBuf,
}

impl PgBins {
    /// `PG_BIN`, else the highest version under `/usr/lib/postgresql/*/bin`, else `initdb` on
    /// `PATH` (see [`discover`]).
    pub(crate) fn find() -> Result<Self, Error> {
        let dir = discover(
            std::env::var_os("PG_BIN"),
            Path::new(VERSIONED_ROOT),
            std::env::var_os("PATH"),
        )?;
        Ok(Self { dir })
    }

    /// The full path of one program.
    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The directory of the server binaries, from the values of `PG_BIN` and `PATH` and the root of
/// versioned installs, in this order:
///
/// 1. `pg_bin`, if set and not empty. It must hold every required program: an incomplete
///    `PG_BIN` is an error, not a reason to look elsewhere (it says what the user wants).
/// 2. `<versioned_root>/<version>/bin` with the highest version, compared numerically
///    (`9.6 < 10 < 15 < 16`), among those holding every required program; other entries
///    (`main`, `16beta`) are ignored.
/// 3. The first directory of `path` holding every required program.
///
/// "Holding" means a regular file with an execute bit.
///
/// # Errors
///
/// [`Error::BinariesNotFound`], saying where it looked and what is missing.
fn discover(
    pg_bin: Option<OsString>,
    versioned_root: &Path,
    path: Option<OsString>,
) -> Result<PathBuf, Error> {
    if let Some(dir) = pg_bin.filter(|v| !v.is_empty()).map(PathBuf::from) {
        return match missing(&dir) {
            None => Ok(dir),
            Some(bin) => Err(Error::BinariesNotFound {
                detail: format!("PG_BIN={} has no executable {bin}", dir.display()),
            }),
        };
    }
    if let Some(dir) = highest_versioned(versioned_root) {
        return Ok(dir);
    }
    let path = path.unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| missing(d).is_none()) {
        return Ok(dir);
    }
    Err(Error::BinariesNotFound {
        detail: format!(
            "PG_BIN is unset, no {}/<version>/bin holds them, and no directory on PATH does",
            versioned_root.display()
        ),
    })
}

/// The first required program missing from `dir` (or not executable there), if any.
fn missing(dir: &Path) -> Option<&'static str> {
    REQUIRED.into_iter().find(|b| {
        !std::fs::metadata(dir.join(b))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
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

/// `"15"` -> `[15]`, `"9.6"` -> `[9, 6]`; anything else is not a version directory.
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

    /// Makes `dir` with a fake executable (a shell script) for each of `programs`.
    fn fake_bin_dir(dir: &Path, programs: &[&str]) -> PathBuf {
        std::fs::create_dir_all(dir).expect("mkdir");
        for p in programs {
            let file = dir.join(p);
            std::fs::write(&file, "#!/bin/sh\nexit 0\n").expect("write");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        dir.to_owned()
    }

    /// A versioned root `<tmp>/lib/postgresql` with complete `9.6`, `10`, `15` and `16`, an
    /// incomplete `17`, and a complete but unversioned `main`; and a complete dir for `PATH`.
    fn machine() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("lib/postgresql");
        for v in ["9.6", "10", "15", "16", "main"] {
            fake_bin_dir(&root.join(v).join("bin"), &REQUIRED);
        }
        fake_bin_dir(&root.join("17/bin"), &["initdb", "pg_basebackup"]);
        let on_path = fake_bin_dir(&tmp.path().join("usr/bin"), &REQUIRED);
        (tmp, root, on_path)
    }

    #[test]
    fn pg_bin_comes_first() {
        let (tmp, root, on_path) = machine();
        let pg_bin = fake_bin_dir(&tmp.path().join("custom"), &REQUIRED);
        let found = discover(Some(pg_bin.clone().into()), &root, Some(on_path.into()));
        assert_eq!(found.expect("found"), pg_bin);
    }

    #[test]
    fn an_incomplete_pg_bin_is_an_error_not_a_fallback() {
        let (tmp, root, on_path) = machine();
        let pg_bin = fake_bin_dir(&tmp.path().join("custom"), &["initdb", "pg_ctl"]);
        let err = discover(Some(pg_bin.clone().into()), &root, Some(on_path.into()))
            .expect_err("incomplete PG_BIN");
        let Error::BinariesNotFound { detail } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            detail,
            &format!(
                "PG_BIN={} has no executable pg_basebackup",
                pg_bin.display()
            )
        );
    }

    #[test]
    fn an_empty_pg_bin_counts_as_unset() {
        let (_tmp, root, on_path) = machine();
        let found = discover(Some(OsString::new()), &root, Some(on_path.into()));
        assert_eq!(found.expect("found"), root.join("16/bin"));
    }

    #[test]
    fn the_highest_complete_version_wins_numerically() {
        let (_tmp, root, on_path) = machine();
        // 17 lacks pg_ctl, main is no version; 16 beats 15, 10 and 9.6 ("9.6" > "16" as text).
        let found = discover(None, &root, Some(on_path.into()));
        assert_eq!(found.expect("found"), root.join("16/bin"));

        // 10 beats 9.6, which a text comparison would pick.
        let tmp = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "10"] {
            fake_bin_dir(&tmp.path().join(v).join("bin"), &REQUIRED);
        }
        let found = discover(None, tmp.path(), None);
        assert_eq!(found.expect("found"), tmp.path().join("10/bin"));
    }

    #[test]
    fn path_is_the_fallback_and_needs_every_program_executable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let empty = fake_bin_dir(&tmp.path().join("empty"), &[]);
        let partial = fake_bin_dir(&tmp.path().join("partial"), &["initdb"]);
        let not_executable = fake_bin_dir(&tmp.path().join("noexec"), &REQUIRED);
        std::fs::set_permissions(
            not_executable.join("pg_ctl"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let full = fake_bin_dir(&tmp.path().join("full"), &REQUIRED);
        let later = fake_bin_dir(&tmp.path().join("later"), &REQUIRED);
        let path = std::env::join_paths([
            tmp.path().join("nonexistent"),
            empty,
            partial,
            not_executable,
            full.clone(),
            later,
        ])
        .expect("join");
        let found = discover(None, &tmp.path().join("no-such-root"), Some(path));
        assert_eq!(found.expect("found"), full);
    }

    #[test]
    fn nothing_found_says_where_it_looked_and_what_to_install() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("lib/postgresql");
        fake_bin_dir(&root.join("15/bin"), &["initdb"]);
        let partial = fake_bin_dir(&tmp.path().join("bin"), &["pg_ctl"]);
        let err = discover(None, &root, Some(partial.into())).expect_err("nothing complete");
        assert!(matches!(err, Error::BinariesNotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "PostgreSQL server binaries not found: install them (apt-get install postgresql) \
                 or set PG_BIN to the directory holding initdb, pg_ctl and pg_basebackup \
                 (PG_BIN is unset, no {}/<version>/bin holds them, and no directory on PATH does)",
                root.display()
            )
        );
    }

    #[test]
    fn finds_installed_binaries() {
        // The machine this runs on is expected to have PostgreSQL (the integration tests need it too).
        let bins = PgBins::find().expect("PostgreSQL binaries");
        assert!(bins.bin("initdb").is_file());
    }
}

//! The `pgfleet` command-line tool: `check` prints the effective config with
//! passwords redacted and exits 2 on a bad one, naming key and line; `status`
//! prints the table of a real cluster, exits 1 when the fleet is not ready,
//! and `--watch` refreshes it until SIGINT.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pgfleet::Config;
use pgfleet_testkit::LocalCluster;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pgfleet");
/// Longest any one run of the binary may take (a status run waits for at most
/// its `--wait`, then shuts down in a few seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgfleet-cli-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the binary to completion with `args` and `env`; returns its output
/// and (lossy UTF-8) stdout and stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Result<(Output, String, String)> {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("pgfleet {args:?} still running after {RUN_TIMEOUT:?}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    Ok((output, stdout, stderr))
}

fn example_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml").to_owned()
}

/// The password in a `postgres://user:password@host/...` URL.
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}

/// `X/Y` (hex halves) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The table row of `server` (its first column), split on whitespace.
fn row<'a>(table: &'a str, server: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&server))
}

/// The status table's header line starts with these columns.
fn is_header(line: &str) -> bool {
    let cols: Vec<_> = line.split_whitespace().take(3).collect();
    cols == ["server", "role", "health"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_effective_example_config() -> Result<()> {
    let (out, stdout, stderr) = run(&["check", &example_path()], &[]).await?;
    ensure!(
        out.status.success(),
        "exit {:?}; stderr:\n{stderr}",
        out.status
    );
    for want in [
        "[fleet]",
        "probe_interval = \"250ms\"",
        "[fleet.restart]",
        "[consistency]",
        "[primary]",
        "[[replicas]]",
        "name = \"replica2\"",
    ] {
        ensure!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    // The printed settings are a config that loads to the same thing.
    let printed = Config::from_toml_str(&stdout).context("printed config parses")?;
    ensure!(printed == Config::from_path(example_path())?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fills_defaults_and_redacts_passwords() -> Result<()> {
    let file = TempFile::new(
        "[primary]\nurl = \"postgres://app:sekret@10.0.0.1:5432/app\"\n\n\
         [[replicas]]\nname = \"r1\"\nurl = \"postgres://app:${PGFLEET_CLI_TEST_PW}@10.0.0.2/app\"\n\n\
         [[replicas]]\nname = \"r2\"\nurl = \"host=10.0.0.3 user=app dbname=app password=kvsecret\"\n",
    )?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, stdout, stderr) =
        run(&["check", path], &[("PGFLEET_CLI_TEST_PW", "envsecret")]).await?;
    ensure!(
        out.status.success(),
        "exit {:?}; stderr:\n{stderr}",
        out.status
    );
    ensure!(
        stdout.contains("postgres://app:***@10.0.0.1:5432/app"),
        "{stdout}"
    );
    ensure!(
        stdout.contains("postgres://app:***@10.0.0.2/app"),
        "{stdout}"
    );
    ensure!(stdout.contains("password=***"), "{stdout}");
    for secret in ["sekret", "envsecret", "kvsecret"] {
        ensure!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} printed:\n{stdout}\n{stderr}"
        );
    }
    // Keys left out are printed with their defaults.
    for want in [
        "probe_interval = \"250ms\"",
        "max_lag_bytes = 16777216",
        "name = \"primary\"",
        "pool_size = 16",
        "weight = 1",
    ] {
        ensure!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }

    // The same file without the variable: exit 2, naming the key and the variable.
    let (out, stdout, stderr) = run(&["check", path], &[]).await?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status);
    ensure!(stdout.is_empty(), "{stdout}");
    ensure!(
        stderr.contains("replicas[0].url") && stderr.contains("PGFLEET_CLI_TEST_PW"),
        "{stderr}"
    );
    ensure!(
        !stderr.contains("sekret") && !stderr.contains("kvsecret"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_bad_config_exits_2_naming_key_and_line() -> Result<()> {
    let file = TempFile::new(
        "[primary]\nurl = \"postgres://u:sekret@h/db\"\n\n\
         [[replicas]]\nname=\"a\"\nurl=\"postgres://u:sekret@h/db\"\nweight = -1\n",
    )?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, stdout, stderr) = run(&["check", path], &[]).await?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status);
    ensure!(stdout.is_empty(), "{stdout}");
    ensure!(stderr.starts_with("error: "), "{stderr}");
    ensure!(stderr.contains("replicas[0].weight"), "{stderr}");
    ensure!(stderr.contains("line 7"), "{stderr}");
    ensure!(!stderr.contains("sekret"), "{stderr}");

    // A file that does not exist, and one a validation rule rejects.
    let (out, _, stderr) = run(&["check", "/nonexistent/pgfleet.toml"], &[]).await?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status);
    ensure!(stderr.contains("/nonexistent/pgfleet.toml"), "{stderr}");
    let file = TempFile::new(
        "[fleet]\nprobe_interval = \"0s\"\n[primary]\nurl = \"postgres://u:sekret@h/db\"\n",
    )?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, _, stderr) = run(&["check", path], &[]).await?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status);
    ensure!(stderr.contains("fleet.probe_interval"), "{stderr}");
    ensure!(!stderr.contains("sekret"), "{stderr}");
    // `status` refuses it the same way, before connecting anywhere.
    let (out, _, stderr) = run(&["status", path], &[]).await?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status);
    ensure!(stderr.contains("fleet.probe_interval"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_version() -> Result<()> {
    let (out, stdout, _) = run(&["--version"], &[]).await?;
    ensure!(out.status.success());
    ensure!(
        stdout.trim() == format!("pgfleet {}", env!("CARGO_PKG_VERSION")),
        "{stdout}"
    );
    for (sub, want) in [("check", "effective settings"), ("status", "--watch")] {
        let (out, stdout, _) = run(&[sub, "--help"], &[]).await?;
        ensure!(out.status.success());
        ensure!(stdout.contains(want), "{sub} --help:\n{stdout}");
    }
    // A --wait no Instant can hold is refused by name, not a panic.
    let (out, _, stderr) = run(&["status", "x.toml", "--wait", "500000000000y"], &[]).await?;
    ensure!(out.status.code() == Some(2), "{out:?}\n{stderr}");
    ensure!(
        stderr.contains("--wait") && stderr.contains("at most 1day"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_table_of_cluster() -> Result<()> {
    let cluster = LocalCluster::shared().await?;
    let file = TempFile::new(&cluster.pgfleet_toml())?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, stdout, stderr) = run(&["status", path, "--wait", "20s"], &[]).await?;
    ensure!(
        out.status.success(),
        "exit {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    ensure!(stdout.lines().any(is_header), "no header in:\n{stdout}");
    let primary = row(&stdout, "primary").context("no primary row")?;
    ensure!(primary[1..3] == ["primary", "healthy"], "{stdout}");
    let shown = parse_lsn(primary[3]).context("primary LSN column")?;
    // The LSN shown is one the primary really reached.
    let now = cluster.current_wal_lsn(cluster.primary()).await?;
    let now = parse_lsn(&now).context("current_wal_lsn")?;
    ensure!(
        shown > 0 && shown <= now,
        "shown {shown:#x}, now {now:#x}:\n{stdout}"
    );
    for name in ["replica1", "replica2"] {
        let replica = row(&stdout, name).with_context(|| format!("no {name} row:\n{stdout}"))?;
        ensure!(replica[1..3] == ["replica", "healthy"], "{stdout}");
        let replayed = parse_lsn(replica[3]).context("replica LSN column")?;
        ensure!(replayed > 0 && replayed <= now, "{stdout}");
    }
    let password = url_password(&cluster.primary().url())
        .context("testkit URL has a password")?
        .to_owned();
    ensure!(!stdout.contains(&password) && !stderr.contains(&password));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connect_reaches_every_server_or_names_the_failure() -> Result<()> {
    let cluster = LocalCluster::shared().await?;
    let toml = cluster.pgfleet_toml();
    let file = TempFile::new(&toml)?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, stdout, stderr) = run(&["check", path, "--connect"], &[]).await?;
    ensure!(
        out.status.success(),
        "exit {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for name in ["primary", "replica1", "replica2"] {
        let line = format!("# default/{name}: ok (no TLS)");
        ensure!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    }

    // replica2 refused (nothing listens on port 1): exit 1, the failure named.
    let replica2 = cluster.replica(1).url();
    let port = format!(":{}/", cluster.replica(1).proxy_port());
    ensure!(replica2.contains(&port), "{replica2} has {port}");
    let broken = toml.replace(&replica2, &replica2.replace(&port, ":1/"));
    ensure!(broken != toml, "the replica2 URL was replaced");
    let file = TempFile::new(&broken)?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let (out, stdout, stderr) = run(&["check", path, "--connect"], &[]).await?;
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    ensure!(stdout.contains("# default/primary: ok"), "{stdout}");
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("# default/replica2: FAILED"))
        .with_context(|| format!("no replica2 failure in:\n{stdout}"))?;
    ensure!(failed.to_lowercase().contains("refused"), "{failed}");
    let password = url_password(&cluster.primary().url())
        .context("testkit URL has a password")?
        .to_owned();
    ensure!(!stdout.contains(&password) && !stderr.contains(&password));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_not_ready_prints_table_and_exits_1() -> Result<()> {
    // Nothing listens on port 1: every probe fails, no primary is ever known.
    let file = TempFile::new(
        "[fleet]\nconnect_timeout = \"500ms\"\nprobe_timeout = \"500ms\"\n\
         [primary]\nurl = \"postgres://app:sekret@127.0.0.1:1/app\"\n",
    )?;
    let path = file.path().to_str().context("temp path is UTF-8")?;
    let started = Instant::now();
    let (out, stdout, stderr) = run(&["status", path, "--wait", "1s"], &[]).await?;
    ensure!(
        out.status.code() == Some(1),
        "exit {:?}; stdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    ensure!(started.elapsed() >= Duration::from_secs(1));
    let primary = row(&stdout, "primary").with_context(|| format!("no row:\n{stdout}"))?;
    ensure!(primary[2] != "healthy", "{stdout}");
    ensure!(stderr.contains("not ready"), "{stderr}");
    ensure!(!stdout.contains("sekret") && !stderr.contains("sekret"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_until_sigint() -> Result<()> {
    let cluster = LocalCluster::shared().await?;
    let file = TempFile::new(&cluster.pgfleet_toml())?;
    let mut child = Command::new(BIN)
        .args(["status", "--watch", "--wait", "20s"])
        .arg(file.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("child pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();

    // Two tables, each with all three servers known.
    let mut seen = String::new();
    let mut tables = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while tables < 2 {
        let Ok(line) = tokio::time::timeout_at(deadline.into(), lines.next_line()).await else {
            bail!("{tables} tables after 40s:\n{seen}");
        };
        let Some(line) = line? else {
            bail!("stdout closed after {tables} tables:\n{seen}");
        };
        if is_header(&line) {
            tables += 1;
        }
        seen.push_str(&line);
        seen.push('\n');
    }
    // Read the second table to its end (its last line).
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .context("rest of the second table")??
            .context("stdout closed")?;
        let done = line.starts_with("read-your-writes:");
        seen.push_str(&line);
        seen.push('\n');
        if done {
            break;
        }
    }
    ensure!(!seen.contains('\x1b'), "screen cleared on a pipe:\n{seen}");
    let second = &seen[seen.rfind("server").context("header")?..];
    for (name, role) in [
        ("primary", "primary"),
        ("replica1", "replica"),
        ("replica2", "replica"),
    ] {
        let cols = row(second, name).with_context(|| format!("no {name} row:\n{seen}"))?;
        ensure!(cols[1] == role, "{seen}");
    }

    // SIGHUP reloads the file: without replica2, the next tables have no replica2 row.
    let toml = cluster.pgfleet_toml();
    let cut = toml
        .find("\n[[replicas]]\nname = \"replica2\"")
        .context("replica2's section")?;
    std::fs::write(file.path(), &toml[..cut])?;
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(sent.success(), "kill -HUP {pid}");
    let mut table = String::new();
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .with_context(|| format!("no table without replica2 after SIGHUP:\n{seen}"))??
            .context("stdout closed")?;
        if is_header(&line) {
            table.clear();
        }
        table.push_str(&line);
        table.push('\n');
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("read-your-writes:") {
            if row(&table, "replica2").is_none() && row(&table, "replica1").is_some() {
                break;
            }
            table.clear();
        }
    }

    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    ensure!(sent.success(), "kill -INT {pid}");
    let interrupted = Instant::now();
    // Drain stdout so the child never blocks on a full pipe while stopping.
    let drain = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .context("still running 15s after SIGINT")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "exit {:?} after SIGINT; stderr:\n{stderr}",
        out.status
    );
    ensure!(
        stderr.contains("reloaded") && stderr.contains("removed [\"replica2\"]"),
        "no reload report on stderr:\n{stderr}"
    );
    let stopped_after = interrupted.elapsed();
    ensure!(
        stopped_after < Duration::from_secs(10),
        "took {stopped_after:?}"
    );
    let rest = drain.await?;
    let password = url_password(&cluster.primary().url())
        .context("testkit URL has a password")?
        .to_owned();
    ensure!(!seen.contains(&password) && !rest.contains(&password) && !stderr.contains(&password));
    Ok(())
}

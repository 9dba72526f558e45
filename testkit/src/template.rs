//! The primary's initial data dir: initdb, the superuser password, the application role and
//! database — built once per machine into a cached template and copied for each cluster.
//!
//! initdb plus the first start costs about two seconds of file-system work; copying a ready data dir
//! costs a fraction of that, and every test that starts a cluster pays it.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use tokio_postgres::{Client, NoTls};

use crate::bins;
use crate::cluster::{free_port, Ctx};
use crate::node::{APP_DATABASE, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD};
use crate::Error;

/// Set (to anything but `0`) to initdb every cluster from scratch instead of copying the template.
pub const NO_TEMPLATE_ENV: &str = "PGFLEET_TESTKIT_NO_TEMPLATE";

/// Bump whenever [`build`] changes what a data dir holds, so old templates are not reused.
const RECIPE: u32 = 1;

/// How long to wait for another process building the template.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// Makes `dest` (which must not exist) a stopped, cleanly shut down primary data dir holding the
/// superuser (with its password), [`APP_USER`] and [`APP_DATABASE`].
/// With `fresh`, always by `initdb` (a system identifier of its own).
pub(crate) async fn primary_data_dir(ctx: &Ctx, dest: &Path, fresh: bool) -> Result<(), Error> {
    let use_template =
        !fresh && std::env::var(NO_TEMPLATE_ENV).map_or(true, |v| v.is_empty() || v == "0");
    if !use_template {
        return build(ctx, dest).await;
    }
    let template = ensure_template(ctx).await?;
    let mut cp = bins::command(Path::new("cp"), ctx.run_as, &ctx.dir);
    cp.arg("-a").arg(&template).arg(dest);
    bins::run(cp, "primary: copying the data dir template", None).await?;
    Ok(())
}

/// The template data dir for these binaries, built first if missing (under a lock, once per machine).
async fn ensure_template(ctx: &Ctx) -> Result<PathBuf, Error> {
    let uid = rustix::process::geteuid().as_raw();
    let root = std::env::temp_dir().join(format!("pgfleet-testkit-template-{uid}"));
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod 700 {}", root.display()), e))?;
    if let Some(u) = ctx.run_as {
        u.chown(&root)?;
    }
    let key = template_key(ctx);
    let slot = root.join(&key);
    let data = slot.join("data");
    let ready = slot.join("ready");

    let lock_path = root.join(format!("{key}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    let started = Instant::now();
    loop {
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && started.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(Error::io(
                    format!("locking {}", lock_path.display()),
                    e.into(),
                ))
            }
        }
    }
    if ready.is_file() && data.join("PG_VERSION").is_file() {
        return Ok(data);
    }

    // Built inside the cluster dir, so the cluster's teardown and watchdog cover the temporary
    // server; moved into the cache only once stopped.
    tracing::info!(target: "pgfleet_testkit::template", dir = %slot.display(), "building the data dir template");
    let build_dir = ctx.dir.join("template-build");
    build(ctx, &build_dir).await?;
    let _ = std::fs::remove_dir_all(&slot);
    std::fs::create_dir(&slot).map_err(|e| Error::io(format!("creating {}", slot.display()), e))?;
    std::fs::rename(&build_dir, &data)
        .map_err(|e| Error::io(format!("moving the template to {}", data.display()), e))?;
    std::fs::write(&ready, "").map_err(|e| Error::io(format!("writing {}", ready.display()), e))?;
    Ok(data)
    // The lock file's descriptor closes here, releasing the lock.
}

/// Identifies what a template was built from: the recipe, the binaries (path, size, mtime) and
/// the user, so an upgrade of PostgreSQL builds a new one.
fn template_key(ctx: &Ctx) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    RECIPE.hash(&mut h);
    for bin in ["initdb", "postgres"] {
        let path = ctx.bins.bin(bin);
        path.hash(&mut h);
        if let Ok(m) = std::fs::metadata(&path) {
            (m.len(), m.mtime(), m.mtime_nsec()).hash(&mut h);
        }
    }
    ctx.run_as.map(|u| (u.uid, u.gid)).hash(&mut h);
    format!("{:016x}", h.finish())
}

/// initdb into `data_dir`, start it on the unix socket only, create the roles and database, stop it.
async fn build(ctx: &Ctx, data_dir: &Path) -> Result<(), Error> {
    let pwfile = ctx.dir.join("superuser.pw");
    std::fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n"))
        .map_err(|e| Error::io(format!("writing {}", pwfile.display()), e))?;
    if let Some(u) = ctx.run_as {
        u.chown(&pwfile)?;
    }
    let mut initdb = ctx.command("initdb");
    initdb
        .arg("-D")
        .arg(data_dir)
        .args(["-U", SUPERUSER])
        .arg(bins::arg_path("--pwfile", &pwfile))
        // Trust only the unix socket in the (private) cluster dir; TCP needs a password.
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .args([
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        ]);
    let initdb = bins::run(initdb, "primary: initdb", None).await;
    let _ = std::fs::remove_file(&pwfile);
    initdb?;

    // Options on the command line, not in postgresql.conf: the data dir stays pristine.
    let port = free_port()?;
    let log = ctx.dir.join("template-build.log");
    let socket_dir = ctx.dir.to_string_lossy().replace('\'', "");
    let mut start = ctx.command("pg_ctl");
    start
        .args(["start", "-w", "-t", "60", "-D"])
        .arg(data_dir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(format!(
            "-p {port} -k '{socket_dir}' -c listen_addresses='' -c fsync=off"
        ));
    bins::run(start, "primary: pg_ctl start (template build)", Some(&log)).await?;

    let created = async {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&ctx.dir)
            .port(port)
            .user(SUPERUSER)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| Error::pg("primary", "connecting over the unix socket", e))?;
        let conn = tokio::spawn(connection);
        let r = create_app_objects(&client).await;
        drop(client);
        let _ = conn.await;
        r
    }
    .await;

    let mut stop = ctx.command("pg_ctl");
    stop.args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
        .arg(data_dir);
    let stopped = bins::run(stop, "primary: pg_ctl stop (template build)", Some(&log)).await;
    created?;
    stopped?;
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// The application role and database (made on the primary, before the replicas copy it).
async fn create_app_objects(client: &Client) -> Result<(), Error> {
    for sql in [
        format!("CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'"),
        format!("GRANT pg_monitor TO {APP_USER}"),
        // Alone: CREATE DATABASE cannot run in a multi-statement (implicit) transaction.
        format!("CREATE DATABASE {APP_DATABASE} OWNER {APP_USER}"),
    ] {
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg("primary", sql.clone(), e))?;
    }
    Ok(())
}

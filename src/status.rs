//! [`Status`]: a point-in-time view of every server, printable as a table.

use std::fmt;
use std::time::Duration;

use crate::lsn::Lsn;
use crate::topology::{Health, Role};

/// One server's state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerStatus {
    /// Configured name.
    pub name: String,
    /// Role from the last probe.
    pub role: Role,
    /// Health (`restarting` while its actor waits for a restart).
    pub health: Health,
    /// Replay position (replica) or insert position (primary).
    pub lsn: Option<Lsn>,
    /// Received position (replica), for information.
    pub receive_lsn: Option<Lsn>,
    /// Bytes behind the primary.
    pub lag_bytes: Option<u64>,
    /// Time behind the primary (an upper bound, or a lower bound when
    /// `lag_is_lower_bound`).
    pub lag: Option<Duration>,
    /// Whether `lag` is only a lower bound (older than all history kept).
    pub lag_is_lower_bound: bool,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Replay paused.
    pub paused: bool,
    /// WAL receiver streaming.
    pub streaming: bool,
    /// Read weight in effect.
    pub weight: u32,
    /// Most connections its two pools (read and write) may open.
    pub pool_max: usize,
    /// Connections open.
    pub pool_open: usize,
    /// Of those, idle.
    pub pool_idle: usize,
    /// Connections in use: checked out by the leases held now.
    pub in_use: u64,
    /// Leases granted.
    pub leases: u64,
    /// Fallback leases granted (reads that wanted a replica).
    pub fallbacks: u64,
    /// Actor restarts.
    pub restarts: u32,
    /// Last error seen.
    pub last_error: Option<String>,
    /// Last probe's round trip.
    pub probe_latency: Option<Duration>,
    /// The last probe (or a lease's checkout) failed and none has succeeded since: still
    /// `healthy` until `failure_threshold` probes fail, but out of read rotation.
    pub suspect: bool,
}

/// The fleet's state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// One entry per configured server, in configuration order.
    pub servers: Vec<ServerStatus>,
    /// No healthy primary is known (replicas keep serving reads if fresh).
    pub primary_down: bool,
    /// Two servers claim primary.
    pub split_brain: bool,
    /// Read-after-token leases served by replicas.
    pub ryw_on_replica: u64,
    /// Read-after-token leases served by the primary.
    pub ryw_on_primary: u64,
    /// Read-after-token leases that waited at the router.
    pub ryw_waited: u64,
    /// Probe queries run on request for waiting read-your-writes reads (beyond the
    /// regular `probe_interval` probes), summed over servers.
    pub wait_probes: u64,
}

impl Status {
    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&ServerStatus> {
        self.servers.iter().find(|s| s.name == name)
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn dur(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        Some(d) => format!("{:.1}s", d.as_secs_f64()),
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {:<8} {:<10} {:>14} {:>10} {:>8} {:>3} {:>13} {:>8} {:>8} {:>3}  note",
            "server",
            "role",
            "health",
            "lsn",
            "lag",
            "lag_t",
            "w",
            "pool u/i/o/max",
            "leases",
            "fallbk",
            "rst"
        )?;
        for s in &self.servers {
            let mut note = Vec::new();
            if s.paused {
                note.push("replay paused".to_string());
            }
            if s.role == Role::Replica && !s.streaming {
                note.push("not streaming".to_string());
            }
            if s.suspect && s.health == Health::Healthy {
                note.push("last probe failed".to_string());
            }
            if s.health != Health::Healthy || s.suspect {
                if let Some(e) = &s.last_error {
                    note.push(e.chars().take(60).collect());
                }
            }
            let lag_t = if s.lag_is_lower_bound {
                format!(">{}", dur(s.lag))
            } else {
                dur(s.lag)
            };
            writeln!(
                f,
                "{:<12} {:<8} {:<10} {:>14} {:>10} {:>8} {:>3} {:>13} {:>8} {:>8} {:>3}  {}",
                s.name,
                s.role.to_string(),
                s.health.to_string(),
                opt(&s.lsn),
                opt(&s.lag_bytes),
                lag_t,
                s.weight,
                format!(
                    "{}/{}/{}/{}",
                    s.in_use, s.pool_idle, s.pool_open, s.pool_max
                ),
                s.leases,
                s.fallbacks,
                s.restarts,
                note.join("; ")
            )?;
        }
        if self.split_brain {
            writeln!(f, "SPLIT BRAIN: two servers claim primary; writes refused")?;
        } else if self.primary_down {
            writeln!(
                f,
                "primary down: writes wait or fail; replicas serve fresh-enough reads"
            )?;
        }
        write!(
            f,
            "read-your-writes: {} on replicas, {} on primary, {} waited",
            self.ryw_on_replica, self.ryw_on_primary, self.ryw_waited
        )
    }
}

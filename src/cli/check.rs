//! `udp-director check-config`, and the descriptor check a start makes too.

use std::path::Path;

use anyhow::bail;
use control::config::Config;

/// Loads and validates a config file, and says what it holds.
pub(crate) fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    check_fd_budget(&config)?;
    println!(
        "{}: ok ({} data ports, {} resource types, {} workers)",
        path.display(),
        config.data_ports.len(),
        config.mappings.len(),
        config.workers
    );
    Ok(())
}

/// File descriptors a worker holds before any session: its epoll instance, its waker and one
/// socket per data port.
const FDS_PER_WORKER_BASE: u64 = 2;
/// What the rest of the process holds: listeners, the inventory, the API client, logs.
const FDS_RESERVED: u64 = 64;

/// The workers must fit in the open-file limit this process can raise itself to, with room to
/// spare; otherwise the start fails half-way on `Too many open files`. Checked by `check-config`
/// too, so it refuses what a start on this machine would.
pub(crate) fn check_fd_budget(config: &Config) -> anyhow::Result<()> {
    let workers = config.workers.get() as u64;
    let needed = workers * (FDS_PER_WORKER_BASE + config.data_ports.len() as u64) + FDS_RESERVED;
    let limit = open_file_hard_limit();
    if needed > limit / 2 {
        bail!(
            "config key `workers`: {workers} workers need about {needed} file descriptors before \
             any session, more than half of this machine's open-file limit ({limit}); use fewer \
             workers or raise the limit"
        );
    }
    Ok(())
}

/// The open-file hard limit: what the soft limit is raised to at start.
fn open_file_hard_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return u64::MAX;
    }
    limit.rlim_max
}

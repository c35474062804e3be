//! Room in the process's descriptor table, made before a hand-off's pause. The kernel grows
//! a process's table when a new descriptor does not fit, and in a process with several
//! threads each growth waits for an RCU grace period (`expand_fdtable` calls
//! `synchronize_rcu`): milliseconds each. A hand-off duplicates (old side) or receives (new
//! side) a descriptor per socket; growing the table then would put those waits into the
//! players' pause (17 ms of a 21 ms freeze, measured), so each side grows it once beforehand,
//! while everything still flows.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::io::fd_budget::soft_nofile_limit;

/// The most slots a side makes room for ahead. The kernel rounds a table up to a power of
/// two, eight bytes a slot: at most 2 MiB, once.
const MAX_AHEAD: usize = 1 << 17;

/// Grows the table so that `extra` descriptors past the highest now open fit without growing
/// it again (within the soft `RLIMIT_NOFILE` and [`MAX_AHEAD`]). When that cannot be done
/// nothing is lost: the hand-off then pays for the growth in its pause, and the log says so.
pub(crate) fn make_room(extra: usize) {
    if let Err(e) = try_make_room(extra) {
        log::debug!("hand-off: no room made ahead in the descriptor table: {e}");
    }
}

/// [`make_room`], returning the slots the table has room for.
fn try_make_room(extra: usize) -> Result<usize, String> {
    let highest = highest_open().ok_or("/proc/self/fd cannot be read")?;
    let want = highest
        .saturating_add(extra.min(MAX_AHEAD))
        .min(soft_nofile_limit().saturating_sub(1));
    if want <= highest {
        return Ok(highest + 1);
    }
    let want_raw = libc::c_int::try_from(want).map_err(|e| e.to_string())?;
    // Any open descriptor will do as the source: the copy is closed at once, the table keeps
    // its size (the kernel never shrinks one).
    let source = fs::File::open("/proc/self/fd").map_err(|e| e.to_string())?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor to the lowest free number at or
    // above `want_raw`; the result is owned below and closed when dropped.
    let copy = unsafe { libc::fcntl(source.as_raw_fd(), libc::F_DUPFD_CLOEXEC, want_raw) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: `copy` was just returned by fcntl and nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(copy) });
    Ok(want + 1)
}

/// The highest descriptor number open in this process.
fn highest_open() -> Option<usize> {
    fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's size as the kernel reports it.
    fn table_size() -> usize {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn the_table_grows_ahead() {
        let before = highest_open().expect("/proc/self/fd");
        let extra = 3000.min(soft_nofile_limit() - 1 - before);
        // Other tests open descriptors meanwhile: the room is at least what was asked.
        let room = try_make_room(extra).expect("room");
        assert!(
            room > before + extra,
            "room {room} for {extra} past {before}"
        );
        assert!(table_size() >= room, "FDSize {} for {room}", table_size());
    }
}

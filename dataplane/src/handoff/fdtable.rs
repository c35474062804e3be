//! Room in the process's descriptor table, made before a hand-off's pause. The kernel grows
//! a process's table when a new descriptor does not fit, and in a process with several
//! threads each growth waits for an RCU grace period (`expand_fdtable` calls
//! `synchronize_rcu`): milliseconds each. A hand-off duplicates (old side) or receives (new
//! side) a descriptor per socket; growing the table then would put those waits into the
//! players' pause, so each side grows it once beforehand, while everything still flows.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The most a side makes room for ahead: a table of this many slots is a few hundred KiB.
const MAX_AHEAD: usize = 1 << 17;

/// Grows the table so that `extra` descriptors past the highest now open fit without growing
/// it again (within the soft `RLIMIT_NOFILE` and [`MAX_AHEAD`]). Returns the slots the table
/// has room for, or `None` when that could not be learnt (nothing is lost: the hand-off then
/// pays for the growth in its pause).
pub(crate) fn make_room(extra: usize) -> Option<usize> {
    let highest = highest_open()?;
    let limit = soft_limit()?;
    let want = highest
        .saturating_add(extra.min(MAX_AHEAD))
        .min(limit.saturating_sub(1));
    if want <= highest {
        return Some(highest + 1);
    }
    let want_raw = libc::c_int::try_from(want).ok()?;
    // Any open descriptor will do as the source: the copy is closed at once, the table keeps
    // its size (the kernel never shrinks one).
    let source = fs::File::open("/proc/self/fd").ok()?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor to the lowest free number at or
    // above `want_raw`; the result is owned below and closed when dropped.
    let copy = unsafe { libc::fcntl(source.as_raw_fd(), libc::F_DUPFD_CLOEXEC, want_raw) };
    if copy < 0 {
        return None;
    }
    // SAFETY: `copy` was just returned by fcntl and nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(copy) });
    Some(want + 1)
}

/// The highest descriptor number open in this process.
fn highest_open() -> Option<usize> {
    fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .max()
}

/// The soft `RLIMIT_NOFILE`.
fn soft_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// Descriptors open in this process now.
pub(crate) fn open_count() -> usize {
    fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
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
    fn the_table_grows_ahead_and_the_copy_is_closed() {
        let before = highest_open().expect("/proc/self/fd");
        let extra = 3000.min(soft_limit().unwrap() - 1 - before);
        let room = make_room(extra).expect("room");
        assert_eq!(room, before + extra + 1);
        assert!(table_size() >= room, "FDSize {} for {room}", table_size());
        assert!(highest_open().unwrap() < room - 1, "the copy is closed");
    }
}

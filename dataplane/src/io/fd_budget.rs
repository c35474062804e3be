//! The descriptor budget (SPEC §10): how many file descriptors the data plane may hold, so that
//! whatever the workers do, a reserve stays for the control thread (query and admin accepts,
//! inventory and config reads, the Kubernetes client).
//!
//! Every descriptor a worker opens for a session or a listener (a shared upstream socket, an
//! accepted or connected TCP stream, a listener's per-worker socket) is taken from the budget
//! first, as an [`FdLease`] that gives it back when dropped alongside the socket. A refused
//! lease refuses only the session or listener that needed it. The limit is read again on every
//! take (one `getrlimit`, per new socket, never per datagram), so a limit lowered on the
//! running process (`prlimit`) is followed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors kept for the control thread beyond its own caps: the tokio runtime, the
/// Kubernetes client's connections, inventory, config and key files, logging.
pub const CONTROL_RESERVE_BASE: usize = 64;

/// Where the budget learns the process's descriptor limit.
type LimitSource = Box<dyn Fn() -> usize + Send + Sync>;

/// The descriptors the data plane holds, against the process limit less a reserve.
pub struct FdBudget {
    /// Descriptors the rest of the process may need: what it held when the data plane started,
    /// plus the control thread's caps.
    reserve: usize,
    held: AtomicUsize,
    limit: LimitSource,
}

impl std::fmt::Debug for FdBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdBudget")
            .field("reserve", &self.reserve)
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl FdBudget {
    /// A budget under the process's soft `RLIMIT_NOFILE`, keeping `reserve` descriptors out of
    /// the data plane's reach.
    pub fn for_process(reserve: usize) -> Arc<Self> {
        Self::with_limit(reserve, Box::new(soft_nofile_limit))
    }

    /// A budget under the limit `limit` reports (tests inject one).
    pub fn with_limit(reserve: usize, limit: LimitSource) -> Arc<Self> {
        Arc::new(Self {
            reserve,
            held: AtomicUsize::new(0),
            limit,
        })
    }

    /// Takes `n` descriptors, or `None` when they would eat into the reserve.
    pub fn try_take(self: &Arc<Self>, n: usize) -> Option<FdLease> {
        self.try_take_leaving(n, 0)
    }

    /// Takes `n` descriptors only if `leave` more stay free after them: listeners leave room
    /// for the sessions they exist to carry, so opening many cannot starve every session of an
    /// upstream socket.
    pub fn try_take_leaving(self: &Arc<Self>, n: usize, leave: usize) -> Option<FdLease> {
        let allowed = self.allowed().saturating_sub(leave);
        let mut held = self.held.load(Ordering::Relaxed);
        loop {
            if held.saturating_add(n) > allowed {
                return None;
            }
            match self.held.compare_exchange_weak(
                held,
                held + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(FdLease {
                        budget: Arc::clone(self),
                        count: n,
                    });
                }
                Err(now) => held = now,
            }
        }
    }

    /// Descriptors the data plane may hold now: the limit less the reserve.
    pub fn allowed(&self) -> usize {
        (self.limit)().saturating_sub(self.reserve)
    }

    /// Descriptors the data plane holds.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The descriptors kept for the rest of the process.
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Descriptors taken from an [`FdBudget`], given back on drop: keep it beside the socket(s) it
/// paid for.
#[derive(Debug)]
pub struct FdLease {
    budget: Arc<FdBudget>,
    count: usize,
}

impl FdLease {
    /// Descriptors this lease holds.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl Drop for FdLease {
    fn drop(&mut self) {
        if self.count > 0 {
            self.budget.give_back(self.count);
        }
    }
}

/// The process's soft descriptor limit (`usize::MAX` when unlimited or unreadable).
pub fn soft_nofile_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` into the valid, exclusively borrowed `limit`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return usize::MAX;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Raises the soft descriptor limit to the hard one (as nginx's `worker_rlimit_nofile` and the
/// Go runtime do): a proxy's need grows with its players, and the soft default (often 1,024)
/// is a shell's, not a server's. Returns the soft limit in force afterwards.
pub fn raise_nofile_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as in `soft_nofile_limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `setrlimit` reads one valid `rlimit`; raising the soft limit up to the hard
        // one needs no privilege.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    }
    soft_nofile_limit()
}

/// Descriptors the process has open now (counted in `/proc/self/fd`; `None` where unreadable).
/// For start-up and metrics, never a hot path.
pub fn open_descriptors() -> Option<usize> {
    // The directory handle itself is one of the entries.
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn budget(limit: &Arc<AtomicUsize>, reserve: usize) -> Arc<FdBudget> {
        let limit = Arc::clone(limit);
        FdBudget::with_limit(reserve, Box::new(move || limit.load(Ordering::Relaxed)))
    }

    #[test]
    fn leases_stay_out_of_the_reserve_and_come_back_on_drop() {
        let limit = Arc::new(AtomicUsize::new(100));
        let b = budget(&limit, 30);
        let a = b.try_take(60).expect("60 of 70");
        assert!(b.try_take(11).is_none(), "would eat into the reserve");
        let c = b.try_take(10).expect("the last 10");
        assert_eq!(b.held(), 70);
        assert!(b.try_take(1).is_none());
        drop(a);
        assert_eq!(b.held(), 10);
        assert_eq!(c.count(), 10);
        drop(c);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn listeners_leave_room_for_sessions() {
        let limit = Arc::new(AtomicUsize::new(100));
        let b = budget(&limit, 0);
        let listeners = b.try_take_leaving(80, 20).expect("80 of 100, 20 left");
        assert!(
            b.try_take_leaving(1, 20).is_none(),
            "the last 20 are for sessions"
        );
        let sessions = b.try_take(20).expect("sessions take them");
        assert!(b.try_take(1).is_none());
        drop((listeners, sessions));
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn a_limit_lowered_at_run_time_is_followed_and_raised_again() {
        let limit = Arc::new(AtomicUsize::new(1000));
        let b = budget(&limit, 100);
        let held: Vec<_> = (0..50).map(|_| b.try_take(1).unwrap()).collect();
        // prlimit lowers the soft limit to just above what is open: nothing new fits, what is
        // held stays held.
        limit.store(120, Ordering::Relaxed);
        assert!(b.try_take(1).is_none());
        assert_eq!(b.held(), 50);
        drop(held);
        assert!(
            b.try_take(20).is_some(),
            "freed descriptors are usable again"
        );
        limit.store(1000, Ordering::Relaxed);
        assert!(b.try_take(800).is_some());
    }

    #[test]
    fn the_process_limit_is_read() {
        let soft = soft_nofile_limit();
        assert!(soft > 3);
        assert!(open_descriptors().is_some_and(|n| n >= 3 && n < soft));
    }
}

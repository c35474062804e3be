//! Kernel pipes for the TCP splice, and a worker's pool of them.
//!
//! A spliced direction moves bytes socket → pipe → socket with `splice(2)`, so they never
//! cross into user space. A pipe is two descriptors, leased from the data plane's budget like
//! a socket's. A direction takes one from its worker's [`PipePool`] when it reads and gives it
//! back as soon as it is empty again (as HAProxy does), so an idle connection holds none and
//! connections cost no `pipe2` in steady state. A pipe with bytes left in it when its
//! connection ends is closed, never pooled: the next connection must not receive another's
//! bytes.
//!
//! When no pipe can be had (the budget keeps its last quarter for connections, or `pipe2`
//! fails) the pool hands out none and that read copies through user space instead; that is
//! logged once per pool, never a failure of the connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;

use super::fd_budget::{FdBudget, FdLease};

/// Empty pipes a worker keeps for its connections' next reads (two descriptors each).
const IDLE_PIPES: usize = 32;
/// Bytes spliced into a pipe per call. Small enough that the destination gets the first bytes
/// of a burst while the source is still sending (the kernel does the next socket's receive
/// work as the splice out returns), as nginx's and HAProxy's 16 KiB buffers do: on loopback a
/// stream moved 5-10 % faster than in 64 KiB calls, with the same bytes per wake-up.
const SPLICE_IN_BYTES: usize = 16 * 1024;
/// Pipes are not leased when they would leave less than this share (1/N) of the data plane's
/// descriptors free: near the limit a read copies through user space rather than take
/// descriptors a new connection needs.
const PIPE_LEAVE_SHARE: usize = 4;

/// One kernel pipe and the bytes spliced into it and not yet out.
#[derive(Debug)]
pub(crate) struct KernelPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe.
    held: usize,
    /// What the pipe holds when full, in bytes (`F_GETPIPE_SZ`).
    capacity: usize,
    /// The pipe's two descriptors, from the data plane's budget.
    _lease: FdLease,
}

impl KernelPipe {
    /// A new non-blocking pipe whose two descriptors `lease` pays for.
    fn open(lease: FdLease) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `pipe2` writes two descriptors into the valid, exclusively borrowed array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `pipe2` succeeded: both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `fcntl(F_GETPIPE_SZ)` on a pipe descriptor we own takes no argument.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(Self {
            read,
            write,
            held: 0,
            // A pipe has at least one page; the kernel's default is 16 pages.
            capacity: usize::try_from(capacity).unwrap_or(0).max(4096),
            _lease: lease,
        })
    }

    /// Bytes in the pipe, waiting for the destination.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Splices what `src` has (up to [`SPLICE_IN_BYTES`]) into the pipe, which must be empty:
    /// only then does `EAGAIN` say that `src` has nothing, not that the pipe is full. `Ok(0)`
    /// is the end of `src`'s stream.
    pub(crate) fn fill_from(&mut self, src: &impl AsRawFd) -> io::Result<usize> {
        debug_assert_eq!(self.held, 0, "a pipe is filled only once it is empty");
        let n = splice(
            src.as_raw_fd(),
            self.write.as_raw_fd(),
            self.capacity.min(SPLICE_IN_BYTES),
        )?;
        self.held += n;
        Ok(n)
    }

    /// Splices what the pipe holds into `dst`, as much as `dst` takes now.
    pub(crate) fn drain_to(&mut self, dst: &impl AsRawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), dst.as_raw_fd(), self.held)?;
        self.held -= n;
        Ok(n)
    }
}

/// `splice(2)` of up to `len` bytes from `from` to `to` (one of them a pipe), moving pages
/// rather than copying where the kernel can, and never blocking.
fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from owners
    // the caller holds); null offsets mean "the descriptor's own position", as for a pipe or
    // socket they must be.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Not negative, and at most `len`.
    Ok(n as usize)
}

/// A worker's empty pipes, shared with the splices that will give theirs back (a handle: the
/// clones are one pool). Only its worker thread uses it; the lock is never contended.
#[derive(Clone, Debug)]
pub(crate) struct PipePool {
    shared: Arc<Mutex<Idle>>,
}

#[derive(Debug)]
struct Idle {
    pipes: Vec<KernelPipe>,
    budget: Arc<FdBudget>,
    /// Never hand out a pipe: every connection copies through user space.
    copy_only: bool,
    /// Pipes opened (`pipe2` calls that succeeded).
    opened: u64,
    /// Times no pipe could be had.
    refused: u64,
}

impl PipePool {
    /// An empty pool whose pipes are leased from `budget`.
    pub(crate) fn new(budget: Arc<FdBudget>) -> Self {
        Self::with_mode(budget, false)
    }

    /// A pool that never hands out a pipe, so connections copy through user space: what a
    /// pool does when the kernel or the budget gives it nothing.
    #[cfg(test)]
    pub(crate) fn copy_only(budget: Arc<FdBudget>) -> Self {
        Self::with_mode(budget, true)
    }

    fn with_mode(budget: Arc<FdBudget>, copy_only: bool) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Idle {
                pipes: Vec::new(),
                budget,
                copy_only,
                opened: 0,
                refused: 0,
            })),
        }
    }

    /// An empty pipe: a pooled one, else a new one; `None` when neither the budget nor the
    /// kernel gives one (the caller then copies through user space).
    pub(crate) fn take(&self) -> Option<KernelPipe> {
        let mut idle = self.shared.lock();
        if let Some(pipe) = idle.pipes.pop() {
            return Some(pipe);
        }
        if idle.copy_only {
            return None;
        }
        let leave = idle.budget.allowed() / PIPE_LEAVE_SHARE;
        let opened = match idle.budget.try_take_leaving(2, leave) {
            Some(lease) => KernelPipe::open(lease),
            None => Err(io::Error::other(format!(
                "the descriptor budget keeps its last {leave} for connections"
            ))),
        };
        match opened {
            Ok(pipe) => {
                idle.opened += 1;
                Some(pipe)
            }
            Err(e) => {
                idle.refused += 1;
                if idle.refused == 1 {
                    log::warn!(
                        "TCP: no pipe for splice(2) ({e}): connections copy through user space \
                         while none can be had (said once)"
                    );
                }
                None
            }
        }
    }

    /// Takes back a pipe whose connection ended: kept if it is empty and the pool has room,
    /// closed otherwise.
    pub(crate) fn put(&self, pipe: KernelPipe) {
        if pipe.held != 0 {
            return;
        }
        let mut idle = self.shared.lock();
        if idle.pipes.len() < IDLE_PIPES {
            idle.pipes.push(pipe);
        }
    }

    /// Closes the idle pipes, giving their descriptors back (the budget is spent).
    pub(crate) fn clear(&self) {
        let pipes = std::mem::take(&mut self.shared.lock().pipes);
        drop(pipes);
    }

    /// Pipes waiting for a connection.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.shared.lock().pipes.len()
    }

    /// Pipes this pool has opened so far.
    #[cfg(test)]
    pub(crate) fn opened(&self) -> u64 {
        self.shared.lock().opened
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    fn budget(limit: usize) -> Arc<FdBudget> {
        FdBudget::with_limit(0, Box::new(move || limit))
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn empty_pipes_are_reused_and_their_descriptors_leased() {
        let budget = budget(1000);
        let pool = PipePool::new(Arc::clone(&budget));
        let (one, two) = (pool.take().unwrap(), pool.take().unwrap());
        assert_eq!(pool.opened(), 2);
        assert_eq!(budget.held(), 4, "two descriptors a pipe");
        pool.put(one);
        pool.put(two);
        assert_eq!(pool.idle(), 2);
        for _ in 0..10 {
            let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
            pool.put(a);
            pool.put(b);
        }
        assert_eq!(pool.opened(), 2, "no pipe2 while pooled pipes last");
        assert_eq!(budget.held(), 4);
        pool.clear();
        assert_eq!(budget.held(), 0, "closed pipes give their descriptors back");
    }

    #[test]
    fn a_pipe_with_bytes_left_is_closed_not_pooled() {
        let budget = budget(1000);
        let pool = PipePool::new(Arc::clone(&budget));
        let (mut a, b) = pair();
        b.set_nonblocking(true).unwrap();
        let mut pipe = pool.take().unwrap();
        a.write_all(b"left behind").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = 0;
        while got == 0 {
            got = match pipe.fill_from(&b) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
        }
        assert_eq!(pipe.held(), 11);
        pool.put(pipe);
        assert_eq!(pool.idle(), 0);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn bytes_go_through_the_pipe_intact() {
        let pool = PipePool::new(budget(1000));
        let (mut a, b) = pair();
        let (c, mut d) = pair();
        let mut pipe = pool.take().unwrap();
        a.write_all(b"spliced").unwrap();
        drop(a);
        // Blocking sockets: the first fill waits for the bytes, the second sees the end.
        assert_eq!(pipe.fill_from(&b).unwrap(), 7);
        assert_eq!(pipe.drain_to(&c).unwrap(), 7);
        assert_eq!(pipe.fill_from(&b).unwrap(), 0, "the end of the stream");
        drop(c);
        let mut got = String::new();
        d.read_to_string(&mut got).unwrap();
        assert_eq!(got, "spliced");
        assert_eq!(pipe.held(), 0);
    }

    #[test]
    fn no_pipe_past_the_budget_share_or_in_a_copy_only_pool() {
        // 10 descriptors: a pipe may not leave fewer than 2 (a quarter) free.
        let budget = budget(10);
        let pool = PipePool::new(Arc::clone(&budget));
        let held: Vec<_> = (0..4).map_while(|_| pool.take()).collect();
        assert_eq!(held.len(), 4, "8 of 10 descriptors");
        assert!(
            pool.take().is_none(),
            "the last quarter stays for connections"
        );
        assert!(budget.try_take(2).is_some(), "which can still take it");
        let copy = PipePool::copy_only(budget);
        assert!(copy.take().is_none());
    }
}

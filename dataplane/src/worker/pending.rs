//! TCP connections accepted on a token port and waiting for their first bytes (the token, or
//! proof there is none): the slab that holds them, their deadlines against
//! `tcpTokenTimeoutSeconds` ([`TokenWaits`]), and the listeners whose accept is to be retried
//! after the process ran out of descriptors or memory.
//!
//! A waiting connection already holds a place under `maxSessions` and `maxSessionsPerIp`, so
//! a flood of silent connections is capped like a flood of sessions; the place passes to its
//! session. Until the decision a connection is read at most [`MAX_PREFIX`] bytes at a time:
//! whatever follows stays in the kernel's buffer until the splice reads it. This part only
//! reads and keeps connections; it hands each back once it is to be decided, and never
//! admits, connects or counts one itself.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};
use slab::Slab;

use crate::io::fd_budget::FdLease;
use crate::policy::prefix::{MAX_PREFIX, Prefix, read_prefix};

use super::pending_token;

/// A connection accepted, with its descriptors and its place under the session caps.
#[derive(Debug)]
pub(super) struct Accepted {
    pub(super) stream: TcpStream,
    /// Its descriptors, the backend connection's included.
    pub(super) lease: FdLease,
    /// Canonical client address (IPv4 clients of a dual-stack socket as IPv4).
    pub(super) client: SocketAddr,
    pub(super) listener: usize,
}

/// A connection waiting for its first bytes.
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) conn: Accepted,
    /// What it has sent so far: `prefix[..len]`.
    pub(super) prefix: [u8; MAX_PREFIX],
    pub(super) len: usize,
    /// Tells this connection from a later one in the same slot.
    serial: u64,
}

/// Why a waiting connection is being decided now.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Decide {
    /// Its first bytes said enough.
    Read,
    /// It closed its side before saying enough.
    Eof,
    /// `tcpTokenTimeoutSeconds` passed.
    Timeout,
    /// Reading it failed (reset): it gets nothing.
    Failed,
}

/// TCP connections waiting for their first bytes, and listeners whose accept is to be
/// retried.
#[derive(Debug)]
pub(super) struct PendingConnections {
    slab: Slab<Waiting>,
    /// The connections of `slab` by accept time, against `tcpTokenTimeoutSeconds`.
    waits: TokenWaits,
    next_serial: u64,
    /// (when, listener) to accept on again after a resource error.
    accept_retries: Vec<(Instant, usize)>,
}

impl PendingConnections {
    /// Nothing waiting yet; a connection waits `token_timeout` for its token.
    pub(super) fn new(token_timeout: Duration) -> Self {
        Self {
            slab: Slab::new(),
            waits: TokenWaits::new(token_timeout),
            next_serial: 0,
            accept_retries: Vec::new(),
        }
    }

    /// A live `tcpTokenTimeoutSeconds` change: it applies to the connections waiting now too.
    pub(super) fn set_token_timeout(&mut self, timeout: Duration) {
        self.waits.set_timeout(timeout);
    }

    /// How long until the next deadline: a token wait or an accept retry.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let token = self.waits.next_deadline();
        let retry = self.accept_retries.iter().map(|&(at, _)| at).min();
        token.into_iter().chain(retry).min()
    }

    /// Registers `conn` to wait for its first bytes; returns its slot. A connection that
    /// cannot be registered is closed (its descriptors go back with it).
    pub(super) fn add(
        &mut self,
        registry: &Registry,
        mut conn: Accepted,
        now: Instant,
    ) -> io::Result<usize> {
        let slot = self.slab.vacant_key();
        registry.register(&mut conn.stream, pending_token(slot), Interest::READABLE)?;
        self.next_serial += 1;
        let serial = self.next_serial;
        self.slab.insert(Waiting {
            conn,
            prefix: [0; MAX_PREFIX],
            len: 0,
            serial,
        });
        self.waits.push(now, slot, serial);
        Ok(slot)
    }

    /// Reads the first bytes of the connection in `slot`; hands it back once it is to be
    /// decided (its bytes said enough, it closed, or it failed), `None` while it waits.
    pub(super) fn read(&mut self, slot: usize) -> Option<(Waiting, Decide)> {
        let p = self.slab.get_mut(slot)?;
        let why = loop {
            if p.len == MAX_PREFIX {
                break Decide::Read;
            }
            match (&p.conn.stream).read(&mut p.prefix[p.len..]) {
                Ok(0) => break Decide::Eof,
                Ok(n) => {
                    p.len += n;
                    if read_prefix(&p.prefix[..p.len]) != Prefix::NeedMore {
                        break Decide::Read;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: connection failed before its token: {e}", p.conn.client);
                    break Decide::Failed;
                }
            }
        };
        Some((self.slab.try_remove(slot)?, why))
    }

    /// The next connection whose `tcpTokenTimeoutSeconds` is over at `now`.
    pub(super) fn pop_expired(&mut self, now: Instant) -> Option<Waiting> {
        let slab = &self.slab;
        let slot = self.waits.pop_expired(now, |slot, serial| {
            slab.get(slot).is_some_and(|p| p.serial == serial)
        })?;
        self.slab.try_remove(slot)
    }

    /// Takes out the connections waiting on `listener` (it is closed).
    pub(super) fn take_on(&mut self, listener: usize) -> Vec<Waiting> {
        let doomed: Vec<usize> = self
            .slab
            .iter()
            .filter(|(_, p)| p.conn.listener == listener)
            .map(|(slot, _)| slot)
            .collect();
        doomed
            .into_iter()
            .filter_map(|slot| self.slab.try_remove(slot))
            .collect()
    }

    /// Takes out every waiting connection (shutdown).
    pub(super) fn take_all(&mut self) -> Vec<Waiting> {
        self.slab.drain().collect()
    }

    /// Accepts on `listener` again at `at` (one retry per listener at a time).
    pub(super) fn retry_accept(&mut self, listener: usize, at: Instant) {
        if !self.accept_retries.iter().any(|&(_, l)| l == listener) {
            self.accept_retries.push((at, listener));
        }
    }

    /// The listeners whose accept retry is due at `now`, taken out.
    pub(super) fn due_retries(&mut self, now: Instant) -> Vec<usize> {
        if !self.accept_retries.iter().any(|&(at, _)| at <= now) {
            return Vec::new();
        }
        let (due, later): (Vec<_>, Vec<_>) = self
            .accept_retries
            .drain(..)
            .partition(|&(at, _)| at <= now);
        self.accept_retries = later;
        due.into_iter().map(|(_, listener)| listener).collect()
    }
}

/// Connections waiting for their token, in accept order, against `tcpTokenTimeoutSeconds`
/// (sans-io: time comes in as `now`). An entry keeps its accept time, not a deadline: a
/// deadline is the accept time plus the timeout in force when it is read. So a live change of
/// the timeout applies to the connections already waiting, and accept order stays deadline
/// order whatever the changes (a deadline stored at accept would not be: after a reload that
/// shortens the timeout, a connection accepted later would come due first, stuck behind an
/// earlier one).
#[derive(Debug)]
struct TokenWaits {
    timeout: Duration,
    /// (accepted, slot, serial); accept times never decrease front to back.
    queue: VecDeque<(Instant, usize, u64)>,
}

impl TokenWaits {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            queue: VecDeque::new(),
        }
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Queues the connection in `slot` (`serial` tells it from a later one there), accepted at
    /// `accepted`: never before the last one queued (the worker's clock only moves forward; one
    /// that did not would be queued as accepted with the last).
    fn push(&mut self, accepted: Instant, slot: usize, serial: u64) {
        let accepted = self
            .queue
            .back()
            .map_or(accepted, |&(last, ..)| accepted.max(last));
        self.queue.push_back((accepted, slot, serial));
    }

    /// When the front entry's wait ends. It may have been decided since: the wake-up is then
    /// early, never late. `None`: nothing waits, or not within `Instant`'s range.
    fn next_deadline(&self) -> Option<Instant> {
        let &(accepted, ..) = self.queue.front()?;
        accepted.checked_add(self.timeout)
    }

    /// The slot of the next connection whose wait is over at `now` and that still waits
    /// (`waiting(slot, serial)`); entries of connections decided since are dropped on the way.
    fn pop_expired(&mut self, now: Instant, waiting: impl Fn(usize, u64) -> bool) -> Option<usize> {
        while let Some(&(accepted, slot, serial)) = self.queue.front() {
            let live = waiting(slot, serial);
            let due = accepted.checked_add(self.timeout).is_some_and(|d| d <= now);
            if live && !due {
                return None;
            }
            self.queue.pop_front();
            if live {
                return Some(slot);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Every entry still waits.
    fn all(_: usize, _: u64) -> bool {
        true
    }

    fn expired(w: &mut TokenWaits, now: Instant) -> Vec<usize> {
        std::iter::from_fn(|| w.pop_expired(now, all)).collect()
    }

    #[test]
    fn a_shorter_timeout_applies_to_connections_already_waiting() {
        let t0 = Instant::now();
        let mut w = TokenWaits::new(10 * S);
        for slot in 0..3 {
            w.push(t0 + slot as u32 * S, slot, 0);
        }
        assert_eq!(w.next_deadline(), Some(t0 + 10 * S));
        assert_eq!(expired(&mut w, t0 + 3 * S), Vec::<usize>::new());
        w.set_timeout(S);
        assert_eq!(w.next_deadline(), Some(t0 + S), "the wake-up comes earlier");
        // Accepted at 0 s and 1 s: over at 1 s and 2 s; the one of 2 s waits until 3 s.
        assert_eq!(expired(&mut w, t0 + 2 * S + S / 2), [0, 1]);
        assert_eq!(w.next_deadline(), Some(t0 + 3 * S));
        assert_eq!(expired(&mut w, t0 + 3 * S), [2]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn deadlines_stay_in_order_across_a_change() {
        // Accepted under 10 s, then the timeout drops to 1 s, then another is accepted: the
        // first is due at 1 s, the second at 6 s, in queue order (with deadlines fixed at
        // accept, the first would be due at 10 s and hold the second back past its 6 s).
        let t0 = Instant::now();
        let mut w = TokenWaits::new(10 * S);
        w.push(t0, 0, 0);
        w.set_timeout(S);
        w.push(t0 + 5 * S, 1, 0);
        assert_eq!(w.next_deadline(), Some(t0 + S));
        assert_eq!(expired(&mut w, t0 + 5 * S), [0]);
        assert_eq!(w.next_deadline(), Some(t0 + 6 * S));
        assert_eq!(expired(&mut w, t0 + 6 * S), [1]);
    }

    #[test]
    fn a_longer_timeout_lets_waiting_connections_wait_longer() {
        let t0 = Instant::now();
        let mut w = TokenWaits::new(S);
        w.push(t0, 7, 0);
        w.set_timeout(10 * S);
        assert_eq!(expired(&mut w, t0 + 5 * S), Vec::<usize>::new());
        assert_eq!(w.next_deadline(), Some(t0 + 10 * S));
        assert_eq!(expired(&mut w, t0 + 10 * S), [7]);
    }

    #[test]
    fn decided_connections_are_skipped_and_a_reused_slot_is_told_apart() {
        let t0 = Instant::now();
        let mut w = TokenWaits::new(S);
        w.push(t0, 0, 1);
        w.push(t0, 1, 2);
        // Slot 0 was decided and now holds a later connection (serial 3), queued behind.
        w.push(t0 + S, 0, 3);
        let waiting = |slot: usize, serial: u64| (slot, serial) != (0, 1);
        assert_eq!(w.pop_expired(t0 + S, waiting), Some(1));
        assert_eq!(
            w.pop_expired(t0 + S, waiting),
            None,
            "serial 3 waits until 2 s"
        );
        assert_eq!(w.pop_expired(t0 + 2 * S, waiting), Some(0));
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn an_accept_time_never_goes_back_and_a_huge_timeout_never_expires() {
        let t0 = Instant::now();
        let mut w = TokenWaits::new(S);
        w.push(t0 + S, 0, 0);
        w.push(t0, 1, 0);
        assert_eq!(expired(&mut w, t0 + S), Vec::<usize>::new());
        assert_eq!(expired(&mut w, t0 + 2 * S), [0, 1]);
        w.set_timeout(Duration::MAX);
        w.push(t0, 2, 0);
        assert_eq!(w.next_deadline(), None);
        assert_eq!(expired(&mut w, t0 + 1000 * S), Vec::<usize>::new());
    }
}

//! A worker's TCP side: connections accepted on a TCP data port wait for their first bytes
//! (the token, or proof there is none), are admitted like a first datagram, and then become
//! sessions whose client and backend connections are spliced in this worker.
//!
//! A waiting connection already holds a place under `maxSessions` and `maxSessionsPerIp`, so
//! a flood of silent connections is capped like a flood of sessions; the place passes to its
//! session. Until the decision a connection is read at most [`MAX_PREFIX`] bytes at a time:
//! whatever follows stays in the kernel's buffer until the splice reads it.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use slab::Slab;

use crate::ctl::{CloseReason, WorkerEvent};
use crate::io::fd_budget::FdLease;
use crate::io::socket::connect_upstream_tcp;
use crate::io::splice::{Pipe, Splice, SpliceError};
use crate::metrics::DropReason;
use crate::policy::admit::{self, Role};
use crate::policy::packet::Classified;
use crate::policy::prefix::{LineEnd, MAX_PREFIX, Prefix, read_prefix};
use crate::policy::proxy_protocol::{HeaderTransport, ProxyHeader, ProxyMode};
use crate::policy::session::{SessionId, SessionKey};

use super::admission::{Admission, Admitted};
use super::{
    FIRST_PENDING, IO_LOOP_BOUND, ListenerIo, Upstream, Worker, client_token, upstream_token,
};

/// Connections accepted per listener readiness event before other sockets get a turn.
const ACCEPT_BOUND: usize = 4 * IO_LOOP_BOUND;
/// After an accept failed for want of descriptors or memory, try that listener again this
/// much later.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Errors of `accept(2)` that say the process or system is out of something, not that one
/// queued connection is bad.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// TCP connections waiting for their first bytes or for their backend, and listeners whose
/// accept is to be retried.
#[derive(Debug)]
pub(super) struct PendingConnections {
    slab: Slab<Pending>,
    /// The connections of `slab` by accept time, against `tcpTokenTimeoutSeconds`.
    waits: TokenWaits,
    next_serial: u64,
    /// (deadline, session) of TCP sessions whose backend connection was started, in order.
    connecting: VecDeque<(Instant, SessionId)>,
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
            connecting: VecDeque::new(),
            accept_retries: Vec::new(),
        }
    }

    /// A live `tcpTokenTimeoutSeconds` change: it applies to the connections waiting now too.
    pub(super) fn set_token_timeout(&mut self, timeout: Duration) {
        self.waits.set_timeout(timeout);
    }

    /// How long until the next deadline: a token wait, a backend connect or an accept retry.
    pub(super) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let token = self.waits.next_deadline();
        let connect = self.connecting.front().map(|&(deadline, _)| deadline);
        let retry = self.accept_retries.iter().map(|&(at, _)| at).min();
        [token, connect, retry]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn retry_accept(&mut self, listener: usize, at: Instant) {
        if !self.accept_retries.iter().any(|&(_, l)| l == listener) {
            self.accept_retries.push((at, listener));
        }
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
pub(super) struct TokenWaits {
    timeout: Duration,
    /// (accepted, slot, serial); accept times never decrease front to back.
    queue: VecDeque<(Instant, usize, u64)>,
}

impl TokenWaits {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            queue: VecDeque::new(),
        }
    }

    pub(super) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Queues the connection in `slot` (`serial` tells it from a later one there), accepted at
    /// `accepted`: never before the last one queued (the worker's clock only moves forward; one
    /// that did not would be queued as accepted with the last).
    pub(super) fn push(&mut self, accepted: Instant, slot: usize, serial: u64) {
        let accepted = self
            .queue
            .back()
            .map_or(accepted, |&(last, ..)| accepted.max(last));
        self.queue.push_back((accepted, slot, serial));
    }

    /// When the front entry's wait ends. It may have been decided since: the wake-up is then
    /// early, never late. `None`: nothing waits, or not within `Instant`'s range.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let &(accepted, ..) = self.queue.front()?;
        accepted.checked_add(self.timeout)
    }

    /// The slot of the next connection whose wait is over at `now` and that still waits
    /// (`waiting(slot, serial)`); entries of connections decided since are dropped on the way.
    pub(super) fn pop_expired(
        &mut self,
        now: Instant,
        waiting: impl Fn(usize, u64) -> bool,
    ) -> Option<usize> {
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

#[derive(Debug)]
struct Pending {
    stream: TcpStream,
    /// Its descriptors, the backend connection's included.
    lease: FdLease,
    /// Canonical client address (IPv4 clients of a dual-stack socket as IPv4).
    client: SocketAddr,
    listener: usize,
    prefix: [u8; MAX_PREFIX],
    len: usize,
    /// Tells this connection from a later one in the same slot.
    serial: u64,
}

/// Why a waiting connection is being decided now.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Decide {
    /// Its first bytes said enough.
    Read,
    /// It closed its side before saying enough.
    Eof,
    /// `tcpTokenTimeoutSeconds` passed.
    Timeout,
}

/// What a connection sent before it had a session: it goes first to the backend.
#[derive(Clone, Copy, Debug)]
struct Sent<'a> {
    data: &'a [u8],
    /// How the token line's end was read.
    line_end: LineEnd,
    /// The client has closed its side.
    eof: bool,
}

impl Sent<'_> {
    /// Nothing: the connection was admitted at accept.
    const NOTHING: Sent<'static> = Sent {
        data: &[],
        line_end: LineEnd::Done,
        eof: false,
    };
}

impl Worker {
    /// Accepts what a TCP listener has queued.
    pub(super) fn accept_connections(&mut self, port: usize, now: Instant) {
        for _ in 0..ACCEPT_BOUND {
            let Some(ListenerIo::Tcp(listener)) = self.listeners.get(port).map(|l| l.io()) else {
                return;
            };
            // Both of the connection's descriptors (the client's and, once it has a session,
            // the backend's) come from the budget up front, so a session is never refused
            // half-way for want of the second.
            let lease = self.budget.try_take(2);
            match listener.accept() {
                Ok((stream, from)) => match lease {
                    Some(lease) => self.on_accepted(port, stream, lease, from, now),
                    None => self.refuse_over_budget(port, stream, from, now),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors or buffers: what is queued stays queued, and no new edge
                // may come for it; try again shortly instead of spinning.
                Err(e) if is_resource_error(&e) => {
                    if let Some(note) = self.out.warn(now) {
                        log::warn!(
                            "worker {}: accept on listener {port}: {e}{note}",
                            self.out.id()
                        );
                    }
                    self.pending_tcp.retry_accept(port, now + ACCEPT_RETRY);
                    return;
                }
                // One connection failed while queued (reset, aborted): the next may be fine.
                Err(e) => log::debug!("worker {}: accept on listener {port}: {e}", self.out.id()),
            }
        }
        self.pending_ports.push(port);
    }

    /// A connection accepted with the descriptor budget spent: closed at once and counted
    /// (its descriptor came out of the control thread's reserve for that moment only), rather
    /// than left to wait in the backlog for a budget that may not come back soon.
    fn refuse_over_budget(
        &mut self,
        port: usize,
        stream: TcpStream,
        from: SocketAddr,
        now: Instant,
    ) {
        drop(stream);
        self.out.counters().tcp_accepted.add(1);
        self.out.counters().refuse(DropReason::UpstreamSetup);
        self.listeners.count(port, DropReason::UpstreamSetup);
        if let Some(note) = self.out.warn(now) {
            log::warn!(
                "{from}: connection refused: the data plane's descriptor budget is spent \
                 ({} of {} held){note}",
                self.budget.held(),
                self.budget.allowed()
            );
        }
    }

    fn on_accepted(
        &mut self,
        port: usize,
        mut stream: TcpStream,
        lease: FdLease,
        from: SocketAddr,
        now: Instant,
    ) {
        self.out.counters().tcp_accepted.add(1);
        let client = SocketAddr::new(from.ip().to_canonical(), from.port());
        if !self.admission.admit_packet(client.ip(), now) {
            self.out.counters().refuse(DropReason::RateLimited);
            self.listeners.count(port, DropReason::RateLimited);
            return;
        }
        let ctx = self.admission.context(port, &self.listeners);
        if ctx.closed {
            self.out.counters().refuse(DropReason::Draining);
            return;
        }
        if let Err(reason) = self.sessions.limits().try_acquire(client.ip()) {
            self.out.counters().refuse(reason);
            self.listeners.count(port, reason);
            return;
        }
        let _ = stream.set_nodelay(true);
        if !matches!(ctx.listener, Role::TokenPort) {
            // Nothing to read first: a forwarder's connection is its own at once, and a route
            // entry point's picks its endpoint by the same rules as a UDP client.
            let decision = self.admission.decide(
                Classified::Payload,
                port,
                client.ip(),
                &self.listeners,
                &self.out,
                now,
            );
            match Admission::resolve(decision, port, client, &mut self.listeners) {
                Ok(admitted) => {
                    self.open_tcp_session(
                        stream,
                        lease,
                        client,
                        port,
                        &admitted,
                        Sent::NOTHING,
                        false,
                        now,
                    );
                }
                Err(reason) => {
                    self.sessions.limits().release(client.ip());
                    self.out.counters().refuse(reason);
                    self.listeners.count(port, reason);
                }
            }
            return;
        }
        let slot = self.pending_tcp.slab.vacant_key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(FIRST_PENDING + slot),
            Interest::READABLE,
        ) {
            log::debug!("{client}: cannot register the connection: {e}");
            self.sessions.limits().release(client.ip());
            self.out.counters().refuse(DropReason::UpstreamSetup);
            return;
        }
        let pending = &mut self.pending_tcp;
        pending.next_serial += 1;
        let serial = pending.next_serial;
        pending.slab.insert(Pending {
            stream,
            lease,
            client,
            listener: port,
            prefix: [0; MAX_PREFIX],
            len: 0,
            serial,
        });
        pending.waits.push(now, slot, serial);
        // Bytes that came with the handshake are readable now.
        self.on_pending(slot, now);
    }

    /// Reads a waiting connection's first bytes; decides once they say enough.
    pub(super) fn on_pending(&mut self, slot: usize, now: Instant) {
        let Some(p) = self.pending_tcp.slab.get_mut(slot) else {
            return;
        };
        let why = loop {
            if p.len == MAX_PREFIX {
                break Decide::Read;
            }
            match (&p.stream).read(&mut p.prefix[p.len..]) {
                Ok(0) => break Decide::Eof,
                Ok(n) => {
                    p.len += n;
                    if read_prefix(&p.prefix[..p.len]) != Prefix::NeedMore {
                        break Decide::Read;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: connection failed before its token: {e}", p.client);
                    self.drop_pending(slot);
                    self.out.counters().refuse(DropReason::NoSession);
                    return;
                }
            }
        };
        self.decide(slot, why, now);
    }

    /// Ends the wait of connections whose `tcpTokenTimeoutSeconds` has passed, gives up backend
    /// connections past `tcp_connect_timeout`, and retries deferred accepts.
    pub(super) fn expire_pending(&mut self, now: Instant) {
        loop {
            let pending = &mut self.pending_tcp;
            let slab = &pending.slab;
            let Some(slot) = pending.waits.pop_expired(now, |slot, serial| {
                slab.get(slot).is_some_and(|p| p.serial == serial)
            }) else {
                break;
            };
            self.decide(slot, Decide::Timeout, now);
        }
        while let Some(&(deadline, id)) = self.pending_tcp.connecting.front() {
            let connecting = self
                .sessions
                .get_mut(id)
                .is_some_and(|s| matches!(&s.upstream, Upstream::Tcp(splice) if !splice.connected));
            if connecting && deadline > now {
                break;
            }
            self.pending_tcp.connecting.pop_front();
            if connecting {
                self.connect_failed(id, "timed out", now);
            }
        }
        if self
            .pending_tcp
            .accept_retries
            .iter()
            .any(|&(at, _)| at <= now)
        {
            let (due, later): (Vec<_>, Vec<_>) = self
                .pending_tcp
                .accept_retries
                .drain(..)
                .partition(|&(at, _)| at <= now);
            self.pending_tcp.accept_retries = later;
            for (_, listener) in due {
                self.accept_connections(listener, now);
            }
        }
    }

    /// Admits a waiting connection like a first datagram: a redeemable token opens a session
    /// to its grant's target (the token consumed), anything else goes to the default backend
    /// with every byte read so far, or the connection is closed and counted.
    fn decide(&mut self, slot: usize, why: Decide, now: Instant) {
        let Some(p) = self.pending_tcp.slab.try_remove(slot) else {
            return;
        };
        if why == Decide::Eof && p.len == 0 {
            // Connected and closed without a byte (a port scan, a health check): nothing to
            // forward, so no backend connection either.
            self.out.counters().refuse(DropReason::NoSession);
            self.abandon_connection(p.stream, None, p.client);
            return;
        }
        let port = p.listener;
        let bytes = &p.prefix[..p.len];
        let (first, data_from, line_end) = match read_prefix(bytes) {
            Prefix::Token {
                token,
                data_from,
                line_end,
            } => (Classified::Token(token), data_from, line_end),
            Prefix::NotToken | Prefix::NeedMore => (Classified::Payload, 0, LineEnd::Done),
        };
        let decision =
            self.admission
                .decide(first, port, p.client.ip(), &self.listeners, &self.out, now);
        if matches!(decision, admit::Admission::Route) {
            // Waiting connections are on token ports only; an entry point admits at accept.
            self.out.counters().refuse(DropReason::NoRoute);
            self.abandon_connection(p.stream, None, p.client);
            return;
        }
        match Admission::resolve(decision, port, p.client, &mut self.listeners) {
            Ok(admitted) => {
                // A token's line is not forwarded; anything else is the client's traffic.
                let (data, line_end) = match admitted.grant {
                    Some(_) => (&bytes[data_from..], line_end),
                    None => (bytes, LineEnd::Done),
                };
                let sent = Sent {
                    data,
                    line_end,
                    eof: why == Decide::Eof,
                };
                self.open_tcp_session(
                    p.stream, p.lease, p.client, port, &admitted, sent, true, now,
                );
            }
            Err(reason) => {
                let reason = if why == Decide::Timeout && reason == DropReason::NoSession {
                    DropReason::TokenTimeout
                } else {
                    reason
                };
                self.out.counters().refuse(reason);
                self.abandon_connection(p.stream, None, p.client);
            }
        }
    }

    /// Connects to the backend and makes the session. The token is spent once the backend
    /// socket exists, as on UDP.
    /// `registered`: the client connection is in the poll already (it waited for its first
    /// bytes) and moves to the session's token; otherwise it is registered now. True when
    /// the session was made.
    #[allow(clippy::too_many_arguments)]
    fn open_tcp_session(
        &mut self,
        mut client_stream: TcpStream,
        lease: FdLease,
        client: SocketAddr,
        port: usize,
        admitted: &Admitted,
        sent: Sent<'_>,
        registered: bool,
        now: Instant,
    ) -> bool {
        if !self.admission.admit_session(client.ip(), now) {
            self.out.counters().refuse(DropReason::RateLimited);
            self.listeners.count(port, DropReason::RateLimited);
            self.abandon_connection(client_stream, None, client);
            return false;
        }
        let key = SessionKey {
            client,
            port: port as u16,
        };
        if self.sessions.find(&key).is_some() {
            // The same client address and port reached this port on another local address.
            self.out.counters().refuse(DropReason::NoSession);
            self.abandon_connection(client_stream, None, client);
            return false;
        }
        let target = admitted.target;
        let slot = self.sessions.next_slot();
        let registry = self.poll.registry();
        let upstream = connect_upstream_tcp(target).and_then(|mut upstream| {
            registry
                .register(
                    &mut upstream,
                    upstream_token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map(|()| upstream)
        });
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(e) => {
                if let Some(note) = self.out.warn(now) {
                    log::warn!("{client}: cannot connect to {target}: {e}{note}");
                }
                self.out.counters().refuse(DropReason::UpstreamSetup);
                self.listeners.count(port, DropReason::UpstreamSetup);
                self.abandon_connection(client_stream, None, client);
                return false;
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registry = self.poll.registry();
        let moved = if registered {
            registry.reregister(&mut client_stream, client_token(slot), interest)
        } else {
            registry.register(&mut client_stream, client_token(slot), interest)
        };
        if let Err(e) = moved {
            log::debug!("{client}: cannot register the connection: {e}");
            self.out.counters().refuse(DropReason::UpstreamSetup);
            self.abandon_connection(client_stream, Some(upstream), client);
            return false;
        }
        // Spent last, once nothing is left that can fail synchronously. A backend that then
        // refuses the connection has the token spent, as on UDP: the player queries again.
        if let Some(grant) = &admitted.grant {
            if let Err(reason) = grant.redeem(port, client.ip(), now) {
                // Another worker (or this port's UDP twin) redeemed it in the meantime.
                self.out.counters().reject(reason);
                self.out.counters().refuse(DropReason::TokenRejected);
                self.abandon_connection(client_stream, Some(upstream), client);
                return false;
            }
            self.out.counters().tokens_redeemed.add(1);
        }
        // The connection's own local address is the exact address the client connected to,
        // wildcard bind or not.
        let header = match admitted.proxy {
            ProxyMode::None => None,
            _ => client_stream
                .local_addr()
                .ok()
                .map(|local| ProxyHeader::new(HeaderTransport::Stream, client, local)),
        };
        let splice = Splice {
            client: client_stream,
            upstream,
            _lease: lease,
            connected: false,
            up: match header {
                // The header first, then whatever the client sent with its token.
                Some(header) => {
                    let mut first = header.as_bytes().to_vec();
                    first.extend_from_slice(sent.data);
                    Pipe::with_data(&first, sent.line_end, sent.eof)
                }
                None => Pipe::with_data(sent.data, sent.line_end, sent.eof),
            },
            down: Pipe::default(),
        };
        let id = self.sessions.install(
            admitted.session(key, client, None),
            Upstream::Tcp(Box::new(splice)),
            &mut self.listeners,
            &self.out,
            now,
        );
        admitted.opened();
        self.out.report(
            admitted.kind,
            WorkerEvent::SessionOpened {
                backend: admitted.backend,
                kind: admitted.kind,
                token: admitted.grant.as_ref().map(|g| g.token),
            },
        );
        self.pending_tcp
            .connecting
            .push_back((now + self.tcp_connect_timeout, id));
        self.drive_tcp(id, now);
        true
    }

    /// Closes a connection that gets no session, and gives back its place under the caps.
    fn abandon_connection(
        &self,
        mut client_stream: TcpStream,
        upstream: Option<TcpStream>,
        client: SocketAddr,
    ) {
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut client_stream);
        if let Some(mut upstream) = upstream {
            let _ = registry.deregister(&mut upstream);
        }
        self.sessions.limits().release(client.ip());
    }

    /// Moves what can move on a TCP session, both ways; ends it when both directions have
    /// finished, or either connection failed.
    pub(super) fn drive_tcp(&mut self, id: SessionId, now: Instant) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let Upstream::Tcp(splice) = &mut session.upstream else {
            return;
        };
        match splice.drive() {
            Ok(driven) => {
                if driven.up + driven.down > 0 {
                    session.last_active = now;
                    session.stats.bytes_upstream += driven.up as u64;
                    session.stats.bytes_downstream += driven.down as u64;
                    let c = self.out.counters();
                    c.tcp_bytes_upstream.add(driven.up as u64);
                    c.tcp_bytes_downstream.add(driven.down as u64);
                    if let Some(slot) = self.listeners.slot(usize::from(session.key.port)) {
                        slot.bytes_upstream.add(driven.up as u64);
                        slot.bytes_downstream.add(driven.down as u64);
                    }
                }
                if driven.finished {
                    log::debug!(
                        "{}: connection to {} ended",
                        session.key.client,
                        session.target
                    );
                    self.close_session(id, CloseReason::ConnectionEnded);
                } else if driven.again {
                    self.pending_sessions.push(id);
                }
            }
            Err(SpliceError::Connect(e)) => self.connect_failed(id, &e.to_string(), now),
            Err(SpliceError::Io(e)) => {
                log::debug!(
                    "{}: connection to {} failed: {e}",
                    session.key.client,
                    session.target
                );
                self.close_session(id, CloseReason::ConnectionEnded);
            }
        }
    }

    /// A TCP session whose backend connection failed: the client is closed, and it counts.
    fn connect_failed(&mut self, id: SessionId, why: &str, now: Instant) {
        if let Some(session) = self.sessions.get_mut(id)
            && let Some(note) = self.out.warn(now)
        {
            log::warn!(
                "{}: cannot connect to {}: {why}{note}",
                session.key.client,
                session.target
            );
        }
        self.out.counters().refuse(DropReason::UpstreamConnect);
        if let Some(port) = self.sessions.get_mut(id).map(|s| usize::from(s.key.port)) {
            self.listeners.count(port, DropReason::UpstreamConnect);
        }
        self.close_session(id, CloseReason::UpstreamFailed);
    }

    fn drop_pending(&mut self, slot: usize) {
        if let Some(p) = self.pending_tcp.slab.try_remove(slot) {
            self.abandon_connection(p.stream, None, p.client);
        }
    }

    /// Closes the waiting connections of a listener that is closed.
    pub(super) fn close_pending_on(&mut self, listener: usize) {
        let doomed: Vec<usize> = self
            .pending_tcp
            .slab
            .iter()
            .filter(|(_, p)| p.listener == listener)
            .map(|(slot, _)| slot)
            .collect();
        for slot in doomed {
            self.drop_pending(slot);
        }
    }

    /// Closes every waiting connection (shutdown).
    pub(super) fn close_pending_all(&mut self) {
        let slots: Vec<usize> = self.pending_tcp.slab.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.drop_pending(slot);
        }
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

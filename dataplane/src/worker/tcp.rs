//! A worker's TCP path: connections accepted on a TCP listener are admitted like a first
//! datagram (a forwarder's or route entry point's at once, a token port's once its first bytes
//! say enough: see `pending.rs`), and then become sessions whose client and backend
//! connections are spliced in this worker. It owns the waiting connections, the backend
//! connects under way with their timeouts, and the TCP sockets that hit their work bound.
//!
//! It decides no admission itself (that is `admission.rs`) and keeps no session table: a
//! session lives in `sessions.rs`, and this path only drives its splice.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry};

use crate::config::DataPlaneConfig;
use crate::ctl::CloseReason;
use crate::io::fd_budget::FdBudget;
use crate::io::pipe::PipePool;
use crate::io::socket::connect_upstream_tcp;
use crate::io::splice::{Ready, Splice, SpliceError};
use crate::metrics::DropReason;
use crate::policy::admit::{self, Role};
use crate::policy::limits::SessionLimits;
use crate::policy::packet::Classified;
use crate::policy::prefix::{LineEnd, Prefix, read_prefix};
use crate::policy::proxy_protocol::{HeaderTransport, ProxyHeader, ProxyMode};
use crate::policy::session::{SessionId, SessionKey};

use super::admission::{Admission, Admitted};
use super::listeners::ListenerIo;
use super::pending::{Accepted, Decide, PendingConnections, Waiting};
use super::sessions::Upstream;
use super::{IO_LOOP_BOUND, Parts, client_token, upstream_token};

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

/// This worker's TCP connections on their way to a session, and its sessions' connects.
#[derive(Debug)]
pub(super) struct Tcp {
    /// Connections waiting for their first bytes, and accepts to retry.
    pending: PendingConnections,
    /// (deadline, session) of TCP sessions whose backend connection was started, in order.
    connecting: VecDeque<(Instant, SessionId)>,
    connect_timeout: Duration,
    /// The data plane's descriptors, which TCP connections take from.
    budget: Arc<FdBudget>,
    /// Empty kernel pipes, which the splices' reads take and give back.
    pipes: PipePool,
    /// Listeners that hit [`ACCEPT_BOUND`]: another turn next time round the loop.
    ports_again: Vec<usize>,
    /// Sessions whose splice hit its work bound: another turn next time round the loop.
    sessions_again: Vec<SessionId>,
}

impl Tcp {
    /// Nothing accepted yet.
    pub(super) fn new(config: &DataPlaneConfig, budget: Arc<FdBudget>) -> Self {
        Self {
            pending: PendingConnections::new(config.tcp_token_timeout),
            connecting: VecDeque::new(),
            connect_timeout: config.tcp_connect_timeout,
            pipes: PipePool::new(Arc::clone(&budget)),
            budget,
            ports_again: Vec::new(),
            sessions_again: Vec::new(),
        }
    }

    /// A live `tcpTokenTimeoutSeconds` change: it applies to the connections waiting now too.
    pub(super) fn set_token_timeout(&mut self, timeout: Duration) {
        self.pending.set_token_timeout(timeout);
    }

    /// How long until the next deadline: a token wait, a backend connect or an accept retry.
    pub(super) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let connect = self.connecting.front().map(|&(deadline, _)| deadline);
        self.pending
            .next_deadline()
            .into_iter()
            .chain(connect)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Whether a socket hit its work bound and waits for another turn.
    pub(super) fn has_backlog(&self) -> bool {
        !self.ports_again.is_empty() || !self.sessions_again.is_empty()
    }

    /// The listeners that hit the accept bound, taken out for another turn.
    pub(super) fn take_ports_again(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.ports_again)
    }

    /// The sessions whose splice hit its work bound, taken out for another turn.
    pub(super) fn take_sessions_again(&mut self) -> Vec<SessionId> {
        std::mem::take(&mut self.sessions_again)
    }

    /// Accepts what TCP listener `port` has queued.
    pub(super) fn accept(&mut self, p: &mut Parts<'_>, port: usize, now: Instant) {
        for _ in 0..ACCEPT_BOUND {
            let Some(ListenerIo::Tcp(listener)) = p.listeners.get(port).map(|l| l.io()) else {
                return;
            };
            match listener.accept() {
                // Both of the connection's descriptors (the client's and, once it has a
                // session, the backend's) come from the budget at once, so a session is never
                // refused half-way for want of the second.
                Ok((stream, from)) => match self.budget.try_take(2) {
                    Some(lease) => {
                        let conn = Accepted {
                            stream,
                            lease,
                            client: SocketAddr::new(from.ip().to_canonical(), from.port()),
                            listener: port,
                        };
                        self.on_accepted(p, conn, now);
                    }
                    None => self.refuse_over_budget(p, port, stream, from, now),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors or buffers: what is queued stays queued, and no new edge
                // may come for it; try again shortly instead of spinning.
                Err(e) if is_resource_error(&e) => {
                    if let Some(note) = p.out.warn(now) {
                        log::warn!(
                            "worker {}: accept on listener {port}: {e}{note}",
                            p.out.id()
                        );
                    }
                    self.pending.retry_accept(port, now + ACCEPT_RETRY);
                    return;
                }
                // One connection failed while queued (reset, aborted): the next may be fine.
                Err(e) => log::debug!("worker {}: accept on listener {port}: {e}", p.out.id()),
            }
        }
        self.ports_again.push(port);
    }

    /// A connection accepted with the descriptor budget spent: closed at once and counted
    /// (its descriptor came out of the control thread's reserve for that moment only), rather
    /// than left to wait in the backlog for a budget that may not come back soon.
    fn refuse_over_budget(
        &self,
        p: &mut Parts<'_>,
        port: usize,
        stream: TcpStream,
        from: SocketAddr,
        now: Instant,
    ) {
        drop(stream);
        // Idle pipes hold descriptors too: give them back for connections.
        self.pipes.clear();
        p.out.counters().tcp_accepted.add(1);
        p.out.counters().refuse(DropReason::UpstreamSetup);
        p.listeners.count(port, DropReason::UpstreamSetup);
        if let Some(note) = p.out.warn(now) {
            log::warn!(
                "{from}: connection refused: the data plane's descriptor budget is spent \
                 ({} of {} held){note}",
                self.budget.held(),
                self.budget.allowed()
            );
        }
    }

    /// A new connection: refused at once (flood limit, closed listener, session caps),
    /// admitted at once (a forwarder or route entry point), or left to wait for its first
    /// bytes (a token port).
    fn on_accepted(&mut self, p: &mut Parts<'_>, conn: Accepted, now: Instant) {
        let (client, port) = (conn.client, conn.listener);
        p.out.counters().tcp_accepted.add(1);
        if !p.admission.admit_packet(client.ip(), now) {
            p.out.counters().refuse(DropReason::RateLimited);
            p.listeners.count(port, DropReason::RateLimited);
            return;
        }
        let ctx = p.admission.context(port, p.listeners);
        if ctx.closed {
            p.out.counters().refuse(DropReason::Draining);
            return;
        }
        if let Err(reason) = p.sessions.limits().try_acquire(client.ip()) {
            p.out.counters().refuse(reason);
            p.listeners.count(port, reason);
            return;
        }
        if !matches!(ctx.listener, Role::TokenPort) {
            // Nothing to read first: a forwarder's connection is its own at once, and a route
            // entry point's picks its endpoint by the same rules as a UDP client.
            let decision = p.admission.decide(
                Classified::Payload,
                port,
                client.ip(),
                p.listeners,
                p.out,
                now,
            );
            match Admission::resolve(decision, port, client, p.listeners) {
                Ok(admitted) => self.open(p, conn, false, &admitted, Sent::NOTHING, now),
                Err(reason) => {
                    p.sessions.limits().release(client.ip());
                    p.out.counters().refuse(reason);
                    p.listeners.count(port, reason);
                }
            }
            return;
        }
        match self.pending.add(p.registry, conn, now) {
            // Bytes that came with the handshake are readable now.
            Ok(slot) => self.on_pending(p, slot, now),
            Err(e) => {
                log::debug!("{client}: cannot register the connection: {e}");
                p.sessions.limits().release(client.ip());
                p.out.counters().refuse(DropReason::UpstreamSetup);
            }
        }
    }

    /// Reads a waiting connection's first bytes; decides once they say enough.
    pub(super) fn on_pending(&mut self, p: &mut Parts<'_>, slot: usize, now: Instant) {
        if let Some((waiting, why)) = self.pending.read(slot) {
            self.decide(p, waiting, why, now);
        }
    }

    /// Ends the wait of connections whose `tcpTokenTimeoutSeconds` has passed, gives up backend
    /// connections past `tcp_connect_timeout`, and retries deferred accepts.
    pub(super) fn expire(&mut self, p: &mut Parts<'_>, now: Instant) {
        while let Some(waiting) = self.pending.pop_expired(now) {
            self.decide(p, waiting, Decide::Timeout, now);
        }
        while let Some(&(deadline, id)) = self.connecting.front() {
            let connecting = p
                .sessions
                .get(id)
                .is_some_and(|s| matches!(&s.upstream, Upstream::Tcp(splice) if !splice.connected));
            if connecting && deadline > now {
                break;
            }
            self.connecting.pop_front();
            if connecting {
                connect_failed(p, id, "timed out", now);
            }
        }
        for listener in self.pending.due_retries(now) {
            self.accept(p, listener, now);
        }
    }

    /// Admits a waiting connection like a first datagram: a redeemable token opens a session
    /// to its grant's target (the token consumed), anything else goes to the default backend
    /// with every byte read so far, or the connection is closed and counted.
    fn decide(&mut self, p: &mut Parts<'_>, waiting: Waiting, why: Decide, now: Instant) {
        let Waiting {
            conn, prefix, len, ..
        } = waiting;
        let (port, client) = (conn.listener, conn.client);
        if why == Decide::Failed || (why == Decide::Eof && len == 0) {
            // Reset, or connected and closed without a byte (a port scan, a health check):
            // nothing to forward, so no backend connection either.
            p.out.counters().refuse(DropReason::NoSession);
            abandon(p, conn.stream, None, client);
            return;
        }
        let bytes = &prefix[..len];
        let (first, data_from, line_end) = match read_prefix(bytes) {
            Prefix::Token {
                token,
                data_from,
                line_end,
            } => (Classified::Token(token), data_from, line_end),
            Prefix::NotToken | Prefix::NeedMore => (Classified::Payload, 0, LineEnd::Done),
        };
        let decision = p
            .admission
            .decide(first, port, client.ip(), p.listeners, p.out, now);
        if matches!(decision, admit::Admission::Route) {
            // Waiting connections are on token ports only; an entry point admits at accept.
            p.out.counters().refuse(DropReason::NoRoute);
            abandon(p, conn.stream, None, client);
            return;
        }
        match Admission::resolve(decision, port, client, p.listeners) {
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
                self.open(p, conn, true, &admitted, sent, now);
            }
            Err(reason) => {
                let reason = if why == Decide::Timeout && reason == DropReason::NoSession {
                    DropReason::TokenTimeout
                } else {
                    reason
                };
                p.out.counters().refuse(reason);
                abandon(p, conn.stream, None, client);
            }
        }
    }

    /// Connects to the backend and makes the session. The token is spent once the backend
    /// socket exists, as on UDP.
    /// `registered`: the client connection is in the poll already (it waited for its first
    /// bytes) and moves to the session's token; otherwise it is registered now.
    fn open(
        &mut self,
        p: &mut Parts<'_>,
        conn: Accepted,
        registered: bool,
        admitted: &Admitted,
        sent: Sent<'_>,
        now: Instant,
    ) {
        let Accepted {
            stream: mut client_stream,
            lease,
            client,
            listener: port,
        } = conn;
        if !p.admission.admit_session(client.ip(), now) {
            p.out.counters().refuse(DropReason::RateLimited);
            p.listeners.count(port, DropReason::RateLimited);
            abandon(p, client_stream, None, client);
            return;
        }
        let key = SessionKey {
            client,
            port: port as u16,
        };
        if p.sessions.find(&key).is_some() {
            // The same client address and port reached this port on another local address.
            p.out.counters().refuse(DropReason::NoSession);
            abandon(p, client_stream, None, client);
            return;
        }
        let target = admitted.target;
        let slot = p.sessions.next_slot();
        let upstream = connect_upstream_tcp(target).and_then(|mut upstream| {
            p.registry
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
                if let Some(note) = p.out.warn(now) {
                    log::warn!("{client}: cannot connect to {target}: {e}{note}");
                }
                p.out.counters().refuse(DropReason::UpstreamSetup);
                p.listeners.count(port, DropReason::UpstreamSetup);
                abandon(p, client_stream, None, client);
                return;
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        let moved = if registered {
            p.registry
                .reregister(&mut client_stream, client_token(slot), interest)
        } else {
            p.registry
                .register(&mut client_stream, client_token(slot), interest)
        };
        if let Err(e) = moved {
            log::debug!("{client}: cannot register the connection: {e}");
            p.out.counters().refuse(DropReason::UpstreamSetup);
            abandon(p, client_stream, Some(upstream), client);
            return;
        }
        // Spent last, once nothing is left that can fail synchronously. A backend that then
        // refuses the connection has the token spent, as on UDP: the player queries again.
        if let Some(grant) = &admitted.grant {
            if let Err(reason) = grant.redeem(port, client.ip(), now) {
                // Another worker (or this port's UDP twin) redeemed it in the meantime.
                p.out.counters().reject(reason);
                p.out.counters().refuse(DropReason::TokenRejected);
                abandon(p, client_stream, Some(upstream), client);
                return;
            }
            p.out.counters().tokens_redeemed.add(1);
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
        let splice = match header {
            // The header first, then whatever the client sent with its token.
            Some(header) => {
                let mut first = header.as_bytes().to_vec();
                first.extend_from_slice(sent.data);
                Splice::new(
                    client_stream,
                    upstream,
                    lease,
                    &first,
                    sent.line_end,
                    sent.eof,
                    &self.pipes,
                )
            }
            None => Splice::new(
                client_stream,
                upstream,
                lease,
                sent.data,
                sent.line_end,
                sent.eof,
                &self.pipes,
            ),
        };
        let id = p.sessions.install(
            admitted.session(key, client, None),
            Upstream::Tcp(Box::new(splice)),
            p.listeners,
            p.out,
            now,
        );
        admitted.opened(p.out);
        self.connecting.push_back((now + self.connect_timeout, id));
        self.drive(p, id, Ready::NO_EDGE, now);
    }

    /// `event` on one of a TCP session's connections, `offset` its token's place after the
    /// first session token (`2 * slot` the backend's, `2 * slot + 1` the client's): moves
    /// what its edges unblock.
    pub(super) fn on_session_event(
        &mut self,
        p: &mut Parts<'_>,
        offset: usize,
        event: &mio::event::Event,
        now: Instant,
    ) {
        let Some(id) = p.sessions.by_slot(offset / 2) else {
            return; // closed earlier in this turn
        };
        self.drive(p, id, Ready::of(event, offset % 2 == 1), now);
    }

    /// Another turn for the TCP session in slab slot `slot`, which hit its work bound.
    pub(super) fn drain_session(&mut self, p: &mut Parts<'_>, slot: usize, now: Instant) {
        let Some(id) = p.sessions.by_slot(slot) else {
            return; // closed earlier in this turn
        };
        self.drive(p, id, Ready::NO_EDGE, now);
    }

    /// Moves what can move on a TCP session, given the edges `ready` brings; ends it when
    /// both directions have finished, or either connection failed.
    fn drive(&mut self, p: &mut Parts<'_>, id: SessionId, ready: Ready, now: Instant) {
        let Some(session) = p.sessions.get_mut(id) else {
            return;
        };
        let Upstream::Tcp(splice) = &mut session.upstream else {
            return;
        };
        match splice.drive(ready) {
            Ok(driven) => {
                if driven.up + driven.down > 0 {
                    session.last_active = now;
                    session.stats.bytes_upstream += driven.up as u64;
                    session.stats.bytes_downstream += driven.down as u64;
                    let c = p.out.counters();
                    c.tcp_bytes_upstream.add(driven.up as u64);
                    c.tcp_bytes_downstream.add(driven.down as u64);
                    if let Some(slot) = p.listeners.slot(usize::from(session.key.port)) {
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
                    close(p, id, CloseReason::ConnectionEnded);
                } else if driven.again {
                    self.sessions_again.push(id);
                }
            }
            Err(SpliceError::Connect(e)) => connect_failed(p, id, &e.to_string(), now),
            Err(SpliceError::Io(e)) => {
                log::debug!(
                    "{}: connection to {} failed: {e}",
                    session.key.client,
                    session.target
                );
                close(p, id, CloseReason::ConnectionEnded);
            }
        }
    }

    /// Closes the waiting connections of a listener that is closed.
    pub(super) fn close_pending_on(
        &mut self,
        listener: usize,
        registry: &Registry,
        limits: &SessionLimits,
    ) {
        for waiting in self.pending.take_on(listener) {
            release(
                registry,
                limits,
                waiting.conn.stream,
                None,
                waiting.conn.client,
            );
        }
    }

    /// Closes every waiting connection (shutdown).
    pub(super) fn close_pending_all(&mut self, registry: &Registry, limits: &SessionLimits) {
        for waiting in self.pending.take_all() {
            release(
                registry,
                limits,
                waiting.conn.stream,
                None,
                waiting.conn.client,
            );
        }
    }
}

/// A TCP session whose backend connection failed: the client is closed, and it counts.
fn connect_failed(p: &mut Parts<'_>, id: SessionId, why: &str, now: Instant) {
    if let Some(session) = p.sessions.get(id)
        && let Some(note) = p.out.warn(now)
    {
        log::warn!(
            "{}: cannot connect to {}: {why}{note}",
            session.key.client,
            session.target
        );
    }
    p.out.counters().refuse(DropReason::UpstreamConnect);
    if let Some(port) = p.sessions.get(id).map(|s| usize::from(s.key.port)) {
        p.listeners.count(port, DropReason::UpstreamConnect);
    }
    close(p, id, CloseReason::UpstreamFailed);
}

fn close(p: &mut Parts<'_>, id: SessionId, reason: CloseReason) {
    p.sessions.close(id, reason, p.listeners, p.registry, p.out);
}

/// Closes a connection that gets no session, and gives back its place under the caps.
fn abandon(
    p: &Parts<'_>,
    client_stream: TcpStream,
    upstream: Option<TcpStream>,
    client: SocketAddr,
) {
    release(
        p.registry,
        p.sessions.limits(),
        client_stream,
        upstream,
        client,
    );
}

fn release(
    registry: &Registry,
    limits: &SessionLimits,
    mut client_stream: TcpStream,
    upstream: Option<TcpStream>,
    client: SocketAddr,
) {
    let _ = registry.deregister(&mut client_stream);
    if let Some(mut upstream) = upstream {
        let _ = registry.deregister(&mut upstream);
    }
    limits.release(client.ip());
}

//! One data-plane worker: a `mio` event loop owning a socket on every data port and a shard of
//! sessions. It handles control messages, client datagrams, backend replies and idle expiry, and
//! never blocks on anything but `epoll_wait`.
//!
//! Per datagram the worker does one session lookup and one syscall (`send` upstream, or a share of
//! a `recvmmsg`/`sendmmsg` batch); everything else (socket setup, address encoding, counting
//! toward limits) happens once per session.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use crossbeam_utils::CachePadded;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::batch::{BATCH, RecvBatch, SendQueue};
use crate::config::DataPlaneConfig;
use crate::ctl::{ClientMatch, CloseReason, ControlMsg, SessionInfo, WorkerEvent};
use crate::error::WorkerError;
use crate::grant::{Backend, BackendId, Grant, TokenId};
use crate::limits::SessionLimits;
use crate::metrics::{DropReason, TokenRejectReason, WorkerCounters};
use crate::packet::{Classified, classify, control_body, parse_token};
use crate::session::{Session, SessionId, SessionKey, SessionKind, SessionStats, SessionTable};
use crate::socket::connect_upstream_udp;
use crate::warn_gate::WarnGate;

const WAKER: Token = Token(0);
const FIRST_PORT: usize = 1;
/// Data ports per data plane; their tokens sit between the waker and the sessions.
pub(crate) const MAX_DATA_PORTS: usize = 64;
const FIRST_SESSION: usize = FIRST_PORT + MAX_DATA_PORTS;
/// Batches read from one socket per readiness event before other sockets get a turn.
const IO_LOOP_BOUND: usize = 16;
/// How often spent grants are dropped from the worker's table.
const GRANT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const EVENTS_CAPACITY: usize = 1024;

type UpstreamSocket = mio::net::UdpSocket;

struct DataPort {
    socket: mio::net::UdpSocket,
    replies: SendQueue,
}

/// Everything [`Worker::new`] needs.
pub(crate) struct WorkerSetup<'a> {
    pub(crate) id: usize,
    pub(crate) config: &'a DataPlaneConfig,
    pub(crate) sockets: Vec<UdpSocket>,
    pub(crate) control: Receiver<ControlMsg>,
    pub(crate) events: Sender<WorkerEvent>,
    pub(crate) counters: Arc<[CachePadded<WorkerCounters>]>,
    pub(crate) limits: Arc<SessionLimits>,
}

pub(crate) struct Worker {
    id: usize,
    poll: Poll,
    control: Receiver<ControlMsg>,
    events: Sender<WorkerEvent>,
    counters: Arc<[CachePadded<WorkerCounters>]>,
    limits: Arc<SessionLimits>,
    ports: Vec<DataPort>,
    /// Taken out while a batch is processed, so handlers can borrow the rest of `self`.
    rx: Option<Box<RecvBatch>>,
    sessions: SessionTable<UpstreamSocket>,
    grants: AHashMap<TokenId, Arc<Grant>>,
    default_backend: Option<Arc<Backend>>,
    control_magic: Box<[u8]>,
    batch_io: bool,
    busy_poll: Duration,
    /// Rate limit of client-triggered warnings.
    warn_gate: WarnGate,
    draining: bool,
    shutting_down: bool,
    /// Sockets left with unread datagrams after hitting `IO_LOOP_BOUND`.
    pending_ports: Vec<usize>,
    pending_sessions: Vec<SessionId>,
    expired: Vec<Session<UpstreamSocket>>,
    next_grant_sweep: Instant,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Registers the worker's sockets with a fresh `Poll`; returns the worker and its waker.
    pub(crate) fn new(setup: WorkerSetup<'_>) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut ports = Vec::with_capacity(setup.sockets.len());
        for (i, socket) in setup.sockets.into_iter().enumerate() {
            let mut socket = mio::net::UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(FIRST_PORT + i), Interest::READABLE)?;
            ports.push(DataPort {
                socket,
                replies: SendQueue::new(),
            });
        }
        let now = Instant::now();
        let worker = Self {
            id: setup.id,
            poll,
            control: setup.control,
            events: setup.events,
            counters: setup.counters,
            limits: setup.limits,
            ports,
            rx: Some(Box::new(RecvBatch::new())),
            sessions: SessionTable::new(setup.config.session_timeout, now),
            grants: AHashMap::new(),
            default_backend: None,
            control_magic: setup.config.control_magic.clone().into_boxed_slice(),
            batch_io: setup.config.batch_io,
            busy_poll: setup.config.busy_poll,
            warn_gate: WarnGate::new(),
            draining: false,
            shutting_down: false,
            pending_ports: Vec::new(),
            pending_sessions: Vec::new(),
            expired: Vec::new(),
            next_grant_sweep: now + GRANT_SWEEP_INTERVAL,
        };
        Ok((worker, waker))
    }

    pub(crate) fn id(&self) -> usize {
        self.id
    }

    /// The event loop; returns after a `Shutdown` message.
    pub(crate) fn run(mut self) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        // Until then the worker polls without blocking (busy_poll after the last event).
        let mut spin_until = Instant::now();
        loop {
            let now = Instant::now();
            let timeout = if now < spin_until {
                Some(Duration::ZERO)
            } else {
                self.next_timeout(now)
            };
            if let Err(source) = self.poll.poll(&mut events, timeout) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(WorkerError::Poll {
                    worker: self.id,
                    source,
                });
            }
            let now = Instant::now();
            if !events.is_empty() {
                spin_until = now + self.busy_poll;
            }
            for event in &events {
                match event.token() {
                    WAKER => self.drain_control(now),
                    Token(t) if t < FIRST_SESSION => self.drain_port(t - FIRST_PORT, now),
                    Token(t) => self.drain_session(t - FIRST_SESSION, now),
                }
            }
            self.drain_pending(now);
            self.flush_replies();
            if self.shutting_down {
                self.close_all();
                return Ok(());
            }
            self.expire_idle(now);
            self.sweep_grants(now);
        }
    }

    fn counters(&self) -> &WorkerCounters {
        &self.counters[self.id]
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending_ports.is_empty() || !self.pending_sessions.is_empty() {
            return Some(Duration::ZERO);
        }
        let grants =
            (!self.grants.is_empty()).then(|| self.next_grant_sweep.saturating_duration_since(now));
        match (self.sessions.next_timeout(now), grants) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- control -------------------------------------------------------------------------

    fn drain_control(&mut self, now: Instant) {
        loop {
            match self.control.try_recv() {
                Ok(msg) => self.apply_control(msg, now),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // Control is gone: nobody can steer or stop us any more.
                    self.shutting_down = true;
                    return;
                }
            }
        }
    }

    fn apply_control(&mut self, msg: ControlMsg, now: Instant) {
        match msg {
            ControlMsg::Grant(grant) => {
                self.grants.insert(grant.token, grant);
            }
            ControlMsg::SetDefault(backend) => self.default_backend = backend,
            ControlMsg::RemoveBackend(backend) => self.remove_backend(backend, now),
            ControlMsg::ListSessions(reply) => reply(self.list_sessions(now)),
            ControlMsg::KillSessions(client, reply) => reply(self.kill_sessions(client)),
            ControlMsg::Drain => self.draining = true,
            ControlMsg::Shutdown => self.shutting_down = true,
        }
    }

    fn list_sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .map(|(_, s)| SessionInfo {
                worker: self.id,
                client: s.key.client,
                data_port: usize::from(s.key.port),
                target: s.target,
                backend: s.backend,
                kind: s.kind,
                age: now.saturating_duration_since(s.created),
                idle: now.saturating_duration_since(s.last_active),
                stats: s.stats,
            })
            .collect()
    }

    fn kill_sessions(&mut self, client: ClientMatch) -> usize {
        let doomed: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| client.matches(s.key.client))
            .map(|(id, _)| id)
            .collect();
        for &id in &doomed {
            self.close_session(id, CloseReason::Killed);
        }
        doomed.len()
    }

    /// Token sessions to `backend` end; default sessions move to the current default backend
    /// when it serves their port, and end otherwise.
    fn remove_backend(&mut self, backend: BackendId, now: Instant) {
        let affected: Vec<(SessionId, SessionKind, u16)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.backend == backend)
            .map(|(id, s)| (id, s.kind, s.key.port))
            .collect();
        for (id, kind, port) in affected {
            let new_default = self
                .default_backend
                .as_ref()
                .filter(|d| d.id != backend)
                .and_then(|d| Some((d.id, d.addr_for(usize::from(port))?)));
            match (kind, new_default) {
                (SessionKind::Default, Some((to, addr))) => {
                    match self.retarget(id, to, addr, SessionKind::Default, now) {
                        Ok(Some(from)) => {
                            let _ = self.events.send(WorkerEvent::SessionMoved {
                                from,
                                to,
                                token: None,
                            });
                        }
                        Ok(None) => {}
                        Err(_) => self.close_session(id, CloseReason::BackendRemoved),
                    }
                }
                _ => self.close_session(id, CloseReason::BackendRemoved),
            }
        }
    }

    // ---- client side -----------------------------------------------------------------------

    fn drain_port(&mut self, port: usize, now: Instant) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let fd = self.ports[port].socket.as_raw_fd();
        let mut drained = false;
        for _ in 0..IO_LOOP_BOUND {
            match rx.recv(fd, self.batch_io) {
                Ok(n) => {
                    for i in 0..n {
                        let (datagram, from) = rx.get(i);
                        self.on_client_datagram(port, datagram, from, now);
                    }
                    if n < BATCH {
                        // A short batch means the queue was empty: a new datagram raises a new
                        // readiness edge, so there is nothing left to read now.
                        drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("worker {}: receive on data port {port}: {e}", self.id);
                    drained = true;
                    break;
                }
            }
        }
        if !drained {
            self.pending_ports.push(port);
        }
        self.rx = Some(rx);
    }

    fn on_client_datagram(
        &mut self,
        port: usize,
        datagram: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let Some(client) = from else {
            self.counters().drop(DropReason::NoSession, 1);
            return;
        };
        let key = SessionKey {
            client,
            port: port as u16,
        };
        match self.sessions.find(&key) {
            Some(id) => {
                if let Some(body) = control_body(datagram, &self.control_magic) {
                    self.reset_session(id, body, now);
                } else {
                    self.forward_upstream(id, datagram, now);
                }
            }
            None => self.open_session(key, datagram, now),
        }
    }

    fn forward_upstream(&mut self, id: SessionId, datagram: &[u8], now: Instant) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        session.last_active = now;
        match session.upstream.send(datagram) {
            Ok(_) => {
                session.stats.packets_upstream += 1;
                session.stats.bytes_upstream += datagram.len() as u64;
                let c = &self.counters[self.id];
                c.packets_upstream.add(1);
                c.bytes_upstream.add(datagram.len() as u64);
            }
            Err(e) => {
                log::trace!("worker {}: send to {}: {e}", self.id, session.target);
                self.counters[self.id].drop(DropReason::UpstreamSend, 1);
            }
        }
    }

    /// First datagram of an unknown client: a token (or control packet) opens a session to its
    /// grant's backend and is consumed; anything else goes to the default backend, if any.
    fn open_session(&mut self, key: SessionKey, datagram: &[u8], now: Instant) {
        if self.draining {
            self.counters().drop(DropReason::Draining, 1);
            return;
        }
        let port = usize::from(key.port);
        let mut rejected = None;
        match classify(datagram, &self.control_magic) {
            Classified::Token(token) | Classified::Control(token) => {
                match self.redeem(token, port, now) {
                    Ok((backend, target)) => {
                        if self
                            .create_session(key, target, backend, SessionKind::Token, now)
                            .is_some()
                        {
                            self.counters().tokens_redeemed.add(1);
                            let _ = self.events.send(WorkerEvent::SessionOpened {
                                backend,
                                kind: SessionKind::Token,
                                token: Some(token),
                            });
                        }
                        return;
                    }
                    Err(reason) => {
                        log::trace!(
                            "{}: token {token} rejected: {}",
                            key.client,
                            reason.as_str()
                        );
                        rejected = Some(DropReason::TokenRejected);
                    }
                }
            }
            Classified::BadControl => rejected = Some(DropReason::MalformedControl),
            Classified::Payload => {}
        }
        let default = self
            .default_backend
            .as_ref()
            .and_then(|d| Some((d.id, d.addr_for(port)?)));
        let Some((backend, target)) = default else {
            self.counters()
                .drop(rejected.unwrap_or(DropReason::NoSession), 1);
            return;
        };
        if let Some(id) = self.create_session(key, target, backend, SessionKind::Default, now) {
            let _ = self.events.send(WorkerEvent::SessionOpened {
                backend,
                kind: SessionKind::Default,
                token: None,
            });
            self.forward_upstream(id, datagram, now);
        }
    }

    /// Looks a token up and redeems it for `port`. A grant published just before the client got
    /// its token may still sit in the control channel, so a miss drains the channel once.
    fn redeem(
        &mut self,
        token: TokenId,
        port: usize,
        now: Instant,
    ) -> Result<(BackendId, SocketAddr), TokenRejectReason> {
        if !self.grants.contains_key(&token) {
            self.drain_control(now);
        }
        let result = match self.grants.get(&token) {
            Some(grant) => grant
                .redeem(port, now)
                .map(|target| (grant.backend.id, target)),
            None => Err(TokenRejectReason::Unknown),
        };
        if let Err(reason) = result {
            self.counters().reject(reason);
        }
        result
    }

    fn create_session(
        &mut self,
        key: SessionKey,
        target: SocketAddr,
        backend: BackendId,
        kind: SessionKind,
        now: Instant,
    ) -> Option<SessionId> {
        if let Err(reason) = self.limits.try_acquire(key.client.ip()) {
            self.counters().drop(reason, 1);
            return None;
        }
        let upstream = match connect_upstream_udp(target) {
            Ok(s) => s,
            Err(e) => {
                if let Some(note) = self.warn_gate.admit(now) {
                    log::warn!(
                        "{}: cannot open a socket to {target}: {e}{note}",
                        key.client
                    );
                }
                self.limits.release(key.client.ip());
                self.counters().drop(DropReason::UpstreamSetup, 1);
                return None;
            }
        };
        let id = self.sessions.insert(Session {
            key,
            client_sockaddr: key.client.into(),
            upstream,
            target,
            backend,
            kind,
            created: now,
            last_active: now,
            stats: SessionStats::default(),
        });
        let token = Token(FIRST_SESSION + id.slot());
        let registry = self.poll.registry();
        let registered = match self.sessions.get_mut(id) {
            Some(s) => registry.register(&mut s.upstream, token, Interest::READABLE),
            None => Ok(()),
        };
        if let Err(e) = registered {
            if let Some(note) = self.warn_gate.admit(now) {
                log::warn!(
                    "{}: cannot register the socket to {target}: {e}{note}",
                    key.client
                );
            }
            self.sessions.remove(id);
            self.limits.release(key.client.ip());
            self.counters().drop(DropReason::UpstreamSetup, 1);
            return None;
        }
        let c = self.counters();
        c.sessions_created[kind as usize].add(1);
        c.sessions_active.set(self.sessions.len() as u64);
        log::debug!("{}: session to {target} ({})", key.client, kind.as_str());
        Some(id)
    }

    /// A control packet on a live session: move it to the new grant's backend.
    fn reset_session(&mut self, id: SessionId, body: &[u8], now: Instant) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let client = session.key.client;
        let port = usize::from(session.key.port);
        let Some(token) = parse_token(body) else {
            if let Some(note) = self.warn_gate.admit(now) {
                log::warn!(
                    "{client}: control packet without a valid token; session unchanged{note}"
                );
            }
            self.counters().drop(DropReason::MalformedControl, 1);
            return;
        };
        let (to, target) = match self.redeem(token, port, now) {
            Ok(granted) => granted,
            Err(reason) => {
                if let Some(note) = self.warn_gate.admit(now) {
                    log::warn!(
                        "{client}: control packet with {} token; session unchanged{note}",
                        reason.as_str()
                    );
                }
                self.counters().drop(DropReason::TokenRejected, 1);
                return;
            }
        };
        // Redeeming may have drained control messages that ended this session meanwhile.
        let from = match self.retarget(id, to, target, SessionKind::Token, now) {
            Ok(Some(from)) => from,
            Ok(None) => {
                log::debug!("{client}: session ended while its control packet was handled");
                return;
            }
            Err(e) => {
                if let Some(note) = self.warn_gate.admit(now) {
                    log::warn!(
                        "{client}: cannot move the session to {target}: {e}; session unchanged{note}"
                    );
                }
                self.counters().drop(DropReason::UpstreamSetup, 1);
                return;
            }
        };
        let c = self.counters();
        c.sessions_reset.add(1);
        c.tokens_redeemed.add(1);
        log::debug!("{client}: session moved to {target}");
        let _ = self.events.send(WorkerEvent::SessionMoved {
            from,
            to,
            token: Some(token),
        });
    }

    /// Points a session at a new backend through a fresh upstream socket. The old socket is
    /// closed, so late replies from the old backend are dropped by the kernel.
    ///
    /// Returns the backend the session left, read at the moment of the move: the session may
    /// have been moved or ended by control messages drained since the caller looked at it, and
    /// `Ok(None)` says it no longer exists.
    fn retarget(
        &mut self,
        id: SessionId,
        backend: BackendId,
        target: SocketAddr,
        kind: SessionKind,
        now: Instant,
    ) -> io::Result<Option<BackendId>> {
        if self.sessions.get_mut(id).is_none() {
            return Ok(None);
        }
        let mut upstream = connect_upstream_udp(target)?;
        let registry = self.poll.registry();
        let Some(session) = self.sessions.get_mut(id) else {
            return Ok(None);
        };
        let token = Token(FIRST_SESSION + id.slot());
        registry.deregister(&mut session.upstream)?;
        if let Err(e) = registry.register(&mut upstream, token, Interest::READABLE) {
            // Put the old socket back so the session keeps working where it was.
            registry.register(&mut session.upstream, token, Interest::READABLE)?;
            return Err(e);
        }
        session.upstream = upstream;
        session.target = target;
        session.kind = kind;
        session.last_active = now;
        Ok(Some(std::mem::replace(&mut session.backend, backend)))
    }

    // ---- backend side ----------------------------------------------------------------------

    fn drain_session(&mut self, slot: usize, now: Instant) {
        let Some((id, session)) = self.sessions.by_slot_mut(slot) else {
            return; // closed earlier in this turn
        };
        let port = &mut self.ports[usize::from(session.key.port)];
        let fd = session.upstream.as_raw_fd();
        let counters = &self.counters[self.id];
        let mut drained = false;
        for _ in 0..IO_LOOP_BOUND {
            if port.replies.is_full() {
                let flushed = port.replies.flush(port.socket.as_raw_fd(), self.batch_io);
                counters.drop(DropReason::DownstreamSend, flushed.dropped);
            }
            let free = BATCH - port.replies.len();
            match port
                .replies
                .recv_from_connected(fd, &session.client_sockaddr, self.batch_io)
            {
                Ok((n, bytes)) => {
                    session.last_active = now;
                    session.stats.packets_downstream += n as u64;
                    session.stats.bytes_downstream += bytes as u64;
                    counters.packets_downstream.add(n as u64);
                    counters.bytes_downstream.add(bytes as u64);
                    if n < free {
                        drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                // A backend that was down answered an earlier send with ICMP; the error is
                // reported once and the socket stays usable.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log::debug!("worker {}: receive from {}: {e}", self.id, session.target);
                    drained = true;
                    break;
                }
            }
        }
        if !drained {
            self.pending_sessions.push(id);
        }
    }

    /// Gives sockets that hit the work bound last turn another turn.
    fn drain_pending(&mut self, now: Instant) {
        if self.pending_ports.is_empty() && self.pending_sessions.is_empty() {
            return;
        }
        let ports = std::mem::take(&mut self.pending_ports);
        for port in ports {
            self.drain_port(port, now);
        }
        let sessions = std::mem::take(&mut self.pending_sessions);
        for id in sessions {
            self.drain_session(id.slot(), now);
        }
    }

    fn flush_replies(&mut self) {
        for port in &mut self.ports {
            if !port.replies.is_empty() {
                let flushed = port.replies.flush(port.socket.as_raw_fd(), self.batch_io);
                self.counters[self.id].drop(DropReason::DownstreamSend, flushed.dropped);
            }
        }
    }

    // ---- housekeeping ----------------------------------------------------------------------

    fn expire_idle(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        self.sessions.expire_idle(now, &mut expired);
        if expired.is_empty() {
            self.expired = expired;
            return;
        }
        let count = expired.len() as u64;
        for mut session in expired.drain(..) {
            log::debug!(
                "{}: session to {} idle, closed",
                session.key.client,
                session.target
            );
            self.release(&mut session, CloseReason::Idle);
        }
        let c = self.counters();
        c.sessions_expired.add(count);
        c.sessions_active.set(self.sessions.len() as u64);
        self.expired = expired;
    }

    fn sweep_grants(&mut self, now: Instant) {
        if now < self.next_grant_sweep {
            return;
        }
        self.next_grant_sweep = now + GRANT_SWEEP_INTERVAL;
        self.grants.retain(|_, g| !g.is_spent(now));
    }

    fn close_session(&mut self, id: SessionId, reason: CloseReason) {
        if let Some(mut session) = self.sessions.remove(id) {
            self.release(&mut session, reason);
            let c = self.counters();
            c.sessions_closed.add(1);
            c.sessions_active.set(self.sessions.len() as u64);
        }
    }

    /// Frees what a removed session held: its poll registration, its limit slot, and (on drop)
    /// its socket.
    fn release(&self, session: &mut Session<UpstreamSocket>, reason: CloseReason) {
        if let Err(e) = self.poll.registry().deregister(&mut session.upstream) {
            log::debug!("deregister {}: {e}", session.target);
        }
        self.limits.release(session.key.client.ip());
        let _ = self.events.send(WorkerEvent::SessionClosed {
            backend: session.backend,
            reason,
        });
    }

    fn close_all(&mut self) {
        let ids: Vec<SessionId> = self.sessions.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close_session(id, CloseReason::Shutdown);
        }
    }
}

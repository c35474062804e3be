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

use crate::admit::{Admission, AdmitContext, admit};
use crate::batch::{BATCH, RecvBatch, SendQueue};
use crate::config::DataPlaneConfig;
use crate::ctl::{ClientMatch, CloseReason, Closing, ControlMsg, SessionInfo, WorkerEvent};
use crate::error::WorkerError;
use crate::grant::{Backend, BackendId, Grant, TokenId};
use crate::limits::SessionLimits;
use crate::listener::{CloseMode, ListenerId, ListenerKind, MAX_LISTENERS};
use crate::metrics::{DropReason, TokenRejectReason, WorkerCounters};
use crate::packet::{classify, control_body, parse_token};
use crate::session::{Session, SessionId, SessionKey, SessionKind, SessionStats, SessionTable};
use crate::socket::connect_upstream_udp;
use crate::warn_gate::WarnGate;

const WAKER: Token = Token(0);
/// Listener `id` is `Token(FIRST_LISTENER + id)`; sessions come after every possible listener.
const FIRST_LISTENER: usize = 1;
const FIRST_SESSION: usize = FIRST_LISTENER + MAX_LISTENERS;
/// Batches read from one socket per readiness event before other sockets get a turn.
const IO_LOOP_BOUND: usize = 16;
/// How often spent grants are dropped from the worker's table.
const GRANT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const EVENTS_CAPACITY: usize = 1024;
/// Idle timeout of a session whose listener is gone (cannot happen: a listener outlives its
/// sessions); short, so such a session would not linger.
const ORPHAN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

type UpstreamSocket = mio::net::UdpSocket;

/// This worker's side of one listener.
struct Listener {
    socket: mio::net::UdpSocket,
    replies: SendQueue,
    kind: ListenerKind,
    /// Idle timeout of its sessions.
    idle_timeout: Duration,
    /// Live sessions on it in this worker, so a draining listener knows when to close.
    sessions: usize,
    /// Set once a close was asked (no new sessions); told when this worker's socket is gone.
    closing: Option<Arc<Closing>>,
}

/// Everything [`Worker::new`] needs.
pub(crate) struct WorkerSetup<'a> {
    pub(crate) id: usize,
    pub(crate) config: &'a DataPlaneConfig,
    pub(crate) control: Receiver<ControlMsg>,
    pub(crate) grants: Receiver<Arc<Grant>>,
    pub(crate) events: Sender<WorkerEvent>,
    pub(crate) counters: Arc<[CachePadded<WorkerCounters>]>,
    pub(crate) limits: Arc<SessionLimits>,
}

pub(crate) struct Worker {
    id: usize,
    poll: Poll,
    control: Receiver<ControlMsg>,
    grant_rx: Receiver<Arc<Grant>>,
    events: Sender<WorkerEvent>,
    counters: Arc<[CachePadded<WorkerCounters>]>,
    limits: Arc<SessionLimits>,
    /// Indexed by listener id; `None` where no listener is open.
    listeners: Vec<Option<Listener>>,
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
    /// A worker with a fresh `Poll` and no listener yet; returns the worker and its waker.
    pub(crate) fn new(setup: WorkerSetup<'_>) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let now = Instant::now();
        let worker = Self {
            id: setup.id,
            poll,
            control: setup.control,
            grant_rx: setup.grants,
            events: setup.events,
            counters: setup.counters,
            limits: setup.limits,
            listeners: Vec::new(),
            rx: Some(Box::new(RecvBatch::new())),
            sessions: SessionTable::new(now),
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
                    WAKER => {
                        self.drain_grants();
                        self.drain_control(now);
                    }
                    Token(t) if t < FIRST_SESSION => self.drain_port(t - FIRST_LISTENER, now),
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

    /// Takes every grant published so far.
    fn drain_grants(&mut self) {
        while let Ok(grant) = self.grant_rx.try_recv() {
            self.grants.insert(grant.token, grant);
        }
    }

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
            ControlMsg::OpenListener {
                id,
                socket,
                kind,
                idle_timeout,
            } => self.open_listener(id, socket, kind, idle_timeout),
            ControlMsg::CloseListener { id, mode, closing } => {
                self.close_listener(id, mode, closing);
            }
            ControlMsg::SetDefault(backend) => self.default_backend = backend,
            ControlMsg::RemoveBackend(backend) => self.remove_backend(backend, now),
            ControlMsg::ListSessions(reply) => reply(self.list_sessions(now)),
            ControlMsg::KillSessions(client, reply) => reply(self.kill_sessions(client)),
            ControlMsg::Drain => self.draining = true,
            ControlMsg::Shutdown => self.shutting_down = true,
        }
    }

    fn open_listener(
        &mut self,
        id: ListenerId,
        socket: UdpSocket,
        kind: ListenerKind,
        idle_timeout: Duration,
    ) {
        let index = usize::from(id.0);
        let mut socket = mio::net::UdpSocket::from_std(socket);
        let token = Token(FIRST_LISTENER + index);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
        {
            log::error!("worker {}: cannot serve listener {index}: {e}", self.id);
            return;
        }
        if self.listeners.len() <= index {
            self.listeners.resize_with(index + 1, || None);
        }
        self.listeners[index] = Some(Listener {
            socket,
            replies: SendQueue::new(),
            kind,
            idle_timeout,
            sessions: 0,
            closing: None,
        });
    }

    fn close_listener(&mut self, id: ListenerId, mode: CloseMode, closing: Arc<Closing>) {
        let index = usize::from(id.0);
        let Some(listener) = self.listeners.get_mut(index).and_then(Option::as_mut) else {
            closing.release();
            return;
        };
        listener.closing = Some(closing);
        if mode == CloseMode::End {
            let doomed: Vec<SessionId> = self
                .sessions
                .iter()
                .filter(|(_, s)| usize::from(s.key.port) == index)
                .map(|(id, _)| id)
                .collect();
            for session in doomed {
                self.close_session(session, CloseReason::ListenerClosed);
            }
        }
        self.retire_listener_if_done(index);
    }

    /// Drops a closing listener's socket once it has no session left, and says so.
    fn retire_listener_if_done(&mut self, index: usize) {
        let done = self
            .listeners
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.closing.is_some() && l.sessions == 0);
        if !done {
            return;
        }
        if let Some(mut listener) = self.listeners[index].take() {
            if !listener.replies.is_empty() {
                let fd = listener.socket.as_raw_fd();
                listener.replies.flush(fd, self.batch_io);
            }
            let _ = self.poll.registry().deregister(&mut listener.socket);
            let closing = listener.closing.take();
            drop(listener);
            if let Some(closing) = closing {
                closing.release();
            }
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
                    let moved = self
                        .open_upstream(addr, Token(FIRST_SESSION + id.slot()))
                        .ok()
                        .and_then(|upstream| {
                            self.retarget(id, to, addr, upstream, SessionKind::Default, now)
                        });
                    match moved {
                        Some(from) => {
                            let _ = self.events.send(WorkerEvent::SessionMoved {
                                from,
                                to,
                                token: None,
                            });
                        }
                        None => self.close_session(id, CloseReason::BackendRemoved),
                    }
                }
                _ => self.close_session(id, CloseReason::BackendRemoved),
            }
        }
    }

    // ---- client side -----------------------------------------------------------------------

    fn drain_port(&mut self, port: usize, now: Instant) {
        // Closed since its readiness was reported.
        let Some((fd, kind)) = self
            .listeners
            .get(port)
            .and_then(Option::as_ref)
            .map(|l| (l.socket.as_raw_fd(), l.kind))
        else {
            return;
        };
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut drained = false;
        for _ in 0..IO_LOOP_BOUND {
            match rx.recv(fd, self.batch_io) {
                Ok(n) => {
                    for i in 0..n {
                        let (datagram, from) = rx.get(i);
                        self.on_client_datagram(port, kind, datagram, from, now);
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
        kind: ListenerKind,
        datagram: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let Some(from) = from else {
            self.counters().drop(DropReason::NoSession, 1);
            return;
        };
        // An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; sessions, limits
        // and the admin API know it by its IPv4 address.
        let key = SessionKey {
            client: SocketAddr::new(from.ip().to_canonical(), from.port()),
            port: port as u16,
        };
        match self.sessions.find(&key) {
            Some(id) => {
                // RESET magic means something on token ports only.
                let resets = match kind {
                    ListenerKind::TokenPort => true,
                };
                if resets && let Some(body) = control_body(datagram, &self.control_magic) {
                    self.reset_session(id, body, now);
                } else {
                    self.forward_upstream(id, datagram, now);
                }
            }
            None => self.open_session(key, from, datagram, now),
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
    /// `reply_to` is the client's address as received (the session key holds its canonical form).
    fn open_session(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) {
        let port = usize::from(key.port);
        let listener = self.listeners.get(port).and_then(Option::as_ref);
        let ctx = AdmitContext {
            listener: listener.map_or(ListenerKind::TokenPort, |l| l.kind),
            closed: self.draining || listener.is_none_or(|l| l.closing.is_some()),
            default: self
                .default_backend
                .as_ref()
                .and_then(|d| Some((d.id, d.addr_for(port)?))),
        };
        let first = classify(datagram, &self.control_magic);
        let admission = admit(first, ctx, |token| self.find_grant(token, port, now));
        let (backend, target) = match admission {
            Admission::Token { grant, target } => {
                self.open_token_session(key, reply_to, &grant, target, now);
                return;
            }
            Admission::Drop { reason, refused } => {
                if let Some((token, why)) = refused {
                    log::trace!("{}: token {token} rejected: {}", key.client, why.as_str());
                }
                self.counters().drop(reason, 1);
                return;
            }
            Admission::Default {
                backend,
                target,
                refused,
            } => {
                if let Some((token, why)) = refused {
                    log::trace!("{}: token {token} rejected: {}", key.client, why.as_str());
                }
                (backend, target)
            }
        };
        let Some(upstream) = self.reserve(key.client, target, now) else {
            return;
        };
        let id = self.install(
            key,
            reply_to,
            upstream,
            target,
            backend,
            SessionKind::Default,
            now,
        );
        let _ = self.events.send(WorkerEvent::SessionOpened {
            backend,
            kind: SessionKind::Default,
            token: None,
        });
        self.forward_upstream(id, datagram, now);
    }

    /// Opens a session with a grant that [`Self::find_grant`] found redeemable. The token is
    /// spent last, once the session's slot and socket exist: a session refused at a cap, or one
    /// whose socket cannot be made, leaves the token for the player's retry.
    fn open_token_session(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        grant: &Grant,
        target: SocketAddr,
        now: Instant,
    ) {
        let Some(upstream) = self.reserve(key.client, target, now) else {
            return;
        };
        if let Err(reason) = grant.redeem(usize::from(key.port), now) {
            // Another worker redeemed it in the meantime.
            self.abandon(key.client, upstream);
            self.counters().reject(reason);
            self.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let backend = grant.backend.id;
        self.install(
            key,
            reply_to,
            upstream,
            target,
            backend,
            SessionKind::Token,
            now,
        );
        self.counters().tokens_redeemed.add(1);
        let _ = self.events.send(WorkerEvent::SessionOpened {
            backend,
            kind: SessionKind::Token,
            token: Some(grant.token),
        });
    }

    /// Looks a token up and checks it is redeemable on `port`, without spending it. A grant
    /// published just before the client got its token may still sit in the grant channel, so a
    /// miss drains that channel (and nothing else) once.
    fn find_grant(
        &mut self,
        token: TokenId,
        port: usize,
        now: Instant,
    ) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason> {
        if !self.grants.contains_key(&token) {
            self.drain_grants();
        }
        let result = match self.grants.get(&token) {
            Some(grant) => grant
                .check(port, now)
                .map(|target| (Arc::clone(grant), target)),
            None => Err(TokenRejectReason::Unknown),
        };
        if let Err(reason) = result {
            self.counters().reject(reason);
        }
        result
    }

    /// Everything a new session needs that can fail: a slot under `maxSessions` and
    /// `maxSessionsPerIp`, and an upstream socket to `target`, registered under the token of
    /// the slot the session will take. `None` when refused (counted, and logged at most once a
    /// second).
    fn reserve(
        &mut self,
        client: SocketAddr,
        target: SocketAddr,
        now: Instant,
    ) -> Option<UpstreamSocket> {
        if let Err(reason) = self.limits.try_acquire(client.ip()) {
            self.counters().drop(reason, 1);
            return None;
        }
        let token = Token(FIRST_SESSION + self.sessions.next_slot());
        match self.open_upstream(target, token) {
            Ok(upstream) => Some(upstream),
            Err(e) => {
                if let Some(note) = self.warn_gate.admit(now) {
                    log::warn!("{client}: cannot open a socket to {target}: {e}{note}");
                }
                self.limits.release(client.ip());
                self.counters().drop(DropReason::UpstreamSetup, 1);
                None
            }
        }
    }

    /// Gives back what [`Self::reserve`] took, for a session that will not open after all.
    fn abandon(&self, client: SocketAddr, mut upstream: UpstreamSocket) {
        let _ = self.poll.registry().deregister(&mut upstream);
        self.limits.release(client.ip());
    }

    /// A connected upstream socket, registered in this worker's poll under `token`.
    fn open_upstream(&self, target: SocketAddr, token: Token) -> io::Result<UpstreamSocket> {
        let mut upstream = connect_upstream_udp(target)?;
        self.poll
            .registry()
            .register(&mut upstream, token, Interest::READABLE)?;
        Ok(upstream)
    }

    /// Adds a session whose slot and socket [`Self::reserve`] set up; cannot fail.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        upstream: UpstreamSocket,
        target: SocketAddr,
        backend: BackendId,
        kind: SessionKind,
        now: Instant,
    ) -> SessionId {
        // `open_session` checked the listener is open, and nothing since could close it.
        let idle_timeout = match self
            .listeners
            .get_mut(usize::from(key.port))
            .and_then(Option::as_mut)
        {
            Some(listener) => {
                listener.sessions += 1;
                listener.idle_timeout
            }
            None => ORPHAN_IDLE_TIMEOUT,
        };
        let expected_slot = self.sessions.next_slot();
        let id = self.sessions.insert(Session {
            key,
            client_sockaddr: reply_to.into(),
            upstream,
            target,
            backend,
            kind,
            created: now,
            last_active: now,
            idle_timeout,
            stats: SessionStats::default(),
        });
        debug_assert_eq!(id.slot(), expected_slot, "registered under another token");
        let c = self.counters();
        c.sessions_created[kind as usize].add(1);
        c.sessions_active.set(self.sessions.len() as u64);
        log::debug!("{}: session to {target} ({})", key.client, kind.as_str());
        id
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
        let (grant, target) = match self.find_grant(token, port, now) {
            Ok(found) => found,
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
        // The new socket first, the token after: a socket that cannot be made leaves both the
        // session and the token as they were.
        let upstream = match self.open_upstream(target, Token(FIRST_SESSION + id.slot())) {
            Ok(upstream) => upstream,
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
        if let Err(reason) = grant.redeem(port, now) {
            let mut unused = upstream;
            let _ = self.poll.registry().deregister(&mut unused);
            self.counters().reject(reason);
            self.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let to = grant.backend.id;
        let Some(from) = self.retarget(id, to, target, upstream, SessionKind::Token, now) else {
            return;
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

    /// Points a session at a new backend through `upstream`, a fresh socket already registered
    /// under the session's token. The old socket is closed, so late replies from the old backend
    /// are dropped by the kernel. Returns the backend the session left (`None`: no such session).
    fn retarget(
        &mut self,
        id: SessionId,
        backend: BackendId,
        target: SocketAddr,
        upstream: UpstreamSocket,
        kind: SessionKind,
        now: Instant,
    ) -> Option<BackendId> {
        let session = self.sessions.get_mut(id)?;
        let mut old = std::mem::replace(&mut session.upstream, upstream);
        session.target = target;
        session.kind = kind;
        session.last_active = now;
        let from = std::mem::replace(&mut session.backend, backend);
        let _ = self.poll.registry().deregister(&mut old);
        Some(from)
    }

    // ---- backend side ----------------------------------------------------------------------

    fn drain_session(&mut self, slot: usize, now: Instant) {
        let Some((id, session)) = self.sessions.by_slot_mut(slot) else {
            return; // closed earlier in this turn
        };
        // A listener lives as long as any of its sessions.
        let Some(port) = self
            .listeners
            .get_mut(usize::from(session.key.port))
            .and_then(Option::as_mut)
        else {
            return;
        };
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
        for port in self.listeners.iter_mut().flatten() {
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

    /// Frees what a removed session held: its poll registration, its limit slot, its place on
    /// its listener (a draining listener closes with its last session), and (on drop) its
    /// socket.
    fn release(&mut self, session: &mut Session<UpstreamSocket>, reason: CloseReason) {
        if let Err(e) = self.poll.registry().deregister(&mut session.upstream) {
            log::debug!("deregister {}: {e}", session.target);
        }
        self.limits.release(session.key.client.ip());
        let _ = self.events.send(WorkerEvent::SessionClosed {
            backend: session.backend,
            reason,
        });
        let index = usize::from(session.key.port);
        if let Some(listener) = self.listeners.get_mut(index).and_then(Option::as_mut) {
            listener.sessions = listener.sessions.saturating_sub(1);
        }
        self.retire_listener_if_done(index);
    }

    fn close_all(&mut self) {
        let ids: Vec<SessionId> = self.sessions.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close_session(id, CloseReason::Shutdown);
        }
    }
}

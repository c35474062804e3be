//! One data-plane worker: a `mio` event loop owning its socket of every listener and a shard of
//! sessions. It handles control messages, client datagrams and connections, backend replies
//! and idle expiry, and never blocks on anything but `epoll_wait`. This file holds the loop and
//! the per-datagram paths; `listeners.rs` this worker's listeners, `admission.rs` what admits
//! a new client (grants, keys, default backend, rate limits), `sessions.rs` the session table
//! and upstream sockets, `control.rs` the control side (state messages, listener changes,
//! admin requests), `setup.rs` UDP session setup and moves, `tcp.rs` the TCP path and
//! `pending.rs` its connections waiting for their first bytes.
//!
//! Per datagram the worker does one session lookup and one syscall (`send` upstream, or a share of
//! a `recvmmsg`/`sendmmsg` batch); everything else (socket setup, address encoding, counting
//! toward limits) happens once per session.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::CachePadded;
use mio::{Events, Poll, Registry, Token, Waker};

use crate::config::DataPlaneConfig;
use crate::ctl::{CloseReason, ControlMsg, WorkerEvent};
use crate::error::WorkerError;
use crate::io::batch::{BATCH, Header, RecvBatch, ReplyBatch, UpstreamBatch, max_payload};
use crate::io::fd_budget::FdBudget;
use crate::io::own_addrs::OwnPorts;
use crate::listener::{ListenerKind, MAX_LISTENERS};
use crate::liveness::{BEAT_INTERVAL, Heartbeat};
use crate::metrics::{DropReason, WorkerCounters};
use crate::policy::grant::{Grant, NonceLedger};
use crate::policy::limits::SessionLimits;
use crate::policy::proxy_protocol::{HeaderTransport, ProxyHeader, ProxyMode};
use crate::policy::session::{SessionId, SessionKey, SessionKind};
use crate::warn_gate::WarnGate;

mod admission;
mod control;
mod listeners;
mod pending;
mod pool;
mod sessions;
mod setup;
mod tcp;

use admission::Admission;
use listeners::{ListenerIo, Listeners};
use pool::PoolRef;
use sessions::{Sessions, Upstream};
use tcp::Tcp;

const WAKER: Token = Token(0);
/// Listener `id` is `Token(FIRST_LISTENER + id)`; sessions come after every possible listener.
const FIRST_LISTENER: usize = 1;
/// A TCP session in slot `s` has two tokens: `FIRST_SESSION + 2s` for its backend connection
/// and `FIRST_SESSION + 2s + 1` for its client connection.
const FIRST_SESSION: usize = FIRST_LISTENER + MAX_LISTENERS;
/// Shared upstream socket `p` (a [`PoolRef`]) is `FIRST_POOL + p`, above every session token.
const FIRST_POOL: usize = usize::MAX / 4 + 1;
/// TCP connections still waiting for their token: `FIRST_PENDING + slot`, above every
/// session token.
const FIRST_PENDING: usize = usize::MAX / 2 + 1;
/// Batches read from one socket per readiness event before other sockets get a turn.
const IO_LOOP_BOUND: usize = 16;
/// How often spent grants are dropped and the upstream sockets of a passed peak closed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const EVENTS_CAPACITY: usize = 1024;

/// The token of this worker's socket of listener `index`.
fn listener_token(index: usize) -> Token {
    Token(FIRST_LISTENER + index)
}

/// The token of the TCP connection in slot `slot` of those waiting for their first bytes.
fn pending_token(slot: usize) -> Token {
    Token(FIRST_PENDING + slot)
}

/// The token of a TCP session's backend connection.
fn upstream_token(slot: usize) -> Token {
    Token(FIRST_SESSION + 2 * slot)
}

/// The token of a TCP session's client connection.
fn client_token(slot: usize) -> Token {
    Token(FIRST_SESSION + 2 * slot + 1)
}

/// A UDP session's PROXY protocol header, built once when the session (or its move to another
/// backend) starts.
///
/// A `v2-first` header stays pending until a datagram carrying it has left: a datagram that
/// carries it is queued, the session's others carry none meanwhile, and the flush says whether
/// it left (the batch passes it to the session's next datagram if its own is lost) or was lost
/// (pending again, for the next datagram). So a backend never sees the session's traffic
/// without the header first, and a lost first datagram does not hide the client's address.
#[derive(Debug)]
struct ProxyState {
    header: ProxyHeader,
    /// `v2`: every datagram; `v2-first`: one, until it has left.
    every: bool,
    /// `v2-first`: no datagram carrying the header has left yet.
    pending: bool,
    /// `v2-first`: the upstream batch entry queued with the header, until the flush.
    queued: Option<u8>,
}

impl ProxyState {
    /// The header the datagram queued as `entry` of the upstream batch carries.
    #[inline]
    fn take(&mut self, entry: usize) -> Header<'_> {
        if self.every {
            return Header::Every(&self.header);
        }
        if !self.pending || self.queued.is_some() {
            return Header::None;
        }
        self.queued = Some(entry as u8);
        Header::First(&self.header)
    }

    /// Bytes of header the next datagram would carry.
    #[inline]
    fn next_len(&self) -> usize {
        if self.every || (self.pending && self.queued.is_none()) {
            self.header.as_bytes().len()
        } else {
            0
        }
    }

    /// The flush's word on the header queued as `entry`: it left, or it was `lost` and is
    /// pending again. A header queued before the session moved is not this one: ignored.
    fn settle(&mut self, entry: usize, lost: bool) {
        if self.queued == Some(entry as u8) {
            self.queued = None;
            self.pending = lost;
        }
    }
}

/// A UDP path's header state under `mode` on listener `port`: the header built now, once,
/// with the address the client sent to (`local`, from packet info) or else the listener's, as
/// destination.
fn udp_proxy(
    listeners: &Listeners,
    mode: ProxyMode,
    client: SocketAddr,
    port: usize,
    local: Option<std::net::IpAddr>,
) -> Option<Box<ProxyState>> {
    if mode == ProxyMode::None {
        return None;
    }
    let proxy = listeners.proxy_address(port, local)?;
    let header = ProxyHeader::new(HeaderTransport::Dgram, client, proxy);
    Some(Box::new(ProxyState {
        header,
        every: mode == ProxyMode::V2,
        pending: true,
        queued: None,
    }))
}

/// Where a client datagram came in: its slot in the receive batch, and the proxy address it
/// was sent to (wildcard listeners only).
#[derive(Clone, Copy, Debug)]
struct Arrival {
    slot: usize,
    local: Option<std::net::IpAddr>,
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
    pub(crate) ledger: Arc<NonceLedger>,
    /// The descriptors sessions may take.
    pub(crate) budget: Arc<FdBudget>,
    /// The local ports of every worker's upstream sockets.
    pub(crate) own_ports: Arc<OwnPorts>,
}

/// What a worker tells the world: its counters, its events to control and its warnings (at
/// most one line a second). Every part writes through it; it holds none of their state.
struct Outbox {
    id: usize,
    counters: Arc<[CachePadded<WorkerCounters>]>,
    events: Sender<WorkerEvent>,
    /// Rate limit of client-triggered warnings.
    warn_gate: WarnGate,
}

impl Outbox {
    /// This worker's index.
    fn id(&self) -> usize {
        self.id
    }

    /// This worker's counters.
    #[inline]
    fn counters(&self) -> &WorkerCounters {
        &self.counters[self.id]
    }

    /// Tells control `event`.
    fn send(&self, event: WorkerEvent) {
        let _ = self.events.send(event);
    }

    /// Tells control about a session of `kind`. Forwarder sessions are not reported: control
    /// counts sessions per inventory backend (for load balancing and to end a removed
    /// backend's sessions), and a forwarder's clients are counted on its listener instead.
    fn report(&self, kind: SessionKind, event: WorkerEvent) {
        if !matches!(kind, SessionKind::Forwarder | SessionKind::Route) {
            self.send(event);
        }
    }

    /// Whether a warning a client triggered may be logged at `now`; if so, a note of how
    /// many were held back before it.
    fn warn(&mut self, now: Instant) -> Option<String> {
        self.warn_gate.admit(now)
    }
}

/// The parts of a worker that its UDP and TCP paths borrow besides their own state, for one
/// call: the paths take this instead of the whole worker.
struct Parts<'a> {
    registry: &'a Registry,
    out: &'a mut Outbox,
    listeners: &'a mut Listeners,
    admission: &'a mut Admission,
    sessions: &'a mut Sessions,
}

pub(crate) struct Worker {
    poll: Poll,
    control: Receiver<ControlMsg>,
    out: Outbox,
    admission: Admission,
    listeners: Listeners,
    /// Client datagrams read from a listener. Taken out while a batch is processed, so
    /// handlers can borrow the rest of `self`.
    rx: Option<Box<RecvBatch>>,
    /// Backend replies read from the shared upstream sockets this loop turn, until they leave
    /// in [`Self::send_replies`] (or once it is full); taken out like `rx`.
    reply_rx: Option<Box<RecvBatch>>,
    /// Client datagrams of the batch in `rx` on their way upstream.
    upstream_batch: Box<UpstreamBatch>,
    /// The replies in `reply_rx` on their way to their clients.
    reply_batch: Box<ReplyBatch>,
    /// (entry, session) of the `v2-first` headers queued in `upstream_batch`.
    queued_headers: Vec<(usize, SessionId)>,
    sessions: Sessions,
    tcp: Tcp,
    batch_io: bool,
    busy_poll: Duration,
    /// The local ports of every worker's upstream sockets, to tell our own datagrams.
    own_ports: Arc<OwnPorts>,
    shutting_down: bool,
    /// Sockets left with unread datagrams after hitting `IO_LOOP_BOUND`.
    pending_ports: Vec<usize>,
    pending_pools: Vec<PoolRef>,
    next_sweep: Instant,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.out.id)
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
            poll,
            control: setup.control,
            out: Outbox {
                id: setup.id,
                counters: setup.counters,
                events: setup.events,
                warn_gate: WarnGate::new(),
            },
            admission: Admission::new(setup.grants, setup.config, setup.ledger, now),
            listeners: Listeners::new(setup.id),
            rx: Some(Box::new(RecvBatch::new())),
            reply_rx: Some(Box::new(RecvBatch::new())),
            upstream_batch: Box::new(UpstreamBatch::new()),
            reply_batch: Box::new(ReplyBatch::new()),
            queued_headers: Vec::with_capacity(BATCH),
            sessions: Sessions::new(
                setup.config,
                setup.limits,
                Arc::clone(&setup.budget),
                Arc::clone(&setup.own_ports),
                now,
            ),
            tcp: Tcp::new(setup.config, Arc::clone(&setup.budget)),
            batch_io: setup.config.batch_io,
            busy_poll: setup.config.busy_poll,
            own_ports: Arc::clone(&setup.own_ports),
            shutting_down: false,
            pending_ports: Vec::new(),
            pending_pools: Vec::new(),
            next_sweep: now + SWEEP_INTERVAL,
        };
        Ok((worker, waker))
    }

    pub(crate) fn id(&self) -> usize {
        self.out.id
    }

    /// The parts the paths borrow, and the TCP path.
    fn split(&mut self) -> (Parts<'_>, &mut Tcp) {
        let parts = Parts {
            registry: self.poll.registry(),
            out: &mut self.out,
            listeners: &mut self.listeners,
            admission: &mut self.admission,
            sessions: &mut self.sessions,
        };
        (parts, &mut self.tcp)
    }

    /// The event loop; returns after a `Shutdown` message. Beats `heart` once per turn.
    pub(crate) fn run(mut self, heart: &Heartbeat) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        // Until then the worker polls without blocking (busy_poll after the last event).
        let mut spin_until = Instant::now();
        loop {
            let now = Instant::now();
            let timeout = if now < spin_until {
                Some(Duration::ZERO)
            } else {
                // An idle worker still wakes to beat, so silence means stuck.
                Some(
                    self.next_timeout(now)
                        .map_or(BEAT_INTERVAL, |t| t.min(BEAT_INTERVAL)),
                )
            };
            if let Err(source) = self.poll.poll(&mut events, timeout) {
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(WorkerError::Poll {
                    worker: self.out.id,
                    source,
                });
            }
            let now = Instant::now();
            heart.beat(now);
            if !events.is_empty() {
                spin_until = now + self.busy_poll;
            }
            for event in &events {
                match event.token() {
                    WAKER => {
                        // Before control may close a listener (or open another in its place).
                        self.send_replies();
                        self.admission.drain_grants();
                        self.drain_control(now);
                    }
                    Token(t) if t < FIRST_SESSION => self.drain_port(t - FIRST_LISTENER, now),
                    Token(t) if t >= FIRST_PENDING => {
                        let (mut p, tcp) = self.split();
                        tcp.on_pending(&mut p, t - FIRST_PENDING, now);
                    }
                    Token(t) if t >= FIRST_POOL => {
                        self.drain_pool(PoolRef::from_number((t - FIRST_POOL) as u32), now);
                    }
                    Token(t) => {
                        let (mut p, tcp) = self.split();
                        tcp.drain_session(&mut p, (t - FIRST_SESSION) / 2, now);
                    }
                }
            }
            self.drain_backlog(now);
            self.send_replies();
            if self.shutting_down {
                self.close_all();
                return Ok(());
            }
            self.expire_idle(now);
            let (mut p, tcp) = self.split();
            tcp.expire(&mut p, now);
            self.sweep(now);
            self.listeners.retire_drained(self.poll.registry());
        }
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending_ports.is_empty()
            || self.tcp.has_backlog()
            || !self.pending_pools.is_empty()
        {
            return Some(Duration::ZERO);
        }
        // Grants to drop, or sockets of a passed peak to close.
        let grants = (self.admission.has_grants() || self.sessions.may_shrink())
            .then(|| self.next_sweep.saturating_duration_since(now));
        let closing = self.listeners.next_timeout();
        let pending = self.tcp.next_timeout(now);
        [self.sessions.next_timeout(now), grants, closing, pending]
            .into_iter()
            .flatten()
            .min()
    }

    // ---- client side -----------------------------------------------------------------------

    fn drain_port(&mut self, port: usize, now: Instant) {
        // Closed since its readiness was reported.
        let Some(listener) = self.listeners.get(port) else {
            return;
        };
        // RESET magic means something on token ports only.
        let resets = matches!(listener.kind(), ListenerKind::TokenPort);
        let (fd, pktinfo) = match listener.io() {
            ListenerIo::Udp {
                socket, pktinfo, ..
            } => (socket.as_raw_fd(), *pktinfo),
            ListenerIo::Tcp(_) => {
                let (mut p, tcp) = self.split();
                tcp.accept(&mut p, port, now);
                return;
            }
        };
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let drained = self.read_batches(&mut rx, fd, "a data port", pktinfo, |worker, rx, got| {
            for i in got {
                let (datagram, from) = rx.get(i);
                let arrival = Arrival {
                    slot: i,
                    local: rx.local(i),
                };
                worker.on_client_datagram(port, resets, arrival, datagram, from, now);
            }
            worker.flush_upstream(port, rx);
            rx.clear();
        });
        self.rx = Some(rx);
        if !drained {
            self.pending_ports.push(port);
        }
    }

    /// Reads `fd` into the free slots of `rx` until its queue is empty or the work bound is
    /// hit, handing the slots each read filled to `batch`, which must leave room in `rx` for
    /// the next; true when the queue was emptied. A read that fills fewer slots than were free
    /// means the queue was empty: a new datagram raises a new readiness edge, so no read is
    /// spent on learning `EAGAIN`.
    fn read_batches(
        &mut self,
        rx: &mut RecvBatch,
        fd: std::os::fd::RawFd,
        what: &str,
        pktinfo: bool,
        mut batch: impl FnMut(&mut Self, &mut RecvBatch, std::ops::Range<usize>),
    ) -> bool {
        let mut drained = false;
        for _ in 0..IO_LOOP_BOUND {
            let (from, room) = (rx.len(), rx.room());
            match rx.recv_more(fd, self.batch_io, pktinfo) {
                Ok(n) => {
                    batch(self, rx, from..from + n);
                    if n < room {
                        drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                // An earlier send drew an ICMP error, reported once; or a signal. The socket
                // stays usable.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    log::debug!("worker {}: receive on {what}: {e}", self.out.id);
                    drained = true;
                    break;
                }
            }
        }
        drained
    }

    /// A datagram of the receive batch, from a client on listener `port`; `resets`: the
    /// listener honours RESET magic (a token port).
    fn on_client_datagram(
        &mut self,
        port: usize,
        resets: bool,
        arrival: Arrival,
        datagram: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let Some(from) = from else {
            self.out.counters().drop(DropReason::NoSession, 1);
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
                if resets && let Some(body) = self.admission.control_body(datagram) {
                    if self.control_allowed(id, now) {
                        self.reset_session(id, body, now);
                    } else {
                        self.out.counters().drop(DropReason::RateLimited, 1);
                        self.listeners.count(port, DropReason::RateLimited);
                    }
                } else {
                    self.forward_upstream(id, arrival.slot, datagram.len(), now);
                }
            }
            None => {
                if self.is_own_datagram(port, arrival, from) {
                    self.out.counters().drop(DropReason::Loop, 1);
                    self.listeners.count(port, DropReason::Loop);
                    return;
                }
                // A flood from one address costs a table lookup, nothing more.
                if !self.admission.admit_packet(key.client.ip(), now) {
                    self.out.counters().drop(DropReason::RateLimited, 1);
                    self.listeners.count(port, DropReason::RateLimited);
                    return;
                }
                self.open_session(key, from, arrival, datagram, now);
            }
        }
    }

    /// Whether session `id` may have one more control packet looked at now (its allowance,
    /// [`ControlBudget`]); takes it if so.
    fn control_allowed(&mut self, id: SessionId, now: Instant) -> bool {
        match self.sessions.get_mut(id).map(|s| &mut s.upstream) {
            Some(Upstream::Udp(upstream)) => upstream.control.admit(now),
            _ => false,
        }
    }

    /// Whether a datagram from `from` to listener `port` left one of this proxy's own
    /// upstream sockets: some chain of forwarders or routes leads back here, and opening a
    /// session for it would loop without end. Checked for session-less datagrams only.
    fn is_own_datagram(&self, port: usize, arrival: Arrival, from: SocketAddr) -> bool {
        let Some(listener) = self.listeners.get(port) else {
            return false;
        };
        let to = arrival.local.unwrap_or(listener.local().ip());
        self.own_ports.is_own(from.ip(), from.port(), to)
    }

    /// Queues datagram `slot` of the receive batch (`len` bytes) for the session's backend; it
    /// leaves with the rest of the batch in [`Self::flush_upstream`].
    fn forward_upstream(&mut self, id: SessionId, slot: usize, len: usize, now: Instant) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let Upstream::Udp(upstream) = &mut session.upstream else {
            return;
        };
        session.last_active = now;
        let header_len = upstream.proxy.as_deref().map_or(0, ProxyState::next_len);
        if len + header_len > max_payload(upstream.key.ip()) {
            // The kernel would refuse it: no datagram this big reaches this backend with what
            // goes in front of it. The client's doing, counted as such; a `v2-first` header
            // stays pending for the next datagram.
            let port = usize::from(session.key.port);
            self.out.counters().drop(DropReason::Oversize, 1);
            self.listeners.count(port, DropReason::Oversize);
            return;
        }
        let entry = self.upstream_batch.next_entry();
        let header = match upstream.proxy.as_deref_mut() {
            Some(p) => p.take(entry),
            None => Header::None,
        };
        if matches!(header, Header::First(_)) {
            self.queued_headers.push((entry, id));
        }
        self.upstream_batch
            .push(upstream.pool.number(), slot, &upstream.dest, header);
        // The session's own counts include a datagram the kernel then refuses (rare); the
        // worker's count what left ([`Self::flush_upstream`]).
        session.stats.packets_upstream += 1;
        session.stats.bytes_upstream += len as u64;
    }

    /// Sends the client datagrams of `rx` (received on listener `port`) queued for their
    /// backends: one `sendmmsg` per shared upstream socket.
    fn flush_upstream(&mut self, port: usize, rx: &RecvBatch) {
        let sessions = &self.sessions;
        let sent = self.upstream_batch.flush(rx, self.batch_io, |n| {
            sessions.pool_fd(PoolRef::from_number(n))
        });
        let c = self.out.counters();
        c.packets_upstream.add(sent.packets);
        c.bytes_upstream.add(sent.bytes);
        if sent.dropped > 0 {
            c.drop(DropReason::UpstreamSend, sent.dropped);
        }
        // Once per batch: every datagram of it came in on this one listener.
        if let Some(slot) = self.listeners.slot(port) {
            slot.packets_upstream.add(sent.packets);
            slot.bytes_upstream.add(sent.bytes);
            slot.drop(DropReason::UpstreamSend, sent.dropped);
        }
        for &(entry, id) in &self.queued_headers {
            if let Some(session) = self.sessions.get_mut(id)
                && let Upstream::Udp(upstream) = &mut session.upstream
                && let Some(proxy) = upstream.proxy.as_deref_mut()
            {
                proxy.settle(entry, self.upstream_batch.header_lost(entry));
            }
        }
        self.queued_headers.clear();
    }

    // ---- backend side ----------------------------------------------------------------------

    /// Replies on a shared upstream socket: each goes to the session of its source address,
    /// out of that session's listener socket. They gather with those of the other upstream
    /// sockets ready this turn, so a listener's replies leave in one `sendmmsg` however many
    /// sockets they came from.
    fn drain_pool(&mut self, pool: PoolRef, now: Instant) {
        let Some(fd) = self.sessions.pool_fd(pool) else {
            return;
        };
        let Some(mut rx) = self.reply_rx.take() else {
            return;
        };
        let what = "an upstream socket";
        let drained = self.read_batches(&mut rx, fd, what, false, |worker, rx, got| {
            for i in got {
                let (datagram, from) = rx.get(i);
                worker.on_reply(pool, i, datagram, from, now);
            }
            if rx.room() == 0 {
                worker.flush_replies(rx);
            }
        });
        self.reply_rx = Some(rx);
        if !drained {
            self.pending_pools.push(pool);
        }
    }

    /// Reply `slot` of `reply_rx`, from `from` on upstream socket `pool`: queued for its
    /// session's client, to leave with the rest in [`Self::flush_replies`].
    fn on_reply(
        &mut self,
        pool: PoolRef,
        slot: usize,
        datagram: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let counters = self.out.counters();
        // Only a session's backend is heard: anything else reaching the socket is dropped.
        let Some(id) = from.and_then(|from| self.sessions.on_pool(pool, from)) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        let Some(session) = self.sessions.get_mut(id) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        // A listener lives as long as any of its sessions.
        let port = usize::from(session.key.port);
        let Some(slot_counts) = self.listeners.udp_slot(port) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        self.reply_batch
            .push(port as u32, slot, &session.client_sockaddr, session.local);
        session.last_active = now;
        session.stats.packets_downstream += 1;
        session.stats.bytes_downstream += datagram.len() as u64;
        counters.packets_downstream.add(1);
        counters.bytes_downstream.add(datagram.len() as u64);
        slot_counts.packets_downstream.add(1);
        slot_counts.bytes_downstream.add(datagram.len() as u64);
    }

    /// Sends the replies gathered this turn, if any.
    fn send_replies(&mut self) {
        if let Some(mut rx) = self.reply_rx.take() {
            if rx.len() > 0 {
                self.flush_replies(&mut rx);
            }
            self.reply_rx = Some(rx);
        }
    }

    /// Sends the replies of `rx` queued for their clients, then empties it: one `sendmmsg` per
    /// listener socket among them. Only the listeners with a reply in it are looked at, never
    /// every listener.
    fn flush_replies(&mut self, rx: &mut RecvBatch) {
        let listeners = &self.listeners;
        let dropped = self.reply_batch.flush(
            rx,
            self.batch_io,
            |n| listeners.udp_fd(n as usize),
            |n, lost| {
                if let Some(slot) = listeners.slot(n as usize) {
                    slot.drop(DropReason::DownstreamSend, lost);
                }
            },
        );
        if dropped > 0 {
            self.out
                .counters()
                .drop(DropReason::DownstreamSend, dropped);
        }
        rx.clear();
    }

    /// Gives sockets that hit the work bound last turn another turn.
    fn drain_backlog(&mut self, now: Instant) {
        if self.pending_ports.is_empty() && !self.tcp.has_backlog() && self.pending_pools.is_empty()
        {
            return;
        }
        let ports = std::mem::take(&mut self.pending_ports);
        for port in ports {
            self.drain_port(port, now);
        }
        let (ports, sessions) = self.tcp.take_backlog();
        for port in ports {
            self.drain_port(port, now);
        }
        let (mut p, tcp) = self.split();
        for id in sessions {
            tcp.drain_session(&mut p, id.slot(), now);
        }
        let pools = std::mem::take(&mut self.pending_pools);
        for pool in pools {
            self.drain_pool(pool, now);
        }
    }

    // ---- housekeeping ----------------------------------------------------------------------

    fn expire_idle(&mut self, now: Instant) {
        let registry = self.poll.registry();
        self.sessions
            .expire_idle(now, &mut self.listeners, registry, &self.out);
    }

    /// Drops spent grants and closes the upstream sockets of a passed peak, once a second.
    fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        self.admission.sweep_grants(now);
        self.sessions
            .sweep_pool(self.poll.registry(), &self.out, now);
    }

    fn close_session(&mut self, id: SessionId, reason: CloseReason) {
        let registry = self.poll.registry();
        self.sessions
            .close(id, reason, &mut self.listeners, registry, &self.out);
    }

    fn close_all(&mut self) {
        let registry = self.poll.registry();
        self.sessions
            .close_all(&mut self.listeners, registry, &self.out);
        self.tcp
            .close_pending_all(self.poll.registry(), self.sessions.limits());
    }
}

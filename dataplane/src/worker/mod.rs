//! One data-plane worker: a `mio` event loop owning its socket of every listener and a shard of
//! sessions. It handles control messages, client datagrams and connections, backend replies
//! and idle expiry, and never blocks on anything but `epoll_wait`.
//!
//! This file holds the loop, the layout of the poll tokens, and the [`Worker`] composed of
//! parts that each own their state: `listeners.rs` (this worker's listeners), `admission.rs`
//! (who gets a session, and where to), `sessions.rs` (the session table and upstream
//! sockets), `udp.rs` and `tcp.rs` (the two paths; `pending.rs` holds the TCP connections
//! waiting for their first bytes), `control.rs` (control's messages) and `pool.rs` (the
//! shared upstream sockets). The loop only dispatches events to them and does the
//! housekeeping between turns; it reads and writes no datagram itself. The paths borrow the
//! other parts through [`Parts`], never the whole worker.
//!
//! Per datagram the worker does one session lookup and one syscall (`send` upstream, or a share of
//! a `recvmmsg`/`sendmmsg` batch); everything else (socket setup, address encoding, counting
//! toward limits) happens once per session.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::CachePadded;
use mio::{Events, Poll, Registry, Token, Waker};

use crate::config::DataPlaneConfig;
use crate::ctl::{CloseReason, ControlMsg, WorkerEvent};
use crate::error::WorkerError;
use crate::io::fd_budget::FdBudget;
use crate::io::own_addrs::OwnPorts;
use crate::listener::MAX_LISTENERS;
use crate::liveness::{BEAT_INTERVAL, Heartbeat};
use crate::metrics::WorkerCounters;
use crate::policy::grant::{Grant, NonceLedger};
use crate::policy::limits::SessionLimits;
use crate::policy::session::{SessionId, SessionKind};
use crate::warn_gate::WarnGate;

mod admission;
mod control;
mod handoff;
mod listeners;
mod pending;
mod pool;
mod proxy_header;
mod sessions;
mod tcp;
mod udp;

use admission::Admission;
use listeners::Listeners;
use pool::PoolRef;
use sessions::Sessions;
use tcp::Tcp;
use udp::Udp;

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
    /// This worker's handle on the kernel fast path (`None`: off).
    pub(crate) fast_path: Option<crate::fastpath::WorkerMap>,
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

/// One worker: its poll, its control channel, and the parts it is composed of.
pub(crate) struct Worker {
    poll: Poll,
    control: Receiver<ControlMsg>,
    out: Outbox,
    listeners: Listeners,
    admission: Admission,
    sessions: Sessions,
    udp: Udp,
    tcp: Tcp,
    busy_poll: Duration,
    shutting_down: bool,
    next_sweep: Instant,
    /// Handing off (SPEC §12): it reads no listener or upstream socket, and its UDP sessions
    /// neither expire nor change until the hand-off ends.
    frozen: bool,
    /// The successor took its listeners and UDP sessions; it only finishes TCP sessions.
    handed_over: bool,
    /// Control messages that wait for the hand-off to end (see `defers`).
    deferred: Vec<ControlMsg>,
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
        let config = setup.config;
        let worker = Self {
            poll,
            control: setup.control,
            out: Outbox {
                id: setup.id,
                counters: setup.counters,
                events: setup.events,
                warn_gate: WarnGate::new(),
            },
            listeners: Listeners::new(setup.id),
            admission: Admission::new(setup.grants, config, setup.ledger, now),
            sessions: Sessions::new(
                config,
                setup.limits,
                Arc::clone(&setup.budget),
                Arc::clone(&setup.own_ports),
                setup.fast_path,
                now,
            ),
            udp: Udp::new(config, setup.own_ports),
            tcp: Tcp::new(config, setup.budget),
            busy_poll: config.busy_poll,
            shutting_down: false,
            next_sweep: now + SWEEP_INTERVAL,
            frozen: false,
            handed_over: false,
            deferred: Vec::new(),
        };
        Ok((worker, waker))
    }

    pub(crate) fn id(&self) -> usize {
        self.out.id
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
                        self.udp.send_replies(&self.listeners, &self.out);
                        self.admission.drain_grants();
                        self.drain_control(now);
                    }
                    // While handing off, the listener and upstream sockets are the successor's
                    // (or will be read again on a failure): an event this turn collected
                    // before the freeze is not acted on.
                    Token(t) if t < FIRST_SESSION => {
                        if !self.frozen {
                            self.drain_port(t - FIRST_LISTENER, now);
                        }
                    }
                    Token(t) if t >= FIRST_PENDING => {
                        let (mut p, _, tcp) = self.split();
                        tcp.on_pending(&mut p, t - FIRST_PENDING, now);
                    }
                    Token(t) if t >= FIRST_POOL => {
                        if self.frozen {
                            continue;
                        }
                        let (mut p, udp, _) = self.split();
                        udp.drain_pool(&mut p, PoolRef::from_number((t - FIRST_POOL) as u32), now);
                    }
                    Token(t) => {
                        let (mut p, _, tcp) = self.split();
                        tcp.on_session_event(&mut p, t - FIRST_SESSION, event, now);
                    }
                }
            }
            self.drain_backlog(now);
            self.udp.send_replies(&self.listeners, &self.out);
            if self.shutting_down {
                self.close_all();
                return Ok(());
            }
            // While a hand-off is under way the sessions stay as they were described.
            if !self.frozen || self.handed_over {
                self.sessions.expire_idle(
                    now,
                    &mut self.listeners,
                    self.poll.registry(),
                    &self.out,
                );
                let (mut p, _, tcp) = self.split();
                tcp.expire(&mut p, now);
                self.sweep(now);
            }
            self.listeners.retire_drained(self.poll.registry());
        }
    }

    /// The parts the paths borrow, and the two paths.
    fn split(&mut self) -> (Parts<'_>, &mut Udp, &mut Tcp) {
        let parts = Parts {
            registry: self.poll.registry(),
            out: &mut self.out,
            listeners: &mut self.listeners,
            admission: &mut self.admission,
            sessions: &mut self.sessions,
        };
        (parts, &mut self.udp, &mut self.tcp)
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.frozen && !self.handed_over {
            // A hand-off holds the timers (see `run`): their deadlines, past or not, must not
            // keep the loop spinning while the other side works. TCP events still wake it.
            return self.tcp.has_backlog().then_some(Duration::ZERO);
        }
        if self.udp.has_backlog() || self.tcp.has_backlog() {
            return Some(Duration::ZERO);
        }
        // Grants to drop, or sockets of a passed peak to close.
        let sweep = (self.admission.has_grants() || self.sessions.may_shrink())
            .then(|| self.next_sweep.saturating_duration_since(now));
        let closing = self.listeners.next_timeout();
        let tcp = self.tcp.next_timeout(now);
        [self.sessions.next_timeout(now), sweep, closing, tcp]
            .into_iter()
            .flatten()
            .min()
    }

    /// Listener `port` is readable: datagrams to read, or connections to accept.
    fn drain_port(&mut self, port: usize, now: Instant) {
        let (mut p, udp, tcp) = self.split();
        if !udp.drain_port(&mut p, port, now) {
            tcp.accept(&mut p, port, now);
        }
    }

    /// Gives sockets that hit the work bound last turn another turn.
    fn drain_backlog(&mut self, now: Instant) {
        if !self.udp.has_backlog() && !self.tcp.has_backlog() {
            return;
        }
        let ports = self.udp.take_ports_again();
        let tcp_ports = self.tcp.take_ports_again();
        let pools = self.udp.take_pools_again();
        if !self.frozen {
            for port in ports.into_iter().chain(tcp_ports) {
                self.drain_port(port, now);
            }
        }
        let frozen = self.frozen;
        let (mut p, udp, tcp) = self.split();
        for id in tcp.take_sessions_again() {
            tcp.drain_session(&mut p, id.slot(), now);
        }
        if !frozen {
            for pool in pools {
                udp.drain_pool(&mut p, pool, now);
            }
        }
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

    /// Ends every session and waiting connection (shutdown).
    fn close_all(&mut self) {
        let registry = self.poll.registry();
        self.sessions
            .close_all(&mut self.listeners, registry, &self.out);
        self.tcp.close_pending_all(registry, self.sessions.limits());
    }
}

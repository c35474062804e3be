//! The data plane's control API: messages from the control thread to workers, events from workers
//! back, and the [`Controller`] handle that sends them.
//!
//! Each worker has two channels plus a `mio::Waker`: grants travel on a bounded channel of their
//! own (a full one refuses the query as `overloaded`), state messages on an unbounded one, so
//! control never blocks on a slow worker. A worker that meets an unknown token drains the grant
//! channel only, so no state change lands in the middle of a half-handled batch. Workers never
//! block on control, and control never touches a worker's sessions directly.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::io::socket::{ListenSocket, bind_reuseport, probe_exclusive, unique_port};
use crate::listener::{
    CloseMode, ListenError, ListenerId, ListenerKind, ListenerSpec, OpenedListener, PortRegistry,
    Transport,
};

use crate::config::LiveSettings;
use crate::metrics::{CounterSnapshot, ListenerCounters, WorkerCounters};
use crate::policy::grant::{Backend, BackendId, Grant, TokenId};
use crate::policy::session::{SessionKind, SessionStats};

use crate::policy::session::MAX_IDLE_TIMEOUT;

mod handoff;
pub mod listing;
pub use listing::{SessionOrder, SessionPage, SessionQuery};

/// Capacity of each worker's grant channel: outstanding grants a worker has not looked at yet.
pub(crate) const GRANT_CHANNEL_CAPACITY: usize = 4096;

/// Callback that receives one worker's session listing.
pub type SessionListReply = Arc<dyn Fn(Vec<SessionInfo>) + Send + Sync>;
/// Callback that receives one worker's page of a session listing.
pub type SessionPageReply = Arc<dyn Fn(SessionPage) + Send + Sync>;
/// Callback that receives how many sessions one worker ended.
pub type KillReply = Arc<dyn Fn(usize) + Send + Sync>;

/// A state message from control to one worker (grants travel on their own channel).
pub(crate) enum ControlMsg {
    /// Start serving a listener on this worker's own socket of it.
    OpenListener {
        /// The listener's id.
        id: ListenerId,
        /// This worker's `SO_REUSEPORT` socket, already bound (and for TCP listening).
        socket: ListenSocket,
        /// What it does.
        kind: ListenerKind,
        /// Idle timeout of its sessions.
        idle_timeout: Duration,
        /// Its traffic counts, shared with control.
        counters: Arc<ListenerCounters>,
    },
    /// Change what a listener does with new clients, and the idle timeout it gives new
    /// sessions.
    UpdateListener {
        /// The listener's id.
        id: ListenerId,
        /// What it does from now on.
        kind: ListenerKind,
        /// Idle timeout of sessions it opens from now on.
        idle_timeout: Duration,
    },
    /// Close a listener (end its sessions, or let them drain); `closing` is told once this
    /// worker's socket is gone.
    CloseListener {
        /// The listener's id.
        id: ListenerId,
        /// End or drain.
        mode: CloseMode,
        /// Frees the port once every worker has let go of it.
        closing: Arc<Closing>,
    },
    /// New run-time settings (config reload).
    Reconfigure(Arc<LiveSettings>),
    /// The backend for clients without a token (`None`: drop them).
    SetDefault(Option<Arc<Backend>>),
    /// The backend left the inventory: token sessions to it end, default sessions move to the
    /// current default backend (or end if there is none).
    RemoveBackend(BackendId),
    /// Report the sessions the query asks for through the callback.
    ListSessions(SessionQuery, SessionPageReply),
    /// End matching sessions and report how many through the callback.
    KillSessions(ClientMatch, KillReply),
    /// Hand-off, old side (SPEC §12): stop reading every listener and upstream socket and
    /// send this worker's share (sockets duplicated, UDP sessions, grants).
    HandOffFreeze(crossbeam_channel::Sender<Result<crate::handoff::share::WorkerShare, String>>),
    /// Hand-off, old side: how it ended.
    HandOffEnd(crate::handoff::share::HandOffEnd),
    /// Hand-off, new side: the predecessor has let go; read what was adopted.
    HandOffGo,
    /// Hand-off, new side: take over these listeners, upstream sockets and sessions before
    /// anything else, without reading them; the reply says how many sessions, or why not.
    Adopt(
        Box<crate::handoff::share::Adoption>,
        crossbeam_channel::Sender<Result<usize, String>>,
    ),
    /// Open no new sessions from now on; keep forwarding for existing ones.
    Drain,
    /// Close everything and end the worker thread.
    Shutdown,
}

impl std::fmt::Debug for ControlMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OpenListener { id, kind, .. } => f
                .debug_struct("OpenListener")
                .field("id", id)
                .field("kind", kind)
                .finish_non_exhaustive(),
            Self::UpdateListener { id, kind, .. } => f
                .debug_struct("UpdateListener")
                .field("id", id)
                .field("kind", kind)
                .finish_non_exhaustive(),
            Self::CloseListener { id, mode, .. } => f
                .debug_struct("CloseListener")
                .field("id", id)
                .field("mode", mode)
                .finish_non_exhaustive(),
            Self::Reconfigure(l) => f.debug_tuple("Reconfigure").field(l).finish(),
            Self::SetDefault(b) => f.debug_tuple("SetDefault").field(b).finish(),
            Self::RemoveBackend(b) => f.debug_tuple("RemoveBackend").field(b).finish(),
            Self::ListSessions(q, _) => f.debug_tuple("ListSessions").field(q).finish(),
            Self::KillSessions(m, _) => f.debug_tuple("KillSessions").field(m).finish(),
            Self::HandOffFreeze(_) => f.write_str("HandOffFreeze"),
            Self::HandOffEnd(end) => f.debug_tuple("HandOffEnd").field(end).finish(),
            Self::Adopt(..) => f.write_str("Adopt"),
            Self::HandOffGo => f.write_str("HandOffGo"),
            Self::Drain => f.write_str("Drain"),
            Self::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// Which sessions a kill (or a listing's client or backend filter) applies to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ClientMatch {
    /// Every session of this client address (on any data port).
    Addr(SocketAddr),
    /// Every session of any client at this IP.
    Ip(IpAddr),
}

impl ClientMatch {
    pub(crate) fn matches(&self, client: SocketAddr) -> bool {
        match *self {
            Self::Addr(a) => a == client,
            Self::Ip(ip) => ip == client.ip(),
        }
    }
}

/// What a worker tells control. Sent per session, never per datagram.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum WorkerEvent {
    /// A session opened.
    SessionOpened {
        /// Backend it goes to.
        backend: BackendId,
        /// How it opened.
        kind: SessionKind,
        /// The token redeemed, for token sessions.
        token: Option<TokenId>,
    },
    /// A session moved to another backend (control packet or default-backend change).
    SessionMoved {
        /// Old backend.
        from: BackendId,
        /// New backend.
        to: BackendId,
        /// The token redeemed, for a control packet.
        token: Option<TokenId>,
    },
    /// A session ended.
    SessionClosed {
        /// Backend it went to.
        backend: BackendId,
        /// Why it ended.
        reason: CloseReason,
    },
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CloseReason {
    /// No traffic for the session timeout.
    Idle,
    /// Ended through the admin API.
    Killed,
    /// Its backend left the inventory.
    BackendRemoved,
    /// The worker shut down.
    Shutdown,
    /// Its listener was closed.
    ListenerClosed,
    /// A TCP session's connections both finished, or either was reset.
    ConnectionEnded,
    /// A TCP session's backend connection could not be established.
    UpstreamFailed,
}

/// One session, as the admin API lists it.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// Worker that owns it.
    pub worker: usize,
    /// Client address.
    pub client: SocketAddr,
    /// Data port index.
    pub data_port: usize,
    /// Transport of the data port.
    pub protocol: Transport,
    /// Backend address.
    pub target: SocketAddr,
    /// Backend identity.
    pub backend: BackendId,
    /// How it opened.
    pub kind: SessionKind,
    /// Time since it opened.
    pub age: Duration,
    /// Time since its last datagram.
    pub idle: Duration,
    /// Traffic counters (what the kernel fast path forwarded included).
    pub stats: SessionStats,
    /// Its established traffic is forwarded by the kernel fast path (SPEC §11).
    pub offloaded: bool,
}

/// The control plane is not keeping up: a worker's control channel is full or gone.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[error("a data-plane worker is not accepting control messages (channel full or worker gone)")]
pub struct Overloaded;

pub(crate) struct WorkerLink {
    /// Bounded: [`GRANT_CHANNEL_CAPACITY`].
    pub(crate) grants: Sender<Arc<Grant>>,
    /// Unbounded: state messages come at control's pace (inventory changes, admin requests,
    /// once-a-second refreshes), and a send must never block the control thread.
    pub(crate) tx: Sender<ControlMsg>,
    pub(crate) waker: Arc<mio::Waker>,
}

/// A listener being closed, shared by every worker. A draining listener keeps every worker's
/// socket until its sessions on *all* workers have ended: a worker that dropped its socket
/// early would shrink the `SO_REUSEPORT` group, the kernel would re-hash clients onto the
/// others, and a draining session's datagrams would land on a worker that does not know it.
/// The port stays registered until the last worker has dropped its socket, so nothing can join
/// the group of a listener that is going away.
#[derive(Debug)]
pub(crate) struct Closing {
    id: ListenerId,
    generation: u64,
    workers: usize,
    /// Workers that have handled the close and added their live sessions to `sessions`.
    joined: AtomicUsize,
    /// Live sessions of the listener on the workers that joined.
    sessions: AtomicUsize,
    /// Workers that have dropped their socket.
    released: AtomicUsize,
    registry: Arc<Mutex<PortRegistry>>,
}

impl Closing {
    /// A close shared by `workers` workers, of a listener no registry holds (tests).
    #[cfg(test)]
    pub(crate) fn detached(workers: usize) -> Self {
        Self {
            id: ListenerId(0),
            generation: 0,
            workers,
            joined: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            registry: Arc::default(),
        }
    }

    /// A worker handles the close; `sessions` of the listener live on it.
    pub(crate) fn join(&self, sessions: usize) {
        self.sessions.fetch_add(sessions, Ordering::AcqRel);
        self.joined.fetch_add(1, Ordering::AcqRel);
    }

    /// One of the sessions counted at `join` has ended.
    pub(crate) fn session_ended(&self) {
        self.sessions.fetch_sub(1, Ordering::AcqRel);
    }

    /// Every worker has joined and no session of the listener is left anywhere.
    pub(crate) fn drained(&self) -> bool {
        self.joined.load(Ordering::Acquire) == self.workers
            && self.sessions.load(Ordering::Acquire) == 0
    }

    /// One worker has dropped its socket of the listener; the last frees the port.
    pub(crate) fn release(&self) {
        if self.released.fetch_add(1, Ordering::AcqRel) + 1 == self.workers {
            self.registry.lock().finish_close(self.id, self.generation);
        }
    }
}

/// Socket settings of the listeners [`Controller::open_listener`] binds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SocketSettings {
    pub(crate) recv_buffer_bytes: usize,
    pub(crate) send_buffer_bytes: usize,
}

/// Cloneable handle through which control steers every worker and reads their counters.
#[derive(Clone)]
pub struct Controller {
    pub(crate) links: Arc<[WorkerLink]>,
    pub(crate) counters: Arc<[CachePadded<WorkerCounters>]>,
    pub(crate) limits: Arc<crate::policy::limits::SessionLimits>,
    /// The data plane's descriptors; a listener takes one per worker.
    pub(crate) budget: Arc<crate::io::fd_budget::FdBudget>,
    /// The host's addresses, to tell a target that is one of our own listeners.
    pub(crate) host: Arc<crate::io::own_addrs::HostAddrs>,
    pub(crate) registry: Arc<Mutex<PortRegistry>>,
    pub(crate) sockets: SocketSettings,
    /// The kernel fast path, while it is on.
    pub(crate) fast_path: Option<Arc<crate::fastpath::FastPath>>,
    /// The sealed tokens redeemed here (handed over to a successor).
    pub(crate) ledger: Arc<crate::policy::grant::NonceLedger>,
    /// What hand-offs did, either side.
    pub(crate) handoff: Arc<crate::handoff::stats::HandOffStats>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("workers", &self.links.len())
            .finish()
    }
}

impl Controller {
    /// What the kernel fast path forwarded so far; `None` while it is off (not asked for, or
    /// refused by the kernel).
    pub fn fast_path(&self) -> Option<crate::fastpath::FastPathTotals> {
        self.fast_path.as_ref().map(|f| f.totals())
    }

    /// What this process's hand-offs did (SPEC §12).
    pub fn handoff_stats(&self) -> &crate::handoff::stats::HandOffStats {
        &self.handoff
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.links.len()
    }

    /// Opens a listener on every worker. The sockets are bound here, on the caller's thread, so
    /// a port in use (by another listener of this data plane, or another process) comes back
    /// now with the reason and nothing is left open; the workers start serving it on their
    /// next loop turn.
    pub fn open_listener(&self, spec: ListenerSpec) -> Result<OpenedListener, ListenError> {
        let mut registry = self.registry.lock();
        // A listener handed over by the previous process on the same address is claimed,
        // not bound again: its sockets and sessions are in the workers already.
        if let Some(opened) = registry.claimable(&spec) {
            registry.claim(opened.id, spec.owner.clone());
            drop(registry);
            // A route reconciler opens its entry points before its first inventory, with no
            // rule yet: applied now, that would end every handed-over session on them. Its
            // first real table comes as an update.
            let placeholder =
                matches!(&spec.kind, ListenerKind::Route { table } if table.rules.is_empty());
            if !placeholder {
                self.update_listener(&opened, spec.kind, spec.idle_timeout);
            }
            return Ok(opened);
        }
        registry.check(&spec)?;
        let needed = self.links.len();
        // An eighth of the budget stays for sessions' sockets whatever the listeners take.
        let lease = self
            .budget
            .try_take_leaving(needed, self.budget.allowed() / 8)
            .ok_or_else(|| ListenError::Descriptors {
                needed,
                held: self.budget.held(),
                allowed: self.budget.allowed(),
            })?;
        let addr = if spec.bind.port() == 0 {
            unique_port(spec.bind, spec.transport)?
        } else {
            probe_exclusive(spec.bind, spec.transport)?;
            spec.bind
        };
        let mut sockets = Vec::with_capacity(self.links.len());
        for _ in 0..self.links.len() {
            sockets.push(bind_reuseport(
                addr,
                spec.transport,
                self.sockets.recv_buffer_bytes,
                self.sockets.send_buffer_bytes,
            )?);
        }
        let counters = Arc::new(ListenerCounters::new(self.links.len()));
        let (id, generation) = registry.insert(
            spec.transport,
            addr,
            spec.owner,
            Arc::clone(&counters),
            lease,
        )?;
        // Sent under the registry lock, so a close of this id can only come after the open in
        // every worker's channel.
        for (link, socket) in self.links.iter().zip(sockets) {
            let msg = ControlMsg::OpenListener {
                id,
                socket,
                kind: spec.kind.clone(),
                idle_timeout: spec.idle_timeout.min(MAX_IDLE_TIMEOUT),
                counters: Arc::clone(&counters),
            };
            if link.tx.send(msg).is_err() {
                // A worker has ended: the data plane is going down; undo what was opened.
                self.send_close(&mut registry, id, generation, CloseMode::End);
                return Err(ListenError::Stopped);
            }
            wake(link);
        }
        Ok(OpenedListener {
            id,
            addr,
            generation,
        })
    }

    /// The listener that a session to `target` over `transport` would reach if it were
    /// opened: `target` is on this host and one of our listeners holds its port. A forwarder
    /// or route aimed there would proxy to itself without end, so it is refused.
    pub fn own_listener_at(&self, target: SocketAddr, transport: Transport) -> Option<String> {
        let (holder, bound) = self
            .registry
            .lock()
            .holder_bound(transport, target.port())?;
        // A listener bound to one address is reached only there (or, for a loopback one, on
        // any loopback address); a wildcard one on every address of the host.
        let target_ip = target.ip().to_canonical();
        let bound_ip = bound.to_canonical();
        let reached = if bound_ip.is_unspecified() {
            self.is_local_address(target_ip)
        } else {
            target_ip == bound_ip || (target_ip.is_loopback() && bound_ip.is_loopback())
        };
        reached.then_some(holder)
    }

    /// Whether traffic to `ip` stays on this host (loopback, a wildcard, or an address of one
    /// of its interfaces).
    pub fn is_local_address(&self, ip: std::net::IpAddr) -> bool {
        self.host.is_local(ip)
    }

    /// Descriptors the data plane holds, and may hold (the limit less the control reserve).
    pub fn descriptors(&self) -> (usize, usize) {
        (self.budget.held(), self.budget.allowed())
    }

    /// The traffic counts of a listener that is open (or closing), to keep and read at
    /// scrape time; `None` for a stale handle. The counts stay readable after the close.
    pub fn listener_counters(&self, listener: &OpenedListener) -> Option<Arc<ListenerCounters>> {
        self.registry
            .lock()
            .counters(listener.id, listener.generation)
    }

    /// Changes an open listener on every worker while it serves: its kind, and the idle
    /// timeout of the sessions it opens from now on (live sessions keep theirs). Returns false,
    /// changing nothing, for a listener that is closed or closing or a stale handle.
    pub fn update_listener(
        &self,
        listener: &OpenedListener,
        kind: ListenerKind,
        idle_timeout: Duration,
    ) -> bool {
        // Under the lock: a close of this listener can only come after the update in every
        // worker's channel.
        let registry = self.registry.lock();
        if !registry.is_open(listener.id, listener.generation) {
            return false;
        }
        self.broadcast(|| ControlMsg::UpdateListener {
            id: listener.id,
            kind: kind.clone(),
            idle_timeout: idle_timeout.min(MAX_IDLE_TIMEOUT),
        });
        drop(registry);
        true
    }

    /// Closes a listener on every worker: `End` ends its sessions now, `Drain` takes no new
    /// ones and closes once the last has ended. Other listeners and their sessions are not
    /// touched. The port can be opened again once every worker has let go of it.
    /// Closing a listener that is not open (closed already, closing, or a stale handle whose
    /// id a later listener reuses) does nothing.
    pub fn close_listener(&self, listener: &OpenedListener, mode: CloseMode) {
        let mut registry = self.registry.lock();
        self.send_close(&mut registry, listener.id, listener.generation, mode);
    }

    fn send_close(
        &self,
        registry: &mut PortRegistry,
        id: ListenerId,
        generation: u64,
        mode: CloseMode,
    ) {
        if !registry.begin_close(id, generation) {
            return;
        }
        let closing = Arc::new(Closing {
            id,
            generation,
            workers: self.links.len(),
            joined: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            registry: Arc::clone(&self.registry),
        });
        for link in self.links.iter() {
            let msg = ControlMsg::CloseListener {
                id,
                mode,
                closing: Arc::clone(&closing),
            };
            if link.tx.send(msg).is_ok() {
                wake(link);
            } else {
                // An ended worker holds no socket and no session. (Not `release`: the registry
                // is locked here; with every worker gone the port is never reused anyway.)
                closing.join(0);
                closing.released.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Publishes a grant to every worker. Must complete before the token is handed to the
    /// client, so that whichever worker the client's datagram reaches finds it in its table or
    /// its channel.
    ///
    /// Workers are not woken for a grant: one that meets an unknown token drains its channel
    /// first, so the wake-up (a syscall per worker per query, and a spurious loop turn in every
    /// worker) is only needed to keep an idle worker's channel from filling up.
    pub fn publish_grant(&self, grant: Grant) -> Result<(), Overloaded> {
        let grant = Arc::new(grant);
        for link in self.links.iter() {
            match link.grants.try_send(Arc::clone(&grant)) {
                Ok(()) => {
                    if link.grants.len() >= GRANT_CHANNEL_CAPACITY / 2 {
                        wake(link);
                    }
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    return Err(Overloaded);
                }
            }
        }
        Ok(())
    }

    /// Applies new run-time settings: the session caps at once, the rest in each worker as it
    /// reads its control messages (new sessions and connections follow them; the data ports'
    /// open sessions take the new idle timeout).
    pub fn reconfigure(&self, live: LiveSettings) {
        self.limits
            .set_caps(live.max_sessions, live.max_sessions_per_ip);
        let live = Arc::new(live);
        self.broadcast(|| ControlMsg::Reconfigure(Arc::clone(&live)));
    }

    /// Sets (or clears) the default backend on every worker.
    pub fn set_default(&self, backend: Option<Backend>) {
        let backend = backend.map(Arc::new);
        self.broadcast(|| ControlMsg::SetDefault(backend.clone()));
    }

    /// Ends sessions to a backend that left the inventory (default sessions move).
    pub fn remove_backend(&self, backend: BackendId) {
        self.broadcast(|| ControlMsg::RemoveBackend(backend));
    }

    /// Asks every worker for all its sessions; `reply` is called once per worker that got the
    /// ask. Returns how many workers were asked.
    pub fn list_sessions(&self, reply: SessionListReply) -> usize {
        self.list_session_page(
            SessionQuery::default(),
            Arc::new(move |page: SessionPage| reply(page.sessions)),
        )
    }

    /// Asks every worker for its first sessions that `query` admits, in [`SessionOrder`];
    /// `reply` is called once per worker that got the ask. Returns how many workers were asked.
    pub fn list_session_page(&self, query: SessionQuery, reply: SessionPageReply) -> usize {
        self.broadcast(|| ControlMsg::ListSessions(query.clone(), Arc::clone(&reply)))
    }

    /// The owner of each open (or closing) listener, as it was opened (`data port game`,
    /// `forwarder games/fw`, `entry point game`), by listener id.
    pub fn listener_owners(&self) -> Vec<(ListenerId, String)> {
        self.registry.lock().owners()
    }

    /// Ends matching sessions; `reply` is called once per worker with its count. Returns how
    /// many workers were asked.
    pub fn kill_sessions(&self, client: ClientMatch, reply: KillReply) -> usize {
        self.broadcast(|| ControlMsg::KillSessions(client, Arc::clone(&reply)))
    }

    /// Stops opening sessions; existing ones keep forwarding.
    pub fn drain(&self) {
        self.broadcast(|| ControlMsg::Drain);
    }

    /// Ends every worker (join them with [`crate::DataPlane::join`]).
    pub fn shutdown(&self) {
        self.broadcast(|| ControlMsg::Shutdown);
    }

    /// Sum of all workers' counters now.
    pub fn counters(&self) -> CounterSnapshot {
        let mut snapshot = CounterSnapshot::default();
        for c in self.counters.iter() {
            snapshot.add(c);
        }
        snapshot
    }

    /// Sends a state message to every worker; the channel is unbounded, so this never blocks.
    /// Returns how many workers took it (a worker that ended takes nothing).
    fn broadcast(&self, msg: impl Fn() -> ControlMsg) -> usize {
        let mut sent = 0;
        for link in self.links.iter() {
            if link.tx.send(msg()).is_ok() {
                wake(link);
                sent += 1;
            }
        }
        sent
    }
}

fn wake(link: &WorkerLink) {
    if let Err(e) = link.waker.wake() {
        log::warn!("could not wake a data-plane worker: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::grant::Backend;

    /// A controller whose one "worker" is the test: nothing drains its channels.
    fn stalled_controller() -> (
        Controller,
        crossbeam_channel::Receiver<Arc<Grant>>,
        crossbeam_channel::Receiver<ControlMsg>,
        mio::Poll,
    ) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (grants, grant_rx) = crossbeam_channel::bounded(GRANT_CHANNEL_CAPACITY);
        let (tx, rx) = crossbeam_channel::unbounded();
        let controller = Controller {
            links: vec![WorkerLink { grants, tx, waker }].into(),
            counters: vec![CachePadded::new(WorkerCounters::default())].into(),
            limits: Arc::new(crate::policy::limits::SessionLimits::new(1, None)),
            budget: crate::io::fd_budget::FdBudget::for_process(0),
            host: Arc::default(),
            registry: Arc::default(),
            sockets: SocketSettings {
                recv_buffer_bytes: 1 << 16,
                send_buffer_bytes: 1 << 16,
            },
            fast_path: None,
            ledger: Arc::default(),
            handoff: Arc::default(),
        };
        (controller, grant_rx, rx, poll)
    }

    fn grant(n: u128) -> Grant {
        let backend = Backend {
            id: BackendId(1),
            addrs: vec![Some("127.0.0.1:1".parse().unwrap())].into(),
            proxy: Default::default(),
        };
        Grant::new(
            TokenId(n),
            backend,
            std::time::Instant::now() + Duration::from_secs(30),
        )
    }

    #[test]
    fn a_stalled_worker_refuses_grants_but_never_blocks_control() {
        let (controller, grant_rx, rx, _poll) = stalled_controller();
        for n in 0..GRANT_CHANNEL_CAPACITY as u128 {
            controller.publish_grant(grant(n)).unwrap();
        }
        assert_eq!(controller.publish_grant(grant(u128::MAX)), Err(Overloaded));
        // State messages to the same worker: far more than any bounded channel would hold, and
        // each send returns at once (a blocking send would hang this test).
        for _ in 0..3 * GRANT_CHANNEL_CAPACITY {
            controller.set_default(None);
        }
        assert_eq!(rx.len(), 3 * GRANT_CHANNEL_CAPACITY);
        assert_eq!(grant_rx.len(), GRANT_CHANNEL_CAPACITY);
    }

    #[test]
    fn a_target_is_our_own_listener_only_where_that_listener_is_reached() {
        let (controller, _grants, _rx, _poll) = stalled_controller();
        let spec = |bind: &str| ListenerSpec {
            owner: "forwarder games/fw".into(),
            bind: bind.parse().unwrap(),
            transport: Transport::Udp,
            kind: ListenerKind::TokenPort,
            idle_timeout: Duration::from_secs(30),
        };
        let lo = controller.open_listener(spec("127.0.0.1:0")).unwrap().addr;
        let at = |ip: &str, port: u16| {
            controller.own_listener_at(SocketAddr::new(ip.parse().unwrap(), port), Transport::Udp)
        };
        assert_eq!(
            at("127.0.0.1", lo.port()).as_deref(),
            Some("forwarder games/fw")
        );
        assert!(at("127.0.0.2", lo.port()).is_some(), "any loopback address");
        assert!(at("192.0.2.1", lo.port()).is_none(), "not this host");
        assert!(
            at("127.0.0.1", lo.port().wrapping_add(1)).is_none(),
            "not our port"
        );
        assert!(
            controller.own_listener_at(lo, Transport::Tcp).is_none(),
            "not our protocol"
        );
        // A wildcard listener is reached on every address of the host.
        let any = controller.open_listener(spec("0.0.0.0:0")).unwrap().addr;
        assert!(at("127.0.0.1", any.port()).is_some());
        assert!(at("0.0.0.0", any.port()).is_some());
        assert!(at("192.0.2.1", any.port()).is_none());
    }
}

//! This worker's listeners: its socket of each (indexed by listener id), the listener's kind and
//! idle timeout, how many of its sessions live here, its counts, its place in a route table's
//! rotations, and which listeners are closing. Opening registers a socket; retiring (once a
//! closing listener has drained on every worker) deregisters and drops it.
//!
//! It holds no session and decides nothing about clients: the session table tells it when a
//! session starts or ends on a listener, and admission reads a listener's kind from it. It
//! never reads or writes a datagram.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use mio::{Interest, Registry};

use crate::ctl::Closing;
use crate::handoff::share::ListenerShare;
use crate::io::pktinfo;
use crate::io::socket::ListenSocket;
use crate::listener::{CloseMode, ListenerId, ListenerKind, Transport};
use crate::metrics::{DropReason, ListenerCounters, ListenerSlot};
use crate::policy::route::{Pick, Picker, RouteTable};

use super::listener_token;

/// How often a worker looks whether a draining listener has drained on every worker.
const CLOSING_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// This worker's socket of one listener.
pub(super) enum ListenerIo {
    /// A datagram socket. Replies to its clients go out in the worker's reply batch: an idle
    /// listener holds no buffer.
    Udp {
        socket: mio::net::UdpSocket,
        /// Bound to a wildcard address: each datagram's destination is read (`IP_PKTINFO`)
        /// and replies leave from it.
        pktinfo: bool,
    },
    /// A listening stream socket.
    Tcp(mio::net::TcpListener),
}

/// This worker's side of one listener.
pub(super) struct Listener {
    io: ListenerIo,
    /// The address its socket is bound to.
    local: SocketAddr,
    kind: ListenerKind,
    /// Idle timeout of its sessions.
    idle_timeout: Duration,
    /// Live sessions on it in this worker, so a draining listener knows when to close.
    sessions: usize,
    /// Set once a close was asked (no new sessions); told when this worker's socket is gone.
    closing: Option<Arc<Closing>>,
    /// Its traffic counts; this worker writes its own slot.
    counters: Arc<ListenerCounters>,
    /// This worker's place in the route table's rotations (route entry points).
    picker: Picker,
}

impl Listener {
    pub(super) fn io(&self) -> &ListenerIo {
        &self.io
    }

    /// The address its socket is bound to.
    pub(super) fn local(&self) -> SocketAddr {
        self.local
    }

    pub(super) fn kind(&self) -> &ListenerKind {
        &self.kind
    }

    /// A close was asked: it takes no new sessions.
    pub(super) fn is_closing(&self) -> bool {
        self.closing.is_some()
    }
}

/// This worker's listeners.
pub(super) struct Listeners {
    /// This worker's index: its slot in each listener's counters.
    worker: usize,
    /// Indexed by listener id; `None` where no listener is open.
    slab: Vec<Option<Listener>>,
    /// The indexes of the listeners that are closing (draining): the loop looks at these,
    /// never at every listener.
    closing: Vec<usize>,
}

impl Listeners {
    /// No listener yet, for worker `worker`.
    pub(super) fn new(worker: usize) -> Self {
        Self {
            worker,
            slab: Vec::new(),
            closing: Vec::new(),
        }
    }

    /// Registers this worker's socket of listener `id`; a socket that cannot be served is
    /// logged and dropped (the listener is then not open here).
    pub(super) fn open(
        &mut self,
        registry: &Registry,
        id: ListenerId,
        socket: ListenSocket,
        kind: ListenerKind,
        idle_timeout: Duration,
        counters: Arc<ListenerCounters>,
    ) {
        let index = usize::from(id.0);
        let token = listener_token(index);
        let worker = self.worker;
        let local = match &socket {
            ListenSocket::Udp(s) => s.local_addr(),
            ListenSocket::Tcp(l) => l.local_addr(),
        };
        let local = match local {
            Ok(local) => local,
            Err(e) => {
                log::error!("worker {worker}: cannot serve listener {index}: {e}");
                return;
            }
        };
        let registered = match socket {
            ListenSocket::Udp(socket) => {
                let mut socket = mio::net::UdpSocket::from_std(socket);
                // On a wildcard address, each datagram's destination is read so that replies
                // leave from it (multi-homed nodes, secondary IPs).
                let pktinfo = local.ip().is_unspecified()
                    && match pktinfo::enable(socket.as_raw_fd(), local.is_ipv6()) {
                        Ok(()) => true,
                        Err(e) => {
                            log::warn!(
                                "worker {worker}: listener {index} on {local}: no packet info \
                                 ({e}): replies leave from the kernel's choice of address"
                            );
                            false
                        }
                    };
                registry
                    .register(&mut socket, token, Interest::READABLE)
                    .map(|()| ListenerIo::Udp { socket, pktinfo })
            }
            ListenSocket::Tcp(listener) => {
                let mut listener = mio::net::TcpListener::from_std(listener);
                registry
                    .register(&mut listener, token, Interest::READABLE)
                    .map(|()| ListenerIo::Tcp(listener))
            }
        };
        let io = match registered {
            Ok(io) => io,
            Err(e) => {
                log::error!("worker {worker}: cannot serve listener {index}: {e}");
                return;
            }
        };
        if self.slab.len() <= index {
            self.slab.resize_with(index + 1, || None);
        }
        self.slab[index] = Some(Listener {
            io,
            local,
            kind,
            idle_timeout,
            sessions: 0,
            closing: None,
            counters,
            picker: Picker::default(),
        });
    }

    /// Listener `port`, while it is open.
    #[inline]
    pub(super) fn get(&self, port: usize) -> Option<&Listener> {
        self.slab.get(port).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, port: usize) -> Option<&mut Listener> {
        self.slab.get_mut(port).and_then(Option::as_mut)
    }

    /// The address listener `port` is bound to, while it is open.
    #[inline]
    pub(super) fn local_addr(&self, port: usize) -> Option<std::net::SocketAddr> {
        self.get(port).map(|l| l.local)
    }

    /// This worker's counts of listener `port`, while it is open.
    #[inline]
    pub(super) fn slot(&self, port: usize) -> Option<&ListenerSlot> {
        self.get(port).map(|l| l.counters.slot(self.worker))
    }

    /// This worker's counts of UDP listener `port`, while it is open.
    #[inline]
    pub(super) fn udp_slot(&self, port: usize) -> Option<&ListenerSlot> {
        match self.get(port)? {
            l @ Listener {
                io: ListenerIo::Udp { .. },
                ..
            } => Some(l.counters.slot(self.worker)),
            _ => None,
        }
    }

    /// The socket of UDP listener `port`, while it is open.
    #[inline]
    pub(super) fn udp_fd(&self, port: usize) -> Option<RawFd> {
        match &self.get(port)?.io {
            ListenerIo::Udp { socket, .. } => Some(socket.as_raw_fd()),
            ListenerIo::Tcp(_) => None,
        }
    }

    /// Counts a datagram dropped, or a connection refused, on listener `port` for `reason`
    /// (the worker-wide count is the caller's).
    pub(super) fn count(&self, port: usize, reason: DropReason) {
        if let Some(slot) = self.slot(port) {
            slot.drop(reason, 1);
        }
    }

    /// The proxy address a client of listener `port` sent to: `local` (from packet info) or
    /// else the listener's own.
    pub(super) fn proxy_address(&self, port: usize, local: Option<IpAddr>) -> Option<SocketAddr> {
        let bound = self.get(port)?.local;
        Some(SocketAddr::new(local.unwrap_or(bound.ip()), bound.port()))
    }

    /// Picks the endpoint of a new client of route entry point `port` (with this worker's
    /// rotation state); `None`: no rule takes it, or its rule has no ready endpoint.
    pub(super) fn pick_route(
        &mut self,
        port: usize,
        client: SocketAddr,
    ) -> Option<(Pick, Arc<RouteTable>)> {
        let listener = self.get_mut(port)?;
        let ListenerKind::Route { table } = &listener.kind else {
            return None;
        };
        let table = Arc::clone(table);
        let pick = table.pick(&mut listener.picker, client)?;
        Some((pick, table))
    }

    /// A new endpoint under `table` for a session of route entry point `port` whose endpoint
    /// (Service `key`) the table no longer lists, with this worker's rotation state.
    pub(super) fn rehome(
        &mut self,
        port: usize,
        table: &RouteTable,
        key: u64,
        client: SocketAddr,
    ) -> Option<Pick> {
        let listener = self.get_mut(port)?;
        table.rehome(&mut listener.picker, key, client)
    }

    /// Gives listener `port` a new kind and idle timeout (for the sessions it opens from now
    /// on), its rotations starting afresh; returns the kind it had (`None`: not open).
    pub(super) fn update(
        &mut self,
        port: usize,
        kind: ListenerKind,
        idle_timeout: Duration,
    ) -> Option<ListenerKind> {
        let listener = self.get_mut(port)?;
        let old = std::mem::replace(&mut listener.kind, kind);
        listener.idle_timeout = idle_timeout;
        listener.picker.reset();
        Some(old)
    }

    /// Gives every token port the idle timeout `timeout`; returns (listener, old timeout) of
    /// those it changed.
    pub(super) fn set_token_port_timeout(&mut self, timeout: Duration) -> Vec<(usize, Duration)> {
        let mut changed = Vec::new();
        for (index, listener) in self.slab.iter_mut().enumerate() {
            if let Some(l) = listener
                && matches!(l.kind, ListenerKind::TokenPort)
                && l.idle_timeout != timeout
            {
                changed.push((index, l.idle_timeout));
                l.idle_timeout = timeout;
            }
        }
        changed
    }

    /// A session started on listener `port`: counted, and its idle timeout (the listener's,
    /// unless `own` is given). `None`: no such listener.
    pub(super) fn session_opened(
        &mut self,
        port: usize,
        own: Option<Duration>,
    ) -> Option<Duration> {
        let worker = self.worker;
        let listener = self.get_mut(port)?;
        listener.sessions += 1;
        listener
            .counters
            .slot(worker)
            .sessions
            .set(listener.sessions as u64);
        Some(own.unwrap_or(listener.idle_timeout))
    }

    /// A session on listener `port` ended: a draining listener closes with its last session.
    pub(super) fn session_ended(&mut self, registry: &Registry, port: usize) {
        let worker = self.worker;
        if let Some(listener) = self.get_mut(port) {
            listener.sessions = listener.sessions.saturating_sub(1);
            listener
                .counters
                .slot(worker)
                .sessions
                .set(listener.sessions as u64);
            // Counted in the drain only if it lived when this worker joined the close (a
            // closing listener takes no new sessions, so every one it has did).
            if let Some(closing) = &listener.closing {
                closing.session_ended();
            }
        }
        self.retire_if_drained(registry, port);
    }

    /// Starts closing listener `port` in this worker, its sessions already ended under
    /// [`CloseMode::End`]: `End` drops the socket now, `Drain` once its sessions on every
    /// worker have ended. A listener not open here only joins and leaves the close.
    pub(super) fn close(
        &mut self,
        registry: &Registry,
        port: usize,
        mode: CloseMode,
        closing: Arc<Closing>,
    ) {
        let Some(listener) = self.get(port) else {
            // Its open never reached this worker (the registration failed).
            closing.join(0);
            closing.release();
            return;
        };
        if mode == CloseMode::End {
            // Ended here and now, whatever the other workers do.
            closing.join(0);
            self.set_closing(port, closing);
            self.retire(registry, port);
            return;
        }
        closing.join(listener.sessions);
        self.set_closing(port, closing);
        self.retire_if_drained(registry, port);
    }

    // ---- hand-off (SPEC §12) ---------------------------------------------------------------

    /// Stops reading and accepting on every listener (the successor does now, or this worker
    /// will again after [`Self::resume`]) and describes each, with a duplicate of this worker's
    /// socket of it.
    pub(super) fn freeze(&mut self, registry: &Registry) -> std::io::Result<Vec<ListenerShare>> {
        let mut all = Vec::new();
        for (index, listener) in self.slab.iter_mut().enumerate() {
            let Some(listener) = listener else { continue };
            let (transport, fd) = match &mut listener.io {
                ListenerIo::Udp { socket, .. } => {
                    let _ = registry.deregister(socket);
                    (Transport::Udp, socket.as_fd().try_clone_to_owned()?)
                }
                ListenerIo::Tcp(tcp) => {
                    let _ = registry.deregister(tcp);
                    (Transport::Tcp, tcp.as_fd().try_clone_to_owned()?)
                }
            };
            all.push(ListenerShare {
                id: ListenerId(index as u16),
                transport,
                local: listener.local,
                kind: listener.kind.clone(),
                idle_timeout: listener.idle_timeout,
                fd,
                closing: listener.closing.is_some(),
            });
        }
        Ok(all)
    }

    /// Reads and accepts on every listener again, from what waits now: after a freeze (the
    /// hand-off failed) or in the new process once its predecessor has let go.
    pub(super) fn resume(&mut self, registry: &Registry) {
        for (index, listener) in self.slab.iter_mut().enumerate() {
            let Some(listener) = listener else { continue };
            let token = listener_token(index);
            let armed = match &mut listener.io {
                ListenerIo::Udp { socket, .. } => {
                    super::handoff::read_again(registry, socket, token)
                }
                ListenerIo::Tcp(tcp) => super::handoff::read_again(registry, tcp, token),
            };
            if let Err(e) = armed {
                log::error!("hand-off: listener {index} cannot be read: {e}");
            }
        }
    }

    /// Lets go of every listener's socket (handed over): the successor has its own copies.
    /// Their sessions here (TCP, finishing) keep going without them.
    pub(super) fn drop_all(&mut self, registry: &Registry) {
        for port in 0..self.slab.len() {
            if self.slab[port].is_some() {
                self.retire(registry, port);
            }
        }
    }

    /// Looks at every draining listener (they may have drained on other workers).
    pub(super) fn retire_drained(&mut self, registry: &Registry) {
        // The closing ones only (a dirty list), never every listener.
        for at in (0..self.closing.len()).rev() {
            if let Some(&index) = self.closing.get(at) {
                self.retire_if_drained(registry, index);
            }
        }
    }

    /// How long until the loop should look at the draining listeners again.
    pub(super) fn next_timeout(&self) -> Option<Duration> {
        // A draining listener may finish on another worker: look again now and then.
        (!self.closing.is_empty()).then_some(CLOSING_CHECK_INTERVAL)
    }

    fn set_closing(&mut self, port: usize, closing: Arc<Closing>) {
        if let Some(listener) = self.get_mut(port) {
            listener.closing = Some(closing);
            self.closing.push(port);
        }
    }

    /// Drops a draining listener's socket once its sessions on every worker have ended.
    fn retire_if_drained(&mut self, registry: &Registry, port: usize) {
        let drained = self
            .get(port)
            .and_then(|l| l.closing.as_ref())
            .is_some_and(|c| c.drained());
        if drained {
            self.retire(registry, port);
        }
    }

    /// Drops a closing listener's socket, and says so. A reply still queued for it finds no
    /// socket when the batch is sent and is dropped (counted); none can leave by a later
    /// listener that reuses the id, since control messages, which open listeners, are handled
    /// only after the queued replies are sent.
    fn retire(&mut self, registry: &Registry, port: usize) {
        if let Some(mut listener) = self.slab.get_mut(port).and_then(Option::take) {
            let _ = match &mut listener.io {
                ListenerIo::Udp { socket, .. } => registry.deregister(socket),
                ListenerIo::Tcp(tcp) => registry.deregister(tcp),
            };
            let closing = listener.closing.take();
            drop(listener);
            if let Some(closing) = closing {
                self.closing.retain(|&i| i != port);
                closing.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp() -> ListenSocket {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        ListenSocket::Udp(socket)
    }

    fn open(l: &mut Listeners, registry: &Registry, id: u16) {
        l.open(
            registry,
            ListenerId(id),
            udp(),
            ListenerKind::TokenPort,
            Duration::from_secs(30),
            Arc::new(ListenerCounters::new(1)),
        );
    }

    #[test]
    fn only_closing_listeners_are_looked_at_and_each_retires_once_drained() {
        let poll = mio::Poll::new().unwrap();
        let registry = poll.registry();
        let mut l = Listeners::new(0);
        for id in 0..3 {
            open(&mut l, registry, id);
        }
        assert_eq!(l.next_timeout(), None, "nothing closing: no wake-up for it");
        // Listener 1 drains with a live session: it stays until the session ends.
        assert!(l.session_opened(1, None).is_some());
        l.close(
            registry,
            1,
            CloseMode::Drain,
            Arc::new(Closing::detached(1)),
        );
        assert!(l.get(1).is_some_and(Listener::is_closing));
        assert_eq!(l.next_timeout(), Some(CLOSING_CHECK_INTERVAL));
        l.retire_drained(registry);
        assert!(l.get(1).is_some(), "not drained yet");
        l.session_ended(registry, 1);
        assert!(l.get(1).is_none(), "retired with its last session");
        assert_eq!(l.next_timeout(), None, "and off the closing list");
        // `End` retires at once; the others are untouched.
        l.close(registry, 2, CloseMode::End, Arc::new(Closing::detached(1)));
        assert!(l.get(2).is_none());
        assert_eq!(l.next_timeout(), None);
        assert!(l.get(0).is_some_and(|x| !x.is_closing()));
        // An id reused by a new listener is open, not closing.
        open(&mut l, registry, 1);
        assert!(l.get(1).is_some_and(|x| !x.is_closing()));
        l.retire_drained(registry);
        assert!(l.get(1).is_some());
    }
}

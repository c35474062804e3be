//! A worker's shared upstream sockets (the assignment is sans-io in `crate::policy::upstream`):
//! opened as sessions need them, within the data plane's descriptor budget, each knowing the
//! session behind every backend address it serves, so a reply is routed by (socket, source
//! address); closed again when a peak has passed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use std::sync::Arc;

use ahash::AHashMap;
use mio::{Interest, Registry, Token};

use crate::io::fd_budget::{FdBudget, FdLease};
use crate::io::own_addrs::OwnPorts;
use crate::io::socket::bind_upstream_udp;
use crate::policy::session::SessionId;
use crate::policy::upstream::{SOCKET_IDLE, SocketAssigner, peer_key};

use super::FIRST_POOL;

/// A session's shared upstream socket: `index * 2`, plus 1 for the IPv6 sockets.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct PoolRef(u32);

impl PoolRef {
    fn new(index: u32, ipv6: bool) -> Self {
        Self(index * 2 + u32::from(ipv6))
    }

    fn index(self) -> usize {
        (self.0 / 2) as usize
    }

    /// Whether it is one of the IPv6 sockets.
    pub(crate) fn ipv6(self) -> bool {
        self.0 % 2 == 1
    }

    /// Its number in an [`crate::io::batch::UpstreamBatch`].
    pub(crate) fn number(self) -> u32 {
        self.0
    }

    /// The pool socket a batch number or poll token names.
    pub(crate) fn from_number(n: u32) -> Self {
        Self(n)
    }

    /// Its poll token.
    pub(crate) fn token(self) -> Token {
        Token(FIRST_POOL + self.0 as usize)
    }
}

#[derive(Debug)]
struct PoolSocket {
    socket: mio::net::UdpSocket,
    /// The session each backend address this socket serves belongs to.
    peers: AHashMap<SocketAddr, SessionId>,
    /// Since when it has served no session (`None` while it serves one).
    idle_since: Option<Instant>,
    /// Its local port (in [`OwnPorts`] while it is open).
    port: u16,
    /// Its descriptor, paid for from the data plane's budget.
    _lease: FdLease,
}

/// Why a session got no place on a shared upstream socket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    /// A wildcard, broadcast or multicast backend, or port 0: every datagram would fail.
    #[error("not a unicast address a session can send to")]
    NotUnicast,
    /// Opening one more socket would eat into the descriptors kept for the control thread.
    #[error("the descriptor budget is spent ({held} of {allowed} held by the data plane)")]
    Budget { held: usize, allowed: usize },
    /// The kernel refused a socket (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...).
    #[error("cannot open an upstream socket: {0}")]
    Open(#[source] io::Error),
}

/// The shared upstream sockets of one worker.
#[derive(Debug)]
pub(super) struct UpstreamPool {
    v4: Vec<PoolSocket>,
    v6: Vec<PoolSocket>,
    assigner: SocketAssigner,
    budget: Arc<FdBudget>,
    own_ports: Arc<OwnPorts>,
    recv_buffer_bytes: usize,
    send_buffer_bytes: usize,
}

impl UpstreamPool {
    pub(super) fn new(
        budget: Arc<FdBudget>,
        own_ports: Arc<OwnPorts>,
        recv_buffer_bytes: usize,
        send_buffer_bytes: usize,
    ) -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            assigner: SocketAssigner::default(),
            budget,
            own_ports,
            recv_buffer_bytes,
            send_buffer_bytes,
        }
    }

    /// A socket for `session` to `target` (in [`peer_key`] form): one that serves no other
    /// session to `target`, opened (and registered) if every open one does. A socket that
    /// cannot be opened refuses this session only.
    pub(super) fn acquire(
        &mut self,
        target: SocketAddr,
        session: SessionId,
        registry: &Registry,
        now: Instant,
    ) -> Result<PoolRef, PlaceError> {
        let ipv6 = target.is_ipv6();
        let sockets = if ipv6 { &mut self.v6 } else { &mut self.v4 };
        let (budget, own_ports) = (&self.budget, &self.own_ports);
        let (recv, send) = (self.recv_buffer_bytes, self.send_buffer_bytes);
        let index = self.assigner.acquire(target, now, |index| {
            debug_assert_eq!(index as usize, sockets.len());
            let lease = budget.try_take(1).ok_or_else(|| PlaceError::Budget {
                held: budget.held(),
                allowed: budget.allowed(),
            })?;
            let mut socket = bind_upstream_udp(ipv6, recv, send).map_err(PlaceError::Open)?;
            registry
                .register(
                    &mut socket,
                    PoolRef::new(index, ipv6).token(),
                    Interest::READABLE,
                )
                .map_err(PlaceError::Open)?;
            let port = socket.local_addr().map_or(0, |a| a.port());
            own_ports.add(ipv6, port);
            sockets.push(PoolSocket {
                socket,
                peers: AHashMap::new(),
                idle_since: None,
                port,
                _lease: lease,
            });
            Ok(())
        })?;
        let place = &mut sockets[index as usize];
        place.peers.insert(target, session);
        place.idle_since = None;
        Ok(PoolRef::new(index, ipv6))
    }

    /// Session `session` to `target` on `pool` has ended, or moved to another socket. A
    /// release by anyone but the place's session does nothing.
    pub(super) fn release(
        &mut self,
        pool: PoolRef,
        target: SocketAddr,
        session: SessionId,
        now: Instant,
    ) {
        let Some(socket) = self.socket_mut(pool) else {
            return;
        };
        if socket.peers.get(&target) != Some(&session) {
            debug_assert!(false, "{target} on {pool:?} is not this session's place");
            return;
        }
        socket.peers.remove(&target);
        if socket.peers.is_empty() {
            socket.idle_since = Some(now);
        }
        self.assigner.release(target, pool.index() as u32, now);
    }

    /// Forgets backends whose places have all been free for a while, and closes the sockets
    /// opened for a peak once no backend has a place on them and they have served no session
    /// for [`SOCKET_IDLE`]; returns how many it closed.
    pub(super) fn sweep(&mut self, registry: &Registry, now: Instant) -> usize {
        let needed = self.assigner.sweep(now);
        let mut closed = 0;
        for (ipv6, sockets) in [(false, &mut self.v4), (true, &mut self.v6)] {
            let keep = needed[usize::from(ipv6)] as usize;
            let before = sockets.len();
            while sockets.len() > keep
                && let Some(last) = sockets.last()
                && last.peers.is_empty()
                && last
                    .idle_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= SOCKET_IDLE)
            {
                if let Some(mut last) = sockets.pop() {
                    let _ = registry.deregister(&mut last.socket);
                    self.own_ports.remove(ipv6, last.port);
                }
            }
            if sockets.len() < before {
                closed += before - sockets.len();
                self.assigner.closed_above(ipv6, sockets.len() as u32);
            }
        }
        closed
    }

    /// Whether [`Self::sweep`] may have a socket to close later: the last socket of a family
    /// serves no session (so an idle worker still wakes for a sweep).
    pub(super) fn may_shrink(&self) -> bool {
        [&self.v4, &self.v6]
            .into_iter()
            .any(|sockets| sockets.last().is_some_and(|s| s.peers.is_empty()))
    }

    /// The session whose backend `from` sent a datagram to `pool`.
    #[inline]
    pub(super) fn session_for(&self, pool: PoolRef, from: SocketAddr) -> Option<SessionId> {
        self.socket(pool)?.peers.get(&peer_key(from)).copied()
    }

    /// The local port of a pool socket.
    pub(super) fn port(&self, pool: PoolRef) -> Option<u16> {
        self.socket(pool).map(|s| s.port)
    }

    /// The file descriptor of a pool socket.
    #[inline]
    pub(super) fn fd(&self, pool: PoolRef) -> Option<RawFd> {
        self.socket(pool).map(|s| s.socket.as_raw_fd())
    }

    // ---- hand-off (SPEC §12) ---------------------------------------------------------------

    /// Stops reading every socket (the successor reads them now, or will after
    /// [`Self::resume`]), and gives its number, local port and a duplicate of its descriptor.
    pub(super) fn freeze(&mut self, registry: &Registry) -> io::Result<Vec<(u32, u16, OwnedFd)>> {
        let mut all = Vec::with_capacity(self.sockets());
        for (ipv6, sockets) in [(false, &mut self.v4), (true, &mut self.v6)] {
            for (index, s) in sockets.iter_mut().enumerate() {
                let _ = registry.deregister(&mut s.socket);
                let fd = s.socket.as_fd().try_clone_to_owned()?;
                all.push((PoolRef::new(index as u32, ipv6).number(), s.port, fd));
            }
        }
        Ok(all)
    }

    /// Reads every socket again, from what waits now: after a freeze (the hand-off failed) or
    /// in the new process once its predecessor has let go.
    pub(super) fn resume(&mut self, registry: &Registry) {
        for (ipv6, sockets) in [(false, &mut self.v4), (true, &mut self.v6)] {
            for (index, s) in sockets.iter_mut().enumerate() {
                let token = PoolRef::new(index as u32, ipv6).token();
                if let Err(e) = super::handoff::read_again(registry, &mut s.socket, token) {
                    log::error!("hand-off: an upstream socket cannot be read: {e}");
                }
            }
        }
    }

    /// Lets go of every socket (handed over).
    pub(super) fn drop_all(&mut self, registry: &Registry) {
        for (ipv6, sockets) in [(false, &mut self.v4), (true, &mut self.v6)] {
            for mut s in sockets.drain(..) {
                let _ = registry.deregister(&mut s.socket);
                self.own_ports.remove(ipv6, s.port);
            }
        }
        self.assigner = SocketAssigner::default();
    }

    /// Takes over the previous process's sockets, by their numbers there (each family's
    /// numbered from 0 without a gap, as a pool keeps them), registered and paid for.
    pub(super) fn adopt_sockets(
        &mut self,
        mut sockets: Vec<(u32, std::net::UdpSocket)>,
        registry: &Registry,
    ) -> Result<(), String> {
        if self.sockets() != 0 {
            return Err("the pool has sockets already".into());
        }
        sockets.sort_by_key(|(number, _)| *number);
        for (number, socket) in sockets {
            let pool = PoolRef::from_number(number);
            let family = if pool.ipv6() {
                &mut self.v6
            } else {
                &mut self.v4
            };
            if pool.index() != family.len() {
                return Err(format!("upstream socket {number} leaves a gap"));
            }
            let lease = self.budget.try_take(1).ok_or_else(|| {
                format!(
                    "the descriptor budget is spent ({} of {} held)",
                    self.budget.held(),
                    self.budget.allowed()
                )
            })?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("upstream socket {number}: {e}"))?;
            let mut socket = mio::net::UdpSocket::from_std(socket);
            let port = socket.local_addr().map_or(0, |a| a.port());
            registry
                .register(&mut socket, pool.token(), Interest::READABLE)
                .map_err(|e| format!("upstream socket {number}: {e}"))?;
            self.own_ports.add(pool.ipv6(), port);
            family.push(PoolSocket {
                socket,
                peers: AHashMap::new(),
                idle_since: Some(Instant::now()),
                port,
                _lease: lease,
            });
        }
        Ok(())
    }

    /// Gives the adopted sessions their places: `(socket, backend address, session)`.
    pub(super) fn adopt_places(
        &mut self,
        places: &[(PoolRef, SocketAddr, SessionId)],
        now: Instant,
    ) -> Result<(), String> {
        let open = [self.v4.len() as u32, self.v6.len() as u32];
        let by_index: Vec<(SocketAddr, u32)> = places
            .iter()
            .map(|(pool, target, _)| (*target, pool.index() as u32))
            .collect();
        if !self.assigner.adopt(open, &by_index, now) {
            return Err("two sessions to one backend on one upstream socket".into());
        }
        for &(pool, target, session) in places {
            let socket = self
                .socket_mut(pool)
                .ok_or_else(|| format!("no upstream socket {}", pool.number()))?;
            socket.peers.insert(target, session);
            socket.idle_since = None;
        }
        Ok(())
    }

    /// Sockets open, IPv4 and IPv6 together.
    pub(super) fn sockets(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn socket(&self, pool: PoolRef) -> Option<&PoolSocket> {
        let sockets = if pool.ipv6() { &self.v6 } else { &self.v4 };
        sockets.get(pool.index())
    }

    fn socket_mut(&mut self, pool: PoolRef) -> Option<&mut PoolSocket> {
        let sockets = if pool.ipv6() {
            &mut self.v6
        } else {
            &mut self.v4
        };
        sockets.get_mut(pool.index())
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        for (ipv6, sockets) in [(false, &self.v4), (true, &self.v6)] {
            for socket in sockets {
                self.own_ports.remove(ipv6, socket.port);
            }
        }
    }
}

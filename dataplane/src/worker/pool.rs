//! A worker's shared upstream sockets (the assignment is sans-io in `crate::upstream`):
//! opened as sessions need them, each knowing the session behind every backend address it
//! serves, so a reply is routed by (socket, source address).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use ahash::AHashMap;
use mio::{Interest, Registry, Token};

use crate::session::SessionId;
use crate::socket::bind_upstream_udp;
use crate::upstream::{SocketAssigner, peer_key};

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

    fn ipv6(self) -> bool {
        self.0 % 2 == 1
    }

    /// Its number in an [`crate::batch::UpstreamBatch`].
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
}

/// The shared upstream sockets of one worker.
#[derive(Debug)]
pub(super) struct UpstreamPool {
    v4: Vec<PoolSocket>,
    v6: Vec<PoolSocket>,
    assigner: SocketAssigner,
    recv_buffer_bytes: usize,
    send_buffer_bytes: usize,
}

impl UpstreamPool {
    pub(super) fn new(recv_buffer_bytes: usize, send_buffer_bytes: usize) -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            assigner: SocketAssigner::default(),
            recv_buffer_bytes,
            send_buffer_bytes,
        }
    }

    /// A socket for `session` to `target` (in [`peer_key`] form): one that serves no other
    /// session to `target`, opened (and registered) if every open one does.
    pub(super) fn acquire(
        &mut self,
        target: SocketAddr,
        session: SessionId,
        registry: &Registry,
        now: Instant,
    ) -> io::Result<PoolRef> {
        let index = self.assigner.acquire(target, now);
        let ipv6 = target.is_ipv6();
        let pool = PoolRef::new(index, ipv6);
        let sockets = if ipv6 { &mut self.v6 } else { &mut self.v4 };
        if index as usize == sockets.len() {
            let opened = bind_upstream_udp(ipv6, self.recv_buffer_bytes, self.send_buffer_bytes)
                .and_then(|mut socket| {
                    registry
                        .register(&mut socket, pool.token(), Interest::READABLE)
                        .map(|()| socket)
                });
            match opened {
                Ok(socket) => sockets.push(PoolSocket {
                    socket,
                    peers: AHashMap::new(),
                }),
                Err(e) => {
                    // Never used: no quarantine needed, but the assigner cannot tell; a socket
                    // that failed to open is rare enough.
                    self.assigner.release(target, index, now);
                    return Err(e);
                }
            }
        }
        sockets[index as usize].peers.insert(target, session);
        Ok(pool)
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
        self.assigner.release(target, pool.index() as u32, now);
    }

    /// Forgets backends whose places have all been free for a while.
    pub(super) fn sweep(&mut self, now: Instant) {
        self.assigner.sweep(now);
    }

    /// The session whose backend `from` sent a datagram to `pool`.
    #[inline]
    pub(super) fn session_for(&self, pool: PoolRef, from: SocketAddr) -> Option<SessionId> {
        self.socket(pool)?.peers.get(&peer_key(from)).copied()
    }

    /// The file descriptor of a pool socket.
    #[inline]
    pub(super) fn fd(&self, pool: PoolRef) -> Option<RawFd> {
        self.socket(pool).map(|s| s.socket.as_raw_fd())
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

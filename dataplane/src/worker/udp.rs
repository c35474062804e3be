//! A worker's UDP path: client datagrams read in batches from a listener's socket, each
//! forwarded on its session's shared upstream socket (or opening a session first, or moving
//! one on a control packet), and backend replies read from the upstream sockets and sent back
//! out of the listeners' sockets. It owns the receive and send batches, the `v2-first` PROXY
//! headers in flight, and the UDP sockets left with unread datagrams at the work bound.
//!
//! Per datagram it does one session lookup and its share of one `recvmmsg` and one `sendmmsg`;
//! nothing on this path allocates, locks or looks up more than that. It decides no admission
//! itself and keeps no session: those are `admission.rs`'s and `sessions.rs`'s.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::config::DataPlaneConfig;
use crate::io::batch::{BATCH, Header, RecvBatch, ReplyBatch, UpstreamBatch, max_payload};
use crate::io::own_addrs::OwnPorts;
use crate::listener::ListenerKind;
use crate::metrics::DropReason;
use crate::policy::admit;
use crate::policy::session::{SessionId, SessionKey};

use super::admission::{Admission, reset_session};
use super::listeners::{ListenerIo, Listeners};
use super::pool::PoolRef;
use super::proxy_header::ProxyState;
use super::sessions::{Offload, Upstream};
use super::{IO_LOOP_BOUND, Outbox, Parts};

/// Where a client datagram came in: its listener, its slot in the receive batch, and the
/// proxy address it was sent to (wildcard listeners only).
#[derive(Clone, Copy, Debug)]
struct Arrival {
    port: usize,
    slot: usize,
    local: Option<IpAddr>,
}

/// Reads `fd` into the free slots of `rx` until its queue is empty or the work bound is hit,
/// handing the slots each read filled to `batch`, which must leave room in `rx` for the next;
/// true when the queue was emptied. A read that fills fewer slots than were free means the
/// queue was empty: a new datagram raises a new readiness edge, so no read is spent on
/// learning `EAGAIN`. `what` names the socket in the log of worker `worker`.
fn read_batches(
    rx: &mut RecvBatch,
    fd: RawFd,
    batch_io: bool,
    pktinfo: bool,
    (worker, what): (usize, &str),
    mut batch: impl FnMut(&mut RecvBatch, Range<usize>),
) -> bool {
    for _ in 0..IO_LOOP_BOUND {
        let (from, room) = (rx.len(), rx.room());
        match rx.recv_more(fd, batch_io, pktinfo) {
            Ok(n) => {
                batch(rx, from..from + n);
                if n < room {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            // An earlier send drew an ICMP error, reported once; or a signal. The socket
            // stays usable.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("worker {worker}: receive on {what}: {e}");
                return true;
            }
        }
    }
    false
}

/// This worker's UDP datagrams in flight.
pub(super) struct Udp {
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
    batch_io: bool,
    /// The local ports of every worker's upstream sockets, to tell our own datagrams.
    own_ports: Arc<OwnPorts>,
    /// Listeners and upstream sockets left with unread datagrams at `IO_LOOP_BOUND`: another
    /// turn next time round the loop.
    ports_again: Vec<usize>,
    pools_again: Vec<PoolRef>,
}

impl Udp {
    /// Empty batches.
    pub(super) fn new(config: &DataPlaneConfig, own_ports: Arc<OwnPorts>) -> Self {
        Self {
            rx: Some(Box::new(RecvBatch::new())),
            reply_rx: Some(Box::new(RecvBatch::new())),
            upstream_batch: Box::new(UpstreamBatch::new()),
            reply_batch: Box::new(ReplyBatch::new()),
            queued_headers: Vec::with_capacity(BATCH),
            batch_io: config.batch_io,
            own_ports,
            ports_again: Vec::new(),
            pools_again: Vec::new(),
        }
    }

    /// Whether a socket hit the work bound and waits for another turn.
    pub(super) fn has_backlog(&self) -> bool {
        !self.ports_again.is_empty() || !self.pools_again.is_empty()
    }

    /// The listeners that hit the work bound, taken out for another turn.
    pub(super) fn take_ports_again(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.ports_again)
    }

    /// The upstream sockets that hit the work bound, taken out for another turn.
    pub(super) fn take_pools_again(&mut self) -> Vec<PoolRef> {
        std::mem::take(&mut self.pools_again)
    }

    // ---- client side -----------------------------------------------------------------------

    /// Reads the datagrams listener `port` has queued, and sends each batch on; false when it
    /// is no UDP listener (a TCP one, or closed since its readiness was reported).
    pub(super) fn drain_port(&mut self, p: &mut Parts<'_>, port: usize, now: Instant) -> bool {
        let Some(listener) = p.listeners.get(port) else {
            return false;
        };
        // RESET magic means something on token ports only.
        let resets = matches!(listener.kind(), ListenerKind::TokenPort);
        let ListenerIo::Udp { socket, pktinfo } = listener.io() else {
            return false;
        };
        let (fd, pktinfo) = (socket.as_raw_fd(), *pktinfo);
        let Some(mut rx) = self.rx.take() else {
            return true;
        };
        let log = (p.out.id(), "a data port");
        let drained = read_batches(&mut rx, fd, self.batch_io, pktinfo, log, |rx, got| {
            for i in got {
                let (datagram, from) = rx.get(i);
                let arrival = Arrival {
                    port,
                    slot: i,
                    local: rx.local(i),
                };
                self.on_client_datagram(p, resets, arrival, datagram, from, now);
            }
            self.flush_upstream(p, port, rx);
            rx.clear();
        });
        self.rx = Some(rx);
        if !drained {
            self.ports_again.push(port);
        }
        true
    }

    /// A datagram of the receive batch from a client; `resets`: its listener honours RESET
    /// magic (a token port).
    fn on_client_datagram(
        &mut self,
        p: &mut Parts<'_>,
        resets: bool,
        arrival: Arrival,
        datagram: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let port = arrival.port;
        let Some(from) = from else {
            p.out.counters().drop(DropReason::NoSession, 1);
            return;
        };
        // An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; sessions, limits
        // and the admin API know it by its IPv4 address.
        let key = SessionKey {
            client: SocketAddr::new(from.ip().to_canonical(), from.port()),
            port: port as u16,
        };
        match p.sessions.find(&key) {
            Some(id) => {
                if resets && let Some(body) = p.admission.control_body(datagram) {
                    if control_allowed(p, id, now) {
                        reset_session(p, id, body, now);
                    } else {
                        p.out.counters().drop(DropReason::RateLimited, 1);
                        p.listeners.count(port, DropReason::RateLimited);
                    }
                } else {
                    self.forward(p, id, arrival.slot, datagram.len(), now);
                }
            }
            None => {
                if self.is_own_datagram(p.listeners, arrival, from) {
                    p.out.counters().drop(DropReason::Loop, 1);
                    p.listeners.count(port, DropReason::Loop);
                    return;
                }
                // A flood from one address costs a table lookup, nothing more.
                if !p.admission.admit_packet(key.client.ip(), now) {
                    p.out.counters().drop(DropReason::RateLimited, 1);
                    p.listeners.count(port, DropReason::RateLimited);
                    return;
                }
                self.open_session(p, key, from, arrival, datagram, now);
            }
        }
    }

    /// Whether a datagram from `from` left one of this proxy's own upstream sockets: some
    /// chain of forwarders or routes leads back here, and opening a session for it would loop
    /// without end. Checked for session-less datagrams only.
    fn is_own_datagram(&self, listeners: &Listeners, arrival: Arrival, from: SocketAddr) -> bool {
        let Some(listener) = listeners.get(arrival.port) else {
            return false;
        };
        let to = arrival.local.unwrap_or(listener.local().ip());
        self.own_ports.is_own(from.ip(), from.port(), to)
    }

    /// First datagram of an unknown client: a token (or control packet) opens a session to its
    /// grant's backend and is consumed; anything else goes where the listener's role sends it
    /// (a forwarder's target, a route's endpoint, the default backend), if anywhere.
    /// `reply_to` is the client's address as received (the session key holds its canonical form).
    fn open_session(
        &mut self,
        p: &mut Parts<'_>,
        key: SessionKey,
        reply_to: SocketAddr,
        arrival: Arrival,
        datagram: &[u8],
        now: Instant,
    ) {
        let (port, client) = (arrival.port, key.client);
        let first = p.admission.classify(datagram);
        let decision = p
            .admission
            .decide(first, port, client.ip(), p.listeners, p.out, now);
        if !matches!(decision, admit::Admission::Drop { .. })
            && !p.admission.admit_session(client.ip(), now)
        {
            p.out.counters().drop(DropReason::RateLimited, 1);
            p.listeners.count(port, DropReason::RateLimited);
            return;
        }
        let admitted = match Admission::resolve(decision, port, client, p.listeners) {
            Ok(admitted) => admitted,
            Err(reason) => {
                p.out.counters().drop(reason, 1);
                p.listeners.count(port, reason);
                return;
            }
        };
        let reserved = p
            .sessions
            .reserve(client, admitted.target, p.registry, p.out, now);
        let mut upstream = match reserved {
            Ok(upstream) => upstream,
            Err(reason) => {
                // A token port's refusals at a cap are counted worker-wide only.
                if admitted.grant.is_none() {
                    p.listeners.count(port, reason);
                }
                return;
            }
        };
        upstream.proxy =
            ProxyState::for_path(p.listeners, admitted.proxy, client, port, arrival.local);
        // The token is spent last, once the session's slot and socket exist: a session refused
        // at a cap, or one whose socket cannot be made, leaves the token for the player's retry.
        if let Some(grant) = &admitted.grant
            && let Err(reason) = grant.redeem(port, client.ip(), now)
        {
            // Another worker redeemed it in the meantime.
            p.sessions.abandon(client, &upstream, now);
            p.out.counters().reject(reason);
            p.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let id = p.sessions.install(
            admitted.session(key, reply_to, arrival.local),
            Upstream::Udp(upstream),
            p.listeners,
            p.out,
            now,
        );
        if admitted.grant.is_some() {
            p.out.counters().tokens_redeemed.add(1);
        }
        admitted.opened(p.out);
        // A token is consumed; anything else is the client's traffic.
        if admitted.grant.is_none() {
            self.forward(p, id, arrival.slot, datagram.len(), now);
        }
    }

    /// Queues datagram `slot` of the receive batch (`len` bytes) for the session's backend; it
    /// leaves with the rest of the batch in [`Self::flush_upstream`].
    fn forward(&mut self, p: &mut Parts<'_>, id: SessionId, slot: usize, len: usize, now: Instant) {
        let Some(session) = p.sessions.get_mut(id) else {
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
            p.out.counters().drop(DropReason::Oversize, 1);
            p.listeners.count(port, DropReason::Oversize);
            return;
        }
        let entry = self.upstream_batch.next_entry();
        let header = match upstream.proxy.as_deref_mut() {
            Some(proxy) => proxy.take(entry),
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
    fn flush_upstream(&mut self, p: &mut Parts<'_>, port: usize, rx: &RecvBatch) {
        let sessions = &*p.sessions;
        let sent = self.upstream_batch.flush(rx, self.batch_io, |n| {
            sessions.pool_fd(PoolRef::from_number(n))
        });
        let c = p.out.counters();
        c.packets_upstream.add(sent.packets);
        c.bytes_upstream.add(sent.bytes);
        if sent.dropped > 0 {
            c.drop(DropReason::UpstreamSend, sent.dropped);
        }
        // Once per batch: every datagram of it came in on this one listener.
        if let Some(slot) = p.listeners.slot(port) {
            slot.packets_upstream.add(sent.packets);
            slot.bytes_upstream.add(sent.bytes);
            slot.drop(DropReason::UpstreamSend, sent.dropped);
        }
        for &(entry, id) in &self.queued_headers {
            if let Some(session) = p.sessions.get_mut(id)
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
    pub(super) fn drain_pool(&mut self, p: &mut Parts<'_>, pool: PoolRef, now: Instant) {
        let Some(fd) = p.sessions.pool_fd(pool) else {
            return;
        };
        let Some(mut rx) = self.reply_rx.take() else {
            return;
        };
        let log = (p.out.id(), "an upstream socket");
        let drained = read_batches(&mut rx, fd, self.batch_io, false, log, |rx, got| {
            for i in got {
                let (datagram, from) = rx.get(i);
                self.on_reply(p, pool, i, datagram.len(), from, now);
            }
            if rx.room() == 0 {
                self.flush_replies(p.listeners, p.out, rx);
            }
        });
        self.reply_rx = Some(rx);
        if !drained {
            self.pools_again.push(pool);
        }
    }

    /// Reply `slot` of `reply_rx` (`len` bytes), from `from` on upstream socket `pool`: queued
    /// for its session's client, to leave with the rest in [`Self::flush_replies`].
    fn on_reply(
        &mut self,
        p: &mut Parts<'_>,
        pool: PoolRef,
        slot: usize,
        len: usize,
        from: Option<SocketAddr>,
        now: Instant,
    ) {
        let counters = p.out.counters();
        // Only a session's backend is heard: anything else reaching the socket is dropped.
        let Some(id) = from.and_then(|from| p.sessions.on_pool(pool, from)) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        let Some(session) = p.sessions.get_mut(id) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        // A listener lives as long as any of its sessions.
        let port = usize::from(session.key.port);
        let Some(listener) = p.listeners.udp_slot(port) else {
            counters.drop(DropReason::StrayReply, 1);
            return;
        };
        self.reply_batch
            .push(port as u32, slot, &session.client_sockaddr, session.local);
        // Established: the kernel fast path may take its traffic from here on (once decided,
        // this is one comparison per reply).
        let undecided = matches!(
            &session.upstream,
            Upstream::Udp(u) if u.offload == Offload::Untried
        );
        session.last_active = now;
        session.stats.packets_downstream += 1;
        session.stats.bytes_downstream += len as u64;
        counters.packets_downstream.add(1);
        counters.bytes_downstream.add(len as u64);
        listener.packets_downstream.add(1);
        listener.bytes_downstream.add(len as u64);
        if undecided && p.sessions.fast_path_on() {
            offload(p, id, port, now);
        }
    }

    /// Sends the replies gathered this turn, if any.
    pub(super) fn send_replies(&mut self, listeners: &Listeners, out: &Outbox) {
        if let Some(mut rx) = self.reply_rx.take() {
            if rx.len() > 0 {
                self.flush_replies(listeners, out, &mut rx);
            }
            self.reply_rx = Some(rx);
        }
    }

    /// Sends the replies of `rx` queued for their clients, then empties it: one `sendmmsg` per
    /// listener socket among them. Only the listeners with a reply in it are looked at, never
    /// every listener.
    fn flush_replies(&mut self, listeners: &Listeners, out: &Outbox, rx: &mut RecvBatch) {
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
            out.counters().drop(DropReason::DownstreamSend, dropped);
        }
        rx.clear();
    }
}

/// Offloads session `id` of listener `port` to the kernel fast path if it may be.
fn offload(p: &mut Parts<'_>, id: SessionId, port: usize, now: Instant) {
    let Some(listener) = p.listeners.local_addr(port) else {
        return;
    };
    let client = match p.sessions.get(id) {
        Some(s) => s.key.client,
        None => return,
    };
    let rate_limited = p.admission.over_rate_limit(client.ip(), now);
    p.sessions.offload(id, listener, rate_limited, p.out, now);
}

/// Whether session `id` may have one more control packet looked at now (its allowance,
/// `ControlBudget`); takes it if so.
fn control_allowed(p: &mut Parts<'_>, id: SessionId, now: Instant) -> bool {
    match p.sessions.get_mut(id).map(|s| &mut s.upstream) {
        Some(Upstream::Udp(upstream)) => upstream.control.admit(now),
        _ => false,
    }
}

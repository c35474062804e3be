//! This worker's sessions: the session table (UDP and TCP alike), the shared upstream sockets
//! UDP sessions have their places on, and the clients' places under `maxSessions` and
//! `maxSessionsPerIp`. A session is reserved (a place under the caps and on a socket) before a
//! token is spent on it, installed, moved to another backend (retargeted), and released when
//! it ends or expires; the session gauges follow.
//!
//! It decides nothing about who gets a session (that is admission's) and moves no datagram
//! or byte itself: the UDP and TCP paths read and write through the sessions it holds.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Registry;

use crate::config::DataPlaneConfig;
use crate::ctl::listing::Smallest;
use crate::ctl::{CloseReason, SessionInfo, SessionOrder, SessionPage, SessionQuery, WorkerEvent};
use crate::fastpath::decide::Candidate;
use crate::fastpath::{KernelCounts, Offloaded, WorkerMap};
use crate::io::fd_budget::FdBudget;
use crate::io::own_addrs::OwnPorts;
use crate::io::splice::Splice;
use crate::listener::Transport;
use crate::metrics::DropReason;
use crate::policy::grant::BackendId;
use crate::policy::limits::SessionLimits;
use crate::policy::proxy_protocol::ProxyMode;
use crate::policy::ratelimit::ControlBudget;
use crate::policy::session::{
    Session, SessionId, SessionKey, SessionKind, SessionStats, SessionTable,
};
use crate::policy::upstream::{is_unicast_target, peer_key};

use super::Outbox;
use super::listeners::Listeners;
use super::pool::{PlaceError, PoolRef, UpstreamPool};
use super::proxy_header::ProxyState;

mod handoff;

/// Idle timeout of a session whose listener is gone (cannot happen: a listener outlives its
/// sessions); short, so such a session would not linger.
const ORPHAN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// A session's way to its backend.
// The UDP variant is the one every datagram reads, so it stays inline in the session (boxing
// it would add a pointer chase per datagram); the rarer TCP one is boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Upstream {
    /// A UDP session: its place on a shared upstream socket, and its backend's address
    /// encoded once for `sendmmsg`. Replies go out of the listener's socket.
    Udp(UdpUpstream),
    /// A TCP session: the client's connection spliced to the backend connection.
    Tcp(Box<Splice>),
}

impl Upstream {
    pub(super) fn transport(&self) -> Transport {
        match self {
            Self::Udp(_) => Transport::Udp,
            Self::Tcp(_) => Transport::Tcp,
        }
    }
}

/// A UDP session's upstream side: its place (socket, backend address) on the pool.
#[derive(Debug)]
pub(super) struct UdpUpstream {
    pub(super) pool: PoolRef,
    /// The backend address as the pool knows it (`crate::policy::upstream::peer_key`).
    pub(super) key: SocketAddr,
    /// The session the place was taken for.
    session: SessionId,
    pub(super) dest: socket2::SockAddr,
    /// PROXY protocol v2 header for this path to the backend, when its `proxyProtocol` asks.
    pub(super) proxy: Option<Box<ProxyState>>,
    /// The control packets this session may still send.
    pub(super) control: ControlBudget,
    /// Whether the kernel fast path forwards its established traffic.
    pub(super) offload: Offload,
}

/// A UDP session's place on the kernel fast path (SPEC §11).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(super) enum Offload {
    /// Not decided yet: decided on its next reply.
    #[default]
    Untried,
    /// Stays in user space.
    Kept,
    /// Its two entries are in the kernel's map.
    On(Offloaded),
}

/// Who a new session is for and where it goes; the rest is set when it is installed.
#[derive(Clone, Copy, Debug)]
pub(super) struct NewSession {
    pub(super) key: SessionKey,
    /// The client's address as received (the key holds its canonical form).
    pub(super) reply_to: SocketAddr,
    pub(super) target: SocketAddr,
    pub(super) backend: BackendId,
    pub(super) kind: SessionKind,
    /// Its own idle timeout, when not its listener's.
    pub(super) idle_timeout: Option<Duration>,
    /// The proxy address a UDP client sent to: its replies leave from it.
    pub(super) local: Option<IpAddr>,
}

/// This worker's sessions and the upstream sockets they share.
pub(super) struct Sessions {
    table: SessionTable<Upstream>,
    /// The shared upstream sockets of UDP sessions.
    pool: UpstreamPool,
    /// `maxSessions` and `maxSessionsPerIp`, shared by every worker.
    limits: Arc<SessionLimits>,
    /// TCP sessions among them, for the per-protocol gauge.
    tcp_count: usize,
    /// Sessions the last expiry took out, kept for their allocation.
    expired: Vec<Session<Upstream>>,
    /// This worker's handle on the kernel fast path's map (`None`: off).
    fast: Option<WorkerMap>,
    /// Sessions offloaded now.
    offloaded: usize,
}

impl Sessions {
    /// No session yet.
    pub(super) fn new(
        config: &DataPlaneConfig,
        limits: Arc<SessionLimits>,
        budget: Arc<FdBudget>,
        own_ports: Arc<OwnPorts>,
        fast: Option<WorkerMap>,
        now: Instant,
    ) -> Self {
        Self {
            table: SessionTable::new(now),
            pool: UpstreamPool::new(
                budget,
                own_ports,
                config.recv_buffer_bytes,
                config.send_buffer_bytes,
            ),
            limits,
            tcp_count: 0,
            expired: Vec::new(),
            fast,
            offloaded: 0,
        }
    }

    /// Whether the kernel fast path is on for this worker.
    #[inline]
    pub(super) fn fast_path_on(&self) -> bool {
        self.fast.is_some()
    }

    // ---- lookups ---------------------------------------------------------------------------

    #[inline]
    pub(super) fn find(&self, key: &SessionKey) -> Option<SessionId> {
        self.table.find(key)
    }

    #[inline]
    pub(super) fn get(&self, id: SessionId) -> Option<&Session<Upstream>> {
        self.table.get(id)
    }

    #[inline]
    pub(super) fn get_mut(&mut self, id: SessionId) -> Option<&mut Session<Upstream>> {
        self.table.get_mut(id)
    }

    /// The session in slab slot `slot` (a TCP session's poll token names it).
    pub(super) fn by_slot(&mut self, slot: usize) -> Option<SessionId> {
        self.table.by_slot_mut(slot).map(|(id, _)| id)
    }

    /// The slab slot the next session will take, so its sockets can be registered under
    /// their final tokens before it exists.
    pub(super) fn next_slot(&self) -> usize {
        self.table.next_slot()
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// The sessions `matches` picks.
    pub(super) fn ids_where(&self, matches: impl Fn(&Session<Upstream>) -> bool) -> Vec<SessionId> {
        self.table
            .iter()
            .filter(|(_, s)| matches(s))
            .map(|(id, _)| id)
            .collect()
    }

    /// The sessions of listener `port` (of UDP only if `udp_only`): a change to one listener
    /// costs what it has, however many sessions the others hold.
    pub(super) fn on_listener(&self, port: usize, udp_only: bool) -> Vec<SessionId> {
        let mut ids = self.table.on_listener(port as u16);
        if udp_only {
            ids.retain(|&id| {
                self.table
                    .get(id)
                    .is_some_and(|s| s.upstream.transport() == Transport::Udp)
            });
        }
        ids
    }

    /// The first sessions `query` admits, in listing order, as the admin API lists them, and
    /// how many it admits in all. Memory in the page size, not in the number of sessions.
    pub(super) fn list(&self, worker: usize, now: Instant, query: &SessionQuery) -> SessionPage {
        let mut page = Smallest::new(query.limit);
        for (_, s) in self.table.iter() {
            let at = SessionOrder::new(s.key.client, s.key.port, worker);
            if query.admits(at, s.key.client, s.target) {
                page.offer(at, s);
            }
        }
        let (chosen, matched) = page.finish();
        let sessions = chosen
            .into_iter()
            .map(|(_, s)| {
                let kernel = self.kernel_counts(s);
                let last_active = kernel
                    .and_then(|k| k.last)
                    .map_or(s.last_active, |k| k.max(s.last_active));
                let mut stats = s.stats;
                if let Some(k) = kernel {
                    add_kernel_counts(&mut stats, &k);
                }
                SessionInfo {
                    worker,
                    client: s.key.client,
                    data_port: usize::from(s.key.port),
                    protocol: s.upstream.transport(),
                    target: s.target,
                    backend: s.backend,
                    kind: s.kind,
                    age: now.saturating_duration_since(s.created),
                    idle: now.saturating_duration_since(last_active),
                    stats,
                    offloaded: kernel.is_some(),
                }
            })
            .collect();
        SessionPage { sessions, matched }
    }

    /// The descriptor of a shared upstream socket.
    #[inline]
    pub(super) fn pool_fd(&self, pool: PoolRef) -> Option<RawFd> {
        self.pool.fd(pool)
    }

    /// The session whose backend `from` sent a datagram to upstream socket `pool`.
    #[inline]
    pub(super) fn on_pool(&self, pool: PoolRef, from: SocketAddr) -> Option<SessionId> {
        self.pool.session_for(pool, from)
    }

    /// `maxSessions` and `maxSessionsPerIp`: a TCP connection takes its place at accept,
    /// before it is a session.
    pub(super) fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    // ---- opening ---------------------------------------------------------------------------

    /// Everything a new UDP session needs that can fail: a place under `maxSessions` and
    /// `maxSessionsPerIp`, and a place on a shared upstream socket to `target`, recorded for
    /// the id the session will take. The reason when refused (counted, and logged at most
    /// once a second).
    pub(super) fn reserve(
        &mut self,
        client: SocketAddr,
        target: SocketAddr,
        registry: &Registry,
        out: &mut Outbox,
        now: Instant,
    ) -> Result<UdpUpstream, DropReason> {
        if let Err(reason) = self.limits.try_acquire(client.ip()) {
            out.counters().drop(reason, 1);
            return Err(reason);
        }
        match self.open_upstream(target, self.table.next_id(), registry, out, now) {
            Ok(upstream) => Ok(upstream),
            Err(e) => {
                if let Some(note) = out.warn(now) {
                    log::warn!("{client}: cannot open a socket to {target}: {e}{note}");
                }
                self.limits.release(client.ip());
                out.counters().drop(DropReason::UpstreamSetup, 1);
                Err(DropReason::UpstreamSetup)
            }
        }
    }

    /// Gives back what [`Self::reserve`] took, for a session that will not open after all.
    pub(super) fn abandon(&mut self, client: SocketAddr, upstream: &UdpUpstream, now: Instant) {
        self.leave_place(upstream, now);
        self.limits.release(client.ip());
    }

    /// Gives back a UDP session's place on the pool.
    pub(super) fn leave_place(&mut self, upstream: &UdpUpstream, now: Instant) {
        self.pool
            .release(upstream.pool, upstream.key, upstream.session, now);
    }

    /// A place for session `id` on a shared upstream socket that serves no other session to
    /// `target` (opened if need be).
    pub(super) fn open_upstream(
        &mut self,
        target: SocketAddr,
        id: SessionId,
        registry: &Registry,
        out: &Outbox,
        now: Instant,
    ) -> Result<UdpUpstream, PlaceError> {
        // An IPv4-mapped backend address is an IPv4 backend: sent to from an IPv4 socket, and
        // its replies come from its IPv4 address.
        let key = peer_key(target);
        if !is_unicast_target(key) {
            return Err(PlaceError::NotUnicast);
        }
        let pool = self.pool.acquire(key, id, registry, now)?;
        out.counters()
            .upstream_sockets
            .set(self.pool.sockets() as u64);
        Ok(UdpUpstream {
            pool,
            key,
            session: id,
            dest: socket2::SockAddr::from(key),
            proxy: None,
            control: ControlBudget::new(now),
            offload: Offload::Untried,
        })
    }

    /// Adds a session whose place [`Self::reserve`] (or a TCP accept) took; cannot fail.
    pub(super) fn install(
        &mut self,
        new: NewSession,
        upstream: Upstream,
        listeners: &mut Listeners,
        out: &Outbox,
        now: Instant,
    ) -> SessionId {
        let NewSession {
            key,
            reply_to,
            target,
            backend,
            kind,
            idle_timeout,
            local,
        } = new;
        let transport = upstream.transport();
        // Admission checked the listener is open, and nothing since could close it.
        let idle_timeout = listeners
            .session_opened(usize::from(key.port), idle_timeout)
            .unwrap_or(ORPHAN_IDLE_TIMEOUT);
        let expected_slot = self.table.next_slot();
        let id = self.table.insert(Session {
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
            local,
        });
        debug_assert_eq!(id.slot(), expected_slot, "registered under another token");
        if transport == Transport::Tcp {
            self.tcp_count += 1;
            out.counters().tcp_sessions_created[kind as usize].add(1);
        }
        out.counters().sessions_created[kind as usize].add(1);
        self.set_gauges(out);
        log::debug!(
            "{}: {} session to {target} ({})",
            key.client,
            transport.as_str(),
            kind.as_str()
        );
        id
    }

    // ---- moving ----------------------------------------------------------------------------

    /// Points a UDP session at a new backend through `upstream`, its new place on a shared
    /// socket. It leaves its old place: late replies from the old backend are dropped as
    /// strays. Returns the backend the session left (`None`: no such UDP session).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn retarget(
        &mut self,
        id: SessionId,
        backend: BackendId,
        target: SocketAddr,
        upstream: UdpUpstream,
        kind: SessionKind,
        out: &Outbox,
        now: Instant,
    ) -> Option<BackendId> {
        let Some(Session {
            upstream: Upstream::Udp(current),
            ..
        }) = self.table.get_mut(id)
        else {
            self.leave_place(&upstream, now);
            return None;
        };
        // The new path comes with a full control-packet allowance: a move took a valid, fresh
        // token (each one a query), so the allowance bounds the token opens between moves.
        let old = std::mem::replace(current, upstream);
        let kernel = self.unload(&old);
        if kernel.is_some() {
            self.set_gauges(out);
        }
        let session = self.table.get_mut(id)?;
        if let Some(k) = kernel {
            add_kernel_counts(&mut session.stats, &k);
        }
        session.target = target;
        session.kind = kind;
        session.last_active = now;
        let from = std::mem::replace(&mut session.backend, backend);
        self.leave_place(&old, now);
        Some(from)
    }

    /// Moves UDP session `id` to `target` (backend `backend`, now of `kind`) on a new place,
    /// with the PROXY protocol header `proxy` asks for on the new path. Returns the backend it
    /// left; `None`: no new place could be had (the session is unchanged) or no such session.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn move_to(
        &mut self,
        id: SessionId,
        (backend, target, proxy): (BackendId, SocketAddr, ProxyMode),
        kind: SessionKind,
        listeners: &Listeners,
        registry: &Registry,
        out: &Outbox,
        now: Instant,
    ) -> Option<BackendId> {
        let s = self.table.get(id)?;
        let (client, port, local) = (s.key.client, usize::from(s.key.port), s.local);
        let mut upstream = self.open_upstream(target, id, registry, out, now).ok()?;
        upstream.proxy = ProxyState::for_path(listeners, proxy, client, port, local);
        self.retarget(id, backend, target, upstream, kind, out, now)
    }

    /// Gives sessions of the listeners in `changed` (listener, old idle timeout) that had the
    /// old timeout the new one.
    pub(super) fn retime(&mut self, changed: &[(usize, Duration)], timeout: Duration) {
        let ids = self.ids_where(|s| {
            changed
                .iter()
                .any(|&(port, old)| usize::from(s.key.port) == port && s.idle_timeout == old)
        });
        for id in ids {
            self.table.set_idle_timeout(id, timeout);
        }
    }

    /// Sets session `id`'s idle timeout (a shorter one takes effect at the deadline already
    /// scheduled).
    pub(super) fn set_idle_timeout(&mut self, id: SessionId, timeout: Duration) {
        if let Some(s) = self.table.get_mut(id) {
            s.idle_timeout = timeout;
        }
    }

    // ---- ending ----------------------------------------------------------------------------

    /// Ends session `id` for `reason`.
    pub(super) fn close(
        &mut self,
        id: SessionId,
        reason: CloseReason,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
    ) {
        if let Some(mut session) = self.table.remove(id) {
            self.release(&mut session, reason, listeners, registry, out);
            out.counters().sessions_closed.add(1);
            self.set_gauges(out);
        }
    }

    /// Ends every session (shutdown).
    pub(super) fn close_all(
        &mut self,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
    ) {
        let ids: Vec<SessionId> = self.table.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close(id, CloseReason::Shutdown, listeners, registry, out);
        }
    }

    /// Ends the sessions idle past their timeout.
    pub(super) fn expire_idle(
        &mut self,
        now: Instant,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
    ) {
        let mut expired = std::mem::take(&mut self.expired);
        let fast = &self.fast;
        self.table.expire_idle_refreshed(now, &mut expired, |s| {
            // Traffic the kernel forwarded counts toward the idle timer.
            if let (Some(fast), Upstream::Udp(up)) = (fast, &s.upstream)
                && let Offload::On(entries) = up.offload
                && let Some(last) = fast.read(&entries).last
                && last > s.last_active
            {
                s.last_active = last;
            }
        });
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
            self.release(&mut session, CloseReason::Idle, listeners, registry, out);
        }
        out.counters().sessions_expired.add(count);
        self.set_gauges(out);
        self.expired = expired;
    }

    /// Closes the upstream sockets of a passed peak; see [`UpstreamPool::sweep`].
    pub(super) fn sweep_pool(&mut self, registry: &Registry, out: &Outbox, now: Instant) {
        if self.pool.sweep(registry, now) > 0 {
            out.counters()
                .upstream_sockets
                .set(self.pool.sockets() as u64);
        }
    }

    /// Whether a later [`Self::sweep_pool`] may have a socket to close.
    pub(super) fn may_shrink(&self) -> bool {
        self.pool.may_shrink()
    }

    /// How long until the next session may have gone idle.
    pub(super) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.table.next_timeout(now)
    }

    /// Publishes how many sessions live on this worker, in all and over TCP.
    fn set_gauges(&self, out: &Outbox) {
        let c = out.counters();
        c.sessions_active.set(self.table.len() as u64);
        c.tcp_sessions_active.set(self.tcp_count as u64);
        c.fastpath_sessions.set(self.offloaded as u64);
    }

    // ---- the kernel fast path ----------------------------------------------------------------

    /// Offloads UDP session `id` to the kernel fast path when it may be (SPEC §11): called on
    /// its replies while it is undecided, so once per session (and once more after a move).
    /// `listener` is its listener's bound address; `rate_limited`, whether its client is over
    /// its flood limit now.
    pub(super) fn offload(
        &mut self,
        id: SessionId,
        listener: SocketAddr,
        rate_limited: bool,
        out: &Outbox,
        now: Instant,
    ) {
        let Some(fast) = self.fast.as_mut() else {
            return;
        };
        let Some(s) = self.table.get_mut(id) else {
            return;
        };
        let Upstream::Udp(up) = &mut s.upstream else {
            return;
        };
        if up.offload != Offload::Untried {
            return;
        }
        let Some(upstream_port) = self.pool.port(up.pool) else {
            return;
        };
        let listener_ip = if listener.ip().is_unspecified() {
            s.local
        } else {
            Some(listener.ip())
        };
        let candidate = Candidate {
            client: s.key.client,
            target: up.key,
            listener_ip,
            listener_port: listener.port(),
            proxy_header: up.proxy.is_some(),
            rate_limited,
        };
        match fast.offload(&candidate, upstream_port, now) {
            Ok(entries) => {
                up.offload = Offload::On(entries);
                self.offloaded += 1;
                log::debug!("{}: session to {} offloaded", s.key.client, s.target);
                self.set_gauges(out);
            }
            Err(e) => {
                up.offload = Offload::Kept;
                log::debug!(
                    "{}: session to {} not offloaded: {e}",
                    s.key.client,
                    s.target
                );
            }
        }
    }

    /// Deletes the kernel entries of a UDP place that had them, returning what the kernel
    /// forwarded under them.
    fn unload(&mut self, upstream: &UdpUpstream) -> Option<KernelCounts> {
        let Offload::On(entries) = upstream.offload else {
            return None;
        };
        let fast = self.fast.as_mut()?;
        self.offloaded = self.offloaded.saturating_sub(1);
        Some(fast.remove(&entries))
    }

    /// What the kernel forwarded for session `s` so far; `None` when it is not offloaded.
    fn kernel_counts(&self, s: &Session<Upstream>) -> Option<KernelCounts> {
        match (&self.fast, &s.upstream) {
            (Some(fast), Upstream::Udp(up)) => match up.offload {
                Offload::On(entries) => Some(fast.read(&entries)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Frees what a removed session held: its poll registration, its limit place, its place on
    /// its listener (a draining listener closes with its last session), and (on drop) its
    /// socket.
    fn release(
        &mut self,
        session: &mut Session<Upstream>,
        reason: CloseReason,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
    ) {
        match &mut session.upstream {
            Upstream::Udp(upstream) => {
                // Its entries go before its place can be another session's.
                let _ = self.unload(upstream);
                self.pool.release(
                    upstream.pool,
                    upstream.key,
                    upstream.session,
                    Instant::now(),
                );
            }
            Upstream::Tcp(splice) => {
                let _ = registry.deregister(&mut splice.client);
                let _ = registry.deregister(&mut splice.upstream);
                self.tcp_count -= 1;
            }
        }
        self.limits.release(session.key.client.ip());
        out.report(
            session.kind,
            WorkerEvent::SessionClosed {
                backend: session.backend,
                reason,
            },
        );
        listeners.session_ended(registry, usize::from(session.key.port));
    }
}

/// Adds what the kernel forwarded to a session's counters.
fn add_kernel_counts(stats: &mut SessionStats, k: &KernelCounts) {
    stats.packets_upstream += k.packets_upstream;
    stats.bytes_upstream += k.bytes_upstream;
    stats.packets_downstream += k.packets_downstream;
    stats.bytes_downstream += k.bytes_downstream;
}

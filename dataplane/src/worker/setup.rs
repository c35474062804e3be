//! A worker's session setup: a new UDP client's session (admitted by `admission.rs`), the
//! reservation of its slot and socket before a token is spent, and moving a live session
//! (control packet) to a new backend.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::ctl::WorkerEvent;
use crate::listener::Transport;
use crate::metrics::DropReason;
use crate::policy::admit;
use crate::policy::grant::BackendId;
use crate::policy::packet::parse_token;
use crate::policy::ratelimit::ControlBudget;
use crate::policy::session::{Session, SessionId, SessionKey, SessionKind, SessionStats};
use crate::policy::upstream::{is_unicast_target, peer_key};

use super::admission::Admission;
use super::pool::PlaceError;
use super::{Arrival, ORPHAN_IDLE_TIMEOUT, UdpUpstream, Upstream, Worker};

impl Worker {
    /// First datagram of an unknown client: a token (or control packet) opens a session to its
    /// grant's backend and is consumed; anything else goes where the listener's role sends it
    /// (a forwarder's target, a route's endpoint, the default backend), if anywhere.
    /// `reply_to` is the client's address as received (the session key holds its canonical form).
    pub(super) fn open_session(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        arrival: Arrival,
        datagram: &[u8],
        now: Instant,
    ) {
        let port = usize::from(key.port);
        let first = self.admission.classify(datagram);
        let decision = self.admission.decide(
            first,
            port,
            key.client.ip(),
            &self.listeners,
            &self.out,
            now,
        );
        if !matches!(decision, admit::Admission::Drop { .. })
            && !self.admission.admit_session(key.client.ip(), now)
        {
            self.out.counters().drop(DropReason::RateLimited, 1);
            self.listeners.count(port, DropReason::RateLimited);
            return;
        }
        let admitted = match Admission::resolve(decision, port, key.client, &mut self.listeners) {
            Ok(admitted) => admitted,
            Err(reason) => {
                self.out.counters().drop(reason, 1);
                self.listeners.count(port, reason);
                return;
            }
        };
        let mut upstream = match self.reserve(key.client, admitted.target, now) {
            Ok(upstream) => upstream,
            Err(reason) => {
                // A token port's refusals at a cap are counted worker-wide only.
                if admitted.grant.is_none() {
                    self.listeners.count(port, reason);
                }
                return;
            }
        };
        upstream.proxy = self.udp_proxy(admitted.proxy, key.client, port, arrival.local);
        // The token is spent last, once the session's slot and socket exist: a session refused
        // at a cap, or one whose socket cannot be made, leaves the token for the player's retry.
        if let Some(grant) = &admitted.grant
            && let Err(reason) = grant.redeem(port, key.client.ip(), now)
        {
            // Another worker redeemed it in the meantime.
            self.abandon(key.client, &upstream, now);
            self.out.counters().reject(reason);
            self.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let id = self.install(
            key,
            reply_to,
            Upstream::Udp(upstream),
            admitted.target,
            admitted.backend,
            admitted.kind,
            admitted.idle_timeout(),
            now,
        );
        self.set_local(id, arrival.local);
        admitted.opened();
        if admitted.grant.is_some() {
            self.out.counters().tokens_redeemed.add(1);
        }
        self.out.report(
            admitted.kind,
            WorkerEvent::SessionOpened {
                backend: admitted.backend,
                kind: admitted.kind,
                token: admitted.grant.as_ref().map(|g| g.token),
            },
        );
        // A token is consumed; anything else is the client's traffic.
        if admitted.grant.is_none() {
            self.forward_upstream(id, arrival.slot, datagram.len(), now);
        }
    }

    /// Everything a new session needs that can fail: a slot under `maxSessions` and
    /// `maxSessionsPerIp`, and a place on a shared upstream socket to `target`, recorded for
    /// the id the session will take. The reason when refused (counted, and logged at most
    /// once a second).
    pub(super) fn reserve(
        &mut self,
        client: SocketAddr,
        target: SocketAddr,
        now: Instant,
    ) -> Result<UdpUpstream, DropReason> {
        if let Err(reason) = self.limits.try_acquire(client.ip()) {
            self.out.counters().drop(reason, 1);
            return Err(reason);
        }
        match self.open_upstream(target, self.sessions.next_id(), now) {
            Ok(upstream) => Ok(upstream),
            Err(e) => {
                if let Some(note) = self.out.warn(now) {
                    log::warn!("{client}: cannot open a socket to {target}: {e}{note}");
                }
                self.limits.release(client.ip());
                self.out.counters().drop(DropReason::UpstreamSetup, 1);
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
        now: Instant,
    ) -> Result<UdpUpstream, PlaceError> {
        // An IPv4-mapped backend address is an IPv4 backend: sent to from an IPv4 socket, and
        // its replies come from its IPv4 address.
        let key = peer_key(target);
        if !is_unicast_target(key) {
            return Err(PlaceError::NotUnicast);
        }
        let pool = self.pool.acquire(key, id, self.poll.registry(), now)?;
        self.out
            .counters()
            .upstream_sockets
            .set(self.pool.sockets() as u64);
        Ok(UdpUpstream {
            pool,
            key,
            session: id,
            dest: socket2::SockAddr::from(key),
            proxy: None,
            control: ControlBudget::new(now),
        })
    }

    /// Adds a session whose slot and socket [`Self::reserve`] set up; cannot fail.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        upstream: Upstream,
        target: SocketAddr,
        backend: BackendId,
        kind: SessionKind,
        idle_timeout: Option<Duration>,
        now: Instant,
    ) -> SessionId {
        let transport = upstream.transport();
        // `open_session` checked the listener is open, and nothing since could close it.
        let idle_timeout = self
            .listeners
            .session_opened(usize::from(key.port), idle_timeout)
            .unwrap_or(ORPHAN_IDLE_TIMEOUT);
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
            local: None,
        });
        debug_assert_eq!(id.slot(), expected_slot, "registered under another token");
        if transport == Transport::Tcp {
            self.tcp_sessions += 1;
            self.out.counters().tcp_sessions_created[kind as usize].add(1);
        }
        self.out.counters().sessions_created[kind as usize].add(1);
        self.set_session_gauges();
        log::debug!(
            "{}: {} session to {target} ({})",
            key.client,
            transport.as_str(),
            kind.as_str()
        );
        id
    }

    /// Records the proxy address a UDP session's client sent to: its replies leave from it.
    fn set_local(&mut self, id: SessionId, local: Option<IpAddr>) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.local = local;
        }
    }

    /// A control packet on a live session: move it to the new grant's backend.
    pub(super) fn reset_session(&mut self, id: SessionId, body: &[u8], now: Instant) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        let client = session.key.client;
        let port = usize::from(session.key.port);
        let local = session.local;
        let Some(token) = parse_token(body) else {
            if let Some(note) = self.out.warn(now) {
                log::warn!(
                    "{client}: control packet without a valid token; session unchanged{note}"
                );
            }
            self.out.counters().drop(DropReason::MalformedControl, 1);
            return;
        };
        let found = self
            .admission
            .find_grant(token, port, client.ip(), &self.out, now);
        let (grant, target) = match found {
            Ok(found) => found,
            Err(reason) => {
                if let Some(note) = self.out.warn(now) {
                    log::warn!(
                        "{client}: control packet with {} token; session unchanged{note}",
                        reason.as_str()
                    );
                }
                self.out.counters().drop(DropReason::TokenRejected, 1);
                return;
            }
        };
        // The new socket first, the token after: a socket that cannot be made leaves both the
        // session and the token as they were.
        let mut upstream = match self.open_upstream(target, id, now) {
            Ok(upstream) => upstream,
            Err(e) => {
                if let Some(note) = self.out.warn(now) {
                    log::warn!(
                        "{client}: cannot move the session to {target}: {e}; session unchanged{note}"
                    );
                }
                self.out.counters().drop(DropReason::UpstreamSetup, 1);
                return;
            }
        };
        upstream.proxy = self.udp_proxy(grant.backend.proxy, client, port, local);
        if let Err(reason) = grant.redeem(port, client.ip(), now) {
            self.leave_place(&upstream, now);
            self.out.counters().reject(reason);
            self.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let to = grant.backend.id;
        let Some(from) = self.retarget(id, to, target, upstream, SessionKind::Token, now) else {
            return;
        };
        let c = self.out.counters();
        c.sessions_reset.add(1);
        c.tokens_redeemed.add(1);
        log::debug!("{client}: session moved to {target}");
        self.out.send(WorkerEvent::SessionMoved {
            from,
            to,
            token: Some(grant.token),
        });
    }

    /// Points a UDP session at a new backend through `upstream`, its new place on a shared
    /// socket. It leaves its old place: late replies from the old backend are dropped as
    /// strays. Returns the backend the session left (`None`: no such UDP session).
    pub(super) fn retarget(
        &mut self,
        id: SessionId,
        backend: BackendId,
        target: SocketAddr,
        upstream: UdpUpstream,
        kind: SessionKind,
        now: Instant,
    ) -> Option<BackendId> {
        let Some(Session {
            upstream: Upstream::Udp(current),
            ..
        }) = self.sessions.get_mut(id)
        else {
            self.leave_place(&upstream, now);
            return None;
        };
        let old = std::mem::replace(current, upstream);
        let session = self.sessions.get_mut(id)?;
        session.target = target;
        session.kind = kind;
        session.last_active = now;
        let from = std::mem::replace(&mut session.backend, backend);
        self.leave_place(&old, now);
        Some(from)
    }
}

//! A worker's session setup: admission of a new client, the reservation of its slot and
//! socket before a token is spent, and moving a live session (control packet) to a new
//! backend.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::ctl::WorkerEvent;
use crate::listener::Transport;
use crate::metrics::{DropReason, TokenRejectReason};
use crate::policy::admit::{Admission, AdmitContext, Role, admit, trace_refused};
use crate::policy::grant::{BackendId, Grant};
use crate::policy::packet::{Presented, classify, parse_token};
use crate::policy::ratelimit::ControlBudget;
use crate::policy::route::{Pick, RouteTable};
use crate::policy::seal::OpenError;
use crate::policy::session::{Session, SessionId, SessionKey, SessionKind, SessionStats};
use crate::policy::upstream::{is_unicast_target, peer_key};

use super::pool::PlaceError;
use super::{Arrival, ORPHAN_IDLE_TIMEOUT, UdpUpstream, Upstream, Worker};

impl Worker {
    /// First datagram of an unknown client: a token (or control packet) opens a session to its
    /// grant's backend and is consumed; anything else goes to the default backend, if any.
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
        let ctx = self.admit_context(port);
        let first = classify(datagram, &self.control_magic);
        let admission = admit(first, ctx, |token| {
            self.find_grant(token, port, key.client.ip(), now)
        });
        let opens = !matches!(admission, Admission::Drop { .. });
        if opens && !self.session_allowed(key.client, port, now, false) {
            return;
        }
        // A route session also carries its rule's idle timeout and the counter of the Service
        // it went to, added once the session exists.
        let mut route = None;
        let (backend, target, kind, proxy) = match admission {
            Admission::Token { grant, target } => {
                self.open_token_session(key, reply_to, arrival.local, &grant, target, now);
                return;
            }
            Admission::Drop { reason, refused } => {
                trace_refused(key.client, refused);
                self.counters().drop(reason, 1);
                self.listeners.count(port, reason);
                return;
            }
            Admission::Default {
                backend,
                target,
                proxy,
                refused,
            } => {
                trace_refused(key.client, refused);
                (backend, target, SessionKind::Default, proxy)
            }
            Admission::Forward {
                backend,
                target,
                proxy,
            } => (backend, target, SessionKind::Forwarder, proxy),
            Admission::Route => {
                let Some((pick, table)) = self.pick_route(port, key.client) else {
                    self.counters().drop(DropReason::NoRoute, 1);
                    self.listeners.count(port, DropReason::NoRoute);
                    return;
                };
                let target = pick.endpoint;
                route = Some((pick, table));
                (BackendId(pick.key), target, SessionKind::Route, pick.proxy)
            }
        };
        let mut upstream = match self.reserve(key.client, target, now) {
            Ok(upstream) => upstream,
            Err(reason) => {
                self.listeners.count(port, reason);
                return;
            }
        };
        upstream.proxy = self.udp_proxy(proxy, key.client, port, arrival.local);
        let id = self.install(
            key,
            reply_to,
            Upstream::Udp(upstream),
            target,
            backend,
            kind,
            route.as_ref().map(|(pick, _)| pick.idle_timeout),
            now,
        );
        self.set_local(id, arrival.local);
        if let Some((pick, table)) = &route {
            table.rules[pick.rule].backends[pick.backend].sessions.inc();
        }
        self.report(
            kind,
            WorkerEvent::SessionOpened {
                backend,
                kind,
                token: None,
            },
        );
        self.forward_upstream(id, arrival.slot, datagram.len(), now);
    }

    /// Picks the endpoint of a new client of route entry point `port` (with this worker's
    /// rotation state); `None`: no rule takes it, or its rule has no ready endpoint.
    pub(super) fn pick_route(
        &mut self,
        port: usize,
        client: SocketAddr,
    ) -> Option<(Pick, Arc<RouteTable>)> {
        self.listeners.pick_route(port, client)
    }

    /// What admission needs to know of listener `port` and this worker's state.
    pub(super) fn admit_context(&self, port: usize) -> AdmitContext {
        let listener = self.listeners.get(port);
        AdmitContext {
            listener: listener.map_or(Role::TokenPort, |l| Role::from(l.kind())),
            closed: self.draining || listener.is_none_or(|l| l.is_closing()),
            default: self
                .default_backend
                .as_ref()
                .and_then(|d| Some((d.id, d.addr_for(port)?, d.proxy))),
        }
    }

    /// Opens a session with a grant that [`Self::find_grant`] found redeemable. The token is
    /// spent last, once the session's slot and socket exist: a session refused at a cap, or one
    /// whose socket cannot be made, leaves the token for the player's retry.
    pub(super) fn open_token_session(
        &mut self,
        key: SessionKey,
        reply_to: SocketAddr,
        local: Option<IpAddr>,
        grant: &Grant,
        target: SocketAddr,
        now: Instant,
    ) {
        let Ok(mut upstream) = self.reserve(key.client, target, now) else {
            return;
        };
        upstream.proxy = self.udp_proxy(
            grant.backend.proxy,
            key.client,
            usize::from(key.port),
            local,
        );
        if let Err(reason) = grant.redeem(usize::from(key.port), key.client.ip(), now) {
            // Another worker redeemed it in the meantime.
            self.abandon(key.client, &upstream, now);
            self.counters().reject(reason);
            self.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let backend = grant.backend.id;
        let id = self.install(
            key,
            reply_to,
            Upstream::Udp(upstream),
            target,
            backend,
            SessionKind::Token,
            None,
            now,
        );
        self.set_local(id, local);
        self.counters().tokens_redeemed.add(1);
        let _ = self.events.send(WorkerEvent::SessionOpened {
            backend,
            kind: SessionKind::Token,
            token: Some(grant.token),
        });
    }

    /// Looks a token up (a UUID's published grant) or opens it (a sealed token) and checks it
    /// is redeemable on `port` by `client`, without spending it. A grant published just before
    /// the client got its token may still sit in the grant channel, so a miss drains that
    /// channel (and nothing else) once.
    pub(super) fn find_grant(
        &mut self,
        token: Presented<'_>,
        port: usize,
        client: IpAddr,
        now: Instant,
    ) -> Result<(Arc<Grant>, SocketAddr), TokenRejectReason> {
        let grant = match token {
            Presented::Uuid(id) => {
                if !self.grants.contains_key(&id) {
                    self.drain_grants();
                }
                self.grants
                    .get(&id)
                    .map(Arc::clone)
                    .ok_or(TokenRejectReason::Unknown)
            }
            Presented::Sealed(text) => self.open_sealed(text, now),
        };
        let result = grant.and_then(|grant| {
            let target = grant.check(port, client, now)?;
            Ok((grant, target))
        });
        if let Err(reason) = result {
            self.counters().reject(reason);
        }
        result
    }

    /// Opens a sealed token with this replica's keys into a grant whose redemptions go to the
    /// replica's ledger. Without keys, no sealed token opens.
    fn open_sealed(&self, text: &[u8], now: Instant) -> Result<Arc<Grant>, TokenRejectReason> {
        let keys = self.token_keys.as_ref().ok_or(TokenRejectReason::Invalid)?;
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        match keys.open(text, unix) {
            Ok(opened) => Ok(Arc::new(Grant::sealed(
                opened.id,
                opened.backend,
                now + opened.remaining,
                opened.client,
                Arc::clone(&self.ledger),
            ))),
            Err(OpenError::Expired) => Err(TokenRejectReason::Expired),
            Err(OpenError::Malformed | OpenError::Forged) => Err(TokenRejectReason::Invalid),
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
            self.counters().drop(reason, 1);
            return Err(reason);
        }
        match self.open_upstream(target, self.sessions.next_id(), now) {
            Ok(upstream) => Ok(upstream),
            Err(e) => {
                if let Some(note) = self.warn_gate.admit(now) {
                    log::warn!("{client}: cannot open a socket to {target}: {e}{note}");
                }
                self.limits.release(client.ip());
                self.counters().drop(DropReason::UpstreamSetup, 1);
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
        self.counters()
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
            self.counters().tcp_sessions_created[kind as usize].add(1);
        }
        self.counters().sessions_created[kind as usize].add(1);
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
            if let Some(note) = self.warn_gate.admit(now) {
                log::warn!(
                    "{client}: control packet without a valid token; session unchanged{note}"
                );
            }
            self.counters().drop(DropReason::MalformedControl, 1);
            return;
        };
        let (grant, target) = match self.find_grant(token, port, client.ip(), now) {
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
        let mut upstream = match self.open_upstream(target, id, now) {
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
        upstream.proxy = self.udp_proxy(grant.backend.proxy, client, port, local);
        if let Err(reason) = grant.redeem(port, client.ip(), now) {
            self.leave_place(&upstream, now);
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

//! A worker's UDP session setup: a new client's session (admitted by `admission.rs`, its
//! places reserved and the session installed by `sessions.rs`), and a control packet that
//! moves a live session to its new grant's backend.

use std::net::SocketAddr;
use std::time::Instant;

use crate::ctl::WorkerEvent;
use crate::metrics::DropReason;
use crate::policy::admit;
use crate::policy::packet::parse_token;
use crate::policy::session::{SessionId, SessionKey, SessionKind};

use super::admission::Admission;
use super::{Arrival, Upstream, Worker, udp_proxy};

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
        let registry = self.poll.registry();
        let reserved =
            self.sessions
                .reserve(key.client, admitted.target, registry, &mut self.out, now);
        let mut upstream = match reserved {
            Ok(upstream) => upstream,
            Err(reason) => {
                // A token port's refusals at a cap are counted worker-wide only.
                if admitted.grant.is_none() {
                    self.listeners.count(port, reason);
                }
                return;
            }
        };
        upstream.proxy = udp_proxy(
            &self.listeners,
            admitted.proxy,
            key.client,
            port,
            arrival.local,
        );
        // The token is spent last, once the session's slot and socket exist: a session refused
        // at a cap, or one whose socket cannot be made, leaves the token for the player's retry.
        if let Some(grant) = &admitted.grant
            && let Err(reason) = grant.redeem(port, key.client.ip(), now)
        {
            // Another worker redeemed it in the meantime.
            self.sessions.abandon(key.client, &upstream, now);
            self.out.counters().reject(reason);
            self.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let id = self.sessions.install(
            admitted.session(key, reply_to, arrival.local),
            Upstream::Udp(upstream),
            &mut self.listeners,
            &self.out,
            now,
        );
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
        let opened = self
            .sessions
            .open_upstream(target, id, self.poll.registry(), &self.out, now);
        let mut upstream = match opened {
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
        upstream.proxy = udp_proxy(&self.listeners, grant.backend.proxy, client, port, local);
        if let Err(reason) = grant.redeem(port, client.ip(), now) {
            self.sessions.leave_place(&upstream, now);
            self.out.counters().reject(reason);
            self.out.counters().drop(DropReason::TokenRejected, 1);
            return;
        }
        let to = grant.backend.id;
        let moved = self
            .sessions
            .retarget(id, to, target, upstream, SessionKind::Token, now);
        let Some(from) = moved else {
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
}

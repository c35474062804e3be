//! A worker's control side: the state messages from control (listeners opened, changed and
//! closed, live settings, the default backend, drain and shutdown), the admin API's session
//! list and kills, and backends that leave the inventory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;

use crate::config::LiveSettings;
use crate::ctl::{ClientMatch, CloseReason, Closing, ControlMsg, WorkerEvent};
use crate::listener::{CloseMode, ListenerId, ListenerKind, Transport};
use crate::metrics::DropReason;
use crate::policy::grant::BackendId;
use crate::policy::route::RouteTable;
use crate::policy::session::{SessionId, SessionKind};

use super::Worker;

impl Worker {
    pub(super) fn drain_control(&mut self, now: Instant) {
        loop {
            match self.control.try_recv() {
                Ok(msg) => self.apply_control(msg, now),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // Control is gone: nobody can steer or stop us any more.
                    self.shutting_down = true;
                    return;
                }
            }
        }
    }

    pub(super) fn apply_control(&mut self, msg: ControlMsg, now: Instant) {
        if self.defers(&msg) {
            self.deferred.push(msg);
            return;
        }
        match msg {
            ControlMsg::OpenListener {
                id,
                socket,
                kind,
                idle_timeout,
                counters,
            } => self.listeners.open(
                self.poll.registry(),
                id,
                socket,
                kind,
                idle_timeout,
                counters,
            ),
            ControlMsg::UpdateListener {
                id,
                kind,
                idle_timeout,
            } => self.update_listener(usize::from(id.0), kind, idle_timeout, now),
            ControlMsg::CloseListener { id, mode, closing } => {
                self.close_listener(id, mode, closing);
            }
            ControlMsg::Reconfigure(live) => self.reconfigure(&live, now),
            ControlMsg::SetDefault(backend) => self.admission.set_default(backend),
            ControlMsg::RemoveBackend(backend) => self.remove_backend(backend, now),
            ControlMsg::ListSessions(query, reply) => {
                reply(self.sessions.list(self.out.id(), now, &query));
            }
            ControlMsg::KillSessions(client, reply) => reply(self.kill_sessions(client)),
            ControlMsg::HandOffFreeze(reply) => {
                let _ = reply.send(self.hand_off_freeze(now));
            }
            ControlMsg::HandOffEnd(end) => self.hand_off_end(end, now),
            ControlMsg::HandOffGo => self.hand_off_go(now),
            ControlMsg::Adopt(adoption, reply) => {
                let _ = reply.send(self.adopt(*adoption, now));
            }
            ControlMsg::Drain => self.admission.drain(),
            ControlMsg::Shutdown => self.shutting_down = true,
        }
    }

    /// New run-time settings. New sessions and connections follow them; the data ports' open
    /// sessions that had the data ports' idle timeout take the new one, and connections waiting
    /// for their token the new `tcpTokenTimeoutSeconds`. A changed flood limit starts with
    /// fresh buckets.
    fn reconfigure(&mut self, live: &LiveSettings, now: Instant) {
        self.tcp.set_token_timeout(live.tcp_token_timeout);
        self.admission.reconfigure(live, now);
        let changed = self.listeners.set_token_port_timeout(live.session_timeout);
        if !changed.is_empty() {
            self.sessions.retime(&changed, live.session_timeout);
        }
    }

    /// Applies a listener update. A forwarder whose target changed moves its UDP sessions to
    /// the new target now (their next datagram goes there); its TCP connections stay where
    /// they were opened to.
    fn update_listener(
        &mut self,
        index: usize,
        kind: ListenerKind,
        idle_timeout: Duration,
        now: Instant,
    ) {
        let Some(old) = self.listeners.update(index, kind.clone(), idle_timeout) else {
            return;
        };
        // This listener's sessions only: a change to one listener costs what it has, however
        // many sessions the others hold.
        let to = match (old, kind) {
            (ListenerKind::TokenPort, ListenerKind::TokenPort) => return,
            (
                ListenerKind::Forward {
                    target: was,
                    backend: was_backend,
                    proxy: was_proxy,
                },
                ListenerKind::Forward {
                    target,
                    backend,
                    proxy,
                },
            ) if was == target && was_proxy == proxy => {
                if was_backend != backend {
                    // Same target, new identity: the sessions stay and carry the new id
                    // (control is not told: it counts no forwarder sessions).
                    for id in self.sessions.on_listener(index, false) {
                        if let Some(s) = self.sessions.get_mut(id) {
                            s.backend = backend;
                        }
                    }
                }
                return;
            }
            // A new target or a new PROXY protocol mode: the UDP sessions start a new path,
            // with a header built for it if the mode asks.
            (
                ListenerKind::Forward { .. },
                ListenerKind::Forward {
                    target,
                    backend,
                    proxy,
                },
            ) => (backend, target, proxy),
            (ListenerKind::Route { .. }, ListenerKind::Route { table }) => {
                self.rehome_route_sessions(index, &table, now);
                return;
            }
            // A token port turned forwarder or back: its sessions were admitted under rules
            // that no longer hold, so they end (the listener itself stays open).
            _ => {
                for id in self.sessions.on_listener(index, false) {
                    self.close_session(id, CloseReason::ListenerClosed);
                }
                return;
            }
        };
        for id in self.sessions.on_listener(index, true) {
            let moved = self.sessions.move_to(
                id,
                to,
                SessionKind::Forwarder,
                &self.listeners,
                self.poll.registry(),
                &self.out,
                now,
            );
            // Control counts no forwarder sessions, so a move is not reported.
            if moved.is_none() {
                if let Some(note) = self.out.warn(now) {
                    log::warn!(
                        "worker {}: a forwarder session cannot move to {}; ended{note}",
                        self.out.id(),
                        to.1
                    );
                }
                self.out.counters().drop(DropReason::UpstreamSetup, 1);
                self.listeners.count(index, DropReason::UpstreamSetup);
                self.close_session(id, CloseReason::BackendRemoved);
            }
        }
    }

    /// A route entry point got a new table: every UDP session whose endpoint the table no
    /// longer lists for its rule is re-homed by that rule (its next datagram goes to the new
    /// endpoint) and counted; one with nowhere to go ends, counted as `no_route`. TCP
    /// connections keep their endpoint until they close.
    fn rehome_route_sessions(&mut self, index: usize, table: &RouteTable, now: Instant) {
        // Once per swap, so each of the listener's sessions is checked in O(1).
        let served = table.served();
        let stranded: Vec<(SessionId, u64, SocketAddr)> = self
            .sessions
            .on_listener(index, true)
            .into_iter()
            .filter_map(|id| Some((id, self.sessions.get(id)?)))
            .filter(|(_, s)| !served.contains(&(s.backend.0, s.target)))
            .map(|(id, s)| (id, s.backend.0, s.key.client))
            .collect();
        for (id, key, client) in stranded {
            let Some(pick) = self.listeners.rehome(index, table, key, client) else {
                self.out.counters().drop(DropReason::NoRoute, 1);
                self.listeners.count(index, DropReason::NoRoute);
                self.close_session(id, CloseReason::BackendRemoved);
                continue;
            };
            let moved = self.sessions.move_to(
                id,
                (BackendId(pick.key), pick.endpoint, pick.proxy),
                SessionKind::Route,
                &self.listeners,
                self.poll.registry(),
                &self.out,
                now,
            );
            if moved.is_some() {
                // The rule that took it may be another one, with its own idle timeout.
                self.sessions.set_idle_timeout(id, pick.idle_timeout);
                let rule = &table.rules[pick.rule];
                rule.rehomed.inc();
                rule.backends[pick.backend].sessions.inc();
                self.out.counters().sessions_rehomed.add(1);
            } else {
                self.out.counters().drop(DropReason::UpstreamSetup, 1);
                self.listeners.count(index, DropReason::UpstreamSetup);
                self.close_session(id, CloseReason::BackendRemoved);
            }
        }
    }

    /// Closes listener `id` in this worker: its waiting connections now, its sessions now
    /// (`End`) or as they end (`Drain`).
    fn close_listener(&mut self, id: ListenerId, mode: CloseMode, closing: Arc<Closing>) {
        let index = usize::from(id.0);
        if self.listeners.get(index).is_some() {
            // Connections still waiting for their token would be refused now anyway; closed
            // at once, none can outlive the listener and land on a later one that reuses its
            // id.
            self.tcp
                .close_pending_on(index, self.poll.registry(), self.sessions.limits());
            if mode == CloseMode::End {
                // Ended here and now, whatever the other workers do.
                // This listener's sessions only, however many the others hold.
                for session in self.sessions.on_listener(index, false) {
                    self.close_session(session, CloseReason::ListenerClosed);
                }
            }
        }
        self.listeners
            .close(self.poll.registry(), index, mode, closing);
    }

    /// Ends the sessions of the clients `client` matches; returns how many.
    fn kill_sessions(&mut self, client: ClientMatch) -> usize {
        let doomed = self.sessions.ids_where(|s| client.matches(s.key.client));
        for &id in &doomed {
            self.close_session(id, CloseReason::Killed);
        }
        doomed.len()
    }

    /// Token sessions to `backend` end; default sessions move to the current default backend
    /// when it serves their port, and end otherwise.
    fn remove_backend(&mut self, backend: BackendId, now: Instant) {
        let affected: Vec<(SessionId, SessionKind, u16, Transport)> = self
            .sessions
            .ids_where(|s| s.backend == backend)
            .into_iter()
            .filter_map(|id| {
                let s = self.sessions.get(id)?;
                Some((id, s.kind, s.key.port, s.upstream.transport()))
            })
            .collect();
        for (id, kind, port, transport) in affected {
            if transport == Transport::Tcp {
                // A stream cannot move to another backend mid-way.
                self.close_session(id, CloseReason::BackendRemoved);
                continue;
            }
            let new_default = self.admission.default_for(usize::from(port), Some(backend));
            let moved = match (kind, new_default) {
                // The new backend gets the header its mapping asks for.
                (SessionKind::Default, Some(to)) => self
                    .sessions
                    .move_to(
                        id,
                        to,
                        SessionKind::Default,
                        &self.listeners,
                        self.poll.registry(),
                        &self.out,
                        now,
                    )
                    .map(|from| (from, to.0)),
                _ => None,
            };
            match moved {
                Some((from, to)) => self.out.send(WorkerEvent::SessionMoved {
                    from,
                    to,
                    token: None,
                }),
                None => self.close_session(id, CloseReason::BackendRemoved),
            }
        }
    }
}

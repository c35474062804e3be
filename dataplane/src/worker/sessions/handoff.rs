//! The session table's side of a hand-off (SPEC §12): the UDP sessions described for the
//! successor, forgotten once it has them, and, in the successor, taken over with their places
//! on the adopted upstream sockets. TCP sessions never leave: the old process finishes them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Registry;

use crate::ctl::{CloseReason, WorkerEvent};
use crate::handoff::wire::{WireSession, WireSessionKind, WireStats};
use crate::policy::grant::BackendId;
use crate::policy::ratelimit::ControlBudget;
use crate::policy::session::{Session, SessionId, SessionKey, SessionKind, SessionStats};
use crate::policy::upstream::{is_unicast_target, peer_key};

use super::super::Outbox;
use super::super::listeners::Listeners;
use super::super::pool::PoolRef;
use super::super::proxy_header::ProxyState;
use super::{Offload, Sessions, UdpUpstream, Upstream, add_kernel_counts};

impl Sessions {
    /// Stops reading the shared upstream sockets; see `UpstreamPool::freeze`.
    pub(in crate::worker) fn freeze_pool(
        &mut self,
        registry: &Registry,
    ) -> std::io::Result<Vec<(u32, u16, std::os::fd::OwnedFd)>> {
        self.pool.freeze(registry)
    }

    /// Reads the shared upstream sockets again; see `UpstreamPool::resume`.
    pub(in crate::worker) fn resume_pool(&mut self, registry: &Registry) {
        self.pool.resume(registry);
    }

    /// Lets go of the shared upstream sockets (handed over, none serves a session here any
    /// more).
    pub(in crate::worker) fn drop_pool(&mut self, registry: &Registry, out: &Outbox) {
        self.pool.drop_all(registry);
        out.counters().upstream_sockets.set(0);
    }

    /// Every UDP session as the successor takes it, with what the kernel fast path carried
    /// for it folded into its counters and idle time.
    pub(in crate::worker) fn export_udp(&self, now: Instant) -> Vec<WireSession> {
        let mut all = Vec::with_capacity(self.table.len());
        for (_, s) in self.table.iter() {
            let Upstream::Udp(up) = &s.upstream else {
                continue;
            };
            let mut stats = s.stats;
            let mut last_active = s.last_active;
            if let Some(k) = self.kernel_counts(s) {
                add_kernel_counts(&mut stats, &k);
                last_active = k.last.map_or(last_active, |l| l.max(last_active));
            }
            all.push(WireSession {
                listener: s.key.port,
                client: s.key.client,
                reply_to: s.client_sockaddr.as_socket().unwrap_or(s.key.client),
                local: s.local,
                target: s.target,
                backend: s.backend.0,
                kind: match s.kind {
                    SessionKind::Token => WireSessionKind::Token,
                    SessionKind::Default => WireSessionKind::Default,
                    SessionKind::Forwarder => WireSessionKind::Forwarder,
                    SessionKind::Route => WireSessionKind::Route,
                },
                pool: up.pool.number(),
                age_ms: millis(now.saturating_duration_since(s.created)),
                idle_ms: millis(now.saturating_duration_since(last_active)),
                idle_timeout_ms: millis(s.idle_timeout),
                stats: WireStats {
                    packets_upstream: stats.packets_upstream,
                    bytes_upstream: stats.bytes_upstream,
                    packets_downstream: stats.packets_downstream,
                    bytes_downstream: stats.bytes_downstream,
                },
                proxy: up.proxy.as_ref().map(|p| p.wire()),
            });
        }
        all
    }

    /// The successor serves the UDP sessions now: they leave this table without a datagram to
    /// anyone (control is told they closed, so its load counts let go of them), their kernel
    /// fast-path entries deleted so the successor's path sees their traffic. Returns how many.
    pub(in crate::worker) fn forget_udp(
        &mut self,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
    ) -> usize {
        let ids: Vec<SessionId> = self
            .table
            .iter()
            .filter(|(_, s)| matches!(s.upstream, Upstream::Udp(_)))
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            if let Some(mut session) = self.table.remove(id) {
                self.release(
                    &mut session,
                    CloseReason::Shutdown,
                    listeners,
                    registry,
                    out,
                );
            }
        }
        self.set_gauges(out);
        ids.len()
    }

    /// Takes over the previous process's UDP sessions of this worker onto the listeners and
    /// upstream sockets adopted before them. All or nothing is refused with the reason: a
    /// session naming a listener or socket that is not here, or a client twice.
    pub(in crate::worker) fn adopt(
        &mut self,
        sessions: Vec<WireSession>,
        sockets: Vec<(u32, std::net::UdpSocket)>,
        listeners: &mut Listeners,
        registry: &Registry,
        out: &Outbox,
        now: Instant,
    ) -> Result<usize, String> {
        self.pool.adopt_sockets(sockets, registry)?;
        self.table.reserve(sessions.len());
        let mut places = Vec::with_capacity(sessions.len());
        let count = sessions.len();
        for w in sessions {
            let (id, pool, key) = self.adopt_one(w, listeners, out, now)?;
            places.push((pool, key, id));
        }
        self.pool.adopt_places(&places, now)?;
        out.counters()
            .upstream_sockets
            .set(self.pool.sockets() as u64);
        self.set_gauges(out);
        Ok(count)
    }

    fn adopt_one(
        &mut self,
        w: WireSession,
        listeners: &mut Listeners,
        out: &Outbox,
        now: Instant,
    ) -> Result<(SessionId, PoolRef, SocketAddr), String> {
        let who = w.client;
        let port = usize::from(w.listener);
        if listeners.udp_slot(port).is_none() {
            return Err(format!("{who}: no UDP listener {port}"));
        }
        let key = SessionKey {
            client: w.client,
            port: w.listener,
        };
        if self.table.find(&key).is_some() {
            return Err(format!("{who}: two sessions on listener {port}"));
        }
        let pool = PoolRef::from_number(w.pool);
        if self.pool.port(pool).is_none() {
            return Err(format!("{who}: no upstream socket {}", w.pool));
        }
        let target = peer_key(w.target);
        if !is_unicast_target(target) {
            return Err(format!("{who}: {} is not a backend address", w.target));
        }
        if target.is_ipv6() != pool.ipv6() {
            return Err(format!(
                "{who}: backend {target} on an upstream socket of the other family"
            ));
        }
        // Bounded by `State::check`; an age past the clock's start reads as now.
        let [age, idle] = [w.age_ms, w.idle_ms].map(Duration::from_millis);
        let idle_timeout =
            Duration::from_millis(w.idle_timeout_ms).min(crate::policy::session::MAX_IDLE_TIMEOUT);
        let id = self.table.next_id();
        let proxy = w
            .proxy
            .and_then(|p| ProxyState::handed_over(listeners, p, w.client, port, w.local));
        let kind = match w.kind {
            WireSessionKind::Token => SessionKind::Token,
            WireSessionKind::Default => SessionKind::Default,
            WireSessionKind::Forwarder => SessionKind::Forwarder,
            WireSessionKind::Route => SessionKind::Route,
        };
        let idle_timeout = listeners
            .session_opened(port, Some(idle_timeout.max(Duration::from_millis(1))))
            .unwrap_or(idle_timeout);
        self.limits.acquire_existing(w.client.ip());
        let backend = BackendId(w.backend);
        let inserted = self.table.insert(Session {
            key,
            client_sockaddr: w.reply_to.into(),
            upstream: Upstream::Udp(UdpUpstream {
                pool,
                key: target,
                session: id,
                dest: socket2::SockAddr::from(target),
                proxy,
                control: ControlBudget::new(now),
                offload: Offload::Untried,
            }),
            target: w.target,
            backend,
            kind,
            created: now.checked_sub(age).unwrap_or(now),
            last_active: now.checked_sub(idle).unwrap_or(now),
            idle_timeout,
            stats: SessionStats {
                packets_upstream: w.stats.packets_upstream,
                bytes_upstream: w.stats.bytes_upstream,
                packets_downstream: w.stats.packets_downstream,
                bytes_downstream: w.stats.bytes_downstream,
            },
            local: w.local,
        });
        debug_assert_eq!(inserted, id);
        out.report(
            kind,
            WorkerEvent::SessionOpened {
                backend,
                kind,
                token: None,
            },
        );
        Ok((id, pool, target))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

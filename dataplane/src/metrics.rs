//! Per-worker counters and the reasons datagrams are dropped or tokens rejected.
//!
//! Each worker owns one cache-line-padded [`WorkerCounters`]; only that worker writes it, so an
//! increment is a relaxed load and store (no locked instruction). Control sums all workers'
//! counters into a [`CounterSnapshot`] at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::policy::grant::TokenRejectReason;
use crate::policy::session::SessionKind;

/// Why a datagram was dropped, or a TCP connection refused. Per-datagram and per-connection
/// failures are values, never errors.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum DropReason {
    /// First datagram of an unknown client that is no valid token, with no default backend.
    NoSession,
    /// A token or control packet whose token was unknown, used, expired or for another port.
    TokenRejected,
    /// A control packet (magic prefix) whose body is not a token.
    MalformedControl,
    /// `maxSessions` reached.
    SessionLimit,
    /// `maxSessionsPerIp` reached for the client's address.
    IpLimit,
    /// The proxy is draining and opens no new sessions.
    Draining,
    /// The upstream socket of a new session could not be created or connected.
    UpstreamSetup,
    /// Sending to the backend failed (e.g. ICMP port unreachable reported on the socket).
    UpstreamSend,
    /// A client datagram too big to leave for its backend with its PROXY protocol header (if
    /// any) in front: over 65,507 bytes in all to an IPv4 backend, 65,527 to an IPv6 one.
    Oversize,
    /// Sending a reply to the client failed or the socket's send buffer was full.
    DownstreamSend,
    /// A TCP client sent no full token within `tcpTokenTimeoutSeconds`, and there is no default
    /// backend.
    TokenTimeout,
    /// The backend refused or never answered a TCP connection.
    UpstreamConnect,
    /// A datagram reached a shared upstream socket from an address none of its sessions talks
    /// to (a late reply after a session moved or ended, or a stranger).
    StrayReply,
    /// A new client on a route entry point that no rule takes, or whose rule has no ready
    /// endpoint.
    NoRoute,
    /// Over `rateLimit` for its source address (a datagram without a session, or a new
    /// session or connection), or a control packet over its session's allowance.
    RateLimited,
    /// A datagram from one of this proxy's own upstream sockets reached one of its listeners:
    /// a chain of forwarders or routes that leads back to the proxy.
    Loop,
}

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [Self; 16] = [
        Self::NoSession,
        Self::TokenRejected,
        Self::MalformedControl,
        Self::SessionLimit,
        Self::IpLimit,
        Self::Draining,
        Self::UpstreamSetup,
        Self::UpstreamSend,
        Self::Oversize,
        Self::DownstreamSend,
        Self::TokenTimeout,
        Self::UpstreamConnect,
        Self::StrayReply,
        Self::NoRoute,
        Self::RateLimited,
        Self::Loop,
    ];

    /// The reasons a datagram is dropped, in metric-label order.
    pub const DATAGRAM: [Self; 14] = [
        Self::NoSession,
        Self::TokenRejected,
        Self::MalformedControl,
        Self::SessionLimit,
        Self::IpLimit,
        Self::Draining,
        Self::UpstreamSetup,
        Self::UpstreamSend,
        Self::Oversize,
        Self::DownstreamSend,
        Self::StrayReply,
        Self::NoRoute,
        Self::RateLimited,
        Self::Loop,
    ];

    /// The reasons a TCP connection is refused (closed without a session, or when its backend
    /// connection fails), in metric-label order.
    pub const CONNECTION: [Self; 10] = [
        Self::NoSession,
        Self::TokenRejected,
        Self::TokenTimeout,
        Self::SessionLimit,
        Self::IpLimit,
        Self::Draining,
        Self::UpstreamSetup,
        Self::UpstreamConnect,
        Self::NoRoute,
        Self::RateLimited,
    ];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoSession => "no_session",
            Self::TokenRejected => "token_rejected",
            Self::MalformedControl => "malformed_control",
            Self::SessionLimit => "session_limit",
            Self::IpLimit => "ip_limit",
            Self::Draining => "draining",
            Self::UpstreamSetup => "upstream_setup",
            Self::UpstreamSend => "upstream_send",
            Self::Oversize => "oversize",
            Self::DownstreamSend => "downstream_send",
            Self::TokenTimeout => "token_timeout",
            Self::UpstreamConnect => "upstream_connect",
            Self::StrayReply => "stray_reply",
            Self::NoRoute => "no_route",
            Self::RateLimited => "rate_limited",
            Self::Loop => "loop",
        }
    }

    /// Whose fault the drop was: `client`, `backend` or `internal`.
    pub const fn source(self) -> &'static str {
        match self {
            Self::NoSession
            | Self::TokenRejected
            | Self::MalformedControl
            | Self::IpLimit
            | Self::TokenTimeout
            | Self::NoRoute
            | Self::RateLimited
            | Self::Oversize => "client",
            Self::UpstreamSend | Self::UpstreamConnect | Self::StrayReply => "backend",
            Self::SessionLimit
            | Self::Draining
            | Self::UpstreamSetup
            | Self::DownstreamSend
            | Self::Loop => "internal",
        }
    }
}

/// A counter written by one thread and read by others.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker calls this, so load + store cannot lose updates.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (gauges).
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Datagrams client → backend (UDP only, like every unqualified packet and byte count).
    pub packets_upstream: Counter,
    /// Datagrams backend → client.
    pub packets_downstream: Counter,
    /// Bytes client → backend.
    pub bytes_upstream: Counter,
    /// Bytes backend → client.
    pub bytes_downstream: Counter,
    /// Drops, indexed like [`DropReason::ALL`].
    pub dropped: [Counter; DropReason::ALL.len()],
    /// Sessions opened, indexed like [`SessionKind::ALL`].
    pub sessions_created: [Counter; SessionKind::ALL.len()],
    /// Sessions moved to another backend by a control packet.
    pub sessions_reset: Counter,
    /// Route sessions re-homed because their endpoint left.
    pub sessions_rehomed: Counter,
    /// Sessions ended by the idle timeout.
    pub sessions_expired: Counter,
    /// Sessions ended otherwise (killed, backend removed, shutdown).
    pub sessions_closed: Counter,
    /// Sessions live on this worker (gauge).
    pub sessions_active: Counter,
    /// Tokens redeemed (session opened or reset).
    pub tokens_redeemed: Counter,
    /// Tokens rejected, indexed like [`TokenRejectReason::ALL`].
    pub tokens_rejected: [Counter; TokenRejectReason::ALL.len()],
    /// TCP bytes client → backend.
    pub tcp_bytes_upstream: Counter,
    /// TCP bytes backend → client.
    pub tcp_bytes_downstream: Counter,
    /// TCP sessions opened, indexed like [`SessionKind::ALL`] (also counted in
    /// `sessions_created`).
    pub tcp_sessions_created: [Counter; SessionKind::ALL.len()],
    /// TCP sessions live on this worker (gauge; also counted in `sessions_active`).
    pub tcp_sessions_active: Counter,
    /// TCP connections accepted on a data port.
    pub tcp_accepted: Counter,
    /// Shared upstream sockets this worker has open (gauge).
    pub upstream_sockets: Counter,
    /// Sessions of this worker offloaded to the kernel fast path (gauge).
    pub fastpath_sessions: Counter,
    /// TCP connections refused, indexed like [`DropReason::ALL`].
    pub connections_refused: [Counter; DropReason::ALL.len()],
}

impl WorkerCounters {
    #[inline]
    pub(crate) fn refuse(&self, reason: DropReason) {
        self.connections_refused[reason as usize].add(1);
    }

    #[inline]
    pub(crate) fn drop(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].add(n);
    }

    #[inline]
    pub(crate) fn reject(&self, reason: TokenRejectReason) {
        self.tokens_rejected[reason as usize].add(1);
    }
}

/// Sum of all workers' counters at one moment.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CounterSnapshot {
    /// Datagrams client → backend.
    pub packets_upstream: u64,
    /// Datagrams backend → client.
    pub packets_downstream: u64,
    /// Bytes client → backend.
    pub bytes_upstream: u64,
    /// Bytes backend → client.
    pub bytes_downstream: u64,
    /// Drops, indexed like [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Sessions opened, indexed like [`SessionKind::ALL`].
    pub sessions_created: [u64; SessionKind::ALL.len()],
    /// Sessions moved by a control packet.
    pub sessions_reset: u64,
    /// Route sessions re-homed because their endpoint left.
    pub sessions_rehomed: u64,
    /// Sessions ended by the idle timeout.
    pub sessions_expired: u64,
    /// Sessions ended otherwise.
    pub sessions_closed: u64,
    /// Sessions live now.
    pub sessions_active: u64,
    /// Tokens redeemed.
    pub tokens_redeemed: u64,
    /// Tokens rejected, indexed like [`TokenRejectReason::ALL`].
    pub tokens_rejected: [u64; TokenRejectReason::ALL.len()],
    /// TCP bytes client → backend.
    pub tcp_bytes_upstream: u64,
    /// TCP bytes backend → client.
    pub tcp_bytes_downstream: u64,
    /// TCP sessions opened, indexed like [`SessionKind::ALL`].
    pub tcp_sessions_created: [u64; SessionKind::ALL.len()],
    /// TCP sessions live now.
    pub tcp_sessions_active: u64,
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// Shared upstream sockets open.
    pub upstream_sockets: u64,
    /// Sessions offloaded to the kernel fast path now.
    pub fastpath_sessions: u64,
    /// TCP connections refused, indexed like [`DropReason::ALL`].
    pub connections_refused: [u64; DropReason::ALL.len()],
}

impl CounterSnapshot {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    /// Sessions created of one kind (UDP and TCP).
    pub fn created(&self, kind: SessionKind) -> u64 {
        self.sessions_created[kind as usize]
    }

    /// TCP sessions created of one kind.
    pub fn tcp_created(&self, kind: SessionKind) -> u64 {
        self.tcp_sessions_created[kind as usize]
    }

    /// TCP connections refused for one reason.
    pub fn refused(&self, reason: DropReason) -> u64 {
        self.connections_refused[reason as usize]
    }

    /// Tokens rejected for one reason.
    pub fn rejected(&self, reason: TokenRejectReason) -> u64 {
        self.tokens_rejected[reason as usize]
    }

    pub(crate) fn add(&mut self, c: &WorkerCounters) {
        fn sum<const N: usize>(into: &mut [u64; N], from: &[Counter; N]) {
            for (i, f) in into.iter_mut().zip(from) {
                *i += f.get();
            }
        }
        self.packets_upstream += c.packets_upstream.get();
        self.packets_downstream += c.packets_downstream.get();
        self.bytes_upstream += c.bytes_upstream.get();
        self.bytes_downstream += c.bytes_downstream.get();
        sum(&mut self.dropped, &c.dropped);
        sum(&mut self.sessions_created, &c.sessions_created);
        self.sessions_reset += c.sessions_reset.get();
        self.sessions_rehomed += c.sessions_rehomed.get();
        self.sessions_expired += c.sessions_expired.get();
        self.sessions_closed += c.sessions_closed.get();
        self.sessions_active += c.sessions_active.get();
        self.tokens_redeemed += c.tokens_redeemed.get();
        sum(&mut self.tokens_rejected, &c.tokens_rejected);
        self.tcp_bytes_upstream += c.tcp_bytes_upstream.get();
        self.tcp_bytes_downstream += c.tcp_bytes_downstream.get();
        sum(&mut self.tcp_sessions_created, &c.tcp_sessions_created);
        self.tcp_sessions_active += c.tcp_sessions_active.get();
        self.tcp_accepted += c.tcp_accepted.get();
        self.upstream_sockets += c.upstream_sockets.get();
        self.fastpath_sessions += c.fastpath_sessions.get();
        sum(&mut self.connections_refused, &c.connections_refused);
    }
}

/// One worker's counts of one listener.
#[derive(Debug, Default)]
pub(crate) struct ListenerSlot {
    pub(crate) packets_upstream: Counter,
    pub(crate) bytes_upstream: Counter,
    pub(crate) packets_downstream: Counter,
    pub(crate) bytes_downstream: Counter,
    /// Live sessions on this worker (gauge).
    pub(crate) sessions: Counter,
    /// Datagrams dropped and connections refused, indexed like [`DropReason::ALL`].
    pub(crate) dropped: [Counter; DropReason::ALL.len()],
}

impl ListenerSlot {
    #[inline]
    pub(crate) fn drop(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].add(n);
    }
}

/// The traffic of one listener, one cache-line-padded slot per worker (only that worker
/// writes it). Control keeps the `Arc` from [`crate::Controller::listener_counters`] and reads
/// it at scrape time; it outlives the listener, so nothing is lost at a close.
#[derive(Debug)]
pub struct ListenerCounters {
    slots: Box<[crossbeam_utils::CachePadded<ListenerSlot>]>,
}

impl ListenerCounters {
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            slots: (0..workers).map(|_| Default::default()).collect(),
        }
    }

    /// Worker `worker`'s slot.
    #[inline]
    pub(crate) fn slot(&self, worker: usize) -> &ListenerSlot {
        &self.slots[worker]
    }

    /// The sum over every worker now.
    pub fn snapshot(&self) -> ListenerStats {
        let mut s = ListenerStats::default();
        for slot in &*self.slots {
            s.packets_upstream += slot.packets_upstream.get();
            s.bytes_upstream += slot.bytes_upstream.get();
            s.packets_downstream += slot.packets_downstream.get();
            s.bytes_downstream += slot.bytes_downstream.get();
            s.sessions += slot.sessions.get();
            for (into, from) in s.dropped.iter_mut().zip(&slot.dropped) {
                *into += from.get();
            }
        }
        s
    }
}

/// A listener's counts at one moment. Bytes are datagram payloads (UDP) or stream bytes (TCP);
/// packets are UDP only.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct ListenerStats {
    /// Datagrams client → backend that left.
    pub packets_upstream: u64,
    /// Bytes client → backend.
    pub bytes_upstream: u64,
    /// Datagrams backend → client queued for the client.
    pub packets_downstream: u64,
    /// Bytes backend → client.
    pub bytes_downstream: u64,
    /// Live sessions (clients).
    pub sessions: u64,
    /// Drops and refusals, indexed like [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
}

impl ListenerStats {
    /// Drops (or refusals) for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_listed_in_counter_order_with_their_side() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        for reason in DropReason::DATAGRAM.iter().chain(&DropReason::CONNECTION) {
            assert!(DropReason::ALL.contains(reason));
            assert!(["client", "backend", "internal"].contains(&reason.source()));
        }
        // A datagram too big to forward is the client's doing, not the backend's.
        assert!(DropReason::DATAGRAM.contains(&DropReason::Oversize));
        assert_eq!(
            (DropReason::Oversize.as_str(), DropReason::Oversize.source()),
            ("oversize", "client")
        );
        assert_eq!(DropReason::UpstreamSend.source(), "backend");
    }
}

//! What crosses between control and a worker during a hand-off (SPEC §12), in this process's
//! own types: a worker's share on the old side, what a worker adopts on the new side.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::io::socket::ListenSocket;
use crate::listener::{ListenerId, ListenerKind, Transport};
use crate::metrics::ListenerCounters;

use super::wire::{WireGrant, WireSession};

/// One listener as a worker describes it: its socket of it, duplicated.
#[derive(Debug)]
pub(crate) struct ListenerShare {
    pub(crate) id: ListenerId,
    pub(crate) transport: Transport,
    pub(crate) local: std::net::SocketAddr,
    pub(crate) kind: ListenerKind,
    pub(crate) idle_timeout: Duration,
    pub(crate) fd: OwnedFd,
    /// It takes no new sessions (a close was asked).
    pub(crate) closing: bool,
}

/// A worker's share of the hand-off, taken when it stopped reading.
#[derive(Debug, Default)]
pub(crate) struct WorkerShare {
    pub(crate) listeners: Vec<ListenerShare>,
    /// Its shared upstream sockets: number, local port, duplicated descriptor.
    pub(crate) pools: Vec<(u32, u16, OwnedFd)>,
    pub(crate) sessions: Vec<WireSession>,
    /// The grants not yet spent (worker 0 only: every worker holds the same ones).
    pub(crate) grants: Vec<WireGrant>,
    /// The backend of clients without a token (worker 0 only).
    pub(crate) default: Option<super::wire::WireBackend>,
}

/// How a hand-off ended, for the old side's workers.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum HandOffEnd {
    /// The successor reads the sockets now: forget the UDP sessions, keep finishing TCP.
    Taken,
    /// It failed: read again and serve on.
    Failed,
}

/// One listener a worker of the new process adopts, under the id it had.
#[derive(Debug)]
pub(crate) struct AdoptedListener {
    pub(crate) id: ListenerId,
    pub(crate) socket: ListenSocket,
    pub(crate) kind: ListenerKind,
    pub(crate) idle_timeout: Duration,
    pub(crate) counters: Arc<ListenerCounters>,
}

/// What one worker of the new process takes over, before it reads anything.
#[derive(Debug, Default)]
pub(crate) struct Adoption {
    pub(crate) listeners: Vec<AdoptedListener>,
    /// Upstream sockets by their number in the old worker's pool.
    pub(crate) pools: Vec<(u32, std::net::UdpSocket)>,
    pub(crate) sessions: Vec<WireSession>,
    /// The published grants not yet spent, shared by every worker as when control publishes.
    pub(crate) grants: Vec<Arc<crate::policy::grant::Grant>>,
    /// The backend of clients without a token, until control names one.
    pub(crate) default: Option<Arc<crate::policy::grant::Backend>>,
}

//! The udp-director data plane: one `mio` event loop per core (a worker), each bound with
//! `SO_REUSEPORT` to every listener (token data ports, forwarders, route entry points) and owning
//! its own shard of sessions.
//!
//! The kernel's reuseport hash sends every datagram of one client 4-tuple to the same worker, so a
//! worker's session table needs no lock. A UDP session has a place on one of its worker's shared
//! upstream sockets (at most one session per backend address on each), registered in the same
//! worker's `Poll`, so replies come back to the worker that owns the session.
//!
//! The folders show the layers:
//! - [`policy`]: sans-io decisions (admission, token reading and sealing, route picking, rate and
//!   session limits, PROXY headers, upstream socket assignment, the session table and its
//!   timers). No syscalls, no clock: `now` is passed in.
//! - [`io`]: the kernel's side (socket builders, batched `recvmmsg`/`sendmmsg`, packet info,
//!   the TCP splice, the descriptor budget, the host's own addresses).
//! - `worker/`: the per-core loop that does I/O around the decisions.
//!
//! The control thread talks to workers only through [`Controller`]: listeners, grants (token →
//! backend), the default backend, backend removal, live settings, drain and shutdown travel as
//! [`ctl::ControlMsg`]s on one channel per worker, followed by a `mio::Waker` wake-up. Workers
//! report sessions opened and closed as [`ctl::WorkerEvent`]s, keep per-worker
//! [`metrics::WorkerCounters`] that control sums at scrape time, and beat a [`liveness`]
//! heartbeat. Nothing on the per-datagram path takes a lock or allocates.
//!
//! This crate knows nothing of tokio, Kubernetes or YAML.

pub mod config;
pub mod ctl;
pub mod error;
pub mod fastpath;
pub mod handoff;
pub mod io;
pub mod listener;
pub mod liveness;
pub mod metrics;
mod plane;
pub mod policy;
mod transport;
mod warn_gate;
mod worker;

pub use config::{DataPlaneConfig, DataPortConfig, LiveSettings, WorkerAffinity, available_cores};
pub use ctl::{Controller, SessionInfo, WorkerEvent};
pub use error::{StartError, WorkerError};
pub use listener::{
    CloseMode, ListenError, ListenerId, ListenerKind, ListenerSpec, OpenedListener, Transport,
};
pub use metrics::{
    CounterSnapshot, DropReason, ListenerCounters, ListenerStats, TokenRejectReason,
};
pub use plane::DataPlane;
pub use policy::grant::{Backend, BackendId, Grant, TokenId};
pub use policy::ratelimit::RateLimit;
pub use policy::route::{Cidr, CidrError, Match, RouteBackend, RouteCounter, RouteTable, Rule};
pub use policy::session::SessionKind;
pub use warn_gate::WarnGate;

/// Internals the fuzz targets in `fuzz/` drive directly; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::policy::prefix::{LineEnd, MAX_PREFIX, Prefix, finish_line_end, read_prefix};
}

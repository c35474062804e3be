//! The udp-director data plane: one `mio` event loop per core, each bound with `SO_REUSEPORT` to
//! every UDP data port and owning its own shard of sessions.
//!
//! The kernel's reuseport hash sends every datagram of one client 4-tuple to the same worker, so a
//! worker's session table needs no lock. Each session owns one connected upstream socket registered
//! in the same worker's `Poll`, so replies come back to the worker that owns the session.
//!
//! The control thread talks to workers only through [`Controller`]: grants (token → backend),
//! the default backend, backend removal, drain and shutdown travel as [`ctl::ControlMsg`]s on one
//! bounded channel per worker, followed by a `mio::Waker` wake-up. Workers report sessions opened
//! and closed as [`ctl::WorkerEvent`]s and keep per-worker [`metrics::WorkerCounters`] that
//! control sums at scrape time. Nothing on the per-datagram path takes a lock or allocates.
//!
//! This crate knows nothing of tokio, Kubernetes or YAML.

mod admit;
mod batch;
pub mod config;
pub mod ctl;
pub mod error;
pub mod fd_budget;
pub mod grant;
mod limits;
pub mod listener;
pub mod liveness;
pub mod metrics;
mod own_addrs;
pub mod packet;
mod pktinfo;
mod plane;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod route;
pub mod seal;
pub mod session;
mod socket;
mod tcp;
mod transport;
mod upstream;
mod warn_gate;
mod worker;

pub use config::{DataPlaneConfig, DataPortConfig, LiveSettings, WorkerAffinity, available_cores};
pub use ctl::{Controller, SessionInfo, WorkerEvent};
pub use error::{StartError, WorkerError};
pub use grant::{Backend, BackendId, Grant, TokenId};
pub use listener::{
    CloseMode, ListenError, ListenerId, ListenerKind, ListenerSpec, OpenedListener, Transport,
};
pub use metrics::{
    CounterSnapshot, DropReason, ListenerCounters, ListenerStats, TokenRejectReason,
};
pub use plane::DataPlane;
pub use ratelimit::RateLimit;
pub use route::{Cidr, Match, RouteBackend, RouteCounter, RouteTable, Rule};
pub use session::SessionKind;
pub use warn_gate::WarnGate;

/// Internals the fuzz targets in `fuzz/` drive directly; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::tcp::prefix::{LineEnd, MAX_PREFIX, Prefix, finish_line_end, read_prefix};
}

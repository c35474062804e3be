//! The data plane's own, already-validated settings. YAML parsing and validation live in the
//! control crate; this is the plain-Rust shape the workers are started with.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::listener::Transport;

/// Default socket buffer size (`SO_RCVBUF`/`SO_SNDBUF`) of each data-port socket: large enough to
/// absorb a burst of a few thousand game datagrams while a worker is busy.
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Default control packet prefix: FF FF FF FF "RESET".
pub const DEFAULT_CONTROL_MAGIC: &[u8] = b"\xFF\xFF\xFF\xFFRESET";

/// Settings for [`crate::DataPlane::start`].
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// Data ports, in the order that defines their index in grants and sessions.
    pub data_ports: Vec<DataPortConfig>,
    /// Number of worker threads.
    pub workers: NonZeroUsize,
    /// CPU pinning of the worker threads.
    pub affinity: WorkerAffinity,
    /// A session with no traffic in either direction for this long ends.
    pub session_timeout: Duration,
    /// Global cap on live sessions (all workers together).
    pub max_sessions: usize,
    /// Cap on live sessions per client IP address (all workers together).
    pub max_sessions_per_ip: Option<usize>,
    /// A TCP client on a data port has this long to send its token (then: default backend, or
    /// the connection is closed).
    pub tcp_token_timeout: Duration,
    /// A TCP session whose backend connection is not established this long after it opened
    /// is closed and counted as `upstream_connect` (the kernel alone would try for minutes).
    pub tcp_connect_timeout: Duration,
    /// Prefix that marks a control (session reset) packet.
    pub control_magic: Vec<u8>,
    /// `SO_RCVBUF` of each data-port socket.
    pub recv_buffer_bytes: usize,
    /// `SO_SNDBUF` of each data-port socket.
    pub send_buffer_bytes: usize,
    /// Use `recvmmsg`/`sendmmsg` (Linux). When false, or off Linux, one syscall per datagram.
    pub batch_io: bool,
    /// After handling traffic, a worker keeps polling without sleeping for this long before it
    /// blocks in `epoll_wait`: a reply that comes back within it costs no wake-up. Zero: off.
    pub busy_poll: Duration,
    /// Per-source-IP limits on datagrams without a session and on new sessions (off: `None`).
    pub rate_limit: Option<crate::policy::ratelimit::RateLimit>,
    /// The keys that open sealed tokens (`tokenSecret`); `None`: only UUID tokens.
    pub token_keys: Option<std::sync::Arc<crate::policy::seal::KeyRing>>,
    /// Descriptors the control thread may need beyond those open when the data plane starts
    /// (its connection caps and more): kept out of the data plane's budget.
    pub control_fd_reserve: usize,
    /// The kernel fast path for established UDP sessions (`fastPath: {kind: tc}`); `None`:
    /// off (`kind: none`).
    pub fast_path: Option<crate::fastpath::FastPathConfig>,
}

/// The settings that can change while the data plane runs (config reload): they apply to new
/// sessions and connections, and the idle timeout to the data ports' open sessions too.
#[derive(Clone, Debug)]
pub struct LiveSettings {
    /// Idle timeout of the data ports' sessions.
    pub session_timeout: Duration,
    /// A TCP client's time to send its token.
    pub tcp_token_timeout: Duration,
    /// Global session cap.
    pub max_sessions: usize,
    /// Per-IP session cap.
    pub max_sessions_per_ip: Option<usize>,
    /// Flood limits.
    pub rate_limit: Option<crate::policy::ratelimit::RateLimit>,
    /// Sealed-token keys.
    pub token_keys: Option<std::sync::Arc<crate::policy::seal::KeyRing>>,
}

impl DataPlaneConfig {
    /// The part of this configuration that can change at run time.
    pub fn live(&self) -> LiveSettings {
        LiveSettings {
            session_timeout: self.session_timeout,
            tcp_token_timeout: self.tcp_token_timeout,
            max_sessions: self.max_sessions,
            max_sessions_per_ip: self.max_sessions_per_ip,
            rate_limit: self.rate_limit,
            token_keys: self.token_keys.clone(),
        }
    }

    /// A configuration with the product defaults for the given ports (used by tests and tools).
    pub fn with_ports(data_ports: Vec<DataPortConfig>) -> Self {
        Self {
            data_ports,
            workers: NonZeroUsize::MIN,
            affinity: WorkerAffinity::None,
            session_timeout: Duration::from_secs(300),
            max_sessions: 1_000_000,
            max_sessions_per_ip: None,
            tcp_token_timeout: Duration::from_secs(10),
            tcp_connect_timeout: Duration::from_secs(5),
            control_magic: DEFAULT_CONTROL_MAGIC.to_vec(),
            recv_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            send_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            batch_io: true,
            busy_poll: Duration::ZERO,
            rate_limit: None,
            token_keys: None,
            control_fd_reserve: crate::io::fd_budget::CONTROL_RESERVE_BASE,
            fast_path: None,
        }
    }
}

/// One data port.
#[derive(Clone, Debug)]
pub struct DataPortConfig {
    /// Name used in grants and reported to clients (`ports` in the query answer).
    pub name: String,
    /// Address to bind; port 0 picks one port shared by every worker.
    pub bind: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
}

impl DataPortConfig {
    /// A UDP data port.
    pub fn udp(name: impl Into<String>, bind: SocketAddr) -> Self {
        Self {
            name: name.into(),
            bind,
            transport: Transport::Udp,
        }
    }

    /// A TCP data port.
    pub fn tcp(name: impl Into<String>, bind: SocketAddr) -> Self {
        Self {
            name: name.into(),
            bind,
            transport: Transport::Tcp,
        }
    }
}

/// How worker threads are pinned to cores.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum WorkerAffinity {
    /// No pinning; the scheduler decides.
    None,
    /// Worker `i` runs on the `i`-th core the OS reports (modulo the core count).
    Auto,
    /// Worker `i` runs on `cores[i % cores.len()]`.
    Cores(Vec<usize>),
}

/// Ids of the cores this process may run on (its affinity mask), as `cpuAffinity` names them;
/// empty when the OS does not say.
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

//! What travels over the hand-off socket (SPEC §12), as plain data: the messages of the
//! exchange and the state a running proxy hands to its successor. Descriptors travel beside
//! the messages as `SCM_RIGHTS`; a field named `fd` is an index into the descriptors that came
//! with the message that holds it.
//!
//! These types are the format: a change to them is a change of [`VERSION`]. A new release
//! reads the stream of the previous one ([`READS`]; a stream of the current format is kept as
//! a fixture and read back by a test), and the newer side decides: the old process writes its
//! own format if the new one reads it, and the new process vets the old one's config with its
//! own parser, which knows every key an older release could have.
//!
//! The exchange: the new process says [`Hello`]; the old one answers [`Answer::Accept`] with
//! its config; the new one says [`Decision::Proceed`] (or declines and exits); the old one
//! stops reading and sends the [`State`] and its [`SessionBatch`]es; the new one installs
//! everything without reading and says [`Taken`]; the old one forgets what it handed over and
//! says [`Released`]; only then does the new one read. Until `Released` either side may give
//! up, and the old one serves on: no datagram is read by both. Everything here is parsed as untrusted input:
//! sizes are bounded by the framing (`super::stream`) and `check` refuses what cannot be
//! installed, before anything is.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The format version this build writes.
pub const VERSION: u32 = 1;

/// The formats this build reads: its own and its predecessor's.
pub const READS: &[u32] = &[1];

/// Whether this build can read a stream of `version`.
pub fn accepts_version(version: u32) -> bool {
    READS.contains(&version)
}

/// The first message, from the new process: who it is and which formats it reads.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The format it writes.
    pub version: u32,
    /// The formats it reads; the old process writes its own only if it is among them.
    pub reads: Vec<u32>,
    /// Its release (`CARGO_PKG_VERSION`), for logs.
    pub release: String,
    /// Its process id, for logs.
    pub pid: u32,
}

/// The old process's answer to a [`Hello`].
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// It can hand over, in format `version`, what it runs with `config` (its config file's
    /// text) on `workers` workers; the new process decides.
    Accept {
        version: u32,
        release: String,
        config: String,
        workers: u32,
        /// Its process id: a successor that loses the connection after [`Taken`] reads if
        /// this process is gone.
        pid: u32,
    },
    /// It cannot (it writes no format the new process reads), and says why.
    Refuse { reason: String },
}

/// The new process's decision on an [`Answer::Accept`].
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// Stop reading and send the state.
    Proceed,
    /// It will not take over (a restart key differs, a worker count), and exits with this.
    Decline { reason: String },
}

/// The new process has installed everything, without reading yet.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Taken;

/// The old process has forgotten what it handed over: the new one reads from now on.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct Released {
    /// Microseconds since the old process stopped reading.
    pub gap_us: u64,
}

/// The protocol of a socket.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum WireTransport {
    Udp,
    Tcp,
}

/// A listener's PROXY protocol mode toward its backends.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum WireProxyMode {
    None,
    V2,
    V2First,
}

/// What a listener does with new clients, as far as the new process needs it before its own
/// config and reconcilers claim the listener.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum WireListenerKind {
    /// A token data port.
    TokenPort,
    /// A forwarder: every new client to one target.
    Forward {
        target: SocketAddr,
        backend: u64,
        proxy: WireProxyMode,
    },
    /// A route entry point or Gateway listener: new clients wait for the new process's route
    /// table (they are dropped as `no_route` until its reconciler claims the listener).
    Route,
}

/// One listener: its address, what it does, and one socket per worker (worker `i`'s is
/// `fds[i]`).
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireListener {
    /// Its id in the old process; sessions name their listener by it.
    pub id: u16,
    /// Who opened it there (a data port, a forwarder, an entry point), for logs.
    pub owner: String,
    pub transport: WireTransport,
    /// The address its sockets are bound to.
    pub addr: SocketAddr,
    pub kind: WireListenerKind,
    /// Idle timeout of its new sessions, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Its socket on each worker, by worker index.
    pub fds: Vec<u32>,
    /// It was closing (draining its sessions; it takes no new ones) in the old process.
    #[serde(default)]
    pub closing: bool,
}

/// One of a worker's shared upstream sockets.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WirePoolSocket {
    /// Its number in the old worker's pool (index × 2, plus 1 for IPv6); sessions name it.
    pub number: u32,
    /// Its local port.
    pub port: u16,
    pub fd: u32,
}

/// A UDP session's PROXY protocol v2 state.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireProxyState {
    /// `v2` (every datagram) or `v2-first`.
    pub every: bool,
    /// `v2-first`: no datagram with the header has left yet.
    pub pending: bool,
}

/// The traffic a session has carried.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireStats {
    #[serde(rename = "pu")]
    pub packets_upstream: u64,
    #[serde(rename = "bu")]
    pub bytes_upstream: u64,
    #[serde(rename = "pd")]
    pub packets_downstream: u64,
    #[serde(rename = "bd")]
    pub bytes_downstream: u64,
}

/// How a session opened (the `origin` label).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub enum WireSessionKind {
    Token,
    Default,
    Forwarder,
    Route,
}

/// One UDP session of a worker. Its fields have one- or two-letter names on the wire: a
/// node's sessions are most of a hand-off's bytes, and every byte is in the pause.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireSession {
    /// Its listener's id in the old process ([`WireListener::id`]).
    #[serde(rename = "l")]
    pub listener: u16,
    /// The client's address, as the session table keys it.
    #[serde(rename = "c")]
    pub client: SocketAddr,
    /// The client's address as received (its replies go there).
    #[serde(rename = "r")]
    pub reply_to: SocketAddr,
    /// The proxy address the client sent to (its replies leave from it), when known.
    #[serde(rename = "o")]
    pub local: Option<IpAddr>,
    /// The backend it forwards to.
    #[serde(rename = "t")]
    pub target: SocketAddr,
    #[serde(rename = "b")]
    pub backend: u64,
    #[serde(rename = "k")]
    pub kind: WireSessionKind,
    /// Its shared upstream socket ([`WirePoolSocket::number`] in the same worker).
    #[serde(rename = "p")]
    pub pool: u32,
    /// How long ago it opened, in milliseconds.
    #[serde(rename = "a")]
    pub age_ms: u64,
    /// How long ago it last carried traffic, in milliseconds.
    #[serde(rename = "i")]
    pub idle_ms: u64,
    #[serde(rename = "to")]
    pub idle_timeout_ms: u64,
    #[serde(rename = "s")]
    pub stats: WireStats,
    #[serde(rename = "x")]
    pub proxy: Option<WireProxyState>,
}

/// One worker's share: its pool sockets and its UDP sessions. TCP sessions stay with the old
/// process, which finishes them.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireWorker {
    pub pools: Vec<WirePoolSocket>,
    pub sessions: Vec<WireSession>,
}

/// A backend as a grant names it: an address per data port.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireBackend {
    pub id: u64,
    pub addrs: Vec<Option<SocketAddr>>,
    pub proxy: WireProxyMode,
}

/// A grant not yet spent: the token a player holds and may still redeem.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireGrant {
    /// The token (a UUID's 128 bits, or a sealed token's nonce).
    pub token: u128,
    pub backend: WireBackend,
    /// Milliseconds until it expires.
    pub expires_in_ms: u64,
    /// With `bindTokenToClientIp`: the only client that may redeem it.
    pub client: Option<IpAddr>,
    /// A sealed token's grant (redemptions in the ledger) or a published one.
    pub sealed: bool,
    /// Data ports it was redeemed on already, a bit per port.
    pub redeemed: u64,
}

/// A sealed token this replica redeemed: it must stay spent on the new process.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireLedgerEntry {
    pub token: u128,
    /// Milliseconds until the entry may be forgotten.
    pub keep_ms: u64,
    /// Data ports it was redeemed on, a bit per port.
    pub ports: u64,
}

/// Everything the old process hands over, sent after [`Answer::Accept`].
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The old process's release, for logs.
    pub release: String,
    /// Its listeners, each with a socket per worker.
    pub listeners: Vec<WireListener>,
    /// Per worker, by index.
    pub workers: Vec<WireWorker>,
    pub grants: Vec<WireGrant>,
    pub ledger: Vec<WireLedgerEntry>,
    /// The query port's listening socket, when the old process had one.
    pub query_fd: Option<u32>,
    /// The admin port's listening socket.
    pub admin_fd: Option<u32>,
    /// How many [`SessionBatch`] messages follow this one: the sessions travel apart from the
    /// state, so no message grows with a node's session count past the stream's bound.
    #[serde(default)]
    pub session_batches: u32,
    /// The backend of clients without a token, until the new process's own inventory names
    /// one.
    #[serde(default)]
    pub default: Option<WireBackend>,
}

/// Sessions at most in one [`SessionBatch`] (about 200 bytes of JSON each): small batches
/// let the new process parse one while the old one encodes the next.
pub const SESSIONS_PER_BATCH: usize = 1024;

/// Batches at most after one [`State`]: 4M sessions, far past any node's `maxSessions`
/// (each batch well within the stream's message bound).
pub const MAX_SESSION_BATCHES: u32 = 4096;

/// Some of one worker's UDP sessions, sent after the [`State`] they belong to.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct SessionBatch {
    /// The worker, by index.
    pub worker: u32,
    pub sessions: Vec<WireSession>,
}

mod check;

pub use check::{
    DescriptorUse, MAX_ELAPSED_MS, MAX_GRANT_PORTS, MAX_IDLE_TIMEOUT_MS, MAX_TEXT_BYTES, StateError,
};

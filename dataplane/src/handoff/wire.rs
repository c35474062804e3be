//! What travels over the hand-off socket (SPEC §12), as plain data: the messages of the
//! exchange and the state a running proxy hands to its successor. Descriptors travel beside
//! the messages as `SCM_RIGHTS`; a field named `fd` is an index into the descriptors that came
//! with the message that holds it.
//!
//! These types and [`encode_batch`] are the format: a change to them is a change of
//! [`VERSION`]. A release reads and writes its own format and the previous one ([`READS`]; a
//! stream of each is kept as a fixture and read back by a test): the old process writes the
//! newest format the successor reads ([`common_version`]), so an upgrade and a rollback both
//! hand over, and the new process vets the old one's config with its own parser. Every message
//! is JSON but the session batches, which format 2 writes in binary.
//!
//! The exchange: the new process says [`Hello`]; the old one answers [`Answer::Accept`] with
//! its config; the new one says [`Decision::Proceed`] (or declines and exits); the old one
//! stops reading and sends the [`State`] and its [`SessionBatch`]es; the new one installs
//! everything without reading and says [`Taken`]; the old one forgets what it handed over and
//! says [`Released`]; only then does the new one read. Until `Released` either side may give
//! up, and the old one serves on: no datagram is read by both. Everything here is parsed as
//! untrusted input: sizes are bounded by the framing (`super::stream`) and [`decode_batch`],
//! and `check` refuses what cannot be installed, before anything is.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The newest format this build writes.
pub const VERSION: u32 = 2;

/// The formats this build reads and writes: its own and its predecessor's. Format 1 sent the
/// session batches as JSON; format 2 sends them as `postcard` (serde's compact binary, about
/// a quarter of the bytes and a sixth of the time at each end: the sessions are most of a
/// hand-off's bytes, and every byte is in the players' pause). Everything else is the same.
pub const READS: &[u32] = &[1, 2];

/// Whether this build can read a stream of `version`.
pub fn accepts_version(version: u32) -> bool {
    READS.contains(&version)
}

/// The format the old process writes to a successor that reads `theirs`: the newest both
/// know. A successor of an older release (a rollback) gets the older format; `None` when
/// they share none.
pub fn common_version(theirs: &[u32]) -> Option<u32> {
    READS.iter().copied().filter(|v| theirs.contains(v)).max()
}

/// A session batch that cannot be written or read in the format agreed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("format {0} is not one this build knows")]
    Version(u32),
    #[error("{0} bytes, over the format's bound of {1}")]
    TooLarge(usize, usize),
    #[error("{0} sessions, over the format's bound of {1}")]
    TooMany(usize, usize),
    #[error("{0} bytes after the batch")]
    Trailing(usize),
    #[error("session batch JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("session batch: {0}")]
    Binary(#[from] postcard::Error),
}

/// A session batch's bytes in format `version`.
pub fn encode_batch(version: u32, batch: &SessionBatch) -> Result<Vec<u8>, BatchError> {
    match version {
        1 => Ok(serde_json::to_vec(batch)?),
        2 => Ok(postcard::to_stdvec(batch)?),
        other => Err(BatchError::Version(other)),
    }
}

/// A session batch read from its bytes in format `version`, as untrusted input, held to the
/// format's [`Limits`] before and after: a session takes a few bytes in binary but about 200
/// in memory, so a batch as large as the framing allows could decode into gigabytes; past the
/// byte bound it is refused unread, past the session bound once read. Bytes left over are an
/// error too.
pub fn decode_batch(version: u32, bytes: &[u8]) -> Result<SessionBatch, BatchError> {
    let limits = limits(version).ok_or(BatchError::Version(version))?;
    if bytes.len() > limits.batch_bytes {
        return Err(BatchError::TooLarge(bytes.len(), limits.batch_bytes));
    }
    let batch: SessionBatch = if version == 1 {
        serde_json::from_slice(bytes)?
    } else {
        match postcard::take_from_bytes(bytes)? {
            (batch, []) => batch,
            (_, rest) => return Err(BatchError::Trailing(rest.len())),
        }
    };
    let sessions = batch.sessions.len();
    if sessions > limits.sessions_per_batch {
        return Err(BatchError::TooMany(sessions, limits.sessions_per_batch));
    }
    Ok(batch)
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
    pub packets_upstream: u64,
    pub bytes_upstream: u64,
    pub packets_downstream: u64,
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

/// One UDP session of a worker. Format 1 writes it as JSON under these field names, as the
/// release that wrote format 1 did; format 2 is positional: adding, removing or reordering a
/// field is a new format, whatever its serde attributes say.
#[derive(Clone, Debug, Eq, PartialEq, Serialize, Deserialize)]
pub struct WireSession {
    /// Its listener's id in the old process ([`WireListener::id`]).
    pub listener: u16,
    /// The client's address, as the session table keys it.
    #[serde(with = "exact_addr")]
    pub client: SocketAddr,
    /// The client's address as received (its replies go there).
    #[serde(with = "exact_addr")]
    pub reply_to: SocketAddr,
    /// The proxy address the client sent to (its replies leave from it), when known.
    pub local: Option<IpAddr>,
    /// The backend it forwards to.
    #[serde(with = "exact_addr")]
    pub target: SocketAddr,
    pub backend: u64,
    pub kind: WireSessionKind,
    /// Its shared upstream socket ([`WirePoolSocket::number`] in the same worker).
    pub pool: u32,
    /// How long ago it opened, in milliseconds.
    pub age_ms: u64,
    /// How long ago it last carried traffic, in milliseconds.
    pub idle_ms: u64,
    pub idle_timeout_ms: u64,
    pub stats: WireStats,
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

/// How each format cuts the sessions into batches, and the bounds a reader holds a peer to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// Sessions at most in one [`SessionBatch`].
    pub sessions_per_batch: usize,
    /// Bytes at most of one batch: twice a full batch of the largest sessions.
    pub batch_bytes: usize,
    /// Batches at most after one [`State`].
    pub batches: u32,
}

/// Format 1, as its release wrote it: batches of 16,384 sessions in JSON (a few hundred bytes
/// each, a few MiB a batch), 256 batches.
pub const FORMAT_1: Limits = Limits {
    sessions_per_batch: 16_384,
    batch_bytes: 24 << 20,
    batches: 256,
};

/// Format 2: batches of 1,024 sessions in binary (about 50 bytes each, 170 at most), so the
/// new process parses one while the old one encodes the next; at most a million sessions,
/// about 200 MiB in memory whatever a peer sends.
pub const FORMAT_2: Limits = Limits {
    sessions_per_batch: 1024,
    batch_bytes: 1 << 20,
    batches: 1024,
};

/// The limits of format `version`, when this build knows it.
pub fn limits(version: u32) -> Option<Limits> {
    match version {
        1 => Some(FORMAT_1),
        2 => Some(FORMAT_2),
        _ => None,
    }
}

/// Some of one worker's UDP sessions, sent after the [`State`] they belong to.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize, Deserialize)]
pub struct SessionBatch {
    /// The worker, by index.
    pub worker: u32,
    pub sessions: Vec<WireSession>,
}

mod check;

/// A session's addresses whole: an IPv6 address's scope (a link-local client's interface) and
/// flow label included. In JSON (format 1) the standard text, which has no flow label; in
/// binary (format 2) the address's parts, since serde's compact form drops both.
mod exact_addr {
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    enum Exact {
        V4([u8; 4], u16),
        V6([u8; 16], u16, u32, u32),
    }

    pub(super) fn serialize<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return addr.serialize(s);
        }
        match addr {
            SocketAddr::V4(a) => Exact::V4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => Exact::V6(a.ip().octets(), a.port(), a.flowinfo(), a.scope_id()),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        if d.is_human_readable() {
            return SocketAddr::deserialize(d);
        }
        Ok(match Exact::deserialize(d)? {
            Exact::V4(ip, port) => SocketAddrV4::new(ip.into(), port).into(),
            Exact::V6(ip, port, flow, scope) => {
                SocketAddrV6::new(ip.into(), port, flow, scope).into()
            }
        })
    }
}

pub use check::{
    DescriptorUse, MAX_ELAPSED_MS, MAX_GRANT_PORTS, MAX_IDLE_TIMEOUT_MS, MAX_TEXT_BYTES, StateError,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_process_writes_the_newest_format_both_read() {
        assert_eq!(common_version(&[1, 2]), Some(2));
        assert_eq!(common_version(&[2, 3]), Some(2), "a newer successor");
        assert_eq!(
            common_version(&[1]),
            Some(1),
            "an older successor: a rollback"
        );
        assert_eq!(common_version(&[3, 4]), None);
        assert_eq!(common_version(&[]), None);
        assert!(READS.contains(&VERSION));
        assert!(
            READS.iter().all(|&v| limits(v).is_some()),
            "limits for each format read"
        );
    }

    #[test]
    fn batches_read_back_in_each_format_and_nothing_else() {
        let batch = SessionBatch {
            worker: 1,
            sessions: vec![WireSession {
                listener: 3,
                // A link-local client: its interface goes with it.
                client: std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 5000, 0, 3).into(),
                reply_to: std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 5000, 0, 3)
                    .into(),
                local: None,
                target: "10.0.0.1:7777".parse().unwrap(),
                backend: u64::MAX,
                kind: WireSessionKind::Route,
                pool: 7,
                age_ms: 1,
                idle_ms: 2,
                idle_timeout_ms: 3,
                stats: WireStats::default(),
                proxy: Some(WireProxyState {
                    every: true,
                    pending: false,
                }),
            }],
        };
        for &version in READS {
            let mut bytes = encode_batch(version, &batch).unwrap();
            assert_eq!(decode_batch(version, &bytes).unwrap(), batch);
            bytes.truncate(bytes.len() - 1);
            assert!(decode_batch(version, &bytes).is_err(), "cut short");
        }
        // Format 2 keeps the flow label too.
        let mut labelled = batch.clone();
        labelled.sessions[0].target =
            std::net::SocketAddrV6::new("2001:db8::7".parse().unwrap(), 7777, 0xbeef, 0).into();
        let bytes = encode_batch(2, &labelled).unwrap();
        assert_eq!(decode_batch(2, &bytes).unwrap(), labelled);
        let mut binary = encode_batch(2, &batch).unwrap();
        assert!(decode_batch(1, &binary).is_err(), "binary read as format 1");
        binary.push(0);
        assert!(matches!(
            decode_batch(2, &binary),
            Err(BatchError::Trailing(1))
        ));
        // A length far past the bytes allocates nothing and fails.
        assert!(decode_batch(2, &[1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(matches!(
            encode_batch(9, &batch),
            Err(BatchError::Version(9))
        ));
        assert!(matches!(decode_batch(0, &[]), Err(BatchError::Version(0))));
        // Past the bounds: too many bytes refused unread, too many sessions once read.
        for &version in READS {
            let bounds = limits(version).unwrap();
            let over = vec![b' '; bounds.batch_bytes + 1];
            assert!(matches!(
                decode_batch(version, &over),
                Err(BatchError::TooLarge(..))
            ));
            let crowded = SessionBatch {
                worker: 0,
                sessions: vec![batch.sessions[0].clone(); bounds.sessions_per_batch + 1],
            };
            let bytes = encode_batch(version, &crowded).unwrap();
            assert!(matches!(
                decode_batch(version, &bytes),
                Err(BatchError::TooMany(n, _)) if n == bounds.sessions_per_batch + 1
            ));
        }
    }
}

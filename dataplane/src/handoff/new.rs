//! The new process's side (SPEC §12): find the running proxy on the socket, say who it is,
//! receive its state and descriptors, check them whole, install them into the workers before
//! they read anything, and say `Taken` once it serves. Any failure before `Taken` leaves the
//! old process serving: it reads its sockets again when the connection ends.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ctl::Controller;
use crate::io::socket::ListenSocket;
use crate::listener::{ListenerId, ListenerKind, Transport};
use crate::metrics::ListenerCounters;
use crate::policy::grant::{Backend, BackendId, Grant, TokenId};
use crate::policy::route::RouteTable;

use super::share::{AdoptedListener, Adoption};
use super::stats::HandOffResult;
use super::stream::{Channel, StreamError};
use super::wire::{Answer, Hello, State, Taken, WireListenerKind, WireTransport, accepts_version};

/// How long one step of the exchange may take before the new process gives up (the old one
/// then serves on).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the new process could not take over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// The running proxy said no, and why.
    #[error("the running proxy refused the hand-off: {0}")]
    Refused(String),
    /// The exchange broke off.
    #[error("hand-off over {path}: {source}")]
    Stream {
        path: String,
        #[source]
        source: StreamError,
    },
    /// The socket exists but cannot be reached.
    #[error("hand-off socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    /// What came cannot be installed.
    #[error("the running proxy's state cannot be taken over: {0}")]
    Invalid(String),
}

/// What the running proxy handed over, until installed.
#[derive(Debug)]
pub struct Inheritance {
    state: State,
    fds: Vec<Option<OwnedFd>>,
    channel: Channel,
    started: Instant,
    sessions: usize,
}

/// Connects to a running proxy on `path` and takes its state; `Ok(None)` when none runs
/// there (no socket, or a stale one nobody listens on): then this process starts fresh.
pub fn take_over(
    path: &Path,
    hello: &Hello,
    workers: usize,
) -> Result<Option<Inheritance>, TakeOverError> {
    let shown = path.display().to_string();
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            log::info!("hand-off: no running proxy on {shown}: starting fresh");
            return Ok(None);
        }
        Err(source) => {
            return Err(TakeOverError::Connect {
                path: shown,
                source,
            });
        }
    };
    let started = Instant::now();
    let stream_err = |source| TakeOverError::Stream {
        path: shown.clone(),
        source,
    };
    let mut channel = Channel::new(stream, STEP_TIMEOUT).map_err(stream_err)?;
    channel.send(hello, &[]).map_err(stream_err)?;
    let (answer, _): (Answer, _) = channel.recv().map_err(stream_err)?;
    if let Answer::Refuse { reason } = answer {
        return Err(TakeOverError::Refused(reason));
    }
    let (state, fds): (State, Vec<OwnedFd>) = channel.recv().map_err(stream_err)?;
    state
        .check(workers, fds.len())
        .map_err(|e| TakeOverError::Invalid(e.to_string()))?;
    let sessions = state.workers.iter().map(|w| w.sessions.len()).sum();
    log::info!(
        "hand-off: received {} listeners, {sessions} UDP sessions, {} grants and {} \
         descriptors from release {}",
        state.listeners.len(),
        state.grants.len(),
        fds.len(),
        state.release
    );
    Ok(Some(Inheritance {
        state,
        fds: fds.into_iter().map(Some).collect(),
        channel,
        started,
        sessions,
    }))
}

impl Inheritance {
    /// The query port's listening socket, when the old process handed one over.
    pub fn take_query_listener(&mut self) -> Option<TcpListener> {
        let fd = self.state.query_fd?;
        self.take_fd(fd).ok().map(TcpListener::from)
    }

    /// The admin port's listening socket, when the old process handed one over.
    pub fn take_admin_listener(&mut self) -> Option<TcpListener> {
        let fd = self.state.admin_fd?;
        self.take_fd(fd).ok().map(TcpListener::from)
    }

    /// UDP sessions in the state.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    fn take_fd(&mut self, index: u32) -> Result<OwnedFd, String> {
        self.fds
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor {index} named twice or missing"))
    }

    /// Installs everything into the data plane: listeners under their old ids (until the
    /// config or a reconciler claims them), upstream sockets, sessions, grants and the nonce
    /// ledger. The workers read from here on.
    pub(crate) fn install(&mut self, controller: &Controller) -> Result<usize, String> {
        let now = Instant::now();
        let workers = controller.workers();
        let mut shares: Vec<Adoption> = (0..workers).map(|_| Adoption::default()).collect();
        let listeners = std::mem::take(&mut self.state.listeners);
        for l in listeners {
            let transport = match l.transport {
                WireTransport::Udp => Transport::Udp,
                WireTransport::Tcp => Transport::Tcp,
            };
            let lease = controller
                .budget
                .try_take(workers)
                .ok_or_else(|| format!("listener {}: the descriptor budget is spent", l.addr))?;
            let counters = Arc::new(ListenerCounters::new(workers));
            controller
                .registry
                .lock()
                .adopt(
                    ListenerId(l.id),
                    transport,
                    l.addr,
                    l.owner.clone(),
                    Arc::clone(&counters),
                    lease,
                )
                .map_err(|e| e.to_string())?;
            let kind = match l.kind {
                WireListenerKind::TokenPort => ListenerKind::TokenPort,
                WireListenerKind::Forward {
                    target,
                    backend,
                    proxy,
                } => ListenerKind::Forward {
                    target,
                    backend: BackendId(backend),
                    proxy: super::proxy_mode(proxy),
                },
                // New clients wait for this process's route table (its reconciler claims
                // the listener); live sessions carry their own endpoint.
                WireListenerKind::Route => ListenerKind::Route {
                    table: Arc::new(RouteTable::default()),
                },
            };
            for (worker, &fd) in l.fds.iter().enumerate() {
                let socket = listen_socket(self.take_fd(fd)?, transport, l.addr)?;
                shares[worker].listeners.push(AdoptedListener {
                    id: ListenerId(l.id),
                    socket,
                    kind: kind.clone(),
                    idle_timeout: Duration::from_millis(l.idle_timeout_ms),
                    counters: Arc::clone(&counters),
                });
            }
        }
        let mut descriptors = 0;
        for (worker, share) in self.state.workers.iter_mut().enumerate() {
            for p in &share.pools {
                let fd = self.fds.get_mut(p.fd as usize).and_then(Option::take);
                let fd = fd.ok_or_else(|| format!("descriptor {} named twice", p.fd))?;
                shares[worker].pools.push((p.number, upstream_socket(fd)?));
                descriptors += 1;
            }
            shares[worker].sessions = std::mem::take(&mut share.sessions);
        }
        descriptors += shares.iter().map(|s| s.listeners.len()).sum::<usize>();
        let sessions = controller.adopt(shares, STEP_TIMEOUT)?;
        for g in std::mem::take(&mut self.state.grants) {
            let backend = Backend {
                id: BackendId(g.backend.id),
                addrs: g.backend.addrs.into_boxed_slice(),
                proxy: super::proxy_mode(g.backend.proxy),
            };
            let expires = now + Duration::from_millis(g.expires_in_ms.min(86_400_000));
            let grant =
                Grant::handed_over(TokenId(g.token), backend, expires, g.client, g.redeemed);
            if controller.publish_grant(grant).is_err() {
                log::warn!("hand-off: a grant could not be published (workers busy)");
            }
        }
        for e in std::mem::take(&mut self.state.ledger) {
            let keep = now + Duration::from_millis(e.keep_ms.min(86_400_000));
            controller.ledger.adopt(TokenId(e.token), keep, e.ports);
        }
        controller
            .handoff
            .record(sessions, descriptors, Duration::ZERO);
        Ok(sessions)
    }

    /// Tells the old process this one serves now: it forgets its UDP sessions, stops its
    /// query and admin servers, finishes its TCP connections and exits.
    pub fn finish(mut self, controller: &Controller) -> Result<(), TakeOverError> {
        let sent = self.channel.send(&Taken, &[]);
        let result = match sent {
            Ok(()) => HandOffResult::TookOver,
            Err(_) => HandOffResult::Failed,
        };
        controller.handoff.count(result);
        log::info!(
            "hand-off: took over {} UDP sessions in {:?} ({})",
            self.sessions,
            self.started.elapsed(),
            result.as_str()
        );
        sent.map_err(|source| TakeOverError::Stream {
            path: "the hand-off socket".into(),
            source,
        })
    }
}

/// The `Hello` this build sends: its format, its config file as loaded and its worker count.
pub fn hello(config: String, workers: usize) -> Hello {
    debug_assert!(accepts_version(super::wire::VERSION));
    Hello {
        version: super::wire::VERSION,
        release: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        config,
        restart_keys: vec![("workers".into(), workers.to_string())],
    }
}

/// A handed-over listening socket, checked to be what the stream says it is.
fn listen_socket(
    fd: OwnedFd,
    transport: Transport,
    addr: SocketAddr,
) -> Result<ListenSocket, String> {
    let socket = socket2::Socket::from(fd);
    let (want, what) = match transport {
        Transport::Udp => (socket2::Type::DGRAM, "UDP"),
        Transport::Tcp => (socket2::Type::STREAM, "TCP"),
    };
    let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
    if socket.r#type().ok() != Some(want) || bound != Some(addr) {
        return Err(format!(
            "the socket handed over for {what} {addr} is not one (bound to {bound:?})"
        ));
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(match transport {
        Transport::Udp => ListenSocket::Udp(socket.into()),
        Transport::Tcp => ListenSocket::Tcp(socket.into()),
    })
}

/// A handed-over upstream socket, checked to be a UDP socket.
fn upstream_socket(fd: OwnedFd) -> Result<UdpSocket, String> {
    let socket = socket2::Socket::from(fd);
    if socket.r#type().ok() != Some(socket2::Type::DGRAM) {
        return Err("an upstream socket handed over is not a UDP socket".into());
    }
    Ok(socket.into())
}

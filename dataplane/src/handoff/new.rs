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
use crate::policy::grant::{BackendId, Grant, TokenId};
use crate::policy::route::RouteTable;

use super::share::{AdoptedListener, Adoption};
use super::stats::HandOffResult;
use super::stream::{Channel, MAX_FDS_PER_MESSAGE, StreamError};
use super::wire::{
    Answer, Decision, Hello, READS, Released, State, Taken, VERSION, WireListenerKind,
    WireTransport, accepts_version, decode_batch, limits,
};

/// How long one step of the exchange may take before the new process gives up (the old one
/// then serves on).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the new process could not take over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// The running proxy cannot hand over to this release, and says why.
    #[error("the running proxy refused the hand-off: {0}")]
    Refused(String),
    /// This process will not take over (it told the running proxy, which serves on).
    #[error("not taking over from the running proxy: {0}")]
    Declined(String),
    /// The predecessor did not let go (it gave up, or broke off): it serves on.
    #[error("the running proxy did not let go: {0}")]
    NotReleased(String),
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
    /// The predecessor's process id.
    pid: u32,
    /// Sockets installed: the data plane's and control's query and admin sockets.
    descriptors: usize,
}

/// Whether this process may take over from a predecessor running the config file text it is
/// given (the worker counts are compared before): the reason when not.
pub type Vetting<'a> = &'a dyn Fn(&str) -> Result<(), String>;

/// Connects to a running proxy on `path`, vets what it runs (`vet`) and takes its state;
/// `Ok(None)` when none runs there (no socket, or a stale one nobody listens on): then this
/// process starts fresh.
pub fn take_over(
    path: &Path,
    workers: usize,
    vet: Vetting<'_>,
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
    channel.send(&hello(), &[]).map_err(stream_err)?;
    let (answer, _): (Answer, _) = channel.recv().map_err(stream_err)?;
    let (config, theirs, pid, (version, format)) = match answer {
        Answer::Refuse { reason } => return Err(TakeOverError::Refused(reason)),
        Answer::Accept {
            version,
            release,
            config,
            workers,
            pid,
        } => {
            log::info!("hand-off: release {release} (pid {pid}) runs on {shown}");
            let Some(format) = limits(version).filter(|_| accepts_version(version)) else {
                let reason =
                    format!("it writes hand-off format {version}, this release reads {READS:?}");
                let _ = channel.send(
                    &Decision::Decline {
                        reason: reason.clone(),
                    },
                    &[],
                );
                return Err(TakeOverError::Declined(reason));
            };
            (config, workers, pid, (version, format))
        }
    };
    let theirs = usize::try_from(theirs).unwrap_or(usize::MAX);
    let verdict = if theirs == workers {
        vet(&config)
    } else {
        Err(format!(
            "it runs {theirs} workers and this process {workers}: each worker's sockets and \
             sessions go to the worker of the same index"
        ))
    };
    if let Err(reason) = verdict {
        let _ = channel.send(
            &Decision::Decline {
                reason: reason.clone(),
            },
            &[],
        );
        return Err(TakeOverError::Declined(reason));
    }
    // The predecessor's sockets arrive in the pause: room is made now for as many as its
    // state may carry (at most 1 MiB of table, once).
    super::fdtable::make_room(MAX_FDS_PER_MESSAGE);
    channel.send(&Decision::Proceed, &[]).map_err(stream_err)?;
    let proceeded = Instant::now();
    let (mut state, fds): (State, Vec<OwnedFd>) = channel.recv().map_err(stream_err)?;
    if state.session_batches > format.batches {
        return Err(TakeOverError::Invalid(format!(
            "{} session batches announced, at most {}",
            state.session_batches, format.batches
        )));
    }
    for _ in 0..state.session_batches {
        let (bytes, extra) = channel.recv_bytes().map_err(stream_err)?;
        let batch = decode_batch(version, &bytes)
            .map_err(|e| TakeOverError::Invalid(format!("a session batch: {e}")))?;
        let worker = usize::try_from(batch.worker).unwrap_or(usize::MAX);
        let Some(w) = state.workers.get_mut(worker).filter(|_| extra.is_empty()) else {
            return Err(TakeOverError::Invalid(format!(
                "a session batch for worker {} (of {}), with {} descriptors",
                batch.worker,
                state.workers.len(),
                extra.len()
            )));
        };
        w.sessions.extend(batch.sessions);
    }
    state
        .check(workers, fds.len())
        .map_err(|e| TakeOverError::Invalid(e.to_string()))?;
    let sessions = state.workers.iter().map(|w| w.sessions.len()).sum();
    log::info!(
        "hand-off: received {} listeners, {sessions} UDP sessions, {} grants and {} \
         descriptors from release {} in {:?}",
        state.listeners.len(),
        state.grants.len(),
        fds.len(),
        state.release,
        proceeded.elapsed()
    );
    Ok(Some(Inheritance {
        state,
        fds: fds.into_iter().map(Some).collect(),
        channel,
        started,
        sessions,
        pid,
        descriptors: 0,
    }))
}

impl Inheritance {
    /// The query port's listening socket, when the old process handed one over.
    pub fn take_query_listener(&mut self) -> Option<TcpListener> {
        let fd = self.state.query_fd?;
        self.control_listener(fd, "query")
    }

    /// The admin port's listening socket, when the old process handed one over.
    pub fn take_admin_listener(&mut self) -> Option<TcpListener> {
        let fd = self.state.admin_fd?;
        self.control_listener(fd, "admin")
    }

    /// A handed-over listening TCP socket of control's, checked; `None` (said why) when it is
    /// not one: control then binds its own.
    fn control_listener(&mut self, fd: u32, what: &str) -> Option<TcpListener> {
        let checked = self.take_fd(fd).and_then(|fd| {
            let socket = socket2::Socket::from(fd);
            let listening = socket.r#type().ok() == Some(socket2::Type::STREAM)
                && socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some();
            if listening {
                Ok(TcpListener::from(socket))
            } else {
                Err("not a TCP socket".into())
            }
        });
        let listener = checked
            .map_err(|e| log::warn!("hand-off: the {what} port's socket: {e}; binding anew"))
            .ok()?;
        // Counted like the data plane's sockets: the old process counts it as handed over.
        self.descriptors += 1;
        Some(listener)
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
    /// ledger. The workers read none of it before [`Self::commit`].
    pub(crate) fn install(&mut self, controller: &Controller) -> Result<usize, String> {
        let now = Instant::now();
        let workers = controller.workers();
        let mut shares: Vec<Adoption> = (0..workers).map(|_| Adoption::default()).collect();
        let listeners = std::mem::take(&mut self.state.listeners);
        // Listeners that were closing there go on closing here: no new session on them.
        let mut closing = Vec::new();
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
            let generation = controller
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
            if l.closing {
                closing.push(crate::listener::OpenedListener {
                    id: ListenerId(l.id),
                    addr: l.addr,
                    generation,
                });
            }
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
        // Grants and the default go into every worker before it reads, not through the
        // bounded grant channel: none can be dropped, none arrives after its first use.
        let grants: Vec<Arc<Grant>> = std::mem::take(&mut self.state.grants)
            .into_iter()
            .map(|g| {
                let expires = now + Duration::from_millis(g.expires_in_ms.min(MAX_KEEP_MS));
                Arc::new(Grant::handed_over(
                    TokenId(g.token),
                    super::backend(g.backend),
                    expires,
                    g.client,
                    g.redeemed,
                ))
            })
            .collect();
        let default = self
            .state
            .default
            .take()
            .map(|b| Arc::new(super::backend(b)));
        for share in &mut shares {
            share.grants.clone_from(&grants);
            share.default.clone_from(&default);
        }
        for e in std::mem::take(&mut self.state.ledger) {
            let keep = now + Duration::from_millis(e.keep_ms.min(MAX_KEEP_MS));
            controller.ledger.adopt(TokenId(e.token), keep, e.ports);
        }
        let adopting = Instant::now();
        let sessions = controller.adopt(shares, STEP_TIMEOUT)?;
        log::info!(
            "hand-off: the workers installed their sessions in {:?}",
            adopting.elapsed()
        );
        for listener in &closing {
            controller.close_listener(listener, crate::listener::CloseMode::Drain);
        }
        self.descriptors += descriptors;
        Ok(sessions)
    }

    /// Commits: tells the old process everything is installed, waits until it has let go
    /// (it forgets its UDP sessions, stops issuing tokens and serving queries, and finishes
    /// its TCP connections), and only then lets the workers read. If the old process gives
    /// up instead, nothing was read here and this process exits with the reason; if it is
    /// gone, this process reads anyway.
    pub fn commit(mut self, controller: &Controller) -> Result<Duration, TakeOverError> {
        let released = self
            .channel
            .send(&Taken, &[])
            .and_then(|()| self.channel.recv::<Released>());
        let gap = match released {
            Ok((r, _)) => Duration::from_micros(r.gap_us),
            Err(e) if !alive(self.pid) => {
                log::warn!(
                    "hand-off: the running proxy (pid {}) is gone ({e}): serving on",
                    self.pid
                );
                self.started.elapsed()
            }
            Err(e) => {
                controller.handoff.count(HandOffResult::Failed);
                return Err(TakeOverError::NotReleased(e.to_string()));
            }
        };
        controller.hand_off_go();
        controller.handoff.count(HandOffResult::TookOver);
        controller
            .handoff
            .record(self.sessions, self.descriptors, gap);
        log::info!(
            "hand-off: took over {} UDP sessions and {} sockets; the predecessor stopped \
             reading {gap:?} before this process started",
            self.sessions,
            self.descriptors
        );
        Ok(gap)
    }
}

/// The longest a handed-over grant or ledger entry is kept (a day): tokens live seconds.
const MAX_KEEP_MS: u64 = 86_400_000;

/// Whether process `pid` still exists.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The `Hello` this build sends: the format it writes and those it reads.
pub fn hello() -> Hello {
    Hello {
        version: VERSION,
        reads: READS.to_vec(),
        release: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
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

//! The running process's side (SPEC §12): it listens on the hand-off socket; a successor
//! that connects says which formats it reads; this process offers its config; if the
//! successor proceeds, the workers stop reading and describe their share, the state and
//! descriptors go over, and on the successor's `Taken` the workers let go of what they handed
//! over, the successor is told it may read, and control is told. A refusal or any failure
//! before `Taken` leaves this process serving as before.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ctl::Controller;
use crate::listener::{ListenerKind, Transport};

use super::share::{HandOffEnd, WorkerShare};
use super::stats::HandOffResult;
use super::stream::Channel;
use super::wire::{
    Answer, Decision, Hello, READS, Released, SessionBatch, State, Taken, WireLedgerEntry,
    WireListener, WireListenerKind, WirePoolSocket, WireTransport, WireWorker, common_version,
    encode_batch, limits,
};

/// How long each step of the exchange may take; the successor installs within the last one.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the workers have to stop reading and describe their share.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a completed hand-off moved, for control and the logs.
#[derive(Clone, Copy, Debug)]
pub struct HandedOver {
    pub sessions: usize,
    pub descriptors: usize,
    /// From the workers' last read to the successor's first.
    pub gap: Duration,
}

/// The listening sockets of control's own servers (duplicated, so they stay valid however
/// long the server waits), handed over beside the data plane's.
#[derive(Debug, Default)]
pub struct ControlSockets {
    pub query: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
}

/// What control does at the turns of a hand-off.
pub struct Hooks {
    /// Before the workers stop reading: stop issuing tokens (a token issued after the
    /// grants are described would be unknown to the successor).
    pub freezing: Box<dyn Fn() + Send>,
    /// The hand-off failed after `freezing`: issue tokens again.
    pub failed: Box<dyn Fn() + Send>,
    /// The successor serves everything handed over.
    pub taken: Box<dyn FnOnce(HandedOver) + Send>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

/// Starts listening on `path` (a socket file left there by an earlier process is replaced;
/// only this user may connect) and serves successors on a thread of its own until one takes
/// over; then `hooks.taken` runs and the thread ends. `config` is the text of this process's
/// config file, which the successor vets.
pub fn serve(
    path: PathBuf,
    controller: Controller,
    config: String,
    sockets: ControlSockets,
    hooks: Hooks,
) -> io::Result<JoinHandle<()>> {
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    log::info!("hand-off: waiting for a successor on {}", path.display());
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            let Hooks {
                freezing,
                failed,
                taken,
            } = hooks;
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        log::warn!("hand-off: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let mut froze = false;
                let result = serve_one(stream, &controller, &config, &sockets, &mut || {
                    froze = true;
                    freezing();
                });
                match result {
                    Ok(Some(done)) => {
                        controller.handoff.count(HandOffResult::HandedOver);
                        controller
                            .handoff
                            .record(done.sessions, done.descriptors, done.gap);
                        log::info!(
                            "hand-off: handed over {} UDP sessions and {} sockets; the gap \
                             was {:?}; finishing TCP connections",
                            done.sessions,
                            done.descriptors,
                            done.gap
                        );
                        taken(done);
                        return;
                    }
                    Ok(None) => controller.handoff.count(HandOffResult::Refused),
                    Err(e) => {
                        controller.handoff.count(HandOffResult::Failed);
                        log::warn!("hand-off failed, serving on: {e}");
                    }
                }
                if froze {
                    failed();
                }
            }
        })
}

/// One successor: `Ok(None)` when it declined or reads no format this process writes.
fn serve_one(
    stream: UnixStream,
    controller: &Controller,
    config: &str,
    sockets: &ControlSockets,
    freezing: &mut dyn FnMut(),
) -> Result<Option<HandedOver>, String> {
    let mut channel = Channel::new(stream, STEP_TIMEOUT).map_err(|e| e.to_string())?;
    let (hello, _): (Hello, _) = channel.recv().map_err(|e| format!("its hello: {e}"))?;
    let agreed = common_version(&hello.reads).and_then(|v| Some((v, limits(v)?)));
    let Some((version, format)) = agreed else {
        let reason = format!(
            "it reads hand-off formats {:?} and this release writes {READS:?}",
            hello.reads
        );
        log::warn!(
            "hand-off: cannot hand over to release {} (pid {}): {reason}",
            hello.release,
            hello.pid
        );
        let _ = channel.send(&Answer::Refuse { reason }, &[]);
        return Ok(None);
    };
    let accept = Answer::Accept {
        version,
        release: env!("CARGO_PKG_VERSION").to_string(),
        config: config.to_string(),
        workers: u32::try_from(controller.workers()).unwrap_or(u32::MAX),
        pid: std::process::id(),
    };
    channel.send(&accept, &[]).map_err(|e| e.to_string())?;
    let (decision, _): (Decision, _) = channel
        .recv()
        .map_err(|e| format!("waiting for the successor's decision: {e}"))?;
    if let Decision::Decline { reason } = decision {
        log::warn!(
            "hand-off: release {} (pid {}) declined to take over: {reason}",
            hello.release,
            hello.pid
        );
        return Ok(None);
    }
    // Each socket the data plane holds is duplicated in the pause (and control's query and
    // admin sockets): room for the copies is made now.
    super::fdtable::make_room(controller.budget.held() + 2);
    freezing();
    let frozen_at = Instant::now();
    let shares = controller.hand_off_freeze(FREEZE_TIMEOUT)?;
    let described_at = Instant::now();
    let mut sent_at = described_at;
    let sent = (|| {
        let (mut state, fds) = describe(shares, sockets, controller)?;
        let batches = batches(&mut state, format.sessions_per_batch);
        let sessions = batches.iter().map(|b| b.sessions.len()).sum();
        state.session_batches = u32::try_from(batches.len()).unwrap_or(u32::MAX);
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        channel
            .send(&state, &borrowed)
            .map_err(|e| format!("sending the state: {e}"))?;
        for batch in &batches {
            let bytes = encode_batch(version, batch).map_err(|e| e.to_string())?;
            channel
                .send_bytes(&bytes, &[])
                .map_err(|e| format!("sending sessions: {e}"))?;
        }
        sent_at = Instant::now();
        let _: (Taken, _) = channel
            .recv()
            .map_err(|e| format!("waiting for the successor to take over: {e}"))?;
        Ok::<_, String>((sessions, fds.len()))
    })();
    let (sessions, descriptors) = match sent {
        Ok(done) => done,
        Err(e) => {
            controller.hand_off_end(HandOffEnd::Failed);
            return Err(e);
        }
    };
    // Committed: from here on the successor serves whatever happens to this process.
    controller.hand_off_end(HandOffEnd::Taken);
    let gap = frozen_at.elapsed();
    if let Err(e) = channel.send(
        &Released {
            gap_us: u64::try_from(gap.as_micros()).unwrap_or(u64::MAX),
        },
        &[],
    ) {
        // The successor reads anyway once it finds this process no longer reading.
        log::warn!("hand-off: telling the successor it may read: {e}");
    }
    // Logged once the successor may read: a log line in the pause would lengthen it.
    log::info!(
        "hand-off: workers described their share in {:?}, the state went out in {:?}, the \
         successor installed it and said so in {:?}",
        described_at - frozen_at,
        sent_at - described_at,
        gap - (sent_at - frozen_at)
    );
    Ok(Some(HandedOver {
        sessions,
        descriptors,
        gap,
    }))
}

/// The workers' sessions taken out of `state`, in batches of at most `per_batch`.
fn batches(state: &mut State, per_batch: usize) -> Vec<SessionBatch> {
    let mut all = Vec::new();
    for (worker, w) in state.workers.iter_mut().enumerate() {
        let mut sessions = std::mem::take(&mut w.sessions).into_iter().peekable();
        while sessions.peek().is_some() {
            all.push(SessionBatch {
                worker: worker as u32,
                sessions: sessions.by_ref().take(per_batch).collect(),
            });
        }
    }
    all
}

/// The state to send and its descriptors (a field `fd` is an index into them).
fn describe(
    shares: Vec<WorkerShare>,
    sockets: &ControlSockets,
    controller: &Controller,
) -> Result<(State, Vec<OwnedFd>), String> {
    let workers = shares.len();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let push = |fd: OwnedFd, fds: &mut Vec<OwnedFd>| {
        fds.push(fd);
        (fds.len() - 1) as u32
    };
    let mut listeners: BTreeMap<u16, WireListener> = BTreeMap::new();
    let mut state = State {
        release: env!("CARGO_PKG_VERSION").to_string(),
        ..State::default()
    };
    for (worker, share) in shares.into_iter().enumerate() {
        for l in share.listeners {
            let index = push(l.fd, &mut fds);
            let entry = listeners.entry(l.id.0).or_insert_with(|| WireListener {
                id: l.id.0,
                owner: String::new(),
                transport: match l.transport {
                    Transport::Udp => WireTransport::Udp,
                    Transport::Tcp => WireTransport::Tcp,
                },
                addr: l.local,
                kind: match &l.kind {
                    ListenerKind::TokenPort => WireListenerKind::TokenPort,
                    ListenerKind::Forward {
                        target,
                        backend,
                        proxy,
                    } => WireListenerKind::Forward {
                        target: *target,
                        backend: backend.0,
                        proxy: super::wire_proxy_mode(*proxy),
                    },
                    ListenerKind::Route { .. } => WireListenerKind::Route,
                },
                idle_timeout_ms: u64::try_from(l.idle_timeout.as_millis()).unwrap_or(u64::MAX),
                fds: Vec::new(),
                closing: l.closing,
            });
            if entry.fds.len() != worker {
                return Err(format!("listener {} is not open on every worker", l.id.0));
            }
            entry.fds.push(index);
        }
        let pools = share
            .pools
            .into_iter()
            .map(|(number, port, fd)| WirePoolSocket {
                number,
                port,
                fd: push(fd, &mut fds),
            })
            .collect();
        state.workers.push(WireWorker {
            pools,
            sessions: share.sessions,
        });
        state.grants.extend(share.grants);
        if share.default.is_some() {
            state.default = share.default;
        }
    }
    if let Some(l) = listeners.values().find(|l| l.fds.len() != workers) {
        return Err(format!("listener {} is not open on every worker", l.id));
    }
    state.listeners = listeners.into_values().collect();
    let dup = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| format!("duplicating a control socket: {e}"))
    };
    if let Some(fd) = &sockets.query {
        state.query_fd = Some(push(dup(fd)?, &mut fds));
    }
    if let Some(fd) = &sockets.admin {
        state.admin_fd = Some(push(dup(fd)?, &mut fds));
    }
    // Sealed tokens spent here stay spent there.
    let now = Instant::now();
    state.ledger = controller
        .ledger
        .entries(now)
        .into_iter()
        .map(|(token, keep, ports)| WireLedgerEntry {
            token: token.0,
            keep_ms: u64::try_from(keep.saturating_duration_since(now).as_millis())
                .unwrap_or(u64::MAX),
            ports,
        })
        .collect();
    Ok((state, fds))
}

//! The running process's side (SPEC §12): it listens on the hand-off socket; a successor
//! that connects says who it is; if its config keeps every restart key, the workers stop
//! reading and describe their share, the state and descriptors go over, and on the
//! successor's `Taken` the workers forget their UDP sessions and control is told. A refusal or
//! any failure before `Taken` leaves this process serving as before.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
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
    Answer, Hello, State, Taken, WireListener, WireListenerKind, WirePoolSocket, WireTransport,
    WireWorker, accepts_version,
};

/// How long each step of the exchange may take; the successor installs within the last one.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the workers have to stop reading and describe their share.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides whether a successor may take over: `Err` says why not.
pub type Vetting = Box<dyn Fn(&Hello) -> Result<(), String> + Send>;

/// What a completed hand-off moved, for control and the logs.
#[derive(Clone, Copy, Debug)]
pub struct HandedOver {
    pub sessions: usize,
    pub descriptors: usize,
    /// From the workers' last read to the successor's `Taken`.
    pub gap: Duration,
}

/// The listening sockets of control's own servers, handed over beside the data plane's.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlSockets {
    pub query: Option<RawFd>,
    pub admin: Option<RawFd>,
}

/// Starts listening on `path` (a socket file left there by an earlier process is replaced;
/// only this user may connect) and serves successors on a thread of its own until one takes
/// over; then `on_taken` runs and the thread ends.
pub fn serve(
    path: PathBuf,
    controller: Controller,
    vetting: Vetting,
    sockets: ControlSockets,
    on_taken: Box<dyn FnOnce(HandedOver) + Send>,
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
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        log::warn!("hand-off: accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match serve_one(stream, &controller, &vetting, sockets) {
                    Ok(Some(done)) => {
                        controller.handoff.count(HandOffResult::HandedOver);
                        controller
                            .handoff
                            .record(done.sessions, done.descriptors, done.gap);
                        log::info!(
                            "hand-off: handed over {} UDP sessions and {} sockets; the gap \
                             was {:?}; finishing TCP connections, then exiting",
                            done.sessions,
                            done.descriptors,
                            done.gap
                        );
                        on_taken(done);
                        return;
                    }
                    Ok(None) => controller.handoff.count(HandOffResult::Refused),
                    Err(e) => {
                        controller.handoff.count(HandOffResult::Failed);
                        log::warn!("hand-off failed, serving on: {e}");
                    }
                }
            }
        })
}

/// One successor: `Ok(None)` when refused.
fn serve_one(
    stream: UnixStream,
    controller: &Controller,
    vetting: &Vetting,
    sockets: ControlSockets,
) -> Result<Option<HandedOver>, String> {
    let mut channel = Channel::new(stream, STEP_TIMEOUT).map_err(|e| e.to_string())?;
    let (hello, _): (Hello, _) = channel.recv().map_err(|e| format!("its hello: {e}"))?;
    let verdict = if accepts_version(hello.version) {
        vetting(&hello)
    } else {
        Err(format!(
            "it speaks hand-off format {} and this release writes {}",
            hello.version,
            super::wire::VERSION
        ))
    };
    if let Err(reason) = verdict {
        log::warn!(
            "hand-off: refused release {} (pid {}): {reason}",
            hello.release,
            hello.pid
        );
        let _ = channel.send(&Answer::Refuse { reason }, &[]);
        return Ok(None);
    }
    channel
        .send(&Answer::Accept, &[])
        .map_err(|e| e.to_string())?;
    let frozen_at = Instant::now();
    let shares = controller.hand_off_freeze(FREEZE_TIMEOUT)?;
    let sent = (|| {
        let (state, fds) = describe(shares, sockets)?;
        let sessions = state.workers.iter().map(|w| w.sessions.len()).sum();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        channel
            .send(&state, &borrowed)
            .map_err(|e| format!("sending the state: {e}"))?;
        let _: (Taken, _) = channel
            .recv()
            .map_err(|e| format!("waiting for the successor to take over: {e}"))?;
        Ok::<_, String>((sessions, fds.len()))
    })();
    match sent {
        Ok((sessions, descriptors)) => {
            controller.hand_off_end(HandOffEnd::Taken);
            Ok(Some(HandedOver {
                sessions,
                descriptors,
                gap: frozen_at.elapsed(),
            }))
        }
        Err(e) => {
            controller.hand_off_end(HandOffEnd::Failed);
            Err(e)
        }
    }
}

/// The state to send and its descriptors (a field `fd` is an index into them).
fn describe(
    shares: Vec<WorkerShare>,
    sockets: ControlSockets,
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
    }
    if let Some(l) = listeners.values().find(|l| l.fds.len() != workers) {
        return Err(format!("listener {} is not open on every worker", l.id));
    }
    state.listeners = listeners.into_values().collect();
    let dup = |fd: RawFd| {
        // SAFETY: control's listening sockets outlive the hand-off (they are closed only
        // when control stops, after it); the borrow is only for the duplicate.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        borrowed
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating a control socket: {e}"))
    };
    if let Some(fd) = sockets.query {
        state.query_fd = Some(push(dup(fd)?, &mut fds));
    }
    if let Some(fd) = sockets.admin {
        state.admin_fd = Some(push(dup(fd)?, &mut fds));
    }
    Ok((state, fds))
}

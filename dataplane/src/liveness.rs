//! Heartbeats of the long-lived threads (every `dp-worker-N` and `control`), and the sans-io
//! decision of which of them have stopped: exited, panicked, or silent for longer than the
//! watchdog. `/healthz` and `udp_director_thread_up` read it, so a dead or stuck thread turns
//! the pod unhealthy instead of hiding behind a process that still answers probes.
//!
//! A beat is one relaxed store of a millisecond clock into the thread's own cache-padded slot:
//! nothing on the worker's path takes a lock or allocates. The table's lock is taken only to
//! register a thread (at start) and to read the table (a probe or a scrape).
//!
//! Debug builds also carry a fault injection hook (`UDP_DIRECTOR_FAULT`), compiled out of
//! release builds, so the end-to-end tests can stall or panic a worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

/// Longest a thread waits between two beats when it has nothing to do: a worker's poll timeout
/// is capped to it, so an idle worker is never taken for a stuck one. Half the shortest
/// watchdog (one second), so a late wake-up is not read as silence.
pub const BEAT_INTERVAL: Duration = Duration::from_millis(500);

/// Environment variable naming a fault to inject (debug builds only): `worker-stall:N` or
/// `worker-panic:N` makes worker `N` stop beating, or panic, one second after it starts.
pub const FAULT_ENV: &str = "UDP_DIRECTOR_FAULT";

const RUNNING: u8 = 0;
const EXITED: u8 = 1;
const PANICKED: u8 = 2;

/// One thread's slot: written by the thread, read by probes.
#[derive(Debug)]
struct Slot {
    /// Last beat, in milliseconds since the table's epoch.
    last_beat_ms: AtomicU64,
    /// [`RUNNING`], [`EXITED`] or [`PANICKED`].
    state: AtomicU8,
}

/// The heartbeat table of every registered thread.
#[derive(Debug)]
pub struct Liveness {
    /// Zero of the beat clock; monotonic, so a wall-clock step cannot fake a silence.
    epoch: Instant,
    threads: Mutex<Vec<(String, Arc<CachePadded<Slot>>)>>,
    /// The fault `UDP_DIRECTOR_FAULT` asked for, read once.
    #[cfg(debug_assertions)]
    fault: Option<Fault>,
}

impl Liveness {
    /// An empty table. Debug builds read [`FAULT_ENV`] here, once.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            threads: Mutex::new(Vec::new()),
            #[cfg(debug_assertions)]
            fault: Fault::from_env(),
        })
    }

    /// Adds thread `name`, counted as having beaten now, and returns its heartbeat. The thread
    /// keeps the heartbeat for its whole life: dropping it (a return, or an unwinding panic)
    /// marks the thread exited or panicked.
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let name = name.into();
        let slot = Arc::new(CachePadded::new(Slot {
            last_beat_ms: AtomicU64::new(millis_since(self.epoch, Instant::now())),
            state: AtomicU8::new(RUNNING),
        }));
        #[cfg(debug_assertions)]
        let fault = self
            .fault
            .as_ref()
            .filter(|f| f.thread == name)
            .map(|f| (f.kind, Instant::now() + FAULT_DELAY));
        self.threads.lock().push((name, Arc::clone(&slot)));
        Heartbeat {
            epoch: self.epoch,
            slot,
            #[cfg(debug_assertions)]
            fault,
        }
    }

    /// Every registered thread in registration order, with why it counts as stopped at `now`
    /// (`None`: alive) under a watchdog of `watchdog`.
    pub fn check(&self, now: Instant, watchdog: Duration) -> Vec<ThreadHealth> {
        let now_ms = millis_since(self.epoch, now);
        self.threads
            .lock()
            .iter()
            .map(|(name, slot)| ThreadHealth {
                name: name.clone(),
                down: judge(
                    slot.state.load(Ordering::Relaxed),
                    slot.last_beat_ms.load(Ordering::Relaxed),
                    now_ms,
                    watchdog,
                ),
            })
            .collect()
    }
}

/// What one thread holds to beat; see [`Liveness::register`].
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    slot: Arc<CachePadded<Slot>>,
    /// The injected fault and when it strikes.
    #[cfg(debug_assertions)]
    fault: Option<(FaultKind, Instant)>,
}

impl Heartbeat {
    /// Records that the thread is alive at `now` (which the caller has read anyway).
    #[inline]
    pub fn beat(&self, now: Instant) {
        #[cfg(debug_assertions)]
        self.inject_fault(now);
        self.slot
            .last_beat_ms
            .store(millis_since(self.epoch, now), Ordering::Relaxed);
    }

    /// Stalls or panics the thread once its fault is due.
    #[cfg(debug_assertions)]
    fn inject_fault(&self, now: Instant) {
        match self.fault {
            Some((FaultKind::Stall, at)) if now >= at => {
                log::warn!("{FAULT_ENV}: this thread stalls (fault injection)");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Some((FaultKind::Panic, at)) if now >= at => {
                panic!("{FAULT_ENV}: this thread panics (fault injection)");
            }
            _ => {}
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let state = if std::thread::panicking() {
            PANICKED
        } else {
            EXITED
        };
        self.slot.state.store(state, Ordering::Relaxed);
    }
}

/// One thread as [`Liveness::check`] sees it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ThreadHealth {
    /// The thread's name (`dp-worker-0`, `control`).
    pub name: String,
    /// Why it counts as stopped; `None` while it is alive.
    pub down: Option<Down>,
}

/// Why a thread counts as stopped.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Down {
    /// It returned.
    Exited,
    /// It panicked (seen only where panics unwind).
    Panicked,
    /// It has not beaten for this long, longer than the watchdog.
    Silent(Duration),
}

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited => f.write_str("exited"),
            Self::Panicked => f.write_str("panicked"),
            Self::Silent(d) => write!(f, "no heartbeat for {:.1} s", d.as_secs_f64()),
        }
    }
}

/// The decision for one thread: its `state`, its last beat and `now` (milliseconds on the same
/// clock), under `watchdog`. A beat exactly `watchdog` old still counts as alive.
fn judge(state: u8, last_beat_ms: u64, now_ms: u64, watchdog: Duration) -> Option<Down> {
    match state {
        EXITED => return Some(Down::Exited),
        PANICKED => return Some(Down::Panicked),
        _ => {}
    }
    // A beat stored after `now` was read is fresh, not silent.
    let silent = Duration::from_millis(now_ms.saturating_sub(last_beat_ms));
    (silent > watchdog).then_some(Down::Silent(silent))
}

fn millis_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

/// How long after its start a thread's injected fault strikes: time enough to be seen healthy.
#[cfg(debug_assertions)]
const FAULT_DELAY: Duration = Duration::from_secs(1);

/// A fault injected into one thread (debug builds only).
#[cfg(debug_assertions)]
#[derive(Debug, Eq, PartialEq)]
struct Fault {
    /// The thread's name.
    thread: String,
    kind: FaultKind,
}

#[cfg(debug_assertions)]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum FaultKind {
    /// Stop beating (sleep in the loop).
    Stall,
    /// Panic.
    Panic,
}

#[cfg(debug_assertions)]
impl Fault {
    fn from_env() -> Option<Self> {
        let value = std::env::var(FAULT_ENV).ok()?;
        let fault = Self::parse(&value);
        match &fault {
            Some(f) => log::warn!("{FAULT_ENV}: {:?} will strike {}", f.kind, f.thread),
            None => log::warn!("{FAULT_ENV}={value:?} not understood, ignored"),
        }
        fault
    }

    /// `worker-stall:N` or `worker-panic:N`.
    fn parse(value: &str) -> Option<Self> {
        let (what, worker) = value.split_once(':')?;
        let kind = match what {
            "worker-stall" => FaultKind::Stall,
            "worker-panic" => FaultKind::Panic,
            _ => return None,
        };
        let id: usize = worker.parse().ok()?;
        Some(Self {
            thread: format!("dp-worker-{id}"),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WATCHDOG: Duration = Duration::from_secs(10);

    #[test]
    fn a_recent_beat_is_alive() {
        assert_eq!(judge(RUNNING, 5_000, 5_000, WATCHDOG), None);
        assert_eq!(
            judge(RUNNING, 5_000, 15_000, WATCHDOG),
            None,
            "exactly the watchdog"
        );
    }

    #[test]
    fn silence_past_the_watchdog_is_down() {
        assert_eq!(
            judge(RUNNING, 5_000, 15_001, WATCHDOG),
            Some(Down::Silent(Duration::from_millis(10_001)))
        );
        assert_eq!(
            judge(RUNNING, 0, 2_000, Duration::from_secs(1)),
            Some(Down::Silent(Duration::from_secs(2)))
        );
    }

    #[test]
    fn a_beat_newer_than_now_is_fresh() {
        assert_eq!(judge(RUNNING, 7_000, 6_000, WATCHDOG), None);
    }

    #[test]
    fn exited_and_panicked_are_down_whatever_the_beat() {
        assert_eq!(judge(EXITED, 5_000, 5_000, WATCHDOG), Some(Down::Exited));
        assert_eq!(
            judge(PANICKED, 5_000, 5_000, WATCHDOG),
            Some(Down::Panicked)
        );
    }

    #[test]
    fn the_table_names_each_thread() {
        let liveness = Liveness::new();
        let start = Instant::now();
        let worker = liveness.register("dp-worker-0");
        let control = liveness.register("control");
        let later = start + Duration::from_secs(5);
        worker.beat(later);
        let health = liveness.check(later + Duration::from_millis(500), Duration::from_secs(1));
        assert_eq!(health[0].name, "dp-worker-0");
        assert_eq!(health[0].down, None);
        assert_eq!(health[1].name, "control");
        assert!(
            matches!(health[1].down, Some(Down::Silent(d)) if d >= Duration::from_secs(5)),
            "{health:?}"
        );
        drop(control);
        let health = liveness.check(later, WATCHDOG);
        assert_eq!(health[1].down, Some(Down::Exited));
    }

    #[test]
    fn an_unwinding_thread_is_panicked() {
        let liveness = Liveness::new();
        let heart = liveness.register("dp-worker-0");
        let joined = std::thread::spawn(move || {
            let _heart = heart;
            panic!("test panic");
        })
        .join();
        assert!(joined.is_err());
        let health = liveness.check(Instant::now(), WATCHDOG);
        assert_eq!(health[0].down, Some(Down::Panicked));
    }

    #[test]
    fn down_says_why() {
        assert_eq!(Down::Exited.to_string(), "exited");
        assert_eq!(
            Down::Silent(Duration::from_millis(2_345)).to_string(),
            "no heartbeat for 2.3 s"
        );
    }

    #[cfg(debug_assertions)]
    #[test]
    fn fault_names_a_worker() {
        assert_eq!(
            Fault::parse("worker-stall:0"),
            Some(Fault {
                thread: "dp-worker-0".into(),
                kind: FaultKind::Stall
            })
        );
        assert_eq!(
            Fault::parse("worker-panic:3"),
            Some(Fault {
                thread: "dp-worker-3".into(),
                kind: FaultKind::Panic
            })
        );
        assert_eq!(Fault::parse("worker-stall"), None);
        assert_eq!(Fault::parse("worker-nap:0"), None);
        assert_eq!(Fault::parse("worker-panic:x"), None);
    }
}

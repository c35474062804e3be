//! Starting, steering and joining the set of workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use crossbeam_utils::CachePadded;

use crate::config::{DataPlaneConfig, WorkerAffinity};
use crate::ctl::{Controller, GRANT_CHANNEL_CAPACITY, SocketSettings, WorkerEvent, WorkerLink};
use crate::error::{StartError, WorkerError};
use crate::fastpath::FastPath;
use crate::io::fd_budget::{FdBudget, open_descriptors, raise_nofile_limit};
use crate::io::own_addrs::OwnPorts;
use crate::listener::{ListenerKind, ListenerSpec};
use crate::liveness::Liveness;
use crate::metrics::WorkerCounters;
use crate::policy::grant::NonceLedger;
use crate::policy::limits::SessionLimits;
use crate::worker::{Worker, WorkerSetup};

/// Data ports a config may declare (more listeners can be opened at run time).
const MAX_DATA_PORTS: usize = 64;

/// The data plane's descriptor budget: the process limit (raised to the hard limit first) less
/// what is open now (the control thread's so far) and what control may still need. Said at
/// start, with what it means for sessions.
fn descriptor_budget(config: &DataPlaneConfig) -> Arc<FdBudget> {
    let limit = raise_nofile_limit();
    let open = open_descriptors().unwrap_or(0);
    let workers = config.workers.get();
    // What is open now, each worker's poll and waker (made after this count), and what control
    // may still need; at most half the limit, so a low limit still leaves the data plane room.
    let wanted = open
        .saturating_add(2 * workers)
        .saturating_add(config.control_fd_reserve);
    let reserve = wanted.min(limit / 2);
    if reserve < wanted {
        log::warn!(
            "descriptors: the open-file limit ({limit}) is low: the control thread keeps \
             {reserve} of the {wanted} its caps (maxQueryConnections and the admin server's) \
             could use; raise the limit"
        );
    }
    let budget = FdBudget::for_process(reserve);
    let allowed = budget.allowed();
    // A UDP session takes a descriptor only when its backend already has a session on every
    // shared upstream socket of its worker (so 100,000 sessions over 1,000 backends need about
    // 100 per worker); a TCP connection takes two.
    let tight = allowed < config.max_sessions.min(1 << 20);
    let how = if tight {
        log::Level::Warn
    } else {
        log::Level::Info
    };
    log::log!(
        how,
        "descriptors: limit {limit}, {} kept for the control thread, {allowed} for the data \
         plane: at most {allowed} UDP sessions to one backend address, {} TCP connections, \
         {} listeners (an eighth stays for sessions); maxSessions {}{}",
        budget.reserve(),
        allowed / 2,
        (allowed - allowed / 8) / workers,
        config.max_sessions,
        if tight {
            " is above that: past the budget new sessions that need a socket are refused \
             (upstream_setup)"
        } else {
            ""
        }
    );
    budget
}

/// The kernel fast path, when the config asks for it and the kernel lets it load; when it
/// does not, says why once and the data plane runs in user space.
fn start_fast_path(config: &DataPlaneConfig) -> Option<Arc<FastPath>> {
    let wanted = config.fast_path.as_ref()?;
    match FastPath::start(wanted, &config.control_magic) {
        Ok(fast) => {
            log::info!(
                "fast path: tc program attached to {}; established UDP sessions are forwarded \
                 in the kernel",
                fast.interfaces().join(", ")
            );
            Some(Arc::new(fast))
        }
        Err(e) => {
            log::warn!("fast path off: {e}; every datagram goes through user space");
            None
        }
    }
}

/// Worker `id`'s handle on the fast path's map; without one (it says why) that worker
/// offloads nothing.
fn worker_map(fast: Option<&FastPath>, id: usize) -> Option<crate::fastpath::WorkerMap> {
    match fast?.worker_map() {
        Ok(map) => Some(map),
        Err(e) => {
            log::warn!("fast path: worker {id} offloads nothing: {e}");
            None
        }
    }
}

/// The running data plane: worker threads plus the handles control needs.
#[derive(Debug)]
pub struct DataPlane {
    controller: Controller,
    events: Receiver<WorkerEvent>,
    threads: Vec<JoinHandle<Result<(), WorkerError>>>,
    local_addrs: Vec<SocketAddr>,
    liveness: Arc<Liveness>,
}

impl DataPlane {
    /// Starts the worker threads, then opens every data port as a token-port listener through
    /// [`Controller::open_listener`], the path every later listener takes too. The data ports
    /// get listener ids 0, 1, … in config order, which is the data-port index grants use. A
    /// bind error is reported here and nothing is left running.
    pub fn start(config: DataPlaneConfig) -> Result<Self, StartError> {
        Self::start_inheriting(config, None).map(|(plane, _)| plane)
    }

    /// [`Self::start`], taking over what a running proxy hands over (SPEC §12) once the
    /// workers run and the fast path is loaded (so the predecessor's pause is short): `take`
    /// connects and receives it. Its listeners keep their ids (the data ports claim theirs),
    /// its UDP sessions continue on its upstream sockets, its grants and ledger stay valid.
    /// The workers read none of it before [`crate::handoff::new::Inheritance::commit`].
    pub fn start_inheriting(
        config: DataPlaneConfig,
        take: Option<
            &dyn Fn() -> Result<
                Option<crate::handoff::new::Inheritance>,
                crate::handoff::new::TakeOverError,
            >,
        >,
    ) -> Result<(Self, Option<crate::handoff::new::Inheritance>), StartError> {
        let port_count = config.data_ports.len();
        if port_count == 0 || port_count > MAX_DATA_PORTS {
            return Err(StartError::DataPortCount {
                got: port_count,
                max: MAX_DATA_PORTS,
            });
        }
        let workers = config.workers.get();
        let counters: Arc<[CachePadded<WorkerCounters>]> = (0..workers)
            .map(|_| CachePadded::new(WorkerCounters::default()))
            .collect();
        let limits = Arc::new(SessionLimits::new(
            config.max_sessions,
            config.max_sessions_per_ip,
        ));
        let budget = descriptor_budget(&config);
        let own_ports = Arc::new(OwnPorts::default());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let fast_path = start_fast_path(&config);
        let cores = core_affinity::get_core_ids().unwrap_or_default();

        let mut links = Vec::with_capacity(workers);
        let mut built = Vec::with_capacity(workers);
        let ledger = Arc::new(NonceLedger::default());
        let liveness = Liveness::new();
        for id in 0..workers {
            let (grants_tx, grants) = crossbeam_channel::bounded(GRANT_CHANNEL_CAPACITY);
            let (tx, rx) = crossbeam_channel::unbounded();
            let core = match &config.affinity {
                WorkerAffinity::None => None,
                WorkerAffinity::Auto => cores.get(id % cores.len().max(1)).copied(),
                WorkerAffinity::Cores(list) => Some(core_affinity::CoreId {
                    id: list[id % list.len()],
                }),
            };
            let (worker, waker) = Worker::new(WorkerSetup {
                id,
                config: &config,
                control: rx,
                grants,
                events: events_tx.clone(),
                counters: Arc::clone(&counters),
                limits: Arc::clone(&limits),
                ledger: Arc::clone(&ledger),
                budget: Arc::clone(&budget),
                own_ports: Arc::clone(&own_ports),
                fast_path: worker_map(fast_path.as_deref(), id),
            })
            .map_err(|source| StartError::Poll { worker: id, source })?;
            links.push(WorkerLink {
                grants: grants_tx,
                tx,
                waker,
            });
            built.push((worker, core));
        }
        let controller = Controller {
            links: links.into(),
            counters,
            limits: Arc::clone(&limits),
            budget,
            host: Arc::default(),
            registry: Arc::default(),
            fast_path,
            ledger: Arc::clone(&ledger),
            handoff: Arc::default(),
            sockets: SocketSettings {
                recv_buffer_bytes: config.recv_buffer_bytes,
                send_buffer_bytes: config.send_buffer_bytes,
            },
        };
        let stop = |threads: Vec<JoinHandle<Result<(), WorkerError>>>| {
            controller.shutdown();
            for t in threads {
                let _ = t.join();
            }
        };

        let mut threads = Vec::with_capacity(workers);
        for (worker, core) in built {
            let id = worker.id();
            // Registered before the thread starts, so a worker that never gets going is
            // silent rather than missing.
            let heart = liveness.register(format!("dp-worker-{id}"));
            let spawned = std::thread::Builder::new()
                .name(format!("dp-worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core
                        && !core_affinity::set_for_current(core)
                    {
                        log::warn!("dp-worker-{id}: could not pin to core {}", core.id);
                    }
                    // `heart` is dropped when the loop returns or unwinds: the thread then
                    // shows as stopped.
                    worker.run(&heart)
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    stop(threads);
                    return Err(StartError::Spawn { worker: id, source });
                }
            }
        }

        let inheritance = match take.map(|take| take()).transpose() {
            Ok(taken) => taken.flatten(),
            Err(e) => {
                stop(threads);
                return Err(StartError::HandOff(e.to_string()));
            }
        };
        let mut inheritance = inheritance;
        if let Some(inheritance) = inheritance.as_mut() {
            match inheritance.install(&controller) {
                Ok(sessions) => log::info!("hand-off: {sessions} UDP sessions installed"),
                Err(reason) => {
                    stop(threads);
                    return Err(StartError::HandOff(reason));
                }
            }
        }
        let mut local_addrs = Vec::with_capacity(port_count);
        for port in &config.data_ports {
            let spec = ListenerSpec {
                owner: format!("data port {}", port.name),
                bind: port.bind,
                transport: port.transport,
                kind: ListenerKind::TokenPort,
                idle_timeout: config.session_timeout,
            };
            match controller.open_listener(spec) {
                // Grants name data ports by index, which is the listener id: a predecessor's
                // listener in a data port's place would get its clients.
                Ok(opened) if usize::from(opened.id.0) != local_addrs.len() => {
                    stop(threads);
                    return Err(StartError::HandOff(format!(
                        "data port {} is not where the running proxy had it (listener {})",
                        port.name, opened.id.0
                    )));
                }
                Ok(opened) => local_addrs.push(opened.addr),
                Err(source) => {
                    stop(threads);
                    return Err(StartError::Listen {
                        name: port.name.clone(),
                        source,
                    });
                }
            }
        }
        log::info!(
            "data plane: {workers} workers on {}",
            local_addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok((
            Self {
                controller,
                events,
                threads,
                local_addrs,
                liveness,
            },
            inheritance,
        ))
    }

    /// The handle control steers workers with.
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Session events from all workers.
    pub fn events(&self) -> Receiver<WorkerEvent> {
        self.events.clone()
    }

    /// The bound address of each data port (its real port when configured with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The heartbeat table of the workers; control registers its own thread in it too.
    pub fn liveness(&self) -> Arc<Liveness> {
        Arc::clone(&self.liveness)
    }

    /// Waits for every worker to end (after [`Controller::shutdown`]); the first error wins.
    pub fn join(self) -> Result<(), WorkerError> {
        let mut result = Ok(());
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
                Err(_) => log::error!("a data-plane worker panicked"),
            }
        }
        result
    }
}

//! Starting, steering and joining the set of workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use crossbeam_utils::CachePadded;

use crate::config::{DataPlaneConfig, WorkerAffinity};
use crate::ctl::{Controller, GRANT_CHANNEL_CAPACITY, WorkerEvent, WorkerLink};
use crate::error::{StartError, WorkerError};
use crate::limits::SessionLimits;
use crate::metrics::WorkerCounters;
use crate::socket::{bind_reuseport_udp, probe_exclusive_udp};
use crate::worker::{MAX_DATA_PORTS, Worker, WorkerSetup};

/// The running data plane: worker threads plus the handles control needs.
#[derive(Debug)]
pub struct DataPlane {
    controller: Controller,
    events: Receiver<WorkerEvent>,
    threads: Vec<JoinHandle<Result<(), WorkerError>>>,
    local_addrs: Vec<SocketAddr>,
}

impl DataPlane {
    /// Binds every data port on every worker and starts the worker threads. All sockets are bound
    /// before any thread starts, so a bind error is reported here and nothing is left running.
    pub fn start(config: DataPlaneConfig) -> Result<Self, StartError> {
        let port_count = config.data_ports.len();
        if port_count == 0 || port_count > MAX_DATA_PORTS {
            return Err(StartError::DataPortCount {
                got: port_count,
                max: MAX_DATA_PORTS,
            });
        }
        let workers = config.workers.get();
        for port in &config.data_ports {
            if port.bind.port() != 0 {
                probe_exclusive_udp(port.bind)?;
            }
        }
        // With port 0, the first worker's socket picks the port and the others join it.
        let mut local_addrs: Vec<SocketAddr> = Vec::with_capacity(port_count);
        let mut sockets_per_worker = Vec::with_capacity(workers);
        for _ in 0..workers {
            let mut sockets = Vec::with_capacity(port_count);
            for (i, port) in config.data_ports.iter().enumerate() {
                let addr = local_addrs.get(i).copied().unwrap_or(port.bind);
                let socket =
                    bind_reuseport_udp(addr, config.recv_buffer_bytes, config.send_buffer_bytes)?;
                if local_addrs.len() == i {
                    let bound = socket
                        .local_addr()
                        .map_err(|source| StartError::Poll { worker: 0, source })?;
                    local_addrs.push(bound);
                }
                sockets.push(socket);
            }
            sockets_per_worker.push(sockets);
        }

        let counters: Arc<[CachePadded<WorkerCounters>]> = (0..workers)
            .map(|_| CachePadded::new(WorkerCounters::default()))
            .collect();
        let limits = Arc::new(SessionLimits::new(
            config.max_sessions,
            config.max_sessions_per_ip,
        ));
        let (events_tx, events) = crossbeam_channel::unbounded();
        let cores = core_affinity::get_core_ids().unwrap_or_default();

        let mut links = Vec::with_capacity(workers);
        let mut built = Vec::with_capacity(workers);
        for (id, sockets) in sockets_per_worker.into_iter().enumerate() {
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
                sockets,
                control: rx,
                grants,
                events: events_tx.clone(),
                counters: Arc::clone(&counters),
                limits: Arc::clone(&limits),
            })
            .map_err(|source| StartError::Poll { worker: id, source })?;
            links.push(WorkerLink {
                grants: grants_tx,
                tx,
                waker,
            });
            built.push((worker, core));
        }

        let mut threads = Vec::with_capacity(workers);
        for (worker, core) in built {
            let id = worker.id();
            let spawned = std::thread::Builder::new()
                .name(format!("dp-worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core
                        && !core_affinity::set_for_current(core)
                    {
                        log::warn!("dp-worker-{id}: could not pin to core {}", core.id);
                    }
                    worker.run()
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    // Stop the workers already running before reporting.
                    for link in &links {
                        let _ = link.tx.send(crate::ctl::ControlMsg::Shutdown);
                        let _ = link.waker.wake();
                    }
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(StartError::Spawn { worker: id, source });
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
        Ok(Self {
            controller: Controller {
                links: links.into(),
                counters,
            },
            events,
            threads,
            local_addrs,
        })
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

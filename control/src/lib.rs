//! The control plane of udp-director: one thread ("control") running a tokio runtime that owns
//! the inventory, the reconcilers, the status writers and the admin HTTP server, and one thread
//! ("query") that answers the query port. Queries get a thread of their own because the control
//! thread's work comes in bursts (a fleet's snapshot assembled, a thousand Forwarders planned)
//! that a query must not wait behind (SPEC section 10: p99 within 1 ms under churn); both
//! threads share the director, whose state is behind a short-held lock.
//!
//! Control steers the data plane only through [`dataplane::Controller`] (grants, default
//! backend, backend removal, drain, shutdown) and learns about sessions from
//! [`dataplane::WorkerEvent`]s. It never touches a worker's sessions or sockets.

pub mod admin;
pub mod config;
pub mod crd;
pub mod handoff;
pub mod inventory;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod query;
pub mod quote;
pub mod reconcile;
pub mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::DataPlane;
use dataplane::liveness::Heartbeat;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, InventoryConfig, SessionsApiAuth};
use crate::inventory::{FileSource, KubeSource, Snapshot};
use crate::metrics::Metrics;
use crate::query::director::Director;
use crate::reconcile::{forwarder, gateway, route, status};

/// How often worker events are folded into the load counts.
const EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// How long a stopping instance waits for the status Lease to be handed back.
const LEASE_RELEASE_WITHIN: Duration = Duration::from_secs(2);
/// How long after start the handed-over listeners may still be claimed once the inventory is
/// in: the reconcilers open theirs on the first snapshot, but a forwarder whose target is a
/// name opens once it resolves. Until then an unclaimed listener serves as it did.
const CLAIM_GRACE: Duration = Duration::from_secs(30);
/// How often the default backend is re-chosen (load balancing moves with the load).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// Starting the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The tokio runtime could not be built.
    #[error("cannot start the control runtime")]
    Runtime(#[source] std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The hand-off socket could not be listened on.
    #[error("cannot listen for a successor on {}", path.display())]
    HandOff {
        /// `handoff.socketPath`.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The control thread could not be spawned.
    #[error("cannot spawn the control thread")]
    Spawn(#[source] std::io::Error),
    /// A route entry point could not be opened.
    #[error(transparent)]
    EntryPoint(route::EntryPointError),
    /// The config needs a Kubernetes API server, but none is configured.
    #[error(
        "{needed_by}, but no Kubernetes API server is configured: {reason}. Run in a cluster or \
         set KUBECONFIG"
    )]
    Kubernetes {
        /// What in the config needs it.
        needed_by: &'static str,
        /// Why no client could be made.
        reason: String,
    },
}

/// The configured inventory source.
#[derive(Debug)]
enum Source {
    File(Box<FileSource>),
    Kube(Box<KubeSource>),
}

impl inventory::InventorySource for Source {
    fn describe(&self) -> String {
        match self {
            Self::File(s) => s.describe(),
            Self::Kube(s) => s.describe(),
        }
    }

    async fn next(&mut self) -> Result<Snapshot, inventory::InventoryError> {
        match self {
            Self::File(s) => s.next().await,
            Self::Kube(s) => s.next().await,
        }
    }
}

/// The running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    thread: JoinHandle<()>,
    query_thread: JoinHandle<()>,
    /// Bound query server address.
    pub query_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Route entry points as bound: name, transport, address.
    pub entry_points: Vec<(String, dataplane::Transport, SocketAddr)>,
    /// The hand-off server, until [`Self::serve_successors`] starts it.
    successors: Option<handoff::Successors>,
    controller: dataplane::Controller,
}

impl ControlPlane {
    /// With `handoff`, starts waiting for a successor on the hand-off socket: called once this
    /// process serves (after it took over from its own predecessor), so a failure before that
    /// leaves the predecessor's socket in place.
    pub fn serve_successors(&mut self) -> Result<(), ControlError> {
        let Some(successors) = self.successors.take() else {
            return Ok(());
        };
        let path = successors.path.clone();
        successors
            .serve(self.controller.clone())
            .map_err(|source| ControlError::HandOff { path, source })
    }

    /// Waits until control has drained and shut the data plane down (after SIGTERM/SIGINT).
    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("the control thread panicked");
        }
        if self.query_thread.join().is_err() {
            log::error!("the query thread panicked");
        }
    }
}

/// Binds the query and admin listeners, then runs control on its own thread until SIGTERM or
/// SIGINT: then it drains for `config.drain`, shuts the workers down and returns.
pub fn start(
    config: Arc<Config>,
    config_path: Option<std::path::PathBuf>,
    plane: &DataPlane,
    inherited: handoff::Inherited,
) -> Result<ControlPlane, ControlError> {
    let runtime = control_runtime("control-bg")?;
    let query_runtime = control_runtime("query-bg")?;
    let kube = match &config.inventory {
        InventoryConfig::Kubernetes { .. } => {
            let needed_by = "inventory.kind is `kubernetes` (the default when no inventory is \
                             given; use `inventory: {kind: file, path: …}` without a cluster)";
            Some(kube_client(&runtime, needed_by)?)
        }
        InventoryConfig::File { .. } => None,
    };
    let rejections = inventory::Rejections::default();
    let source = match &config.inventory {
        InventoryConfig::File {
            path,
            poll_interval,
            max_bytes,
        } => Source::File(Box::new(FileSource::new(
            path.clone(),
            *poll_interval,
            *max_bytes,
            config.mappings.clone(),
            rejections.clone(),
            Arc::new(spec_check),
        ))),
        InventoryConfig::Kubernetes { .. } => Source::Kube(Box::new(KubeSource::new(
            kube.clone().expect("a client for the Kubernetes inventory"),
            &config,
            rejections.clone(),
        ))),
    };
    let authorizer = admin::auth::Authorizer::new(
        config.sessions_api,
        config.sessions_api_audiences.clone(),
        match config.sessions_api {
            SessionsApiAuth::Kubernetes => {
                Some(kube_client(&runtime, "sessionsApi.auth is `kubernetes`")?)
            }
            SessionsApiAuth::Loopback => None,
        },
    );
    // Binds a listener on the runtime that will serve it and reads back its address (the real
    // port when configured as 0).
    // A socket the predecessor handed over is served as it is: connections waiting in it
    // are answered here.
    let bind = |runtime: &tokio::runtime::Runtime,
                what: &'static str,
                port: u16,
                inherited: Option<std::net::TcpListener>| {
        let addr = SocketAddr::new(config.bind_address, port);
        let err = |source| ControlError::Bind { what, addr, source };
        let listener = match inherited {
            Some(socket) => {
                socket.set_nonblocking(true).map_err(err)?;
                let _entered = runtime.enter();
                TcpListener::from_std(socket).map_err(err)?
            }
            None => runtime.block_on(TcpListener::bind(addr)).map_err(err)?,
        };
        let bound = listener.local_addr().map_err(err)?;
        Ok::<_, ControlError>((listener, bound))
    };
    let (query_listener, query_addr) = bind(
        &query_runtime,
        "query port",
        config.query_port,
        inherited.query,
    )?;
    let (admin_listener, admin_addr) =
        bind(&runtime, "admin port", config.admin_port, inherited.admin)?;
    // The next upgrade: a successor takes over through the hand-off socket, served once
    // this process serves ([`ControlPlane::serve_successors`]).
    let (handed_over_tx, handed_over_rx) = watch::channel(None);
    let handoff_setup = match (&config.handoff, &config_path) {
        (Some(h), Some(path)) => {
            let err = |source| ControlError::HandOff {
                path: h.socket_path.clone(),
                source,
            };
            let config_text = std::fs::read_to_string(path).map_err(err)?;
            let sockets =
                handoff::control_sockets(&query_listener, &admin_listener).map_err(err)?;
            Some((h.socket_path.clone(), config_text, sockets))
        }
        _ => None,
    };

    let controller = plane.controller();
    let (inventory_tx, inventory_rx) = watch::channel(Arc::new(Snapshot::default()));
    let metrics = Metrics::new(controller.clone(), inventory_rx.clone(), &rejections);
    // The running config, replaced whole by a reload.
    let (live_tx, live_rx) = watch::channel(Arc::clone(&config));
    let reloader = config_path.map(|path| {
        reload::Reloader::new(
            path,
            live_tx.clone(),
            controller.clone(),
            Arc::clone(&metrics),
        )
    });
    let director = Arc::new(
        Director::new(
            live_rx.clone(),
            controller,
            plane.local_addrs(),
            inventory_rx,
            plane.events(),
            Arc::clone(&metrics),
        )
        .with_allocator(kube.clone().map(query::allocate::Allocator::new)),
    );
    // The status writers, one per reconciler, started here alike: each reconciler gets the
    // handle it hands its statuses to, and the tasks are spawned with the others.
    let mut writer_tasks: Vec<status::WriterTask> = Vec::new();
    let status_counts = metrics.status_counts();
    let mut start_writer = |writer: status::Writer| {
        let (writes, task) = writer
            .recording(status_counts.clone())
            .start(inventory_tx.subscribe());
        writer_tasks.push(task);
        writes
    };
    let routes = route::Reconciler::open(
        &config,
        plane.controller(),
        kube.clone()
            .map(|client| start_writer(status::Writer::new(client, String::new(), node_name()))),
    )
    .map_err(ControlError::EntryPoint)?;
    let entry_points: Vec<(String, dataplane::Transport, SocketAddr)> = routes
        .iter()
        .flat_map(|r| r.entry_points())
        .map(|e| (e.name.clone(), e.transport, e.addr))
        .collect();
    // The status Lease, and the reconcilers' link to it.
    let (facts_tx, facts_rx) = watch::channel(status::fleet::ListenerFacts::new());
    let (fleet_tx, fleet_rx) = watch::channel(Arc::new(status::lease::Fleet::default()));
    let elector = kube
        .clone()
        .filter(|_| status::lease::elects(&config))
        .map(|client| {
            status::lease::Elector::new(client, config.status_lease.clone(), node_name())
        });
    let link = elector.as_ref().map(|e| gateway::FleetLink {
        facts: facts_tx,
        fleet: fleet_rx,
        deadline: e.deadline(),
    });
    let gateway_writes =
        kube.clone()
            .zip(config.gateway_controller.clone())
            .map(|(client, controller)| {
                let deadline = link.as_ref().map(|l| l.deadline.clone());
                start_writer(
                    status::Writer::new(client, String::new(), node_name())
                        .for_gateway_controller(controller, deadline),
                )
            });
    let gateways = gateway::Reconciler::new(&config, plane.controller(), gateway_writes, link);
    let route_views: Vec<route::RouteViews> = routes
        .iter()
        .map(route::Reconciler::views)
        .chain(gateways.iter().map(gateway::Reconciler::views))
        .collect();
    if !route_views.is_empty() {
        metrics.register_collector(Box::new(route::metrics::RouteCollector(route_views)));
    }
    let forwarders = forwarder_reconciler(
        &config,
        plane,
        kube,
        query_addr,
        admin_addr,
        &entry_points,
        &mut start_writer,
    );
    if let Some(f) = &forwarders {
        metrics.register_collector(Box::new(forwarder::metrics::ForwarderCollector(f.table())));
    }
    let successors = handoff_setup.map(|(path, config_text, sockets)| handoff::Successors {
        path,
        config_text,
        sockets,
        director: Arc::clone(&director),
        handed_over: handed_over_tx,
    });
    let liveness = plane.liveness();
    metrics.register_collector(Box::new(admin::health::ThreadCollector::new(
        Arc::clone(&liveness),
        live_rx.clone(),
    )));
    // Registered before the thread starts, so a control thread that never gets going is
    // silent rather than missing.
    let heart = liveness.register("control");
    let query_heart = liveness.register("query");
    let admin = Arc::new(admin::Admin {
        director: Arc::clone(&director),
        metrics,
        authorizer,
        forwarders: forwarders.as_ref().map(forwarder::Reconciler::table),
        routes: routes.as_ref().map(route::Reconciler::views),
        liveness,
    });

    // Both threads stop serving when control's drain is over.
    let (stop_tx, stop_rx) = watch::channel(false);
    let query_thread = {
        let director = Arc::clone(&director);
        let live = live_tx.subscribe();
        let stop = stop_rx.clone();
        std::thread::Builder::new()
            .name("query".into())
            .spawn(move || {
                query_runtime.block_on(query::server::serve(
                    query_listener,
                    director,
                    live,
                    stop,
                    query_heart,
                ));
            })
            .map_err(ControlError::Spawn)?
    };
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            runtime.block_on(run(
                heart,
                live_tx,
                reloader,
                director,
                admin,
                source,
                inventory_tx,
                admin_listener,
                (stop_tx, stop_rx),
                handed_over_rx,
                Reconcilers {
                    forwarders,
                    routes,
                    gateways,
                    writers: writer_tasks,
                    elector: elector.map(|e| (e, facts_rx, fleet_tx)),
                },
            ));
        })
        .map_err(ControlError::Spawn)?;
    Ok(ControlPlane {
        thread,
        query_thread,
        query_addr,
        admin_addr,
        entry_points,
        successors,
        controller: plane.controller(),
    })
}

/// The reconcilers, their status writers and this instance's side of the status Lease, built
/// by [`start`] and run by [`run`].
struct Reconcilers {
    forwarders: Option<forwarder::Reconciler>,
    routes: Option<route::Reconciler>,
    gateways: Option<gateway::Reconciler>,
    writers: Vec<status::WriterTask>,
    elector: Option<(
        status::lease::Elector,
        watch::Receiver<status::fleet::ListenerFacts>,
        watch::Sender<Arc<status::lease::Fleet>>,
    )>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    heart: Heartbeat,
    live: watch::Sender<Arc<Config>>,
    reloader: Option<reload::Reloader>,
    director: Arc<Director>,
    admin: Arc<admin::Admin>,
    source: Source,
    inventory_tx: watch::Sender<Arc<Snapshot>>,
    admin_listener: TcpListener,
    (stop_tx, stop_rx): (watch::Sender<bool>, watch::Receiver<bool>),
    mut handed_over: watch::Receiver<Option<dataplane::handoff::old::HandedOver>>,
    reconcilers: Reconcilers,
) {
    let Reconcilers {
        forwarders,
        routes,
        gateways,
        writers,
        elector,
    } = reconcilers;
    let elector = elector.map(|(elector, facts, fleet)| {
        tokio::spawn(elector.run(facts, inventory_tx.subscribe(), fleet, stop_rx.clone()))
    });
    // What changes listeners or writes status, stopped after a hand-off: from then on the
    // successor owns the ports, the statuses and the config.
    let mut owners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    for writer in writers {
        owners.push(tokio::spawn(writer));
    }
    let mut inventory_rx = inventory_tx.subscribe();
    let mut live_rx = live.subscribe();
    if let Some(f) = forwarders {
        owners.push(tokio::spawn(
            f.run(inventory_tx.subscribe(), live.subscribe()),
        ));
    }
    if let Some(r) = routes {
        owners.push(tokio::spawn(
            r.run(inventory_tx.subscribe(), live.subscribe()),
        ));
    }
    if let Some(g) = gateways {
        owners.push(tokio::spawn(
            g.run(inventory_tx.subscribe(), live.subscribe()),
        ));
    }
    match reloader {
        Some(r) => owners.push(tokio::spawn(r.run())),
        // SIGHUP would end the process by default: with nothing to reload it says so instead.
        None => drop(tokio::spawn(reload::no_file_to_reload())),
    }
    tokio::spawn(inventory::run(source, inventory_tx));
    tokio::spawn(admin::serve(admin_listener, admin, stop_rx.clone()));

    let mut events = tokio::time::interval(EVENT_INTERVAL);
    let mut reconcile = tokio::time::interval(RECONCILE_INTERVAL);
    // The first signal starts the drain: no new sessions, existing ones keep forwarding. The
    // loop keeps running through it (a backend that leaves the inventory still ends its
    // sessions, load counts stay current), and so do the query and admin servers: `/readyz`
    // says 503, `/healthz` 200, metrics keep moving and queries are answered `draining`. The
    // drain ends after `drainSeconds`, or at once on a second signal.
    let mut signals = ShutdownSignals::new();
    let drain_over = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain_over);
    let mut draining = false;
    // After a hand-off the successor serves the UDP sessions, the query and the admin port;
    // this process finishes its TCP connections (for at most `drain`) and ends. In a pod it
    // then waits for its deletion instead: an exit would get its container restarted, and
    // the restarted old release would take everything back from the new one.
    let mut finishing = false;
    let mut finished = false;
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    // Listeners handed over by the predecessor that this process's config and objects do
    // not claim are closed once the inventory is in and the reconcilers have had their turn.
    let started = Instant::now();
    let mut unclaimed = director.controller().has_unclaimed();
    loop {
        tokio::select! {
            changed = inventory_rx.changed() => {
                if changed.is_err() { break; }
                director.reconcile();
            }
            _ = reconcile.tick() => {
                director.reconcile();
                if unclaimed && director.is_ready() && started.elapsed() >= CLAIM_GRACE {
                    unclaimed = false;
                    director.controller().release_unclaimed();
                }
            }
            Ok(()) = handed_over.changed(), if !finishing => {
                finishing = true;
                // The query and admin servers stop now: their sockets are the successor's;
                // so do the reconcilers, status writers and reloads. The workers keep their
                // TCP connections (a connection still waiting for its token included).
                let _ = stop_tx.send(true);
                for task in owners.drain(..) {
                    task.abort();
                }
                if !in_pod {
                    draining = true;
                    let drain = live.borrow().drain;
                    drain_over.as_mut().reset(tokio::time::Instant::now() + drain);
                }
            }
            // A reload: mappings, load balancing and the default endpoint apply now.
            Ok(()) = live_rx.changed() => director.reconcile(),
            // Beaten by the loop itself, not a task of its own: a wedged loop goes silent.
            _ = events.tick() => {
                let now = Instant::now();
                heart.beat(now);
                director.absorb_events(now);
                if finishing && director.controller().counters().sessions_active == 0 {
                    // Outside a pod, or deleted already: nothing is left to do.
                    if !in_pod || draining {
                        log::info!("hand-off: every TCP connection has finished; exiting");
                        break;
                    }
                    if !finished {
                        finished = true;
                        log::info!(
                            "hand-off: every TCP connection has finished; idle until this pod \
                             is deleted"
                        );
                    }
                }
            }
            () = signals.recv() => {
                if draining || finished {
                    log::info!("drain cut short");
                    break;
                }
                if finishing {
                    // In a pod, deleted after the hand-off: the TCP connections get
                    // `drainSeconds` (a second signal cuts it short).
                    draining = true;
                    let drain = live.borrow().drain;
                    log::info!("finishing TCP connections for {} s more", drain.as_secs());
                    drain_over.as_mut().reset(tokio::time::Instant::now() + drain);
                    continue;
                }
                draining = true;
                let drain = live.borrow().drain;
                log::info!(
                    "shutting down: no new sessions, forwarding for {} s more (signal again to \
                     stop now)",
                    drain.as_secs()
                );
                director.drain();
                drain_over.as_mut().reset(tokio::time::Instant::now() + drain);
            }
            () = &mut drain_over => {
                log::info!("drained");
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    // A holder hands the status Lease back, so another instance writes at once rather than
    // after the Lease lapses.
    if let Some(task) = elector
        && tokio::time::timeout(LEASE_RELEASE_WITHIN, task)
            .await
            .is_err()
    {
        log::warn!("status lease: not released within {LEASE_RELEASE_WITHIN:?}");
    }
    director.controller().shutdown();
    log::info!("data plane stopped");
}

/// A current-thread runtime whose blocking pool (named `background`) runs at a lower priority:
/// what it does (query indexes built, replaced snapshots freed, memory trimmed) can wait, and
/// on a small node it must not take the CPU from the thread answering queries.
fn control_runtime(background: &'static str) -> Result<tokio::runtime::Runtime, ControlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(background)
        .on_thread_start(lower_priority)
        .build()
        .map_err(ControlError::Runtime)
}

/// How much lower background threads run than the threads that serve (a nice value).
const BACKGROUND_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's priority (Linux's nice applies per thread).
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority changes only this thread's nice value
    // (a failure leaves it as it was, which is harmless).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICENESS);
    }
}

/// The forwarder reconciler, when the config enables forwarders: it keeps off the proxy's own
/// ports, and with the Kubernetes inventory writes status as the node in `NODE_NAME` (set by
/// the DaemonSet from `spec.nodeName`; the host name without it).
fn forwarder_reconciler(
    config: &Config,
    plane: &DataPlane,
    kube: Option<kube::Client>,
    query: SocketAddr,
    admin: SocketAddr,
    entry_points: &[(String, dataplane::Transport, SocketAddr)],
    start_writer: &mut dyn FnMut(status::Writer) -> status::Writes,
) -> Option<forwarder::Reconciler> {
    let namespace = config.forwarders.as_ref()?.namespace.clone();
    let data: Vec<(String, dataplane::Transport, u16)> = config
        .data_ports
        .iter()
        .zip(plane.local_addrs())
        .map(|(p, addr)| (p.name.clone(), p.protocol, addr.port()))
        .collect();
    let entry: Vec<(String, dataplane::Transport, u16)> = entry_points
        .iter()
        .map(|(name, t, addr)| (name.clone(), *t, addr.port()))
        .collect();
    let own = forwarder::own_ports(query.port(), admin.port(), &data, &entry);
    let writes = kube.map(|client| {
        let node = node_name();
        log::info!("forwarders: status is written as node {node}");
        start_writer(status::Writer::new(client, namespace, node))
    });
    forwarder::Reconciler::new(config, plane.controller(), own, writes)
}

/// The reconcilers' check of a file-inventory object's spec: a Forwarder or a Route that
/// does not read refuses the file (the inventory does not know what a spec may be).
pub fn spec_check(o: &inventory::Object) -> Result<(), (&'static str, String)> {
    if forwarder::is_forwarder(o) {
        forwarder::ForwarderObject::from_object(o)
            .map(drop)
            .map_err(|e| ("Forwarder", e.to_string()))
    } else if route::is_route(o) {
        route::RouteObject::from_object(o)
            .map(drop)
            .map_err(|e| ("Route", e.to_string()))
    } else {
        Ok(())
    }
}

/// `NODE_NAME`, else the host name.
fn node_name() -> String {
    if let Some(node) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return node;
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown-node".to_string(),
    }
}

/// The API server client (in-cluster service account, else KUBECONFIG), found once at start: a
/// proxy with nowhere to look fails now, with the reason, rather than never turning ready.
fn kube_client(
    runtime: &tokio::runtime::Runtime,
    needed_by: &'static str,
) -> Result<kube::Client, ControlError> {
    runtime
        .block_on(async {
            let kube_config = kube::Config::infer().await.map_err(|e| e.to_string())?;
            kube::Client::try_from(kube_config).map_err(|e| e.to_string())
        })
        .map_err(|reason| ControlError::Kubernetes { needed_by, reason })
}

/// SIGTERM and SIGINT, listened to for the whole run: a signal that arrives between two
/// `recv` calls is kept, not lost.
struct ShutdownSignals {
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => {
                log::error!("cannot install signal handlers; stop the proxy with SIGKILL");
                None
            }
        };
        Self { streams }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        let Some((term, int)) = &mut self.streams else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM received"),
            _ = int.recv() => log::info!("SIGINT received"),
        }
    }
}

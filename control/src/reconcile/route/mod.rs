//! Routes (SPEC §7): entry points from the config, opened as listeners at start, whose rule
//! tables are compiled from `Route` objects and their Services' EndpointSlices
//! ([`compile`], pure) and swapped into the workers whenever the inventory changes them.

mod backends;
pub mod compile;
pub mod metrics;
mod object;

pub(crate) use backends::ServicesSeen;
pub use compile::{API_VERSION, KIND, RouteObject, is_route};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dataplane::{
    Controller, ListenError, ListenerKind, ListenerSpec, OpenedListener, RouteCounter, RouteTable,
    Transport,
};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::Config;
use crate::crd::RouteInstance;
use crate::inventory::{Object, Snapshot};
use crate::reconcile::status::events::{Problem, Reason};
use crate::reconcile::status::{StatusKey, StatusOf, Wanted, Writes};
use compile::{Compiled, Counters, Inputs};

/// An entry point the proxy holds.
#[derive(Debug)]
pub struct EntryPoint {
    /// Its name in the config.
    pub name: String,
    /// Transport.
    pub transport: Transport,
    /// The bound address (the real port when configured as 0).
    pub addr: SocketAddr,
    handle: OpenedListener,
}

/// What one instance knows of one route, for the admin API and metrics.
#[derive(Clone, Debug, Default)]
pub struct RouteView {
    /// Its entry point.
    pub entry_point: String,
    /// Every backend resolved, and some client reaches a rule of it.
    pub ready: bool,
    /// Ready endpoints over its backends.
    pub ready_endpoints: u32,
    /// What is wrong.
    pub message: Option<String>,
    /// Sessions opened, per Service.
    pub sessions: Vec<(String, Arc<RouteCounter>)>,
    /// Sessions re-homed, per rule.
    pub rehomed: Vec<Arc<RouteCounter>>,
}

/// Every route this instance serves, by (namespace, name).
pub type RouteViews = Arc<Mutex<BTreeMap<(String, String), RouteView>>>;

/// Opening an entry point failed at start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open entry point {name}")]
pub struct EntryPointError {
    /// The entry point.
    pub name: String,
    /// Why.
    #[source]
    pub source: ListenError,
}

/// A Route as last read (or why it does not read), with the object it was read from.
type Parsed = (Arc<Object>, Result<RouteObject, String>);

/// The route reconciler.
pub struct Reconciler {
    controller: Controller,
    entry_points: Vec<EntryPoint>,
    names: Vec<String>,
    allow_cross_namespace: bool,
    session_timeout: Duration,
    counters: Counters,
    /// The Services and EndpointSlices the last compile read, and those its routes use.
    seen: backends::ServicesSeen,
    /// Each Route as last read, with the object it was read from.
    parsed: HashMap<(String, String), Parsed>,
    /// What each entry point's table was built from, so an unchanged one is not swapped (a
    /// swap restarts the weighted rotation).
    fingerprints: BTreeMap<String, String>,
    views: RouteViews,
    /// The node this instance writes as, and what it wants written.
    writes: Option<(String, watch::Sender<Arc<Wanted>>)>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("entry_points", &self.entry_points)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// Opens the config's entry points (with no rules yet: every client is `no_route` until
    /// the routes are listed); `None` without entry points. A port another process or
    /// listener holds fails the start, naming it.
    pub fn open(
        config: &Config,
        controller: Controller,
        writes: Option<Writes>,
    ) -> Result<Option<Self>, EntryPointError> {
        if config.entry_points.is_empty() {
            return Ok(None);
        }
        let mut entry_points = Vec::new();
        for e in &config.entry_points {
            let spec = ListenerSpec {
                owner: format!("entry point {}", e.name),
                bind: SocketAddr::new(config.bind_address, e.port),
                transport: e.protocol,
                kind: ListenerKind::Route {
                    table: Arc::new(RouteTable::default()),
                },
                idle_timeout: config.session_timeout,
            };
            let handle = controller
                .open_listener(spec)
                .map_err(|source| EntryPointError {
                    name: e.name.clone(),
                    source,
                })?;
            entry_points.push(EntryPoint {
                name: e.name.clone(),
                transport: e.protocol,
                addr: handle.addr,
                handle,
            });
        }
        Ok(Some(Self {
            controller,
            names: entry_points.iter().map(|e| e.name.clone()).collect(),
            entry_points,
            allow_cross_namespace: config.routes_allow_cross_namespace,
            session_timeout: config.session_timeout,
            counters: Counters::default(),
            seen: backends::ServicesSeen::default(),
            parsed: HashMap::new(),
            fingerprints: BTreeMap::new(),
            views: RouteViews::default(),
            writes: writes.map(|w| (w.node, w.tx)),
        }))
    }

    /// The entry points, as bound.
    pub fn entry_points(&self) -> &[EntryPoint] {
        &self.entry_points
    }

    /// The table the admin API and metrics read.
    pub fn views(&self) -> RouteViews {
        Arc::clone(&self.views)
    }

    /// Runs until the inventory channel closes.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<Arc<Snapshot>>,
        mut live: watch::Receiver<Arc<Config>>,
    ) {
        // What the last pass read: a change of anything else (a GameServer) costs nothing
        // here, nor does a change of Services or EndpointSlices that no route uses.
        let mut compiled_from = None;
        loop {
            let snapshot = Arc::clone(&inventory.borrow_and_update());
            let v = snapshot.versions;
            // Forwarders too: a route must not send clients to a listener of this proxy.
            let inputs = (
                [v.routes, v.forwarders, v.gateway_api],
                [v.services, v.endpoint_slices],
            );
            if self.seen.must_compile(
                compiled_from.as_ref(),
                &inputs,
                &snapshot.services,
                &snapshot.endpoint_slices,
            ) {
                self.reconcile(&snapshot);
            }
            compiled_from = Some(inputs);
            tokio::select! {
                changed = inventory.changed() => if changed.is_err() { return },
                Ok(()) = live.changed() => {
                    // A reload: the default idle timeout and the cross-namespace rule.
                    let config = Arc::clone(&live.borrow_and_update());
                    self.allow_cross_namespace = config.routes_allow_cross_namespace;
                    self.session_timeout = config.session_timeout;
                    compiled_from = None;
                }
            }
        }
    }

    /// One pass: every entry point's table compiled and, where it changed, swapped in.
    pub fn reconcile(&mut self, snapshot: &Snapshot) {
        if !snapshot.routes_loaded {
            return;
        }
        let mut routes = Vec::new();
        let mut invalid = BTreeMap::new();
        // Parsed once per object: a compile for another reason (a Service, a Forwarder) reads
        // the routes again only where they changed.
        let mut parsed = HashMap::with_capacity(snapshot.routes.len());
        for o in &snapshot.routes {
            let id = (o.namespace.clone(), o.name.clone());
            let reading = match self.parsed.remove(&id) {
                Some((object, reading)) if Arc::ptr_eq(&object, o) => reading,
                _ => RouteObject::from_object(o).map_err(|e| format!("invalid: {e}")),
            };
            match &reading {
                Ok(r) => routes.push(r.clone()),
                Err(why) => {
                    invalid.insert(id.clone(), why.clone());
                }
            }
            parsed.insert(id, (Arc::clone(o), reading));
        }
        self.parsed = parsed;
        let own_listener = |entry_point: &str, endpoint: SocketAddr| {
            let transport = self
                .entry_points
                .iter()
                .find(|e| e.name == entry_point)?
                .transport;
            self.controller.own_listener_at(endpoint, transport)
        };
        let inputs = Inputs {
            services: &snapshot.services,
            slices: &snapshot.endpoint_slices,
            entry_points: &self.names,
            allow_cross_namespace: self.allow_cross_namespace,
            session_timeout: self.session_timeout,
            gateway: None,
            own_listener: Some(&own_listener),
        };
        let Compiled { tables, reports } = compile::compile(&routes, inputs, &mut self.counters);
        self.seen =
            backends::ServicesSeen::of(&routes, &snapshot.services, &snapshot.endpoint_slices);
        for (name, table) in tables {
            let fingerprint = fingerprint(&table);
            if self.fingerprints.get(&name) == Some(&fingerprint) {
                continue;
            }
            let Some(entry) = self.entry_points.iter().find(|e| e.name == name) else {
                continue;
            };
            let kind = ListenerKind::Route {
                table: Arc::new(table),
            };
            if self
                .controller
                .update_listener(&entry.handle, kind, self.session_timeout)
            {
                log::info!("entry point {name}: routes updated");
                self.fingerprints.insert(name, fingerprint);
            }
        }
        self.publish(&routes, &reports, &invalid);
    }

    fn publish(
        &mut self,
        routes: &[RouteObject],
        reports: &BTreeMap<(String, String), compile::RouteReport>,
        invalid: &BTreeMap<(String, String), String>,
    ) {
        let mut views = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for r in routes {
            let id = (r.namespace.clone(), r.name.clone());
            let Some(report) = reports.get(&id) else {
                continue;
            };
            let view = view_of(r, report, &self.counters);
            let message = view.message.clone();
            if let Some((node, _)) = &self.writes {
                let instance = RouteInstance {
                    node: node.clone(),
                    ready: view.ready,
                    ready_endpoints: view.ready_endpoints,
                    message,
                    observed_generation: report.generation,
                    last_update_time: None,
                };
                if let Ok(value) = serde_json::to_value(instance) {
                    statuses.insert(status_key(&id), (report.uid.clone(), value));
                }
                if report.entry_point_missing {
                    let note = report.problems.first().cloned().unwrap_or_default();
                    let problem = Problem {
                        reason: Reason::EntryPointMissing,
                        note,
                    };
                    problems.insert(status_key(&id), (report.uid.clone(), vec![problem]));
                }
            }
            views.insert(id, view);
        }
        for (id, why) in invalid {
            views.insert(
                id.clone(),
                RouteView {
                    message: Some(why.clone()),
                    ..RouteView::default()
                },
            );
        }
        *self.views.lock() = views;
        if let Some((_, tx)) = &self.writes {
            let wanted = Wanted {
                statuses,
                services: BTreeMap::new(),
                problems,
            };
            crate::reconcile::status::hand_over(tx, wanted);
        }
    }
}

/// What the admin API and metrics show of route `r`.
pub(crate) fn view_of(
    r: &RouteObject,
    report: &compile::RouteReport,
    counters: &Counters,
) -> RouteView {
    let full = r.full_name();
    RouteView {
        entry_point: r.spec.entry_point.clone(),
        ready: report.ready(),
        ready_endpoints: report.ready_endpoints,
        message: report.message(),
        sessions: counters
            .sessions
            .iter()
            .filter(|((route, _), _)| *route == full)
            .map(|((_, service), c)| (service.clone(), Arc::clone(c)))
            .collect(),
        rehomed: counters
            .rehomed
            .iter()
            .filter(|((route, _), _)| *route == full)
            .map(|(_, c)| Arc::clone(c))
            .collect(),
    }
}

fn status_key((namespace, name): &(String, String)) -> StatusKey {
    StatusKey {
        of: StatusOf::Route,
        namespace: namespace.clone(),
        name: name.clone(),
    }
}

/// Everything of a table that picks depend on.
pub(crate) fn fingerprint(table: &RouteTable) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in &table.rules {
        let _ = write!(out, "{}|{:?}|{:?}|", r.key, r.matcher, r.idle_timeout);
        for b in &r.backends {
            let _ = write!(out, "{}:{}:{:?};", b.service, b.weight, b.endpoints);
        }
        out.push('\n');
    }
    out
}

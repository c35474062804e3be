//! Gateway API (SPEC §7): Gateways of the GatewayClasses that name this proxy's controller get
//! their UDP and TCP listeners opened at run time as entry points, the UDPRoutes and TCPRoutes
//! attached to them compiled into the same rule tables as `Route` objects, and the status the
//! API defines written back. A port that a Forwarder also asks for goes by the port rule
//! ([`crate::reconcile::ports`]): a listener that loses is not opened, and its status names the holder.

pub mod compile;

/// Whether `o` is a Gateway API object.
pub fn is_gateway_api(o: &crate::inventory::Object) -> bool {
    crate::crd::gateway::is_gateway_api(&o.api_version)
}

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dataplane::{
    CloseMode, Controller, ListenError, ListenerKind, ListenerSpec, OpenedListener, RouteTable,
    Transport,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::Config;
use crate::crd::gateway::{GROUP, ParentReference};
use crate::inventory::Snapshot;
use crate::reconcile::forwarder::plan::ParseCache;
use crate::reconcile::ports::{self, ClaimCache, Reserved};
use crate::reconcile::route::ServicesSeen;
use crate::reconcile::route::compile::{self as routes, Counters, Inputs, RouteReport};
use crate::reconcile::status::events::{Problem, Problems, Reason};
use crate::reconcile::status::fleet::{ListenerFacts, aggregate};
use crate::reconcile::status::lease::{Fleet, HoldDeadline};
use crate::reconcile::status::{StatusKey, StatusOf, Wanted, Writes};
use compile::{Model, Plan, RouteKind};

/// A Gateway listener the reconciler holds open.
#[derive(Debug)]
struct Held {
    handle: OpenedListener,
    port: u16,
    transport: Transport,
}

/// Why a Gateway listener is not open: its `Display` is what the listener's status and the log
/// say.
#[derive(Debug, thiserror::Error)]
pub enum NotOpened {
    /// The port rule ([`ports`]) gives its port to another: one of the proxy's own ports, an
    /// older Forwarder or an older listener.
    #[error("{refusal}")]
    Refused {
        /// The port rule's refusal, naming the port and its holder.
        refusal: String,
    },
    /// The data plane could not open it.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

impl NotOpened {
    /// The port is held by this proxy's own listener that is closing: it frees within moments,
    /// so the listener is pending, not unavailable.
    fn is_closing(&self) -> bool {
        matches!(
            self,
            Self::Listen(ListenError::Taken { holder, .. }) if holder.ends_with("(closing)")
        )
    }
}

/// The Gateway API reconciler.
pub struct Reconciler {
    controller_name: String,
    controller: Controller,
    bind: IpAddr,
    session_timeout: Duration,
    /// The proxy's own ports, as configured: no listener has them.
    reserved: Vec<Reserved>,
    /// The namespace whose Forwarders are served here, when forwarders are: their ports are
    /// weighed against the listeners'.
    forwarders_namespace: Option<String>,
    /// Their claims, read again only when the Forwarders change.
    forwarder_claims: ClaimCache,
    /// Each Forwarder as it read, read again only when it changes.
    forwarder_parses: ParseCache,
    held: BTreeMap<String, Held>,
    /// Counters per route kind (each kind's routes compile apart: grants are per kind).
    counters: [Counters; 2],
    /// The Services and EndpointSlices the last pass read, and those its routes use.
    seen: ServicesSeen,
    fingerprints: BTreeMap<String, String>,
    /// What was last logged of objects that do not read and listeners not served, so a lasting
    /// problem is logged once, not on every pass.
    logged: compile::Logged,
    /// What this instance wants written (read by the writer task).
    writes: Option<watch::Sender<Arc<Wanted>>>,
    /// The node this instance reports as.
    node: String,
    /// This instance's side of the status Lease: its facts go out, the fleet's come back.
    fleet: Option<FleetLink>,
    views: crate::reconcile::route::RouteViews,
    /// A listener the last pass wanted could not open: the next is due in [`RETRY`].
    retrying: bool,
}

/// How soon a listener that could not open is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The reconciler's link to the status Lease ([`crate::reconcile::status::lease`]).
#[derive(Debug)]
pub struct FleetLink {
    /// Which of this instance's listeners are open, for its per-node Lease.
    pub facts: watch::Sender<ListenerFacts>,
    /// Whether this instance writes the fleet's status, and every instance's facts.
    pub fleet: watch::Receiver<Arc<Fleet>>,
    /// Until when it may, checked by the status writer before each write.
    pub deadline: HoldDeadline,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("controller_name", &self.controller_name)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// A condition as the API defines it; `lastTransitionTime` is stamped when written. The
/// message is never empty (the reason stands in): older API servers turn an applied empty
/// string into null, which a required string field refuses.
fn condition(type_: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    let message = if message.is_empty() { reason } else { message };
    json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "",
    })
}

impl Reconciler {
    /// A reconciler for `gatewayApi.controllerName`; `None` when the Gateway API is off.
    pub fn new(
        config: &Config,
        controller: Controller,
        writes: Option<Writes>,
        fleet: Option<FleetLink>,
    ) -> Option<Self> {
        let controller_name = config.gateway_controller.clone()?;
        Some(Self {
            controller_name: controller_name.clone(),
            controller,
            bind: config.bind_address,
            session_timeout: config.session_timeout,
            reserved: ports::configured(config),
            forwarders_namespace: config.forwarders.as_ref().map(|f| f.namespace.clone()),
            forwarder_claims: ClaimCache::default(),
            forwarder_parses: ParseCache::default(),
            held: BTreeMap::new(),
            counters: Default::default(),
            seen: ServicesSeen::default(),
            fingerprints: BTreeMap::new(),
            logged: compile::Logged::default(),
            node: writes.as_ref().map(|w| w.node.clone()).unwrap_or_default(),
            writes: writes.map(|w| w.tx),
            fleet,
            views: crate::reconcile::route::RouteViews::default(),
            retrying: false,
        })
    }

    /// The routes' views, for metrics (named `namespace/udproute/name`).
    pub fn views(&self) -> crate::reconcile::route::RouteViews {
        Arc::clone(&self.views)
    }

    /// Runs until the inventory channel closes.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<Arc<Snapshot>>,
        mut live: watch::Receiver<Arc<Config>>,
    ) {
        // The versions of what the last pass read; `again`: the fleet, the settings or a retry
        // ask for a pass whatever the inventory says. A change of anything else (a GameServer)
        // costs a version comparison.
        let mut passed_from = None;
        let mut again = true;
        loop {
            let snapshot = Arc::clone(&inventory.borrow_and_update());
            let v = snapshot.versions;
            // Forwarders claim ports too, and a route must not send clients to a listener of
            // this proxy. A change of Services or EndpointSlices no route uses costs nothing.
            let inputs = (
                [v.gateway_api, v.forwarders],
                [v.services, v.endpoint_slices],
            );
            let pass = again
                || self.seen.must_compile(
                    passed_from.as_ref(),
                    &inputs,
                    &snapshot.services,
                    &snapshot.endpoint_slices,
                );
            if pass {
                self.reconcile(&snapshot);
                again = false;
            }
            passed_from = Some(inputs);
            // A listener that could not open (a port a closing listener still holds, or another
            // process) is tried again shortly; without one, time changes nothing here.
            let retrying = self.retrying;
            let retry = async {
                if retrying {
                    tokio::time::sleep(RETRY).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let fleet_changed = async {
                match &mut self.fleet {
                    Some(link) => link.fleet.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = inventory.changed() => if changed.is_err() { return },
                // The fleet's facts or the holder changed: the status says so.
                true = fleet_changed => again = true,
                Ok(()) = live.changed() => {
                    self.session_timeout = live.borrow_and_update().session_timeout;
                    again = true;
                }
                () = retry => again = true,
            }
        }
    }

    /// One pass: listeners opened and closed as the Gateways say, tables compiled and swapped,
    /// status handed to the writer.
    pub fn reconcile(&mut self, snapshot: &Snapshot) {
        if !snapshot.gateway_loaded {
            return;
        }
        let model = Model::read(&snapshot.gateway_api);
        let plan = compile::plan(&model, &self.controller_name);
        self.seen = ServicesSeen::of(
            &plan.route_objects,
            &snapshot.services,
            &snapshot.endpoint_slices,
        );
        let refused = self.refused(&plan, snapshot);
        let opened = self.sync_listeners(&plan, &refused);
        self.log_problems(&model, &plan, &opened);
        let mut reports: BTreeMap<(String, String), RouteReport> = BTreeMap::new();
        let mut views = BTreeMap::new();
        for (i, kind) in [RouteKind::Udp, RouteKind::Tcp].into_iter().enumerate() {
            // Only listeners that are open compile (a listener that failed says so itself).
            let objects: Vec<_> = plan
                .route_objects
                .iter()
                .filter(|r| r.name.starts_with(&kind.as_str().to_ascii_lowercase()))
                .filter(|r| opened.get(&r.spec.entry_point).is_some_and(Result::is_ok))
                .cloned()
                .collect();
            let names: Vec<String> = plan
                .listeners
                .iter()
                .filter(|l| {
                    l.transport == kind.transport() && opened.get(&l.key).is_some_and(Result::is_ok)
                })
                .map(|l| l.key.clone())
                .collect();
            let granted =
                |from: &str, to: &str, service: &str| model.granted(kind, from, to, service);
            // Every listener of this kind shares its transport.
            let controller = &self.controller;
            let own_listener = |_listener: &str, endpoint: SocketAddr| {
                controller.own_listener_at(endpoint, kind.transport())
            };
            let inputs = Inputs {
                services: &snapshot.services,
                slices: &snapshot.endpoint_slices,
                entry_points: &names,
                allow_cross_namespace: false,
                session_timeout: self.session_timeout,
                gateway: Some(&granted),
                own_listener: Some(&own_listener),
            };
            let compiled = routes::compile(&objects, inputs, &mut self.counters[i]);
            for (key, table) in compiled.tables {
                self.swap(&key, table);
            }
            for r in &objects {
                if let Some(report) = compiled.reports.get(&(r.namespace.clone(), r.name.clone())) {
                    views.insert(
                        (r.namespace.clone(), r.name.clone()),
                        crate::reconcile::route::view_of(r, report, &self.counters[i]),
                    );
                }
            }
            // A route on several listeners has a report per listener: they merge.
            for (id, report) in compiled.reports {
                match reports.entry(id) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(report);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        let merged = o.get_mut();
                        merged.not_found |= report.not_found;
                        merged.not_permitted |= report.not_permitted;
                        for p in report.problems {
                            if !merged.problems.contains(&p) {
                                merged.problems.push(p);
                            }
                        }
                    }
                }
            }
        }
        *self.views.lock() = views;
        // A port this proxy's own closing listener still holds frees within moments: that
        // listener is pending, not unavailable, so it is left out of the facts.
        let facts: ListenerFacts = opened
            .iter()
            .filter(|(_, result)| !matches!(result, Err(why) if why.is_closing()))
            .map(|(key, result)| (key.clone(), result.as_ref().err().map(ToString::to_string)))
            .collect();
        if let Some(link) = &self.fleet {
            link.facts.send_if_modified(|current| {
                let changed = *current != facts;
                if changed {
                    *current = facts.clone();
                }
                changed
            });
        }
        self.publish(snapshot, &plan, &facts, &reports);
    }

    /// Logs what does not read or is not served when it appears or changes, and when it is gone.
    fn log_problems(
        &mut self,
        model: &Model,
        plan: &Plan,
        opened: &BTreeMap<String, Result<SocketAddr, NotOpened>>,
    ) {
        // A port a closing listener still holds frees within moments: not worth a line.
        let not_opened = opened.iter().filter_map(|(key, result)| match result {
            Err(why) if !why.is_closing() => Some((key, why)),
            _ => None,
        });
        let (fresh, gone) = self
            .logged
            .changes(compile::problems(model, plan, not_opened));
        for (subject, why) in fresh {
            log::warn!("{subject}: {why}");
        }
        for subject in gone {
            log::info!("{subject}: no longer a problem");
        }
    }

    /// The plan's listeners that may not have their ports, by the port rule, each with why:
    /// one of the proxy's own ports, an older Forwarder's (of the namespace served here, until
    /// whose watches have listed none is known) or an older listener's.
    fn refused(&mut self, plan: &Plan, snapshot: &Snapshot) -> BTreeMap<String, String> {
        let forwarders = match &self.forwarders_namespace {
            Some(namespace) if snapshot.forwarders_loaded => {
                let parses = &mut self.forwarder_parses;
                self.forwarder_claims.get(&snapshot.forwarders, |objects| {
                    crate::reconcile::forwarder::plan::port_claims(parses, objects, namespace)
                })
            }
            _ => Arc::default(),
        };
        let mine: Vec<ports::Claim> = plan.listeners.iter().map(|l| l.port_claim()).collect();
        let all: Vec<&ports::Claim> = mine.iter().chain(forwarders.iter()).collect();
        let verdicts = ports::assign(&self.reserved, &all);
        plan.listeners
            .iter()
            .zip(mine.iter().zip(verdicts))
            .filter_map(|(l, (claim, verdict))| {
                let holder = verdict.err()?;
                Some((l.key.clone(), holder.refusal(claim)))
            })
            .collect()
    }

    /// Opens the listeners the plan has that have their ports (`refused`: those that do not,
    /// with why) and closes the others; what each opened to, or why not.
    fn sync_listeners(
        &mut self,
        plan: &Plan,
        refused: &BTreeMap<String, String>,
    ) -> BTreeMap<String, Result<SocketAddr, NotOpened>> {
        self.retrying = false;
        let stale: Vec<String> = self
            .held
            .iter()
            .filter(|(key, held)| {
                refused.contains_key(*key)
                    || !plan.listeners.iter().any(|l| {
                        l.key == **key && l.port == held.port && l.transport == held.transport
                    })
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(held) = self.held.remove(&key) {
                log::info!("gateway listener {key}: closing");
                self.controller.close_listener(&held.handle, CloseMode::End);
                self.fingerprints.remove(&key);
            }
        }
        let mut out = BTreeMap::new();
        for l in &plan.listeners {
            if let Some(why) = refused.get(&l.key) {
                let refusal = why.clone();
                out.insert(l.key.clone(), Err(NotOpened::Refused { refusal }));
                continue;
            }
            if let Some(held) = self.held.get(&l.key) {
                out.insert(l.key.clone(), Ok(held.handle.addr));
                continue;
            }
            let spec = ListenerSpec {
                owner: format!("gateway listener {}", l.key),
                bind: SocketAddr::new(self.bind, l.port),
                transport: l.transport,
                kind: ListenerKind::Route {
                    table: Arc::new(RouteTable::default()),
                },
                idle_timeout: self.session_timeout,
            };
            match self.controller.open_listener(spec) {
                Ok(handle) => {
                    log::info!("gateway listener {}: open on {}", l.key, handle.addr);
                    out.insert(l.key.clone(), Ok(handle.addr));
                    self.held.insert(
                        l.key.clone(),
                        Held {
                            handle,
                            port: l.port,
                            transport: l.transport,
                        },
                    );
                }
                Err(e) => {
                    out.insert(l.key.clone(), Err(e.into()));
                    self.retrying = true;
                }
            }
        }
        out
    }

    fn swap(&mut self, key: &str, table: RouteTable) {
        let fingerprint = crate::reconcile::route::fingerprint(&table);
        if self.fingerprints.get(key) == Some(&fingerprint) {
            return;
        }
        let Some(held) = self.held.get(key) else {
            return;
        };
        let kind = ListenerKind::Route {
            table: Arc::new(table),
        };
        if self
            .controller
            .update_listener(&held.handle, kind, self.session_timeout)
        {
            self.fingerprints.insert(key.to_string(), fingerprint);
        }
    }

    /// The status the API defines, for the writer.
    /// The status is the fleet's: only the holder of the status Lease hands any over, with
    /// each listener's conditions from every instance's facts (this one's as they are now).
    fn publish(
        &self,
        snapshot: &Snapshot,
        plan: &Plan,
        facts: &ListenerFacts,
        reports: &BTreeMap<(String, String), RouteReport>,
    ) {
        let Some(tx) = &self.writes else { return };
        let (holder, mut fleet_reports) = match &self.fleet {
            Some(link) => {
                let fleet = link.fleet.borrow();
                (fleet.holder, fleet.reports.clone())
            }
            // Without a Lease (no link), this instance is the fleet.
            None => (true, BTreeMap::new()),
        };
        // Events are this node's own: every instance records its listeners' unavailable ports.
        let problems = local_problems(facts);
        if !holder {
            let wanted = Wanted {
                problems,
                ..Wanted::default()
            };
            crate::reconcile::status::hand_over(tx, wanted);
            return;
        }
        let node = self.node.clone();
        fleet_reports.insert(node, facts.clone());
        let states = aggregate(&fleet_reports);
        let mut statuses = BTreeMap::new();
        for class in &plan.classes {
            let status = json!({"conditions": [condition("Accepted", true, "Accepted", "", class.generation)]});
            statuses.insert(
                key(StatusOf::GatewayClass, "", &class.name),
                (String::new(), status),
            );
        }
        let attached = compile::attached_counts(plan);
        for (m, gw) in &plan.gateways {
            let mut listeners = Vec::new();
            let mut all_programmed = true;
            for l in &gw.listeners {
                let lkey = format!("{}/{}/{}", m.namespace, m.name, l.name);
                let kind = match l.protocol.as_str() {
                    "UDP" => Some("UDPRoute"),
                    "TCP" => Some("TCPRoute"),
                    _ => None,
                };
                let g = m.generation;
                let state = states.get(&lkey).cloned().unwrap_or_default();
                let conditions = match kind {
                    None => {
                        all_programmed = false;
                        vec![
                            condition(
                                "Accepted",
                                false,
                                "UnsupportedProtocol",
                                &format!("protocol {} is not served (UDP and TCP are)", l.protocol),
                                g,
                            ),
                            condition("Programmed", false, "Invalid", "not served", g),
                            condition("ResolvedRefs", false, "InvalidRouteKinds", "", g),
                        ]
                    }
                    Some(_) if state.programmed() => vec![
                        condition("Accepted", true, "Accepted", "", g),
                        condition("Programmed", true, "Programmed", &state.describe(), g),
                        condition("ResolvedRefs", true, "ResolvedRefs", "", g),
                    ],
                    Some(_) if state.not_open.is_empty() => {
                        all_programmed = false;
                        vec![
                            condition("Accepted", true, "Accepted", "", g),
                            condition("Programmed", false, "Pending", &state.describe(), g),
                            condition("ResolvedRefs", true, "ResolvedRefs", "", g),
                        ]
                    }
                    Some(_) => {
                        all_programmed = false;
                        let why = state.describe();
                        vec![
                            condition("Accepted", false, "PortUnavailable", &why, g),
                            condition("Programmed", false, "Invalid", &why, g),
                            condition("ResolvedRefs", true, "ResolvedRefs", "", g),
                        ]
                    }
                };
                listeners.push(json!({
                    "name": l.name,
                    "attachedRoutes": attached.get(&lkey).copied().unwrap_or(0),
                    "supportedKinds": kind.map(|k| vec![json!({"group": GROUP, "kind": k})]).unwrap_or_default(),
                    "conditions": conditions,
                }));
            }
            // Listeners that cannot be read are not opened, and say why; one with no name of its
            // own has no entry, and the Gateway's `Accepted` names it.
            let invalid: Vec<&compile::InvalidListener> = plan
                .invalid_listeners
                .iter()
                .filter(|l| l.gateway.0 == m.namespace && l.gateway.1 == m.name)
                .collect();
            for l in &invalid {
                all_programmed = false;
                let Some(name) = &l.name else { continue };
                let g = m.generation;
                listeners.push(json!({
                    "name": name,
                    "attachedRoutes": 0,
                    "supportedKinds": [],
                    "conditions": [
                        condition("Accepted", false, "UnsupportedValue", &l.why, g),
                        condition("Programmed", false, "Invalid", &l.why, g),
                        condition("ResolvedRefs", true, "ResolvedRefs", "", g),
                    ],
                }));
            }
            let accepted = if invalid.is_empty() {
                condition("Accepted", true, "Accepted", "", m.generation)
            } else {
                let why: Vec<String> = invalid
                    .iter()
                    .map(|l| format!("{}: {}", l.label(), l.why))
                    .collect();
                // Accepted while some listener serves; the API's reason either way.
                let some_valid = !gw.listeners.is_empty();
                condition(
                    "Accepted",
                    some_valid,
                    "ListenersNotValid",
                    &why.join("; "),
                    m.generation,
                )
            };
            let status = json!({
                "conditions": [
                    accepted,
                    if all_programmed {
                        condition("Programmed", true, "Programmed", "", m.generation)
                    } else {
                        condition("Programmed", false, "Invalid", "a listener is not open; see its conditions", m.generation)
                    },
                ],
                "listeners": listeners,
            });
            statuses.insert(
                key(StatusOf::Gateway, &m.namespace, &m.name),
                (String::new(), status),
            );
        }
        // Routes: one `parents` entry per parent this controller serves.
        let mut parents: BTreeMap<(RouteKind, String, String), Vec<Value>> = BTreeMap::new();
        for a in &plan.attachments {
            let g = a.route.generation;
            let report_name = format!("{}/{}", a.kind.as_str().to_ascii_lowercase(), a.route.name);
            let report = reports.get(&(a.route.namespace.clone(), report_name));
            let accepted = match &a.accepted {
                Ok(()) => condition("Accepted", true, "Accepted", "", g),
                Err((reason, message)) => condition("Accepted", false, reason, message, g),
            };
            let resolved = match report {
                _ if a.invalid_kind => condition(
                    "ResolvedRefs",
                    false,
                    "InvalidKind",
                    "a backendRef is not a core Service",
                    g,
                ),
                Some(r) if r.not_permitted => condition(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    &r.problems.join("; "),
                    g,
                ),
                Some(r) if r.not_found => condition(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    &r.problems.join("; "),
                    g,
                ),
                _ => condition("ResolvedRefs", true, "ResolvedRefs", "", g),
            };
            parents
                .entry((a.kind, a.route.namespace.clone(), a.route.name.clone()))
                .or_default()
                .push(json!({
                    "parentRef": parent_ref(&a.parent),
                    "controllerName": self.controller_name,
                    "conditions": [accepted, resolved],
                }));
        }
        for ((kind, namespace, name), list) in parents {
            let of = match kind {
                RouteKind::Udp => StatusOf::UdpRoute,
                RouteKind::Tcp => StatusOf::TcpRoute,
            };
            statuses.insert(
                key(of, &namespace, &name),
                (String::new(), json!({"parents": list})),
            );
        }
        // A route that no longer attaches to a Gateway of ours loses our entries (and keeps
        // the others').
        for o in &snapshot.gateway_api {
            let of = match o.kind.as_str() {
                "UDPRoute" => StatusOf::UdpRoute,
                "TCPRoute" => StatusOf::TcpRoute,
                _ => continue,
            };
            let ours = o
                .raw
                .pointer("/status/parents")
                .and_then(Value::as_array)
                .is_some_and(|list| {
                    list.iter().any(|p| {
                        p.get("controllerName").and_then(Value::as_str)
                            == Some(&self.controller_name)
                    })
                });
            if ours {
                statuses
                    .entry(key(of, &o.namespace, &o.name))
                    .or_insert_with(|| (String::new(), json!({"parents": []})));
            }
        }
        let wanted = Wanted {
            statuses,
            services: BTreeMap::new(),
            problems,
        };
        crate::reconcile::status::hand_over(tx, wanted);
    }
}

/// The Gateway listeners whose port this node could not open, as Events on their Gateway.
fn local_problems(facts: &ListenerFacts) -> Problems {
    let mut problems = Problems::new();
    for (listener, why) in facts {
        let Some(why) = why else { continue };
        // `namespace/gateway/listener`: none of the three holds a `/`.
        let mut parts = listener.splitn(3, '/');
        let (Some(namespace), Some(gateway), Some(name)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        problems
            .entry(key(StatusOf::Gateway, namespace, gateway))
            .or_insert_with(|| (String::new(), Vec::new()))
            .1
            .push(Problem {
                reason: Reason::PortUnavailable,
                note: format!("listener {name}: {why}"),
            });
    }
    problems
}

fn key(of: StatusOf, namespace: &str, name: &str) -> StatusKey {
    StatusKey {
        of,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// A parent reference as status repeats it (only the fields given).
fn parent_ref(p: &ParentReference) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_port_our_own_closing_listener_holds_is_pending() {
        let taken = |holder: &str| {
            NotOpened::from(ListenError::Taken {
                transport: Transport::Udp,
                port: 7000,
                holder: holder.into(),
            })
        };
        assert!(taken("forwarder relay (closing)").is_closing());
        assert!(!taken("forwarder relay").is_closing());
        let refused = NotOpened::Refused {
            refusal: "udp/7000 is held by the query port".into(),
        };
        assert!(!refused.is_closing());
        assert_eq!(refused.to_string(), "udp/7000 is held by the query port");
        assert_eq!(
            taken("forwarder relay").to_string(),
            "udp/7000 is already open for forwarder relay",
            "the data plane's words"
        );
    }
}

//! What an instance writes to the API server: its own entry of `status.instances` of each
//! `Forwarder` and `Route`, and the Service ports the forwarders manage.
//!
//! Both are server-side applies. Status uses a field manager per node, and `instances` is a
//! list-map keyed by `node`, so each instance owns exactly its entry and N DaemonSet pods never
//! overwrite each other. The Service ports use one field manager shared by every instance:
//! each applies the whole set it computes (the same set on every instance, from the same
//! objects), so a port removed from the set is released at once instead of lingering under
//! another instance's ownership, and ports other managers own (the operator's) are left alone.
//!
//! Gateway API objects have one status each, a fact about the fleet rather than one node: only
//! the holder of the status Lease ([`lease`]) writes it, aggregated from every instance's
//! facts ([`fleet`]). It is written as a merge patch that carries the `resourceVersion` it was
//! computed against (a concurrent writer is never overwritten unseen), keeps the route
//! `parents` entries of other controllers, moves a condition's `lastTransitionTime` only when
//! its status changes, and is not written at all when the object already says it.
//!
//! A reconciler hands what it wants written to [`Writer::run`] through a `watch` channel
//! ([`Wanted`]), so a slow API server never holds up a listener change. Every write's outcome
//! is counted (`udp_director_status_writes_total{kind,result}`, [`Counts`]), so an operator
//! sees writes failing without reading the logs.

pub mod events;
pub mod fleet;
pub mod lease;
pub mod service_ports;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::inventory::{Object, Snapshot};
use service_ports::{ServicePort, live_ports};

/// A custom resource whose status this proxy writes.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum StatusOf {
    /// `forwarders.udp-director.dev`: an entry per node.
    Forwarder,
    /// `routes.udp-director.dev`: an entry per node.
    Route,
    /// `gatewayclasses.gateway.networking.k8s.io` (cluster-scoped): the whole status.
    GatewayClass,
    /// `gateways.gateway.networking.k8s.io`: the whole status.
    Gateway,
    /// `udproutes.gateway.networking.k8s.io`: the whole status.
    UdpRoute,
    /// `tcproutes.gateway.networking.k8s.io`: the whole status.
    TcpRoute,
}

/// The field manager of Gateway API status, shared by every instance: the API has one status
/// per object, not one per node, and every instance computes it from the same objects.
pub const GATEWAY_STATUS_MANAGER: &str = "udp-director-gateway";

impl StatusOf {
    const ALL: [Self; 6] = [
        Self::Forwarder,
        Self::Route,
        Self::GatewayClass,
        Self::Gateway,
        Self::UdpRoute,
        Self::TcpRoute,
    ];

    /// The resource as the API server serves it.
    pub(crate) fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Self::Forwarder => ("udp-director.dev", "v1alpha1", "Forwarder", "forwarders"),
            Self::Route => ("udp-director.dev", "v1alpha1", "Route", "routes"),
            Self::GatewayClass => (
                crate::crd::gateway::GROUP,
                "v1",
                "GatewayClass",
                "gatewayclasses",
            ),
            Self::Gateway => (crate::crd::gateway::GROUP, "v1", "Gateway", "gateways"),
            Self::UdpRoute => (crate::crd::gateway::GROUP, "v1", "UDPRoute", "udproutes"),
            Self::TcpRoute => (crate::crd::gateway::GROUP, "v1", "TCPRoute", "tcproutes"),
        };
        // Routes at the version the inventory found served (v1, or v1alpha2).
        let version = crate::inventory::discovery::served_version(kind)
            .unwrap_or_else(|| version.to_string());
        ApiResource {
            group: group.into(),
            api_version: format!("{group}/{version}"),
            version,
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// Whether each instance writes its own entry of `status.instances` (else the whole
    /// status, under [`GATEWAY_STATUS_MANAGER`]).
    fn per_node(self) -> bool {
        matches!(self, Self::Forwarder | Self::Route)
    }

    /// The kind, as objects in the inventory name it.
    fn kind(self) -> &'static str {
        match self {
            Self::Forwarder => "Forwarder",
            Self::Route => "Route",
            Self::GatewayClass => "GatewayClass",
            Self::Gateway => "Gateway",
            Self::UdpRoute => "UDPRoute",
            Self::TcpRoute => "TCPRoute",
        }
    }
}

/// `udp_director_status_writes_total{kind,result}`: API calls that wrote a status (`kind` is
/// the object's) or a managed Service's ports (`kind="Service"`), by result: `written`, or
/// `failed` (refused, including a whole status computed against an older version, or not
/// answered).
pub type WriteCounts = Family<[(&'static str, &'static str); 2], Counter>;

/// The `kind` of a managed Service's ports in [`WriteCounts`].
const SERVICE_KIND: &str = "Service";

/// Where the status writers count what they do: the Events they record and the writes they
/// make. Clones count on the same series.
#[derive(Clone, Debug)]
pub struct Counts {
    /// `udp_director_events_total{reason,result}`.
    pub events: events::EventCounts,
    /// `udp_director_status_writes_total{kind,result}`.
    pub writes: WriteCounts,
    /// `udp_director_object_problems{kind,namespace,name,reason}`.
    pub problems: events::ProblemGauge,
}

impl Default for Counts {
    /// Every reason, kind and result at zero from the start (on a file inventory too, where
    /// nothing is written): a rate over them has a series before the first failure, and the
    /// alerts' metrics are in every scrape.
    fn default() -> Self {
        let counts = Self {
            events: events::EventCounts::default(),
            writes: WriteCounts::default(),
            problems: events::ProblemGauge::default(),
        };
        events::show_every_event(&counts.events);
        show_every_write(&counts.writes);
        counts
    }
}

/// Creates every kind and result of `counts` at zero, so a rate over them has a series before
/// the first failure.
fn show_every_write(counts: &WriteCounts) {
    let kinds = StatusOf::ALL.map(StatusOf::kind);
    for kind in kinds.iter().copied().chain([SERVICE_KIND]) {
        for result in ["written", "failed"] {
            let _ = counts.get_or_create(&[("kind", kind), ("result", result)]);
        }
    }
}

/// Counts one API call's outcome on `counts`.
fn count_write<T, E>(counts: &WriteCounts, kind: &'static str, result: &Result<T, E>) {
    let result = if result.is_ok() { "written" } else { "failed" };
    counts
        .get_or_create(&[("kind", kind), ("result", result)])
        .inc();
}

/// One object's status entry: which resource, namespace and name.
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct StatusKey {
    /// The resource.
    pub of: StatusOf,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What a reconciler wants the API server to say: its entry per object (with the object's
/// uid, so a re-created one is written anew) and, for forwarders, each managed Service's ports.
#[derive(Debug, Default, PartialEq)]
pub struct Wanted {
    /// This instance's `status.instances` entry (without `lastUpdateTime`) per object.
    pub statuses: BTreeMap<StatusKey, (String, Value)>,
    /// By Service name (in the writer's namespace).
    pub services: BTreeMap<String, Vec<ServicePort>>,
    /// What this instance finds wrong with each object now (recorded as Events).
    pub problems: events::Problems,
}

/// How often the writer looks again without a change (retries that came due).
const TICK: Duration = Duration::from_secs(1);
/// A failed write is retried after this long, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The field manager of the managed Service ports, shared by every instance.
pub const SERVICE_PORTS_MANAGER: &str = "udp-director-forwarders";

/// Hands `wanted` to a writer's channel, waking the writer only when it changed.
pub fn hand_over(tx: &watch::Sender<Arc<Wanted>>, wanted: Wanted) {
    tx.send_if_modified(|current| {
        let changed = **current != wanted;
        if changed {
            *current = Arc::new(wanted);
        }
        changed
    });
}

/// A reconciler's end of a status writer: the node it writes as, and where it hands over what
/// it wants written ([`hand_over`]).
#[derive(Debug)]
pub struct Writes {
    /// The node this instance writes as.
    pub node: String,
    /// What the reconciler wants written, read by the writer task.
    pub tx: watch::Sender<Arc<Wanted>>,
}

/// A writer's task, to be spawned.
pub type WriterTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Writes one instance's status entries and the managed Service ports.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    namespace: String,
    node: String,
    manager: String,
    /// The Gateway API controller name whose route `parents` entries are ours.
    controller: Option<String>,
    /// Whether this instance holds the status Lease, checked before every whole-object write
    /// (none: no Lease, this instance is the fleet).
    deadline: Option<lease::HoldDeadline>,
    /// Records the reconciler's problems as Events and shows them on the problems gauge
    /// (none: it does neither).
    events: Option<(events::Publisher, events::ProblemGauge)>,
    /// Counts every write's outcome (not registered: nobody reads them).
    writes: WriteCounts,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("namespace", &self.namespace)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// A writer as the instance on `node`; managed Services are in `namespace`.
    pub fn new(client: Client, namespace: String, node: String) -> Self {
        let manager = field_manager(&node);
        Self {
            client,
            namespace,
            node,
            manager,
            controller: None,
            deadline: None,
            events: None,
            writes: WriteCounts::default(),
        }
    }

    /// A writer that records the problems its reconciler hands over as Kubernetes Events and
    /// counts those and its writes on `counts`.
    pub fn recording(mut self, counts: Counts) -> Self {
        self.events = Some((
            events::Publisher::new(self.client.clone(), &self.node, counts.events),
            counts.problems,
        ));
        self.writes = counts.writes;
        self
    }

    /// A writer of Gateway API status as `controller`: route `parents` entries naming it are
    /// ours, the others are kept.
    pub fn for_gateway_controller(
        mut self,
        controller: String,
        deadline: Option<lease::HoldDeadline>,
    ) -> Self {
        self.controller = Some(controller);
        self.deadline = deadline;
        self
    }

    /// The node this instance writes as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sets the writer up, once for every reconciler: the handle its reconciler hands what it
    /// wants to, and the task that writes it ([`Self::run`]), for `lib.rs` to spawn.
    pub fn start(self, inventory: watch::Receiver<Arc<Snapshot>>) -> (Writes, WriterTask) {
        let (tx, rx) = watch::channel(Arc::new(Wanted::default()));
        let writes = Writes {
            node: self.node.clone(),
            tx,
        };
        (writes, Box::pin(self.run(rx, inventory)))
    }

    /// Writes what the reconciler wants, as it changes, until either channel closes: a status
    /// entry when it differs from the last one written (to this uid), a Service's ports when
    /// they differ from the last applied or the Service as watched lacks one (the Service was
    /// re-created, or an instance with an older view applied last). A failed write is retried
    /// with a back-off and logged once per distinct error. A pass runs only when what is wanted
    /// changed, the objects it writes to moved (Forwarders, Routes, Gateway API objects, status
    /// included, and Services: an entry may have gone missing there), or something is left to
    /// retry: a GameServer update costs a version comparison.
    pub async fn run(
        self,
        mut wanted: watch::Receiver<Arc<Wanted>>,
        mut inventory: watch::Receiver<Arc<Snapshot>>,
    ) {
        let mut written: HashMap<StatusKey, (String, Value)> = HashMap::new();
        let mut whole_written: HashMap<StatusKey, WholeStatus> = HashMap::new();
        let mut applied: HashMap<String, Vec<ServicePort>> = HashMap::new();
        let mut retries = Retries::default();
        // What the last pass wrote from, and whether a write was left for later (backing off,
        // refused as behind the cache, or the Lease not held just then).
        let mut passed: Option<(Arc<Wanted>, [u64; 2])> = None;
        let mut again = false;
        let mut gate = events::EventGate::new(Instant::now());
        let mut shown = events::ProblemsShown::default();
        loop {
            tokio::select! {
                r = wanted.changed() => if r.is_err() { return },
                r = inventory.changed() => if r.is_err() { return },
                () = tokio::time::sleep(TICK), if again => {}
            }
            let want = Arc::clone(&wanted.borrow_and_update());
            let snapshot = Arc::clone(&inventory.borrow_and_update());
            // Any change to the objects written to, their status included (an entry may have
            // gone missing, a whole status is computed against the object as it is now), and
            // the Services whose ports are applied.
            let read = [snapshot.versions.statuses, snapshot.versions.services];
            let same = passed
                .as_ref()
                .is_some_and(|(w, r)| Arc::ptr_eq(w, &want) && *r == read);
            if same && !again {
                continue;
            }
            passed = Some((Arc::clone(&want), read));
            again = false;
            written.retain(|k, _| want.statuses.contains_key(k));
            whole_written.retain(|k, _| want.statuses.contains_key(k));
            let gateway_objects: HashMap<(&str, &str, &str), &Object> = snapshot
                .gateway_api
                .iter()
                .map(|o| {
                    (
                        (o.kind.as_str(), o.namespace.as_str(), o.name.as_str()),
                        &**o,
                    )
                })
                .collect();
            // The objects of per-node entries, found by name in one look-up each.
            let instance_objects: HashMap<(bool, &str, &str), &Object> = snapshot
                .forwarders
                .iter()
                .map(|o| (true, o))
                .chain(snapshot.routes.iter().map(|o| (false, o)))
                .map(|(forwarder, o)| ((forwarder, o.namespace.as_str(), o.name.as_str()), &**o))
                .collect();
            for (target, entry) in &want.statuses {
                let key = || format!("{:?} {}/{}", target.of, target.namespace, target.name);
                if !target.of.per_node() {
                    let current = gateway_objects.get(&(
                        target.of.kind(),
                        target.namespace.as_str(),
                        target.name.as_str(),
                    ));
                    // Not in the cache (yet): nothing to compute against.
                    let Some(current) = current else { continue };
                    let Some(whole) = self.whole_status(target.of, &entry.1, current) else {
                        continue;
                    };
                    if whole_written.get(target) == Some(&whole) {
                        continue;
                    }
                    let key = key();
                    if !retries.due(&key) {
                        again = true;
                        continue;
                    }
                    // A holder that lost the Lease (or cannot renew it) writes nothing more.
                    if self.deadline.as_ref().is_some_and(|d| !d.holding()) {
                        again = true;
                        break;
                    }
                    let result = self.write_whole(target, &whole).await;
                    count_write(&self.writes, target.of.kind(), &result);
                    match result {
                        // The cache was behind: computed again from the next one, no back-off.
                        Err(kube::Error::Api(e)) if e.code == 409 => again = true,
                        result => {
                            if retries.settle(&key, result, "status not written") {
                                whole_written.insert(target.clone(), whole);
                            } else {
                                again = true;
                            }
                        }
                    }
                    continue;
                }
                // Written, and the object as watched still has it (a holder may have taken it
                // for a departed node's, or the object was re-created).
                let present = || {
                    let forwarder = target.of == StatusOf::Forwarder;
                    instance_objects
                        .get(&(forwarder, target.namespace.as_str(), target.name.as_str()))
                        .is_none_or(|o| has_entry_of(o, &self.node))
                };
                if written.get(target) == Some(entry) && present() {
                    continue;
                }
                let key = key();
                if !retries.due(&key) {
                    again = true;
                    continue;
                }
                let result = self.write_instance(target, &entry.1).await;
                count_write(&self.writes, target.of.kind(), &result);
                if retries.settle(&key, result, "status not written") {
                    written.insert(target.clone(), entry.clone());
                } else {
                    again = true;
                }
            }
            for (service, ports) in &want.services {
                let key = format!("Service {}/{service}", self.namespace);
                let live = live_ports(&snapshot.services, &self.namespace, service);
                let missing = live.is_some_and(|live| ports.iter().any(|p| !live.contains(p)));
                if applied.get(service) == Some(ports) && !missing {
                    continue;
                }
                if !retries.due(&key) {
                    again = true;
                    continue;
                }
                let result = self.apply_service_ports(service, ports).await;
                count_write(&self.writes, SERVICE_KIND, &result);
                if retries.settle(&key, result, "forwarder ports not written") {
                    log::info!("{key}: {} forwarder port(s)", ports.len());
                    applied.insert(service.clone(), ports.clone());
                } else {
                    again = true;
                }
            }
            if let Some((publisher, gauge)) = &self.events {
                shown.show(gauge, &want.problems);
                for due in gate.observe(Instant::now(), &want.problems) {
                    publisher.publish(&due).await;
                }
                // A problem held back by the rate limit is looked at again on the next tick.
                again |= gate.holding_back();
            }
        }
    }

    /// What a whole-object status should become, computed against `current` as the cache
    /// holds it: route `parents` merged with other controllers' entries, unchanged conditions
    /// keeping their `lastTransitionTime`. `None` when `current` already says it all.
    fn whole_status(&self, of: StatusOf, wanted: &Value, current: &Object) -> Option<WholeStatus> {
        let have = current
            .raw
            .get("status")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let mut status = match (of, &self.controller) {
            (StatusOf::UdpRoute | StatusOf::TcpRoute, Some(controller)) => {
                let ours = wanted
                    .get("parents")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                json!({"parents": fleet::merge_parents(have.get("parents"), ours, controller)})
            }
            _ => wanted.clone(),
        };
        fleet::carry_transition_times(&mut status, &have);
        let said = status
            .as_object()
            .is_some_and(|fields| fields.iter().all(|(k, v)| have.get(k) == Some(v)));
        if said && !fleet::has_unstamped(&status) {
            return None;
        }
        let version = current
            .raw
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Some(WholeStatus { version, status })
    }

    /// Writes a whole-object status as computed by [`Self::whole_status`]: a merge patch of
    /// the status subresource, refused (409) if the object changed since.
    async fn write_whole(&self, key: &StatusKey, whole: &WholeStatus) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut status = whole.status.clone();
        stamp_conditions(&mut status, &now);
        let patch = json!({
            "metadata": {"resourceVersion": whole.version},
            "status": status,
        });
        let resource = key.of.resource();
        let api: Api<DynamicObject> = if key.namespace.is_empty() {
            Api::all_with(self.client.clone(), &resource)
        } else {
            Api::namespaced_with(self.client.clone(), &key.namespace, &resource)
        };
        let params = PatchParams {
            field_manager: Some(GATEWAY_STATUS_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch_status(&key.name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Applies this instance's entry of `status.instances` of `key` (a Forwarder or Route),
    /// stamped with `lastUpdateTime`.
    pub async fn write_instance(&self, key: &StatusKey, value: &Value) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut value = value.clone();
        let resource = key.of.resource();
        if let Some(map) = value.as_object_mut() {
            map.insert("lastUpdateTime".into(), Value::from(now));
        }
        let (status, manager) = (json!({"instances": [value]}), self.manager.as_str());
        let mut metadata = json!({"name": key.name});
        if !key.namespace.is_empty() {
            metadata["namespace"] = Value::from(key.namespace.clone());
        }
        let patch = json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": metadata,
            "status": status,
        });
        let api: Api<DynamicObject> = if key.namespace.is_empty() {
            Api::all_with(self.client.clone(), &resource)
        } else {
            Api::namespaced_with(self.client.clone(), &key.namespace, &resource)
        };
        // Forced: what this manager writes is its own, whoever wrote it last (an earlier pod).
        api.patch_status(
            &key.name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
    }

    /// Applies the forwarder ports of Service `service`: exactly `ports` under the shared
    /// manager. The Service must exist (the operator creates it, with its type and selector).
    pub async fn apply_service_ports(
        &self,
        service: &str,
        ports: &[ServicePort],
    ) -> Result<(), kube::Error> {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "port": p.port,
                    "targetPort": p.port,
                    "protocol": p.protocol.as_str().to_ascii_uppercase(),
                })
            })
            .collect();
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": self.namespace},
            "spec": {"ports": ports},
        });
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch(
            service,
            &PatchParams::apply(SERVICE_PORTS_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
        .map(drop)
    }
}

/// Whether `object`'s `status.instances` has an entry of `node`.
fn has_entry_of(object: &Object, node: &str) -> bool {
    object
        .raw
        .pointer("/status/instances")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|e| e.get("node").and_then(Value::as_str) == Some(node))
        })
}

/// A whole-object status to write, and the `resourceVersion` it was computed against.
#[derive(Clone, Debug, PartialEq)]
struct WholeStatus {
    version: String,
    status: Value,
}

/// Sets every empty `lastTransitionTime` under `value` to `now`.
fn stamp_conditions(value: &mut Value, now: &str) {
    match value {
        Value::Object(map) => {
            if map.get("lastTransitionTime").and_then(Value::as_str) == Some("") {
                map.insert("lastTransitionTime".into(), Value::from(now));
            }
            for v in map.values_mut() {
                stamp_conditions(v, now);
            }
        }
        Value::Array(items) => {
            for v in items {
                stamp_conditions(v, now);
            }
        }
        _ => {}
    }
}

/// Back-off per write target, and the last error logged for each.
#[derive(Debug, Default)]
struct Retries {
    next: HashMap<String, (Instant, Duration)>,
    logged: HashMap<String, String>,
}

impl Retries {
    fn due(&self, key: &str) -> bool {
        self.next
            .get(key)
            .is_none_or(|(at, _)| *at <= Instant::now())
    }

    /// Records a write's outcome; true when it succeeded.
    fn settle(&mut self, key: &str, result: Result<(), kube::Error>, what: &str) -> bool {
        match result {
            Ok(()) => {
                self.next.remove(key);
                if self.logged.remove(key).is_some() {
                    log::info!("{key}: written again");
                }
                true
            }
            Err(e) => {
                let wait = self
                    .next
                    .get(key)
                    .map_or(RETRY_MIN, |(_, w)| (*w * 2).min(RETRY_MAX));
                self.next
                    .insert(key.to_string(), (Instant::now() + wait, wait));
                let e = describe(&e);
                if self.logged.get(key) != Some(&e) {
                    log::warn!(
                        "{key}: {what} (retried, backing off up to {} s): {e}",
                        RETRY_MAX.as_secs()
                    );
                    self.logged.insert(key.to_string(), e);
                }
                false
            }
        }
    }
}

/// An API error in one line: the server's own message for a refused request (not the whole
/// `Status` object), the error otherwise.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// The status field manager of the instance on `node` (at most 128 characters).
pub fn field_manager(node: &str) -> String {
    format!("udp-director/{node}").chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn scrape(counts: &WriteCounts) -> Vec<String> {
        let mut registry = Registry::default();
        registry.register("udp_director_status_writes", "help", counts.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn every_kind_and_result_shows_at_zero_before_the_first_write() {
        let counts = WriteCounts::default();
        show_every_write(&counts);
        let lines = scrape(&counts);
        assert_eq!(lines.len(), 14, "{lines:?}");
        for kind in [
            "Forwarder",
            "Route",
            "Gateway",
            "GatewayClass",
            "UDPRoute",
            "TCPRoute",
            "Service",
        ] {
            for result in ["written", "failed"] {
                let line = format!(
                    "udp_director_status_writes_total{{kind=\"{kind}\",result=\"{result}\"}} 0"
                );
                assert!(lines.contains(&line), "{line} not in {lines:?}");
            }
        }
    }

    #[test]
    fn the_counts_show_every_event_and_write_at_zero() {
        let counts = Counts::default();
        assert_eq!(scrape(&counts.writes).len(), 14);
        let mut registry = Registry::default();
        registry.register("udp_director_events", "help", counts.events.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let events: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(events.len(), 10, "{events:?}");
        assert!(
            events.contains(
                &"udp_director_events_total{reason=\"PortConflict\",result=\"failed\"} 0"
            )
        );
    }

    #[test]
    fn each_api_call_is_counted_once_by_its_outcome() {
        let counts = WriteCounts::default();
        show_every_write(&counts);
        let refused: Result<(), kube::Error> = Err(kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        ));
        count_write(&counts, StatusOf::Gateway.kind(), &refused);
        count_write(&counts, StatusOf::Gateway.kind(), &refused);
        count_write(
            &counts,
            StatusOf::Gateway.kind(),
            &Ok::<(), kube::Error>(()),
        );
        count_write(&counts, SERVICE_KIND, &Ok::<(), kube::Error>(()));
        let lines = scrape(&counts);
        let value = |kind: &str, result: &str| {
            let head =
                format!("udp_director_status_writes_total{{kind=\"{kind}\",result=\"{result}\"}} ");
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&head))
                .unwrap_or_else(|| panic!("no {head} in {lines:?}"))
                .to_owned()
        };
        assert_eq!(value("Gateway", "failed"), "2");
        assert_eq!(value("Gateway", "written"), "1");
        assert_eq!(value("Service", "written"), "1");
        assert_eq!(value("Service", "failed"), "0");
        assert_eq!(value("Forwarder", "failed"), "0");
        assert_eq!(lines.len(), 14, "no other series: {lines:?}");
    }
}

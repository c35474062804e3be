//! The Kubernetes inventory: one kube-rs watcher per watched resource type and namespace, each
//! feeding a local cache, so a query never waits on the API server.
//!
//! What is watched follows from the config ([`plan`]): every resource type of
//! `resourceQueryMapping` (narrowed by `inventory.labelSelector`), and, when a mapping is
//! service-based, the Services carrying its selector label and the EndpointSlices of Services.
//! The same plan gives the RBAC rules the proxy needs ([`cluster_role`]), so the shipped
//! ClusterRole and the watches cannot drift apart.
//!
//! Each watch runs as its own task. It replaces its cache only when a (re-)list completes, so a
//! half-finished list never shows; on any error it reports the cache stale, backs off
//! (0.5 s doubling to 30 s) and re-lists. A re-list, rather than resuming the watch from its
//! resourceVersion, is what makes "stale" end at a known point: the cache is again exactly the
//! server's state. Until then queries are answered from the last state.
//!
//! An object a watch delivers that cannot be read (no name, a name or label past Kubernetes'
//! limits, which an API server enforces but a proxy does not take on trust) is skipped, logged
//! and counted by the watch's kind ([`Rejections`]); it never fails the watch.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    ENDPOINT_SLICE_API_VERSION, InventoryError, InventorySource, Object, Rejections,
    SERVICE_API_VERSION, SERVICE_NAME_LABEL, Snapshot, names, sort_by_name,
};
use crate::config::{Config, InventoryConfig, Locator, Mapping};

/// Events arriving within this window after a first one are folded into one snapshot, so a
/// fleet scaling by a hundred servers rebuilds the snapshot once, not a hundred times.
const COALESCE: Duration = Duration::from_millis(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What a watched resource type is used for.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Feed {
    /// A resource type of `resourceQueryMapping`.
    Mapped,
    /// Services, for service-based mappings.
    Services,
    /// EndpointSlices, for service-based mappings to headless Services.
    EndpointSlices,
    /// `Forwarder` objects.
    Forwarders,
    /// `Route` objects.
    Routes,
    /// Gateway API objects.
    Gateway,
}

/// Where a resource type is watched.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Scope {
    /// In `inventory.watchNamespaces` (the whole cluster when empty).
    Inventory,
    /// In the whole cluster (Services and EndpointSlices a forwarder's target may name).
    Cluster,
    /// In one namespace (the forwarders').
    Namespace(String),
}

/// One resource type to watch.
#[derive(Clone, Debug)]
pub struct WatchPlan {
    /// Group, version, kind and plural.
    pub resource: ApiResource,
    /// Server-side label selector.
    pub label_selector: Option<String>,
    /// What the objects are for.
    pub feed: Feed,
    /// Which namespaces.
    pub scope: Scope,
}

impl WatchPlan {
    /// `plural.group`, or `plural` for the core group: the name RBAC and metrics use.
    pub fn name(&self) -> String {
        if self.resource.group.is_empty() {
            self.resource.plural.clone()
        } else {
            format!("{}.{}", self.resource.plural, self.resource.group)
        }
    }
}

/// The resource types a config needs watched.
pub fn plan(config: &Config) -> Vec<WatchPlan> {
    let label_selector = match &config.inventory {
        InventoryConfig::Kubernetes { label_selector, .. } => label_selector.clone(),
        InventoryConfig::File { .. } => None,
    };
    let mut plans: Vec<WatchPlan> = Vec::new();
    for mapping in config.mappings.values() {
        let resource = mapped_resource(mapping);
        if !plans.iter().any(|p| same_type(&p.resource, &resource)) {
            plans.push(WatchPlan {
                resource,
                label_selector: label_selector.clone(),
                feed: Feed::Mapped,
                scope: Scope::Inventory,
            });
        }
    }
    let mut service_labels: Vec<&str> = config
        .mappings
        .values()
        .filter_map(|m| match &m.locator {
            Locator::Service { selector_label, .. } => Some(selector_label.as_str()),
            Locator::Direct { .. } => None,
        })
        .collect();
    service_labels.sort_unstable();
    service_labels.dedup();
    let services = || core_resource(SERVICE_API_VERSION, "Service", "services");
    let slices = || {
        core_resource(
            ENDPOINT_SLICE_API_VERSION,
            "EndpointSlice",
            "endpointslices",
        )
    };
    if !config.entry_points.is_empty() {
        plans.push(WatchPlan {
            resource: udp_director_resource("Route", "routes"),
            label_selector: None,
            feed: Feed::Routes,
            scope: Scope::Inventory,
        });
    }
    if config.gateway_controller.is_some() {
        let gateway = |version: &str, kind: &str, plural: &str| ApiResource {
            group: crate::crd::gateway::GROUP.into(),
            version: version.into(),
            api_version: format!("{}/{version}", crate::crd::gateway::GROUP),
            kind: kind.into(),
            plural: plural.into(),
        };
        plans.push(WatchPlan {
            resource: gateway("v1", "GatewayClass", "gatewayclasses"),
            label_selector: None,
            feed: Feed::Gateway,
            scope: Scope::Cluster,
        });
        for (version, kind, plural) in [
            ("v1", "Gateway", "gateways"),
            ("v1", "UDPRoute", "udproutes"),
            ("v1", "TCPRoute", "tcproutes"),
        ] {
            plans.push(WatchPlan {
                resource: gateway(version, kind, plural),
                label_selector: None,
                feed: Feed::Gateway,
                scope: Scope::Inventory,
            });
        }
        // A grant lives where the backends are, which may be outside watchNamespaces.
        plans.push(WatchPlan {
            resource: gateway("v1beta1", "ReferenceGrant", "referencegrants"),
            label_selector: None,
            feed: Feed::Gateway,
            scope: Scope::Cluster,
        });
    }
    if config.forwarders.is_some()
        || !config.entry_points.is_empty()
        || config.gateway_controller.is_some()
    {
        // A forwarder's `<service>.<namespace>.svc` target, or a route's backend, may name
        // any Service, so every Service and EndpointSlice is watched (which also covers
        // service-based mappings).
        plans.push(WatchPlan {
            resource: services(),
            label_selector: None,
            feed: Feed::Services,
            scope: Scope::Cluster,
        });
        plans.push(WatchPlan {
            resource: slices(),
            label_selector: Some(SERVICE_NAME_LABEL.to_string()),
            feed: Feed::EndpointSlices,
            scope: Scope::Cluster,
        });
        if let Some(forwarders) = &config.forwarders {
            plans.push(WatchPlan {
                resource: forwarder_resource(),
                label_selector: None,
                feed: Feed::Forwarders,
                scope: Scope::Namespace(forwarders.namespace.clone()),
            });
        }
        return plans;
    }
    for label in &service_labels {
        // An existence selector: only the Services a mapping can point at are cached.
        plans.push(WatchPlan {
            resource: services(),
            label_selector: Some((*label).to_string()),
            feed: Feed::Services,
            scope: Scope::Inventory,
        });
    }
    if !service_labels.is_empty() {
        plans.push(WatchPlan {
            resource: slices(),
            label_selector: Some(SERVICE_NAME_LABEL.to_string()),
            feed: Feed::EndpointSlices,
            scope: Scope::Inventory,
        });
    }
    plans
}

fn forwarder_resource() -> ApiResource {
    udp_director_resource(crate::forwarder::KIND, "forwarders")
}

fn udp_director_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "udp-director.dev".into(),
        version: "v1alpha1".into(),
        api_version: "udp-director.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn mapped_resource(mapping: &Mapping) -> ApiResource {
    ApiResource {
        group: mapping.group.clone(),
        version: mapping.version.clone(),
        api_version: mapping.api_version(),
        // The kind only labels cached objects (and keys backend ids), so it must be the same
        // for every event; the resource name stands in when the config gives none.
        kind: mapping
            .kind
            .clone()
            .unwrap_or_else(|| mapping.resource.clone()),
        plural: mapping.resource.clone(),
    }
}

fn core_resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        plural: plural.to_string(),
    }
}

fn same_type(a: &ApiResource, b: &ApiResource) -> bool {
    a.group == b.group && a.version == b.version && a.plural == b.plural
}

/// A least-privilege ClusterRole for a config: `list` and `watch` (all a watcher does) on each
/// watched resource type, nothing else.
pub fn cluster_role(config: &Config, name: &str) -> String {
    let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let plans = plan(config);
    // Namespaced watches are granted by the forwarders' Role ([`forwarders_role`]).
    for p in plans
        .iter()
        .filter(|p| !matches!(p.scope, Scope::Namespace(_)))
    {
        let resources = by_group.entry(p.resource.group.as_str()).or_default();
        if !resources.contains(&p.resource.plural.as_str()) {
            resources.push(&p.resource.plural);
        }
    }
    let mut out = format!(
        "# Generated by `udp-director rbac`: list and watch on exactly what the config watches\n\
         # (and, with sessionsApi.auth: kubernetes, create on token and access reviews; with\n\
         # entryPoints, patch on routes/status).\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules:"
    );
    let reviews = config.sessions_api == crate::config::SessionsApiAuth::Kubernetes;
    // `rules:` then a list, or `rules: []` on its line when nothing is granted.
    out.push_str(if by_group.is_empty() && !reviews {
        " []\n"
    } else {
        "\n"
    });
    for (group, mut resources) in by_group {
        resources.sort_unstable();
        let _ = write!(
            out,
            "- apiGroups: [\"{group}\"]\n  resources: [{}]\n  verbs: [list, watch]\n",
            resources.join(", ")
        );
    }
    if config.gateway_controller.is_some() {
        // The status the Gateway API defines, for the classes, Gateways and routes served.
        out.push_str(
            "- apiGroups: [\"gateway.networking.k8s.io\"]\n  resources: [gatewayclasses/status, gateways/status, tcproutes/status, udproutes/status]\n  verbs: [patch]\n",
        );
    }
    if !config.entry_points.is_empty() {
        // Each instance writes its own entry of a route's status.
        out.push_str(
            "- apiGroups: [\"udp-director.dev\"]\n  resources: [routes/status]\n  verbs: [patch]\n",
        );
    }
    if reviews {
        // `sessionsApi.auth: kubernetes`: who a remote caller is, and whether it may.
        out.push_str(
            "- apiGroups: [\"authentication.k8s.io\"]\n  resources: [tokenreviews]\n  verbs: [create]\n\
             - apiGroups: [\"authorization.k8s.io\"]\n  resources: [subjectaccessreviews]\n  verbs: [create]\n",
        );
    }
    out
}

/// The Role the forwarders need in their namespace (empty without `forwarders`): `list` and
/// `watch` on the namespaced watches of [`plan`], `patch` on `forwarders/status` (each instance
/// writes its own entry), and `get`/`patch` on the named Services of `servicePorts` only.
pub fn forwarders_role(config: &Config, name: &str) -> String {
    let Some(forwarders) = &config.forwarders else {
        return String::new();
    };
    let mut out = format!(
        "---\n# Generated by `udp-director rbac`: what the forwarders need in their namespace.\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}-forwarders\n  \
         namespace: {}\nrules:\n",
        forwarders.namespace
    );
    for p in plan(config) {
        if matches!(p.scope, Scope::Namespace(_)) {
            let _ = write!(
                out,
                "- apiGroups: [\"{}\"]\n  resources: [{}]\n  verbs: [list, watch]\n",
                p.resource.group, p.resource.plural
            );
        }
    }
    let _ = write!(
        out,
        "- apiGroups: [\"{}\"]\n  resources: [forwarders/status]\n  verbs: [patch]\n",
        forwarder_resource().group
    );
    let mut services: Vec<&str> = [&forwarders.udp_service, &forwarders.tcp_service]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    services.sort_unstable();
    services.dedup();
    if !services.is_empty() {
        let _ = write!(
            out,
            "- apiGroups: [\"\"]\n  resources: [services]\n  resourceNames: [{}]\n  verbs: [get, patch]\n",
            services.join(", ")
        );
    }
    out
}

/// What a watch task reports.
#[derive(Debug)]
enum Change {
    /// A (re-)list completed: the whole current set.
    Listed(Vec<Arc<Object>>),
    /// Created or modified.
    Applied(Arc<Object>),
    /// Deleted (namespace, name).
    Deleted(String, String),
    /// The watch failed; it re-lists after a back-off.
    Failed(String),
}

/// One watch: a resource type in one namespace (or the whole cluster) and its cache.
#[derive(Debug)]
struct Watch {
    plan: usize,
    namespace: Option<String>,
    objects: BTreeMap<(String, String), Arc<Object>>,
    listed: bool,
    stale: bool,
}

impl Watch {
    fn describe(&self, plans: &[WatchPlan]) -> String {
        let name = plans[self.plan].name();
        match &self.namespace {
            Some(ns) => format!("{name} in {ns}"),
            None => name,
        }
    }
}

/// The Kubernetes inventory source.
pub struct KubeSource {
    client: Client,
    plans: Vec<WatchPlan>,
    /// Each mapping's name and the plan that watches its resource type, found once.
    mapping_plans: Vec<(String, usize)>,
    watches: Vec<Watch>,
    started: bool,
    tx: mpsc::UnboundedSender<(usize, Change)>,
    rx: mpsc::UnboundedReceiver<(usize, Change)>,
    /// Objects skipped, counted by kind.
    rejections: Rejections,
}

impl std::fmt::Debug for KubeSource {
    // `kube::Client` is not `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("plans", &self.plans)
            .field("watches", &self.watches)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source for `config`'s mappings; the watches start on the first [`InventorySource::next`].
    /// Objects skipped are counted on `rejections`.
    pub fn new(client: Client, config: &Config, rejections: Rejections) -> Self {
        let plans = plan(config);
        let inventory_namespaces: Vec<Option<String>> = match &config.inventory {
            InventoryConfig::Kubernetes { namespaces, .. } if !namespaces.is_empty() => {
                namespaces.iter().cloned().map(Some).collect()
            }
            _ => vec![None],
        };
        let watches = plans
            .iter()
            .enumerate()
            .flat_map(|(plan, p)| {
                let namespaces = match &p.scope {
                    Scope::Inventory => inventory_namespaces.clone(),
                    Scope::Cluster => vec![None],
                    Scope::Namespace(ns) => vec![Some(ns.clone())],
                };
                namespaces.into_iter().map(move |namespace| Watch {
                    plan,
                    namespace,
                    objects: BTreeMap::new(),
                    listed: false,
                    stale: false,
                })
            })
            .collect();
        let mapping_plans = config
            .mappings
            .iter()
            .map(|(name, mapping)| {
                let resource = mapped_resource(mapping);
                let plan = plans
                    .iter()
                    .position(|p| p.feed == Feed::Mapped && same_type(&p.resource, &resource))
                    .expect("plan() covers every mapping");
                (name.clone(), plan)
            })
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            client,
            plans,
            mapping_plans,
            watches,
            started: false,
            tx,
            rx,
            rejections,
        }
    }

    fn start(&mut self) {
        for (id, watch) in self.watches.iter().enumerate() {
            let plan = &self.plans[watch.plan];
            let mut config = watcher::Config::default();
            if let Some(selector) = &plan.label_selector {
                config = config.labels(selector);
            }
            let (client, namespace, tx, rejections) = (
                self.client.clone(),
                watch.namespace.clone(),
                self.tx.clone(),
                self.rejections.clone(),
            );
            let mut resource = plan.resource.clone();
            // UDPRoute and TCPRoute are served at v1 or, from the Gateway API's experimental
            // channel, at v1alpha2: watch the version this API server serves.
            let discover = plan.feed == Feed::Gateway
                && matches!(resource.kind.as_str(), "UDPRoute" | "TCPRoute");
            tokio::spawn(async move {
                if discover {
                    resource = crate::gateway::served(&client, resource).await;
                }
                let api: Api<DynamicObject> = match &namespace {
                    Some(ns) => Api::namespaced_with(client, ns, &resource),
                    None => Api::all_with(client, &resource),
                };
                run_watch(api, config, resource, id, tx, rejections).await;
            });
        }
        self.started = true;
    }

    /// Applies one report; true when the snapshot changes.
    fn apply(&mut self, id: usize, change: Change) -> bool {
        let plans = &self.plans;
        let watch = &mut self.watches[id];
        match change {
            Change::Listed(objects) => {
                let what = watch.describe(plans);
                if watch.stale {
                    log::info!(
                        "inventory: {what} re-listed ({} objects), fresh again",
                        objects.len()
                    );
                } else {
                    log::info!("inventory: {what} listed ({} objects)", objects.len());
                }
                watch.objects = objects
                    .into_iter()
                    .map(|o| ((o.namespace.clone(), o.name.clone()), o))
                    .collect();
                watch.listed = true;
                watch.stale = false;
            }
            Change::Applied(object) => {
                let key = (object.namespace.clone(), object.name.clone());
                watch.objects.insert(key, object);
            }
            Change::Deleted(namespace, name) => {
                watch.objects.remove(&(namespace, name));
            }
            Change::Failed(error) => {
                // Logged every time: the back-off bounds the rate, and a persistent error (a
                // missing RBAC permission, an unknown resource type) must stay visible.
                let what = watch.describe(plans);
                log::warn!(
                    "inventory: watch of {what} failed, {}: {error}",
                    if watch.listed {
                        "serving the last state until a re-list succeeds"
                    } else {
                        "not ready until it lists"
                    }
                );
                if watch.stale {
                    return false;
                }
                watch.stale = true;
            }
        }
        true
    }

    fn snapshot(&self) -> Snapshot {
        // The objects of every watch (all namespaces) of the plans `wanted` picks, in name order.
        let objects_of = |wanted: &dyn Fn(usize) -> bool| -> Vec<Arc<Object>> {
            let mut list: Vec<Arc<Object>> = self
                .watches
                .iter()
                .filter(|w| wanted(w.plan))
                .flat_map(|w| w.objects.values().cloned())
                .collect();
            sort_by_name(&mut list);
            list
        };
        let of_feed = |feed: Feed| objects_of(&|plan| self.plans[plan].feed == feed);
        let by_mapping = self
            .mapping_plans
            .iter()
            .map(|(name, plan)| (name.clone(), objects_of(&|p| p == *plan)))
            .collect();
        // One entry per resource name: two Service watches (two selector labels) are one
        // metric series.
        let mut watches: Vec<(String, bool)> = Vec::new();
        for w in &self.watches {
            let name = self.plans[w.plan].name();
            match watches.iter_mut().find(|(n, _)| *n == name) {
                Some((_, stale)) => *stale |= w.stale,
                None => watches.push((name, w.stale)),
            }
        }
        // Whether every watch of the feeds `wanted` picks has listed.
        let listed = |wanted: &dyn Fn(Feed) -> bool| {
            self.watches
                .iter()
                .filter(|w| wanted(self.plans[w.plan].feed))
                .all(|w| w.listed)
        };
        Snapshot {
            loaded: listed(&|f| !matches!(f, Feed::Forwarders | Feed::Routes | Feed::Gateway)),
            forwarders_loaded: listed(&|f| !matches!(f, Feed::Routes | Feed::Gateway)),
            routes_loaded: listed(&|f| !matches!(f, Feed::Forwarders | Feed::Gateway)),
            gateway_loaded: listed(&|f| !matches!(f, Feed::Forwarders | Feed::Routes)),
            by_mapping,
            services: of_feed(Feed::Services),
            endpoint_slices: of_feed(Feed::EndpointSlices),
            forwarders: of_feed(Feed::Forwarders),
            routes: of_feed(Feed::Routes),
            gateway_api: of_feed(Feed::Gateway),
            watches,
            // Set by `inventory::run`, against the snapshot before.
            versions: super::Versions::default(),
        }
    }
}

impl InventorySource for KubeSource {
    fn describe(&self) -> String {
        let names: Vec<String> = self.plans.iter().map(WatchPlan::name).collect();
        format!("Kubernetes watches of {}", names.join(", "))
    }

    async fn next(&mut self) -> Result<Snapshot, InventoryError> {
        if !self.started {
            self.start();
        }
        loop {
            // The source holds a sender itself, so the channel never closes.
            let Some((id, change)) = self.rx.recv().await else {
                continue;
            };
            let mut changed = self.apply(id, change);
            tokio::time::sleep(COALESCE).await;
            while let Ok((id, change)) = self.rx.try_recv() {
                changed |= self.apply(id, change);
            }
            if changed {
                return Ok(self.snapshot());
            }
        }
    }
}

/// Runs one watch for ever: reports every change, and on an error reports it, backs off and
/// re-lists. Objects that cannot be read are skipped and counted. Ends when the source is gone.
async fn run_watch(
    api: Api<DynamicObject>,
    config: watcher::Config,
    resource: ApiResource,
    id: usize,
    tx: mpsc::UnboundedSender<(usize, Change)>,
    rejections: Rejections,
) {
    let mut delay = BACKOFF_MIN;
    loop {
        let mut stream = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
        let mut listing = Vec::new();
        let error = loop {
            let change = match stream.next().await {
                Some(Ok(Event::Init)) => {
                    listing.clear();
                    continue;
                }
                Some(Ok(Event::InitApply(o))) => {
                    listing.extend(to_object(o, &resource, &rejections));
                    continue;
                }
                Some(Ok(Event::InitDone)) => {
                    delay = BACKOFF_MIN;
                    Change::Listed(std::mem::take(&mut listing))
                }
                Some(Ok(Event::Apply(o))) => match to_object(o, &resource, &rejections) {
                    Some(o) => Change::Applied(o),
                    None => continue,
                },
                Some(Ok(Event::Delete(o))) => Change::Deleted(
                    o.metadata.namespace.unwrap_or_default(),
                    o.metadata.name.unwrap_or_default(),
                ),
                Some(Err(e)) => break e.to_string(),
                None => break "the watch stream ended".to_string(),
            };
            if tx.send((id, change)).is_err() {
                return;
            }
        };
        if tx.send((id, Change::Failed(error))).is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// A watched object as the inventory keeps it. `apiVersion` and `kind` come from the watch (list
/// items of built-in types carry neither), and `managedFields`, often the largest part of an
/// object and never queried, is dropped to keep the cache small. `None`, counted on
/// `rejections` under the watch's kind, when the object cannot be read or breaks Kubernetes'
/// limits on names and labels.
fn to_object(
    object: DynamicObject,
    resource: &ApiResource,
    rejections: &Rejections,
) -> Option<Arc<Object>> {
    let skip = |why: &dyn std::fmt::Display| {
        log::warn!("inventory: a {} skipped: {why}", resource.kind);
        rejections.count_object(&resource.kind);
        None
    };
    let mut raw = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return skip(&format_args!("it could not be read: {e}")),
    };
    let Some(map) = raw.as_object_mut() else {
        return skip(&"not an object");
    };
    map.insert(
        "apiVersion".into(),
        Value::from(resource.api_version.clone()),
    );
    map.insert("kind".into(), Value::from(resource.kind.clone()));
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let object = match Object::from_value(raw) {
        Ok(o) => o,
        Err(e) => return skip(&e),
    };
    if let Err(e) = names::check_metadata(&object.name, &object.namespace, &object.labels) {
        return skip(&e);
    }
    Some(Arc::new(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap()
    }

    const MAPPINGS: &str = r#"
dataPorts: [{name: game, port: 7777}]
inventory: {kind: kubernetes, watchNamespaces: [a, b], labelSelector: "fleet=x"}
resourceQueryMapping:
  gs: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.address, portName: game}
  gs-pod-ip: {group: agones.dev, version: v1, resource: gameservers, addressPath: status.addresses, addressType: PodIP, portName: game}
  pod: {group: "", version: v1, resource: pods, addressPath: status.podIP, portName: game}
  svc: {group: agones.dev, version: v1, resource: gameservers, serviceSelectorLabel: gs, serviceTargetPortName: game}
"#;

    #[test]
    fn one_watch_per_resource_type_plus_services_and_slices() {
        let plans = plan(&config(MAPPINGS));
        let names: Vec<(String, Option<String>)> = plans
            .iter()
            .map(|p| (p.name(), p.label_selector.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("gameservers.agones.dev".into(), Some("fleet=x".into())),
                ("pods".into(), Some("fleet=x".into())),
                ("services".into(), Some("gs".into())),
                (
                    "endpointslices.discovery.k8s.io".into(),
                    Some(SERVICE_NAME_LABEL.into())
                ),
            ]
        );
    }

    #[test]
    fn direct_mappings_watch_no_services() {
        let plans = plan(&config(
            "resourceQueryMapping:\n  pod: {group: \"\", version: v1, resource: pods, addressPath: status.podIP, portName: game}\n",
        ));
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].resource.api_version, "v1");
        assert_eq!(plans[0].label_selector, None);
    }

    #[test]
    fn a_role_with_nothing_to_watch_is_valid_yaml_with_no_rules() {
        // Found by the `config` fuzz target: `rules:` then `[]` on its own line.
        let role = cluster_role(&config("inventory: {kind: file, path: x.yaml}\n"), "u");
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["rules"], serde_json::json!([]), "{role}");
    }

    #[test]
    fn mapping_names_that_would_reach_the_role_raw_are_refused() {
        // Found by the `config` fuzz target: `resource: gameserve[s` went into the role as is.
        for (field, value) in [
            ("resource", "gameserve[s"),
            ("resource", "pods]\n- apiGroups: ['*']"),
            ("group", "agones.dev\"]"),
            ("version", "V1"),
            ("kind", "Game Server"),
        ] {
            let mut m = serde_json::json!({"group": "agones.dev", "version": "v1",
                "resource": "gameservers", "addressPath": "status.address", "portName": "default"});
            m[field] = serde_json::json!(value);
            let yaml = format!("resourceQueryMapping:\n  gs: {m}\n");
            let e = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(
                e.contains(&format!("resourceQueryMapping.gs.{field}")),
                "{e}"
            );
        }
    }

    #[test]
    fn cluster_role_lists_exactly_the_watched_types() {
        let role = cluster_role(&config(MAPPINGS), "udp-director");
        assert!(role.contains(
            "- apiGroups: [\"\"]\n  resources: [pods, services]\n  verbs: [list, watch]\n"
        ));
        assert!(role.contains(
            "- apiGroups: [\"agones.dev\"]\n  resources: [gameservers]\n  verbs: [list, watch]\n"
        ));
        assert!(
            role.contains("- apiGroups: [\"discovery.k8s.io\"]\n  resources: [endpointslices]\n")
        );
        assert_eq!(role.matches("apiGroups").count(), 3);
        assert!(
            !role.contains("verbs: [create]"),
            "no reviews without sessionsApi.auth"
        );
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["kind"], "ClusterRole");
    }

    #[test]
    fn kubernetes_sessions_auth_may_create_reviews_only() {
        let role = cluster_role(
            &config(&format!("sessionsApi: {{auth: kubernetes}}\n{MAPPINGS}")),
            "udp-director",
        );
        assert!(role.contains(
            "- apiGroups: [\"authentication.k8s.io\"]\n  resources: [tokenreviews]\n  verbs: [create]\n"
        ));
        assert!(role.contains(
            "- apiGroups: [\"authorization.k8s.io\"]\n  resources: [subjectaccessreviews]\n  verbs: [create]\n"
        ));
        assert_eq!(role.matches("apiGroups").count(), 5);
        let parsed: serde_json::Value = serde_yaml::from_str(&role).unwrap();
        assert_eq!(parsed["rules"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn forwarders_watch_their_namespace_and_every_service_with_a_role_of_their_own() {
        let c = config(&format!(
            "{MAPPINGS}forwarders: {{namespace: edge, servicePorts: {{udp: lb-udp, tcp: lb-tcp}}}}\n"
        ));
        let plans = plan(&c);
        let scoped: Vec<(String, Option<String>, Scope)> = plans
            .iter()
            .skip(2)
            .map(|p| (p.name(), p.label_selector.clone(), p.scope.clone()))
            .collect();
        assert_eq!(
            scoped,
            [
                ("services".into(), None, Scope::Cluster),
                (
                    "endpointslices.discovery.k8s.io".into(),
                    Some(SERVICE_NAME_LABEL.into()),
                    Scope::Cluster
                ),
                (
                    "forwarders.udp-director.dev".into(),
                    None,
                    Scope::Namespace("edge".into())
                ),
            ],
            "one Service watch serves both the mappings and the forwarders' targets"
        );
        let cluster = cluster_role(&c, "udp-director");
        assert!(
            !cluster.contains("forwarders"),
            "granted in the namespace only"
        );
        let role = forwarders_role(&c, "udp-director");
        let role = role.strip_prefix("---\n").expect("a document of its own");
        let parsed: serde_json::Value = serde_yaml::from_str(role).unwrap();
        assert_eq!(parsed["kind"], "Role");
        assert_eq!(parsed["metadata"]["name"], "udp-director-forwarders");
        assert_eq!(parsed["metadata"]["namespace"], "edge");
        assert_eq!(
            parsed["rules"],
            serde_json::json!([
                {"apiGroups": ["udp-director.dev"], "resources": ["forwarders"], "verbs": ["list", "watch"]},
                {"apiGroups": ["udp-director.dev"], "resources": ["forwarders/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["services"], "resourceNames": ["lb-tcp", "lb-udp"], "verbs": ["get", "patch"]},
            ])
        );
        assert_eq!(
            forwarders_role(&config(MAPPINGS), "x"),
            "",
            "no forwarders, no Role"
        );
    }

    #[test]
    fn managed_fields_are_dropped_and_type_filled_in() {
        let resource = core_resource("v1", "Pod", "pods");
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "a", "managedFields": [{"manager": "x"}]},
            "status": {"podIP": "10.0.0.1"}
        }))
        .unwrap();
        let rejections = Rejections::default();
        let o = to_object(object, &resource, &rejections).unwrap();
        assert_eq!((o.api_version.as_str(), o.kind.as_str()), ("v1", "Pod"));
        assert_eq!(o.raw.pointer("/metadata/managedFields"), None);
        assert_eq!(o.raw["status"]["podIP"], "10.0.0.1");
        assert_eq!(rejections.objects("Pod"), 0);
    }

    #[test]
    fn unreadable_objects_are_skipped_and_counted_by_the_watch_kind() {
        let resource = core_resource("v1", "Pod", "pods");
        let rejections = Rejections::default();
        for metadata in [
            serde_json::json!({"namespace": "a"}),
            serde_json::json!({"name": "x".repeat(10_000), "namespace": "a"}),
            serde_json::json!({"name": "p", "namespace": "a", "labels": {"bad key": "v"}}),
        ] {
            let object: DynamicObject =
                serde_json::from_value(serde_json::json!({ "metadata": metadata })).unwrap();
            assert!(to_object(object, &resource, &rejections).is_none());
        }
        assert_eq!(rejections.objects("Pod"), 3);
        assert_eq!(rejections.objects("other"), 0);
    }
}

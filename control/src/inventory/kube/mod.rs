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
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{InventoryError, InventorySource, Object, Rejections, Snapshot, sort_by_name};
use crate::config::{Config, InventoryConfig};
use crate::names;

mod plan;

pub use plan::{Feed, Scope, WatchPlan, allocation_roles, cluster_role, forwarders_role, plan};
use plan::{mapped_resource, same_type};

/// Events arriving within this window after a first one are folded into one snapshot, so a
/// fleet scaling by a hundred servers rebuilds the snapshot once, not a hundred times.
const COALESCE: Duration = Duration::from_millis(10);
/// How long changes of the mapped resources alone (game servers) are gathered into one
/// snapshot: a query sees a game server's change within this, and the query index is rebuilt
/// at most about ten times a second however fast the fleet changes.
const MAPPED_COALESCE: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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
                    resource = super::discovery::served(&client, resource).await;
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
            let mut urgent = self.plans[self.watches[id].plan].feed != Feed::Mapped;
            let mut changed = self.apply(id, change);
            tokio::time::sleep(COALESCE).await;
            while let Ok((id, change)) = self.rx.try_recv() {
                urgent |= self.plans[self.watches[id].plan].feed != Feed::Mapped;
                changed |= self.apply(id, change);
            }
            // Game servers alone (an Agones fleet changes them many times a second): gather
            // for longer, so the query index is rebuilt a few times a second, not per event.
            // Anything else (a Forwarder, a Route, a Service) goes out at once.
            if changed && !urgent {
                let gather = tokio::time::sleep(MAPPED_COALESCE - COALESCE);
                tokio::pin!(gather);
                loop {
                    tokio::select! {
                        () = &mut gather => break,
                        Some((id, change)) = self.rx.recv() => {
                            let feed = self.plans[self.watches[id].plan].feed;
                            self.apply(id, change);
                            if feed != Feed::Mapped {
                                break;
                            }
                        }
                    }
                }
                while let Ok((id, change)) = self.rx.try_recv() {
                    self.apply(id, change);
                }
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
    use plan::core_resource;

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

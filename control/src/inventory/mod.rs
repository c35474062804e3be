//! The inventory: Kubernetes-shaped objects, grouped by the resource types of
//! `resourceQueryMapping`, plus Services and EndpointSlices for service-based mappings.
//!
//! A source ([`InventorySource`]) yields immutable [`Snapshot`]s: the file source one per file
//! change ([`file`]), the Kubernetes source one per burst of watch events ([`kube`]). [`run`]
//! publishes each on a `watch` channel, so a query reads a consistent view without waiting on
//! anything, and never on the API server. A source error keeps the last good snapshot.

pub mod discovery;
pub mod file;
pub mod kube;
pub mod rejections;

pub use file::{FileSource, parse_objects};
pub use kube::KubeSource;
pub use rejections::{FileRefusal, Rejections};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::config::Mapping;

/// One object (GameServer, Pod, Service, …) with its commonly used metadata pulled out.
// `Eq`, so comparing two lists of the same `Arc`s is a pointer comparison each.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Object {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty for cluster-scoped or unset).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// The whole object, for paths into `spec` and `status`.
    pub raw: Value,
}

/// A raw object without the fields every object has.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum MissingField {
    /// No `apiVersion`.
    #[error("missing apiVersion")]
    ApiVersion,
    /// No `kind`.
    #[error("missing kind")]
    Kind,
    /// No `metadata.name`.
    #[error("missing metadata.name")]
    Name,
}

impl Object {
    /// Reads the metadata of a raw object; fails when `apiVersion`, `kind` or `metadata.name` is
    /// missing.
    pub fn from_value(raw: Value) -> Result<Self, MissingField> {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let map = |v: Option<&Value>| -> BTreeMap<String, String> {
            v.and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| {
                            let v = match v {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                Value::Bool(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((k.clone(), v))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let meta = raw.get("metadata");
        let api_version = text(raw.get("apiVersion")).ok_or(MissingField::ApiVersion)?;
        let kind = text(raw.get("kind")).ok_or(MissingField::Kind)?;
        let name = text(meta.and_then(|m| m.get("name"))).ok_or(MissingField::Name)?;
        Ok(Self {
            api_version,
            kind,
            namespace: text(meta.and_then(|m| m.get("namespace"))).unwrap_or_default(),
            name,
            labels: map(meta.and_then(|m| m.get("labels"))),
            annotations: map(meta.and_then(|m| m.get("annotations"))),
            raw,
        })
    }
}

/// An immutable view of the inventory.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// True once a source delivered its first complete list of everything but the
    /// forwarders: what queries and the token ports wait for.
    pub loaded: bool,
    /// True once the forwarders' watches have listed too: what the forwarder reconciler waits
    /// for (a missing CRD or Role keeps only the forwarders waiting, not the token ports).
    pub forwarders_loaded: bool,
    /// True once the routes' watches have listed too: what the route reconciler waits for.
    pub routes_loaded: bool,
    /// True once the Gateway API watches have listed too: what the gateway reconciler waits for.
    pub gateway_loaded: bool,
    /// Objects per mapping name, sorted by namespace and name.
    pub by_mapping: BTreeMap<String, Vec<Arc<Object>>>,
    /// Services (core v1), for service-based mappings.
    pub services: Vec<Arc<Object>>,
    /// EndpointSlices (discovery.k8s.io/v1), for service-based mappings to headless Services.
    pub endpoint_slices: Vec<Arc<Object>>,
    /// `Forwarder` objects (any namespace: the reconciler picks its own), in name order.
    pub forwarders: Vec<Arc<Object>>,
    /// `Route` objects, in name order.
    pub routes: Vec<Arc<Object>>,
    /// Gateway API objects (GatewayClass, Gateway, UDPRoute, TCPRoute, ReferenceGrant), in name
    /// order.
    pub gateway_api: Vec<Arc<Object>>,
    /// Every watched resource (`gameservers.agones.dev`, `services`, …) and whether its cache
    /// is stale: its watch failed and has not yet re-listed. Empty for the file source.
    pub watches: Vec<(String, bool)>,
    /// A version per kind of object, moved by [`run`] when that kind's list changes, so a
    /// consumer does work only when what it reads changed: a GameServer update moves
    /// `mapped` alone, and the reconcilers of forwarders, routes and Gateways sleep through it.
    pub versions: Versions,
}

/// A version per kind of object in a [`Snapshot`] (see [`Snapshot::versions`]).
#[derive(Clone, Copy, Debug, Default, Eq, Hash, PartialEq)]
pub struct Versions {
    /// The objects of the mappings (GameServers, Pods, …), and whether the source has loaded.
    pub mapped: u64,
    /// Services.
    pub services: u64,
    /// EndpointSlices.
    pub endpoint_slices: u64,
    /// Forwarders, and whether their watches have listed: what they ask for, not their
    /// status (a status this proxy wrote comes back through the watch, and must not make the
    /// reconcilers plan again).
    pub forwarders: u64,
    /// Routes, likewise.
    pub routes: u64,
    /// Gateway API objects, likewise.
    pub gateway_api: u64,
    /// Any change at all to Forwarders, Routes or Gateway API objects, status included: what
    /// the status writers compare against.
    pub statuses: u64,
}

impl Versions {
    /// `previous`'s versions, each moved on by one where `next`'s list differs from
    /// `previous`'s. Unchanged objects are the same `Arc`s in both (the sources keep them), so
    /// an unchanged list costs a pointer comparison per object.
    pub fn next(previous: &Snapshot, next: &Snapshot) -> Self {
        let v = previous.versions;
        let bump = |version: u64, changed: bool| version + u64::from(changed);
        Self {
            mapped: bump(
                v.mapped,
                previous.loaded != next.loaded || previous.by_mapping != next.by_mapping,
            ),
            services: bump(v.services, previous.services != next.services),
            endpoint_slices: bump(
                v.endpoint_slices,
                previous.endpoint_slices != next.endpoint_slices,
            ),
            forwarders: bump(
                v.forwarders,
                previous.forwarders_loaded != next.forwarders_loaded
                    || !same_asks(&previous.forwarders, &next.forwarders),
            ),
            routes: bump(
                v.routes,
                previous.routes_loaded != next.routes_loaded
                    || !same_asks(&previous.routes, &next.routes),
            ),
            gateway_api: bump(
                v.gateway_api,
                previous.gateway_loaded != next.gateway_loaded
                    || !same_asks(&previous.gateway_api, &next.gateway_api),
            ),
            statuses: bump(
                v.statuses,
                previous.forwarders != next.forwarders
                    || previous.routes != next.routes
                    || previous.gateway_api != next.gateway_api,
            ),
        }
    }
}

/// Whether two lists of objects ask for the same: equal but for `status` and the metadata
/// the API server moves on every write (`resourceVersion`, `managedFields`).
fn same_asks(a: &[Arc<Object>], b: &[Arc<Object>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| Arc::ptr_eq(a, b) || asks_alike(a, b))
}

fn asks_alike(a: &Object, b: &Object) -> bool {
    let (Some(a), Some(b)) = (a.raw.as_object(), b.raw.as_object()) else {
        return a.raw == b.raw;
    };
    let fields = |o: &serde_json::Map<String, Value>| {
        o.iter()
            .filter(|(k, _)| *k != "status" && *k != "metadata")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    let metadata = |o: &serde_json::Map<String, Value>| {
        o.get("metadata")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| *k != "resourceVersion" && *k != "managedFields")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // Only objects that differ get here (a changed one, or a file re-read): rare enough that
    // the copies cost nothing worth a hand-written comparison.
    fields(a) == fields(b) && metadata(a) == metadata(b)
}

/// apiVersion of Services.
pub const SERVICE_API_VERSION: &str = "v1";
/// apiVersion of EndpointSlices.
pub const ENDPOINT_SLICE_API_VERSION: &str = "discovery.k8s.io/v1";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl Snapshot {
    /// Groups objects by the mappings they belong to.
    pub fn build(objects: Vec<Object>, mappings: &BTreeMap<String, Mapping>) -> Self {
        let mut by_mapping: BTreeMap<String, Vec<Arc<Object>>> =
            mappings.keys().map(|k| (k.clone(), Vec::new())).collect();
        let mut services = Vec::new();
        let mut endpoint_slices = Vec::new();
        let mut forwarders = Vec::new();
        let mut routes = Vec::new();
        let mut gateway_api = Vec::new();
        for object in objects {
            let object = Arc::new(object);
            if crate::crd::forwarder::is_forwarder(&object.api_version, &object.kind) {
                forwarders.push(Arc::clone(&object));
            }
            if crate::crd::route::is_route(&object.api_version, &object.kind) {
                routes.push(Arc::clone(&object));
            }
            if crate::crd::gateway::is_gateway_api(&object.api_version) {
                gateway_api.push(Arc::clone(&object));
            }
            if object.api_version == SERVICE_API_VERSION && object.kind == "Service" {
                services.push(Arc::clone(&object));
            }
            if object.api_version == ENDPOINT_SLICE_API_VERSION && object.kind == "EndpointSlice" {
                endpoint_slices.push(Arc::clone(&object));
            }
            for (name, mapping) in mappings {
                if object.api_version == mapping.api_version() && mapping.matches_kind(&object.kind)
                {
                    by_mapping
                        .get_mut(name)
                        .expect("every mapping has a list")
                        .push(Arc::clone(&object));
                }
            }
        }
        for list in by_mapping.values_mut() {
            sort_by_name(list);
        }
        sort_by_name(&mut endpoint_slices);
        sort_by_name(&mut forwarders);
        sort_by_name(&mut routes);
        sort_by_name(&mut gateway_api);
        Self {
            loaded: true,
            forwarders_loaded: true,
            routes_loaded: true,
            gateway_loaded: true,
            by_mapping,
            services,
            endpoint_slices,
            forwarders,
            routes,
            gateway_api,
            watches: Vec::new(),
            versions: Versions::default(),
        }
    }

    /// Objects per resource type, as `gameserver=12 pod=3`, for logs.
    pub fn counts(&self) -> String {
        let counts: Vec<String> = self
            .by_mapping
            .iter()
            .map(|(k, v)| format!("{k}={}", v.len()))
            .collect();
        counts.join(" ")
    }

    /// The Service in `namespace` labelled `label=value`.
    pub fn service_labelled(&self, namespace: &str, label: &str, value: &str) -> Option<&Object> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.labels.get(label).is_some_and(|v| v == value))
            .map(Arc::as_ref)
    }

    /// The address of the first ready endpoint (in slice-name order) of a Service, on the
    /// EndpointSlice port named `port_name`: how a headless Service is reached.
    pub fn ready_endpoint(
        &self,
        namespace: &str,
        service: &str,
        port_name: &str,
    ) -> Option<SocketAddr> {
        self.endpoint_slices
            .iter()
            .filter(|s| {
                s.namespace == namespace
                    && s.labels
                        .get(SERVICE_NAME_LABEL)
                        .is_some_and(|v| v == service)
            })
            .find_map(|slice| {
                let port = slice
                    .raw
                    .get("ports")?
                    .as_array()?
                    .iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(port_name))?
                    .get("port")?
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())?;
                let ip: IpAddr = slice
                    .raw
                    .get("endpoints")?
                    .as_array()?
                    .iter()
                    // An absent `ready` condition means ready (EndpointSlice API contract).
                    .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)))
                    .find_map(|e| e.pointer("/addresses/0")?.as_str()?.parse().ok())?;
                Some(SocketAddr::new(ip, port))
            })
    }
}

/// Sorts objects by namespace, then name: the order queries see and ties are broken in.
pub fn sort_by_name(list: &mut [Arc<Object>]) {
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
}

/// Why a source could not deliver a list.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{path} is not valid YAML: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message, with position.
        source: serde_yaml::Error,
    },
    /// The file is readable YAML but is not applied: empty, too large, or an invalid object.
    #[error("{path} not applied: {reason}")]
    Refused {
        /// File path.
        path: PathBuf,
        /// Which kind of refusal, for the counter.
        cause: FileRefusal,
        /// Why, for the log.
        reason: String,
    },
}

impl InventoryError {
    /// The reason a refused file is counted under.
    pub fn refusal(&self) -> FileRefusal {
        match self {
            Self::Read { .. } => FileRefusal::ReadError,
            Self::Parse { .. } => FileRefusal::ParseError,
            Self::Refused { cause, .. } => *cause,
        }
    }
}

/// Something that yields the current inventory, then each changed one.
pub trait InventorySource: Send + 'static {
    /// Human name for logs.
    fn describe(&self) -> String;

    /// The first call returns the current inventory; later calls wait for a change.
    fn next(&mut self) -> impl Future<Output = Result<Snapshot, InventoryError>> + Send;
}

/// Drives a source: publishes each snapshot, logs and keeps the last good one on errors.
/// Returns when every receiver is gone.
pub async fn run<S: InventorySource>(mut source: S, tx: watch::Sender<Arc<Snapshot>>) {
    let mut trimmed = Instant::now();
    loop {
        let result = tokio::select! {
            r = source.next() => r,
            () = tx.closed() => return,
        };
        match result {
            Ok(mut snapshot) => {
                snapshot.versions = Versions::next(&tx.borrow(), &snapshot);
                if snapshot.loaded {
                    log::debug!(
                        "inventory from {}: {}",
                        source.describe(),
                        snapshot.counts()
                    );
                }
                let previous = tx.send_replace(Arc::new(snapshot));
                if tx.is_closed() {
                    return;
                }
                retire(Some(previous), &mut trimmed);
            }
            Err(e) => {
                log::warn!("inventory not updated, keeping the last good one: {e}");
                // A refused file was parsed all the same: its memory goes back too.
                retire(None, &mut trimmed);
            }
        }
    }
}

/// How often freed memory is handed back to the OS at most.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Drops a replaced snapshot (tens of thousands of objects in a big fleet) on a blocking thread,
/// not on the control thread that answers queries, and then, at most once a [`TRIM_INTERVAL`],
/// returns freed heap memory to the OS: a big inventory is many small allocations, and once it
/// is replaced (or a refused file's parse is dropped) glibc would keep the pages, so RSS would
/// stay at its peak long after the file was fixed.
fn retire(previous: Option<Arc<Snapshot>>, trimmed: &mut Instant) {
    let trim = trimmed.elapsed() >= TRIM_INTERVAL;
    if trim {
        *trimmed = Instant::now();
    }
    tokio::task::spawn_blocking(move || {
        drop(previous);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if trim {
            // SAFETY: malloc_trim only walks and releases glibc's free lists; no pointers
            // are passed.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_version_moves_only_when_its_list_changes() {
        let object = |kind: &str, name: &str| {
            Object::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": "a"},
            }))
            .unwrap()
        };
        let first = Snapshot::build(vec![object("Service", "s")], &BTreeMap::new());
        let mut first_versioned = first.clone();
        first_versioned.versions = Versions::next(&Snapshot::default(), &first);
        assert_eq!(first_versioned.versions.services, 1);
        assert_eq!(first_versioned.versions.mapped, 1, "loaded");
        assert_eq!(first_versioned.versions.routes, 1, "routes listed");
        // The same Arcs again (what the Kubernetes source keeps): nothing moves.
        let again = first_versioned.clone();
        assert_eq!(
            Versions::next(&first_versioned, &again),
            first_versioned.versions
        );
        // A status written back: the writers' version alone.
        let mut written = first_versioned.clone();
        let mut route = object("Route", "r");
        route.raw["status"] = serde_json::json!({"instances": [{"node": "a"}]});
        route.raw["metadata"]["resourceVersion"] = serde_json::json!("7");
        let mut unwritten = object("Route", "r");
        unwritten.raw["metadata"]["resourceVersion"] = serde_json::json!("6");
        let mut before = first_versioned.clone();
        before.routes = vec![Arc::new(unwritten)];
        written.routes = vec![Arc::new(route)];
        let v = Versions::next(&before, &written);
        assert_eq!(
            (v.routes, v.statuses),
            (before.versions.routes, before.versions.statuses + 1)
        );
        // A spec change moves both.
        let mut asked = written.clone();
        let mut changed_route = object("Route", "r");
        changed_route.raw["spec"] = serde_json::json!({"entryPoint": "voice"});
        asked.routes = vec![Arc::new(changed_route)];
        let w = Versions::next(&written, &asked);
        assert_eq!(
            (w.routes, w.statuses),
            (written.versions.routes + 1, written.versions.statuses + 1)
        );
        // A Service changes: services alone.
        let mut changed = first_versioned.clone();
        changed.services = vec![Arc::new(object("Service", "t"))];
        let v = Versions::next(&first_versioned, &changed);
        assert_eq!(v.services, 2);
        assert_eq!(
            (
                v.mapped,
                v.forwarders,
                v.routes,
                v.gateway_api,
                v.endpoint_slices
            ),
            (1, 1, 1, 1, 0)
        );
    }
}

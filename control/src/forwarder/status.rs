//! What an instance writes to the API server for its forwarders: its own entry of each
//! forwarder's `status.instances`, and the managed Service ports.
//!
//! Both are server-side applies. Status uses a field manager per node, and `instances` is a
//! list-map keyed by `node`, so each instance owns exactly its entry and N DaemonSet pods never
//! overwrite each other. The Service ports use one field manager shared by every instance:
//! each applies the whole set it computes (the same set on every instance, from the same
//! objects), so a port removed from the set is released at once instead of lingering under
//! another instance's ownership, and ports other managers own (the operator's) are left alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use super::plan::{ServicePort, live_ports};
use super::{API_VERSION, KIND, Wanted};
use crate::crd::{Forwarder, ForwarderInstance};
use crate::inventory::Snapshot;

/// How often the writer looks again without a change (retries that came due).
const TICK: Duration = Duration::from_secs(1);
/// A failed write is retried after this long, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The field manager of the managed Service ports, shared by every instance.
pub const SERVICE_PORTS_MANAGER: &str = "udp-director-forwarders";

/// Writes one instance's forwarder status and the Service ports.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    namespace: String,
    node: String,
    manager: String,
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
    /// A writer for the forwarders in `namespace`, as the instance on `node`.
    pub fn new(client: Client, namespace: String, node: String) -> Self {
        let manager = field_manager(&node);
        Self {
            client,
            namespace,
            node,
            manager,
        }
    }

    /// The node this instance writes as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Writes what the reconciler wants, as it changes, until either channel closes: a status
    /// entry when it differs from the last one written (to this uid), a Service's ports when
    /// they differ from the last applied or the Service as watched lacks one (the Service was
    /// re-created, or an instance with an older view applied last). A failed write is retried
    /// with a back-off and logged once per distinct error.
    pub async fn run(
        self,
        mut wanted: watch::Receiver<Arc<Wanted>>,
        mut inventory: watch::Receiver<Arc<Snapshot>>,
    ) {
        let mut written: HashMap<String, (String, ForwarderInstance)> = HashMap::new();
        let mut applied: HashMap<String, Vec<ServicePort>> = HashMap::new();
        let mut retries = Retries::default();
        loop {
            tokio::select! {
                r = wanted.changed() => if r.is_err() { return },
                r = inventory.changed() => if r.is_err() { return },
                () = tokio::time::sleep(TICK) => {}
            }
            let want = Arc::clone(&wanted.borrow_and_update());
            let snapshot = Arc::clone(&inventory.borrow_and_update());
            written.retain(|name, _| want.statuses.contains_key(name));
            for (name, entry) in &want.statuses {
                let key = format!("forwarder {name}");
                if written.get(name) == Some(entry) || !retries.due(&key) {
                    continue;
                }
                let result = self.write_instance(name, &entry.1).await;
                if retries.settle(&key, result, "status not written") {
                    written.insert(name.clone(), entry.clone());
                }
            }
            for (service, ports) in &want.services {
                let key = format!("Service {}/{service}", self.namespace);
                let live = live_ports(&snapshot.services, &self.namespace, service);
                let missing = live.is_some_and(|live| ports.iter().any(|p| !live.contains(p)));
                if (applied.get(service) == Some(ports) && !missing) || !retries.due(&key) {
                    continue;
                }
                let result = self.apply_service_ports(service, ports).await;
                if retries.settle(&key, result, "forwarder ports not written") {
                    log::info!("{key}: {} forwarder port(s)", ports.len());
                    applied.insert(service.clone(), ports.clone());
                }
            }
        }
    }

    /// Applies this instance's entry of a forwarder's `status.instances`.
    pub async fn write_instance(
        &self,
        name: &str,
        instance: &ForwarderInstance,
    ) -> Result<(), kube::Error> {
        let mut instance = instance.clone();
        instance.last_update_time = Some(k8s_openapi::jiff::Timestamp::now().to_string());
        let patch = json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "status": {"instances": [instance]},
        });
        let api: Api<Forwarder> = Api::namespaced(self.client.clone(), &self.namespace);
        // Forced: the entry is this node's alone, whoever wrote it last (an earlier pod).
        api.patch_status(
            name,
            &PatchParams::apply(&self.manager).force(),
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

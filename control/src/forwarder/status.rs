//! What an instance writes to the API server for its forwarders: its own entry of each
//! forwarder's `status.instances`, and the managed Service ports.
//!
//! Both are server-side applies. Status uses a field manager per node, and `instances` is a
//! list-map keyed by `node`, so each instance owns exactly its entry and N DaemonSet pods never
//! overwrite each other. The Service ports use one field manager shared by every instance:
//! each applies the whole set it computes (the same set on every instance, from the same
//! objects), so a port removed from the set is released at once instead of lingering under
//! another instance's ownership, and ports other managers own (the operator's) are left alone.

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::plan::ServicePort;
use super::{API_VERSION, KIND};
use crate::crd::{Forwarder, ForwarderInstance};

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
    let mut manager = format!("udp-director/{node}");
    manager.truncate(128);
    manager
}
